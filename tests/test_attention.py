"""Tests of rt_numpy.attention: dense, local and routing attention, and the multi-head layer.

What is checked (docs/algorithm.md#1-one-routing-head, docs/algorithm.md#2-local-attention,
docs/algorithm.md#3-the-causal-leak; docs/design.md#tests):

1. every attention against a plain-loop NumPy reference written here, one query row at a time;
2. routing with K=1 and W=T is dense causal attention divided by (1 + eps), for every logit mode,
   self rule and normalisation (docs/algorithm.md#110-checking-an-implementation);
3. local attention with one block, or a look-back covering the sequence, is dense attention; with
   look_back=0 a block does not see the block before it;
4. ``membership="nearest"`` is strictly causal (to rounding), ``membership="balanced"`` is not
   (docs/algorithm.md#3-the-causal-leak);
5. rows with no visible key give 0, never NaN, and finite gradients;
6. gradients equal finite differences; the centroids get no gradient;
7. the returned k-means statistics and commitment loss are those of :mod:`rt_numpy.kmeans`;
8. bad input raises a ValueError/TypeError naming the parameter and the value;
9. the multi-head layer is the heads it is made of, concatenated and projected.

Everything runs in float64 on the reference path (``impl="ref"``) unless a test is about the
fused Numba path, which it then imports with ``pytest.importorskip``.
"""
import warnings

import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads
from hypothesis import given, settings
from hypothesis import strategies as st

from rt_numpy import attention as A
from rt_numpy import backend, kmeans

TOL = 1e-12  # float64, "to rounding"
LOGIT_MODES = [  # (logits, shared_qk)
    ("normalized", True), ("normalized", False), ("scaled", True), ("scaled", False)]
WITH_MEM = [  # (logits, shared_qk, use_mem): mem_kv only exists with separate QK
    (logits, shared, use_mem) for logits, shared in LOGIT_MODES for use_mem in (False, True)
    if not (shared and use_mem)]


