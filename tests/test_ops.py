"""Tests of rt_numpy.ops: every primitive against autograd.numpy and finite differences.

For each op (table ``CASES``):
1. its value equals the plain autograd.numpy formula;
2. its gradient of ``sum(op(...) * w)`` equals autograd's automatic derivative of that formula;
3. ``check_grads`` (finite differences) passes to order 2, i.e. the VJP is itself differentiable;
4. float32 inputs give float32 values and float32 gradients.
"""
import ast
import contextlib
import inspect

import autograd.core
import autograd.numpy as anp
import numpy as np
import pytest
from autograd import elementwise_grad, grad
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

from rt_numpy import ops

RTOL, ATOL = 1e-10, 1e-12


def _rng(seed=0):
    return np.random.default_rng(seed)


def _normal(*shape, seed=0):
    return _rng(seed).standard_normal(shape)


def _positive(*shape, seed=0):
    return 0.5 + _rng(seed).random(shape)


# ---- reference formulas written with autograd.numpy ------------------------------------------

def _ref_gelu(x):
    return 0.5 * x * (1 + anp.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _ref_softmax(x, mask=None, axis=-1):
    if mask is not None:
        x = anp.where(mask, x, -np.inf)
    e = anp.exp(x - anp.max(x, axis=axis, keepdims=True))
    return e / anp.sum(e, axis=axis, keepdims=True)


def _ref_layer_norm(x, gamma=None, beta=None, eps=1e-5):
    xc = x - anp.mean(x, axis=-1, keepdims=True)
    y = xc / anp.sqrt(anp.mean(xc ** 2, axis=-1, keepdims=True) + eps)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def _ref_l2_normalize(x, eps=1e-12):
    return x / anp.maximum(anp.sqrt(anp.sum(x ** 2, axis=-1, keepdims=True)), eps)


def _ref_cross_entropy(logits, targets):
    z = logits - anp.max(logits, axis=-1, keepdims=True)
    logp = z - anp.log(anp.sum(anp.exp(z), axis=-1, keepdims=True))
    onehot = np.arange(logits.shape[-1]) == targets[..., None]
    return -anp.sum(logp * onehot) / targets.size


def _ref_gather(x, idx):
    if x.ndim == 2:
        return x[idx]
    return anp.stack([x[b][idx[b]] for b in range(x.shape[0])])


def _ref_scatter(y, idx, n):
    # A one-hot matrix P[m, t] = (idx[m] == t) turns scatter-add into P^T y.
    onehot = (idx[..., None] == np.arange(n)).astype(float)  # (B, M, n)
    return anp.einsum("bmn,bmd->bnd", onehot, y)


# ---- the table of cases ----------------------------------------------------------------------

IDX = np.array([[0, 3, 3, 5, 1, 3, 0, 2], [5, 5, 4, 0, 0, 1, 5, 2]])  # (2, 8): repeats, row 3 unused in b=1
MASK = _rng(7).random((3, 4, 6)) < 0.6
MASK[..., 0] = True  # every row has a visible entry (fully masked rows are tested separately)
CAUSAL = np.tril(np.ones((5, 5), dtype=bool))
TARGETS = _rng(3).integers(0, 7, size=(2, 3))


def case(name, op, ref, args, argnums=(0,), order=2):
    return pytest.param(op, ref, args, argnums, order, id=name)


CASES = [
    case("add", ops.add, lambda a, b: a + b, [_normal(3, 4, 5), _normal(4, 1, seed=1)], (0, 1)),
    case("add-lead", ops.add, lambda a, b: a + b, [_normal(3), _normal(2, 3, seed=1)], (0, 1)),
    case("add-scalar", ops.add, lambda a, b: a + b, [_normal(2, 3), 1.5]),
    case("subtract", ops.subtract, lambda a, b: a - b, [_normal(2, 1, 3), _normal(1, 4, 3, seed=1)], (0, 1)),
    case("multiply", ops.multiply, lambda a, b: a * b, [_normal(2, 1, 3), _normal(4, 1, seed=1)], (0, 1)),
    case("divide", ops.divide, lambda a, b: a / b, [_normal(3, 4), _positive(3, 1, seed=1)], (0, 1)),
    case("scale", lambda x: ops.scale(x, np.float64(0.7)), lambda x: x * 0.7, [_normal(3, 4)]),
    case("matmul", ops.matmul, lambda a, b: a @ b, [_normal(2, 3, 4, 5), _normal(5, 6, seed=1)], (0, 1)),
    case("matmul-bcast-a", ops.matmul, lambda a, b: a @ b, [_normal(3, 4), _normal(2, 4, 5, seed=1)], (0, 1)),
    case("matmul-bcast-both", ops.matmul, lambda a, b: a @ b,
         [_normal(2, 1, 3, 4), _normal(1, 5, 4, 2, seed=1)], (0, 1)),
    case("matmul-2d", ops.matmul, lambda a, b: a @ b, [_normal(4, 3), _normal(3, 2, seed=1)], (0, 1)),
    case("sum-all", ops.sum, anp.sum, [_normal(2, 3, 4)]),
    case("sum-axis", lambda x: ops.sum(x, 1), lambda x: anp.sum(x, 1), [_normal(2, 3, 4)]),
    case("sum-axes-keep", lambda x: ops.sum(x, (0, -1), keepdims=True),
         lambda x: anp.sum(x, (0, 2), keepdims=True), [_normal(2, 3, 4)]),
    case("mean", lambda x: ops.mean(x, -1), lambda x: anp.mean(x, -1), [_normal(2, 3, 4)]),
    case("mean-all-keep", lambda x: ops.mean(x, keepdims=True), lambda x: anp.mean(x, keepdims=True),
         [_normal(2, 3)]),
    case("broadcast_to", lambda x: ops.broadcast_to(x, (2, 3, 4)),
         lambda x: x + np.zeros((2, 3, 4)), [_normal(3, 1)]),
    case("exp", ops.exp, anp.exp, [_normal(3, 4)]),
    case("log", ops.log, anp.log, [_positive(3, 4)]),
    case("sqrt", ops.sqrt, anp.sqrt, [_positive(3, 4)]),
    case("square", ops.square, lambda x: x ** 2, [_normal(3, 4)]),
    case("tanh", ops.tanh, anp.tanh, [_normal(3, 4)]),
    case("gelu", ops.gelu, _ref_gelu, [3 * _normal(4, 5)]),
    case("gelu_derivative", ops.gelu_derivative, elementwise_grad(_ref_gelu), [3 * _normal(4, 5)]),
    case("reshape", lambda x: ops.reshape(x, (4, -1)), lambda x: anp.reshape(x, (4, -1)), [_normal(2, 3, 4)]),
    case("transpose", lambda x: ops.transpose(x, (2, 0, 1)), lambda x: anp.transpose(x, (2, 0, 1)),
         [_normal(2, 3, 4)]),
    case("transpose-none", ops.transpose, anp.transpose, [_normal(2, 3, 4)]),
    case("split_heads", lambda x: ops.split_heads(x, 3),
         lambda x: anp.transpose(anp.reshape(x, (2, 5, 3, 2)), (0, 2, 1, 3)), [_normal(2, 5, 6)]),
    case("merge_heads", ops.merge_heads,
         lambda x: anp.reshape(anp.transpose(x, (0, 2, 1, 3)), (2, 5, 6)), [_normal(2, 3, 5, 2)]),
    case("slice_axis", lambda x: ops.slice_axis(x, 1, 4, axis=1), lambda x: x[:, 1:4], [_normal(3, 5, 2)]),
    case("pad_axis", lambda x: ops.pad_axis(x, 2, 1, axis=-2),
         lambda x: anp.concatenate([np.zeros((3, 2, 2)), x, np.zeros((3, 1, 2))], axis=1), [_normal(3, 5, 2)]),
    case("concatenate", lambda a, b, c: ops.concatenate([a, b, c], axis=1),
         lambda a, b, c: anp.concatenate([a, b, c], axis=1),
         [_normal(2, 1, 3), _normal(2, 4, 3, seed=1), _normal(2, 2, 3, seed=2)], (0, 1, 2)),
    case("softmax", ops.softmax, _ref_softmax, [3 * _normal(3, 4, 6)]),
    case("softmax-axis0", lambda x: ops.softmax(x, axis=0), lambda x: _ref_softmax(x, axis=0), [_normal(4, 3)]),
    case("softmax-mask", lambda x: ops.softmax(x, MASK), lambda x: _ref_softmax(x, MASK), [_normal(3, 4, 6)]),
    case("softmax-causal-bcast", lambda x: ops.softmax(x, mask=CAUSAL),
         lambda x: _ref_softmax(x, np.broadcast_to(CAUSAL, x.shape)), [_normal(2, 3, 5, 5)]),
    case("masked_fill", lambda x: ops.masked_fill(x, CAUSAL, -5e4),
         lambda x: anp.where(CAUSAL, -5e4, x), [_normal(2, 5, 5)]),
    case("cross_entropy", lambda x: ops.cross_entropy(x, TARGETS), lambda x: _ref_cross_entropy(x, TARGETS),
         [2 * _normal(2, 3, 7)]),
    case("layer_norm_free", ops.layer_norm_free, _ref_layer_norm, [_normal(3, 4, 8)]),
    case("layer_norm_free-eps", lambda x: ops.layer_norm_free(x, eps=1e-6),
         lambda x: _ref_layer_norm(x, eps=1e-6), [_normal(3, 8)]),
    case("layer_norm", ops.layer_norm, _ref_layer_norm,
         [_normal(3, 4, 8), _normal(8, seed=1), _normal(8, seed=2)], (0, 1, 2)),
    case("layer_norm-gain-only", lambda x, g: ops.layer_norm(x, g), lambda x, g: _ref_layer_norm(x, g),
         [_normal(3, 8), _normal(8, seed=1)], (0, 1)),
    case("l2_normalize", ops.l2_normalize, _ref_l2_normalize, [_normal(3, 4, 5)]),
    case("gather_rows", lambda x: ops.gather_rows(x, IDX), lambda x: _ref_gather(x, IDX), [_normal(2, 6, 3)]),
    case("gather_rows-table", lambda x: ops.gather_rows(x, IDX[0]), lambda x: _ref_gather(x, IDX[0]),
         [_normal(6, 3)]),
    case("scatter_add_rows", lambda y: ops.scatter_add_rows(y, IDX, 6), lambda y: _ref_scatter(y, IDX, 6),
         [_normal(2, 8, 3)]),
]


@contextlib.contextmanager
def only_rt_numpy_vjps():
    """Fail if anything but rt_numpy.ops primitives is differentiated inside the block.

    autograd.numpy's VJPs build NumPy arrays and break on CuPy (docs/design.md#differentiation), so a forward or
    VJP in ops that slipped into autograd.numpy (e.g. ``g * ans`` on a boxed value) must fail
    here even though it would work on NumPy.  Allowed besides ops: autograd's own plumbing
    (containers, vector-space helpers) and ``+``, which autograd uses to accumulate gradients.
    """
    saved = dict(autograd.core.primitive_vjps)
    allowed = ("rt_numpy.ops", "autograd.builtins", "autograd.core")
    kept = {f: v for f, v in saved.items()
            if getattr(getattr(f, "fun", None), "__module__", "") in allowed or f is anp.add}
    autograd.core.primitive_vjps.clear()
    autograd.core.primitive_vjps.update(kept)
    try:
        yield
    finally:
        autograd.core.primitive_vjps.clear()
        autograd.core.primitive_vjps.update(saved)


def _with_arg(args, i, value):
    return [value if j == i else a for j, a in enumerate(args)]


@pytest.mark.parametrize("op, ref, args, argnums, order", CASES)
def test_value_matches_autograd_numpy_formula(op, ref, args, argnums, order):
    out = op(*args)
    expected = ref(*args)
    assert np.shape(out) == np.shape(expected)
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("op, ref, args, argnums, order", CASES)
def test_gradient_matches_autograd_numpy(op, ref, args, argnums, order):
    w = _normal(*np.shape(op(*args)), seed=11)  # random weights: every output entry matters
    for i in argnums:
        with only_rt_numpy_vjps():
            ours = grad(lambda a: ops.sum(ops.multiply(op(*_with_arg(args, i, a)), w)))(args[i])
        theirs = grad(lambda a: anp.sum(ref(*_with_arg(args, i, a)) * w))(args[i])
        assert np.shape(ours) == np.shape(args[i])
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL, err_msg=f"argument {i}")


