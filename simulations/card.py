"""A finished run's model card: ``MODEL_CARD.md`` and the same facts under ``model_card``
in ``summary.json``, from the files the run left on disk (``simulations.report`` writes it
beside ``report.png``).

``fedenc report DIR`` rewrites both; ``fedenc simulate`` writes them when a run completes.
Everything is read defensively: what sites report changes between versions, and a
baseline's folder has no sites or no model.

Example::

    written = write_report("runs/default")
    written["card"], written["plot"]  # runs/default/MODEL_CARD.md, runs/default/report.png
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

CARD, PLOT = "MODEL_CARD.md", "report.png"
BASELINES = ("popularity", "zeroshot", "centralized", "local")
# Settings that fix who is evaluated and how: runs that differ in one of them are not comparable.
EVALUATION_KEYS = ("dataset", "data-path", "items-path", "text-columns", "item-template", "rating-threshold",
                   "k-core", "eval-users", "seed")
RESULT_METRICS = ("ndcg@10", "hr@10", "recall@10", "mrr@10", "ndcg@20", "auc")
README_SECTION = 'the fedenc README, section "What leaves a site" (README.md#what-leaves-a-site)'


class ReportError(ValueError):
    """The folder holds no finished run to report on."""


def as_number(value) -> float | None:
    """A finite float, or None (JSON null, NaN, a string, a missing value)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_run(run: str | Path) -> tuple[dict, list[dict]]:
    """``summary.json`` and the lines of ``metrics.jsonl``; :class:`ReportError` if either is
    missing or unreadable."""
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"{run}: no such run folder")
    try:
        summary = json.loads((run / "summary.json").read_text())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except FileNotFoundError as err:
        raise ReportError(f"{run}: no {Path(err.filename).name} (not a finished run)") from None
    except json.JSONDecodeError as err:
        raise ReportError(f"{run}: unreadable run files ({err})") from None
    if not isinstance(summary, dict) or not rows:
        raise ReportError(f"{run}: summary.json or metrics.jsonl holds no results")
    return summary, rows


# -- facts -----------------------------------------------------------------------------------


def sites_of(summary: dict) -> dict[str, dict]:
    """Per-site privacy facts as far as the site reported them (fields may be absent)."""
    out = {}
    sites = summary.get("sites")
    for name, site in sorted(sites.items() if isinstance(sites, dict) else []):
        if not isinstance(site, dict):
            continue
        out[str(name)] = {k: site.get(k) for k in ("epsilon", "delta", "budget", "noise_multiplier", "steps", "refused", "reason")
                          if site.get(k) is not None}
        accountant = site.get("accountant")
        if isinstance(accountant, str) and accountant in ("rdp", "prv"):
            out[str(name)]["accountant"] = accountant
    return out


def _adapter(run: Path, settings: dict) -> dict:
    config_path = run / "adapter" / "adapter_config.json"
    if not config_path.is_file():
        return {}
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{config_path}: unreadable ({err})") from None
    return {
        "type": config.get("peft_type", "LORA"),
        "rank": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "dropout": config.get("lora_dropout"),
        "target_modules": sorted(config.get("target_modules") or []),
        "layers": config.get("layers_to_transform"),
        "ffa_lora": settings.get("ffa-lora"),
    }


def _data(settings: dict) -> dict:
    """The data settings that apply to this run (a Dirichlet α only for a Dirichlet partition, ...)."""
    partition = settings.get("partition")
    keys = ["dataset", "data-path", "items-path", "k-core", "num-sites", "partition"]
    keys += ["dirichlet-alpha"] if partition == "dirichlet" else ["partition-column"] if partition == "natural" else []
    out = {k: settings[k] for k in keys if settings.get(k) not in (None, "")}
    if (as_number(settings.get("rating-threshold")) or -1) >= 0:
        out["rating-threshold"] = settings["rating-threshold"]
    return out


