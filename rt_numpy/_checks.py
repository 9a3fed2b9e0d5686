"""Every input check of rt_numpy, written once and called at the public boundary.

A public function checks its arguments with these helpers before it computes
anything, so that bad input raises a :class:`TypeError` or :class:`ValueError`
that names the parameter and the value received, and nothing is half-done.
The algorithm's own code (in ``kmeans``, ``attention``, ``model``, ...) can then
be read without ``if ... raise`` lines in between its steps.

Arrays may arrive inside autograd boxes (while a gradient is traced): every
helper looks through them with ``getval``.  Checks that return a value return
the plain one (an ``int``, a ``float``, the unboxed array), so callers use what
was checked.
"""
from __future__ import annotations

import math
import numbers
import os

import numpy as np
from autograd.tracer import getval

from rt_numpy import backend

FLOATS = (np.float32, np.float64)


# --------------------------------------------------------------------------- scalars
def choice(name, value, options):
    """``value`` must be one of the strings ``options``."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value


def boolean(name, value):
    """``value`` must be True or False (not 0, 1 or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def integer(name, value, low, high=None, what=""):
    """An integer in ``[low, high]`` (``high=None``: no upper bound), returned as a Python int.

    ``what`` is appended to the bound in the message, e.g. ``" (T=12)"``.
    """
    if type(value) is int and low <= value and (high is None or value <= high):  # the common case, first
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}{what}, got {value}")
    return int(value)


def real(name, value, low=None, high=None, *, low_open=False, high_open=False, allow_inf=False):
    """A real number in the given range, returned as a Python float.

    Python floats keep an array's dtype under every NumPy promotion rule; a
    NumPy float64 scalar would turn float32 arrays into float64 ones.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def generator(name, rng):
    """``rng`` must be a :class:`numpy.random.Generator` (the only source of randomness)."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{name} must be a numpy.random.Generator, got {rng!r} of type {type(rng).__name__}")
    return rng


# --------------------------------------------------------------------------- arrays
def float_array(name, x, ndim):
    """A finite float32/float64 array with ``ndim`` axes; returns it unboxed."""
    x = getval(x)
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{name} must be an array, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} axes, got shape {tuple(x.shape)}")
    _refuse_non_finite(name, x)
    return x


def _refuse_non_finite(name, x):
    """Raise a ValueError naming ``name`` and the first NaN or infinity of ``x``, if it has one."""
    xp = backend.get_array_module(x)
    finite = xp.isfinite(x)
    if not bool(finite.all()):
        where = tuple(int(i) for i in xp.argwhere(~finite)[0])  # the first bad entry, for the message
        raise ValueError(f"{name} contains NaN or infinity: got {float(x[where])} at index {where}")


def finite_arrays(arrays):
    """Every array of the dict ``label -> array`` is finite; the message names the first bad label.

    Cheap enough to run on every training step: one float64 sum per array and a
    single read of the total (one device sync on CuPy), since a NaN or an
    infinity anywhere makes the total NaN or infinite.  The entry-by-entry scan
    runs only then, to name the array and the index (or to find nothing, when
    huge finite values overflowed the sum).
    """
    if not arrays:
        return
    xp = backend.get_array_module(*arrays.values())
    with np.errstate(all="ignore"):  # inf - inf = NaN is what we look for, not a warning
        total = sum(xp.sum(a, dtype=xp.float64) for a in arrays.values())
        if math.isfinite(float(total)):
            return
    for label, a in arrays.items():
        _refuse_non_finite(label, a)