@pytest.mark.parametrize("op, ref, args, argnums, order", CASES)
def test_finite_differences_to_order_2(op, ref, args, argnums, order):
    for i in argnums:
        with only_rt_numpy_vjps():
            check_grads(lambda a: op(*_with_arg(args, i, a)), modes=["rev"], order=order)(args[i])


@pytest.mark.parametrize("op, ref, args, argnums, order", CASES)
def test_float32_preserved_by_forward_and_vjp(op, ref, args, argnums, order):
    args32 = [a.astype(np.float32) if isinstance(a, np.ndarray) else a for a in args]
    out = op(*args32)
    assert np.asarray(out).dtype == np.float32
    w = _normal(*np.shape(out), seed=11).astype(np.float32)
    for i in argnums:
        g = grad(lambda a: ops.sum(ops.multiply(op(*_with_arg(args32, i, a)), w)))(args32[i])
        assert np.asarray(g).dtype == np.float32, f"argument {i}"
        g64 = grad(lambda a: ops.sum(ops.multiply(op(*_with_arg(args, i, a)), w)))(args[i])
        np.testing.assert_allclose(g, g64, rtol=1e-3, atol=1e-3)


# ---- broadcasting over many shapes --------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, max_dims=3, max_side=3),
       name=st.sampled_from(["add", "subtract", "multiply", "divide"]))
