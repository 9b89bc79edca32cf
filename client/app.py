"""fedenc ClientApp: turns Flower messages into calls on :class:`common.site.Site`.

Where a site's data and policy come from (:mod:`client.node`):
- simulation: the run's dataset, partitioned; this node is ``partition-id`` of
  ``num-partitions``; the run config plays the site's part (its ``epsilon`` and ``delta``
  are the site's policy, its ``ledger-dir`` holds the site's ledger);
- deployment: the SuperNode's node config (``data-path``, ``site-id``, ``epsilon-budget``,
  ``ledger-path``, ...). The run config is only a request: the site grants the tighter of
  the two, refuses a run without DP unless ``allow-non-private``, keeps its own ledger and
  refuses any release past its budget, whatever the server asks.
Under DP nothing leaves a site but DP releases charged to its ledger and the few facts
listed in the README's "What leaves a site".
"""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client import worker
from client.kept import KeptReplies
from client.node import NodeConfig
from common.progress import ProgressLog
from common.transport import from_array_record, to_array_record

if TYPE_CHECKING:
    from common.ledger import PrivacyLedger
    from common.privacy import PrivacySettings, SitePolicy
    from common.site import Site

# Everything heavy (torch, transformers, peft, opacus, the site's data) is imported inside the
# in-process path: a ClientApp that forwards to the site's worker (client/worker.py) starts in
# well under a second instead of the ~10 s those imports take on 2 cores.


def to_worker(msg: Message, context: Context, call_next) -> Message:
    """Outermost mod: at a deployed site with a running worker, the worker answers (running
    this same app); otherwise, and inside the worker itself, the message is handled here."""
    if not worker.serving_here():
        reply = worker.forward(msg, context)
        if reply is not None:
            return reply
    return call_next(msg, context)


app = ClientApp(mods=[to_worker])
_LEDGER_KEY = "fedenc-ledger"  # the ledger in Flower's node state when no ledger-dir is set


class Refusal(Exception):
    """The site declines this request (the reason travels back; nothing was released)."""


def preload() -> None:
    """Import what every message needs (the site worker does it once, at its start)."""
    import common.site  # noqa: F401  (torch, transformers, peft)
    import common.training  # noqa: F401  (opacus)


def _open(context: Context) -> tuple[Site, NodeConfig, SitePolicy]:
    from dataclasses import replace

    import torch

    from common.config import Settings
    from common.privacy import SitePolicy
    from common.site import Site
    from common.site_cache import SiteCache

    settings = Settings.from_config(context.run_config)
    node = NodeConfig.parse(context.node_config)
    torch.set_num_threads(node.torch_threads)
    if node.deployed:  # the site's own files, filtered and rendered as the run asks
        spec = replace(settings.data, dataset=node.dataset, data_path=node.data_path, items_path=node.items_path)
        cache = SiteCache(node.cache, node.cache_mb * 2**20) if node.cache else None
        return Site.open(settings, node.site_id, 1, spec, cache), node, node.policy
    node = node.with_simulation_storage(settings.run.ledger_dir)
    policy = SitePolicy(settings.privacy.epsilon, settings.privacy.delta, allow_non_private=True)
    return Site.open(settings, *node.partition), node, policy


def _grant(site: Site, policy: SitePolicy, config) -> PrivacySettings:
    """What this request gets here: the site's policy tightens the run's request."""
    catalogue = config.get("catalogue") if config is not None else None
    if catalogue is not None and catalogue != site.data.catalogue.fingerprint():  # checked before anything else
        mine = site.data.catalogue.fingerprint()
        raise Refusal(
            f"{site.name}: its catalogue ({len(site.data.catalogue)} items, fingerprint {mine[:12]}) differs from the "
            f"server's (fingerprint {str(catalogue)[:12]}): the item ids, their order or their texts differ "
            "(items.csv, text-columns, item-template); refusing before any training or release"
        )
    from common.privacy import PolicyRefused

    try:
        return policy.grant(site.settings.privacy, len(site.users))
    except PolicyRefused as why:
        raise Refusal(f"{site.name}: {why}") from None


@contextlib.contextmanager
def _ledger(site: Site, node: NodeConfig, policy: SitePolicy, privacy: PrivacySettings, context: Context, run: str):
    """The site's ledger, locked for the whole request (check, train, record)."""
    from common.ledger import PrivacyLedger
    from common.privacy import PrivacyError

    delta = privacy.delta_for(len(site.users))
    budget, accountant = policy.budget, privacy.accountant
    if node.ledger_path is None:  # `flwr run .` without ledger-dir: Flower's node state
        saved = context.state.config_records.get(_LEDGER_KEY)
        ledger = (PrivacyLedger.from_state(json.loads(saved["json"]), node.name) if saved
                  else PrivacyLedger.open(None, node.name, budget, delta, accountant))
        ledger.run = run
        yield ledger
        context.state.config_records[_LEDGER_KEY] = ConfigRecord({"json": json.dumps(ledger.state())})
        return
    try:
        held = PrivacyLedger.hold(node.ledger_path, node.name, budget, delta, accountant, node.marker)
        ledger = held.__enter__()
    except PrivacyError as why:  # missing, moved, rolled back or corrupt: fail closed
        raise Refusal(f"{node.name}: {why}") from None
    try:
        ledger.run = run
        yield ledger
    finally:
        held.__exit__(None, None, None)


