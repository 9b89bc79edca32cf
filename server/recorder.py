"""What a run leaves on disk, written crash-safe: one line per round, checkpoints, the summary.

Output directory layout (the README's "What a run leaves on disk"): ``metrics.jsonl`` (one line per round),
``summary.json`` (written last: its presence means the run completed),
``adapter/`` (global adapter, PEFT format), ``checkpoint/`` (resume point), ``run.json``
(the run token), ``prior.npy`` (the popularity prior), ``failure.json`` (why a run stopped).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.config import Settings
from common.files import atomic_write, atomic_write_json, atomic_write_text, default_mode, dumps, fsync_dir

CHECKPOINT = "checkpoint"
POINTER = "LATEST"  # inside checkpoint/: the name of the complete checkpoint folder
BEST = "best.npz"  # inside a checkpoint: the best-validation round's state so far
RUN_FILE = "run.json"  # the run token, kept by --resume
FAILURE = "failure.json"  # why the run stopped, when it could not go on


@dataclass
class RunRecorder:
    """Writes one line per round, checkpoints, and the summary; resumes from a checkpoint.

    Every file is replaced atomically (common/files.py). A checkpoint is a folder
    ``checkpoint/round-NNNNN/`` made complete beside the live one and then named by the
    pointer file ``checkpoint/LATEST`` (one atomic replace), so a crash at any moment
    leaves the previous checkpoint or the new one, never none.
    """

    out: Path
    settings: Settings
    start_round: int = 0
    history: list[dict] = field(default_factory=list)
    sites: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    elapsed_before: float = 0.0
    run_token: str = ""
    releases: list = field(default_factory=list)  # central DP's noised rounds (server/central_dp.py)
    # the round chosen on validation so far (round 0, the untrained start, included) and its
    # state: what adapter/ ships, so the model a user gets is the one whose test numbers are reported
    best_round: int | None = None
    best_state: dict = field(default_factory=dict)

    @classmethod
    def open(cls, out: str | Path, settings: Settings) -> RunRecorder:
        """The recorder of the run in ``out``: resumed from its checkpoint when it has a
        usable one, else a fresh start (an empty ``metrics.jsonl``)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rec = cls(out, settings, run_token=run_token(out))
        (out / FAILURE).unlink(missing_ok=True)
        folder = usable_checkpoint(out)
        if folder is None:
            atomic_write_text(out / "metrics.jsonl", "")
            return rec
        saved = json.loads((folder / "state.json").read_text())
        rec.start_round, rec.sites, rec.elapsed_before = saved["round"], saved["sites"], saved["seconds"]
        rec.releases = [tuple(r) for r in saved.get("releases", [])]
        rec.best_round = saved.get("best_round")
        if (folder / BEST).exists():
            with np.load(folder / BEST) as z:
                rec.best_state = {k: z[k] for k in z.files}
        kept = []  # the lines up to the checkpoint; a crash may have left a later or a half line
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            if row["round"] > rec.start_round:
                break
            kept.append(line)
            rec.history.append(row)
        atomic_write_text(out / "metrics.jsonl", "".join(f"{line}\n" for line in kept))
        return rec

    def resume_state(self) -> dict[str, np.ndarray] | None:
        folder = usable_checkpoint(self.out)
        if self.start_round == 0 or folder is None:
            return None
        with np.load(folder / "arrays.npz") as z:
            return {k: z[k] for k in z.files}

    def saved_prior(self) -> np.ndarray | None:
        path = self.out / "prior.npy"
        return np.load(path) if path.exists() else None

    def save_prior(self, prior: np.ndarray) -> None:
        """Kept with the run: a resumed run must not ask the sites to spend on it again."""
        atomic_write(self.out / "prior.npy", lambda tmp: _save_with(np.save, tmp, prior))

    def record_sites(self, replies: list[dict]) -> None:
        for r in replies:
            self.sites[str(r["site"])] = r

    def epsilon(self) -> float:
        """The largest ε any site reported (a non-finite claim counts for nothing)."""
        spent = [float(s.get("epsilon", 0.0)) for s in self.sites.values()]
        return max((e for e in spent if math.isfinite(e)), default=0.0)

    def round_done(self, rnd: int, metrics: dict, train: dict, model, state: dict) -> dict:
        """Append the round's line, checkpoint, and return the line. ``train`` may carry
        ``participation`` (who was sampled, trained, failed, refused or was rejected) and
        ``evaluation`` (the same for federated evaluation)."""
        line = {
            "round": rnd,
            "hr@10": metrics["test/hr@10"],
            "ndcg@10": metrics["test/ndcg@10"],
            "mrr@10": metrics["test/mrr@10"],
            "epsilon": self.epsilon(),
            "train_loss": train.get("train_loss", math.nan),
            "bytes_up": train.get("bytes_up", 0),
            "sites": train.get("sites", 0),
            "refused": train.get("refused", 0),
            "failed": train.get("failed", 0),
            "rejected": train.get("rejected", 0),
            "seconds": round(time.time() - self.started + self.elapsed_before, 3),
        } | metrics
        for record in ("participation", "evaluation"):  # who took part in training, in federated evaluation
            if record in train:
                line[record] = train[record]
        line["site_epsilon"] = {name: site.get("epsilon") for name, site in self.sites.items()}  # report.png's per-site curves
        self.history.append(line)
        best = self.best_line()
        if best is None or _finite_or_worst(line["valid/ndcg@10"]) > _finite_or_worst(best["valid/ndcg@10"]):
            self.best_round, self.best_state = rnd, {k: np.array(v, copy=True) for k, v in state.items()}
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if rnd > 0:  # round 0 is the starting point: nothing to resume from yet
            self._checkpoint(rnd, model, state)
        return line

    def best_line(self) -> dict | None:
        """The recorded line of the round chosen on validation so far (None before any)."""
        return next((h for h in self.history if h["round"] == self.best_round), None)

    def _checkpoint(self, rnd: int, model, state: dict) -> None:
        from common.adapter import save_adapter  # torch: imported where a model is saved, not by `fedenc simulate`

        root = self.out / CHECKPOINT
        root.mkdir(exist_ok=True)
        name = f"round-{rnd:05d}"
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        os.chmod(tmp, default_mode(folder=True))
        _save_with(np.savez, tmp / "arrays.npz", **state)
        _save_with(np.savez, tmp / BEST, **self.best_state)
        save_adapter(model, tmp / "adapter", self.settings.as_dict())
        seconds = time.time() - self.started + self.elapsed_before
        (tmp / "state.json").write_text(dumps({"round": rnd, "sites": self.sites, "seconds": seconds,
                                               "releases": self.releases, "best_round": self.best_round}))
        _fsync_tree(tmp)
        # A folder of this name can only be left by an attempt that crashed before its
        # pointer swap: the pointer names an earlier round, so this is never the live one.
        shutil.rmtree(root / name, ignore_errors=True)
        os.replace(tmp, root / name)
        fsync_dir(root)
        atomic_write_text(root / POINTER, name)
        for old in root.iterdir():  # only now: until the swap they were the checkpoint
            if old.name not in (name, POINTER):
                shutil.rmtree(old) if old.is_dir() else old.unlink()

    def fail(self, reason: str) -> None:
        """Record why the run could not go on (``failure.json``), for the driver to show."""
        atomic_write_json(self.out / FAILURE, {"reason": reason, "round": self.history[-1]["round"] if self.history else None})

    def trained_any(self) -> bool:
        """Whether any site's update went into the model in any round of this run."""
        return any(h["round"] > 0 and h.get("sites", 0) > 0 for h in self.history)

    def finish(self, model, state: dict, extra: dict | None = None) -> dict:
        """Write ``adapter/`` (unless ``model`` is None: a baseline without a model) with the
        state of the best-validation round (``state``, the last one, if no round was recorded)
        and, last, ``summary.json`` (with ``extra`` keys added)."""
        from common.adapter import load_trainable_state, save_adapter, state_bytes

        adapter = self.out / "adapter"
        if model is not None:
            load_trainable_state(model, self.best_state if self.best_round is not None else state)
            tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=self.out))
            save_adapter(model, tmp / "adapter", self.settings.as_dict())
            _fsync_tree(tmp)
            shutil.rmtree(adapter, ignore_errors=True)
            os.replace(tmp / "adapter", adapter)
            tmp.rmdir()
        else:
            shutil.rmtree(adapter, ignore_errors=True)
        best = self.best_line() or {}
        summary = {
            "final": self.history[-1],
            "best_validation": best,
            "best_round": self.best_round,
            "epsilon": self.epsilon(),
            "sites": self.sites,
            "rounds": [{"round": h["round"]} | h["participation"] | ({"evaluation": h["evaluation"]} if "evaluation" in h else {})
                       for h in self.history if "participation" in h],
            "bytes_per_update": state_bytes(state),
            "wall_seconds": round(time.time() - self.started + self.elapsed_before, 3),
            "settings": self.settings.as_dict(),
        } | (extra or {})
        atomic_write_json(self.out / "summary.json", summary, indent=1)
        return summary