def test_broadcasting_arithmetic_any_shapes(shapes, name):
    sa, sb = shapes.input_shapes
    a, b = _normal(*sa, seed=1), _positive(*sb, seed=2)
    op, ref = getattr(ops, name), getattr(anp, name)
    out = op(a, b)
    assert np.shape(out) == shapes.result_shape
    np.testing.assert_allclose(out, ref(a, b), rtol=RTOL, atol=ATOL)
    w = _normal(*shapes.result_shape, seed=3)
    for i, x in enumerate((a, b)):
        ours = grad(lambda v: ops.sum(ops.multiply(op(*_with_arg([a, b], i, v)), w)))(x)
        theirs = grad(lambda v: anp.sum(ref(*_with_arg([a, b], i, v)) * w))(x)
        assert np.shape(ours) == np.shape(x)
        np.testing.assert_allclose(ours, theirs, rtol=RTOL, atol=ATOL)


# ---- softmax edge cases -----------------------------------------------------------------------

def test_softmax_fully_masked_row_is_zero_with_zero_gradient():
    x = _normal(2, 4, 5)
    mask = np.ones((2, 4, 5), dtype=bool)
    mask[0, 1] = False  # one row with nothing visible
    mask[1, 2, 3:] = False
    with np.errstate(all="raise"):  # no inf - inf or 0 / 0 even internally
        p = ops.softmax(x, mask)
    assert np.all(np.isfinite(p))
    np.testing.assert_array_equal(p[0, 1], 0.0)
    np.testing.assert_allclose(p.sum(-1)[mask.any(-1)], 1.0, rtol=1e-14)
    np.testing.assert_array_equal(p[1, 2, 3:], 0.0)
    w = _normal(2, 4, 5, seed=1)
    g = grad(lambda v: ops.sum(ops.multiply(ops.softmax(v, mask), w)))(x)
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[0, 1], 0.0)
    np.testing.assert_array_equal(g[~mask], 0.0)  # masked logits get exactly no gradient
    visible = mask.any(-1)
    with np.errstate(invalid="ignore"):  # the reference formula makes NaN on the empty row
        expected = grad(lambda v: anp.sum(_ref_softmax(v, mask) * w))(x)
    np.testing.assert_allclose(g[visible], expected[visible], rtol=RTOL, atol=ATOL)
    check_grads(lambda v: ops.softmax(v, mask), modes=["rev"], order=2)(x)


