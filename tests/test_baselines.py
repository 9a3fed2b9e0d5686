"""The paper's baselines (rt_numpy.baselines): strided and LSH attention, and ``visibility``.

1. each attention equals softmax attention under its visibility matrix, in values and gradients
   (autograd through a dense form written here, and finite differences);
2. the keys each query sees match the documented count;
3. strided attention is strictly causal; LSH is not (a later token moves the chunk boundaries),
   shown on a constructed case;
4. ``visibility`` of dense, local and nearest routing is what those attentions compute;
5. the model runs every head kind, with the same parameter count;
6. bad input gets a clear error.
"""
import dataclasses

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from autograd.tracer import getval

from rt_numpy import attention as A
from rt_numpy import baselines as S
from rt_numpy import kmeans, model

TOL = 1e-12


def _qkv(B, H, T, D, rng):
    return tuple(rng.standard_normal((B, H, T, D)) for _ in range(3))


def _dense_form(q, k, v, counts, scale, self_attend):
    """``sum_j n_ij e^{l_ij} v_j / sum_j n_ij e^{l_ij}`` with autograd.numpy (n: the visibility counts)."""
    T = q.shape[2]
    logits = scale * anp.einsum("bhid,bhjd->bhij", q, k)
    if self_attend == "last_resort":
        logits = anp.where(np.eye(T, dtype=bool), A.SELF_LOGIT, logits)
    logits = anp.where(counts > 0, logits, -np.inf)
    top = np.max(getval(logits), axis=-1, keepdims=True)  # a constant shift; hidden logits are -inf
    weights = counts * anp.exp(logits - top)
    return anp.einsum("bhij,bhjd->bhid", weights, v) / anp.sum(weights, -1, keepdims=True)


