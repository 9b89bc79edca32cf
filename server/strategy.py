"""Federated rounds that survive their partner sites.

Two strategies, one inside the other (server/app.py puts Flower's central-DP wrapper,
when enabled, between them, so that it only ever sees checked updates):

- :class:`ScreenedRounds`, the outer one, checks every train reply before anything
  averages it (:mod:`server.checks`: keys, shapes and dtypes of the global state, finite
  values, an L2 bound on the update), records per round which sites were sampled,
  trained, failed (an error or no reply), refused or were rejected and why
  (:mod:`server.participation`), skips a round with fewer than ``min-sites`` valid
  updates (the global model is kept), and ends the run with :class:`RunFailed` after
  ``max-failed-rounds`` skipped rounds in a row;
- :class:`BudgetAwareFedAvg`, the inner one, samples the connected sites whose budget is
  not spent (waiting at most ``wait-for-sites``), builds the messages of the contract
  (docs/DESIGN.md, "Messages") and averages the updates it is given, every site weighing 1: DP
  sites do not send their user counts, and a claimed count is not something the server
  can check.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common.transport import from_array_record, to_array_record
from server.checks import check_counts, check_update
from server.participation import RoundRecord, evaluation_record, screen


class RunFailed(RuntimeError):
    """No round can make progress; the message is the one-line reason."""


class SiteRoster:
    """What the server knows of the sites: node id -> site label (learnt from replies),
    whose budget is spent, and how long to wait for them to connect."""

    def __init__(self, expected: int, min_sites: int, wait_seconds: float):
        self.expected, self.min_sites, self.wait_seconds = expected, min_sites, wait_seconds
        self.labels: dict[int, str] = {}
        self.exhausted: set[int] = set()
        self.started = False  # the run's first request waits for every expected site

    def label(self, node: int) -> str:
        return self.labels.get(node, f"node {node}")

    def learn(self, msg: Message) -> None:
        metrics = msg.content.metric_records.get("metrics") if not msg.has_error() else None
        if metrics is not None and "site" in metrics:
            self.labels[msg.metadata.src_node_id] = str(metrics["site"])

    def connected(self, grid: Grid) -> list[int]:
        """The connected nodes. The run's first request waits up to ``wait-for-sites`` for
        all ``num-sites``, later ones only for ``min-sites`` (a lost site is not waited
        for every round); with fewer than ``min-sites`` at the deadline it raises
        :class:`RunFailed` naming who is missing. Flower's own sampling waits for ever."""
        needed = self.min_sites if self.started else self.expected
        self.started = True
        deadline = time.monotonic() + self.wait_seconds
        while len(nodes := sorted(grid.get_node_ids())) < needed and time.monotonic() < deadline:
            time.sleep(1.0)
        if len(nodes) >= needed:
            return nodes
        gone = sorted(self.label(n) for n in set(self.labels) - set(nodes))
        gone_text = f" (not connected: {', '.join(gone)})" if gone else ""
        if len(nodes) >= self.min_sites:
            log(logging.WARNING, "fedenc: %d of %d sites connected after %.0fs%s; going on with them",
                len(nodes), needed, self.wait_seconds, gone_text)
            return nodes
        raise RunFailed(f"waited {self.wait_seconds:.0f}s (wait-for-sites): {len(nodes)} site(s) connected, "
                        f"{self.min_sites - len(nodes)} more needed for min-sites = {self.min_sites}{gone_text}")


