"""The fused routing-attention kernels compute what the reference computes.

:func:`rt_numpy.attention.cluster_attention_fused` (Numba kernels in
:mod:`rt_numpy.kernels.numba_routing`) against
:func:`rt_numpy.attention.cluster_attention_reference`:

* values, and the gradients of ``sum(out * g)`` with respect to q, k and v
  against autograd's gradients of the reference, to 1e-10 in float64 and 1e-5
  in float32 (relative to the largest entry; in float32 the reference can be
  further than that from the exact answer, and the kernel must then be as
  accurate as the reference: see ``_assert_as_accurate``), over a grid of shapes
  (B, H, T, K, W, D), shared and separate QK, both self rules, both eps values
  and both dtypes;
* edge cases with known answers: one cluster of the whole sequence is dense
  causal attention divided by (1 + eps); query rows that see no key give 0
  (no NaN); a token in several clusters is averaged; a token in no cluster gets
  0 and passes no gradient;
* determinism: the same inputs give bitwise the same outputs, for any number
  of threads and either way of sharing the work among them;
* ``check_grads`` (finite differences) on the primitive in float64;
* bad input is refused with the name of the argument.

With ``NUMBA_DISABLE_JIT=1`` the kernels run as plain Python: the grid drops
its (T=128, W=128) cases (every other case still asserts everything).
"""
import itertools

import numba
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads

from rt_numpy import attention, kmeans
from rt_numpy.kernels import numba_routing

TOL = {np.float32: 1e-5, np.float64: 1e-10}
NO_JIT = bool(numba.config.DISABLE_JIT)


# ------------------------------------------------------------------------------ helpers
def _windows(x, K, W, seed):
    """Balanced top-W windows of x (B, H, T, D) for K random centroids: (B, H, K, W), ascending."""
    H, D = x.shape[1], x.shape[3]
    means = np.random.default_rng(seed).standard_normal((H, K, D)).astype(x.dtype)  # (H, K, D)
    return kmeans.balanced_membership(x, means, W)


def _case(B, H, T, K, W, D, dtype, shared, seed=0):
    """q, k, v, g (B, H, T, D) and windows (B, H, K, W); with ``shared`` k is q and J is I."""
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))
    if shared:
        k = q
    query_windows = _windows(q, K, W, seed + 1)
    key_windows = query_windows if shared else _windows(k, K, W, seed + 2)
    return q, k, v, g, query_windows, key_windows


def _reference(q, k, v, g, I, J, scale, last_resort, eps):
    """Reference output and autograd's gradients of sum(out * g) in q, k, v."""
    def loss(q, k, v):
        out = attention.cluster_attention_reference(
            q, k, v, I, J, scale=scale, self_attend="last_resort" if last_resort else "allow", combine_eps=eps)
        return (out * g).sum()

    out = attention.cluster_attention_reference(
        q, k, v, I, J, scale=scale, self_attend="last_resort" if last_resort else "allow", combine_eps=eps)
    return out, grad(loss, (0, 1, 2))(q, k, v)


def _fused(q, k, v, g, I, J, scale, last_resort, eps):
    """Fused output and gradients, the latter through autograd (the primitive's VJP)."""
    def loss(q, k, v):
        return (attention.cluster_attention_fused(q, k, v, I, J, scale, last_resort, eps) * g).sum()

    out = attention.cluster_attention_fused(q, k, v, I, J, scale, last_resort, eps)
    return out, grad(loss, (0, 1, 2))(q, k, v)


