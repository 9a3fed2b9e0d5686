"""Differentiable primitives: each forward pass beside its derivative.

Every operation the model and the attention layers differentiate through is
defined here as a HIPS autograd primitive (``@primitive`` + ``defvjp``).  Read
each one as a small lesson: the forward formula, then its vector-Jacobian
product (VJP), i.e. how an upstream gradient ``g`` of the output becomes the
gradient of the inputs.

Two rules make these primitives work on NumPy *and* CuPy arrays, to any order:

1. **Array-module generic.**  Forward passes call only ``xp = get_array_module(x)``
   functions, never ``numpy`` and never ``autograd.numpy`` (whose built-in VJPs
   create NumPy arrays and so fail on CuPy values; docs/design.md#differentiation).
2. **VJPs are built from primitives.**  Inside a VJP, anything that depends on
   a differentiable value (``g``, the inputs, the output ``ans``) is computed
   with the primitives of this module, so autograd can differentiate the VJP
   itself (second-order gradients, Hessian-vector products).  Plain ``xp``
   calls in a VJP touch only constants: masks, indices, shapes.  Adjoint pairs
   call each other: ``gather_rows`` <-> ``scatter_add_rows``, ``sum`` <->
   ``broadcast_to``, ``slice_axis`` <-> ``pad_axis``, ``split_heads`` <->
   ``merge_heads``.

Arguments that autograd should differentiate must be passed *positionally*
(autograd only looks for boxed values among positional arguments); constants
such as ``axis``, ``mask``, ``eps`` may be keywords.

Each public function checks its arguments first (:mod:`rt_numpy._checks`,
a few attribute reads), so that a wrong shape, dtype or size raises a
TypeError or ValueError naming the function, the parameter and the value,
not a NumPy broadcasting message from deep inside.

A few functions are compositions of primitives rather than primitives
(``mean``, ``layer_norm``, ``l2_normalize``, ``concatenate``); their gradients
come from the primitives they call.  ``stop_gradient`` cuts the graph.

Letters in shapes follow docs/algorithm.md#alphabet: B batch, T sequence, C width, H heads,
D head dim, V vocabulary, M gathered rows.
"""
from __future__ import annotations

import math

from autograd.extend import defvjp, defvjp_argnum, primitive
from autograd.tracer import getval, isbox

from . import _checks, backend
from .backend import get_array_module, kernel_impl

__all__ = [
    "add", "subtract", "multiply", "divide", "scale", "unbroadcast",
    "sum", "mean", "broadcast_to",
    "exp", "log", "sqrt", "square", "tanh", "gelu", "gelu_derivative",
    "matmul", "reshape", "transpose", "split_heads", "merge_heads",
    "concatenate", "slice_axis", "pad_axis",
    "softmax", "masked_fill", "cross_entropy",
    "layer_norm", "layer_norm_free", "l2_normalize",
    "gather_rows", "scatter_add_rows",
    "stop_gradient",
]


def _shape(a):
    """Shape of an array, a boxed array or a Python scalar (``()``)."""
    return getattr(a, "shape", ())


def _size(a):
    """Number of entries of an array or a scalar (1)."""
    return math.prod(_shape(a))


def _const(c, like):
    """The constant ``c`` as a scalar of ``like``'s dtype.

    NumPy 2 keeps ``float32_array * 0.5`` in float32, but a NumPy float64 scalar
    such as ``1 / np.sqrt(D)`` would promote the product to float64.
    """
    dtype = getattr(like, "dtype", None)
    return dtype.type(c) if dtype is not None and dtype.kind == "f" else c


def _defvjp_keeping_impl(fun, vjpmaker):
    """``defvjp(fun, vjpmaker)``, the VJP running under the implementation of its forward pass.

    autograd calls a VJP maker during the forward pass but the VJP itself
    later, after the public function that chose ``impl`` has returned.  The
    VJPs that call a primitive with a kernel (gelu's, layer norm's, gather's)
    are registered this way, so ``impl="ref"`` reaches the backward pass too
    (docs/design.md#choosing-an-implementation).
    """
    def maker(ans, *args, **kwargs):
        impl, vjp = backend.active_impl(get_array_module(ans)), vjpmaker(ans, *args, **kwargs)

        def vjp_in_impl(g):
            with backend.use_impl(impl, get_array_module(ans)):
                return vjp(g)
        return vjp_in_impl

    defvjp(fun, maker)


# --------------------------------------------------------------------------
# Reductions and broadcasting: sum <-> broadcast_to are an adjoint pair
# --------------------------------------------------------------------------

@primitive
def sum(x, axis=None, keepdims=False):  # noqa: A001 (the name every tutorial uses)
    """Sum over ``axis`` (None: all axes), like ``xp.sum``.

    The derivative of a sum copies the gradient back to every summed entry,
    i.e. broadcasts it: the VJP is :func:`broadcast_to`.
    """
    _checks.operand("sum", "x", x)
    _axes("sum", axis, x.ndim)
    return get_array_module(x).sum(x, axis=axis, keepdims=keepdims)