# ------------------------------------------------------------------------------ helpers
def _normal(shape, seed, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _qkv(B=2, H=2, T=8, D=4, seed=0, dtype=np.float64):
    return tuple(_normal((B, H, T, D), seed + i, dtype) for i in range(3))


def _means(H=2, K=2, D=4, seed=100, norm="ln", dtype=np.float64):
    return kmeans.normalize(_normal((H, K, D), seed), norm).astype(dtype)


def _l2(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _row(qi, keys, values, scale, self_mask, last_resort, mem=None):
    """Attention of one query over the given keys (plain NumPy); 0 when nothing is visible."""
    logits = keys @ qi * scale  # (n,)
    if last_resort:
        logits = np.where(self_mask, A.SELF_LOGIT, logits)
    if mem is not None:
        mk, mv = mem
        logits = np.concatenate([[mk @ qi * scale], logits])
        values = np.concatenate([mv[None], values])
    if logits.size == 0:
        return np.zeros(values.shape[-1])
    p = np.exp(logits - logits.max())
    return p @ values / p.sum()


def _naive_masked(q, k, v, visible, scale, self_attend="allow"):
    """out[b, h, i] = attention of query i over the keys j with visible[i, j] (T, T)."""
    B, H, T, D = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                js = np.flatnonzero(visible[i])
                out[b, h, i] = _row(q[b, h, i], k[b, h, js], v[b, h, js], scale, js == i,
                                    self_attend == "last_resort")
    return out


def _naive_routing(q, k, v, query_windows, key_windows, scale, self_attend, eps, mem_kv=None):
    """docs/algorithm.md#14-attention-inside-a-cluster, docs/algorithm.md#15-combine with loops: each
    cluster's queries attend to its keys at earlier positions."""
    B, H, T, D = q.shape
    out, counts = np.zeros_like(q), np.zeros((B, H, T))
    for b in range(B):
        for h in range(H):
            for c in range(query_windows.shape[2]):
                for i in query_windows[b, h, c]:
                    js = np.array([j for j in key_windows[b, h, c] if j <= i], dtype=int)
                    mem = None if mem_kv is None else (mem_kv[0][h, c], mem_kv[1][h, c])
                    out[b, h, i] += _row(q[b, h, i], k[b, h, js], v[b, h, js], scale, js == i,
                                         self_attend == "last_resort", mem)
                    counts[b, h, i] += 1
    return out / (counts + eps)[..., None]


def _naive_nearest(q, k, v, aq, ak, scale, self_attend, eps, mem_kv=None):
    """membership="nearest" with loops: query i sees key j <= i of its own cluster (and its memory)."""
    B, H, T, D = q.shape
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                c = aq[b, h, i]
                js = np.array([j for j in range(i + 1) if ak[b, h, j] == c], dtype=int)
                mem = None if mem_kv is None else (mem_kv[0][h, c], mem_kv[1][h, c])
                out[b, h, i] = _row(q[b, h, i], k[b, h, js], v[b, h, js], scale, js == i,
                                    self_attend == "last_resort", mem)
    return out / (1 + eps)


def _logit_vectors(q, k, logits, shared_qk, norm):
    """The vectors and scale routing_attention builds its logits from (docs/algorithm.md#14-attention-inside-a-cluster),
    recomputed here."""
    D = q.shape[-1]
    if logits == "normalized":
        qn = kmeans.normalize(q, norm)
        return qn, (qn if shared_qk else kmeans.normalize(k, norm)), 1.0
    return q, (_l2(q) if shared_qk else k), 1 / np.sqrt(D)


def _route(q, k, v, means, **kw):
    kw.setdefault("impl", "ref")
    shared = kw.get("shared_qk", True)
    return A.routing_attention(q, None if shared else k, v, means, **kw)


# ------------------------------------------------------------------------------ 1. references
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
def test_dense_equals_loop_reference(self_attend):
    q, k, v = _qkv(seed=1)
    T = q.shape[2]
    causal = np.tril(np.ones((T, T), bool))
    want = _naive_masked(q, k, v, causal, 0.5, self_attend)
    got = A.dense_causal_attention(q, k, v, scale=0.5, self_attend=self_attend)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    default = A.dense_causal_attention(q, k, v, self_attend=self_attend)  # scale 1/sqrt(D) = 0.5 for D=4
    np.testing.assert_allclose(default, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
@pytest.mark.parametrize("T", [12, 13, 7])
@pytest.mark.parametrize("block_size,look_back", [(4, 0), (4, 1), (4, 2), (3, 1), (2, 3), (1, 0), (5, 1)])
def test_local_equals_band_mask_reference(block_size, look_back, self_attend, T):
    """Any T: where block_size does not divide T the last block is short (docs/algorithm.md#2-local-attention)."""
    q, k, v = _qkv(T=T, seed=2)
    pos = np.arange(T)
    block = pos // block_size
    visible = (pos[None, :] <= pos[:, None]) & (block[None, :] >= block[:, None] - look_back)
    want = _naive_masked(q, k, v, visible, 0.5, self_attend)
    got = A.local_attention(q, k, v, block_size=block_size, look_back=look_back, self_attend=self_attend)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
def test_local_short_last_block_gradients(self_attend):
    """T=7, L=3: the padded last block passes the band-mask form's gradients, and finite differences agree."""
    q, k, v = _qkv(T=7, seed=5)
    pos = np.arange(7)
    visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] // 3 >= pos[:, None] // 3 - 1)
    w = _normal(q.shape, 6)

    def local(q, k, v):
        return (A.local_attention(q, k, v, block_size=3, look_back=1, self_attend=self_attend) * w).sum()

    def band(q, k, v):
        self_mask = (pos[None, :] == pos[:, None]) if self_attend == "last_resort" else None
        return (A.masked_attention(q, k, v, visible, scale=0.5, self_mask=self_mask) * w).sum()

    for got, want in zip(grad(local, (0, 1, 2))(q, k, v), grad(band, (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    check_grads(local, (0, 1, 2), modes=["rev"], order=1)(q, k, v)


@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
@pytest.mark.parametrize("logits,shared_qk,use_mem", WITH_MEM)
def test_routing_equals_loop_reference(logits, shared_qk, self_attend, use_mem):
    """Balanced routing with K=3 overlapping windows against the loop reference, windows from kmeans."""
    B, H, T, D, K, W = 2, 2, 12, 4, 3, 5
    q, k, v = _qkv(B, H, T, D, seed=3)
    means = _means(H, K, D)
    mem_kv = (_normal((H, K, D), 7), _normal((H, K, D), 8)) if use_mem else None
    out, _, _ = _route(q, k, v, means, window_size=W, shared_qk=shared_qk, logits=logits,
                       self_attend=self_attend, combine_eps=1e-2, mem_kv=mem_kv)
    qn = kmeans.normalize(q)
    kn = qn if shared_qk else kmeans.normalize(k)
    qwin = kmeans.balanced_membership(qn, means, W, impl="ref")
    kwin = qwin if shared_qk else kmeans.balanced_membership(kn, means, W, impl="ref")
    ql, kl, scale = _logit_vectors(q, k, logits, shared_qk, "ln")
    want = _naive_routing(ql, kl, v, qwin, kwin, scale, self_attend, 1e-2, mem_kv)
    np.testing.assert_allclose(out, want, rtol=0, atol=TOL)
    # Not a vacuous case: some token is in two clusters and some token in none.
    counts = np.stack([np.bincount(w.ravel(), minlength=T) for w in qwin.reshape(B * H, -1)])
    assert counts.max() >= 2 and counts.min() == 0


@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
@pytest.mark.parametrize("logits,shared_qk,use_mem", WITH_MEM)
def test_nearest_equals_loop_reference(logits, shared_qk, self_attend, use_mem):
    B, H, T, D, K = 2, 2, 10, 4, 3
    q, k, v = _qkv(B, H, T, D, seed=4)
    means = _means(H, K, D)
    mem_kv = (_normal((H, K, D), 7), _normal((H, K, D), 8)) if use_mem else None
    out, _, stats = _route(q, k, v, means, membership="nearest", shared_qk=shared_qk, logits=logits,
                           self_attend=self_attend, combine_eps=1e-5, mem_kv=mem_kv)
    aq = kmeans.nearest(kmeans.normalize(q), means)
    ak = aq if shared_qk else kmeans.nearest(kmeans.normalize(k), means)
    np.testing.assert_array_equal(stats["assignments"][0], aq)
    np.testing.assert_array_equal(stats["assignments"][-1], ak)
    assert len(np.unique(aq)) == K  # every cluster is used: a real routing case
    ql, kl, scale = _logit_vectors(q, k, logits, shared_qk, "ln")
    want = _naive_nearest(ql, kl, v, aq, ak, scale, self_attend, 1e-5, mem_kv)
    np.testing.assert_allclose(out, want, rtol=0, atol=TOL)


@settings(max_examples=20, deadline=None)
@given(T=st.integers(1, 9), K=st.integers(1, 4), data=st.data())
def test_routing_loop_reference_over_shapes(T, K, data):
    """Hypothesis: any T, K and 1 <= W <= T, separate QK (the mask differs from a triangle over ranks)."""
    W = data.draw(st.integers(1, T))
    last_resort = data.draw(st.booleans())
    seed = data.draw(st.integers(0, 2 ** 16))
    q, k, v = _qkv(1, 2, T, 3, seed=seed)
    means = _means(2, K, 3, seed=seed + 50)
    self_attend = "last_resort" if last_resort else "allow"
    out, _, _ = _route(q, k, v, means, window_size=W, shared_qk=False, self_attend=self_attend)
    qn, kn = kmeans.normalize(q), kmeans.normalize(k)
    qwin = kmeans.balanced_membership(qn, means, W, impl="ref")
    kwin = kmeans.balanced_membership(kn, means, W, impl="ref")
    want = _naive_routing(qn, kn, v, qwin, kwin, 1.0, self_attend, 1e-2)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, want, rtol=0, atol=TOL)


# ------------------------------------------------------------------------------ 2. K=1, W=T is dense
@pytest.mark.parametrize("norm", kmeans.NORMS)
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
@pytest.mark.parametrize("logits,shared_qk", LOGIT_MODES)
@pytest.mark.parametrize("membership", A.MEMBERSHIP)
def test_routing_one_cluster_whole_window_is_dense(logits, shared_qk, self_attend, norm, membership):
    """docs/algorithm.md#110-checking-an-implementation: every token is counted once, so
    routing * (1 + eps) == dense."""
    B, H, T, D = 2, 2, 8, 4
    q, k, v = _qkv(B, H, T, D, seed=5)
    means = _means(H, 1, D, norm=norm)
    eps = 1e-2
    out, _, _ = _route(q, k, v, means, window_size=T, shared_qk=shared_qk, logits=logits, norm=norm,
                       self_attend=self_attend, membership=membership, combine_eps=eps)
    if logits == "normalized":  # (a) normalised q and k, no 1/sqrt(D)
        qn = kmeans.normalize(q, norm)
        want = A.dense_causal_attention(qn, qn if shared_qk else kmeans.normalize(k, norm), v,
                                        scale=1.0, self_attend=self_attend)
    elif shared_qk:  # (b) keys are the l2-normalised queries, 1/sqrt(D)
        want = A.dense_causal_attention(q, _l2(q), v, self_attend=self_attend)
    else:  # (c) raw q and k, 1/sqrt(D)
        want = A.dense_causal_attention(q, k, v, self_attend=self_attend)
    np.testing.assert_allclose(out * (1 + eps), want, rtol=0, atol=TOL)
    assert np.abs(out - want).max() > 1e-4  # the 1 % gap is real: the (1 + eps) factor matters


def test_one_cluster_memory_is_the_same_for_both_memberships():
    """K=1, W=T with mem_kv: balanced and nearest are then the same attention (checks mem_kv in both)."""
    q, k, v = _qkv(seed=6)
    means = _means(K=1)
    mem_kv = (_normal((2, 1, 4), 9), _normal((2, 1, 4), 10))
    out_b, _, _ = _route(q, k, v, means, window_size=8, shared_qk=False, mem_kv=mem_kv, logits="scaled")
    out_n, _, _ = _route(q, k, v, means, membership="nearest", shared_qk=False, mem_kv=mem_kv, logits="scaled")
    plain, _, _ = _route(q, k, v, means, membership="nearest", shared_qk=False, logits="scaled")
    np.testing.assert_allclose(out_n, out_b, rtol=0, atol=TOL)
    assert np.abs(out_n - plain).max() > 1e-3  # the memory is used


# ------------------------------------------------------------------------------ 3. local vs dense
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
@pytest.mark.parametrize("look_back", [0, 1, 3])
def test_local_one_block_is_dense(look_back, self_attend):
    q, k, v = _qkv(T=8, seed=7)
    want = A.dense_causal_attention(q, k, v, self_attend=self_attend)
    got = A.local_attention(q, k, v, block_size=8, look_back=look_back, self_attend=self_attend)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
@pytest.mark.parametrize("block_size,look_back", [(1, 11), (2, 5), (3, 3), (4, 2), (4, 7), (6, 1)])
def test_local_look_back_covering_everything_is_dense(block_size, look_back, self_attend):
    q, k, v = _qkv(T=12, seed=8)
    want = A.dense_causal_attention(q, k, v, self_attend=self_attend)
    got = A.local_attention(q, k, v, block_size=block_size, look_back=look_back, self_attend=self_attend)
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_local_look_back_zero_hides_the_previous_block():
    """T=8, L=4: block 1 (positions 4-7) does not see block 0 with look_back=0, and does with 1."""
    q, k, v = _qkv(T=8, seed=9)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, :4] += 3.0  # perturb keys and values of block 0 only
    v2[:, :, :4] -= 2.0
    before = A.local_attention(q, k, v, block_size=4, look_back=0)
    after = A.local_attention(q, k2, v2, block_size=4, look_back=0)
    np.testing.assert_allclose(after[:, :, 4:], before[:, :, 4:], rtol=0, atol=TOL)  # block 1 unchanged
    assert np.abs(after[:, :, :4] - before[:, :, :4]).min(axis=-1).min() > 1e-3  # every block-0 row moved
    seen = A.local_attention(q, k2, v2, block_size=4, look_back=1)
    assert np.abs(seen[:, :, 4:] - A.local_attention(q, k, v, block_size=4, look_back=1)[:, :, 4:]).max() > 1e-3
    # By hand: with look_back=0 the first query of a block sees only itself, so it outputs its own value.
    np.testing.assert_allclose(before[:, :, [0, 4]], v[:, :, [0, 4]], rtol=0, atol=TOL)


# ------------------------------------------------------------------------------ 4. causality
@pytest.mark.parametrize("logits,shared_qk,use_mem", WITH_MEM)
def test_nearest_is_strictly_causal(logits, shared_qk, use_mem):
    """Tokens after i (q, k and v) change; outputs at positions <= i do not (to rounding,
    docs/algorithm.md#1-one-routing-head)."""
    B, H, T, D, K = 2, 2, 12, 4, 3
    q, k, v = _qkv(B, H, T, D, seed=10)
    means = _means(H, K, D)  # fixed centroids: the update happens after the step
    mem_kv = (_normal((H, K, D), 11), _normal((H, K, D), 12)) if use_mem else None
    kw = dict(membership="nearest", shared_qk=shared_qk, logits=logits, mem_kv=mem_kv)
    out, _, stats = _route(q, k, v, means, **kw)
    assert len(np.unique(stats["assignments"])) == K
    for i in (0, 3, 6, 10):
        q2, k2, v2 = q.copy(), k.copy(), v.copy()
        for x, seed in ((q2, 20), (k2, 21), (v2, 22)):
            x[:, :, i + 1:] = 5 * _normal((B, H, T - i - 1, D), seed + i)
        out2, _, _ = _route(q2, k2, v2, means, **kw)
        np.testing.assert_allclose(out2[:, :, :i + 1], out[:, :, :i + 1], rtol=0, atol=TOL)
        assert np.abs(out2[:, :, i + 1:] - out[:, :, i + 1:]).max() > 1e-3  # the change is real


def test_balanced_membership_leaks_the_future(impl):
    """docs/algorithm.md#3-the-causal-leak: balanced top-W membership is NOT causal, with a perfect position mask.

    This is the paper's rule and what both public implementations train with (the official
    TensorFlow code and the PyTorch port): each cluster takes its W best tokens over the WHOLE
    sequence.  Pointing the last token at centroid c makes it the best member of cluster c, which
    evicts the cluster's weakest member e < T-1: the output at e changes (it loses that cluster's
    attention, or the cluster altogether), although only a token after e changed.
    ``membership="nearest"`` does not leak under the same change.
    """
    if impl == "numba":
        pytest.importorskip("rt_numpy.kernels.numba_routing")
    B, H, T, D, K, W = 1, 1, 16, 4, 2, 4
    q, _, v = _qkv(B, H, T, D, seed=30)
    means = _means(H, K, D, seed=31)
    qwin = kmeans.balanced_membership(kmeans.normalize(q), means, W, impl="ref")[0, 0]  # (K, W)
    c = next(c for c in range(K) if T - 1 not in qwin[c])  # a cluster the last token is not in
    q2 = q.copy()
    q2[0, 0, T - 1] = means[0, c]  # the best possible score for centroid c
    qwin2 = kmeans.balanced_membership(kmeans.normalize(q2), means, W, impl="ref")[0, 0]
    assert T - 1 in qwin2[c]
    (evicted,) = set(qwin[c]) - set(qwin2[c])
    assert evicted < T - 1

    out, _, _ = A.routing_attention(q, None, v, means, window_size=W, impl=impl)
    out2, _, _ = A.routing_attention(q2, None, v, means, window_size=W, impl=impl)
    leak = np.abs(out2 - out)[0, 0, :T - 1].max(axis=-1)  # (T-1,): positions before the change
    assert leak[evicted] > 1e-6, "balanced membership should leak: the evicted token's output changes"

    n1, _, _ = A.routing_attention(q, None, v, means, membership="nearest", impl=impl)
    n2, _, _ = A.routing_attention(q2, None, v, means, membership="nearest", impl=impl)
    np.testing.assert_allclose(n2[0, 0, :T - 1], n1[0, 0, :T - 1], rtol=0, atol=TOL)


# ------------------------------------------------------------------------------ 5. no NaN
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
def test_row_with_no_visible_key_outputs_zero(self_attend):
    """Separate QK: query 1's key window holds only later positions (2, 3): output exactly 0."""
    q, k, v = _qkv(1, 1, 4, 3, seed=40)
    qwin = np.array([[[[1, 2]]]])  # (B, H, K, W) = (1, 1, 1, 2)
    kwin = np.array([[[[2, 3]]]])
    eps = 1e-2

    def f(q, k, v):
        return A.cluster_attention_reference(q, k, v, qwin, kwin, scale=0.5, self_attend=self_attend, combine_eps=eps)

    out = f(q, k, v)
    assert np.all(out[0, 0, [0, 1, 3]] == 0)  # 0, 3: in no window; 1: nothing visible
    np.testing.assert_allclose(out[0, 0, 2], v[0, 0, 2] / (1 + eps), rtol=0, atol=TOL)  # sees key 2 only
    w = _normal(out.shape, 41)
    grads = grad(lambda *a: (f(*a) * w).sum(), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)
    assert np.all(grads[0][0, 0, 1] == 0)  # the empty row passes no gradient to its query
    check_grads(lambda *a: (f(*a) * w).sum(), (0, 1, 2), modes=["rev"], order=1)(q, k, v)


@pytest.mark.parametrize("attention", ["dense", "local"])
def test_last_resort_alone_at_position_zero(attention):
    """Position 0 sees only itself; with self logit -5e4 that is still a softmax of one: out[0] = v[0]."""
    q, k, v = _qkv(seed=42)

    def f(q, k, v):
        if attention == "dense":
            return A.dense_causal_attention(q, k, v, self_attend="last_resort")
        return A.local_attention(q, k, v, block_size=4, look_back=1, self_attend="last_resort")

    out = f(q, k, v)
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[:, :, 0], v[:, :, 0], rtol=0, atol=TOL)
    grads = grad(lambda *a: f(*a).sum(), (0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(g)) for g in grads)


# ------------------------------------------------------------------------------ 6. gradients
@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """check_grads draws its random directions from NumPy's global generator: make them repeatable."""
    state = np.random.get_state()
    np.random.seed(0)
    yield
    np.random.set_state(state)


@pytest.mark.parametrize("membership", A.MEMBERSHIP)
@pytest.mark.parametrize("logits,norm", [("normalized", "ln"), ("normalized", "l2"), ("scaled", "ln")])
@pytest.mark.parametrize("qk", ["shared", "separate", "separate+mem_kv"])
def test_routing_gradients_match_finite_differences(membership, logits, norm, qk):
    B, H, T, D, K = 1, 2, 8, 4, 2
    q, k, v = _qkv(B, H, T, D, seed=50)
    means = _means(H, K, D, norm=norm)
    w = _normal((B, H, T, D), 51)
    shared = qk == "shared"
    kw = dict(window_size=4, membership=membership, logits=logits, norm=norm, shared_qk=shared,
              commitment=0.5, self_attend="last_resort", impl="ref")  # a large beta: the loss term counts

    def total(q, k, v, mem_k=None, mem_v=None):
        mem_kv = None if mem_k is None else (mem_k, mem_v)
        out, loss, _ = A.routing_attention(q, None if shared else k, v, means, mem_kv=mem_kv, **kw)
        return (out * w).sum() + loss

    if qk == "shared":
        check_grads(total, (0, 2), modes=["rev"], order=1)(q, k, v)
    elif qk == "separate":
        check_grads(total, (0, 1, 2), modes=["rev"], order=1)(q, k, v)
    else:
        mem = (_normal((H, K, D), 52), _normal((H, K, D), 53))
        check_grads(total, (0, 1, 2, 3, 4), modes=["rev"], order=1)(q, k, v, *mem)
        g_mem = grad(total, (3, 4))(q, k, v, *mem)
        assert all(np.abs(g).max() > 1e-6 for g in g_mem)  # the memory is on the gradient path


@pytest.mark.parametrize("membership", A.MEMBERSHIP)
@pytest.mark.parametrize("shared_qk", [True, False])
def test_centroids_get_no_gradient(membership, shared_qk):
    """The commitment loss uses stop-gradient(mu), and routing decisions are constants
    (docs/algorithm.md#16-centroid-update, docs/algorithm.md#18-commitment-loss)."""
    q, k, v = _qkv(1, 2, 8, 4, seed=54)
    means = _means()

    def total(means):
        out, loss, _ = A.routing_attention(q, None if shared_qk else k, v, means, window_size=4,
                                           membership=membership, shared_qk=shared_qk, commitment=1.0,
                                           impl="ref")
        return out.sum() + loss

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autograd: "Output seems independent of input"
        g = grad(total)(means)
    assert g.shape == means.shape and np.all(g == 0)
    g_q = grad(lambda q: A.routing_attention(q, None, v, means, window_size=4, membership=membership,
                                             commitment=1.0, impl="ref")[1])(q)
    assert np.abs(g_q).max() > 0  # while the loss does send a gradient into q


def _mh_params(C, shared_qk, seed):
    names = ["w_q", "w_v", "w_o"] if shared_qk else ["w_q", "w_k", "w_v", "w_o"]
    return {n: _normal((C, C), seed + i) / np.sqrt(C) for i, n in enumerate(names)}


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("n_route_heads", [0, 1, 2])
def test_multihead_gradients_match_finite_differences(shared_qk, n_route_heads):
    B, T, C, H, K = 1, 8, 8, 2, 2
    x = _normal((B, T, C), 60)
    params = _mh_params(C, shared_qk, 61)
    means = _means(n_route_heads, K, C // H) if n_route_heads else None
    w = _normal((B, T, C), 62)

    def total(params, x):
        y, loss, _ = A.multihead_attention(x, params, means, num_heads=H, n_route_heads=n_route_heads,
                                           window_size=4, block_size=4, shared_qk=shared_qk, impl="ref",
                                           commitment=0.5)
        return (y * w).sum() + loss

    check_grads(total, (0, 1), modes=["rev"], order=1)(params, x)


# ------------------------------------------------------------------------------ 7. stats and loss
@pytest.mark.parametrize("membership", A.MEMBERSHIP)
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("combine", kmeans.COMMITMENT_QK)
@pytest.mark.parametrize("norm", kmeans.NORMS)
def test_stats_and_commitment_loss_match_kmeans(membership, shared_qk, combine, norm):
    B, H, T, D, K = 2, 2, 8, 4, 3
    q, k, v = _qkv(B, H, T, D, seed=70)
    means = _means(H, K, D, norm=norm)
    _, loss, stats = _route(q, k, v, means, window_size=4, membership=membership, shared_qk=shared_qk,
                            commitment_qk=combine, norm=norm, commitment=0.25)
    S = 1 if shared_qk else 2
    assert stats["sums"].shape == (S, H, K, D)
    assert stats["counts"].shape == (S, H, K)
    assert stats["assignments"].shape == (S, B, H, T)
    assert np.all(stats["counts"].sum(axis=-1) == B * T)
    streams = [kmeans.normalize(q, norm)] + ([] if shared_qk else [kmeans.normalize(k, norm)])
    want = kmeans.cluster_stats(streams, means, impl="ref")
    for key in ("sums", "counts", "assignments"):
        np.testing.assert_allclose(stats[key], want[key], rtol=0, atol=TOL)
    state = kmeans.state_from_means(means)
    new = kmeans.update_state(state, stats, norm=norm)
    ref = kmeans.update_state(state, want, norm=norm)
    np.testing.assert_allclose(new["means"], ref["means"], rtol=0, atol=TOL)
    assert np.abs(new["means"] - means).max() > 0  # the update moved something

    if shared_qk:
        e_q = kmeans.commitment_loss(streams[0], means, commitment=0.25)
        want_loss = 2 * e_q if combine == "sum" else e_q  # official e_q + e_k with k = q; port: e_q
    else:
        want_loss = kmeans.commitment_loss(streams, means, commitment=0.25, commitment_qk=combine)
    assert want_loss > 0
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ 8. bad input
def _base():
    q, k, v = _qkv(1, 2, 8, 4, seed=80)
    return dict(q=q, k=k, v=v, means=_means(), window_size=4, shared_qk=False, impl="ref")


def _call_routing(**changes):
    kw = _base()
    kw.update(changes)
    q, k, v, means = (kw.pop(n) for n in ("q", "k", "v", "means"))
    return A.routing_attention(q, k, v, means, **kw)


_Q = _qkv(1, 2, 8, 4, seed=80)[0]
_NAN = _Q.copy()
_NAN[0, 1, 2, 3] = np.nan
ROUTING_ERRORS = [  # (changes, exception, pattern that must appear in the message)
    (dict(q=_Q[0]), ValueError, r"q must have shape \(B, H, T, D\).*\(2, 8, 4\)"),
    (dict(v=_Q[..., None]), ValueError, r"v must have shape .*\(1, 2, 8, 4, 1\)"),
    (dict(k=_Q[:, :, :4]), ValueError, r"k is \(1, 2, 4, 4\)"),
    (dict(v=_Q.astype(np.float32)), ValueError, r"v is \(1, 2, 8, 4\) float32"),
    (dict(q=_Q.astype(np.int64)), TypeError, r"q must be float32 or float64, got dtype int64"),
    (dict(k=[[1.0]]), TypeError, r"k must be an array, got list"),
    (dict(q=_NAN), ValueError, r"q contains NaN"),
    (dict(window_size=9), ValueError, r"window_size must be <= T=8, got 9"),
    (dict(window_size=0), ValueError, r"window_size must be >= 1, got 0"),
    (dict(window_size=None), ValueError, r"window_size.*got None"),
    (dict(window_size=2.5), TypeError, r"window_size must be an integer, got 2.5"),
    (dict(window_size=True), TypeError, r"window_size must be an integer, got True"),
    (dict(means=_means(H=3)), ValueError, r"means of shape \(3, 2, 4\).*expected \(2, K, 4\)"),
    (dict(means=_means(D=5)), ValueError, r"means of shape \(2, 2, 5\)"),
    (dict(means=_means(dtype=np.float32)), ValueError, r"means .* dtype float32"),
    (dict(means=_means()[0]), ValueError, r"means must have 3 axes, got shape \(2, 4\)"),
    (dict(norm="l3"), ValueError, r"norm must be one of .* got 'l3'"),
    (dict(logits="raw"), ValueError, r"logits must be one of .* got 'raw'"),
    (dict(membership="greedy"), ValueError, r"membership must be one of .* got 'greedy'"),
    (dict(self_attend="never"), ValueError, r"self_attend must be one of .* got 'never'"),
    (dict(commitment_qk="max"), ValueError, r"commitment_qk must be one of .* got 'max'"),
    (dict(impl="fast"), ValueError, r"impl must be one of .* got 'fast'"),
    (dict(impl="fast", membership="nearest"), ValueError, r"impl must be one of .* got 'fast'"),
    (dict(impl="cupy"), (ValueError, ImportError), r"impl='cupy' needs (CuPy arrays|cupy)"),  # no GPU here
    (dict(combine_eps=0.0), ValueError, r"combine_eps must be .* got 0.0"),
    (dict(combine_eps=-1e-2), ValueError, r"combine_eps must be .* got -0.01"),
    (dict(combine_eps=float("nan")), ValueError, r"combine_eps must be .* got nan"),
    (dict(commitment=-1.0), ValueError, r"commitment must be >= 0.0, got -1.0"),
    (dict(shared_qk=True, mem_kv=(_means(), _means())), ValueError, r"mem_kv .* shared_qk=False"),
    (dict(mem_kv=(_means(), _means(K=3))), ValueError, r"mem_v must have shape \(2, 2, 4\).* got \(2, 3, 4\)"),
    (dict(mem_kv=(_means()[None], _means())), ValueError, r"mem_k must have 3 axes"),
    (dict(mem_kv=(_means(dtype=np.float32), _means())), ValueError, r"mem_k .* got \(2, 2, 4\) float32"),
    (dict(mem_kv=(_means(),)), ValueError, r"mem_kv must be a pair .* got length 1"),
]


@pytest.mark.parametrize("changes,exc,pattern", ROUTING_ERRORS,
                         ids=[",".join(c) + f"-{i}" for i, (c, _, _) in enumerate(ROUTING_ERRORS)])
def test_routing_rejects_bad_input(changes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call_routing(**changes)


def test_bad_input_cases_are_valid_without_the_change():
    """The base call of the table above works, so each error is caused by its one change."""
    out, loss, _ = _call_routing()
    assert out.shape == (1, 2, 8, 4) and np.isfinite(loss)
    _call_routing(mem_kv=(_means(), _means()))


@pytest.mark.parametrize("fn,kwargs,exc,pattern", [
    ("local", dict(block_size=0), ValueError, r"block_size must be >= 1, got 0"),
    ("local", dict(block_size=4.0), TypeError, r"block_size must be an integer, got 4.0"),
    ("local", dict(block_size=4, look_back=-1), ValueError, r"look_back must be >= 0, got -1"),
    ("local", dict(block_size=4, look_back=1.5), TypeError, r"look_back must be an integer, got 1.5 of type float"),
    ("local", dict(block_size=4, self_attend="self"), ValueError, r"self_attend must be one of .* 'self'"),
    ("dense", dict(self_attend="nope"), ValueError, r"self_attend must be one of .* 'nope'"),
])
def test_dense_and_local_reject_bad_input(fn, kwargs, exc, pattern):
    q, k, v = _qkv(1, 2, 8, 4, seed=81)
    f = A.local_attention if fn == "local" else A.dense_causal_attention
    with pytest.raises(exc, match=pattern):
        f(q, k, v, **kwargs)
    with pytest.raises(TypeError, match=r"q must be float32 or float64, got dtype int32"):
        f(q.astype(np.int32), k, v, **kwargs)


def _call_multihead(x=None, params=None, means=None, **changes):
    kw = dict(num_heads=2, n_route_heads=1, window_size=4, block_size=4, impl="ref")
    kw.update(changes)
    x = _normal((1, 8, 8), 90) if x is None else x
    params = _mh_params(8, kw.get("shared_qk", True), 91) if params is None else params
    means = _means(1, 2, 4) if means is None else means
    return A.multihead_attention(x, params, means, **kw)


@pytest.mark.parametrize("changes,exc,pattern", [
    (dict(x=_normal((8, 8), 0)), ValueError, r"x must have shape \(B, T, C\), got \(8, 8\)"),
    (dict(num_heads=3), ValueError, r"width C=8 is not a multiple of num_heads=3"),
    (dict(num_heads=0), ValueError, r"num_heads must be >= 1, got 0"),
    (dict(n_route_heads=3), ValueError, r"n_route_heads must be in \[0, 2\], got 3"),
    (dict(n_route_heads=-1), ValueError, r"n_route_heads must be in \[0, 2\], got -1"),
    (dict(n_route_heads=1.0), TypeError, r"n_route_heads must be an integer, got 1.0 of type float"),
    (dict(params={"w_q": np.eye(8), "w_o": np.eye(8)}), ValueError,
     r"params must hold \['w_o', 'w_q', 'w_v'\], got \['w_o', 'w_q'\]"),
    (dict(params=_mh_params(8, True, 0), shared_qk=False), ValueError, r"params must hold .*'w_k'"),
    (dict(params=[np.eye(8)]), ValueError, r"params must hold .* got list"),
    (dict(params={**_mh_params(8, True, 0), "w_o": np.eye(8)[:, :4]}), ValueError,
     r"params\['w_o'\] must have shape \(8, 8\), got \(8, 4\)"),
    (dict(means=_means(2, 2, 4)), ValueError, r"means of shape \(2, 2, 4\)"),
    (dict(impl="gpu", n_route_heads=0), ValueError, r"impl must be one of .* got 'gpu'"),
])
def test_multihead_rejects_bad_input(changes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call_multihead(**changes)


# ------------------------------------------------------------------------------ 9. multi-head
def _split(x, H):
    B, T, C = x.shape
    return x.reshape(B, T, H, C // H).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, H, T, D)


def _merge(x):
    B, H, T, D = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, C)


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("n_route_heads", [0, 1, 3])
def test_multihead_is_its_heads_concatenated_and_projected(shared_qk, n_route_heads):
    B, T, C, H, L, W, K = 2, 12, 12, 3, 4, 4, 2
    x = _normal((B, T, C), 100)
    p = _mh_params(C, shared_qk, 101)
    means = _means(n_route_heads, K, C // H) if n_route_heads else None
    y, loss, stats = A.multihead_attention(x, p, means, num_heads=H, n_route_heads=n_route_heads,
                                           window_size=W, block_size=L, look_back=1, shared_qk=shared_qk,
                                           self_attend="last_resort", impl="ref", combine_eps=1e-5, logits="scaled")
    assert y.shape == (B, T, C)
    q = _split(x @ p["w_q"], H)
    k = q if shared_qk else _split(x @ p["w_k"], H)
    v = _split(x @ p["w_v"], H)
    D, Hr = C // H, n_route_heads
    heads = np.zeros((B, H, T, D))
    if Hr:
        qr, kr = q[:, :Hr], k[:, :Hr]
        qwin = kmeans.balanced_membership(kmeans.normalize(qr), means, W, impl="ref")
        kwin = qwin if shared_qk else kmeans.balanced_membership(kmeans.normalize(kr), means, W, impl="ref")
        heads[:, :Hr] = _naive_routing(qr, _l2(qr) if shared_qk else kr, v[:, :Hr], qwin, kwin,
                                       1 / np.sqrt(D), "last_resort", 1e-5)
        routed, want_loss, want_stats = A.routing_attention(
            qr, kr, v[:, :Hr], means, window_size=W, shared_qk=shared_qk, self_attend="last_resort",
            combine_eps=1e-5, logits="scaled", impl="ref")
        np.testing.assert_allclose(loss, want_loss, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(stats["assignments"], want_stats["assignments"])
    else:
        assert loss == 0.0 and stats is None
    pos = np.arange(T)
    band = (pos[None, :] <= pos[:, None]) & (pos[None, :] // L >= pos[:, None] // L - 1)
    heads[:, Hr:] = _naive_masked(q[:, Hr:], k[:, Hr:], v[:, Hr:], band, 1 / np.sqrt(D), "last_resort")
    np.testing.assert_allclose(y, _merge(heads) @ p["w_o"], rtol=0, atol=1e-11)


# ------------------------------------------------------------------------------ auto dispatch
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("self_attend", A.SELF_ATTEND)
def test_auto_and_numba_match_reference(shared_qk, self_attend):
    """impl="auto" uses the fused Numba kernel for balanced routing; same values and gradients."""
    pytest.importorskip("rt_numpy.kernels.numba_routing")
    if not backend.numba_available():
        pytest.skip("numba is not installed")
    q, k, v = _qkv(2, 2, 16, 4, seed=110)
    means = _means(2, 3, 4)
    w = _normal(q.shape, 111)

    def run(impl):
        def total(q, k, v):
            out, loss, _ = A.routing_attention(q, None if shared_qk else k, v, means, window_size=6,
                                               shared_qk=shared_qk, self_attend=self_attend, impl=impl)
            return (out * w).sum() + loss
        return total(q, k, v), grad(total, (0, 1, 2))(q, k, v)

    ref_value, ref_grads = run("ref")
    for impl in ("auto", "numba"):
        value, grads = run(impl)
        np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=0)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(g, r, rtol=0, atol=1e-12)


def test_reference_only_forces_the_reference_path(monkeypatch):
    """Inside backend.reference_only() impl="auto" never reaches the fused kernel."""
    def boom(*args, **kwargs):
        raise AssertionError("the fused kernel ran inside reference_only()")

    monkeypatch.setattr(A, "cluster_attention_fused", boom)
    q, _, v = _qkv(seed=112)
    with backend.reference_only():
        out, _, _ = A.routing_attention(q, None, v, _means(), window_size=4, impl="auto")
    ref, _, _ = A.routing_attention(q, None, v, _means(), window_size=4, impl="ref")
    np.testing.assert_array_equal(out, ref)
    if backend.numba_available():  # outside the block, "auto" does dispatch to the fused kernel
        with pytest.raises(AssertionError, match="fused kernel ran"):
            A.routing_attention(q, None, v, _means(), window_size=4, impl="auto")
