"""Server-side work that is not Flower glue: central evaluation, per-site privacy
tracking, per-round records, checkpoints and the final summary.

Output directory layout (the README's "What a run leaves on disk"): ``metrics.jsonl`` (one line per round),
``summary.json`` (written last: its presence means the run completed),
``adapter/`` (global adapter, PEFT format), ``checkpoint/`` (resume point).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .adapter import load_trainable_state, save_adapter, state_bytes, trainable_state
from .config import Settings
from .examples import EvalRows, evaluation_rows
from .site import dataset, shared_model
from .training import rank_of_targets, rankable_items, ranking_metrics, resolve_device, with_lower_states

CHECKPOINT = "checkpoint"


class CentralEvaluator:
    """Scores every user's (or a seeded sample of users') held-out item, full ranking.

    In simulation the server may read every user's split (a simulation convenience,
    stated in docs/DESIGN.md, "Evaluation protocol"); in deployment it evaluates on a server-side dataset.
    """

    def __init__(self, settings: Settings, model=None):
        """``model``: score this model (e.g. one restored from a run folder) instead of the
        process's shared one."""
        self.settings = settings
        self.data, self.split = dataset(settings.data)
        self.model = shared_model(settings, self.data) if model is None else model
        self.device = resolve_device(settings.train.device)
        users = np.arange(len(self.data.user_ids))
        if settings["eval-exclude-prefix"]:  # the privacy audit's canaries are no one's utility
            users = np.array([u for u in users if not self.data.user_ids[u].startswith(settings["eval-exclude-prefix"])])
        n = settings["eval-users"]
        if n and n < len(users):
            users = np.sort(np.random.default_rng(settings["seed"]).choice(users, n, replace=False))
        self.users = users
        self.rows = {which: self._rows(which) for which in ("valid", "test")}
        self.rankable = {which: rankable_items(rows, len(self.data.catalogue)) for which, rows in self.rows.items()}
        self.cold = self._cold_start_mask()

    def _rows(self, which: str) -> EvalRows:
        m = self.settings.model
        rows = evaluation_rows(self.data.catalogue, self.split, self.users, self.model.tokenizer, m.max_tokens, m.max_history, which)
        return EvalRows(with_lower_states(self.model, rows.dataset), rows.exclude)

    def _cold_start_mask(self) -> np.ndarray:
        seen = np.zeros(len(self.data.catalogue), dtype=bool)
        for seq in self.split.train:
            seen[seq] = True
        return ~seen[self.split.test[self.users]]

    def initial_state(self) -> dict[str, np.ndarray]:
        return trainable_state(self.model)

    def __call__(self, state: dict[str, np.ndarray]) -> dict[str, float]:
        """``valid/…`` and ``test/…`` metrics of ``state``; the unprefixed keys are test."""
        load_trainable_state(self.model, state)
        return self.metrics({which: rank_of_targets(self.model, rows, self.device) for which, rows in self.rows.items()})

    def metrics(self, ranked: dict[str, tuple[np.ndarray, float]]) -> dict[str, float]:
        """``valid/…``, ``test/…`` and ``cold/…`` metrics from each split's (ranks, loss), ranks in
        ``self.users`` order. ``cold/…``: test users whose test item is in no training history."""
        out = {}
        for which, (ranks, loss) in ranked.items():
            for k, v in (ranking_metrics(ranks, rankable=self.rankable[which]) | {"loss": loss, "users": int(len(ranks))}).items():
                out[f"{which}/{k}"] = v
        cold = ranked["test"][0][self.cold]
        cold_metrics = ranking_metrics(cold, rankable=self.rankable["test"][self.cold])
        out |= {f"cold/{k}": v for k, v in cold_metrics.items()} | {"cold/users": int(self.cold.sum())}
        return out


