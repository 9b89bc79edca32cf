"""``fedenc sweep``: federated runs at several ε (and seeds) beside the baselines, one
table (``sweep.csv``) and one plot (``privacy_utility.png``).

Every cell (method, ε, seed) runs into ``OUT/<method>-eps<ε>-seed<s>/``; a cell whose
``summary.json`` exists is finished and never run again, so an interrupted sweep is
continued by running the same command. Federated cells go through
:func:`simulations.simulate.simulate` (the real Flower path); an interrupted federated
cell resumes from its checkpoint. Reported utility: the TEST metrics of the round with
the best VALIDATION NDCG@10 (model selection on validation only), mean and std over seeds.

Which baselines run at which ε: ``popularity`` and ``zeroshot`` do not train (one cell);
``centralized`` (the non-private pooled model) and the library references ``bpr``, ``als``
and ``sasrec`` train without privacy (one cell per seed, ε = inf); ``local`` trains under
each ε of the sweep (a curve: federation must beat it at every ε).
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ConfigError, Settings
from common.files import atomic_write

METRICS = ("hr@10", "ndcg@10", "mrr@10", "recall@10", "auc", "cold/ndcg@10", "cold/hr@10")
COLUMNS = ("method", "epsilon", "delta", "noise_multiplier", "rounds", "seeds",
           "hr@10", "hr@10_std", "ndcg@10", "ndcg@10_std", "mrr@10", "mrr@10_std", "recall@10", "auc",
           "cold/ndcg@10", "cold/hr@10", "cold/users", "wall_seconds")
NO_TRAINING = ("popularity", "zeroshot")


@dataclass(frozen=True)
class Cell:
    method: str  # federated | popularity | zeroshot | centralized | local
    epsilon: float
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}-eps{eps_label(self.epsilon)}-seed{self.seed}"


def eps_label(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def parse_epsilons(text: str) -> list[float]:
    """``"1,2,8,inf"`` -> [1.0, 2.0, 8.0, inf] (sorted, finite ones > 0)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ConfigError(f"--epsilons: {part!r} is not a number or inf") from None
        if not value > 0:
            raise ConfigError(f"--epsilons: ε must be > 0 (inf for no DP), got {part}")
        out.append(value)
    if not out:
        raise ConfigError("--epsilons: give at least one ε, e.g. 1,2,4,8,inf")
    return sorted(set(out))


def plan(epsilons: list[float], seeds: int, baselines: list[str]) -> list[Cell]:
    from simulations.library_baselines import LIBRARY_BASELINES, require

    cells = [Cell(b, math.inf, 0) for b in baselines if b in NO_TRAINING]  # cheap ones first
    cells += [Cell("federated", e, s) for e in epsilons for s in range(seeds)]
    for b in baselines:
        if b in NO_TRAINING:
            continue
        elif b in ("centralized", *LIBRARY_BASELINES):
            if b != "centralized":
                require(b)  # a missing optional extra fails before the first cell runs
            cells += [Cell(b, math.inf, s) for s in range(seeds)]
        elif b == "local":
            cells += [Cell(b, e, s) for e in epsilons for s in range(seeds)]
        else:
            from simulations.baselines import BASELINES

            raise ConfigError(f"--baselines: unknown baseline {b!r}; choose from {', '.join(BASELINES)}")
    return cells


def run_cell(cell: Cell, config: dict, out: Path, log: Callable[[str], None]) -> dict:
    """Run one cell into ``out`` (resuming a federated cell that has a checkpoint); progress
    lines name the cell by its folder (the ablation runs its arms as federated cells)."""
    from simulations.library_baselines import progress_unit

    cfg = dict(config) | {"epsilon": cell.epsilon, "seed": int(config.get("seed", 0)) + cell.seed}
    unit = progress_unit(cell.method)

    def show(p: dict) -> None:
        log(f"  {out.name} {unit} {p['round']} NDCG@10 {p['ndcg@10']:.4f} ε {p['epsilon']:.2f}")

    if cell.method == "federated":
        from server.recorder import usable_checkpoint
        from simulations.outdir import holds_run
        from simulations.simulate import simulate

        resume = usable_checkpoint(out) is not None  # else a cell cut short before round 1 starts again
        return simulate(cfg, out, resume=resume, overwrite=not resume and holds_run(out), on_progress=show)
    from common.progress import following
    from simulations.baselines import run_baseline

    with following(out / "metrics.jsonl", show):  # a baseline trains in this process: its rounds as they come
        return run_baseline(cell.method, cfg, out)


