"""A site's cache of what it derives from its own data: tokenised rows and their frozen
lower-layer states.

In deployment Flower starts a fresh ClientApp process for every message, which would
re-read the site's files and recompute every user's lower-layer states each time. These
are derived from the site's users' histories, so the cache lives only at the site, in
its state folder (node config ``state-dir``, beside the ledger's marker), with the same
protection as its data; it is bounded in size (least recently used files go first) and
can be deleted at any time (``rm -r STATE_DIR/cache``).

The key covers everything the rows depend on: the users' data and the catalogue, the
encoder's files, the model settings and the row settings; change any and the entry is
simply not found.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .files import atomic_write

FORMAT = 1


class SiteCache:
    """Size-bounded files of tensors, keyed by content.

    >>> import tempfile
    >>> cache = SiteCache(Path(tempfile.mkdtemp()), max_bytes=10_000)
    >>> cache.get_or_compute({"a": 1}, lambda: {"x": torch.ones(3)})["x"].tolist()
    [1.0, 1.0, 1.0]
    >>> cache.get_or_compute({"a": 1}, lambda: 1 / 0)["x"].tolist()  # found: not recomputed
    [1.0, 1.0, 1.0]
    """

    def __init__(self, folder: Path, max_bytes: int):
        self.folder, self.max_bytes = Path(folder), max_bytes

    def get_or_compute(self, key: dict, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The tensors stored under ``key`` (a JSON-able description), or ``compute()``'s, stored."""
        digest = hashlib.sha256(json.dumps({"format": FORMAT, "torch": torch.__version__} | key, sort_keys=True).encode())
        path = self.folder / f"{digest.hexdigest()[:32]}.pt"
        if path.exists():
            try:
                found = torch.load(path, weights_only=True)
                os.utime(path)  # recently used
                return found
            except (RuntimeError, EOFError, OSError):
                path.unlink(missing_ok=True)  # unreadable: recompute
        value = compute()
        self.folder.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                torch.save(value, f)

        atomic_write(path, write)
        self._evict()
        return value

    def _evict(self) -> None:
        files = sorted(self.folder.glob("*.pt"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        for old in files[:-1]:  # the newest entry always stays
            if total <= self.max_bytes:
                break
            total -= old.stat().st_size
            old.unlink(missing_ok=True)


def model_files(path: str) -> list:
    """(name, size, mtime) of the encoder's files: a changed model is a different key."""
    folder = Path(path)
    if not folder.is_dir():
        return [path]
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir() if p.is_file())