def run_token(out: Path) -> str:
    """The run's random token, made once per output folder (``run.json``) and kept by
    ``--resume``: a site keys the update it kept for a round by (token, round), so a
    repeated round is not paid twice."""
    path = out / RUN_FILE
    if path.exists():
        return json.loads(path.read_text())["run-token"]
    token = secrets.token_hex(16)
    atomic_write_json(path, {"run-token": token, "created": time.time()})
    return token


def usable_checkpoint(out: str | Path) -> Path | None:
    """The folder of the last complete checkpoint in ``out``, or None.

    >>> usable_checkpoint("runs/none-here") is None
    True
    """
    root = Path(out) / CHECKPOINT
    try:
        name = (root / POINTER).read_text().strip()
    except OSError:
        return None
    folder = root / name
    if name and (folder / "state.json").is_file() and (folder / "arrays.npz").is_file():
        return folder
    return None


def _finite_or_worst(value) -> float:
    # a diverged round's NaN (null once written) must never be "best"
    return value if value is not None and math.isfinite(value) else -math.inf


def _save_with(save, path: Path, *args, **kwargs) -> None:
    # numpy appends ".npy"/".npz" to a file name without it: hand it an open file
    with open(path, "wb") as f:
        save(f, *args, **kwargs)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        else:
            fsync_dir(path)
    fsync_dir(folder)
