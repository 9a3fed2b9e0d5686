"""Numba kernel for the scatter-add of rows (CPU fast path of :func:`rt_numpy.ops.scatter_add_rows`).

``np.add.at(out, rows, y)`` adds row ``y[m]`` into ``out[rows[m]]`` for every m
in order, but goes through a general, element-at-a-time ufunc machinery: for
the gradient of the token embedding at T=8192 (8192 rows of 512 into 256
rows) it took about 26 ms of a 1.9 s training step here.  :func:`add_rows_at`
is the same loop compiled: the same additions in the same order, so the same
bits (``tests/test_elementwise_kernels.py`` checks it against ``add.at``).
One thread: two threads would have to split the rows by destination to keep
that order, and the loop is limited by memory traffic anyway.

It imports numpy, numba and :mod:`rt_numpy.kernels` only.  No ``fastmath``.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rt_numpy import runtime
from rt_numpy.kernels import check_positions

runtime.watch_compilation()  # a line on stderr when these kernels compile (first run only)


def add_rows_at(out, rows, y):
    """``out[rows[m]] += y[m]`` for m = 0, 1, ... in order: out (R, D), rows (M,) int, y (M, D), in place.

    Raises
    ------
    TypeError
        ``out`` or ``y`` is not a float NumPy array of 2 dims, or they differ in dtype, or ``rows``
        is not an integer array.
    ValueError
        The shapes do not fit, or ``rows`` holds a value outside [0, R).
    """
    for name, x in (("out", out), ("y", y)):
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype not in (np.float32, np.float64):
            got = f"{x.ndim}-dim {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
            raise TypeError(f"{name} must be a 2-dim float32 or float64 NumPy array, got {got}")
    if y.dtype != out.dtype:
        raise TypeError(f"y must have the dtype of out ({out.dtype}), got {y.dtype}")
    if not isinstance(rows, np.ndarray) or rows.dtype.kind not in "iu":
        raise TypeError(f"rows must be an integer NumPy array, got {getattr(rows, 'dtype', type(rows).__name__)}")
    if rows.shape != (y.shape[0],) or y.shape[1] != out.shape[1]:
        raise ValueError(f"rows (M,) and y (M, D) must fit out (R, D) = {out.shape}, got rows {rows.shape} "
                         f"and y {y.shape}")
    check_positions("rows", rows, out.shape[0])
    _add_rows_at(out, rows.astype(np.int64, copy=False), np.ascontiguousarray(y))


@njit(cache=True)
def _add_rows_at(out, rows, y):
    """:func:`add_rows_at` without any check: ``rows`` must hold values in [0, R) (else it writes
    outside ``out``)."""
    D = out.shape[1]
    for m in range(rows.shape[0]):
        dst = out[rows[m]]
        src = y[m]
        for d in range(D):
            dst[d] += src[d]
