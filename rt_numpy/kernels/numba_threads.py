"""Sharing independent calls of a compiled kernel among threads, without ``parallel=True``.

A kernel compiled with ``parallel=True`` and a ``prange`` loop is compiled
twice over: Numba outlines the loop body into a second function and LLVM
optimises the kernels that the body calls once more inside it.  With an empty
cache, the parallel wrappers of the routing kernels took as much compile time
as the kernels themselves (13 s of CPU for the backward wrapper alone, whose
loop body is one call).  With the routing kernels run through :func:`run`,
a fresh process reached the end of the tiny preset's first training step on
an empty cache in 36 s instead of 54 (small: 32 instead of 57;
bench/cold_start.py, a 2-core VM, 2026-12-03), with bitwise the same results.

The k-means routing of balanced membership
(:func:`rt_numpy.kernels.numba_kmeans.route_from_scores`) runs the same way:
its ``prange`` kernel took 3.2 s to compile, the two serial kernels 1.7 s, and
they run as fast (0.66x the time at the ``small`` preset's shape, 1.09x at
T=8192, K=64).

The elementwise kernels (GELU, layer norm and its gradient, AdamW) run the
same way, on contiguous slices, and arrays under 2 x
:data:`MIN_NUMBERS_PER_THREAD` numbers stay in the calling thread.  Their
``prange`` versions took 5.1 s of the first training step's compile, the
serial ones 2.1 s (the ``small`` preset, 2026-12-04).  Timed against the
``prange`` kernels on 2 threads (the wrappers' checks and allocations
included), they took a quarter to a half of the time at the ``tiny`` preset's
sizes, 0.8x to 1.2x at the ``small`` preset's and 0.9x to 1.1x at T=8192
(BENCHMARKS.md, "Cold start").  (An earlier note here had the serial loops 2x
slower per thread.  Without ``error_model="numpy"`` a serial GELU was 14x
slower here: each division is checked, and the loop does not vectorise.)

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
import os
import threading

import numba

# Handing work to another thread costs about 15-30 us; the elementwise kernels (GELU, layer norm,
# AdamW) do about that much work on this many numbers, so smaller arrays stay in the calling thread.
MIN_NUMBERS_PER_THREAD = 1 << 15

_pool = None
_pool_lock = threading.Lock()


def _forget_pool_after_fork():
    """In a forked child: the parent's pool threads do not exist there, so the child makes its own
    (:mod:`rt_numpy.compile_ahead` forks)."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _executor():
    """The process's thread pool (made on first use, ``NUMBA_NUM_THREADS`` workers)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(max_workers=numba.config.NUMBA_NUM_THREADS,
                                                          thread_name_prefix="rt_numpy")
        return _pool


def thread_ranges(n, min_items=1):
    """``n`` items cut into one contiguous ``(first, stop)`` range per thread, at most n // min_items
    ranges (fewer when n is smaller).

    At most ``numba.get_num_threads()`` ranges of ceil(n / ranges) items each, the last one
    possibly shorter (so shorter than ``min_items`` too); one range when n < 2 min_items (the work
    then stays in the calling thread: see :data:`MIN_NUMBERS_PER_THREAD`); none for n = 0.
    """
    ranges = max(1, min(numba.get_num_threads(), n // min_items))
    per_range = max(1, -(-n // ranges))  # ceil(n / ranges)
    return [(first, min(n, first + per_range)) for first in range(0, n, per_range)]


def _run_serially(kernel, tasks):
    """``kernel(*args)`` for every ``args`` in ``tasks``, in order, in the calling thread."""
    for args in tasks:
        kernel(*args)


def run(kernel, tasks):
    """``kernel(*args)`` for every ``args`` in ``tasks``, shared among ``numba.get_num_threads()`` threads.

    Parameters
    ----------
    kernel : callable
        A ``@njit(nogil=True)`` function (or any function: under
        ``NUMBA_DISABLE_JIT=1`` it is plain Python and the threads take turns).
    tasks : list of tuple
        The arguments of each call.  The calls must write disjoint outputs.

    Returns once every call has returned; an exception raised by a call is
    raised here, after every share has finished.

    Notes
    -----
    The tasks are cut into one contiguous share per thread
    (:func:`thread_ranges`), and the calling thread runs the first share
    itself: handing a call to the pool costs about 15 us, as much as a small
    kernel's work, so the pool gets one hand-off per thread, not one per task.
    If several calls raise, the one of the earliest share is raised.
    """
    parts = [tasks[first:stop] for first, stop in thread_ranges(len(tasks))]
    if len(parts) <= 1:
        _run_serially(kernel, tasks)
        return
    futures = [_executor().submit(_run_serially, kernel, part) for part in parts[1:]]
    try:
        _run_serially(kernel, parts[0])
    finally:
        for future in futures:  # every share has finished before anything returns or raises
            future.exception()
    for future in futures:
        future.result()