def _axes(fn, axis, ndim):
    """``axis`` of a reduction: None (every axis), an int or a tuple of ints; returned as a tuple."""
    if axis is None:
        return tuple(range(ndim))
    axes = tuple(_checks.axis(fn, a, ndim) for a in (axis if isinstance(axis, tuple) else (axis,)))
    if len(set(axes)) != len(axes):
        raise ValueError(f"{fn}: axis must not repeat an axis, got {axis}")
    return axes


def _sum_vjp(ans, x, axis=None, keepdims=False):
    shape = _shape(x)
    if axis is None:
        axes = range(len(shape))
    else:
        axes = [a % len(shape) for a in (axis if isinstance(axis, tuple) else (axis,))]
    kept = tuple(1 if i in axes else n for i, n in enumerate(shape))  # shape with keepdims=True
    return lambda g: broadcast_to(reshape(g, kept), shape)  # (kept) -> x.shape


defvjp(sum, _sum_vjp)


@primitive
def broadcast_to(x, shape):
    """Broadcast ``x`` to ``shape``, as a new writable array.

    Every output entry is a copy of an input entry, so the gradient of an
    input entry is the sum of its copies' gradients: :func:`unbroadcast`.
    A copy rather than ``xp.broadcast_to``'s read-only view, because this is
    what :func:`sum`'s VJP hands back: a caller (an optimiser) may update a
    gradient in place.
    """
    _checks.operand("broadcast_to", "x", x)
    shape = _checks.shape_tuple("broadcast_to", "shape", shape)
    if _checks.broadcastable("broadcast_to", x=x.shape, shape=shape) != shape:
        raise ValueError(f"broadcast_to: x of shape {x.shape} does not broadcast to shape {shape}")
    xp = get_array_module(x)
    return xp.array(xp.broadcast_to(x, shape))


defvjp(broadcast_to, lambda ans, x, shape: lambda g: unbroadcast(g, _shape(x)))


def unbroadcast(g, shape):
    """Sum a gradient ``g`` back to the ``shape`` of an input that was broadcast.

    Broadcasting prepends axes and stretches axes of length 1; the adjoint sums
    over exactly those axes.  Built from :func:`sum` and :func:`reshape`, so it
    is differentiable again.

    Parameters
    ----------
    g : array, shape (*S)
        Gradient of a broadcast result.
    shape : tuple of int
        Shape of the input before broadcasting (broadcastable to ``S``).

    Returns
    -------
    array, shape ``shape``
    """
    shape = _checks.shape_tuple("unbroadcast", "shape", shape)
    if _shape(g) == shape:
        return g
    if _checks.broadcastable("unbroadcast", g=_shape(g), shape=shape) != _shape(g):
        raise ValueError(f"unbroadcast: shape {shape} does not broadcast to the shape of g, {_shape(g)}")
    lead = g.ndim - len(shape)  # axes that broadcasting prepended
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1)
    return reshape(sum(g, axis=tuple(range(lead)) + stretched), shape)  # (*S) -> shape


def mean(x, axis=None, keepdims=False):
    """Mean over ``axis`` (None: all axes): ``sum(x, axis) / count``.

    A composition of :func:`sum` and :func:`scale`; no VJP of its own.
    """
    x_value = _checks.operand("mean", "x", x)
    count = math.prod(x_value.shape[a] for a in _axes("mean", axis, x_value.ndim))
    if count == 0:
        raise ValueError(f"mean: no entries to average over axis={axis} of x of shape {x_value.shape}")
    return scale(sum(x, axis, keepdims), 1.0 / count)


# --------------------------------------------------------------------------
# Broadcasting arithmetic
# --------------------------------------------------------------------------

def _binary(fn, a, b):
    """Arguments of a broadcasting arithmetic primitive: arrays or numbers whose shapes broadcast."""
    _checks.operand(fn, "a", a, number=True)
    _checks.operand(fn, "b", b, number=True)
    _checks.broadcastable(fn, a=_shape(a), b=_shape(b))


@primitive
def add(a, b):
    """``a + b`` with broadcasting.  d/da = d/db = 1, summed back to each shape."""
    _binary("add", a, b)
    return a + b


defvjp(add,
       lambda ans, a, b: lambda g: unbroadcast(g, _shape(a)),
       lambda ans, a, b: lambda g: unbroadcast(g, _shape(b)))


@primitive
def subtract(a, b):
    """``a - b`` with broadcasting.  d/da = 1, d/db = -1."""
    _binary("subtract", a, b)
    return a - b


defvjp(subtract,
       lambda ans, a, b: lambda g: unbroadcast(g, _shape(a)),
       lambda ans, a, b: lambda g: unbroadcast(scale(g, -1.0), _shape(b)))


@primitive
def multiply(a, b):
    """``a * b`` with broadcasting.  d/da = b, d/db = a."""
    _binary("multiply", a, b)
    return a * b


defvjp(multiply,
       lambda ans, a, b: lambda g: unbroadcast(multiply(g, b), _shape(a)),
       lambda ans, a, b: lambda g: unbroadcast(multiply(g, a), _shape(b)))


@primitive
def divide(a, b):
    """``a / b`` with broadcasting.  d/da = 1/b, d/db = -a/b² = -(a/b)/b."""
    _binary("divide", a, b)
    return a / b


