"""``fedenc ablation``: what each part of the model adds, at each ε, in one table.

Rows, each at every ε of the command (one column group per ε):

- ``prior``: the run's DP popularity prior alone (the full run's ``prior.npy``), ranked by
  the popularity baseline's rule (:class:`common.evaluation.HeldOutUsers`, ties to the
  lower item index);
- ``zeroshot``: the untrained text tower, no prior (``fedenc baseline zeroshot``; no
  training, so one cell serves every ε);
- ``round0``: prior + text tower, untrained: round 0 of the full run's ``metrics.jsonl``;
- ``lora-only``, ``fusion-only``, ``bias-only``: federated runs training that part alone
  (the other two of ``train-lora``, ``train-fusion``, ``train-bias`` off; the prior's weight
  trains with the item bias);
- ``federated``: all parts (the sweep's federated cell, same folder name, so an ablation
  into a sweep's folder reuses its finished federated cells).

Utility is the TEST NDCG@10 and HR@10 of the round with the best VALIDATION NDCG@10, and
its ratio to the non-private most-popular baseline (``popularity``). Cells are the
sweep's (:func:`simulations.sweep.run_cells`): a finished cell is never run again, so an
interrupted ablation continues with the same command.

Example::

    result = ablation({"dataset": "movielens", "data-path": "data/ml-100k"}, "runs/ablation", [8.0, math.inf])
    result["markdown"]  # the table also written to runs/ablation/ablation.md
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from common.config import ConfigError, Settings
from common.files import atomic_write_text
from simulations.sweep import Cell, eps_label, per_cell_config, run_cell, run_cells, write_csv

# (key, row label, the parts that train; None: not a federated run)
ARMS = (
    ("prior", "prior alone (the run's popularity prior)", None),
    ("zeroshot", "text tower alone (zero-shot, no prior)", None),
    ("round0", "prior + text tower (round 0, untrained)", None),
    ("lora-only", "+ LoRA only", ("train-lora",)),
    ("fusion-only", "+ fusion only (gate, recency attention)", ("train-fusion",)),
    ("bias-only", "+ item bias only (and prior weight)", ("train-bias",)),
    ("federated", "all trained parts (default run)", ("train-lora", "train-fusion", "train-bias")),
)
PARTS = ("train-lora", "train-fusion", "train-bias")
FEDERATED = {key: {part: part in trains for part in PARTS} for key, _, trains in ARMS if trains}
COLUMNS = ("arm", "part", "epsilon", "seeds", "ndcg@10", "ndcg@10_std", "hr@10", "hr@10_std", "x_popularity",
           "over_round0", "rounds")


def plan(epsilons: list[float], seeds: int) -> list[Cell]:
    """The cells in running order: the two untrained baselines, then per ε (finite ones
    first) and seed the full run (whose prior the ``prior`` cell ranks), then one arm per part.

    >>> [cell.name for cell in plan([8.0], 1)][1:4]
    ['zeroshot-epsinf-seed0', 'federated-eps8-seed0', 'prior-eps8-seed0']
    """
    cells = [Cell("popularity", math.inf, 0), Cell("zeroshot", math.inf, 0)]
    for e in epsilons:
        for s in range(seeds):
            cells += [Cell(arm, e, s) for arm in ("federated", "prior", "lora-only", "fusion-only", "bias-only")]
    return cells


def prior_alone(config: dict, prior_path: Path, out: Path) -> dict:
    """Rank every evaluated user's held-out item by the saved DP prior alone, with the
    popularity baseline's evaluation (exclusions, ties to the lower item index); the run
    files are a baseline's (``metrics.jsonl`` round 0, ``summary.json``).

    Example::

        prior_alone(config | {"epsilon": 8.0}, Path("runs/ab/federated-eps8-seed0/prior.npy"), Path("runs/ab/prior-eps8-seed0"))
    """
    from common.evaluation import HeldOutUsers
    from common.training import rank_of_targets, resolve_device
    from server.recorder import RunRecorder
    from simulations.baselines import PopularityScorer

    settings = Settings.from_config(config)
    prior = np.load(prior_path)
    held = HeldOutUsers(settings)
    if len(prior) != len(held.data.catalogue):
        raise ConfigError(f"{prior_path}: {len(prior)} items, the data has {len(held.data.catalogue)}")
    # integer levels keep the prior's order, and equal values tie exactly as equal counts do
    levels = np.unique(prior, return_inverse=True)[1].astype(np.float64)
    device = resolve_device(settings.train.device)
    scorer = PopularityScorer(levels).to(device)
    recorder = RunRecorder.open(out, settings)
    ranked = {which: rank_of_targets(scorer, rows, device) for which, rows in held.targets.items()}
    recorder.round_done(0, held.metrics(ranked), {}, None, {})
    return recorder.finish(None, {}, {"method": "prior", "prior": str(prior_path)})


def run_arm(cell: Cell, config: dict, out: Path, log: Callable[[str], None]) -> dict:
    """Run one ablation cell into ``out`` (a sibling of the full run's cell)."""
    cfg = config | {"epsilon": cell.epsilon, "seed": int(config.get("seed", 0)) + cell.seed}
    if cell.method == "prior":
        full = out.parent / Cell("federated", cell.epsilon, cell.seed).name
        return prior_alone(cfg, full / "prior.npy", out)
    if cell.method in FEDERATED:
        return run_cell(Cell("federated", cell.epsilon, cell.seed), config | FEDERATED[cell.method], out, log)
    return run_cell(cell, config, out, log)  # popularity, zeroshot


def _round0(folder: Path) -> dict:
    return next(row for row in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if row["round"] == 0)


def _results(cell: Cell, out: Path) -> dict | None:
    """Test NDCG@10 and HR@10 at the best-validation round (round 0 for ``round0``), or None;
    a trained arm also gives its gain over its own round 0 (each run draws its own noisy prior)."""
    if cell.method == "round0":
        full = out / Cell("federated", cell.epsilon, cell.seed).name
        if not (full / "summary.json").exists():
            return None
        line = _round0(full)
        return {"ndcg@10": line["test/ndcg@10"], "hr@10": line["test/hr@10"], "round": 0}
    path = out / cell.name / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    best = summary["best_validation"]
    found = {"ndcg@10": best["test/ndcg@10"], "hr@10": best["test/hr@10"], "round": summary["best_round"]}
    if cell.method in FEDERATED:
        found["over_round0"] = best["test/ndcg@10"] - _round0(out / cell.name)["test/ndcg@10"]
    return found


def table(epsilons: list[float], seeds: int, out: Path) -> list[dict]:
    """One row per (arm, ε) with a finished cell: mean and std over seeds, and the ratio of
    the mean NDCG@10 to most-popular's (NaN until that cell is finished).

    Example::

        [(r["arm"], r["epsilon"], r["x_popularity"]) for r in table([8.0, math.inf], 1, Path("runs/ab"))]
    """
    popularity = _results(Cell("popularity", math.inf, 0), out)
    rows = []
    for arm, label, _ in ARMS:
        for e in epsilons:
            if arm == "zeroshot":  # untrained: the same cell at every ε
                found = [_results(Cell(arm, math.inf, 0), out)]
            else:
                found = [_results(Cell(arm, e, s), out) for s in range(seeds)]
            found = [r for r in found if r is not None]
            if not found:
                continue
            row = {"arm": arm, "part": label, "epsilon": eps_label(e), "seeds": len(found),
                   "rounds": " ".join(str(r["round"]) for r in found)}
            for k in ("ndcg@10", "hr@10"):
                values = np.array([r[k] for r in found], dtype=float)
                row[k], row[f"{k}_std"] = float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row["x_popularity"] = row["ndcg@10"] / popularity["ndcg@10"] if popularity else math.nan
            if arm in FEDERATED:
                row["over_round0"] = float(np.mean([r["over_round0"] for r in found]))
            rows.append(row)
    return rows


def markdown(rows: list[dict], epsilons: list[float], popularity: dict | None) -> str:
    """The table with one column group (NDCG@10, HR@10, × popularity, gain over the run's own
    round 0) per ε; "–" where a cell is not finished or a row has no such number.

    Example::

        print(markdown(table([8.0], 1, out), [8.0], _results(Cell("popularity", math.inf, 0), out)))
    """
    by_key = {(r["arm"], r["epsilon"]): r for r in rows}
    labels = [eps_label(e) for e in epsilons]
    head = ["part"]
    for label in labels:
        name = "∞" if label == "inf" else label
        head += [f"ε={name} NDCG@10", "HR@10", "× pop.", "Δ own round 0"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, part, _ in ARMS:
        cells = [part]
        for label in labels:
            r = by_key.get((arm, label))
            if r is None:
                cells += ["–"] * 4
                continue
            std = f" ± {r['ndcg@10_std']:.4f}" if r["seeds"] > 1 else ""
            gain = f"{r['over_round0']:+.4f}" if "over_round0" in r else "–"
            cells += [f"{r['ndcg@10']:.4f}{std}", f"{r['hr@10']:.4f}", f"{r['x_popularity']:.2f}", gain]
        lines.append("| " + " | ".join(cells) + " |")
    if popularity:
        ref = [f"{popularity['ndcg@10']:.4f}", f"{popularity['hr@10']:.4f}", "1.00", "–"]
        lines.append("| most popular (exact counts, non-private) | " + " | ".join(ref * len(labels)) + " |")
    return "\n".join(lines) + "\n"


def ablation(config: dict, out: str | Path, epsilons: list[float], seeds: int = 1,
             log: Callable[[str], None] = print, report_only: bool = False) -> dict:
    """Run every unfinished cell, then write ``ablation.csv`` and ``ablation.md`` in ``out``.

    Returns ``{"ran", "skipped", "missing", "rows", "markdown"}`` (``report_only``: nothing
    runs, the table covers the cells finished so far).

    Example::

        ablation({"dataset": "movielens", "data-path": "data/ml-100k"}, "runs/ab", [8.0], report_only=True)["rows"]
    """
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    config = per_cell_config(config, log)
    settings = Settings.from_config(config)
    if settings.model.kind != "fused":
        raise ConfigError("ablation: its arms are the fused model's parts (LoRA, fusion, item bias); "
                          f"model-kind is {settings.model.kind}")
    if not settings.prior.share > 0:
        raise ConfigError("ablation: the prior arms need the DP popularity prior; popularity-prior is 0")
    for trains in FEDERATED.values():  # every arm's settings fail before anything runs
        Settings.from_config(config | trains)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ran, skipped, missing = run_cells(plan(epsilons, seeds), lambda cell, folder: run_arm(cell, config, folder, log),
                                      out, log, report_only)
    rows = table(epsilons, seeds, out)
    write_csv(rows, out / "ablation.csv", COLUMNS)
    text = markdown(rows, epsilons, _results(Cell("popularity", math.inf, 0), out))
    atomic_write_text(out / "ablation.md", text)
    log(f"ran {len(ran)} cell(s), skipped {len(skipped)} finished, left out {len(missing)} unfinished; "
        f"table {out / 'ablation.csv'}, {out / 'ablation.md'}")
    return {"ran": ran, "skipped": skipped, "missing": missing, "rows": rows, "markdown": text}
