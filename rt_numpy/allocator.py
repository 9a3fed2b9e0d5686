"""Keep freed memory for reuse instead of handing it back to the system.

A training step at long context allocates and frees the same large arrays
every step: at T=8192 each feed-forward activation (B, T, 4C) is 64 MiB, and
autograd makes a dozen of them.  glibc's ``malloc`` serves blocks above its
mmap threshold (at most 32 MiB unless told otherwise) with fresh ``mmap``
pages and returns them on ``free``, so every such array is page-faulted in
again, one 4 KiB page at a time, on every step.  On the 2-core virtual machine
where rt_numpy's benchmarks run, those page faults took more time than the
arithmetic: ``bench/train_step.py`` at T=8192 went from about 3.1 s to 2.2 s
per step once freed memory was kept (BENCHMARKS.md).

:func:`reuse_freed_memory` raises the two glibc thresholds with ``mallopt``:
blocks up to ``limit`` come from the heap, and freed heap memory is kept
rather than trimmed.  It changes how fast memory is handed out, never what
is computed.  The price is that the process's resident memory stays at its
peak after a large step; blocks of 256 MiB and more still get their own mmap
(with a 1 GiB limit, dense attention over 8 heads at T=8192 fragmented the
heap past 24 GiB).  It is a process-wide setting, so rt_numpy only makes
it where it owns the process: the ``rt_numpy`` command line and the benchmark
scripts (which apply it to every library they time, the PyTorch port
included).  Library users call it themselves if they want it.

Nothing happens on a C library other than glibc (macOS, Windows, musl).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

M_TRIM_THRESHOLD = -1  # glibc's malloc.h: how much free memory at the top of the heap is kept
M_MMAP_THRESHOLD = -3  # blocks at least this large are served by mmap
_DEFAULT_LIMIT = 1 << 28  # 256 MiB: larger blocks keep their own mmap, so they cannot fragment the heap
_INT_MAX = 2**31 - 1


def reuse_freed_memory(limit: int = _DEFAULT_LIMIT) -> bool:
    """Ask glibc to serve blocks below ``limit`` bytes from the heap and to keep freed memory.

    Parameters
    ----------
    limit : int
        The new mmap threshold in bytes, 1 MiB to 2 GiB - 1 (glibc takes a C
        ``int``).  Blocks at least this large still get their own mmap.

    Returns
    -------
    bool
        True when glibc accepted both settings; False on other C libraries,
        where nothing is changed.

    Raises
    ------
    ValueError
        ``limit`` is not an int in [1 MiB, 2 GiB - 1].
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not (1 << 20) <= limit <= _INT_MAX:
        raise ValueError(f"limit must be an int in [{1 << 20}, {_INT_MAX}] bytes, got {limit!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, _INT_MAX))
