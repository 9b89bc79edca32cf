"""FedAvg over the adapter arrays that also respects the sites' privacy budgets.

It differs from Flower's FedAvg in three ways: a site that reported its budget spent
is not selected again; a site's refusal (it sends back the global arrays with zero
examples) is left out of the average; and a failed reply fails the run, because a
silently shrinking federation would corrupt a privacy experiment.
"""

from __future__ import annotations

import random
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
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

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        _, available = sample_nodes(grid, self.min_available_nodes, self.min_available_nodes)
        eligible = sorted(n for n in available if n not in self.exhausted)
        if not eligible:
            return []
        k = max(1, round(len(eligible) * self.fraction_train))
        chosen = sorted(self._rng.sample(eligible, k))
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, chosen, MessageType.TRAIN)

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