def test_softmax_everything_masked_and_garbage_under_mask():
    x = _normal(3, 4)
    x[:, 2] = np.inf
    x[0, 3] = np.nan
    mask = np.ones((3, 4), dtype=bool)
    mask[:, 2] = False
    mask[0, 3] = False
    p = ops.softmax(x, mask)
    np.testing.assert_allclose(p, _ref_softmax(np.where(mask, x, 0.0), mask), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(ops.softmax(x, np.zeros((3, 4), dtype=bool)), 0.0)
    w = _normal(3, 4, seed=1)
    g = grad(lambda v: ops.sum(ops.multiply(ops.softmax(v, np.zeros((3, 4), bool)), w)))(x)
    np.testing.assert_array_equal(g, 0.0)


def test_softmax_is_stable_for_huge_logits():
    x = np.array([[1e4, 1e4 - 1.0, -1e4]])
    np.testing.assert_allclose(ops.softmax(x), _ref_softmax(np.array([[1.0, 0.0, -2e4]])), rtol=1e-14)
    assert np.isfinite(ops.cross_entropy(np.array([[1e4, -1e4]]), np.array([1])))


# ---- gather / scatter ---------------------------------------------------------------------------

def test_gather_and_scatter_are_adjoint():
    x, y = _normal(2, 6, 3, seed=1), _normal(2, 8, 3, seed=2)
    lhs = np.sum(ops.gather_rows(x, IDX) * y)
    rhs = np.sum(x * ops.scatter_add_rows(y, IDX, 6))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-13)


