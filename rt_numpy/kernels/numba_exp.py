"""The exponential of a non-positive number, written so that LLVM vectorises it.

Softmax needs ``exp(x - max)``, whose argument is never positive.  Numba
compiles ``math.exp`` to a call into the C library, one number per call: in the
routing kernels that call was about 30% of the time (CHANGELOG.md, benchmark
history of 2026-11-28).  :func:`exp_nonpositive` is made of multiplications,
additions and one change of type only, so a loop of it runs 8 or 16 numbers per
instruction.  It is the textbook method:

1. Write ``x = k ln2 + r`` with k the integer nearest ``x / ln2``, so that
   ``|r| <= ln2 / 2``.  ``k ln2`` is subtracted in two parts (``LN2_HI``, which
   has few enough bits that ``k * LN2_HI`` is exact, then ``LN2_LO``): the
   Cody-Waite reduction, which keeps r accurate.
2. ``e^r`` from its Taylor series, to ``r^6 / 6!`` in float32 and to
   ``r^13 / 13!`` in float64: the first left-out term is below half a unit in
   the last place.
3. ``e^x = 2^k e^r``, where ``2^k`` is the float whose exponent field holds
   ``k`` plus the bias (127 or 1023) and whose other bits are 0.

Arguments below ``X_MIN`` (where ``2^k`` would no longer be a normal number)
give exactly 0, as does ``-inf`` (a masked logit).  The true values there are
below 2e-38 (float32) and 4e-307 (float64).  Accuracy, checked in
``tests/test_elementwise_kernels.py``: within 4 units in the last place of the
exact value in float32 and 2 in float64; ``exp_nonpositive(0) == 1`` exactly.

The result has the type of the argument: float32 for float32 (computed in
float32, 16 numbers per AVX-512 instruction), float64 for float64.  Under
``NUMBA_DISABLE_JIT=1`` the same formulas run as Python on NumPy scalars.

This module is a leaf: it imports numpy and numba only.  No ``fastmath``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from rt_numpy import runtime

runtime.watch_compilation()  # a line on stderr when these kernels compile (first run only)

INV_LN2 = 1.4426950408889634  # 1 / ln 2
# ln 2 = LN2_HI + LN2_LO; LN2_HI has at most 32 significant bits (float64) or 9 (float32).
LN2_HI_64, LN2_LO_64 = 0.6931471803691238, 1.9082149292705877e-10
LN2_HI_32, LN2_LO_32 = np.float32(0.693359375), np.float32(-2.12194440e-4)
X_MIN_64 = -708.0  # e^-708 = 3.3e-307: 2^k with k >= -1021 is still a normal float64
X_MIN_32 = np.float32(-87.0)  # e^-87 = 1.6e-38: 2^k with k >= -126 is still a normal float32


@njit(cache=True, error_model="numpy", inline="always")
def exp_nonpositive_float32(x):
    """``e^x`` for a float32 ``x <= 0`` (or -inf), in float32."""
    y = max(x, X_MIN_32)
    j = np.int32(np.float32(0.5) - y * np.float32(INV_LN2))  # j = -k >= 0, rounded by truncation
    k = -np.float32(j)
    r = (y - k * LN2_HI_32) - k * LN2_LO_32  # |r| <= ln2 / 2
    p = np.float32(1.0 / 720.0)  # Horner: 1 + r + r^2/2! + ... + r^6/6!
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    two_to_k = np.int32((127 - j) << 23).view(np.float32)  # exponent field k + 127, mantissa 0
    return p * two_to_k if x >= X_MIN_32 else np.float32(0.0)


@njit(cache=True, error_model="numpy", inline="always")
def exp_nonpositive_float64(x):
    """``e^x`` for a float64 ``x <= 0`` (or -inf), in float64."""
    y = max(x, X_MIN_64)
    j = np.int64(0.5 - y * INV_LN2)  # j = -k >= 0, rounded by truncation
    k = -float(j)
    r = (y - k * LN2_HI_64) - k * LN2_LO_64  # |r| <= ln2 / 2
    p = 1.0 / 6227020800.0  # Horner: 1 + r + r^2/2! + ... + r^13/13!
    p = p * r + 1.0 / 479001600.0
    p = p * r + 1.0 / 39916800.0
    p = p * r + 1.0 / 3628800.0
    p = p * r + 1.0 / 362880.0
    p = p * r + 1.0 / 40320.0
    p = p * r + 1.0 / 5040.0
    p = p * r + 1.0 / 720.0
    p = p * r + 1.0 / 120.0
    p = p * r + 1.0 / 24.0
    p = p * r + 1.0 / 6.0
    p = p * r + 0.5
    p = p * r + 1.0
    p = p * r + 1.0
    two_to_k = np.int64((1023 - j) << 52).view(np.float64)  # exponent field k + 1023, mantissa 0
    return p * two_to_k if x >= X_MIN_64 else 0.0


def exp_nonpositive(x):
    """``e^x`` for ``x <= 0`` (or -inf), in the type of x (float32 or float64).

    In compiled code the version for x's type is chosen when the caller is
    compiled (the ``overload`` below), and nothing is checked there (the
    callers pass ``logit - max``); called from Python, here, and a positive x
    raises ValueError.  ``exp_nonpositive_float32`` / ``_float64`` do not check
    either: for x > 0 they return a wrong number.
    """
    if x > 0:
        raise ValueError(f"x must be <= 0 (or -inf), got {x!r}")
    if isinstance(x, np.float32):
        return exp_nonpositive_float32(x)
    return exp_nonpositive_float64(np.float64(x))


@overload(exp_nonpositive, inline="always")
def _exp_nonpositive_compiled(x):
    if x == types.float32:
        return lambda x: exp_nonpositive_float32(x)
    if x == types.float64:
        return lambda x: exp_nonpositive_float64(x)
    return None  # other types: no implementation, numba reports a typing error