def _facts(node: NodeConfig, ledger: PrivacyLedger | None) -> dict:
    """What a site says about its privacy with every reply (README, "What leaves a site")."""
    if ledger is None:
        return {"site": node.site_id, "epsilon": 0.0, "budget": 0.0, "delta": 0.0}
    return {"site": node.site_id, "epsilon": ledger.epsilon(), "budget": ledger.budget, "delta": ledger.delta}


def _reply(msg: Message, records: dict, metrics: dict, reason: str = "", accountant: str = "") -> Message:
    report = ConfigRecord({"reason": reason, "accountant": accountant})
    metrics = {"refused": int(bool(reason)), "unit-weight": 1} | metrics
    return Message(content=RecordDict(records | {"metrics": MetricRecord(metrics), "report": report}), reply_to=msg)


def central_dp_clipping(msg: Message, context: Context, call_next) -> Message:
    """Clip this site's update before it leaves when the server runs central DP with
    client-side clipping (``central-dp = "client-fixed"``: the server sends the norm)."""
    config = msg.content.config_records.get("config")
    if config is not None and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


def _install_prior(site: Site, msg: Message) -> None:
    """The server's popularity prior travels beside the global arrays."""
    prior = msg.content.array_records.get("prior")
    if prior is not None:
        site.set_prior(prior["log-popularity"].numpy())


@app.query("counts")
def counts(msg: Message, context: Context) -> Message:
    """Release this site's item counts for the popularity prior, charged to its ledger."""
    from common.privacy import BudgetExhausted

    site, node, policy = _open(context)
    config = msg.content.config_records.get("config")
    zeros = ArrayRecord({"counts": Array(np.zeros(len(site.data.catalogue), dtype=np.float32))})
    try:
        privacy = _grant(site, policy, config)
        with _ledger(site, node, policy, privacy, context, str(config.get("run-token", "")) if config else "") as ledger:
            try:
                released = site.release_counts(ledger, privacy)
            except BudgetExhausted as why:
                return _reply(msg, {"counts": zeros}, _facts(node, ledger), str(why), ledger.accountant)
            record = ArrayRecord({"counts": Array(released.astype(np.float32))})
            return _reply(msg, {"counts": record}, _facts(node, ledger), accountant=ledger.accountant)
    except Refusal as why:
        return _reply(msg, {"counts": zeros}, {"site": node.site_id}, str(why))


@app.train(mods=[central_dp_clipping])
def train(msg: Message, context: Context) -> Message:
    """Train one round on this site's users under user-level DP (or send the kept update
    of a round already paid for)."""
    site, node, policy = _open(context)
    config = msg.content["config"]
    token = str(config.get("run-token", ""))
    run_round = int(config.get("run-round", config.get("server-round", 0)))
    fp16 = site.settings.server.transport_fp16
    try:
        privacy = _grant(site, policy, config)
        kept = KeptReplies(node.kept)
        again = kept.get(token, run_round)
        if again is not None:  # a retry or a resume: the same release, nothing new spent
            state, metrics = again
            return _reply(msg, {"arrays": to_array_record(state, fp16=fp16)}, metrics, accountant=privacy.accountant)
        _install_prior(site, msg)
        rounds_left = max(1, int(config["num-rounds"]) - run_round + 1)
        # in simulation the run folder shows the site's steps as they happen; a deployed site writes none
        events = ProgressLog(None if node.deployed else site.settings.run.out_dir, site.name)
        events.note("starting", round=run_round)
        with _ledger(site, node, policy, privacy, context, token) as ledger:
            new_state, result = site.train(from_array_record(msg.content["arrays"]), ledger, privacy, rounds_left,
                                           progress=events.steps(run_round))
            sigma = float(ledger.noise_multiplier or 0.0)
            metrics = _facts(node, ledger) | {"steps": int(result["steps"]), "noise_multiplier": sigma}
            if result["refused"]:
                return _reply(msg, {"arrays": msg.content["arrays"]}, metrics, result["reason"], ledger.accountant)
            if not privacy.private:  # exact statistics leave only a site whose policy allows a non-private run
                metrics |= {"train_loss": float(result["train_loss"]), "num-examples": int(result["num-examples"]),
                            "seconds": float(result["seconds"])}
            kept.put(token, run_round, new_state, metrics)  # after the ledger recorded the round
    except Refusal as why:
        return _reply(msg, {"arrays": msg.content["arrays"]}, {"site": node.site_id}, str(why))
    return _reply(msg, {"arrays": to_array_record(new_state, fp16=fp16)}, metrics, accountant=ledger.accountant)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation on this site's validation users: exact statistics are not a DP
    release, so a site serves it only when its policy granted a non-private run."""
    site, node, policy = _open(context)
    try:
        privacy = _grant(site, policy, msg.content.config_records.get("config"))
    except Refusal as why:
        return _reply(msg, {}, {"site": node.site_id}, str(why))
    if privacy.private:
        return _reply(msg, {}, {"site": node.site_id}, f"{site.name}: federated evaluation is not a DP release; "
                                                        "this site serves it only to non-private runs")
    _install_prior(site, msg)
    metrics = site.evaluate(from_array_record(msg.content["arrays"]))
    stats = {k: float(metrics[k]) for k in ("hr@10", "ndcg@10", "mrr@10", "loss")}
    return _reply(msg, {}, {"site": node.site_id, "num-examples": int(metrics["users"])} | stats)
