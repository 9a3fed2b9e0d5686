"""Sharing independent calls of a compiled kernel among threads, without ``parallel=True``.

A kernel compiled with ``parallel=True`` and a ``prange`` loop is compiled
twice over: Numba outlines the loop body into a second function and LLVM
optimises the kernels that the body calls once more inside it.  With an empty
cache, the parallel wrappers of the routing kernels took as much compile time
as the kernels themselves (13 s of CPU for the backward wrapper alone, whose
loop body is one call).  With the kernels of this package run through
:func:`run`, the first training step of the tiny preset on an empty cache took
42 s of CPU instead of 87 (small: 45 instead of 91; bench/cold_start.py, a
2-core VM, 2026-12-03), with bitwise the same results.

Here a serial kernel compiled with ``nogil=True`` is called once per task from
a pool of Python threads: a call releases the interpreter lock, so the
threads run at the same time.  Each task writes its own slice of the outputs,
so the result does not depend on which thread runs which task or in what
order (the same guarantee as ``prange`` over independent iterations).  The
number of threads is ``numba.get_num_threads()``, which
``NUMBA_NUM_THREADS`` and ``numba.set_num_threads`` set, as for ``prange``.

This module is a leaf: it imports numba and the standard library only.
"""
from __future__ import annotations

import concurrent.futures
import threading

import numba

_pool = None
_pool_lock = threading.Lock()


def _executor():
    """The process's thread pool (made on first use, ``NUMBA_NUM_THREADS`` workers)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=numba.config.NUMBA_NUM_THREADS,
                                                          thread_name_prefix="rt_numpy")
        return _pool


def run(kernel, tasks):
    """``kernel(*args)`` for every ``args`` in ``tasks``, shared among ``numba.get_num_threads()`` threads.

    Parameters
    ----------
    kernel : callable
        A ``@njit(nogil=True)`` function (or any function: under
        ``NUMBA_DISABLE_JIT=1`` it is plain Python and the threads take turns).
    tasks : list of tuple
        The arguments of each call.  The calls must write disjoint outputs.

    Returns once every call has returned; the first exception raised by a call
    is raised here.
    """
    threads = min(numba.get_num_threads(), len(tasks))
    if threads <= 1:
        for args in tasks:
            kernel(*args)
        return
    futures = [_executor().submit(kernel, *args) for args in tasks]
    for future in futures:
        future.result()


def spans(n, min_size=1 << 14):
    """``[(start, stop), ...]`` cutting ``range(n)`` into at most ``numba.get_num_threads()`` runs.

    Each run but the last has the same length, at least ``min_size`` (fewer
    runs when n is small: a task costs a few microseconds to hand out), and the
    runs cover ``range(n)`` in order.  ``n = 0`` gives no run.
    """
    if n <= 0:
        return []
    parts = max(1, min(numba.get_num_threads(), n // max(1, min_size)))
    step = -(-n // parts)  # ceil(n / parts)
    return [(start, min(n, start + step)) for start in range(0, n, step)]