def _comparable(summary: dict, other: dict) -> bool:
    mine, theirs = summary.get("settings") or {}, other.get("settings") or {}
    return all(mine.get(k) == theirs.get(k) for k in EVALUATION_KEYS)


def baselines(run: Path, summary: dict) -> list[dict]:
    """Baseline runs beside ``run`` (a sweep's cells, or folders next to it) evaluated on the
    same users: their test metrics at the best-validation round."""
    found = []
    for folder in sorted(p for p in run.resolve().parent.iterdir() if p.is_dir() and p != run.resolve()):
        try:
            other = json.loads((folder / "summary.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if other.get("method") not in BASELINES or not _comparable(summary, other):
            continue
        best = other.get("best_validation") or {}
        found.append({"method": other["method"], "privacy": _baseline_privacy(other), "folder": folder.name}
                     | {k: as_number(best.get(f"test/{k}", best.get(k))) for k in RESULT_METRICS})
    return found


def _baseline_privacy(summary: dict) -> str:
    if summary.get("method") in ("popularity", "zeroshot"):
        return "no training"
    budget = as_number((summary.get("settings") or {}).get("epsilon"))
    if budget is None:
        return "∞ (no DP)"
    return f"ε {fmt(as_number(summary.get('epsilon')))} of {budget:g}"


def _results(line: dict) -> dict:
    out = {"round": line.get("round")}
    for split in ("test", "valid", "cold"):
        out[split] = {k: as_number(line.get(f"{split}/{k}")) for k in RESULT_METRICS}
    out["cold"]["users"] = line.get("cold/users")
    out["test"]["users"] = line.get("test/users")
    out["epsilon"] = as_number(line.get("epsilon"))
    return out


def model_card(run: str | Path) -> dict:
    """The facts of a run's model card, from its files.

    Example::

        card = model_card("runs/default")
        card["privacy"]["sites"]["0"]["epsilon"]  # e.g. 7.99
    """
    run = Path(run)
    summary, rows = read_run(run)
    settings = summary.get("settings") or {}
    method = summary.get("method", "federated")
    private = as_number(settings.get("epsilon")) is not None and method not in ("popularity", "zeroshot")
    card = {
        "run": run.resolve().name,
        "written": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "method": method,
        "model": {
            "base_encoder": settings.get("model"),
            "adapter": _adapter(run, settings),
            "trained": [name for name, key in (("LoRA", "train-lora"), ("item bias", "train-bias"),
                                               ("fusion gate and recency attention", "train-fusion"),
                                               ("user projection", "train-projection"),
                                               ("logit scale", "learn-logit-scale")) if settings.get(key)],
            # the update is float32 arrays: 4 bytes a parameter
            "trainable_parameters": (summary["bytes_per_update"] // 4
                                     if isinstance(summary.get("bytes_per_update"), int) else None),
            "popularity_prior": (as_number(settings.get("popularity-prior")) or 0.0) > 0,
            "history": {"items": settings.get("max-history"), "tokens": settings.get("max-tokens")},
        },
        "data": _data(settings),
        "privacy": {
            "unit": "user (one DP-SGD example = one user of a site)",
            "private": private,
            "epsilon_budget": as_number(settings.get("epsilon")),
            "delta_setting": settings.get("delta"),
            "accountant": settings.get("accountant"),
            "max_grad_norm": settings.get("max-grad-norm"),
            "expected_batch": settings.get("expected-batch"),
            "prior_share": settings.get("popularity-prior"),
            "prior_cap": settings.get("prior-cap"),
            "epsilon_spent_max": as_number(summary.get("epsilon")),
            "sites": sites_of(summary),
            "central_dp": settings.get("central-dp", "none"),
            "central_epsilon": (as_number(rows[-1].get("central_epsilon"))
                                if settings.get("central-dp", "none") != "none" else None),
        },
        "evaluation": {
            "protocol": ("leave-one-out per user (last item = test, second-to-last = validation); full ranking over "
                         "the whole catalogue with the user's history excluded; ranks from 0; NDCG@k = 1/log2(rank+2); "
                         "recall@k = HR@k (one held-out item); AUC = 1 - rank/(rankable items - 1), averaged; "
                         "model selection on validation NDCG@10 only"),
            "final": _results(summary.get("final") or rows[-1]),
            "best_validation": _results(summary.get("best_validation") or rows[-1]),
            "baselines": baselines(run, summary),
        },
    }
    card["protected"], card["not_protected"] = protection(card)
    return card


def protection(card: dict) -> tuple[list[str], list[str]]:
    """What the run's guarantee covers and what it does not, in plain sentences."""
    p = card["privacy"]
    not_protected = [
        "The item catalogue (titles, genres, item ids): public by assumption.",
        "The evaluation numbers in this card and in metrics.jsonl: in simulation the server reads every "
        "evaluated user's held-out items (a simulation convenience), so they are computed without DP; "
        "in a deployment they come from the operator's own evaluation users.",
        "Anything a site sends outside DP, as listed in " + README_SECTION + ".",
        "Groups: the guarantee is per user; k users acting together are covered only at roughly k·ε.",
        "A person who is a user at several sites: each site's guarantee covers its own data, so their total "
        "exposure is the composition over those sites.",
    ]
    if card["method"] == "zeroshot":
        return ["Every user's data: the zero-shot baseline is the untrained model; no user's data shaped it."], not_protected
    if card["method"] == "popularity":
        return [], ["Nothing: the most-popular baseline ranks by exact training counts over every user (no DP)."] + not_protected
    if card["method"] == "centralized":
        not_protected.insert(0, "Where the data sit: the centralised baseline pools every user's data in one place, "
                                "which a federation avoids; its DP (if any) is over the pooled users.")
    if not p["private"]:
        return [], ["Nothing: this run trained without differential privacy (ε = ∞); every site's update and "
                    "count release depends on its users' data without noise."] + not_protected
    protected = [
        f"Which items each user of a site interacted with, and when: everything the site sent for this model "
        f"(its adapter updates, by DP-SGD with per-user clipping at {p['max_grad_norm']} and Gaussian noise"
        + (f", and its popularity counts, by the Gaussian mechanism with each user counting at most "
           f"{p['prior_cap']} items" if card["model"]["popularity_prior"] else "")
        + ") is (ε, δ)-DP at the user level, with each site's (ε, δ) in the table above, composed over every "
        "round by the site's own ledger. The global model is computed from those releases only (and public "
        "data), so it carries the same guarantee.",
    ]
    if p["central_dp"] == "none":
        not_protected.insert(1, "A site's participation and its (DP-noised) update are seen by the server: "
                                "no site-level DP (central-dp = none) and no secure aggregation.")
    return protected, not_protected


# -- the card as Markdown --------------------------------------------------------------------


def fmt(value, digits: int = 4) -> str:
    """A number for a table: ``digits`` significant digits, "–" when absent."""
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def card_markdown(card: dict) -> str:
    """MODEL_CARD.md from :func:`model_card`'s facts."""
    m, d, p, e = card["model"], card["data"], card["privacy"], card["evaluation"]
    a = m["adapter"]
    lines = [
        f"# Model card: {card['run']}",
        "",
        f"Written {card['written']} by `fedenc report` from the run's files; method: {card['method']}.",
        "",
        "## Model",
        f"- Base encoder: `{m['base_encoder']}`" + (" (all-MiniLM-L6-v2, bundled)" if m["base_encoder"] == "default" else "")
        + ", frozen.",
    ]
    if a:
        lines.append(f"- Adapter: {a['type']} rank {a['rank']}, alpha {fmt(a['alpha'])}, dropout {fmt(a['dropout'])}, "
                     f"on {', '.join(a['target_modules'])}" + (f" in layer(s) {a['layers']}" if a["layers"] else "")
                     + ("; FFA-LoRA (A frozen, only B trained)" if a["ffa_lora"] else "") + ".")
    lines += [
        f"- Trained: {', '.join(m['trained']) or 'nothing'}"
        + (f" ({m['trainable_parameters']:,} parameters)" if m["trainable_parameters"] else "") + ".",
        f"- User history: the {m['history']['items']} most recent items, as text of at most {m['history']['tokens']} "
        "tokens plus attention over their catalogue vectors.",
        "- Popularity prior: " + ("a log-popularity base over the sites' item counts (DP-noised under DP)."
                                  if m["popularity_prior"] else "none."),
        "",
        "## Data and sites",
        "- " + ", ".join(f"{k}: `{v}`" for k, v in d.items()) + ".",
        "",
        "## Privacy",
    ]
    if p["private"]:
        lines += [
            f"User-level differential privacy, accountant `{p['accountant']}`, budget ε = {fmt(p['epsilon_budget'])} "
            f"per site, clipping {p['max_grad_norm']}, expected batch {p['expected_batch']} users"
            + (f", {fmt(p['prior_share'])} of the budget on the popularity counts (cap {p['prior_cap']} items per user)"
               if m["popularity_prior"] else "") + ".",
            "",
            "| site | ε spent | δ | budget | noise multiplier σ | accountant |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in p["sites"].items():
            lines.append(f"| {name} | {fmt(s.get('epsilon'))} | {fmt(s.get('delta'), 3)} | {fmt(s.get('budget'))} | "
                         f"{fmt(s.get('noise_multiplier'))} | {s.get('accountant', p['accountant'])} |")
        if not p["sites"]:
            lines.append("| (no site reported) | | | | | |")
        if p["central_dp"] != "none":
            lines += ["", f"Central site-level DP ({p['central_dp']}): ε = {fmt(p['central_epsilon'])} "
                          f"over the rounds (see `central_epsilon` in metrics.jsonl)."]
    else:
        lines.append({"popularity": "**No differential privacy**: most-popular ranks by exact training counts.",
                      "zeroshot": "**No training**: the zero-shot baseline uses no user's data."}.get(
            card["method"], "**No differential privacy**: this run trained with ε = ∞."))
    lines += ["", "### Protected"] + [f"- {x}" for x in card["protected"] or ["Nothing (no DP)."]]
    lines += ["", "### Not protected"] + [f"- {x}" for x in card["not_protected"]]
    f, b = e["final"], e["best_validation"]
    lines += [
        "",
        "## Evaluation",
        e["protocol"][0].upper() + e["protocol"][1:] + ".",
        f"Central evaluation over {f['test'].get('users')} users.",
        "",
        "| | round | ε spent | " + " | ".join(RESULT_METRICS) + " |",
        "|---|---|---|" + "---|" * len(RESULT_METRICS),
    ]
    for label, res, split in (("final, test", f, "test"), ("final, validation", f, "valid"),
                              ("best-validation round, test (the model in `adapter/`)", b, "test"),
                              (f"cold-start test users ({f['cold'].get('users')}), final", f, "cold")):
        lines.append(f"| {label} | {res['round']} | {fmt(res['epsilon'])} | "
                     + " | ".join(fmt(res[split][k]) for k in RESULT_METRICS) + " |")
    if e["baselines"]:
        lines += ["", "Baselines on the same users (test, best-validation round):", "",
                  "| baseline | privacy | " + " | ".join(RESULT_METRICS) + " |", "|---|---|" + "---|" * len(RESULT_METRICS)]
        for base in e["baselines"]:
            lines.append(f"| {base['method']} (`{base['folder']}`) | {base['privacy']} | "
                         + " | ".join(fmt(base[k]) for k in RESULT_METRICS) + " |")
    else:
        lines += ["", "No baseline runs beside this one (`fedenc baseline NAME` or `fedenc sweep` adds them)."]
    lines += ["", "Plots: `report.png` (NDCG@10 per round and against ε, per-site ε, loss)."]
    return "\n".join(lines) + "\n"


# -- the plot -----------------------------------------------------------------------------------
