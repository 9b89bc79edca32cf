"""Who took part in a round and why the others did not: sampled, replied, trained, failed
(an error or no reply), refused, rejected — each with its reason, for ``metrics.jsonl``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flwr.app import Message
from flwr.common.logger import log

if TYPE_CHECKING:
    from server.strategy import SiteRoster


@dataclass
class RoundRecord:
    """Who took part in one round, and why the others did not (site labels as keys)."""

    stage: str
    sampled: list[str] = field(default_factory=list)
    replied: list[str] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    skipped: str = ""  # why the round did not change the model ("" when it did)
    bytes_up: int = 0
    train_loss: float = math.nan  # mean over the sites that sent one (non-private sites only)

    def line(self) -> dict:
        """This round's columns of its metrics.jsonl line."""
        return {"sites": len(self.trained), "refused": len(self.refused), "failed": len(self.failed),
                "rejected": len(self.rejected), "bytes_up": self.bytes_up, "train_loss": self.train_loss,
                "participation": self.as_dict()}

    def as_dict(self) -> dict:
        return {"stage": self.stage, "sampled": self.sampled, "replied": self.replied, "trained": self.trained,
                "failed": self.failed, "refused": self.refused, "rejected": self.rejected, "skipped": self.skipped}


def screen(roster: SiteRoster, record: RoundRecord, sent: list[Message], replies: list[Message],
           check) -> tuple[list[tuple[Message, object]], list[dict]]:
    """Sort the ``replies`` to the messages ``sent`` into ``record``; return the usable
    (reply, checked value) pairs and every site report (metrics and report fields).
    ``check(reply) -> (value or None, why)`` judges one reply's payload."""
    for msg in replies:
        roster.learn(msg)
    answers = attribute(roster, record, sent, replies)
    usable, reports = [], []
    for node, msg in answers:
        who = roster.label(node)
        if msg.has_error():
            record.failed[who] = msg.error.reason or f"error code {msg.error.code}"
            continue
        metrics = msg.content.metric_records.get("metrics")
        if metrics is None:
            record.rejected[who] = "the reply has no 'metrics' record"
            continue
        report = msg.content.config_records.get("report")
        if "site" in metrics:
            reports.append(dict(metrics) | ({k: report[k] for k in report} if report is not None else {}))
        spent = metrics.get("budget", math.inf) - metrics.get("epsilon", 0.0) <= 1e-9
        if metrics.get("refused", 0):
            record.refused[who] = str(report.get("reason", "")) if report is not None else ""
            roster.exhausted.add(node)  # a site that refused once is not asked again
            continue
        if spent:
            roster.exhausted.add(node)
        value, why = check(msg)
        if value is None:
            record.rejected[who] = why
            log(logging.WARNING, "fedenc: %s reply of site %s rejected: %s", record.stage, who, why)
            continue
        usable.append((msg, value))
    for who, why in record.failed.items():
        log(logging.WARNING, "fedenc: %s: site %s failed: %s", record.stage, who, why)
    return usable, reports


def evaluation_record(roster: SiteRoster, sent: list[Message], replies: list[Message]) -> RoundRecord:
    """Who was asked to evaluate, who answered, failed (an error or no reply) or refused.

    Not :func:`screen`: a DP site refusing to evaluate is its policy, not a reason to stop
    asking it to train."""
    record = RoundRecord("evaluate")
    for node, msg in attribute(roster, record, sent, replies):
        who = roster.label(node)
        metrics = None if msg.has_error() else msg.content.metric_records.get("metrics")
        if msg.has_error():
            record.failed[who] = msg.error.reason or f"error code {msg.error.code}"
        elif metrics is not None and metrics.get("refused", 0):
            report = msg.content.config_records.get("report")
            record.refused[who] = str(report.get("reason", "")) if report is not None else ""
    for who, why in record.failed.items():
        log(logging.WARNING, "fedenc: evaluation failed at site %s: %s", who, why)
    return record


def attribute(roster: SiteRoster, record: RoundRecord, sent: list[Message],
              replies: list[Message]) -> list[tuple[int, Message]]:
    """Each reply with the node its question went to; ``record`` gets who was sampled,
    who replied, and every node that sent no reply as failed."""
    # The SuperLink answers for a node it lost ("Node Unavailable") from its own id: a
    # reply belongs to the node its question went to.
    asked = {m.metadata.message_id: m.metadata.dst_node_id for m in sent if m.metadata.message_id}
    answers = [(asked.get(m.metadata.reply_to_message_id, m.metadata.src_node_id), m) for m in replies]
    answered = {node for node, _ in answers}
    nodes = [m.metadata.dst_node_id for m in sent]
    record.sampled = [roster.label(n) for n in nodes]
    record.replied = [roster.label(n) for n in sorted(answered)]
    for node in nodes:
        if node not in answered:
            record.failed[roster.label(node)] = "no reply within round-timeout"
    return answers
