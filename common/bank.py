"""The catalogue bank: one vector per item from the frozen base encoder, cached on disk.

The catalogue is public and the base encoder never changes, so every site and the
server compute the same bank; caching it by content makes that a one-time cost.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from .encoder import SplitEncoder, encode_texts, is_decoder_only
from .files import atomic_write


def cache_dir() -> Path:
    """``$FEDENC_CACHE`` or ``~/.cache/fedenc``: derived, public data only (no user data)."""
    return Path(os.environ.get("FEDENC_CACHE", Path.home() / ".cache" / "fedenc"))


def _fingerprint(backbone: nn.Module, texts: list[str], max_tokens: int) -> str:
    h = hashlib.sha256()
    h.update(repr((type(backbone).__name__, max_tokens, len(texts))).encode())
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    for p in backbone.parameters():
        h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def item_bank(backbone: nn.Module, tokenizer, name: str, texts: list[str], max_tokens: int) -> torch.Tensor:
    """Pooled base-encoder vectors of every item text, (N, H); computed once per catalogue.

    Example::

        bank = item_bank(backbone, tokenizer, "default", ["Toy Story (1995) | Animation"], 32)  # (1, 384)
    """
    path = cache_dir() / f"bank-{_fingerprint(backbone, texts, max_tokens)}.pt"
    if path.exists():
        return torch.load(path, weights_only=True)
    encoder = SplitEncoder(backbone, 0, last_token=is_decoder_only(backbone))
    bank = encode_texts(encoder, tokenizer, texts, max_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(bank, f)

    atomic_write(path, write)  # concurrent sites never read half a file
    return bank
