"""common/memory.py: freed heap memory goes back to the system (what keeps a long-lived site
process or ServerApp from holding every batch's activations it ever freed)."""

import numpy as np
import psutil
import pytest

from common.memory import release_freed_memory


@pytest.mark.skipif(not release_freed_memory(), reason="the C library has no malloc_trim (not glibc)")
def test_release_freed_memory_returns_a_fragmented_heap_to_the_system():
    process = psutil.Process()
    chunks = [np.ones(8 * 1024) for _ in range(3_000)]  # 64 KiB each: heap, not mmap; ~190 MiB touched
    pinned = chunks[-1]  # the newest chunk sits on top of the heap, so free() alone cannot shrink it
    del chunks
    held = process.memory_info().rss
    assert release_freed_memory()
    released = held - process.memory_info().rss
    assert released > 100 * 2**20, f"only {released / 2**20:.0f} MiB returned"
    assert pinned.sum() == 8 * 1024  # still intact
