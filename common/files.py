"""Crash-safe files: one way to write a file so that readers see the old or the new
content, never a half-written one, and strict JSON (``null``, never ``NaN``).

A write goes to a temporary file beside the target (same folder, so the same file
system), is flushed to disk, swapped in with ``os.replace`` (atomic on POSIX), and then
the folder itself is flushed so that the rename survives a power cut.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename is durable only once its folder is)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_mode(folder: bool = False) -> int:
    """The permissions ``open``/``mkdir`` would give a new file (folder) under the current
    umask; ``tempfile`` makes them private (0600/0700), which results must not silently be."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if folder else 0o666) & ~umask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Produce ``path`` atomically: ``write(tmp)`` fills a temporary file beside it.

    Example::

        atomic_write("out/notes.txt", lambda tmp: tmp.write_text("kept"))

    ``write`` gets a path whose name ends in ``.tmp``: numpy's savers append ``.npy`` to
    such a name, so give them an open file instead.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else default_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically.

    Example::

        atomic_write_text("out/run.json", "{}")
    """
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def strict(value):
    """``value`` with every non-finite float (and numpy scalar or array) made JSON-safe:
    NaN and ±inf become ``None``.

    >>> strict({"loss": float("nan"), "ranks": np.array([1, 2])})
    {'loss': None, 'ranks': [1, 2]}
    """
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, np.ndarray):
        return strict(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def dumps(value, **kwargs) -> str:
    """Strict JSON: what :func:`strict` makes of ``value``; anything else unknown is ``str``.

    >>> dumps({"x": float("inf")})
    '{"x": null}'
    """
    return json.dumps(strict(value), allow_nan=False, default=str, **kwargs)


def atomic_write_json(path: str | Path, value, **kwargs) -> Path:
    """Write ``value`` as strict JSON to ``path`` atomically.

    Example::

        atomic_write_json("out/summary.json", {"epsilon": 8.0}, indent=1)  # NaN would be null
    """
    return atomic_write_text(path, dumps(value, **kwargs))