def test_scatter_add_sums_repeated_indices():
    y = np.ones((1, 4, 2))
    out = ops.scatter_add_rows(y, np.array([[2, 0, 2, 2]]), 4)
    np.testing.assert_array_equal(out[0, :, 0], [1.0, 0.0, 3.0, 0.0])


def test_gather_of_scatter_second_order():
    # A Hessian-vector product through gather -> nonlinearity -> scatter equals autograd.numpy's.
    x, v = _normal(2, 6, 3, seed=1), _normal(2, 6, 3, seed=2)

    def ours(a):
        return ops.sum(ops.square(ops.scatter_add_rows(ops.tanh(ops.gather_rows(a, IDX)), IDX, 6)))

    def theirs(a):
        return anp.sum(_ref_scatter(anp.tanh(_ref_gather(a, IDX)), IDX, 6) ** 2)

    hvp = lambda f: grad(lambda a: anp.sum(grad(f)(a) * v))(x)
    np.testing.assert_allclose(hvp(ours), hvp(theirs), rtol=RTOL, atol=ATOL)


def test_embedding_lookup_with_gather_rows():
    wte, ids = _normal(7, 4), _rng(1).integers(0, 7, size=(2, 5))
    emb = ops.reshape(ops.gather_rows(wte, ids.reshape(-1)), (2, 5, 4))
    np.testing.assert_array_equal(emb, wte[ids])
    g = grad(lambda w: ops.sum(ops.reshape(ops.gather_rows(w, ids.reshape(-1)), (2, 5, 4))))(wte)
    np.testing.assert_array_equal(g[:, 0], np.bincount(ids.ravel(), minlength=7))


# ---- other edge cases ---------------------------------------------------------------------------

def test_l2_normalize_zero_and_tiny_vectors():
    x = _normal(3, 4)
    x[1] = 0.0
    x[2] = 1e-14
    w = _normal(3, 4, seed=1)
    y = ops.l2_normalize(x)
    np.testing.assert_array_equal(y[1], 0.0)
    np.testing.assert_allclose(y[2], x[2] / 1e-12)
    g = grad(lambda v: ops.sum(ops.multiply(ops.l2_normalize(v), w)))(x)
    np.testing.assert_allclose(g[1:], w[1:] / 1e-12, rtol=1e-14)  # below eps the map is linear: x / eps
    np.testing.assert_allclose(np.linalg.norm(y[0]), 1.0, rtol=1e-14)


def test_gelu_is_the_tanh_approximation():
    # Values of GPT-2's gelu, not the exact erf form (which gives 0.8413447 at x=1).
    np.testing.assert_allclose(ops.gelu(np.array([1.0, -1.0])), [0.8411919906, -0.1588080094], rtol=1e-9)


