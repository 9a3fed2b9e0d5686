"""Numba kernel for the AdamW step (CPU fast path of :func:`rt_numpy.optim.adamw_update`).

The readable update in :mod:`rt_numpy.optim` takes about fifteen passes over
every parameter, each writing a temporary; this kernel reads p, g, m and v
once and writes the new p, m and v once.  It does the same floating-point
operations in the same order and in the parameter's dtype (every constant is
rounded to that dtype first, as NumPy does with a Python scalar), and Numba
does not fuse a multiply and an add without ``fastmath``, so the result is
bitwise the reference's: ``tests/test_optim.py`` checks it, and bitwise resume
from a checkpoint does not depend on which path ran.  Each element is
independent, so the number of threads does not matter either: the kernels are
serial and release the interpreter lock, and contiguous slices go to the
threads of :mod:`rt_numpy.kernels.numba_threads`.  ``error_model="numpy"``
lets the loop vectorise (a division by zero gives inf or NaN, as in NumPy).

This module imports numpy, numba and :mod:`rt_numpy.kernels.numba_threads` only.  No ``fastmath``.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from rt_numpy import runtime
from rt_numpy.kernels import numba_threads

runtime.watch_compilation()  # a line on stderr when these kernels compile (first run only)


@njit(cache=True, error_model="numpy", nogil=True)
def _adamw(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, eps, lr, keep,
           new_p, new_m, new_v):
    """One AdamW step on 1-D arrays of one dtype; the scalars are of that dtype too.

    ``keep`` is ``1 - lr * weight_decay`` (decayed parameters) or 1 (not
    decayed), applied before the Adam step as in the reference.
    """
    for i in range(p.shape[0]):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        step = (mi / bias1) / (math.sqrt(vi / bias2) + eps)
        new_p[i] = p[i] * keep - lr * step
        new_m[i] = mi
        new_v[i] = vi


@njit(cache=True, error_model="numpy", nogil=True)
def _adamw_no_decay(p, g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2, bias1, bias2, eps, lr,
                    new_p, new_m, new_v):
    """:func:`_adamw` for a parameter without weight decay (no multiplication by ``keep`` at all)."""
    for i in range(p.shape[0]):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        step = (mi / bias1) / (math.sqrt(vi / bias2) + eps)
        new_p[i] = p[i] - lr * step
        new_m[i] = mi
        new_v[i] = vi


def adamw(p, g, m, v, *, beta1, beta2, bias1, bias2, eps, lr, weight_decay, decay):
    """The new ``(p, m, v)`` of one parameter; the inputs are left untouched.

    Parameters
    ----------
    p, g, m, v : ndarray
        Parameter, gradient (already cast to p's dtype), first and second
        moments; one shape, one float dtype.
    beta1, beta2, bias1, bias2, eps, lr, weight_decay : float
        As in :func:`rt_numpy.optim.adamw_update` (``bias = 1 - beta**t``).
    decay : bool
        Whether this parameter is decayed.
    """
    dtype = p.dtype
    for name, x in (("g", g), ("m", m), ("v", v)):
        if not isinstance(x, np.ndarray) or x.shape != p.shape or x.dtype != dtype:
            got = f"{x.shape} {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
            raise ValueError(f"{name} must be an array of p's shape {p.shape} and dtype {dtype}, got {got}")
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"p must be float32 or float64, got {dtype}")
    c = dtype.type  # every constant rounded to the parameter's dtype, as NumPy does with Python scalars
    flat = [np.ascontiguousarray(x).reshape(-1) for x in (p, g, m, v)]  # (N,) each
    new = [np.empty_like(flat[0]) for _ in range(3)]
    constants = [c(beta1), c(1.0 - beta1), c(beta2), c(1.0 - beta2), c(bias1), c(bias2), c(eps), c(lr)]
    if decay:
        kernel, constants = _adamw, constants + [c(1.0 - lr * weight_decay)]  # and keep, last
    else:
        kernel = _adamw_no_decay
    ranges = numba_threads.thread_ranges(flat[0].shape[0], numba_threads.MIN_NUMBERS_PER_THREAD)
    numba_threads.run(kernel, [(*(x[first:stop] for x in flat), *constants, *(x[first:stop] for x in new))
                               for first, stop in ranges])  # each thread its own slice of every array
    return tuple(x.reshape(p.shape) for x in new)
