"""Give memory freed by large, short-lived tensors back to the system.

glibc keeps what a batch's activations, a round's per-sample gradients or an encoding pass
freed in its heap, so a long-lived process (a site's Ray actor or worker, the ServerApp)
holds hundreds of MB it no longer uses: 490 MB in one process that had opened and trained
five simulated sites (docs/BENCH.md, "Memory"). Trimming after each such phase costs
milliseconds.
"""

from __future__ import annotations

import ctypes
import ctypes.util


def _trim_function():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)  # glibc only (not macOS, not musl)


_MALLOC_TRIM = _trim_function()


def release_freed_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot.

    >>> release_freed_memory() in (True, False)
    True
    """
    if _MALLOC_TRIM is None:
        return False
    _MALLOC_TRIM(0)
    return True


# glibc serves allocations above its largest mmap threshold (32 MiB on 64-bit) with a fresh
# mapping, page-faulted on first touch and unmapped on free; below it, freed memory is reused.
PASS_BYTES = 16 * 2**20


def ffn_row_bytes(tokens: int, hidden: int) -> int:
    """Bytes per row of a transformer layer's largest activation, its (T, 4H) fp32 FFN input.

    >>> ffn_row_bytes(48, 384)
    294912
    """
    return tokens * 4 * hidden * 4


def rows_per_pass(row_bytes: int, device) -> int:
    """Rows per no-grad forward pass (encoding, scoring) whose largest activation takes
    ``row_bytes`` per row: on CPU as many as keep it under 16 MiB, so each batch reuses the
    last one's memory instead of mapping and faulting in fresh pages (the default model's
    encoding and evaluation ran 15% faster at 56 rows than at 256, with 10x fewer page
    faults: docs/BENCH.md, "Memory"); on an accelerator 256, to keep it busy.

    >>> rows_per_pass(48 * 1536 * 4, "cpu"), rows_per_pass(48 * 1536 * 4, "cuda")
    (56, 256)
    """
    if str(device) != "cpu":
        return 256
    return max(1, min(256, PASS_BYTES // max(1, row_bytes)))
