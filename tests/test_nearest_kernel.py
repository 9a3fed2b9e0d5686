"""The fused ``membership="nearest"`` kernel computes what the reference computes.

:func:`rt_numpy.attention.nearest_attention_fused` (Numba kernels in
:mod:`rt_numpy.kernels.numba_nearest`) against the dense masked reference
:func:`rt_numpy.attention._nearest_attention`:

* through :func:`rt_numpy.attention.routing_attention` (``impl="numba"``
  against ``impl="ref"``): the output and autograd's gradients of
  ``sum(out * g)`` in q, k and v, to 1e-10 in float64 and 1e-5 in float32
  (relative to the largest entry), over a grid of T (1, 7, 37, 64), K (1 to 9),
  B and H (1, 2), shared and separate QK, both logit kinds, both self rules,
  with and without padding, both dtypes; padded query rows are exactly 0 in both;
* on the primitive with assignments written by hand: empty clusters, K=1
  (dense causal attention / (1 + eps)), ties (identical tokens), queries whose
  cluster has no earlier key, rows that are all padding;
* determinism: bitwise the same results with 1 and 2 threads;
* ``check_grads`` (finite differences) on the primitive in float64;
* ``model.forward`` of a nearest Config: the same logits with ``impl="numba"`` and ``"ref"``;
* the dispatch: ``impl="numba"`` runs the kernel, ``"ref"`` and ``mem_kv`` the reference;
* bad input is refused with the name of the argument.
"""
import itertools

import numba
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads

from rt_numpy import attention, model
from rt_numpy.kernels import numba_nearest

TOL = {np.float32: 1e-5, np.float64: 1e-10}


