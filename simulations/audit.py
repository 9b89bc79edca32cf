"""``fedenc audit``: an empirical lower bound on ε from canary users, beside the accountant's ε.

One-run auditing (Steinke, Nasr & Jagielski, NeurIPS 2023) through the real federation:

1. ``count`` canary USERS (the privacy unit), each a short random history, a secret target
   item and two filler items; targets are distinct and the least trained-on items of the
   catalogue. Each canary is included independently with probability ½, all at one site.
2. The run's dataset is written to ``OUT/data`` as an interactions CSV with a ``site``
   column (the config's own partition of the real users; included canaries at site 0) and
   an items CSV with each item's rendered text, so the audited run is the configured one
   with the canaries added: ``partition = natural`` over that column.
3. Two runs through :func:`simulations.simulate.simulate` (the ServerApp/ClientApp path of
   ``fedenc simulate``): ``OUT/dp`` as configured and ``OUT/control`` with ``audit-control``
   (clipping and Poisson sampling kept, no noise in DP-SGD or in the prior counts). Central
   evaluation leaves the canaries out (``eval-exclude-prefix``), federated evaluation is off,
   and each run keeps its own ledgers under its folder.
4. Each canary's score: log p(target | history) under the final global model minus the same
   under the untrained model without prior, on the row its site trains on
   (:func:`common.examples.training_rows`: the target is its most recent training item).
5. Scores -> ε lower bound at 95 % (:mod:`common.audit_bound`), AUROC, TPR at 1 % FPR.

Example (two federated runs, minutes)::

    result = audit({"epsilon": 8.0}, "runs/audit")
    assert result["epsilon_lower_bound"] <= result["epsilon_claimed"]
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.audit_bound import auroc, epsilon_lower_bound, tpr_at_fpr
from common.config import ConfigError, Settings
from common.data import Catalogue, DataError, Interactions, Split

CANARY_PREFIX = "canary-"
CANARY_SITE = 0
DEFAULT_CANARIES = 200
CONFIDENCE = 0.95
MIN_CONTROL_EPSILON = 1.0  # below this the attack has no power worth reporting
RUNS = ("dp", "control")
OUTPUTS = ("data", *RUNS, "audit.json", "audit.png", "canaries.json")


@dataclass(frozen=True, eq=False)
class Canaries:
    """Canary users: sequences of catalogue indices (history, secret target, two fillers)."""

    ids: tuple[str, ...]
    sequences: tuple[np.ndarray, ...]
    targets: np.ndarray
    included: np.ndarray  # bool, drawn once, shared by the DP run and the control

    def __len__(self) -> int:
        return len(self.ids)

    def split(self, num_items: int) -> Split:
        """Leave-one-out as the sites apply it: the fillers are validation and test, so the
        secret target is the last training item."""
        return Split(tuple(s[:-2] for s in self.sequences), np.array([s[-2] for s in self.sequences]),
                     np.array([s[-1] for s in self.sequences]), num_items)


def make_canaries(split: Split, count: int, history: int, rng: np.random.Generator) -> Canaries:
    """``count`` canaries with ``history`` random history items each; targets are the least
    trained-on items (ties in random order), never in any canary's history or fillers.

    >>> split = Split((np.array([0, 1, 2]),) * 4, np.full(4, 3), np.full(4, 4), num_items=12)
    >>> canaries = make_canaries(split, 5, 2, np.random.default_rng(0))
    >>> len(canaries), bool(np.isin(canaries.targets, [0, 1, 2]).any())  # items users train on are no secrets
    (5, False)
    """
    n = split.num_items
    if count < 2 or count + history + 2 > n:
        raise ConfigError(f"--canaries: need 2 to {n - history - 2} canaries for a catalogue of {n} items, got {count}")
    shuffled = rng.permutation(n)
    targets = shuffled[np.argsort(split.popularity()[shuffled], kind="stable")][:count]
    rest = np.setdiff1d(np.arange(n), targets)
    sequences = []
    for target in targets:
        picks = rng.choice(rest, history + 2, replace=False)
        sequences.append(np.concatenate([picks[:history], [target], picks[history:]]).astype(np.int64))
    ids = tuple(f"{CANARY_PREFIX}{i:05d}" for i in range(count))
    return Canaries(ids, tuple(sequences), targets.astype(np.int64), rng.random(count) < 0.5)


def write_dataset(data: Interactions, sites: list[np.ndarray], canaries: Canaries, directory: Path) -> tuple[Path, Path]:
    """``interactions.csv`` (real users at their sites, included canaries at site 0) and
    ``items.csv`` (``item_id,text``) in ``directory``; timestamps are positions, so every
    sequence reads back in the order it has here."""
    directory.mkdir(parents=True, exist_ok=True)
    site_of = np.empty(len(data.user_ids), dtype=np.int64)
    for site, members in enumerate(sites):
        site_of[members] = site
    users = list(data.user_ids) + [canaries.ids[i] for i in np.flatnonzero(canaries.included)]
    sequences = list(data.sequences) + [canaries.sequences[i] for i in np.flatnonzero(canaries.included)]
    user_sites = np.r_[site_of, np.full(int(canaries.included.sum()), CANARY_SITE)]
    lengths = np.array([len(s) for s in sequences])
    item_ids = np.asarray(data.catalogue.item_ids, dtype=object)
    frame = pd.DataFrame({
        "user_id": np.repeat(np.asarray(users, dtype=object), lengths),
        "item_id": item_ids[np.concatenate(sequences)],
        "timestamp": np.concatenate([np.arange(n) for n in lengths]),
        "site": np.repeat(user_sites, lengths),
    })
    interactions, items = directory / "interactions.csv", directory / "items.csv"
    frame.to_csv(interactions, index=False)
    pd.DataFrame({"item_id": item_ids, "text": data.catalogue.texts}).to_csv(items, index=False)
    return interactions, items


def run_config(config: dict, interactions: Path, items: Path, out: Path, control: bool) -> dict:
    """The configured run on the audit's dataset, its own output and ledgers, canaries out of
    every evaluation."""
    return dict(config) | {
        "dataset": "csv", "data-path": str(interactions), "items-path": str(items), "text-columns": "text",
        "item-template": "", "rating-threshold": -1.0, "partition": "natural", "partition-column": "site",
        "eval-exclude-prefix": CANARY_PREFIX, "fraction-evaluate": 0.0,
        "out-dir": str(out), "ledger-dir": str(out / "ledgers"), "audit-control": control,
    }


def canary_scores(settings: Settings, catalogue: Catalogue, canaries: Canaries, run: Path) -> np.ndarray:
    """log p(target | history): the run's final global model minus the untrained model
    without prior, on each canary's training row."""
    import torch

    from common.adapter import load_adapter
    from common.examples import training_rows
    from common.model import Recommender
    from common.training import as_batch, resolve_device, with_lower_states

    torch.manual_seed(settings.train.seed)  # the initial model every run starts from
    model = Recommender.build(settings.model, list(catalogue.texts)).to(resolve_device(settings.train.device))
    m = settings.model
    rows = training_rows(catalogue, canaries.split(len(catalogue)), range(len(canaries)), model.tokenizer,
                         m.max_tokens, m.max_history, settings.train.targets_per_user)
    rows = with_lower_states(model, rows)  # frozen layers: the same before and after training
    targets = torch.as_tensor(canaries.targets)[:, None]

    @torch.no_grad()
    def target_logp() -> np.ndarray:
        model.eval()
        out = []
        for start in range(0, len(rows), 256):
            batch = as_batch(rows[start : start + 256], model.bank.device)
            logp = torch.log_softmax(model.score_all(batch), dim=-1)
            out.append(logp.gather(1, targets[start : start + 256].to(logp.device))[:, 0].cpu())
        return torch.cat(out).numpy().astype(np.float64)

    before = target_logp()
    load_adapter(model, run / "adapter")
    return target_logp() - before