def qkv(q, k, v):
    """q, k, v: finite float arrays of one shape (B, H, T, D) and one dtype; returns the shape.

    With shared QK the caller passes ``k = q``: the same array is scanned once.
    """
    shape = dtype = None
    checked = []  # arrays already scanned for NaN
    for name, x in (("q", q), ("k", k), ("v", v)):
        x = getval(x)
        if not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.dtype not in FLOATS:
            raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
        if x.ndim != 4 or 0 in x.shape:
            raise ValueError(f"{name} must have shape (B, H, T, D) with no empty axis, got {tuple(x.shape)}")
        if shape is not None and (x.shape != shape or x.dtype != dtype):
            raise ValueError(f"q, k and v must share shape and dtype: q is {shape} {dtype}, "
                             f"{name} is {tuple(x.shape)} {x.dtype}")
        if not any(x is y for y in checked) and not bool(backend.get_array_module(x).isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinity")
        checked.append(x)
        shape, dtype = x.shape, x.dtype
    return shape


def key_mask(mask, B, T, name="key_mask"):
    """A padding mask: None, or a bool array (B, T), True at real tokens; returned unboxed.

    docs/algorithm.md#8-padding.  ``name`` is the parameter named in the messages.
    """
    if mask is None:
        return None
    mask = getval(mask)
    if not hasattr(mask, "dtype") or not hasattr(mask, "shape"):
        raise TypeError(f"{name} must be a bool array (B, T) or None, got {type(mask).__name__}")
    if mask.dtype != bool:
        raise TypeError(f"{name} must have dtype bool (True at real tokens), got {mask.dtype}")
    if tuple(mask.shape) != (B, T):
        raise ValueError(f"{name} must have shape (B, T) = {(B, T)}, got {tuple(mask.shape)}")
    return mask


def means(mu):
    """Centroids (H, K, D): finite floats, no empty axis; returns them unboxed."""
    mu = float_array("means", mu, 3)
    if 0 in mu.shape:  # K = 0 would make the Numba kernel index past its arrays
        raise ValueError(f"means must not be empty, got shape {tuple(mu.shape)}")
    return mu


def points(x, mu, name="points"):
    """Points as a tuple of streams (queries, keys, ...), each (B, H, T, D), checked against ``mu``."""
    streams = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    if not streams:
        raise ValueError(f"{name} must hold at least one array, got an empty {type(x).__name__}")
    H, K, D = getval(mu).shape
    shape = None
    for i, s in enumerate(streams):
        label = name if len(streams) == 1 else f"{name}[{i}]"
        s = float_array(label, s, 4)
        if s.dtype != getval(mu).dtype:
            raise TypeError(f"{label} has dtype {s.dtype} but means has dtype {getval(mu).dtype}")
        if s.shape[1] != H or s.shape[3] != D:
            raise ValueError(
                f"{label} of shape {tuple(s.shape)} does not fit means of shape {(H, K, D)}: "
                f"expected (B, {H}, T, {D})")
        if 0 in s.shape:
            raise ValueError(f"{label} must not be empty, got shape {tuple(s.shape)}")
        if shape is not None and s.shape != shape:
            raise ValueError(f"all streams of {name} must share one shape, got {shape} and {tuple(s.shape)}")
        shape = s.shape
    return streams


def kmeans_state(state):
    """A k-means state dict ``{"means", "counts", "sums"}``; returns ``(H, K, D)``."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict with keys means, counts, sums; got {type(state).__name__}")
    missing = {"means", "counts", "sums"} - set(state)
    if missing:
        raise ValueError(f"state is missing keys {sorted(missing)}; got keys {list(state)}")
    mu = float_array("state['means']", state["means"], 3)
    counts = float_array("state['counts']", state["counts"], 2)
    sums = float_array("state['sums']", state["sums"], 3)
    if counts.shape != mu.shape[:2] or sums.shape != mu.shape:
        raise ValueError(
            f"state shapes disagree: means {tuple(mu.shape)}, counts {tuple(counts.shape)} "
            f"(expected {tuple(mu.shape[:2])}), sums {tuple(sums.shape)}")
    if counts.dtype != mu.dtype or sums.dtype != mu.dtype:
        raise TypeError(f"state arrays must share one dtype, got means {mu.dtype}, "
                        f"counts {counts.dtype}, sums {sums.dtype}")
    if bool((counts < 0).any()):
        raise ValueError(f"state['counts'] must not be negative, got minimum {float(counts.min())}")
    return mu.shape


# --------------------------------------------------------------------------- sizes
GiB = 2 ** 30
FALLBACK_MEMORY = 16 * GiB
"""The limit where the system does not report its memory (os.sysconf is missing on Windows)."""


def memory_limit():
    """The most bytes one request may ask for: the machine's physical memory.

    Read as ``SC_PAGE_SIZE * SC_PHYS_PAGES`` from :func:`os.sysconf`; where the
    system does not report it, :data:`FALLBACK_MEMORY` (16 GiB).  A request above
    it could only swap or die, so it is refused before anything is allocated.
    """
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        return FALLBACK_MEMORY


def allocation(what, nbytes, limit=None):
    """Refuse a request whose arrays would need more than ``limit`` bytes (default :func:`memory_limit`).

    ``what`` says which request and which sizes, e.g. ``"random_batches(batch_size=10**9, seq_len=64)"``;
    the message gives the estimate in GiB.  Returns ``nbytes`` as an int.
    """
    source = "the machine's memory" if limit is None else "the limit given"
    limit = memory_limit() if limit is None else limit
    if nbytes > limit:
        raise ValueError(f"{what} would need about {nbytes / GiB:.3g} GiB, more than {source} "
                         f"({limit / GiB:.3g} GiB): make the sizes smaller")
    return int(nbytes)


# --------------------------------------------------------------------------- arguments of rt_numpy.ops
NUMERIC_KINDS = "iuf"  # integers and floats: no bools (True + True is True), strings or objects


def operand(fn, name, x, *, number=False, min_ndim=0):
    """An argument of the primitive ``fn``: an array of integers or floats with at least
    ``min_ndim`` axes, or, with ``number=True``, also a real number; returned unboxed.

    Costs a few attribute reads: primitives run hundreds of times a training step.
    """
    x = getval(x)
    dtype = getattr(x, "dtype", None)  # arrays first: they are the common case, and NumPy scalars have one too
    if dtype is None or not hasattr(x, "shape"):
        if number and isinstance(x, numbers.Real) and not isinstance(x, bool):
            return x
        raise TypeError(f"{fn}: {name} must be an array{' or a real number' if number else ''}, "
                        f"got {type(x).__name__}")
    if dtype.kind not in NUMERIC_KINDS:
        raise TypeError(f"{fn}: {name} must hold integers or floats, got dtype {dtype}")
    if x.ndim < min_ndim:
        raise ValueError(f"{fn}: {name} must have at least {min_ndim} axes, got shape {tuple(x.shape)}")
    return x


def index_array(fn, name, idx):
    """An integer index array (not bool: a bool array would select, not index); returned unboxed."""
    idx = getval(idx)
    if getattr(idx, "dtype", None) is None or not hasattr(idx, "shape"):
        raise TypeError(f"{fn}: {name} must be an integer array, got {type(idx).__name__}")
    if idx.dtype.kind not in "iu":
        raise TypeError(f"{fn}: {name} must be an integer array, got dtype {idx.dtype}")
    return idx


def axis(fn, value, ndim, name="axis"):
    """An axis of an array with ``ndim`` axes, in ``[-ndim, ndim)``; returned non-negative."""
    value = integer(f"{fn}: {name}", value, -ndim, ndim - 1, f" (an array of {ndim} axes)")
    return value % ndim


def shape_tuple(fn, name, shape):
    """A shape: a tuple (or list) of non-negative integers; returned as a tuple of ints."""
    if type(shape) is tuple and all(type(n) is int and n >= 0 for n in shape):  # the common case, first
        return shape
    if not isinstance(shape, (tuple, list)):
        raise TypeError(f"{fn}: {name} must be a tuple of integers, got {shape!r}")
    return tuple(integer(f"{fn}: {name}[{i}]", n, 0) for i, n in enumerate(shape))


def broadcastable(fn, **shapes):
    """The shapes (name -> tuple) broadcast together; returns the shape of the result."""
    first, *others = shapes.values()
    if all(tuple(s) == tuple(first) for s in others):  # the common case, 10x faster than broadcast_shapes
        return tuple(first)
    try:
        return np.broadcast_shapes(*shapes.values())
    except ValueError:
        told = ", ".join(f"{name} of shape {tuple(s)}" for name, s in shapes.items())
        raise ValueError(f"{fn}: {told} do not broadcast together") from None
