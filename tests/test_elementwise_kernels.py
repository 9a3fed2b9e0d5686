"""The fused GELU kernels compute what the readable formulas compute.

:mod:`rt_numpy.kernels.numba_elementwise` (used by :func:`rt_numpy.ops.gelu`
and :func:`rt_numpy.ops.gelu_derivative` on NumPy arrays) against the formulas
on the reference path, over a grid of shapes, both dtypes, memory layouts and
edge values; bitwise the same for any number of threads; bad input refused.
With ``NUMBA_DISABLE_JIT=1`` the kernel bodies run as plain Python here (ops
itself then keeps to the formulas).
"""
import itertools

import numba
import numpy as np
import pytest
from autograd import elementwise_grad
from autograd.test_util import check_grads

from rt_numpy import backend, ops
from rt_numpy.kernels import numba_elementwise, numba_exp, numba_norm, numba_scatter, numba_threads

# Against the formulas evaluated in float64 (the truth, to ~1e-15): (rtol, atol).  In float32 the
# kernels are closer to it than the float32 formula itself, whose derivative carries absolute errors
# near 1e-6 below x = -4 (1 - tanh(u)^2 cancels); test_as_accurate_as_the_formula checks that.
TOL = {np.float32: (1e-6, 2e-7), np.float64: (1e-13, 1e-14)}
SHAPES = [(0,), (1,), (7,), (3, 5), (2, 3, 17), (2, 1, 64, 33)]
EDGES = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 5.5, -5.5,
         10.0, -10.0, 30.0, -30.0, 1e3, -1e3, 1e6, -1e6]


def _formulas(x):
    """gelu(x) and its derivative on the reference path (the readable formulas of rt_numpy.ops), in x's dtype."""
    with backend.reference_only():
        return ops.gelu(x), ops.gelu_derivative(x)


def _truth(x):
    """The formulas evaluated in float64."""
    return _formulas(np.asarray(x, np.float64))


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (4 * rng.standard_normal(shape)).astype(dtype)  # most of the curve, both tails


@pytest.mark.parametrize("shape,dtype", list(itertools.product(SHAPES, [np.float32, np.float64])))
def test_kernels_equal_the_formulas(shape, dtype):
    x = _inputs(shape, dtype)
    want_y, want_dy = _truth(x)
    y, dy = numba_elementwise.gelu(x), numba_elementwise.gelu_derivative(x)
    rtol, atol = TOL[dtype]
    for got, want in ((y, want_y), (dy, want_dy)):
        assert got.shape == x.shape and got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_edge_values(dtype):
    x = np.array(EDGES, dtype)
    want_y, want_dy = _truth(x)
    y, dy = numba_elementwise.gelu(x), numba_elementwise.gelu_derivative(x)
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(y, want_y, rtol=rtol, atol=atol)
    np.testing.assert_allclose(dy, want_dy, rtol=rtol, atol=atol)
    assert np.isfinite(y).all() and np.isfinite(dy).all()
    right, left = x >= 10, x <= -10
    np.testing.assert_array_equal(y[right], x[right])  # the right tail is exactly x, slope exactly 1
    np.testing.assert_array_equal(dy[right], 1)
    assert np.abs(y[left]).max() < 1e-30 and np.abs(dy[left]).max() < 1e-30  # the left tail vanishes
    assert y[EDGES.index(0.0)] == 0 and dy[EDGES.index(0.0)] == 0.5


def test_as_accurate_as_the_formula():
    x = _inputs((200_000,), np.float32, seed=3)
    true_y, true_dy = _truth(x)
    formula_y, formula_dy = _formulas(x)
    # The value: both within a unit in the last place; the derivative: strictly better in the left tail.
    assert np.abs(numba_elementwise.gelu(x) - true_y).max() <= 2 * np.abs(formula_y - true_y).max()
    assert np.abs(numba_elementwise.gelu_derivative(x) - true_dy).max() <= np.abs(formula_dy - true_dy).max()