defvjp(divide,
       lambda ans, a, b: lambda g: unbroadcast(divide(g, b), _shape(a)),
       # -g * ans / b reuses the output instead of squaring b.
       lambda ans, a, b: lambda g: unbroadcast(scale(divide(multiply(g, ans), b), -1.0), _shape(b)))


@primitive
def scale(x, c):
    """``x * c`` for a constant scalar ``c`` (Python or NumPy number).

    ``c`` gets no gradient and is cast to ``x``'s dtype, so float32 stays
    float32 even for ``c = 1 / np.sqrt(D)`` (a NumPy float64).
    """
    _checks.operand("scale", "x", x, number=True)
    if isinstance(c, bool) or not isinstance(c, (int, float)) and getattr(c, "shape", None) != ():
        raise TypeError(f"scale: c must be a constant number, got {type(c).__name__}")
    return x * _const(c, x)


defvjp(scale, lambda ans, x, c: lambda g: scale(g, c))


# --------------------------------------------------------------------------
# Elementwise functions: each derivative written with the output where cheaper
# --------------------------------------------------------------------------

@primitive
def exp(x):
    """``e**x``.  d/dx = e**x, the output itself."""
    _checks.operand("exp", "x", x, number=True)
    return get_array_module(x).exp(x)


defvjp(exp, lambda ans, x: lambda g: multiply(g, ans))


@primitive
def log(x):
    """Natural logarithm.  d/dx = 1/x."""
    _checks.operand("log", "x", x, number=True)
    return get_array_module(x).log(x)


defvjp(log, lambda ans, x: lambda g: divide(g, x))


@primitive
def sqrt(x):
    """Square root.  d/dx = 1 / (2 sqrt(x)), from the output."""
    _checks.operand("sqrt", "x", x, number=True)
    return get_array_module(x).sqrt(x)


defvjp(sqrt, lambda ans, x: lambda g: divide(g, scale(ans, 2.0)))


@primitive
def square(x):
    """``x**2``.  d/dx = 2x."""
    _checks.operand("square", "x", x, number=True)
    return x * x


defvjp(square, lambda ans, x: lambda g: multiply(g, scale(x, 2.0)))


@primitive
def tanh(x):
    """Hyperbolic tangent.  d/dx = 1 - tanh(x)², from the output."""
    _checks.operand("tanh", "x", x, number=True)
    return get_array_module(x).tanh(x)


defvjp(tanh, lambda ans, x: lambda g: multiply(g, subtract(1.0, square(ans))))


_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


@primitive
def gelu(x):
    """GELU, the tanh approximation used by GPT-2 and BERT.

    ``gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))``, not the exact
    ``x Phi(x)`` (the two differ by < 1e-3).

    Notes
    -----
    docs/algorithm.md#4-layers-and-heads (feed-forward).  The VJP is ``g * gelu_derivative(x)``.  On
    NumPy arrays with Numba, one fused pass
    (:mod:`rt_numpy.kernels.numba_elementwise`) replaces the formula below.
    """
    _checks.operand("gelu", "x", x, number=True)
    if kernel_impl(x) != "numba":
        xp = get_array_module(x)
        return 0.5 * x * (1.0 + xp.tanh(_GELU_C * (x + _GELU_A * x * x * x)))
    from rt_numpy.kernels import numba_elementwise

    return numba_elementwise.gelu(x)


_defvjp_keeping_impl(gelu, lambda ans, x: lambda g: multiply(g, gelu_derivative(x)))


@primitive
def gelu_derivative(x):
    """d gelu / dx, elementwise.

    With ``u = c (x + a x³)`` and ``t = tanh(u)``:
    ``0.5 (1 + t) + 0.5 x (1 - t²) c (1 + 3 a x²)``.  A primitive of its own
    (one fused pass on NumPy arrays with Numba), whose VJP is the second
    derivative ``(1 - t²) (u' + 0.5 x (u'' - 2 t u'²))`` with
    ``u' = c (1 + 3 a x²)`` and ``u'' = 6 a c x``, written with primitives so
    that every higher derivative works too.
    """
    _checks.operand("gelu_derivative", "x", x, number=True)
    if kernel_impl(x) != "numba":
        xp = get_array_module(x)
        x2 = x * x
        t = xp.tanh(_GELU_C * (x + _GELU_A * x * x2))
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * (_GELU_C * (1.0 + 3.0 * _GELU_A * x2))
    from rt_numpy.kernels import numba_elementwise

    return numba_elementwise.gelu_derivative(x)


def _gelu_derivative_vjp(ans, x):
    def vjp(g):
        x2 = square(x)
        t = tanh(scale(add(x, scale(multiply(x, x2), _GELU_A)), _GELU_C))  # t = tanh(c (x + a x³))
        du = scale(add(scale(x2, 3.0 * _GELU_A), 1.0), _GELU_C)  # u' = c (1 + 3 a x²)
        ddu = scale(x, 6.0 * _GELU_A * _GELU_C)  # u'' = 6 a c x
        inner = add(du, scale(multiply(x, subtract(ddu, scale(multiply(t, square(du)), 2.0))), 0.5))
        return multiply(g, multiply(subtract(1.0, square(t)), inner))
    return vjp