def summarise(scores: np.ndarray, included: np.ndarray, delta: float) -> dict:
    bound = epsilon_lower_bound(scores, included, delta, CONFIDENCE)
    return {"epsilon_lower_bound": bound["epsilon"], "k": bound["k"], "guesses": bound["guesses"],
            "correct": bound["correct"], "auroc": auroc(scores, included), "tpr_at_1pct_fpr": tpr_at_fpr(scores, included)}


def verdict(dp: float, control: float, claimed: float) -> str:
    """``violation`` (the claim is wrong), ``no power`` (the control shows the attack cannot
    see a leak even without noise), or ``consistent``."""
    if dp > claimed + 1e-9:
        return "violation"
    if control < MIN_CONTROL_EPSILON or control <= dp:
        return "no power"
    return "consistent"


def prepare_out(out: Path, overwrite: bool) -> None:
    if any((out / name).exists() for name in OUTPUTS):
        if not overwrite:
            raise ConfigError(f"{out} already holds an audit; pass --overwrite to replace it")
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def audit(
    config: dict,
    out: str | Path,
    count: int = DEFAULT_CANARIES,
    overwrite: bool = False,
    on_progress: Callable[[str, dict], None] | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the audit into ``out``; returns what ``audit.json`` holds."""
    from common.partition import partition_users
    from common.site import dataset
    from simulations.simulate import simulate

    out = Path(out).resolve()
    settings = Settings.from_config(config)  # bad keys fail here, before anything is written
    if not settings.private:
        raise ConfigError("epsilon: an audit needs a DP run (a finite epsilon) to audit")
    if count < 2:
        raise ConfigError(f"--canaries: need at least 2 canaries, got {count}")
    prepare_out(out, overwrite)
    try:
        data, split = dataset(settings.data)
        sites = partition_users(data, settings.num_sites, settings.split.partition, settings.split.partition_column,
                                settings.split.dirichlet_alpha, settings.run.seed)
    except DataError as err:
        raise ConfigError(str(err)) from None
    canaries = make_canaries(split, count, max(2, settings.data.k_core - 3), np.random.default_rng(settings.run.seed))
    interactions, items = write_dataset(data, sites, canaries, out / "data")
    log(f"{len(canaries)} canaries, {int(canaries.included.sum())} included at site {CANARY_SITE}; data in {out / 'data'}")

    runs = {}
    for name in RUNS:
        cfg = run_config(config, interactions, items, out / name, control=name == "control")
        log(f"{name}: {'no noise (clipping and sampling kept)' if name == 'control' else f'ε = {settings.privacy.epsilon:g}'}")
        summary = simulate(cfg, out / name, overwrite=True,
                           on_progress=(lambda p, n=name: on_progress(n, p)) if on_progress else None)
        run_settings = Settings.from_config(cfg)
        audit_data, _ = dataset(run_settings.data)
        scores = canary_scores(run_settings, audit_data.catalogue, canaries, out / name)
        runs[name] = {"summary": summary, "scores": scores, "settings": run_settings, "data": audit_data}

    site = _canary_site(runs["dp"]["settings"], runs["dp"]["data"])
    report = runs["dp"]["summary"]["sites"].get(str(site), {})
    if "delta" not in report:
        raise ConfigError(f"site {site} (the canaries' site) reported no DP training; lower expected-batch or add users")
    delta = float(report["delta"])
    dp = summarise(runs["dp"]["scores"], canaries.included, delta)
    control = summarise(runs["control"]["scores"], canaries.included, delta)
    result = {
        "epsilon_claimed": float(report["epsilon"]),
        "epsilon_budget": settings.privacy.epsilon,
        "delta": delta,
        "epsilon_lower_bound": dp["epsilon_lower_bound"],
        "control_epsilon_lower_bound": control["epsilon_lower_bound"],
        "canaries": len(canaries),
        "canaries_included": int(canaries.included.sum()),
        "canary_site": site,
        "confidence": CONFIDENCE,
        "auroc": dp["auroc"],
        "tpr_at_1pct_fpr": dp["tpr_at_1pct_fpr"],
        "control_auroc": control["auroc"],
        "control_tpr_at_1pct_fpr": control["tpr_at_1pct_fpr"],
        "dp": dp,
        "control": control,
        "verdict": verdict(dp["epsilon_lower_bound"], control["epsilon_lower_bound"], float(report["epsilon"])),
        "score": "log p(target | history): final global model minus the untrained model without prior",
        "runs": {name: str(out / name) for name in RUNS},
        "wall_seconds": {name: runs[name]["summary"]["wall_seconds"] for name in RUNS},
        "final_ndcg@10": {name: runs[name]["summary"]["final"]["ndcg@10"] for name in RUNS},
    }
    (out / "canaries.json").write_text(json.dumps({
        "ids": list(canaries.ids),
        "targets": [runs["dp"]["data"].catalogue.item_ids[t] for t in canaries.targets],
        "included": canaries.included.tolist(),
        "scores": {name: runs[name]["scores"].tolist() for name in RUNS},
    }))
    plot(runs["dp"]["scores"], runs["control"]["scores"], canaries.included, result, out / "audit.png")
    (out / "audit.json").write_text(json.dumps(result, indent=1))
    return result


def _canary_site(settings: Settings, data: Interactions) -> int:
    """The partition (the simulated site number) holding the included canaries."""
    from common.partition import partition_users

    sites = partition_users(data, settings.num_sites, "natural", "site")
    holds = [i for i, members in enumerate(sites) if any(data.user_ids[u].startswith(CANARY_PREFIX) for u in members)]
    if len(holds) != 1:
        raise RuntimeError(f"canaries found at {len(holds)} sites, expected exactly one")
    return holds[0]


def plot(dp: np.ndarray, control: np.ndarray, included: np.ndarray, result: dict, path: Path) -> None:
    """In/out score histograms of the DP run and the control, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = ((dp, f"DP run, ε = {result['epsilon_claimed']:.2f}: bound {result['epsilon_lower_bound']:.2f}"),
              (control, f"control (no noise): bound {result['control_epsilon_lower_bound']:.2f}"))
    for ax, (scores, title) in zip(axes, panels, strict=True):
        bins = np.histogram_bin_edges(scores, bins=30)
        ax.hist(scores[~included], bins=bins, alpha=0.6, label=f"out ({int((~included).sum())})")
        ax.hist(scores[included], bins=bins, alpha=0.6, label=f"in ({int(included.sum())})")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("score: Δ log p(target | history)")
        ax.legend()
    axes[0].set_ylabel("canaries")
    fig.suptitle(f"one-run audit, {result['canaries']} canaries, {CONFIDENCE:.0%} confidence, δ = {result['delta']:.1e}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_bound(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3f}"