def test_gradients_are_writable_arrays():
    # An optimiser may clip or scale a gradient in place; a read-only broadcast view would raise.
    g = grad(lambda w: ops.sum(w))(_normal(3, 4))
    g *= 0.5
    np.testing.assert_array_equal(g, 0.5)


def test_stop_gradient():
    x = _normal(3)
    np.testing.assert_allclose(grad(lambda v: ops.sum(ops.multiply(ops.stop_gradient(v), v)))(x), x)
    inner = grad(lambda u: ops.sum(ops.multiply(ops.stop_gradient(u), ops.square(u))))  # 2 u sg(u)
    np.testing.assert_allclose(grad(lambda v: ops.sum(inner(v)))(x), 2 * x)  # second order: 2 sg(v)


def test_small_lm_step_matches_autograd_numpy_to_second_order():
    # layer_norm -> matmul -> gelu -> matmul -> masked softmax mixing -> cross-entropy, as in a tiny LM.
    rng = _rng(5)
    x, w1, w2 = rng.standard_normal((2, 5, 4)), rng.standard_normal((4, 6)), rng.standard_normal((6, 4))
    targets = rng.integers(0, 4, size=(2, 5))

    def ours(w):
        h = ops.matmul(ops.gelu(ops.matmul(ops.layer_norm(x), w)), w2)  # (2, 5, 4)
        att = ops.softmax(ops.matmul(h, ops.transpose(h, (0, 2, 1))), CAUSAL)  # (2, 5, 5)
        return ops.cross_entropy(ops.matmul(att, h), targets)

    def theirs(w):
        h = _ref_gelu(_ref_layer_norm(x) @ w) @ w2
        att = _ref_softmax(h @ anp.transpose(h, (0, 2, 1)), np.broadcast_to(CAUSAL, (2, 5, 5)))
        return _ref_cross_entropy(att @ h, targets)

    np.testing.assert_allclose(ours(w1), theirs(w1), rtol=RTOL)
    np.testing.assert_allclose(grad(ours)(w1), grad(theirs)(w1), rtol=RTOL, atol=ATOL)
    v = rng.standard_normal(w1.shape)
    hvp = lambda f: grad(lambda w: anp.sum(grad(f)(w) * v))(w1)
    np.testing.assert_allclose(hvp(ours), hvp(theirs), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("call, error", [
    (lambda: ops.gather_rows(_normal(2, 6, 3), IDX.astype(float)), TypeError),
    (lambda: ops.gather_rows(_normal(2, 6, 3), IDX + 1), ValueError),  # index 6 out of [0, 6)
    (lambda: ops.gather_rows(_normal(2, 6, 3), -IDX), ValueError),
    (lambda: ops.gather_rows(_normal(3, 6, 3), IDX), ValueError),  # leading dims differ
    (lambda: ops.scatter_add_rows(_normal(2, 8, 3), IDX, 5), ValueError),
    (lambda: ops.split_heads(_normal(2, 5, 6), 4), ValueError),
    (lambda: ops.softmax(_normal(3, 4), np.ones((3, 4))), TypeError),
    (lambda: ops.softmax(_normal(3, 4), np.ones((2, 4), bool)), ValueError),
    (lambda: ops.masked_fill(_normal(3, 4), np.ones((2, 3, 4), bool), 0.0), ValueError),
    (lambda: ops.matmul(_normal(3), _normal(3, 2)), ValueError),
    (lambda: ops.cross_entropy(_normal(2, 3, 7), TARGETS[:, :2]), ValueError),
    (lambda: ops.cross_entropy(_normal(2, 3, 7), TARGETS + 7), ValueError),
    (lambda: ops.l2_normalize(_normal(3, 4), eps=0.0), ValueError),
])
def test_bad_input_raises(call, error):
    with pytest.raises(error):
        call()


def test_ops_never_call_numpy_or_autograd_numpy():
    # The CuPy path depends on this: data only ever goes through xp = get_array_module(...).
    tree = ast.parse(inspect.getsource(ops))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            assert not any(n == "numpy" or n.startswith(("numpy.", "autograd.numpy")) for n in names), names
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            assert node.value.id not in ("np", "numpy", "anp"), ast.unparse(node)