defvjp(gelu_derivative, _gelu_derivative_vjp)


# --------------------------------------------------------------------------
# Matrix product and reshapes
# --------------------------------------------------------------------------

def _swap_last(x):
    """Swap the last two axes (a matrix transpose on every batch element)."""
    axes = list(range(x.ndim))
    axes[-2], axes[-1] = axes[-1], axes[-2]
    return transpose(x, tuple(axes))


@primitive
def matmul(a, b):
    """Batched matrix product ``a @ b``, broadcasting over leading axes.

    Parameters
    ----------
    a : array, shape (..., M, K)
    b : array, shape (..., K, N)
        Both at least 2-D; leading axes broadcast as in ``xp.matmul``.

    Returns
    -------
    array, shape (..., M, N)

    Notes
    -----
    For ``y = a b``: ``da = g bᵀ`` and ``db = aᵀ g``, then summed over the
    leading axes that were broadcast.
    """
    _checks.operand("matmul", "a", a, min_ndim=2)
    _checks.operand("matmul", "b", b, min_ndim=2)
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"matmul: a of shape {a.shape} and b of shape {b.shape} do not chain: "
                         f"a.shape[-1]={a.shape[-1]} != b.shape[-2]={b.shape[-2]}")
    _checks.broadcastable("matmul", a=a.shape[:-2], b=b.shape[:-2])  # the batch axes
    return get_array_module(a, b).matmul(a, b)


def _matmul_vjp_a(ans, a, b):
    return lambda g: unbroadcast(matmul(g, _swap_last(b)), a.shape)  # (..., M, N) @ (..., N, K) -> (..., M, K)


def _matmul_vjp_b(ans, a, b):
    def vjp(g):
        if b.ndim == 2 and a.ndim > 2:
            # A weight shared by every batch row, e.g. (B, T, C) @ (C, D): fold the
            # batch axes into rows and do one (K, B·T) @ (B·T, N) product instead of
            # B small ones followed by a sum.
            a2 = reshape(a, (-1, a.shape[-1]))  # (..., M, K) -> (R, K)
            g2 = reshape(g, (-1, g.shape[-1]))  # (..., M, N) -> (R, N)
            return matmul(_swap_last(a2), g2)  # (K, R) @ (R, N) -> (K, N)
        return unbroadcast(matmul(_swap_last(a), g), b.shape)  # (..., K, M) @ (..., M, N) -> (..., K, N)
    return vjp


defvjp(matmul, _matmul_vjp_a, _matmul_vjp_b)


@primitive
def reshape(x, shape):
    """``xp.reshape(x, shape)``.  The VJP reshapes the gradient back."""
    _checks.operand("reshape", "x", x, number=True)
    sizes = (shape,) if isinstance(shape, int) else shape
    if (not isinstance(sizes, (tuple, list)) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= -1
                                                        for n in sizes) or list(sizes).count(-1) > 1):
        raise TypeError(f"reshape: shape must be an int or a tuple of ints >= 0 (one may be -1), got {shape!r}")
    known = math.prod(n for n in sizes if n != -1)
    if (known != _size(x)) if -1 not in sizes else (known == 0 or _size(x) % known):
        raise ValueError(f"reshape: x of shape {_shape(x)} ({_size(x)} entries) cannot take shape {tuple(sizes)}")
    return get_array_module(x).reshape(x, shape)


defvjp(reshape, lambda ans, x, shape: lambda g: reshape(g, _shape(x)))


@primitive
def transpose(x, axes=None):
    """Permute axes (None reverses them).  The VJP applies the inverse permutation."""
    _checks.operand("transpose", "x", x)
    if axes is not None and (not isinstance(axes, (tuple, list)) or len(axes) != x.ndim or sorted(
            _checks.axis("transpose", a, x.ndim, "axes") for a in axes) != list(range(x.ndim))):
        raise ValueError(f"transpose: axes must be a permutation of the {x.ndim} axes of x, got {axes!r}")
    return get_array_module(x).transpose(x, axes)


def _transpose_vjp(ans, x, axes=None):
    n = x.ndim
    axes = tuple(reversed(range(n))) if axes is None else tuple(a % n for a in axes)
    inverse = [0] * n
    for i, a in enumerate(axes):
        inverse[a] = i  # output axis i came from input axis a
    return lambda g: transpose(g, tuple(inverse))


defvjp(transpose, _transpose_vjp)