def test_any_memory_layout():
    x = _inputs((6, 9, 4), np.float64)
    for view in (x.transpose(2, 0, 1), x[:, ::2], x[..., ::-1]):
        assert not view.flags.c_contiguous
        want_y, want_dy = _formulas(view)
        np.testing.assert_allclose(numba_elementwise.gelu(view), want_y, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(numba_elementwise.gelu_derivative(view), want_dy, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("shape", [(64, 257), (256, 257)])  # one slice; two (more than 2 x 32k numbers)
def test_same_bits_for_any_number_of_threads(shape):
    x = _inputs(shape, np.float32)
    results = []
    saved = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            results.append((numba_elementwise.gelu(x), numba_elementwise.gelu_derivative(x)))
    finally:
        numba.set_num_threads(saved)
    for y, dy in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dy, results[0][1])
    # The slices: one per thread only past 2 x MIN_NUMBERS_PER_THREAD numbers.
    split = len(numba_threads.thread_ranges(x.size, numba_threads.MIN_NUMBERS_PER_THREAD)) > 1
    assert split == (x.size >= 2 * numba_threads.MIN_NUMBERS_PER_THREAD and numba.get_num_threads() > 1)


def test_ops_uses_the_kernels_and_keeps_the_gradients():
    x = _inputs((3, 40), np.float64)
    if backend.resolve_impl("auto") == "numba" and not numba.config.DISABLE_JIT:
        np.testing.assert_array_equal(ops.gelu(x), numba_elementwise.gelu(x))  # the fast path ran
    np.testing.assert_allclose(elementwise_grad(ops.gelu)(x), _formulas(x)[1], rtol=1e-13, atol=1e-14)
    check_grads(ops.gelu, modes=["rev"], order=2)(x)
    check_grads(ops.gelu_derivative, modes=["rev"], order=2)(x)


@pytest.mark.parametrize("bad", [np.arange(5), np.ones(3, np.float16), [1.0, 2.0], 1.5])
def test_bad_input_is_refused(bad):
    with pytest.raises(TypeError, match="float32 or float64"):
        numba_elementwise.gelu(bad)


# ------------------------------------------------------------------ the scatter-add of rows
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("R,M,D", [(1, 1, 1), (3, 17, 5), (256, 2000, 64), (7, 0, 3)])
def test_add_rows_at_is_add_at_bit_for_bit(dtype, R, M, D):
    rng = np.random.default_rng(R * 1000 + M)
    rows = rng.integers(0, R, size=M).astype(np.int64)  # repeats: many rows land in the same place
    y = (1e3 * rng.standard_normal((M, D))).astype(dtype)  # large values: the order of additions shows
    want = np.zeros((R, D), dtype)
    np.add.at(want, rows, y)
    got = np.zeros((R, D), dtype)
    numba_scatter.add_rows_at(got, rows, y)
    np.testing.assert_array_equal(got, want)


def test_scatter_add_rows_uses_the_kernel_and_agrees_with_add_at(monkeypatch):
    rng = np.random.default_rng(5)
    y = rng.standard_normal((2, 300, 8)).astype(np.float32)  # (B, M, D)
    idx = rng.integers(0, 10, size=(2, 300))
    calls = []
    real = numba_scatter.add_rows_at
    monkeypatch.setattr(numba_scatter, "add_rows_at", lambda *a: calls.append(1) or real(*a))
    got = ops.scatter_add_rows(y, idx, 10)  # (2, 10, 8)
    want = np.zeros((2, 10, 8), np.float32)
    for b in range(2):
        np.add.at(want[b], idx[b], y[b])
    assert calls == ([1] if backend.kernel_impl(y) == "numba" else [])  # not under NUMBA_DISABLE_JIT=1
    np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ the parameter-free layer norm
def _layer_norm_formula(x, eps):
    x = x.astype(np.float64)
    xc = x - x.mean(-1, keepdims=True)
    return xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + eps)


LN_SHAPES = [(1,), (7,), (3, 5), (2, 3, 64), (4, 513), (1, 40, 512)]


@pytest.mark.parametrize("shape,dtype", list(itertools.product(LN_SHAPES, [np.float32, np.float64])))
def test_layer_norm_kernels_equal_the_formulas(shape, dtype):
    rng = np.random.default_rng(len(shape) * 10 + shape[-1])
    x = (3 + 5 * rng.standard_normal(shape)).astype(dtype)  # an offset: the mean matters
    g = rng.standard_normal(shape).astype(dtype)
    eps = 1e-5
    y = numba_norm.layer_norm(x, eps)
    want_y = _layer_norm_formula(x, eps)
    # The exact gradient, from autograd on the float64 formula.
    want_dx = elementwise_grad(lambda z: _ln_autograd(z, eps) * g.astype(np.float64))(x.astype(np.float64))
    dx = numba_norm.layer_norm_grad(x, y, g, eps)
    rtol, atol = (2e-5, 2e-5) if dtype == np.float32 else (1e-12, 1e-12)
    assert y.shape == x.shape and y.dtype == dtype and dx.dtype == dtype
    np.testing.assert_allclose(y, want_y, rtol=rtol, atol=atol)
    scale_dx = max(np.abs(want_dx).max(), 1e-30)
    np.testing.assert_allclose(dx / scale_dx, want_dx / scale_dx, rtol=rtol, atol=10 * atol)


def _ln_autograd(x, eps):
    import autograd.numpy as anp

    xc = x - anp.mean(x, axis=-1, keepdims=True)
    return xc / anp.sqrt(anp.mean(xc * xc, axis=-1, keepdims=True) + eps)


