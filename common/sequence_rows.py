"""Rows for the sequential recommender (common/sequential.py): item-index sequences, not text.

The same four tensors as :mod:`common.examples` (``text``, ``mask``, ``history``,
``targets``), so training, the empty Poisson batch and evaluation handle them unchanged:
``text`` (U, L) holds catalogue indices oldest -> newest, right-aligned so the last column
is always the newest item (-1 = pad), ``mask`` (U, L) marks real items, ``history`` is
unused (width 0) and ``targets`` is (U, L) next items per position for training or (U, 1)
the held-out item for evaluation. One row per user: the DP unit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .data import Split


def _right_aligned(seqs, width: int) -> torch.Tensor:
    out = torch.full((len(seqs), width), -1, dtype=torch.long)  # (U, L)
    for i, seq in enumerate(seqs):
        tail = np.asarray(seq, dtype=np.int64)[-width:] if width else np.zeros(0, dtype=np.int64)
        if len(tail):
            out[i, width - len(tail):] = torch.from_numpy(tail.copy())  # a copy: split arrays are read-only
    return out


def sequence_rows(histories, targets, max_history: int) -> TensorDataset:
    """Evaluation rows: the last ``max_history`` items of each history, and its held-out item.

    Example::

        ds = sequence_rows([[3, 1, 4]], [[5]], 2)   # text [[1, 4]], targets [[5]]
    """
    items = _right_aligned(histories, max_history)  # (U, L)
    tgt = torch.tensor([list(t) for t in targets], dtype=torch.long).reshape(len(targets), -1)  # (U, 1)
    return TensorDataset(items, (items >= 0).long(), torch.zeros((len(items), 0), dtype=torch.long), tgt)


def sequence_training_rows(split: Split, users, max_history: int) -> TensorDataset:
    """One row per user, SASRec-style: position t reads train[..t] and predicts train[t+1],
    over the user's last ``max_history`` transitions (one example, so one clipped gradient).

    Example::

        ds = sequence_training_rows(split, [0, 1], 20)
        items, mask, _, targets = ds[0]   # targets[t] is the item after items[t]
    """
    seqs = [np.asarray(split.train[u]) for u in users]
    items = _right_aligned([s[:-1] for s in seqs], max_history)  # (U, L)
    targets = _right_aligned([s[1:] for s in seqs], max_history)  # (U, L), aligned with items
    return TensorDataset(items, (items >= 0).long(), torch.zeros((len(items), 0), dtype=torch.long), targets)