@primitive
def split_heads(x, H):
    """Cut the channels into ``H`` heads and move the head axis forward.

    Parameters
    ----------
    x : array, shape (B, T, C)
    H : int
        Number of heads; must divide C.

    Returns
    -------
    array, shape (B, H, T, D) with D = C // H
        Head ``h`` holds channels ``h*D : (h+1)*D``.
    """
    _checks.operand("split_heads", "x", x)
    if x.ndim != 3:
        raise ValueError(f"split_heads: x must have shape (B, T, C), got {x.shape}")
    B, T, C = x.shape
    H = _checks.integer("split_heads: H", H, 1)
    if C % H:
        raise ValueError(f"split_heads: H must be a positive divisor of C={C}, got H={H}")
    xp = get_array_module(x)
    return xp.transpose(xp.reshape(x, (B, T, H, C // H)), (0, 2, 1, 3))  # (B, T, H, D) -> (B, H, T, D)


@primitive
def merge_heads(x):
    """Inverse of :func:`split_heads`: (B, H, T, D) -> (B, T, C) with C = H·D."""
    _checks.operand("merge_heads", "x", x)
    if x.ndim != 4:
        raise ValueError(f"merge_heads: x must have shape (B, H, T, D), got {x.shape}")
    B, H, T, D = x.shape
    xp = get_array_module(x)
    return xp.reshape(xp.transpose(x, (0, 2, 1, 3)), (B, T, H * D))  # (B, T, H, D) -> (B, T, C)


# The two are inverse permutations of the same numbers, hence each other's VJP.
defvjp(split_heads, lambda ans, x, H: lambda g: merge_heads(g))
defvjp(merge_heads, lambda ans, x: lambda g: split_heads(g, x.shape[1]))


@primitive
def slice_axis(x, start, stop, axis=-1):
    """``x[..., start:stop, ...]`` along ``axis`` (non-negative ``start <= stop``).

    The VJP puts the gradient back in place and zeros elsewhere: :func:`pad_axis`.
    """
    _checks.operand("slice_axis", "x", x, min_ndim=1)
    axis = _checks.axis("slice_axis", axis, x.ndim)
    n = x.shape[axis]
    start = _checks.integer("slice_axis: start", start, 0, n, f" (x.shape[{axis}]={n})")
    stop = _checks.integer("slice_axis: stop", stop, start, n, f" (start={start}, x.shape[{axis}]={n})")
    index = [slice(None)] * x.ndim
    index[axis] = slice(start, stop)
    return x[tuple(index)]


defvjp(slice_axis, lambda ans, x, start, stop, axis=-1:
       lambda g: pad_axis(g, start, x.shape[axis] - stop, axis))


@primitive
def pad_axis(x, before, after, axis=-1):
    """Pad ``x`` with ``before`` zeros in front and ``after`` zeros behind along ``axis``.

    The VJP keeps the gradient of the original entries: :func:`slice_axis`.
    """
    _checks.operand("pad_axis", "x", x, min_ndim=1)
    axis = _checks.axis("pad_axis", axis, x.ndim)
    before, after = _checks.integer("pad_axis: before", before, 0), _checks.integer("pad_axis: after", after, 0)
    xp = get_array_module(x)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (before, after)
    return xp.pad(x, widths)


defvjp(pad_axis, lambda ans, x, before, after, axis=-1:
       lambda g: slice_axis(g, before, before + x.shape[axis], axis))


@primitive
def _concatenate(axis, *xs):
    return get_array_module(*xs).concatenate(xs, axis=axis)


def _concatenate_vjp(argnum, ans, args, kwargs):
    axis, xs = args[0], args[1:]
    start = 0
    for x in xs[: argnum - 1]:
        start += x.shape[axis]
    stop = start + xs[argnum - 1].shape[axis]
    return lambda g: slice_axis(g, start, stop, axis)  # this input's part of the gradient


defvjp_argnum(_concatenate, _concatenate_vjp)


def concatenate(xs, axis=-1):
    """Join a sequence of arrays along ``axis``; each input's gradient is its slice of ``g``."""
    if not isinstance(xs, (list, tuple)) or not xs:
        raise TypeError(f"concatenate: xs must be a non-empty list or tuple of arrays, got {xs!r}")
    first = _checks.operand("concatenate", "xs[0]", xs[0], min_ndim=1)
    axis = _checks.axis("concatenate", axis, first.ndim)
    for i, x in enumerate(xs):
        x = _checks.operand("concatenate", f"xs[{i}]", x)
        if x.ndim != first.ndim or any(m != n for a, (m, n) in enumerate(zip(x.shape, first.shape)) if a != axis):
            raise ValueError(f"concatenate: xs[{i}] of shape {x.shape} does not fit xs[0] of shape {first.shape} "
                             f"along axis={axis}")
    return _concatenate(axis, *xs)


# --------------------------------------------------------------------------
# Softmax, masking and the loss
# --------------------------------------------------------------------------

def _check_mask(mask, shape, name="mask"):
    if getattr(mask, "dtype", None) is None or not hasattr(mask, "shape") or mask.dtype.kind != "b":
        raise TypeError(f"{name} must be a boolean array (True = visible), got {type(mask).__name__} "
                        f"with dtype {getattr(mask, 'dtype', None)}")
    # Broadcastable to `shape` without growing it (right-aligned, each dim equal or 1).
    if mask.ndim > len(shape) or any(m not in (1, n) for m, n in zip(mask.shape[::-1], shape[::-1])):
        raise ValueError(f"{name} of shape {mask.shape} does not broadcast to {tuple(shape)}")


@primitive
def softmax(logits, mask=None, axis=-1):
    """Masked, numerically stable softmax along ``axis``.

    Parameters
    ----------
    logits : array, shape (..., N)
    mask : bool array broadcastable to ``logits.shape``, optional
        True = visible.  Masked logits are treated as ``-inf``: whatever value
        they hold (even inf or NaN), their probability is exactly 0 and their
        gradient exactly 0.
    axis : int
        The axis that sums to one.

    Returns
    -------
    array, same shape as ``logits``
        Rows sum to 1; a row with no visible entry is all zeros (not NaN) and
        passes no gradient (docs/algorithm.md#14-attention-inside-a-cluster: such a query outputs 0).

    Notes
    -----
    The row maximum over visible entries is subtracted before ``exp`` so that
    nothing overflows.  With ``p = softmax(z)``: ``dz = p (g - Σ g p)``.
    """
    _checks.operand("softmax", "logits", logits, min_ndim=1)
    axis = _checks.axis("softmax", axis, logits.ndim)
    if logits.shape[axis] == 0:
        raise ValueError(f"softmax: logits of shape {logits.shape} have nothing to normalise along axis={axis}")
    xp = get_array_module(logits)
    if mask is None:
        z = logits - xp.max(logits, axis=axis, keepdims=True)
        e = xp.exp(z)
        return e / xp.sum(e, axis=axis, keepdims=True)
    _check_mask(mask, logits.shape)
    mask = xp.broadcast_to(mask, logits.shape)
    e = xp.where(mask, logits, -xp.inf)  # a new array, worked on in place below
    m = xp.max(e, axis=axis, keepdims=True)  # (..., 1); -inf on a row with nothing visible
    m = xp.where(xp.isfinite(m), m, 0)  # keep -inf - (-inf) = NaN out of empty rows
    e -= m
    xp.exp(e, out=e)  # masked entries: exp(-inf) = 0 exactly
    s = xp.sum(e, axis=axis, keepdims=True)
    e /= xp.where(s > 0, s, 1)  # empty rows: 0 / 1 = 0
    return e


def _softmax_vjp(ans, logits, mask=None, axis=-1):
    # Uses only the output, so masked entries (p = 0) get exactly 0 gradient.
    return lambda g: multiply(ans, subtract(g, sum(multiply(g, ans), axis, True)))


defvjp(softmax, _softmax_vjp)


@primitive
def masked_fill(x, mask, value):
    """Replace the entries of ``x`` where ``mask`` is True by the constant ``value``.

    Parameters
    ----------
    x : array, shape (*S)
    mask : bool array broadcastable to ``S``
    value : float
        E.g. ``-5e4`` for the "last resort" self logit of docs/algorithm.md#14-attention-inside-a-cluster.

    Returns
    -------
    array, shape (*S), dtype of ``x``
        Filled entries no longer depend on ``x``: their gradient is 0, so the VJP
        is the same fill with 0.
    """
    _checks.operand("masked_fill", "x", x)
    _check_mask(mask, x.shape)
    _checks.real("masked_fill: value", value, allow_inf=True)
    xp = get_array_module(x)
    return xp.where(mask, xp.asarray(value, dtype=x.dtype), x)


defvjp(masked_fill, lambda ans, x, mask, value: lambda g: masked_fill(g, mask, 0.0))


def _check_index(idx, n, name):
    """Integer dtype and every value in [0, n) (a wrong index would read another batch row)."""
    if getattr(idx, "dtype", None) is None or idx.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {getattr(idx, 'dtype', None)}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"{name} must lie in [0, {n}), got values in "
                         f"[{int(idx.min())}, {int(idx.max())}]")


@primitive
def cross_entropy(logits, targets):
    """Mean negative log-likelihood of integer ``targets`` under ``softmax(logits)``.

    Parameters
    ----------
    logits : array, shape (..., V)
    targets : int array, shape (...)
        Values in [0, V).  No gradient.

    Returns
    -------
    scalar
        ``mean(logsumexp(logits) - logits[target])`` over the N = targets.size rows.

    Notes
    -----
    log-softmax is computed as ``z - log Σ exp z`` with ``z = logits - max``,
    which never overflows.  The VJP is the classic ``(softmax - onehot) / N``.
    """
    _checks.operand("cross_entropy", "logits", logits, min_ndim=1)
    _checks.index_array("cross_entropy", "targets", targets)
    xp = get_array_module(logits)
    V = logits.shape[-1]
    if V == 0 or targets.size == 0:
        raise ValueError(f"cross_entropy: needs at least one target and one class, got logits of shape {logits.shape}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets shape must be logits.shape[:-1]={logits.shape[:-1]}, got {targets.shape}")
    _check_index(targets, V, "targets")
    z = logits - xp.max(logits, axis=-1, keepdims=True)
    logp = z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))  # (..., V)
    logp = xp.reshape(logp, (-1, V))  # (N, V)
    picked = logp[xp.arange(logp.shape[0]), xp.reshape(targets, (-1,))]  # (N,)
    return -xp.mean(picked)