def test_layer_norm_free_uses_the_kernels_and_stays_twice_differentiable(monkeypatch):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((3, 4, 8))
    calls = []
    for name in ("layer_norm", "layer_norm_grad"):
        real = getattr(numba_norm, name)
        monkeypatch.setattr(numba_norm, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    g = rng.standard_normal(x.shape)
    dx = elementwise_grad(lambda z: ops.multiply(ops.layer_norm_free(z, 1e-5), g))(x)
    np.testing.assert_allclose(dx, elementwise_grad(lambda z: _ln_autograd(z, 1e-5) * g)(x), rtol=1e-10, atol=1e-12)
    if backend.kernel_impl(x) == "numba":  # not under NUMBA_DISABLE_JIT=1, where the formulas run
        assert calls == ["layer_norm", "layer_norm_grad"]
    # Second order goes through the primitives (the kernel gradient is first-order only).
    check_grads(lambda z: ops.sum(ops.multiply(ops.layer_norm_free(z, 1e-5), g)), modes=["rev"], order=2)(x)


def test_layer_norm_kernels_refuse_bad_input():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(TypeError, match="x must be a float32 or float64"):
        numba_norm.layer_norm(x.astype(np.int64), 1e-5)
    with pytest.raises(ValueError, match="g must have the shape"):
        numba_norm.layer_norm_grad(x, x, np.ones((3, 2), np.float32), 1e-5)


# ----------------------------------------------------------------- exp of a non-positive number
@numba.njit(error_model="numpy")
def _exp_loop(x, out):
    """``numba_exp.exp_nonpositive`` over an array, compiled (the way the routing kernels use it)."""
    for i in range(x.shape[0]):
        out[i] = numba_exp.exp_nonpositive(x[i])


# Units in the last place of the correctly rounded result that the exponential may be off by.
EXP_ULPS = {np.float32: 4, np.float64: 2}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpositive_is_within_a_few_ulps_of_exp(dtype):
    x_min = numba_exp.X_MIN_32 if dtype == np.float32 else numba_exp.X_MIN_64
    grid = np.linspace(float(x_min), 0.0, 20001)
    rng = np.random.default_rng(0)
    small = -np.abs(rng.standard_normal(2000)) * 10.0 ** rng.uniform(-12, 0, 2000)  # near 0
    x = np.concatenate([grid, small, [0.0, -0.0, -1e-30, float(x_min)]]).astype(dtype)
    got = np.empty_like(x)
    _exp_loop(x, got)
    assert got.dtype == dtype
    # NumPy's float64 exp: within a float64 ulp (so, for float32, the truth to far below an ulp).
    truth = np.exp(x.astype(np.float64))
    ulp = np.spacing(truth.astype(dtype)).astype(np.float64)
    err = np.abs(got.astype(np.float64) - truth) / ulp
    assert err.max() <= EXP_ULPS[dtype], f"{err.max():.2f} ulps at x = {x[err.argmax()]!r}"
    assert np.all(got[x == 0] == 1.0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpositive_is_exactly_zero_below_its_range(dtype):
    x_min = float(numba_exp.X_MIN_32 if dtype == np.float32 else numba_exp.X_MIN_64)
    x = np.array([-np.inf, -1e30, -1e4, x_min - 1.0, np.nextafter(dtype(x_min), dtype(-np.inf))], dtype=dtype)
    got = np.full_like(x, 7.0)
    _exp_loop(x, got)
    assert got.tolist() == [0.0] * len(x)
    # Within range it is positive and never decreases.
    x = np.sort(np.random.default_rng(1).uniform(x_min, 0.0, 5000)).astype(dtype)
    got = np.empty_like(x)
    _exp_loop(x, got)
    assert np.all(got > 0) and np.all(np.diff(got) >= 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exp_nonpositive_from_python_equals_compiled(dtype):
    x = -np.random.default_rng(2).exponential(8.0, 300).astype(dtype)
    compiled = np.empty_like(x)
    _exp_loop(x, compiled)
    # Called from Python it returns a Python float or a NumPy scalar, holding the same number.
    from_python = np.array([numba_exp.exp_nonpositive(v) for v in x])
    assert np.array_equal(from_python.astype(dtype), compiled)
    assert np.array_equal(from_python, compiled.astype(from_python.dtype))


@pytest.mark.parametrize("rows", [3, 64, 300])  # 300 x 1024 numbers: two ranges of rows on 2 threads
def test_threads_do_not_change_the_bits(rows):
    import numba

    from rt_numpy.kernels import numba_elementwise, numba_norm

    rng = np.random.default_rng(0)
    x, g = (rng.standard_normal((rows, 1024)).astype(np.float32) for _ in range(2))

    def run():
        y = numba_norm.layer_norm(x, 1e-5)
        return numba_elementwise.gelu(x), y, numba_norm.layer_norm_grad(x, y, g, 1e-5)

    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
    finally:
        numba.set_num_threads(threads)
    many = run()
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)