@dataclass
class RunRecorder:
    """Writes one line per round, checkpoints, and the summary; resumes from a checkpoint."""

    out: Path
    settings: Settings
    start_round: int = 0
    history: list[dict] = field(default_factory=list)
    sites: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    elapsed_before: float = 0.0

    @classmethod
    def open(cls, out: str | Path, settings: Settings) -> RunRecorder:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        rec = cls(out, settings)
        ckpt = out / CHECKPOINT / "state.json"
        if ckpt.exists():
            saved = json.loads(ckpt.read_text())
            rec.start_round, rec.sites, rec.elapsed_before = saved["round"], saved["sites"], saved["seconds"]
            rec.history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            rec.history = [h for h in rec.history if h["round"] <= rec.start_round]
        else:
            (out / "metrics.jsonl").write_text("")
        return rec

    def resume_state(self) -> dict[str, np.ndarray] | None:
        path = self.out / CHECKPOINT / "arrays.npz"
        if self.start_round == 0 or not path.exists():
            return None
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def saved_prior(self) -> np.ndarray | None:
        path = self.out / "prior.npy"
        return np.load(path) if path.exists() else None

    def save_prior(self, prior: np.ndarray) -> None:
        """Kept with the run: a resumed run must not ask the sites to spend on it again."""
        np.save(self.out / "prior.npy", prior)

    def record_sites(self, replies: list[dict]) -> None:
        for r in replies:
            self.sites[str(r["site"])] = r

    def epsilon(self) -> float:
        return max((s["epsilon"] for s in self.sites.values()), default=0.0)

    def round_done(self, rnd: int, metrics: dict, train: dict, model, state: dict) -> dict:
        """Append the round's line, checkpoint, and return the line."""
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
            "seconds": round(time.time() - self.started + self.elapsed_before, 3),
        } | metrics
        self.history.append(line)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        if rnd > 0:  # round 0 is the starting point: nothing to resume from yet
            self._checkpoint(rnd, model, state)
        return line

    def _checkpoint(self, rnd: int, model, state: dict) -> None:
        tmp = self.out / f"{CHECKPOINT}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        np.savez(tmp / "arrays.npz", **state)
        save_adapter(model, tmp / "adapter", self.settings.as_dict())
        seconds = time.time() - self.started + self.elapsed_before
        (tmp / "state.json").write_text(json.dumps({"round": rnd, "sites": self.sites, "seconds": seconds}))
        final = self.out / CHECKPOINT
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # a crash leaves the previous checkpoint or the new one, never half

    def finish(self, model, state: dict, extra: dict | None = None) -> dict:
        """Write ``adapter/`` (unless ``model`` is None: a baseline without a model) and, last,
        ``summary.json`` (with ``extra`` keys added)."""
        adapter = self.out / "adapter"
        shutil.rmtree(adapter, ignore_errors=True)
        if model is not None:
            load_trainable_state(model, state)
            save_adapter(model, adapter, self.settings.as_dict())
        rounds = [h for h in self.history if h["round"] > 0] or self.history
        best = max(rounds, key=lambda h: h["valid/ndcg@10"])
        summary = {
            "final": self.history[-1],
            "best_validation": best,
            "best_round": best["round"],
            "epsilon": self.epsilon(),
            "sites": self.sites,
            "bytes_per_update": state_bytes(state),
            "wall_seconds": round(time.time() - self.started + self.elapsed_before, 3),
            "settings": self.settings.as_dict(),
        } | (extra or {})
        tmp = self.out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        tmp.replace(self.out / "summary.json")
        return summary


# Parameters whose shape or meaning is tied to one catalogue: never transferred.
CATALOGUE_SPECIFIC = ("scorer.bias",)


def warm_start(settings: Settings) -> dict[str, np.ndarray]:
    """Pre-train the transferable parameters (LoRA, fusion, scale) without DP on a PUBLIC
    dataset, before the private rounds.

    A text model has no item ids, so what it learns on one catalogue transfers to
    another; the catalogue-specific item bias stays behind. The public set must not be
    the run's own data: that would spend the sites' users without accounting.
    """
    from dataclasses import replace

    from .config import ConfigError
    from .data import DataSpec
    from .examples import training_rows
    from .model import Recommender
    from .privacy import PrivacySettings
    from .training import train_local

    name = settings["warm-start"]
    if name == settings["dataset"] and not settings["data-path"]:
        raise ConfigError(f"warm-start: {name!r} is the run's own dataset; pick another public dataset")
    data, split = dataset(DataSpec(dataset=name))
    torch.manual_seed(settings["seed"])
    model = Recommender.build(settings.model, list(data.catalogue.texts))
    m = settings.model
    rows = training_rows(data.catalogue, split, np.arange(len(data.user_ids)), model.tokenizer,
                         m.max_tokens, m.max_history, settings.train.targets_per_user)
    train = replace(settings.train, local_steps=settings["warm-start-steps"])
    public = PrivacySettings(epsilon=math.inf, expected_batch=settings.privacy.expected_batch)
    state, _ = train_local(model.to(resolve_device(train.device)), None, with_lower_states(model, rows), train, public)
    return {k: v for k, v in state.items() if k not in CATALOGUE_SPECIFIC}


def set_server_threads() -> None:
    """The server evaluates while sites wait: let it use the machine's cores."""
    import os

    torch.set_num_threads(max(1, os.cpu_count() or 1))