def _cross_entropy_vjp(ans, logits, targets):
    xp = get_array_module(logits)
    onehot = (xp.arange(logits.shape[-1]) == targets[..., None]).astype(logits.dtype)  # (..., V)
    inv_n = 1.0 / max(targets.size, 1)
    # softmax(logits) is the primitive above, so this VJP is differentiable again.
    return lambda g: scale(multiply(g, subtract(softmax(logits), onehot)), inv_n)


defvjp(cross_entropy, _cross_entropy_vjp)


# --------------------------------------------------------------------------
# Normalisations over the last axis
# --------------------------------------------------------------------------

@primitive
def layer_norm_free(x, eps=1e-5):
    """Parameter-free layer norm over the last axis: ``(x - mean) / sqrt(var + eps)``.

    Parameters
    ----------
    x : array, shape (..., D)
    eps : float
        Added to the population variance (divide by D, not D - 1).  The model's
        layer norms use 1e-5; routing normalisation uses 1e-6 (docs/algorithm.md#11-normalise).

    Returns
    -------
    array, shape (..., D)
        Each vector has mean 0 and norm close to sqrt(D).

    Notes
    -----
    With ``y`` the output and ``s = sqrt(var + eps)``:
    ``dx = (g - mean(g) - y · mean(g y)) / s`` (all means over the last axis).
    On NumPy arrays with Numba, :mod:`rt_numpy.kernels.numba_norm` computes
    the value, and the gradient when it is not itself being differentiated,
    one row at a time.
    """
    _checks.operand("layer_norm_free", "x", x, min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"layer_norm_free: x of shape {x.shape} has no entries to normalise in its last axis")
    _checks.real("layer_norm_free: eps", eps, 0.0, low_open=True)
    if kernel_impl(x) != "numba":
        xp = get_array_module(x)
        xc = x - xp.mean(x, axis=-1, keepdims=True)  # a new array, divided in place below
        var = xp.mean(xc * xc, axis=-1, keepdims=True)  # (..., 1), population variance
        xc /= xp.sqrt(var + eps)
        return xc
    from rt_numpy.kernels import numba_norm  # one pass per row instead of four over the array

    return numba_norm.layer_norm(x, eps)