class BudgetAwareFedAvg(FedAvg):
    """Samples the connected sites whose budget is not spent, sends them the contract's
    messages (global arrays, the prior, run token, run round, catalogue fingerprint) and
    averages, unweighted, the replies it is handed (already checked by
    :class:`ScreenedRounds`)."""

    def __init__(self, *args, roster: SiteRoster, seed: int = 0, start_round: int = 0, **kwargs):
        super().__init__(*args, weighted_by_key="unit-weight", **kwargs)
        self.roster = roster
        self.start_round = start_round
        self.seed = seed
        self._rng = random.Random(seed)  # central DP swaps in SystemRandom (secret sampling)
        self.prior: np.ndarray | None = None  # log-popularity base, sent beside the arrays

    def _messages(self, nodes: list[int], fraction: float, server_round: int, arrays: ArrayRecord,
                  config: ConfigRecord, kind: str) -> list[Message]:
        if not nodes or fraction <= 0:
            return []
        k = min(len(nodes), max(self.roster.min_sites, round(len(nodes) * fraction)))
        # The same sites for run round r whether or not the run was resumed in between, so a
        # repeated round asks the sites that kept its update (SystemRandom ignores the seed).
        self._rng.seed(2 * (self.seed * 1_000_003 + self.start_round + server_round) + (kind == MessageType.EVALUATE))
        chosen = sorted(self._rng.sample(nodes, k))
        config["server-round"] = server_round
        config["run-round"] = self.start_round + server_round  # survives --resume: the site's key
        content = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        if self.prior is not None:
            content["prior"] = ArrayRecord({"log-popularity": Array(self.prior)})
        return list(self._construct_messages(content, chosen, kind))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        eligible = [n for n in self.roster.connected(grid) if n not in self.roster.exhausted]
        return self._messages(eligible, self.fraction_train, server_round, arrays, config, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        nodes = sorted(grid.get_node_ids())  # evaluation waits for no one: training already did
        return self._messages(nodes, self.fraction_evaluate, server_round, arrays, config, MessageType.EVALUATE)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not replies:
            return None, None
        states = [from_array_record(m.content["arrays"]) for m in replies]
        mean = {k: np.mean([s[k].astype(np.float64) for s in states], axis=0) for k in states[0]}
        fp16 = any(a.dtype == "float16" for a in replies[0].content["arrays"].values())
        losses = [float(m.content["metrics"]["train_loss"]) for m in replies if "train_loss" in m.content["metrics"]]
        losses = [x for x in losses if math.isfinite(x)]
        metrics = MetricRecord({"train_loss": float(np.mean(losses))}) if losses else MetricRecord()
        return to_array_record(mean, fp16=fp16), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Unweighted mean over the sites that evaluated (a DP site may refuse) and sent
        finite numbers."""
        rows = []
        for msg in replies:
            metrics = msg.content.metric_records.get("metrics") if not msg.has_error() else None
            if metrics is None or metrics.get("refused", 0):
                continue
            row = {k: float(metrics[k]) for k in ("hr@10", "ndcg@10", "mrr@10", "loss") if k in metrics}
            if row and all(math.isfinite(v) for v in row.values()):
                rows.append(row)
        if not rows:
            return None
        return MetricRecord({k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]})


class ScreenedRounds(Strategy):
    """Checks and records every train reply before ``trainer`` (the averaging strategy,
    possibly wrapped for central DP) sees it; skips rounds with too few valid updates."""

    def __init__(self, trainer: Strategy, roster: SiteRoster, update_bound: float, max_failed_rounds: int):
        self.trainer, self.roster = trainer, roster
        self.update_bound, self.max_failed_rounds = update_bound, max_failed_rounds
        self.sent = ArrayRecord()
        self.messages: list[Message] = []
        self.evaluations: list[Message] = []
        self.last_round = RoundRecord("train")
        self.last_evaluation: RoundRecord | None = None  # federated evaluation, when fraction-evaluate > 0
        self.site_reports: list[dict] = []
        self.skipped_in_a_row = 0

    def summary(self) -> None:
        self.trainer.summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.sent = arrays
        messages = list(self.trainer.configure_train(server_round, arrays, config, grid))
        self.messages = messages  # their ids, set when Flower sends them, pair the replies
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        record = RoundRecord("train")
        usable, self.site_reports = screen(self.roster, record, self.messages, list(replies),
                                           lambda msg: check_update(self.sent, msg.content, self.update_bound))
        valid = [msg for msg, _ in usable]
        record.trained = sorted(self.roster.label(m.metadata.src_node_id) for m in valid)
        record.bytes_up = sum(m.content["arrays"].count_bytes() for m in valid)
        self.last_round = record
        if len(valid) < self.roster.min_sites:
            record.skipped = (f"{len(valid)} valid update(s), fewer than min-sites = {self.roster.min_sites}; "
                              "the global model is kept")
            if not self.messages:
                record.skipped = "no site to ask: every connected site refused before or has spent its budget"
            self.skipped_in_a_row += 1
            log(logging.WARNING, "fedenc: round %d skipped: %s", server_round, record.skipped)
            return None, None
        arrays, metrics = self.trainer.aggregate_train(server_round, valid)
        if arrays is None:
            record.skipped = "the averaging strategy returned no model"
            self.skipped_in_a_row += 1
        else:
            self.skipped_in_a_row = 0
        if metrics is not None and "train_loss" in metrics:
            record.train_loss = float(metrics["train_loss"])
        return arrays, metrics

    def check_progress(self, run_round: int) -> None:
        """Raise :class:`RunFailed` once ``max-failed-rounds`` rounds in a row were skipped."""
        if self.skipped_in_a_row >= self.max_failed_rounds:
            r = self.last_round
            why = "; ".join(f"site {s}: {w}" for s, w in (r.failed | r.rejected | r.refused).items()) or r.skipped
            raise RunFailed(f"round {run_round}: {self.skipped_in_a_row} round(s) in a row without {self.roster.min_sites} "
                            f"valid update(s) (max-failed-rounds); last: {why}")

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.evaluations = list(self.trainer.configure_evaluate(server_round, arrays, config, grid))
        return self.evaluations

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self.last_evaluation = evaluation_record(self.roster, self.evaluations, replies) if self.evaluations else None
        return self.trainer.aggregate_evaluate(server_round, replies)


def collect_counts(grid: Grid, roster: SiteRoster, config: ConfigRecord, num_items: int,
                   timeout: float) -> tuple[np.ndarray, list[dict], RoundRecord]:
    """Ask every connected site once for its (DP) item counts and sum the valid ones.

    Raises :class:`RunFailed` when fewer than ``min-sites`` sites gave usable counts.

    Example (inside the ServerApp, which holds the grid)::

        counts, reports, record = collect_counts(grid, roster, config, 1682, 600)
    """
    nodes = roster.connected(grid)
    query = RecordDict({"config": config})
    messages = [Message(content=query, message_type=f"{MessageType.QUERY}.counts", dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    record = RoundRecord("prior")
    usable, reports = screen(roster, record, messages, replies, lambda msg: check_counts(msg, num_items))
    record.trained = sorted(roster.label(m.metadata.src_node_id) for m, _ in usable)
    if len(usable) < roster.min_sites:
        why = "; ".join(f"site {s}: {w}" for s, w in (record.failed | record.rejected | record.refused).items())
        raise RunFailed(f"popularity prior: {len(usable)} site(s) gave usable counts, fewer than min-sites = "
                        f"{roster.min_sites}: {why}")
    total = np.sum([c for _, c in usable], axis=0)
    return total, reports, record
