"""FedAvg over the adapter arrays that also respects the sites' privacy budgets.

It differs from Flower's FedAvg in three ways: a site that reported its budget spent
is not selected again; a site's refusal (it sends back the global arrays with zero
examples) is left out of the average; and a failed reply fails the run, because a
silently shrinking federation would corrupt a privacy experiment.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes


class RoundFailed(RuntimeError):
    """A site replied with an error."""


class BudgetAwareFedAvg(FedAvg):
    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.exhausted: set[int] = set()
        self.last_round: dict = {}
        self.site_reports: list[dict] = []
        self._rng = random.Random(seed)
        self.prior: np.ndarray | None = None  # log-popularity base, sent beside the arrays

    def _with_prior(self, messages: Iterable[Message]) -> Iterable[Message]:
        if self.prior is None:
            return messages
        messages = list(messages)
        for msg in messages:
            msg.content["prior"] = ArrayRecord({"log-popularity": Array(self.prior)})
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self._with_prior(super().configure_evaluate(server_round, arrays, config, grid))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        _, available = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        eligible = sorted(n for n in available if n not in self.exhausted)
        if not eligible:
            return []
        k = max(1, round(len(eligible) * self.fraction_train))
        chosen = sorted(self._rng.sample(eligible, k))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._with_prior(self._construct_messages(record, chosen, MessageType.TRAIN))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        failed = [m for m in replies if m.has_error()]
        if failed:
            raise RoundFailed(f"round {server_round}: {len(failed)} site(s) failed: {failed[0].error.reason}")
        trained, reports, bytes_up = [], [], 0
        for msg in replies:
            metrics = msg.content["metrics"]
            report = dict(metrics) | {"accountant": msg.content["accountant"]["json"]}
            reports.append(report)
            if metrics["refused"]:
                self.exhausted.add(msg.metadata.src_node_id)
            else:
                trained.append(msg)
                bytes_up += msg.content["arrays"].count_bytes()
            if metrics["budget"] - metrics["epsilon"] <= 1e-9:
                self.exhausted.add(msg.metadata.src_node_id)
        self.site_reports = reports
        arrays, metrics = super().aggregate_train(server_round, trained) if trained else (None, None)
        self.last_round = {
            "train_loss": float(metrics["train_loss"]) if metrics else float("nan"),
            "bytes_up": bytes_up,
            "sites": len(trained),
            "refused": len(replies) - len(trained),
        }
        return arrays, metrics


def collect_counts(grid: Grid, num_sites: int, timeout: float = 3600) -> tuple[np.ndarray, list[dict]]:
    """Ask every site once for its (DP) item counts and sum them.

    Example (inside the ServerApp, which holds the grid)::

        counts, reports = collect_counts(grid, 5)
    """
    _, nodes = sample_nodes(grid, num_sites, num_sites)
    query = RecordDict({"config": ConfigRecord({"task": "popularity-prior"})})
    messages = [Message(content=query, message_type=f"{MessageType.QUERY}.counts", dst_node_id=n) for n in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    failed = [m for m in replies if m.has_error()]
    if failed or len(replies) < len(nodes):
        reason = failed[0].error.reason if failed else "no reply"
        raise RoundFailed(f"popularity prior: {len(nodes) - len(replies) + len(failed)} site(s) failed: {reason}")
    total = sum(m.content["counts"]["counts"].numpy().astype(np.float64) for m in replies)
    return total, [dict(m.content["metrics"]) for m in replies]