def _layer_norm_free_vjp(ans, x, eps=1e-5):
    def vjp(g):
        if isbox(g) or isbox(x) or kernel_impl(x, ans, g) != "numba":
            # s recomputed with primitives so that the VJP depends on x differentiably.
            xc = subtract(x, mean(x, -1, True))
            s = sqrt(add(mean(square(xc), -1, True), eps))  # (..., 1)
            gy = mean(multiply(g, ans), -1, True)  # (..., 1)
            return divide(subtract(subtract(g, mean(g, -1, True)), multiply(ans, gy)), s)
        # A first-order gradient (nothing traces it): one fused pass per row.
        from rt_numpy.kernels import numba_norm

        return numba_norm.layer_norm_grad(x, ans, g, eps)
    return vjp


_defvjp_keeping_impl(layer_norm_free, _layer_norm_free_vjp)


def layer_norm(x, gamma=None, beta=None, eps=1e-5):
    """Layer norm over the last axis, ``layer_norm_free(x, eps) * gamma + beta``.

    Parameters
    ----------
    x : array, shape (..., C)
    gamma, beta : array, shape (C,), optional
        Learned gain and bias; None leaves that step out (parameter-free).
    eps : float

    Returns
    -------
    array, shape (..., C)
    """
    C = _shape(_checks.operand("layer_norm", "x", x, min_ndim=1))[-1]
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is not None and _shape(_checks.operand("layer_norm", name, p)) != (C,):
            raise ValueError(f"layer_norm: {name} must have shape (C,) = ({C},) for x of shape {_shape(x)}, "
                             f"got {_shape(p)}")
    y = layer_norm_free(x, eps)
    if gamma is not None:
        y = multiply(y, gamma)  # (..., C) * (C,)
    if beta is not None:
        y = add(y, beta)
    return y


@primitive
def _clamped_norm(x, eps):
    """``max(||x||, eps)`` over the last axis, shape (..., 1)."""
    xp = get_array_module(x)
    return xp.maximum(xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True)), eps)  # (..., D) -> (..., 1)


def _clamped_norm_vjp(ans, x, eps):
    # d||x||/dx = x / ||x|| where the norm is above eps; the clamp is flat below it.
    active = (getval(ans) > eps).astype(x.dtype)  # (..., 1), a constant
    return lambda g: multiply(g, divide(multiply(x, active), ans))  # ans >= eps > 0: no 0/0


defvjp(_clamped_norm, _clamped_norm_vjp)


def l2_normalize(x, eps=1e-12):
    """Unit vectors over the last axis: ``x / max(||x||, eps)`` (as ``torch.nn.functional.normalize``).

    Parameters
    ----------
    x : array, shape (..., D)
    eps : float > 0
        A zero vector maps to zero, with gradient ``g / eps``.

    Returns
    -------
    array, shape (..., D)

    Notes
    -----
    docs/algorithm.md#11-normalise, ``norm="l2"``.  Composed of :func:`divide` and a
    clamped-norm primitive; above ``eps`` the gradient is ``(g - y (g·y)) / ||x||``.
    """
    _checks.operand("l2_normalize", "x", x, min_ndim=1)
    _checks.real("l2_normalize: eps", eps, 0.0, low_open=True)
    return divide(x, _clamped_norm(x, eps))  # (..., D) / (..., 1)


