"""What a site's reply must satisfy before the server uses it: an update of the global
state within a norm bound, counts as long as the catalogue; all finite."""

from __future__ import annotations

import math

import numpy as np
from flwr.app import ArrayRecord, Message, RecordDict

from common.transport import from_array_record

# Adam's per-coordinate step is lr × m̂/√v̂. By Cauchy-Schwarz over the exponentially
# weighted gradients, |m̂/√v̂| ≤ sqrt((1-β1)²/((1-β2)(1-β1²/β2))) ≈ 7.27 for the default
# betas (0.9, 0.999), whatever the gradients are: DP noise and clipping cannot push an
# honest site past it. (Kingma & Ba's "≈ lr" is typical, not a bound.)
_B1, _B2 = 0.9, 0.999
ADAM_STEP_BOUND = math.sqrt((1 - _B1) ** 2 / ((1 - _B2) * (1 - _B1**2 / _B2)))


def derived_update_bound(learning_rate: float, local_steps: int, num_params: int) -> float:
    """The largest L2 norm an honest site's update can have: each of ``local_steps`` steps
    of a fresh Adam (train_local) moves each of ``num_params`` coordinates by at most
    ``ADAM_STEP_BOUND × learning_rate``. Derived from the schedule rather than from the
    round's median, which a minority of 1 of 2 sites would already move.

    >>> round(derived_update_bound(0.02, 10, 10_000), 1)
    145.4
    """
    return ADAM_STEP_BOUND * learning_rate * local_steps * math.sqrt(num_params)


def check_update(sent: ArrayRecord, reply: RecordDict, bound: float) -> tuple[dict[str, np.ndarray] | None, str]:
    """(the reply's state, "") when it is a usable update of ``sent``, else (None, why).

    ``bound`` limits the L2 norm of the update (reply − sent) over all arrays; fp16
    transport adds up to 2⁻¹¹ relative rounding per coordinate, allowed on top.
    """
    arrays = reply.array_records.get("arrays")
    if arrays is None:
        return None, "the reply has no 'arrays' record"
    missing, extra = sorted(set(sent) - set(arrays)), sorted(set(arrays) - set(sent))
    if missing or extra:
        return None, f"arrays differ from the global state: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, ref in sent.items():
        got = arrays[key]
        if tuple(got.shape) != tuple(ref.shape):
            return None, f"{key!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return None, f"{key!r} has dtype {got.dtype}, expected {ref.dtype}"
    state = from_array_record(arrays)
    reference = from_array_record(sent)
    for key, value in state.items():
        if not np.isfinite(value).all():
            return None, f"{key!r} holds non-finite values"
    norm = math.sqrt(sum(float(np.sum((state[k].astype(np.float64) - reference[k]) ** 2)) for k in state))
    slack = 2.0**-10 * math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in state.values()))
    if norm > bound + (slack if any(a.dtype == "float16" for a in sent.values()) else 0.0):
        return None, f"update norm {norm:.4g} exceeds the bound {bound:.4g} (max-update-norm)"
    return state, ""


def check_counts(msg: Message, num_items: int) -> tuple[np.ndarray | None, str]:
    """A site's popularity counts: a finite vector as long as the catalogue."""
    record = msg.content.array_records.get("counts")
    if record is None or "counts" not in record:
        return None, "the reply has no 'counts' array"
    counts = record["counts"].numpy().astype(np.float64)
    if counts.shape != (num_items,):
        return None, f"counts have shape {counts.shape}, expected ({num_items},) (the catalogue)"
    if not np.isfinite(counts).all():
        return None, "counts hold non-finite values"
    return counts, ""
