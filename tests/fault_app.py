"""A ClientApp whose sites misbehave, for tests/test_faults.py: fedenc's own handlers,
with a Flower mod that corrupts one simulated site's train replies.

The test copies this file into a Flower app folder of its own (its pyproject.toml names
``fault_app:app``), so the faults travel through the real Flower path: the SuperLink, the
simulation engine, the messages. Site (partition) -> fault:
"""

from __future__ import annotations

import os

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord
from flwr.clientapp import ClientApp

from client.app import central_dp_clipping, counts as fedenc_counts, evaluate as fedenc_evaluate, train as fedenc_train

FAULTS = {
    1: "raises in round 2",
    2: "sends NaN",
    3: "sends a wrongly shaped array",
    4: "sends its update x1e6",
    5: "claims 1e9 examples",
}  # site 0 is honest, unless FEDENC_TEST_FAULT names one fault for every site
EVERY_SITE = os.environ.get("FEDENC_TEST_FAULT")

app = ClientApp()


def _arrays(reply: Message, change) -> None:
    arrays = reply.content["arrays"]
    reply.content["arrays"] = ArrayRecord({k: Array(np.asarray(change(k, v.numpy()), dtype=v.numpy().dtype))
                                           for k, v in arrays.items()})


def misbehave(msg: Message, context: Context, call_next) -> Message:
    """Do what FAULTS says this site does; the others pass through untouched."""
    fault = EVERY_SITE or FAULTS.get(int(context.node_config["partition-id"]))
    if fault == "raises in round 2" and int(msg.content["config"]["server-round"]) == 2:
        raise RuntimeError("injected fault: the site's machine went down in round 2")
    reply = call_next(msg, context)
    if reply.has_error() or reply.content["metrics"]["refused"]:
        return reply
    sent = {k: v.numpy() for k, v in msg.content["arrays"].items()}
    first = next(iter(sent))
    if fault == "sends NaN":
        _arrays(reply, lambda k, v: np.full_like(v, np.nan))
    elif fault == "sends a wrongly shaped array":
        _arrays(reply, lambda k, v: np.ones(1, dtype=v.dtype) if k == first else v)
    elif fault == "sends its update x1e6":
        _arrays(reply, lambda k, v: sent[k] + 1e6 * (v - sent[k]))
    elif fault == "claims 1e9 examples":
        reply.content["metrics"] = MetricRecord(dict(reply.content["metrics"]) | {"num-examples": 10**9})
    return reply


@app.train(mods=[central_dp_clipping, misbehave])
def train(msg: Message, context: Context) -> Message:
    return fedenc_train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedenc_evaluate(msg, context)


@app.query("counts")
def counts(msg: Message, context: Context) -> Message:
    return fedenc_counts(msg, context)