# --------------------------------------------------------------------------
# Gather and scatter-add of rows: each is the other's VJP
# --------------------------------------------------------------------------

def _flat_rows(idx, n, x_lead, name):
    """Row numbers of ``idx`` in the (prod(lead)·n, D) flattening of the data."""
    if tuple(idx.shape[:-1]) != tuple(x_lead):
        raise ValueError(f"{name}: idx leading dims {tuple(idx.shape[:-1])} must equal the data's "
                         f"leading dims {tuple(x_lead)}")
    _check_index(idx, n, "idx")
    xp = get_array_module(idx)
    batch = xp.reshape(xp.arange(math.prod(x_lead), dtype=xp.int64), tuple(x_lead) + (1,))  # (..., 1)
    return xp.reshape(idx.astype(xp.int64) + batch * n, (-1,))  # (..., M) -> (prod(...)·M,)


@primitive
def gather_rows(x, idx):
    """Pick rows of ``x`` along axis -2: ``out[..., m, :] = x[..., idx[..., m], :]``.

    Parameters
    ----------
    x : array, shape (..., T, D)
    idx : int array, shape (..., M)
        Same leading dims as ``x``; values in [0, T); repeats allowed.  No gradient.

    Returns
    -------
    array, shape (..., M, D)

    Notes
    -----
    A token embedding lookup is the case with no leading dims:
    ``reshape(gather_rows(wte, reshape(ids, (-1,))), (B, T, C))`` with wte (V, C).
    The VJP adds each output row's gradient into the row it came from:
    :func:`scatter_add_rows`.
    """
    _checks.operand("gather_rows", "x", x, min_ndim=2)
    _checks.index_array("gather_rows", "idx", idx)
    *lead, T, D = x.shape
    xp = get_array_module(x)
    rows = _flat_rows(idx, T, lead, "gather_rows")
    return xp.reshape(xp.reshape(x, (-1, D))[rows], tuple(idx.shape) + (D,))  # (R, D) -> (..., M, D)


@primitive
def scatter_add_rows(y, idx, n):
    """Add rows of ``y`` into ``n`` rows: ``out[..., idx[..., m], :] += y[..., m, :]``.

    Parameters
    ----------
    y : array, shape (..., M, D)
    idx : int array, shape (..., M)
        Values in [0, n); repeated indices sum.  No gradient.
    n : int
        Number of output rows (T).

    Returns
    -------
    array, shape (..., n, D)
        Rows that no index names are 0.

    Notes
    -----
    The adjoint of :func:`gather_rows` (``<gather(x), y> = <x, scatter(y)>``);
    its VJP is the gather.  On CuPy arrays a sorted segment sum
    (:func:`rt_numpy.kernels.cupy_ops.scatter_add_rows`) replaces ``add.at``,
    whose atomics would add repeated rows in a varying order.
    """
    _checks.operand("scatter_add_rows", "y", y, min_ndim=2)
    _checks.index_array("scatter_add_rows", "idx", idx)
    n = _checks.integer("scatter_add_rows: n", n, 0)
    if tuple(idx.shape) != tuple(y.shape[:-1]):
        raise ValueError(f"scatter_add_rows: idx must have shape y.shape[:-1]={tuple(y.shape[:-1])}, got {idx.shape}")
    *lead, M, D = y.shape
    xp = get_array_module(y)
    rows = _flat_rows(idx, n, lead, "scatter_add_rows")
    out = xp.zeros((math.prod(lead) * n, D), dtype=y.dtype)  # (R, D)
    run = kernel_impl(out)
    if run == "ref":
        xp.add.at(out, rows, xp.reshape(y, (-1, D)))  # unbuffered: repeated rows accumulate
    elif run == "numba":  # the same additions in the same order as add.at, compiled
        from rt_numpy.kernels import numba_scatter

        numba_scatter.add_rows_at(out, rows, xp.ascontiguousarray(xp.reshape(y, (-1, D))))
    else:  # "cupy": a sorted segment sum, the same order as add.at and no atomics
        from rt_numpy.kernels import cupy_ops

        out = cupy_ops.scatter_add_rows(xp.reshape(y, (-1, D)), rows, math.prod(lead) * n)  # (R, D)
    return xp.reshape(out, tuple(lead) + (n, D))  # (R, D) -> (..., n, D)


_defvjp_keeping_impl(gather_rows, lambda ans, x, idx: lambda g: scatter_add_rows(g, idx, x.shape[-2]))
defvjp(scatter_add_rows, lambda ans, y, idx, n: lambda g: gather_rows(g, idx))


# --------------------------------------------------------------------------

def stop_gradient(x):
    """The raw value of ``x``: used downstream, it passes no gradient back.

    E.g. the commitment loss ``(x̂ - stop_gradient(μ))²`` (docs/algorithm.md#18-commitment-loss).
    Unwraps every level of autograd boxing, so it also stops higher orders.
    """
    return getval(x)
