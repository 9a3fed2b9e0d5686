"""Numba kernels for the parameter-free layer norm (CPU fast path of
:func:`rt_numpy.ops.layer_norm_free` and of its first-order gradient).

The readable forward takes four passes over its array (mean, centre, variance,
divide) and its gradient, written with primitives so that it can be
differentiated again, about ten, each writing a temporary as large as the
input.  A training step at T=8192 normalises (1, 8192, 512) arrays five times
and back, and those passes cost more than the arithmetic.  Here each row of D
numbers is read into cache once, on one thread, and finished there:

* :func:`layer_norm`: ``y = (x - mean) / sqrt(var + eps)``;
* :func:`layer_norm_grad`: ``dx = (g - mean(g) - y mean(g y)) / sqrt(var + eps)``.

The row sums are taken in float64 with four partial sums (so that they do not
wait on each other), which is at least as accurate as NumPy's float32 mean;
results agree with the readable formulas to rounding
(``tests/test_elementwise_kernels.py``), not bit for bit.  Rows are
independent, so the result does not depend on the number of threads.  The
kernels are serial and release the interpreter lock; contiguous ranges of rows
go to the threads of :mod:`rt_numpy.kernels.numba_threads` (``prange``
took two to three times as long to compile, was slower at small sizes and no
faster at large ones: that module has the figures).  The
row sums are compiled into the kernels (``inline="always"``): as separate
functions, the reference counting of the row views they were passed made the
kernels about 1.5x slower.  No ``fastmath``.  This module imports numpy, numba and
:mod:`rt_numpy.kernels.numba_threads` only.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from rt_numpy import runtime
from rt_numpy.kernels import numba_threads

runtime.watch_compilation()  # a line on stderr when these kernels compile (first run only)


@njit(cache=True, error_model="numpy", inline="always")
def _mean_of_product(u, v, shift_u, shift_v):
    """``mean((u - shift_u) (v - shift_v))`` over a row, in float64 with four partial sums."""
    D = u.shape[0]
    a0 = a1 = a2 = a3 = 0.0
    j = 0
    while j + 4 <= D:
        a0 += (np.float64(u[j]) - shift_u) * (np.float64(v[j]) - shift_v)
        a1 += (np.float64(u[j + 1]) - shift_u) * (np.float64(v[j + 1]) - shift_v)
        a2 += (np.float64(u[j + 2]) - shift_u) * (np.float64(v[j + 2]) - shift_v)
        a3 += (np.float64(u[j + 3]) - shift_u) * (np.float64(v[j + 3]) - shift_v)
        j += 4
    for rest in range(j, D):
        a0 += (np.float64(u[rest]) - shift_u) * (np.float64(v[rest]) - shift_v)
    return ((a0 + a1) + (a2 + a3)) / D


@njit(cache=True, error_model="numpy", inline="always")
def _mean(u):
    """``mean(u)`` over a row, in float64 with four partial sums."""
    D = u.shape[0]
    a0 = a1 = a2 = a3 = 0.0
    j = 0
    while j + 4 <= D:
        a0 += u[j]
        a1 += u[j + 1]
        a2 += u[j + 2]
        a3 += u[j + 3]
        j += 4
    for rest in range(j, D):
        a0 += u[rest]
    return ((a0 + a1) + (a2 + a3)) / D


@njit(cache=True, error_model="numpy", nogil=True)
def _forward(x, eps, out):
    """``out[r] = (x[r] - mean) / sqrt(var + eps)``: x, out (R, D)."""
    for r in range(x.shape[0]):
        row = x[r]
        o = out[r]
        centre = _mean(row)
        inverse = 1.0 / math.sqrt(_mean_of_product(row, row, centre, centre) + eps)
        for j in range(row.shape[0]):
            o[j] = (row[j] - centre) * inverse


@njit(cache=True, error_model="numpy", nogil=True)
def _backward(x, y, g, eps, dx):
    """``dx[r] = (g[r] - mean(g[r]) - y[r] mean(g[r] y[r])) / sqrt(var(x[r]) + eps)``: all (R, D)."""
    for r in range(x.shape[0]):
        row = x[r]
        centre = _mean(row)
        inverse = 1.0 / math.sqrt(_mean_of_product(row, row, centre, centre) + eps)
        g_row, y_row, out = g[r], y[r], dx[r]
        g_mean = _mean(g_row)
        gy_mean = _mean_of_product(g_row, y_row, 0.0, 0.0)
        for j in range(row.shape[0]):
            out[j] = (g_row[j] - g_mean - y_row[j] * gy_mean) * inverse


def _rows(name, x, like=None):
    """``x`` as a C-contiguous (R, D) array (a copy only when it is not contiguous)."""
    if not isinstance(x, np.ndarray) or x.dtype not in (np.float32, np.float64) or x.ndim < 1:
        got = x.dtype if isinstance(x, np.ndarray) else type(x).__name__
        raise TypeError(f"{name} must be a float32 or float64 NumPy array with at least 1 dim, got {got}")
    if like is not None and (x.shape != like.shape or x.dtype != like.dtype):
        raise ValueError(f"{name} must have the shape {like.shape} and dtype {like.dtype} of x, "
                         f"got {x.shape} {x.dtype}")
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])  # (..., D) -> (R, D)


def _row_ranges(rows):
    """The rows (R, D) cut into one contiguous range per thread (:func:`numba_threads.thread_ranges`)."""
    R, D = rows.shape
    return numba_threads.thread_ranges(R, max(1, numba_threads.MIN_NUMBERS_PER_THREAD // max(D, 1)))


def layer_norm(x, eps):
    """Parameter-free layer norm over the last axis of a float NumPy array; same shape and dtype."""
    rows = _rows("x", x)
    out = np.empty_like(rows)
    eps = float(eps)
    numba_threads.run(_forward, [(rows[first:stop], eps, out[first:stop]) for first, stop in _row_ranges(rows)])
    return out.reshape(x.shape)


def layer_norm_grad(x, y, g, eps):
    """The gradient of ``sum(layer_norm(x, eps) * g)`` with respect to x, given ``y = layer_norm(x, eps)``."""
    rows, y_rows, g_rows = _rows("x", x), _rows("y", y, x), _rows("g", g, x)
    dx = np.empty_like(rows)
    eps = float(eps)
    numba_threads.run(_backward, [(rows[first:stop], y_rows[first:stop], g_rows[first:stop], eps, dx[first:stop])
                                  for first, stop in _row_ranges(rows)])
    return dx.reshape(x.shape)
