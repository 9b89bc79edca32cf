"""Turning users' histories into model tensors: one row per USER (the DP unit).

A training row holds the user's history text (tokenised once), the history item ids
for the behaviour feature, and up to ``targets_per_user`` next items to predict — the
most recent training items, which the history therefore stops before. Evaluation rows
use the whole history before the held-out item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .data import Catalogue, Split
from .sequence_rows import sequence_rows, sequence_training_rows
from .text import history_text


@dataclass(frozen=True)
class EvalRows:
    """Rows for full-ranking evaluation, plus the items to exclude from each user's ranking."""

    dataset: TensorDataset  # (input_ids, mask, history, targets)
    exclude: list[np.ndarray]


def _rows(catalogue: Catalogue, histories, targets, tokenizer, max_tokens: int, max_history: int, num_targets: int):
    texts = [history_text(catalogue, h, max_items=max_history) for h in histories]
    tok = tokenizer(texts, padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
    hist = torch.full((len(histories), max_history), -1, dtype=torch.long)  # (U, M), most recent first
    tgt = torch.full((len(histories), num_targets), -1, dtype=torch.long)  # (U, P)
    for i, (h, t) in enumerate(zip(histories, targets, strict=True)):
        recent = np.array(h[::-1][:max_history], dtype=np.int64, order="C", copy=True)
        hist[i, : len(recent)] = torch.from_numpy(recent)
        tgt[i, : len(t)] = torch.from_numpy(np.array(t, dtype=np.int64))  # a copy: split arrays are read-only
    return TensorDataset(tok["input_ids"], tok["attention_mask"], hist, tgt)


def training_rows(
    catalogue: Catalogue, split: Split, users, tokenizer, max_tokens: int, max_history: int, targets_per_user: int
) -> TensorDataset:
    """One row per user: history = train[:c], targets = train[c:], c = max(1, n - P).

    Example::

        ds = training_rows(cat, split, [0, 1], tokenizer, 64, 20, 8)
        ids, mask, history, targets = ds[0]
    """
    if tokenizer is None:  # a model without text input (common/sequential.py)
        return sequence_training_rows(split, users, max_history)
    histories, targets = [], []
    for u in users:
        seq = split.train[u]
        cut = max(1, len(seq) - targets_per_user)
        histories.append(seq[:cut])
        targets.append(seq[cut:])
    return _rows(catalogue, histories, targets, tokenizer, max_tokens, max_history, targets_per_user)


def held_out(split: Split, users, which: str) -> tuple[list[np.ndarray], list[list[int]]]:
    """Each user's history and held-out item for ``which`` in {"valid", "test"}: the history
    is everything before the held-out item (and is excluded from that item's ranking).

    Example::

        histories, targets = held_out(split, [0, 1], "test")
    """
    if which == "valid":
        histories = [split.train[u] for u in users]
        targets = [[int(split.valid[u])] for u in users]
    elif which == "test":
        histories = [np.append(split.train[u], split.valid[u]) for u in users]
        targets = [[int(split.test[u])] for u in users]
    else:
        raise ValueError(f"which must be 'valid' or 'test', got {which!r}")
    return [np.array(h, dtype=np.int64) for h in histories], targets  # copies: split arrays are read-only


def target_rows(split: Split, users, which: str) -> EvalRows:
    """Evaluation rows without text: the held-out items and exclusions of :func:`evaluation_rows`
    for a scorer that needs no model input (the popularity baseline); the text, mask and history
    tensors have width 0."""
    histories, targets = held_out(split, users, which)
    empty = torch.zeros((len(targets), 0), dtype=torch.long)
    return EvalRows(TensorDataset(empty, empty, empty, torch.tensor(targets, dtype=torch.long).reshape(-1, 1)), histories)


def evaluation_rows(
    catalogue: Catalogue, split: Split, users, tokenizer, max_tokens: int, max_history: int, which: str
) -> EvalRows:
    """Rows for ``which`` in {"valid", "test"}: the history is everything before the held-out item."""
    histories, targets = held_out(split, users, which)
    if tokenizer is None:  # a model without text input (common/sequential.py)
        return EvalRows(sequence_rows(histories, targets, max_history), histories)
    return EvalRows(_rows(catalogue, histories, targets, tokenizer, max_tokens, max_history, 1), histories)
