"""fedenc ClientApp: turns Flower messages into calls on :class:`common.site.Site`.

Where a site's data comes from:
- simulation: the run's dataset, partitioned; this node is ``partition-id`` of
  ``num-partitions`` (set by Flower's simulation engine);
- deployment: node config ``data-path`` (and optionally ``items-path``, ``dataset``,
  ``site-id``, ``ledger-path``, ``epsilon-budget``) given to ``flower-supernode
  --node-config``; every user in the site's files belongs to the site.
The site keeps its privacy ledger itself (``ledger-path``, else ``ledger-dir`` of the
run, else ``context.state``) and refuses rounds past its budget, whatever the server asks;
a site with fewer users than one expected DP batch sits DP training out (still counted in
the popularity prior).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from common.config import Settings
from common.privacy import BudgetExhausted
from common.site import Site
from common.transport import from_array_record, to_array_record

app = ClientApp()
_LEDGER_KEY = "fedenc-ledger"


def _open_site(context: Context) -> tuple[Site, int, float]:
    settings = Settings.from_config(context.run_config)
    node = context.node_config
    torch.set_num_threads(int(node.get("torch-threads", 1)))  # one thread per simulated site
    budget = float(node.get("epsilon-budget", settings.privacy.epsilon))  # the site's word wins
    if "data-path" in node:  # deployment: the site's own files
        spec = replace(  # the run's text and filter settings, the site's own files
            settings.data,
            dataset=str(node.get("dataset", "csv")),
            data_path=str(node["data-path"]),
            items_path=str(node["items-path"]) if "items-path" in node else None,
        )
        site_id = int(node.get("site-id", 0))
        ledger = node.get("ledger-path") or str(Path(str(node["data-path"])).parent / f"fedenc-ledger-{site_id}.json")
        return Site.open(settings, site_id, 1, spec, ledger), site_id, budget
    site_id, num_sites = int(node["partition-id"]), int(node["num-partitions"])
    ledger_dir = settings["ledger-dir"]
    ledger = Path(ledger_dir) / f"site-{site_id}.json" if ledger_dir else None
    return Site.open(settings, site_id, num_sites, None, ledger), site_id, budget


def central_dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Clip this site's update before it leaves when the server runs central DP with
    client-side clipping (``central-dp = "client-fixed"``: the server sends the norm)."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _ledger(site: Site, budget: float, context: Context):
    saved = context.state.config_records.get(_LEDGER_KEY)
    return site.ledger(budget, saved["json"] if saved else None)


def _install_prior(site: Site, msg: Message) -> None:
    """The server's popularity prior travels beside the global arrays."""
    prior = msg.content.array_records.get("prior")
    if prior is not None:
        site.set_prior(prior["log-popularity"].numpy())


@app.query("counts")
def counts(msg: Message, context: Context) -> Message:
    """Release this site's item counts for the popularity prior, charged to its ledger."""
    site, site_id, budget = _open_site(context)
    ledger = _ledger(site, budget, context) if site.settings.private else None
    try:
        released, refused = site.release_counts(ledger), 0
    except BudgetExhausted:
        released, refused = np.zeros(len(site.data.catalogue)), 1
    if ledger is not None:
        context.state.config_records[_LEDGER_KEY] = ConfigRecord({"json": json.dumps(ledger.state())})
    metrics = MetricRecord({"site": site_id, "refused": refused, "epsilon": float(ledger.epsilon()) if ledger else 0.0})
    content = RecordDict({"counts": ArrayRecord({"counts": Array(released.astype(np.float32))}), "metrics": metrics})
    return Message(content=content, reply_to=msg)


@app.train(mods=[central_dp_clipping])
def train(msg: Message, context: Context) -> Message:
    """Train one round on this site's users under user-level DP."""
    site, site_id, budget = _open_site(context)
    config = msg.content["config"]
    state = from_array_record(msg.content["arrays"])
    _install_prior(site, msg)
    ledger = _ledger(site, budget, context)
    new_state, metrics = site.train(state, ledger, planned_rounds=int(config["num-rounds"]))  # may refuse
    context.state.config_records[_LEDGER_KEY] = ConfigRecord({"json": json.dumps(ledger.state())})
    reply = MetricRecord(
        {
            "num-examples": int(metrics["num-examples"]),
            "train_loss": float(metrics["train_loss"]),
            "steps": int(metrics["steps"]),
            "seconds": float(metrics["seconds"]),
            "site": site_id,
            "unit-weight": 1,  # central DP averages sites unweighted
            "refused": int(metrics["refused"]),
            "epsilon": float(ledger.epsilon()),
            "delta": float(ledger.delta),
            "budget": float(budget),
            "noise_multiplier": float(ledger.noise_multiplier or 0.0),
            "sample_rate": float(metrics.get("sample_rate", 0.0)),
        }
    )
    accountant = ConfigRecord({"json": json.dumps(ledger.state())})
    content = RecordDict({"arrays": to_array_record(new_state, fp16=site.settings["transport-fp16"]), "metrics": reply, "accountant": accountant})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation of the global model on this site's own validation users."""
    site, site_id, _ = _open_site(context)
    _install_prior(site, msg)
    metrics = site.evaluate(from_array_record(msg.content["arrays"]))
    reply = MetricRecord({"num-examples": int(metrics["users"]), "unit-weight": 1, "site": site_id} | {k: float(metrics[k]) for k in ("hr@10", "ndcg@10", "mrr@10", "loss")})
    return Message(content=RecordDict({"metrics": reply}), reply_to=msg)