# ------------------------------------------------------------------------------ helpers
def _assert_close(actual, expected, tol, what, floor=0.0):
    """Equal to ``tol`` relative to the largest entry of ``expected`` (or to ``floor``, if larger)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, what
    assert np.isfinite(actual).all(), f"{what}: NaN or infinity"
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=max(tol * np.abs(expected).max(), floor),
                               err_msg=what)


def _inputs(B, H, T, D, K, dtype, seed):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))
    means = rng.standard_normal((H, K, D)).astype(dtype)  # (H, K, D)
    return q, k, v, g, means


def _routing(impl, q, k, v, g, means, shared_qk, **options):
    """Output, stats and the gradients of sum(out * g) in (q, v) or (q, k, v) of routing_attention."""
    def run(q, k, v):
        return attention.routing_attention(q, None if shared_qk else k, v, means, membership="nearest",
                                           shared_qk=shared_qk, impl=impl, **options)

    def loss(*qkv):
        q, v = qkv[0], qkv[-1]
        return (run(q, None if shared_qk else qkv[1], v)[0] * g).sum()

    out, _, stats = run(q, k, v)
    arrays = (q, v) if shared_qk else (q, k, v)
    return out, stats, grad(loss, tuple(range(len(arrays))))(*arrays)


def _primitive(q, k, v, g, aq, ak, K, scale, last_resort, eps):
    """Fused output and gradients of sum(out * g) in q, k, v (through the primitive's VJP)."""
    def loss(q, k, v):
        return (attention.nearest_attention_fused(q, k, v, aq, ak, K, scale, last_resort, eps) * g).sum()

    return attention.nearest_attention_fused(q, k, v, aq, ak, K, scale, last_resort, eps), \
        grad(loss, (0, 1, 2))(q, k, v)


def _reference(q, k, v, g, aq, ak, scale, last_resort, eps):
    """The dense masked reference with the same assignments: output and gradients in q, k, v."""
    self_attend = "last_resort" if last_resort else "allow"
    assignments = np.stack([aq, ak])  # (2, B, H, T)

    def run(q, k, v):
        return attention._nearest_attention(q, k, v, assignments, scale, self_attend, eps)

    return run(q, k, v), grad(lambda q, k, v: (run(q, k, v) * g).sum(), (0, 1, 2))(q, k, v)


def _assert_primitive_matches(q, k, v, g, aq, ak, K, scale=0.7, last_resort=False, eps=1e-2, floor=0.0):
    tol = TOL[q.dtype.type]
    out, grads = _primitive(q, k, v, g, aq, ak, K, scale, last_resort, eps)
    ref_out, ref_grads = _reference(q, k, v, g, aq, ak, scale, last_resort, eps)
    _assert_close(out, ref_out, tol, "out")
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(a, b, tol, name, floor)
    return out, grads


# ------------------------------------------------------------------------------ the grid
def _grid():
    pairs = [(1, 1), (7, 1), (7, 3), (37, 4), (37, 9), (64, 8)]
    cases = []
    for i, ((T, K), dtype, shared_qk, self_attend) in enumerate(itertools.product(
            pairs, [np.float32, np.float64], [True, False], ["allow", "last_resort"])):
        # B, H, D, logits, eps and padding rotate with coprime periods so that they meet every other factor.
        B, H, D = 1 + i % 2, 1 + (i // 3) % 2, (4, 8, 16)[i % 5 % 3]
        logits = ("normalized", "scaled")[i % 7 % 2]
        eps = (1e-2, 1e-5)[i % 11 % 2]
        padded = T > 1 and i % 3 == 0
        cases.append(pytest.param(
            B, H, T, K, D, dtype, shared_qk, self_attend, logits, eps, padded,
            id=f"B{B}H{H}T{T}K{K}D{D}-{dtype.__name__}-{'shared' if shared_qk else 'separate'}-{self_attend}"
               f"-{logits}-eps{eps:g}{'-padded' if padded else ''}"))
    return cases


@pytest.mark.parametrize("B, H, T, K, D, dtype, shared_qk, self_attend, logits, eps, padded", _grid())
def test_fused_equals_reference(B, H, T, K, D, dtype, shared_qk, self_attend, logits, eps, padded):
    q, k, v, g, means = _inputs(B, H, T, D, K, dtype, seed=T * 100 + K)
    key_mask = None
    if padded:  # the last row ends early (right padding); every other row is whole
        key_mask = np.ones((B, T), bool)
        key_mask[-1, (2 * T) // 3:] = False
    options = dict(self_attend=self_attend, logits=logits, combine_eps=eps, key_mask=key_mask)
    out, stats, grads = _routing("numba", q, k, v, g, means, shared_qk, **options)
    ref_out, ref_stats, ref_grads = _routing("ref", q, k, v, g, means, shared_qk, **options)
    np.testing.assert_array_equal(stats["assignments"], ref_stats["assignments"])  # the same clusters
    tol = TOL[dtype]
    _assert_close(out, ref_out, tol, "out")
    for name, a, b in zip(("dq", "dv") if shared_qk else ("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(a, b, tol, name)
    if padded:  # a padding query's row is the reference's: exactly 0, and so are its gradients
        def at_padding(x):
            return x.transpose(0, 2, 1, 3)[~key_mask]  # (B, H, T, D) -> (padded tokens, H, D)

        np.testing.assert_array_equal(at_padding(out), at_padding(ref_out))
        np.testing.assert_array_equal(at_padding(out), 0)
        for a in grads:
            np.testing.assert_array_equal(at_padding(a), 0)


# ------------------------------------------------------------------------------ edge cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("last_resort", [False, True])
def test_empty_clusters_and_queries_that_see_nothing(dtype, last_resort):
    """K=5 with clusters 1, 2 and 4 empty; with separate QK, cluster 3's first queries come before its keys."""
    q, k, v, g, _ = _inputs(1, 2, 10, 4, 1, dtype, seed=1)
    aq = np.array([[[0, 3, 0, 3, 3, 0, 3, 0, 0, 3]] * 2])  # (1, 2, 10)
    ak = np.array([[[0, 0, 0, 3, 0, 3, 3, 0, 3, 0]] * 2])  # cluster 3's first key is at 3
    out, (dq, dk, dv) = _assert_primitive_matches(q, k, v, g, aq, ak, 5, last_resort=last_resort)
    np.testing.assert_array_equal(out[0, :, 1], 0)  # query 1 (cluster 3) sees no key
    np.testing.assert_array_equal(dq[0, :, 1], 0)
    assert np.abs(out[0, :, 3]).min() > 0
    _assert_primitive_matches(q, q, v, g, aq, aq, 5, last_resort=last_resort)  # shared assignments


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("self_attend", ["allow", "last_resort"])
def test_one_cluster_is_dense_causal_attention(dtype, self_attend):
    """K=1: every token in cluster 0, so the kernel is dense causal attention / (1 + eps)."""
    B, H, T, D, eps, scale = 2, 2, 23, 8, 1e-2, 0.4
    q, k, v, g, _ = _inputs(B, H, T, D, 1, dtype, seed=2)
    a = np.zeros((B, H, T), np.int64)
    out, _ = _assert_primitive_matches(q, k, v, g, a, a, 1, scale, self_attend == "last_resort", eps)
    dense = attention.dense_causal_attention(q, k, v, scale=scale, self_attend=self_attend)
    _assert_close(out * dtype(1 + eps), dense, TOL[dtype], "nearest * (1 + eps) vs dense")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_and_rows_of_padding(dtype):
    """Identical tokens (tied logits: equal weights) and a batch row that is all padding (all -1)."""
    q, k, v, g, _ = _inputs(2, 1, 9, 4, 1, dtype, seed=3)
    q[:, :, :] = q[:, :, :1]  # every query the same vector: a query's logits are all equal
    k[:, :, :] = k[:, :, :1]
    a = np.array([[[1, 1, 0, 1, 0, 0, 1, 1, 0]], [[-1] * 9]])  # (2, 1, 9): row 1 is all padding
    # dq and dk are 0 in exact arithmetic (equal keys, equal queries): both paths give rounding noise,
    # compared against the size of the terms that cancel.
    floor = TOL[dtype] * np.abs(g).max() * np.abs(v).max() * np.abs(q).max()
    for last_resort in (False, True):
        out, grads = _assert_primitive_matches(q, k, v, g, a, a, 2, last_resort=last_resort, floor=floor)
        np.testing.assert_array_equal(out[1], 0)
        for x in grads:
            np.testing.assert_array_equal(x[1], 0)
    out, _ = _primitive(q, k, v, g, a, a, 2, 0.7, False, 1e-2)
    expected = np.mean(v[0, 0, [0, 1, 3]], axis=0) / dtype(1 + 1e-2)  # query 3 weighs keys 0, 1, 3 equally
    _assert_close(out[0, 0, 3], expected, TOL[dtype], "tied logits")


def test_shared_form_adds_both_gradients():
    """``k=None, key_assignments=None`` (shared QK): the output and dv are bitwise those of k=q; dq holds
    the keys' gradient too.  The raw kernels give the primitive's numbers."""
    q, _, v, g, _ = _inputs(2, 2, 37, 8, 1, np.float64, seed=4)
    a = np.random.default_rng(5).integers(-1, 4, (2, 2, 37))
    args = (4, 0.5, True, 1e-2)
    out, (dq, dk, dv) = _primitive(q, q, v, g, a, a, *args)
    np.testing.assert_array_equal(numba_nearest.forward(q, None, v, a, None, *args), out)
    shared_dq, shared_dk, shared_dv = numba_nearest.backward(g, q, None, v, a, None, *args)
    assert shared_dk is None
    np.testing.assert_array_equal(shared_dv, dv)
    _assert_close(shared_dq, dq + dk, TOL[np.float64], "dq + dk (shared)")
    for x, y in zip(numba_nearest.backward(g, q, q, v, a, a, *args), (dq, dk, dv)):
        np.testing.assert_array_equal(x, y)

    def loss(q, v):
        return (attention.nearest_attention_fused(q, None, v, a, None, *args) * g).sum()

    via_autograd = grad(loss, (0, 1))(q, v)
    np.testing.assert_array_equal(via_autograd[0], shared_dq)
    np.testing.assert_array_equal(via_autograd[1], shared_dv)


def test_float64_cotangent_of_a_float32_output():
    """A float32 output whose loss mixes in float64 constants gets a float64 cotangent: still float32."""
    q, k, v, g, _ = _inputs(1, 2, 16, 4, 1, np.float32, seed=6)
    a = np.random.default_rng(7).integers(0, 3, (1, 2, 16)).astype(np.int32)  # int32 assignments work too

    def loss(q, g):
        return (attention.nearest_attention_fused(q, k, v, a, a, 3, 0.5, False, 1e-2) * g).sum()

    expected = grad(loss)(q, g)
    actual = grad(loss)(q, g.astype(np.float64))
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


# ------------------------------------------------------------------------------ determinism, gradients
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bitwise_the_same_for_one_and_two_threads(dtype):
    q, k, v, g, _ = _inputs(2, 2, 64, 8, 1, dtype, seed=8)
    rng = np.random.default_rng(9)
    aq, ak = rng.integers(-1, 5, (2, 2, 64)), rng.integers(-1, 5, (2, 2, 64))
    before = numba.get_num_threads()
    results = []
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS), 1):
            numba.set_num_threads(threads)
            separate = (numba_nearest.forward(q, k, v, aq, ak, 5, 0.3, True, 1e-2),
                        *numba_nearest.backward(g, q, k, v, aq, ak, 5, 0.3, True, 1e-2))
            out = numba_nearest.forward(q, None, v, aq, None, 5, 0.3, True, 1e-2)
            dq, _, dv = numba_nearest.backward(g, q, None, v, aq, None, 5, 0.3, True, 1e-2)
            results.append(separate + (out, dq, dv))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shared, last_resort", [(True, False), (True, True), (False, False), (False, True)])
def test_check_grads_finite_differences(shared, last_resort):
    q, k, v, _, _ = _inputs(1, 2, 9, 3, 1, np.float64, seed=10)
    rng = np.random.default_rng(11)
    aq = rng.integers(-1, 3, (1, 2, 9))
    ak = aq if shared else rng.integers(-1, 3, (1, 2, 9))

    def f(q, k, v):
        return attention.nearest_attention_fused(q, k, v, aq, ak, 3, 0.8, last_resort, 1e-2)

    check_grads(f, modes=["rev"], order=1)(q, k, v)
    if shared:
        def f_shared(q, v):
            return attention.nearest_attention_fused(q, None, v, aq, None, 3, 0.8, last_resort, 1e-2)

        check_grads(f_shared, modes=["rev"], order=1)(q, v)


# ------------------------------------------------------------------------------ dispatch, model
def test_routing_attention_runs_the_kernel_on_numba_only(monkeypatch):
    """impl="numba" calls the fused kernel; "ref" and mem_kv run the dense reference."""
    q, k, v, g, means = _inputs(1, 2, 12, 4, 3, np.float64, seed=12)
    calls = []
    fused = attention.nearest_attention_fused
    monkeypatch.setattr(attention, "nearest_attention_fused", lambda *a: calls.append(1) or fused(*a))
    kw = dict(membership="nearest", shared_qk=False)
    attention.routing_attention(q, k, v, means, impl="numba", **kw)
    assert len(calls) == 1
    attention.routing_attention(q, k, v, means, impl="ref", **kw)
    mem_kv = (means, means.copy())  # (H, K, D) each
    attention.routing_attention(q, k, v, means, impl="numba", mem_kv=mem_kv, **kw)
    assert len(calls) == 1


@pytest.mark.parametrize("shared_qk, pos_encoding", [(True, "learned"), (False, "rotary")])
def test_model_forward_same_logits_with_numba_and_ref(shared_qk, pos_encoding):
    cfg = model.Config(seq_len=32, width=16, n_layers=2, num_heads=2, n_route_heads=1, num_clusters=3,
                       window_size=8, block_size=8, membership="nearest", shared_qk=shared_qk,
                       pos_encoding=pos_encoding, self_attend="last_resort", dtype="float64")
    params = model.init_params(cfg, np.random.default_rng(13))
    states = model.init_kmeans(cfg, np.random.default_rng(14))
    ids = np.random.default_rng(15).integers(0, cfg.vocab_size, (2, 29))
    key_mask = np.ones((2, 29), bool)
    key_mask[1, 20:] = False
    for mask in (None, key_mask):
        fast = model.forward(params, ids, cfg, states, impl="numba", key_mask=mask)
        ref = model.forward(params, ids, cfg, states, impl="ref", key_mask=mask)
        fast, ref = (x[0] if isinstance(x, tuple) else x for x in (fast, ref))
        _assert_close(fast, ref, TOL[np.float64], "logits")


# ------------------------------------------------------------------------------ bad input
def test_bad_input_is_refused():
    q, k, v, g, _ = _inputs(1, 1, 8, 4, 1, np.float64, seed=16)
    a = np.zeros((1, 1, 8), np.int64)
    args = (0.5, False, 1e-2)
    with pytest.raises(TypeError, match="k must be"):
        numba_nearest.forward(q, k.astype(np.float32), v, a, a, 2, *args)
    with pytest.raises(TypeError, match="g must be"):
        numba_nearest.backward(g.astype(np.float32), q, k, v, a, a, 2, *args)
    with pytest.raises(ValueError, match="v must have"):
        numba_nearest.forward(q, k, v[:, :, :4], a, a, 2, *args)
    with pytest.raises(ValueError, match="q must be C-contiguous"):
        numba_nearest.forward(np.asfortranarray(q), k, v, a, a, 2, *args)
    with pytest.raises(TypeError, match="query_assignments must be an int64"):
        numba_nearest.forward(q, k, v, a.astype(np.int32), a, 2, *args)
    with pytest.raises(ValueError, match=r"key_assignments must hold clusters in \[-1, 2\)"):
        numba_nearest.forward(q, k, v, a, a + 2, 2, *args)
    with pytest.raises(ValueError, match=r"query_assignments must hold clusters in \[-1, 2\)"):
        numba_nearest.forward(q, k, v, a - 2, a, 2, *args)
    with pytest.raises(ValueError, match="key_assignments must have shape"):
        numba_nearest.forward(q, k, v, a, a[..., :4].copy(), 2, *args)
    with pytest.raises(ValueError, match="num_clusters must be an integer >= 1, got 0"):
        numba_nearest.forward(q, k, v, a, a, 0, *args)
    with pytest.raises(ValueError, match="k and key_assignments must both be given, or both be None"):
        numba_nearest.forward(q, None, v, a, a, 2, *args)