def _cell_row(summary: dict) -> dict:
    best = summary["best_validation"]
    sites = [s for s in summary.get("sites", {}).values() if isinstance(s, dict)]
    # unprefixed metrics are the test split's; recall and AUC exist only prefixed (test/…)
    return {k: best.get(k, best.get(f"test/{k}", math.nan)) for k in METRICS} | {
        "cold/users": best.get("cold/users", math.nan),
        "delta": max((s.get("delta", 0.0) for s in sites), default=0.0),
        "noise_multiplier": max((s.get("noise_multiplier", 0.0) for s in sites), default=0.0),
        "rounds": summary["best_round"] if summary.get("method") in NO_TRAINING else summary["settings"]["num-server-rounds"],
        "wall_seconds": summary.get("wall_seconds", math.nan),
    }


def table(cells: list[Cell], out: Path) -> list[dict]:
    """One row per (method, ε): mean (and std) over the seeds' finished cells."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for cell in cells:
        path = out / cell.name / "summary.json"
        if path.exists():
            groups.setdefault((cell.method, cell.epsilon), []).append(_cell_row(json.loads(path.read_text())))
    rows = []
    for (method, eps), runs in groups.items():
        row = {"method": method, "epsilon": eps_label(eps), "seeds": len(runs)}
        for k in ("delta", "noise_multiplier", "rounds", "cold/users"):
            row[k] = runs[0][k]
        for k in METRICS:
            vals = np.array([r[k] for r in runs], dtype=float)
            row[k] = float(vals.mean())
            if k in ("hr@10", "ndcg@10", "mrr@10"):
                row[f"{k}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        row["wall_seconds"] = float(np.sum([r["wall_seconds"] for r in runs]))
        rows.append(row)
    order = {"federated": 0, "local": 1, "centralized": 2, "sasrec": 3, "als": 4, "bpr": 5, "popularity": 6,
             "zeroshot": 7}
    rows.sort(key=lambda r: (order.get(r["method"], 9), float(r["epsilon"])))
    return rows


def write_csv(rows: list[dict], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    """``rows`` as CSV with ``columns`` (floats to 6 significant digits), written atomically."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k in columns})

    atomic_write(path, write)