def _assert_close(actual, expected, tol, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: NaN or infinity"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * np.abs(expected).max(), err_msg=what)


def _assert_as_accurate(actual, expected, exact, tol, what):
    """``actual`` is within ``tol`` (relative to its largest entry) of ``exact``, or at worst twice as
    far from it as the reference ``expected`` is.

    ``exact`` is the reference evaluated in float64 on the same inputs.  In float64 this is
    ``|actual - expected| <= tol * max|expected|``.  In float32 the reference itself can be further
    than 1e-5 from the exact answer (a peaked softmax: ``p (dp - sum dp p)`` cancels), and no float32
    computation can then agree with it to 1e-5; the kernel must still be as accurate as the reference.
    """
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: NaN or infinity"
    reference_error = np.abs(expected - exact).max()
    allowed = tol * np.abs(exact).max() + 2 * reference_error
    error = np.abs(actual - exact).max()
    assert error <= allowed, (f"{what}: max error {error:.3g} against float64, allowed {allowed:.3g} "
                              f"(the float32 reference's own error is {reference_error:.3g})")


def _assert_matches_reference(q, k, v, g, I, J, scale, last_resort, eps):
    tol = TOL[q.dtype.type]
    ref_out, ref_grads = _reference(q, k, v, g, I, J, scale, last_resort, eps)
    exact_out, exact_grads = _reference(*(x.astype(np.float64) for x in (q, k, v, g)),
                                        I, J, scale, last_resort, eps)
    out, grads = _fused(q, k, v, g, I, J, scale, last_resort, eps)
    _assert_as_accurate(out, ref_out, exact_out, tol, "out")
    for name, a, b, c in zip(("dq", "dk", "dv"), grads, ref_grads, exact_grads):
        _assert_as_accurate(a, b, c, tol, name)
    # The raw kernels (no autograd) give the same numbers as the primitive.
    np.testing.assert_array_equal(numba_routing.forward(q, k, v, I, J, scale, last_resort, eps), out)
    for a, b in zip(numba_routing.backward(g, q, k, v, I, J, scale, last_resort, eps), grads):
        np.testing.assert_array_equal(a, b)
    if k is q and J is I:
        _assert_shared_form(q, v, g, I, scale, last_resort, eps, out, grads, ref_grads, exact_grads)
    return out, grads


def _assert_shared_form(q, v, g, I, scale, last_resort, eps, out, grads, ref_grads, exact_grads):
    """Shared QK written as ``k=None, key_windows=None`` (what routing_attention passes): each row is
    gathered once and dq holds the keys' gradient too.  The output and dv are bitwise those of the
    k=q call; dq is dq + dk of the reference to the same accuracy."""
    tol = TOL[q.dtype.type]
    np.testing.assert_array_equal(numba_routing.forward(q, None, v, I, None, scale, last_resort, eps), out)
    dq, dk, dv = numba_routing.backward(g, q, None, v, I, None, scale, last_resort, eps)
    assert dk is None
    np.testing.assert_array_equal(dv, grads[2])
    _assert_as_accurate(dq, ref_grads[0] + ref_grads[1], exact_grads[0] + exact_grads[1], tol, "dq + dk (shared)")

    def loss(q, v):
        return (attention.cluster_attention_fused(q, None, v, I, None, scale, last_resort, eps) * g).sum()

    via_autograd = grad(loss, (0, 1))(q, v)
    np.testing.assert_array_equal(via_autograd[0], dq)
    np.testing.assert_array_equal(via_autograd[1], dv)


# ------------------------------------------------------------------------------ the grid
def _grid():
    pairs = [(1, 1), (5, 1), (5, 2), (5, 5), (33, 1), (33, 6), (33, 33), (128, 1), (128, 11), (128, 128)]
    if NO_JIT:
        pairs.remove((128, 128))  # as plain Python, 10 s per case; W = T is covered at T = 33
    cases = []
    for i, ((T, W), K, dtype, shared, last_resort) in enumerate(itertools.product(
            pairs, [1, 3, 8], [np.float32, np.float64], [True, False], [False, True])):
        # B, H, D, eps and the scale rotate with coprime periods so that they meet every other factor.
        B, H, D = 1 + i % 2, 1 + (i // 3) % 2, (1, 4, 16)[i % 5 % 3]
        eps = (1e-2, 1e-5)[i % 7 % 2]
        scale = (1 / np.sqrt(D), 2.0)[i % 11 % 2]
        qk = "shared" if shared else "separate"
        cases.append(pytest.param(
            B, H, T, K, W, D, dtype, shared, last_resort, eps, scale,
            id=f"B{B}H{H}T{T}K{K}W{W}D{D}-{dtype.__name__}-{qk}-lr{int(last_resort)}"
               f"-eps{eps:g}-s{scale:.2g}"))
    return cases


@pytest.mark.parametrize("B, H, T, K, W, D, dtype, shared, last_resort, eps, scale", _grid())
def test_fused_equals_reference(B, H, T, K, W, D, dtype, shared, last_resort, eps, scale):
    q, k, v, g, I, J = _case(B, H, T, K, W, D, dtype, shared, seed=T * 1000 + K * 10 + W)
    _assert_matches_reference(q, k, v, g, I, J, scale, last_resort, eps)


def test_shared_qk_gradient_adds_both_roles():
    """With k = q (one array), autograd adds the VJP's dq and dk: the reference does the same."""
    q, _, v, g, I, _ = _case(2, 2, 33, 3, 6, 4, np.float64, shared=True)

    def loss(fn, q):
        return (fn(q, q, v) * g).sum()

    ref = grad(lambda q: loss(lambda a, b, c: attention.cluster_attention_reference(
        a, b, c, I, I, scale=0.5, self_attend="last_resort", combine_eps=1e-5), q))(q)
    fused = grad(lambda q: loss(lambda a, b, c: attention.cluster_attention_fused(
        a, b, c, I, I, 0.5, True, 1e-5), q))(q)
    _assert_close(fused, ref, TOL[np.float64], "dq (shared)")


def test_primitive_accepts_float64_cotangent_and_int32_windows():
    """A float32 output whose loss mixes in float64 constants gets a float64 cotangent: still works."""
    q, k, v, g, I, J = _case(1, 2, 33, 3, 6, 4, np.float32, shared=False)

    def loss(q, g, I, J):
        return (attention.cluster_attention_fused(q, k, v, I, J, 0.5, False, 1e-2) * g).sum()

    expected = grad(loss)(q, g, I, J)
    actual = grad(loss)(q, g.astype(np.float64), I.astype(np.int32), J.astype(np.int32))
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


# ------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("self_attend", ["allow", "last_resort"])
@pytest.mark.parametrize("shared", [True, False])
def test_one_cluster_of_everything_is_dense_attention(dtype, self_attend, shared):
    """K=1, W=T: every token counted once, so routing = dense causal attention / (1 + eps)."""
    B, H, T, D, eps, scale = 2, 2, 24, 8, 1e-2, 0.4
    q, k, v, g, _, _ = _case(B, H, T, 1, T, D, dtype, shared)
    window = np.broadcast_to(np.arange(T), (B, H, 1, T)).copy()  # (B, H, 1, T)
    last_resort = self_attend == "last_resort"
    out = attention.cluster_attention_fused(q, k, v, window, window, scale, last_resort, eps)
    dense = attention.dense_causal_attention(q, k, v, scale=scale, self_attend=self_attend)
    _assert_close(out * dtype(1 + eps), dense, TOL[dtype], "routing * (1 + eps) vs dense")
    _assert_matches_reference(q, k, v, g, window, window, scale, last_resort, eps)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("last_resort", [False, True])
def test_query_rows_with_no_visible_key_give_zero(dtype, last_resort):
    """Separate QK: a key window that starts after a query leaves that query nothing to see."""
    rng = np.random.default_rng(3)
    T, D = 12, 4
    q, k, v, g = (rng.standard_normal((1, 1, T, D)).astype(dtype) for _ in range(4))
    I = np.array([[[[0, 1, 2, 7], [1, 4, 9, 10]]]])  # (1, 1, 2, 4)
    J = np.array([[[[3, 5, 6, 7], [2, 3, 4, 5]]]])  # queries 0, 1, 2 see no key (nor 1 in cluster 2)
    out, grads = _assert_matches_reference(q, k, v, g, I, J, 0.7, last_resort, 1e-2)
    np.testing.assert_array_equal(out[0, 0, [0, 1, 2]], 0)
    assert np.abs(out[0, 0, [4, 7, 9, 10]]).min() > 0
    np.testing.assert_array_equal(grads[0][0, 0, [0, 1, 2]], 0)  # dq of the blind queries
    # Nothing visible anywhere: all zeros, all gradients zero.
    J_late = np.array([[[[8, 9, 10, 11], [11, 11, 11, 11]]]])
    I_early = np.array([[[[0, 1, 2, 3], [4, 5, 6, 7]]]])
    out, grads = _assert_matches_reference(q, k, v, g, I_early, J_late, 0.7, last_resort, 1e-2)
    np.testing.assert_array_equal(out, 0)
    for x in grads:
        np.testing.assert_array_equal(x, 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shared", [True, False])
def test_repeated_coverage_and_tokens_in_no_cluster(dtype, shared):
    """Token 2 is in three clusters, 4 and 6 in two; tokens 5, 7, 9 in none: their output is 0."""
    rng = np.random.default_rng(4)
    T, D = 10, 3
    q, k, v, g = (rng.standard_normal((1, 1, T, D)).astype(dtype) for _ in range(4))
    if shared:
        k = q
    I = np.array([[[[0, 2, 4, 6], [2, 4, 6, 8], [1, 2, 3, 4]]]])  # (1, 1, 3, 4)
    J = I if shared else np.array([[[[0, 1, 2, 3], [2, 3, 6, 8], [0, 4, 5, 9]]]])
    for eps in (1e-2, 1e-5):
        out, (dq, dk, dv) = _assert_matches_reference(q, k, v, g, I, J, 0.5, False, eps)
        np.testing.assert_array_equal(out[0, 0, [5, 7, 9]], 0)
        np.testing.assert_array_equal(dq[0, 0, [5, 7, 9]], 0)  # never a query
        if shared:
            np.testing.assert_array_equal(dk[0, 0, [5, 7, 9]], 0)  # never a key either
            np.testing.assert_array_equal(dv[0, 0, [5, 7, 9]], 0)
    # Position 0 sees only itself in cluster 0: its output is v[0] / (1 + eps), whatever the logits.
    out = attention.cluster_attention_fused(q, k, v, I, J, 0.5, False, 1e-2)
    _assert_close(out[0, 0, 0], v[0, 0, 0] / dtype(1 + 1e-2), TOL[dtype], "position 0")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_deterministic_for_any_thread_count_and_schedule(dtype):
    B, H, T, K, W, D = 2, 2, 96, 6, 20, 8
    q, k, v, g, I, J = _case(B, H, T, K, W, D, dtype, shared=False, seed=5)
    before = numba.get_num_threads()
    results, shared_results = [], []
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            for schedule in ("auto", "by_cluster", "by_head", "by_cluster"):
                out = numba_routing.forward(q, k, v, I, J, 0.3, True, 1e-2, schedule=schedule)
                grads = numba_routing.backward(g, q, k, v, I, J, 0.3, True, 1e-2, schedule=schedule)
                results.append((out, *grads))
                out = numba_routing.forward(q, None, v, I, None, 0.3, True, 1e-2, schedule=schedule)
                dq, _, dv = numba_routing.backward(g, q, None, v, I, None, 0.3, True, 1e-2, schedule=schedule)
                shared_results.append((out, dq, dv))
    finally:
        numba.set_num_threads(before)
    for runs in (results, shared_results):
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="schedule must be one of"):
        numba_routing.forward(q, k, v, I, J, 0.3, True, 1e-2, schedule="threads")


@pytest.mark.parametrize("shared, last_resort", [(True, False), (True, True), (False, False), (False, True)])
def test_check_grads_finite_differences(shared, last_resort):
    q, k, v, _, I, J = _case(1, 2, 9, 3, 4, 3, np.float64, shared, seed=6)

    def f(q, k, v):
        return attention.cluster_attention_fused(q, k, v, I, J, 0.8, last_resort, 1e-2)

    check_grads(f, modes=["rev"], order=1)(q, k, v)
    if shared:  # the k=None form, whose dq also carries the keys' gradient

        def f_shared(q, v):
            return attention.cluster_attention_fused(q, None, v, I, None, 0.8, last_resort, 1e-2)

        check_grads(f_shared, modes=["rev"], order=1)(q, v)


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused():
    q, k, v, g, I, J = _case(1, 1, 8, 2, 3, 4, np.float64, shared=False)
    args = (0.5, False, 1e-2)
    with pytest.raises(TypeError, match="k must be"):
        numba_routing.forward(q, k.astype(np.float32), v, I, J, *args)
    with pytest.raises(TypeError, match="g must be"):
        numba_routing.backward(g.astype(np.float32), q, k, v, I, J, *args)
    with pytest.raises(ValueError, match="v must have"):
        numba_routing.forward(q, k, v[:, :, :4], I, J, *args)
    with pytest.raises(ValueError, match="q must be C-contiguous"):
        numba_routing.forward(np.asfortranarray(q), k, v, I, J, *args)
    with pytest.raises(TypeError, match="query_windows must be an int64"):
        numba_routing.forward(q, k, v, I.astype(np.int32), J, *args)
    with pytest.raises(ValueError, match="key_windows must hold positions"):
        numba_routing.forward(q, k, v, I, J + 8, *args)
    with pytest.raises(ValueError, match="key_windows must be sorted"):
        numba_routing.forward(q, k, v, I, np.ascontiguousarray(J[..., ::-1]), *args)
    with pytest.raises(ValueError, match="key_windows must have shape"):
        numba_routing.forward(q, k, v, I, J[:, :, :1].copy(), *args)
    with pytest.raises(ValueError, match="k and key_windows must both be given, or both be None"):
        numba_routing.forward(q, None, v, I, J, *args)
    with pytest.raises(ValueError, match="k and key_windows must both be given, or both be None"):
        numba_routing.backward(g, q, k, v, I, None, *args)
