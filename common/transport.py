"""Adapter state <-> Flower ``ArrayRecord``, optionally as fp16 on the wire."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
from flwr.app import Array, ArrayRecord


def to_array_record(state: dict[str, np.ndarray], fp16: bool = False) -> ArrayRecord:
    """Ordered arrays for the wire; ``fp16`` halves the bytes (restored to fp32 on arrival).

    >>> rec = to_array_record({"w": np.ones(3, np.float32)}); from_array_record(rec)["w"].dtype
    dtype('float32')
    """
    dtype = np.float16 if fp16 else np.float32
    return ArrayRecord(OrderedDict((k, Array(np.asarray(v, dtype=dtype))) for k, v in state.items()))


def from_array_record(record: ArrayRecord) -> OrderedDict[str, np.ndarray]:
    return OrderedDict((k, v.numpy().astype(np.float32)) for k, v in record.items())