# ------------------------------------------------------------------------------ 1. dense forms
@pytest.mark.parametrize("T,stride", [(12, 1), (12, 3), (12, 5), (13, 4), (7, 7), (5, 9)])
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
def test_strided_equals_its_dense_form(T, stride, self_attend, rng):
    q, k, v = _qkv(2, 2, T, 4, rng)
    counts = np.broadcast_to(S.visibility("strided", T, stride=stride), (2, 2, T, T))
    w = rng.standard_normal(q.shape)

    def ours(q, k, v):
        return anp.sum(S.strided_attention(q, k, v, stride=stride, self_attend=self_attend) * w)

    def dense(q, k, v):
        return anp.sum(_dense_form(q, k, v, counts, 0.5, self_attend) * w)

    np.testing.assert_allclose(S.strided_attention(q, k, v, stride=stride, self_attend=self_attend),
                               _dense_form(q, k, v, counts, 0.5, self_attend), rtol=0, atol=TOL)
    for got, want in zip(grad(ours, (0, 1, 2))(q, k, v), grad(dense, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    check_grads(ours, (0, 1, 2), modes=["rev"], order=1)(q, k, v)


def _lsh_case(T, D, K, W, n_hashes, rng, logits="normalized", norm="ln"):
    q, _, v = _qkv(2, 2, T, D, rng)
    rot = S.lsh_rotations(2, D, K, n_hashes=n_hashes, seed=int(rng.integers(1000)), dtype=np.float64)
    chunks = S.lsh_chunks(S.lsh_buckets(kmeans.normalize(q, norm), rot), W)
    return q, v, rot, S.visibility("lsh", T, chunks=chunks)


@pytest.mark.parametrize("T,K,W", [(16, 4, 4), (16, 2, 8), (15, 4, 4), (10, 6, 3), (9, 2, 9), (8, 4, 1)])
@pytest.mark.parametrize("n_hashes", [1, 2, 3])
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
def test_lsh_equals_its_dense_form(T, K, W, n_hashes, self_attend, rng):
    """Each pair counts as many times as the hash rounds in which it meets (one round: plain masking)."""
    q, v, rot, counts = _lsh_case(T, 4, K, W, n_hashes, rng)
    qn = kmeans.normalize(q)
    w = rng.standard_normal(q.shape)

    def ours(q, v):
        return anp.sum(S.lsh_attention(q, None, v, rot, window_size=W, self_attend=self_attend) * w)

    def dense(q, v):
        qn = kmeans.normalize(q)
        return anp.sum(_dense_form(qn, qn, v, counts, 1.0, self_attend) * w)

    np.testing.assert_allclose(S.lsh_attention(q, None, v, rot, window_size=W, self_attend=self_attend),
                               _dense_form(qn, qn, v, counts, 1.0, self_attend), rtol=0, atol=1e-11)
    for got, want in zip(grad(ours, (0, 1))(q, v), grad(dense, (0, 1))(q, v)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("logits,norm", [("normalized", "ln"), ("normalized", "l2"), ("scaled", "ln")])
def test_lsh_gradients_match_finite_differences(n_hashes, logits, norm, rng):
    q, v, rot, _ = _lsh_case(12, 4, 4, 4, n_hashes, rng, logits, norm)
    w = rng.standard_normal(q.shape)

    def total(q, v):
        return anp.sum(S.lsh_attention(q, None, v, rot, window_size=4, logits=logits, norm=norm) * w)

    check_grads(total, (0, 1), modes=["rev"], order=1)(q, v)


def test_lsh_scaled_logits_use_raw_queries_against_unit_keys(rng):
    q, v, rot, counts = _lsh_case(12, 4, 4, 4, 1, rng, "scaled")
    keys = q / np.linalg.norm(q, axis=-1, keepdims=True)
    want = _dense_form(q, keys, v, counts, 0.5, "last_resort")
    got = S.lsh_attention(q, None, v, rot, window_size=4, logits="scaled")
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


# ------------------------------------------------------------------------------ 2. key counts
@pytest.mark.parametrize("T,stride", [(64, 8), (60, 7), (16, 1), (5, 9)])
def test_strided_key_count_formula(T, stride):
    """Query i sees i // S + 1 keys; with S | T, (T / S + 1) / 2 on average."""
    counts = S.visibility("strided", T, stride=stride)
    np.testing.assert_array_equal(counts.sum(-1), np.arange(T) // stride + 1)
    if T % stride == 0:
        assert S.keys_per_query(counts) == pytest.approx((T // stride + 1) / 2)


@pytest.mark.parametrize("T,K,W", [(32, 4, 8), (30, 4, 8), (16, 2, 4)])
def test_lsh_key_count(T, K, W, rng):
    """One round: query i at rank r of chunk n sees the keys of chunks n-1 and n at positions <= i
    (at most 2W, and at least 1: itself), counted here from the sorted order with loops."""
    q, _, rot, counts = _lsh_case(T, 4, K, W, 1, rng)
    chunks = S.lsh_chunks(S.lsh_buckets(kmeans.normalize(q), rot), W)
    for b in range(2):
        for h in range(2):
            flat = chunks[b, h, 0].reshape(-1)
            for s, i in enumerate(flat):
                if i == T:
                    continue
                n = s // W
                seen = [j for j in flat[max(0, (n - 1) * W):(n + 1) * W] if j <= i]
                assert counts[b, h, i].sum() == len(seen)
    assert 1 <= counts.sum(-1).min() and counts.sum(-1).max() <= 2 * W


def test_balanced_routing_key_count_with_full_windows():
    """K W = T and each token in one window: (W + 1) / 2 keys on average, strided's count at S = K."""
    T, K, W = 16, 4, 4
    windows = np.arange(T).reshape(1, 1, K, W)  # consecutive windows: a partition
    counts = S.visibility("routing", T, windows=windows)
    assert S.keys_per_query(counts) == pytest.approx((W + 1) / 2)
    assert S.keys_per_query(S.visibility("strided", T, stride=K)) == pytest.approx((W + 1) / 2)


# ------------------------------------------------------------------------------ 3. causality
@pytest.mark.parametrize("T,stride", [(16, 4), (15, 2)])
def test_strided_is_strictly_causal(T, stride, rng):
    q, k, v = _qkv(1, 2, T, 4, rng)
    out = S.strided_attention(q, k, v, stride=stride)
    for t in range(1, T):
        q2, k2, v2 = (x.copy() for x in (q, k, v))
        for x in (q2, k2, v2):
            x[:, :, t:] = rng.standard_normal(x[:, :, t:].shape)
        np.testing.assert_allclose(S.strided_attention(q2, k2, v2, stride=stride)[:, :, :t], out[:, :, :t],
                                   rtol=0, atol=TOL)


def test_lsh_leaks_the_future_through_the_chunk_boundaries(rng):
    """A later token that changes bucket shifts the sorted order, and an earlier query's chunk with it.

    Positions 0..7, two buckets, W=2.  Moving token 7 from the last bucket to the first pushes every
    token of the last bucket one place on, across a chunk boundary: an earlier query now sees a
    different set of earlier keys, so its output changes although no earlier token did.
    """
    T, D, W = 8, 4, 2
    rot = np.zeros((1, 1, D, 1))
    rot[0, 0, 0, 0] = 1.0  # bucket 0 when the first coordinate of the normalised token is positive
    q = rng.standard_normal((1, 1, T, D))
    q[..., 0] = np.array([3, -3, 3, -3, -3, 3, -3, -3.0]) + 0.1 * q[..., 0]
    v = rng.standard_normal((1, 1, T, D))
    out = S.lsh_attention(q, None, v, rot, window_size=W, norm="l2")
    q2 = q.copy()
    q2[0, 0, 7, 0] = 3.0  # the last token joins bucket 0
    out2 = S.lsh_attention(q2, None, v, rot, window_size=W, norm="l2")
    chunks = [S.lsh_chunks(S.lsh_buckets(kmeans.normalize(x, "l2"), rot), W) for x in (q, q2)]
    before = [S.visibility("lsh", T, chunks=c)[0, 0, :7, :7] for c in chunks]
    assert not np.array_equal(before[0], before[1]), "the earlier queries' visible keys should change"
    leak = np.abs(out2 - out)[0, 0, :7].max(axis=-1)
    assert leak.max() > 1e-3


def test_lsh_never_sees_a_later_key(rng):
    q, v, rot, counts = _lsh_case(32, 4, 4, 4, 3, rng)
    assert not np.triu(counts.sum(axis=(0, 1)), 1).any()


# ------------------------------------------------------------------------------ 4. visibility of the others
@pytest.mark.parametrize("T,L,look_back", [(12, 4, 1), (12, 3, 2), (10, 4, 0)])
def test_visibility_of_local_and_dense(T, L, look_back, rng):
    q, k, v = _qkv(1, 2, T, 4, rng)
    counts = np.broadcast_to(S.visibility("local", T, block_size=L, look_back=look_back), (1, 2, T, T))
    np.testing.assert_allclose(A.local_attention(q, k, v, block_size=L, look_back=look_back),
                               _dense_form(q, k, v, counts, 0.5, "allow"), rtol=0, atol=TOL)
    dense = np.broadcast_to(S.visibility("dense", T), (1, 2, T, T))
    np.testing.assert_allclose(A.dense_causal_attention(q, k, v), _dense_form(q, k, v, dense, 0.5, "allow"),
                               rtol=0, atol=TOL)


def test_visibility_of_nearest_routing(rng):
    T, K = 16, 3
    q, _, v = _qkv(1, 2, T, 4, rng)
    means = kmeans.normalize(rng.standard_normal((2, K, 4)))
    out, _, stats = A.routing_attention(q, None, v, means, membership="nearest", impl="ref")
    qn = kmeans.normalize(q)
    counts = S.visibility("routing", T, assignments=stats["assignments"][0])
    np.testing.assert_allclose(out, _dense_form(qn, qn, v, counts, 1.0, "allow") / (1 + 1e-2), rtol=0, atol=TOL)


def test_attention_mass_recall(rng):
    q, k, _ = _qkv(1, 2, 16, 4, rng)
    dense = S.attention_mass_recall(q, k, S.visibility("dense", 16), scale=0.5)
    np.testing.assert_allclose(dense, 1.0, rtol=0, atol=1e-12)
    local = S.attention_mass_recall(q, k, S.visibility("local", 16, block_size=4, look_back=0), scale=0.5)
    assert np.all(local <= 1 + 1e-12) and np.all(local > 0)
    np.testing.assert_allclose(local[..., :4], 1.0, rtol=0, atol=1e-12)  # the first block sees all it could
    # one query by hand: the share of its dense softmax that falls on its own block
    i = 9
    logits = 0.5 * k[0, 1, :i + 1] @ q[0, 1, i]
    p = np.exp(logits - logits.max())
    assert local[0, 1, i] == pytest.approx(p[8:].sum() / p.sum(), abs=1e-12)


# ------------------------------------------------------------------------------ 5. in the model
KINDS = [dict(n_route_heads=0), {}, dict(membership="nearest"), dict(attention="strided"),
         dict(attention="lsh"), dict(attention="lsh", n_hashes=2), dict(attention="dense")]


@pytest.mark.parametrize("changes", KINDS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "routing")
def test_model_runs_every_head_kind(changes):
    cfg = dataclasses.replace(model.Config(seq_len=32, width=16, n_layers=2, num_heads=2, n_route_heads=1,
                                           num_clusters=4, window_size=8, block_size=8, dtype="float64"),
                              **changes)
    rng = np.random.default_rng(0)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    assert bool(states) == (cfg.attention == "routing" and cfg.n_route_heads > 0)
    assert sum(p.size for p in params.values()) == sum(
        p.size for p in model.init_params(model.Config(**{**cfg.to_dict(), "attention": "routing"}), rng).values())
    x = rng.integers(0, 256, (2, 32))
    logits, _ = model.forward(params, x, cfg, states)
    assert logits.shape == (2, 32, 256) and np.all(np.isfinite(logits))
    logits16, _ = model.forward(params, x[:, :16], cfg, states)  # a shorter window runs too
    assert logits16.shape == (2, 16, 256)
    if cfg.attention == "strided" or cfg.n_route_heads == 0:  # strictly causal models: a prefix is a prefix
        np.testing.assert_allclose(logits16, logits[:, :16], rtol=0, atol=1e-10)


def test_model_lsh_rotations_are_fixed_by_the_seed():
    cfg = model.Config(seq_len=32, width=16, num_heads=2, n_route_heads=1, attention="lsh", window_size=8,
                       block_size=8)
    np.testing.assert_array_equal(model.lsh_rotations(cfg, 1), model.lsh_rotations(cfg, 1))
    assert not np.array_equal(model.lsh_rotations(cfg, 1),
                              model.lsh_rotations(dataclasses.replace(cfg, lsh_seed=1), 1))
    assert model.lsh_rotations(cfg, 0) is None  # layer 0 has no LSH heads (n_route_layers=1)


# ------------------------------------------------------------------------------ 6. bad input
@pytest.mark.parametrize("call,exc,pattern", [
    (lambda q, v: S.strided_attention(q, q, v, stride=0), ValueError, "stride must be >= 1, got 0"),
    (lambda q, v: S.strided_attention(q, q, v, stride=2.0), TypeError, "stride must be an integer"),
    (lambda q, v: S.strided_attention(q, q, v, stride=2, self_attend="no"), ValueError, "self_attend"),
    (lambda q, v: S.lsh_attention(q, None, v, S.lsh_rotations(2, 4, 4), window_size=9), ValueError,
     r"window_size must be in \[1, 8\] \(T=8\), got 9"),
    (lambda q, v: S.lsh_attention(q, None, v, S.lsh_rotations(3, 4, 4), window_size=4), ValueError,
     "rotations must have shape"),
    (lambda q, v: S.lsh_attention(q, None, v, S.lsh_rotations(2, 4, 4), window_size=4, norm="x"), ValueError,
     "norm must be one of"),
    (lambda q, v: S.lsh_rotations(2, 4, 3), ValueError, "num_buckets must be even"),
    (lambda q, v: S.lsh_rotations(2, 4, 4, n_hashes=0), ValueError, "n_hashes must be >= 1"),
    (lambda q, v: S.visibility("ring", 8), ValueError, "kind must be one of"),
    (lambda q, v: model.Config(attention="lsh", num_clusters=3), ValueError, "even num_clusters"),
    (lambda q, v: model.Config(attention="lsh", shared_qk=False), ValueError, "shared_qk=True"),
    (lambda q, v: model.Config(attention="sparse"), ValueError, "attention must be one of"),
    (lambda q, v: model.Config(n_hashes=0), ValueError, "n_hashes must be >= 1"),
])
def test_bad_input(call, exc, pattern, rng):
    q, _, v = _qkv(1, 2, 8, 4, rng)
    with pytest.raises(exc, match=pattern):
        call(q, v)