def y_limits(rows: list[dict], pad: float = 0.06) -> tuple[float, float]:
    """NDCG@10 range that shows every curve's error bars and every baseline line with room
    to spare: matplotlib leaves no margin above a horizontal line, so the best baseline would
    otherwise sit on the frame.

    >>> y_limits([{"ndcg@10": 0.02, "ndcg@10_std": 0.0}, {"ndcg@10": 0.08, "ndcg@10_std": 0.0}])
    (0.0164, 0.0836)
    """
    values = [r["ndcg@10"] + sign * r.get("ndcg@10_std", 0.0) for r in rows for sign in (-1, 1)]
    values = [v for v in values if math.isfinite(v)] or [0.0, 1.0]  # a cell without the metric draws nothing
    lo, hi = min(values), max(values)
    margin = pad * (hi - lo) or 0.01
    return round(lo - margin, 6), round(hi + margin, 6)


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    """NDCG@10 against ε (log axis, inf at a labelled right-most position), error bars over
    seeds, baselines that do not depend on ε as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({float(r["epsilon"]) for r in rows if r["epsilon"] != "inf"})
    inf_x = (max(finite) * 4) if finite else 1.0

    def x(e: str) -> float:
        return inf_x if e == "inf" else float(e)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = {"federated": ("federated (fedenc)", "o-", "C0"), "local": ("local-only (each site alone)", "s--", "C1")}
    for method, (label, style, color) in curves.items():
        pts = sorted((x(r["epsilon"]), r["ndcg@10"], r["ndcg@10_std"]) for r in rows if r["method"] == method)
        if pts:
            xs, ys, es = zip(*pts, strict=True)
            ax.errorbar(xs, ys, yerr=es, fmt=style, color=color, capsize=3, label=label)
    lines = {"centralized": ("centralised, non-private", "C2", "-"), "popularity": ("most popular", "C3", ":"),
             "zeroshot": ("zero-shot encoder", "C4", "-."), "sasrec": ("SASRec (Cornac), non-private", "C5", "--"),
             "als": ("ALS (implicit), non-private", "C6", "--"), "bpr": ("BPR (implicit), non-private", "C7", "--")}
    for method, (label, color, style) in lines.items():
        for r in rows:
            if r["method"] == method and r["epsilon"] == "inf":
                ax.axhline(r["ndcg@10"], color=color, linestyle=style, label=f"{label} ({r['ndcg@10']:.4f})")
    ax.set_ylim(*y_limits(rows))
    ax.set_xscale("log")
    ticks = finite + [inf_x]
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{t:g}" for t in finite] + ["∞ (no DP)"])
    ax.minorticks_off()
    ax.set_xlabel("privacy budget ε per site (log scale)")
    ax.set_ylabel("NDCG@10 (test, best-validation round)")
    ax.set_title(title or "Utility against privacy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def per_cell_config(config: dict, log: Callable[[str], None]) -> dict:
    """``config`` checked (bad keys fail before anything runs) and without the keys each cell
    sets itself (ε, output and ledger folders), with a note for each one dropped.

    >>> per_cell_config({"epsilon": 4.0, "num-sites": 3}, log=print)
    note: setting epsilon is set per cell; the given value is ignored
    {'num-sites': 3}
    """
    Settings.from_config(dict(config))
    for key in ("epsilon", "out-dir", "ledger-dir"):
        if key in config:
            log(f"note: setting {key} is set per cell; the given value is ignored")
            config = {k: v for k, v in config.items() if k != key}
    return config


def run_cells(cells: list[Cell], run: Callable[[Cell, Path], dict], out: Path, log: Callable[[str], None],
              report_only: bool = False) -> tuple[list[str], list[str], list[str]]:
    """``run(cell, out / cell.name)`` for each cell in order, unless its folder holds a
    ``summary.json`` (finished before: skipped) or ``report_only`` (missing: nothing runs).
    Returns the names (ran, skipped, missing).

    Example::

        ran, skipped, missing = run_cells(plan([8.0], 1, []), lambda c, d: run_cell(c, config, d, print), out, print)
    """
    ran, skipped, missing = [], [], []
    for i, cell in enumerate(cells, 1):
        cell_dir = out / cell.name
        if (cell_dir / "summary.json").exists():
            skipped.append(cell.name)
            log(f"[{i}/{len(cells)}] {cell.name}: done before, skipped")
            continue
        if report_only:
            missing.append(cell.name)
            log(f"[{i}/{len(cells)}] {cell.name}: not finished, left out of the table")
            continue
        t0 = time.time()
        log(f"[{i}/{len(cells)}] {cell.name}: running")
        summary = run(cell, cell_dir)
        best = summary["best_validation"]
        log(f"[{i}/{len(cells)}] {cell.name}: NDCG@10 {best['ndcg@10']:.4f} (round {summary['best_round']}), "
            f"{time.time() - t0:.0f}s")
        ran.append(cell.name)
    return ran, skipped, missing


def sweep(
    config: dict,
    out: str | Path,
    epsilons: list[float],
    seeds: int = 1,
    baselines: list[str] = ("popularity", "zeroshot", "centralized", "local"),
    log: Callable[[str], None] = print,
    report_only: bool = False,
) -> dict:
    """Run every unfinished cell, then write ``sweep.csv`` and ``privacy_utility.png``.

    ``report_only`` runs nothing: the table and plot cover the cells finished so far (a
    row's ``seeds`` says how many), e.g. to look at a sweep that is still running.
    Returns ``{"ran": [...], "skipped": [...], "missing": [...], "rows": [...]}``.
    """
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    config = per_cell_config(config, log)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cells = plan(epsilons, seeds, list(baselines))
    ran, skipped, missing = run_cells(cells, lambda cell, folder: run_cell(cell, config, folder, log), out, log,
                                      report_only)
    rows = table(cells, out)
    write_csv(rows, out / "sweep.csv")
    settings = Settings.from_config(dict(config))
    plot(rows, out / "privacy_utility.png",
         f"{settings.data.dataset}: {settings.num_sites} sites, {settings.rounds} rounds × {settings.train.local_steps} steps")
    (out / "sweep.json").write_text(json.dumps({"config": config, "epsilons": [eps_label(e) for e in epsilons],
                                                "seeds": seeds, "baselines": list(baselines)}, indent=1))
    log(f"ran {len(ran)} cell(s), skipped {len(skipped)} finished, left out {len(missing)} unfinished; "
        f"table {out / 'sweep.csv'}, plot {out / 'privacy_utility.png'}")
    return {"ran": ran, "skipped": skipped, "missing": missing, "rows": rows}
