"""A finished run, explained: ``MODEL_CARD.md`` (:mod:`simulations.card`) and ``report.png``
(utility per round beside the baselines, each site's ε), both from the files the run left on disk.

``fedenc report DIR`` rewrites both; ``fedenc simulate`` writes them when a run completes.

Example::

    written = write_report("runs/default")
    written["card"], written["plot"]  # runs/default/MODEL_CARD.md, runs/default/report.png
"""

from __future__ import annotations

from pathlib import Path

from common.files import atomic_write, atomic_write_json, atomic_write_text
from simulations.card import CARD, PLOT, ReportError, as_number, baselines, card_markdown, fmt, model_card, read_run, sites_of

__all__ = ["ReportError", "plot_report", "site_epsilons", "write_report"]


def _site_order(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


def site_epsilons(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """Per-site ε after each round, when the metrics lines carry a per-site mapping (a dict
    of ε by site, or of site records with an ``epsilon``); {} when they do not."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in rows:
        for key, value in line.items():
            if not isinstance(value, dict):
                continue
            for site, v in value.items():
                eps = as_number(v.get("epsilon")) if isinstance(v, dict) else (as_number(v) if "epsilon" in key else None)
                if eps is not None:
                    out.setdefault(str(site), []).append((line["round"], eps))
    return out


def plot_report(run: str | Path, path: str | Path | None = None) -> Path:
    """``report.png``: NDCG@10 per round and against ε spent (validation and test, with
    baselines), per-site ε over the rounds, and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(run)
    summary, rows = read_run(run)
    path = Path(path) if path else run / PLOT
    rounds = [r["round"] for r in rows]
    eps = [as_number(r.get("epsilon")) or 0.0 for r in rows]
    settings = summary.get("settings") or {}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    method, budget = summary.get("method"), as_number(settings.get("epsilon"))
    title = (f"{run.resolve().name}" + (f" ({method} baseline)" if method else "")
             + f": {settings.get('dataset', '?')}, {settings.get('num-sites', '?')} sites, "
             f"{len(rows) - 1} rounds, ε budget {fmt(budget) if budget else '∞'} per site")
    fig.suptitle(title, fontsize=13)
    base = baselines(run, summary)

    def ndcg(split):
        return [as_number(r.get(f"{split}/ndcg@10")) for r in rows]

    # The y range follows the run's own curves; a baseline far outside it would flatten
    # them, so it stays in the legend only.
    own = [y for y in ndcg("valid") + ndcg("test") if y is not None] or [0.0]
    margin = max(max(own) - min(own), 0.05 * max(own), 1e-3)
    low, high = min(own) - margin, max(own) + margin

    def baseline_lines(ax):
        for i, b in enumerate(base):
            y = b["ndcg@10"]
            if y is None:
                continue
            where = "" if low <= y <= high else (" – below the axis" if y < low else " – above the axis")
            ax.axhline(y, color=f"C{i + 3}", linestyle=":", linewidth=1.5, label=f"{b['method']} baseline, test ({y:.4f}){where}")
        ax.set_ylim(max(low, 0.0), high)

    ax = axes[0, 0]
    ax.plot(rounds, ndcg("valid"), "o-", color="C0", label="validation")
    ax.plot(rounds, ndcg("test"), "s--", color="C1", label="test")
    best = summary.get("best_round")
    if best in rounds:
        ax.axvline(best, color="grey", linestyle="--", linewidth=1, label=f"best validation (round {best})")
    baseline_lines(ax)
    ax.set_xticks(rounds)
    ax.set_xticklabels([f"{r}\nε {e:.2f}" for r, e in zip(rounds, eps, strict=True)] if len(rounds) <= 12 else rounds)
    ax.set_xlabel("round (and largest ε any site has spent after it)")
    ax.set_ylabel("NDCG@10 (central evaluation)")
    ax.set_title("NDCG@10 per round")
    ax.legend(fontsize=8, loc="best")

    ax = axes[0, 1]
    if max(eps) > 0:
        ax.plot(eps, ndcg("valid"), "o-", color="C0", label="validation")
        ax.plot(eps, ndcg("test"), "s--", color="C1", label="test")
        for r, e, y in zip(rounds, eps, ndcg("test"), strict=True):
            if y is not None:
                ax.annotate(f"r{r}", (e, y), textcoords="offset points", xytext=(4, 6), fontsize=8, color="C1")
        baseline_lines(ax)
        ax.set_xlabel("ε spent (largest over sites)")
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no ε spent: this run trained without DP", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("NDCG@10 (central evaluation)")
    ax.set_title("Utility against privacy spent")

    ax = axes[1, 0]
    per_site = site_epsilons(rows)
    many = len(per_site) > 10  # one legend entry per site stops being readable
    for i, (site, points) in enumerate(sorted(per_site.items(), key=lambda kv: _site_order(kv[0]))):
        xs, ys = zip(*points, strict=True)
        if many:
            ax.plot(xs, ys, "-", color="C0", alpha=0.3, label=f"each of {len(per_site)} sites" if i == 0 else None)
        else:  # markers shrink from site to site so that sites with equal ε stay visible
            ax.plot(xs, ys, "-", marker="osD^v<>ph*"[i], markersize=max(10 - 1.5 * i, 3), color=f"C{i}", label=f"site {site}")
    if not per_site:  # a run written before metrics.jsonl carried site_epsilon
        ax.plot(rounds, eps, "o-", color="black", label="largest ε over sites")
        for i, (site, s) in enumerate(sites_of(summary).items()):
            if as_number(s.get("epsilon")) is not None:
                ax.plot(rounds[-1], s["epsilon"], "D", color=f"C{i % 10}", alpha=0.8,
                        label=f"site {site} at the end ({s['epsilon']:.3f})")
        ax.text(0.02, 0.97, "this run's metrics.jsonl has no per-site ε per round;\nmarkers: each site's ε at the end",
                transform=ax.transAxes, va="top", fontsize=8, color="dimgrey")
    if budget:
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label=f"budget ε = {budget:g}")
        ax.set_ylim(0, max([budget] + eps) * 1.2)  # room for the note above the budget line
    ax.set_xticks(rounds if len(rounds) <= 20 else ax.get_xticks())
    ax.set_xlabel("round")
    ax.set_ylabel("ε spent")
    ax.set_title("Privacy spent per site")
    ax.legend(fontsize=8, loc="lower right", ncol=2 if len(per_site) > 6 else 1)

    ax = axes[1, 1]
    train = [(r["round"], as_number(r.get("train_loss"))) for r in rows]
    train = [(x, y) for x, y in train if y is not None]
    if train:
        ax.plot(*zip(*train, strict=True), "o-", color="C2", label="train loss (sites' mean)")
    valid = [(r["round"], as_number(r.get("valid/loss"))) for r in rows]
    valid = [(x, y) for x, y in valid if y is not None]
    if valid:
        ax.plot(*zip(*valid, strict=True), "s--", color="C0", label="validation loss (central)")
    ax.set_xticks(rounds if len(rounds) <= 20 else ax.get_xticks())
    ax.set_xlabel("round")
    ax.set_ylabel("cross-entropy of the next item")
    ax.set_title("Loss" if train else "Loss (no train loss: sites do not release it under DP)")
    if train or valid:
        ax.legend(fontsize=8, loc="best")

    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_report(run: str | Path) -> dict[str, Path]:
    """Write ``MODEL_CARD.md`` and ``report.png`` into ``run`` and the card's facts under
    ``model_card`` in ``summary.json`` (each file replaced atomically)."""
    run = Path(run)
    card = model_card(run)
    summary, _ = read_run(run)
    atomic_write_text(run / CARD, card_markdown(card))
    atomic_write_json(run / "summary.json", summary | {"model_card": card}, indent=1)
    return {"card": run / CARD, "plot": plot_report(run), "summary": run / "summary.json"}
