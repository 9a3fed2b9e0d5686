"""Tests of the k-means reference (rt_numpy.kmeans), docs/algorithm.md#1-one-routing-head.

* normalisation ("ln", "l2");
* the centroid updates ("ema" with one and two streams, "spherical", "paper") worked by hand on a
  three-point example, and never mutating the state passed in;
* initialisation ("normal", "data"): seeded determinism, same tokens for every head, Lloyd
  iterations that never increase the k-means objective;
* the commitment loss: by hand, "sum" vs "mean", gradients by finite differences, no gradient to
  the centroids;
* membership: exactly W members per cluster, sorted, unique, the W best; nearest = argmax;
* bad input: ValueError/TypeError naming the parameter and the value received, and the state
  left unchanged after a failed call.
"""
import warnings

import numpy as np
import pytest
from autograd import grad
from autograd.test_util import check_grads

from rt_numpy import kmeans


def _data(B=2, H=3, T=20, D=4, K=5, dtype=np.float64, seed=0, norm="ln"):
    rng = np.random.default_rng(seed)
    points = kmeans.normalize(rng.standard_normal((B, H, T, D)), norm).astype(dtype)  # (B, H, T, D)
    means = kmeans.normalize(rng.standard_normal((H, K, D)), norm).astype(dtype)  # (H, K, D)
    return points, means


def _copy_state(state):
    return {k: np.array(v, copy=True) for k, v in state.items()}


def _assert_state_equal(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k  # bitwise, NaN-safe


# ------------------------------------------------------------------------- normalisation
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_ln(dtype):
    x = (np.random.default_rng(0).standard_normal((3, 5, 16)) * 3 + 2).astype(dtype)
    y = kmeans.normalize(x, "ln")
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-5 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(y.mean(axis=-1), 0.0, atol=tol)
    np.testing.assert_allclose(y.var(axis=-1), 1.0, rtol=1e-5)  # population variance; 1e-6 inside the root
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.sqrt(16), rtol=1e-5)
    by_hand = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(y, by_hand, rtol=tol, atol=tol)


def test_normalize_l2_and_zero_vectors():
    x = np.random.default_rng(1).standard_normal((4, 7, 5))
    x[1, 2] = 0.0
    y = kmeans.normalize(x, "l2")
    norms = np.linalg.norm(y, axis=-1)
    norms_without_zero = np.delete(norms.reshape(-1), 1 * 7 + 2)
    np.testing.assert_allclose(norms_without_zero, 1.0, rtol=1e-12)
    np.testing.assert_array_equal(y[1, 2], 0.0)  # not NaN
    np.testing.assert_array_equal(kmeans.normalize(np.zeros((2, 3)), "ln"), 0.0)
    np.testing.assert_allclose(kmeans.normalize(np.array([3.0, 4.0]), "l2"), [0.6, 0.8], rtol=1e-15)


# ----------------------------------------------------------------- updates, by hand
# Three points in H=1, K=2, D=2 with centroids (1, 0) and (0, 1):
#   p0 = (1, 0)     scores (1, 0)     -> cluster 0
#   p1 = (.5, .5)   scores (.5, .5)   -> cluster 0 (tie: the lower index)
#   p2 = (0, 1)     scores (0, 1)     -> cluster 1
# so N = (2, 1), S_0 = (1.5, 0.5), S_1 = (0, 1).
MEANS = np.array([[[1.0, 0.0], [0.0, 1.0]]])  # (H=1, K=2, D=2)
QUERIES = np.array([[[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]]])  # (B=1, H=1, T=3, D=2)
# Keys (0, 1), (2, 0), (0, 1) -> clusters 1, 0, 1: N = (1, 2), S_0 = (2, 0), S_1 = (0, 2).
KEYS = np.array([[[[0.0, 1.0], [2.0, 0.0], [0.0, 1.0]]]])


def test_stats_of_the_example(impl):
    stats = kmeans.cluster_stats([QUERIES, KEYS], MEANS, impl=impl)
    np.testing.assert_array_equal(stats["assignments"][:, 0, 0], [[0, 0, 1], [1, 0, 1]])
    np.testing.assert_array_equal(stats["counts"][:, 0], [[2, 1], [1, 2]])
    np.testing.assert_array_equal(stats["sums"][:, 0], [[[1.5, 0.5], [0.0, 1.0]], [[2.0, 0.0], [0.0, 2.0]]])


def test_ema_update_by_hand_one_stream():
    state = kmeans.state_from_means(MEANS)
    np.testing.assert_array_equal(state["counts"], [[0.0, 0.0]])
    np.testing.assert_array_equal(state["sums"], MEANS)  # the running sums start at the centroids
    stats = kmeans.cluster_stats(QUERIES, MEANS)
    new = kmeans.update_state(state, stats, centroid_update="ema", ema_decay=0.5, laplace_eps=0.1)
    # n = 0.5 * (0, 0) + 0.5 * (2, 1) = (1, 0.5)
    np.testing.assert_allclose(new["counts"], [[1.0, 0.5]], rtol=1e-15)
    # s_0 = 0.5 * (1, 0) + 0.5 * (1.5, 0.5) = (1.25, 0.25);  s_1 = 0.5 * (0, 1) + 0.5 * (0, 1) = (0, 1)
    np.testing.assert_allclose(new["sums"], [[[1.25, 0.25], [0.0, 1.0]]], rtol=1e-15)
    # sum(n) = 1.5; smoothed n~ = (n + 0.1) / (1.5 + 2 * 0.1) * 1.5 = (1.1, 0.6) * 1.5 / 1.7 = (33/34, 9/17)
    # means = s / n~ = (1.25, 0.25) * 34/33 = (85/66, 17/66);  (0, 1) * 17/9 = (0, 17/9)
    np.testing.assert_allclose(new["means"], [[[85 / 66, 17 / 66], [0.0, 17 / 9]]], rtol=1e-14)


def test_ema_update_by_hand_two_streams_queries_then_keys():
    state = kmeans.state_from_means(MEANS)
    stats = kmeans.cluster_stats([QUERIES, KEYS], MEANS)
    new = kmeans.update_state(state, stats, centroid_update="ema", ema_decay=0.5, laplace_eps=0.1)
    # queries: n = (1, 0.5),  s_0 = (1.25, 0.25), s_1 = (0, 1)          (as in the one-stream test)
    # keys:    n = 0.5 * (1, 0.5) + 0.5 * (1, 2) = (1, 1.25)
    #          s_0 = 0.5 * (1.25, 0.25) + 0.5 * (2, 0) = (1.625, 0.125); s_1 = 0.5 * (0, 1) + 0.5 * (0, 2) = (0, 1.5)
    np.testing.assert_allclose(new["counts"], [[1.0, 1.25]], rtol=1e-15)
    np.testing.assert_allclose(new["sums"], [[[1.625, 0.125], [0.0, 1.5]]], rtol=1e-15)
    # sum(n) = 2.25; n~ = (1.1, 1.35) * 2.25 / 2.45
    smoothed = np.array([1.1, 1.35]) * 2.25 / 2.45
    np.testing.assert_allclose(new["means"], [[[1.625 / smoothed[0], 0.125 / smoothed[0]],
                                                [0.0, 1.5 / smoothed[1]]]], rtol=1e-14)
    # keys first would give n = 0.5 * (0.5, 1) + 0.5 * (2, 1) = (1.25, 1): the order is queries, keys
    reversed_order = kmeans.update_state(state, kmeans.cluster_stats([KEYS, QUERIES], MEANS),
                                         centroid_update="ema", ema_decay=0.5, laplace_eps=0.1)
    np.testing.assert_allclose(reversed_order["counts"], [[1.25, 1.0]], rtol=1e-15)


def test_spherical_update_by_hand():
    means = np.array([[[1.0, 0.0], [0.0, 1.0], [-0.6, -0.8]]])  # (1, 3, 2): cluster 2 gets nothing
    state = kmeans.state_from_means(means)
    state["counts"] = np.array([[3.0, 1.0, 2.0]])  # spherical leaves counts and sums alone
    stats = kmeans.cluster_stats([QUERIES, KEYS], means)
    np.testing.assert_array_equal(stats["counts"][:, 0], [[2, 1, 0], [1, 2, 0]])
    new = kmeans.update_state(state, stats, centroid_update="spherical", ema_decay=0.5, norm="l2")
    # pooled sums: cluster 0 (1.5, 0.5) + (2, 0) = (3.5, 0.5) -> target (7, 1) / sqrt(50)
    #              cluster 1 (0, 1) + (0, 2) = (0, 3)         -> target (0, 1)
    t0 = np.array([7.0, 1.0]) / np.sqrt(50.0)
    expected = [[0.5 * np.array([1.0, 0.0]) + 0.5 * t0, [0.0, 1.0], [-0.6, -0.8]]]  # empty cluster kept
    np.testing.assert_allclose(new["means"], expected, rtol=1e-15)
    np.testing.assert_array_equal(new["counts"], state["counts"])
    np.testing.assert_array_equal(new["sums"], state["sums"])
    # with norm="ln" the target is the layer norm of the pooled sum: (3.5, 0.5) has mean 2, variance 2.25,
    # so (1.5, -1.5) / sqrt(2.25 + 1e-6)
    new_ln = kmeans.update_state(state, stats, centroid_update="spherical", ema_decay=0.5, norm="ln")
    np.testing.assert_allclose(new_ln["means"][0, 0], 0.5 * np.array([1.0, 0.0])
                               + 0.5 * np.array([1.5, -1.5]) / np.sqrt(2.25 + 1e-6), rtol=1e-15)


def test_paper_update_by_hand():
    state = kmeans.state_from_means(MEANS)
    one = kmeans.update_state(state, kmeans.cluster_stats(QUERIES, MEANS), centroid_update="paper", ema_decay=0.5)
    # mu <- 0.5 mu + 0.5 * S:  (0.5, 0) + (0.75, 0.25) = (1.25, 0.25);  (0, 0.5) + (0, 0.5) = (0, 1)
    np.testing.assert_allclose(one["means"], [[[1.25, 0.25], [0.0, 1.0]]], rtol=1e-15)
    two = kmeans.update_state(state, kmeans.cluster_stats([QUERIES, KEYS], MEANS), centroid_update="paper",
                              ema_decay=0.5)
    # mu <- 0.5 mu + 0.5 / 2 * (S_q + S_k): (0.5, 0) + 0.25 * (3.5, 0.5);  (0, 0.5) + 0.25 * (0, 3)
    np.testing.assert_allclose(two["means"], [[[1.375, 0.125], [0.0, 1.25]]], rtol=1e-15)
    np.testing.assert_array_equal(two["counts"], state["counts"])
    np.testing.assert_array_equal(two["sums"], state["sums"])


@pytest.mark.parametrize("update", kmeans.CENTROID_UPDATES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_never_mutates_the_state(update, dtype):
    points, means = _data(dtype=dtype)
    state = kmeans.init_state(3, 5, 4, rng=np.random.default_rng(0), dtype=dtype)
    state = kmeans.kmeans_step(state, points)[0]  # non-trivial counts and sums
    before = _copy_state(state)
    stats = kmeans.cluster_stats([points, points[::-1]], state["means"])
    stats_before = _copy_state(stats)
    new = kmeans.update_state(state, stats, centroid_update=update, ema_decay=0.9)
    _assert_state_equal(state, before)
    _assert_state_equal(stats, stats_before)
    for key in new:
        assert new[key] is not state[key] and not np.shares_memory(new[key], state[key])
        assert new[key].dtype == dtype
    assert not np.array_equal(new["means"], state["means"])
    new["counts"][...] = -1.0  # writing into the result does not reach the input either
    _assert_state_equal(state, before)


# ------------------------------------------------------------------------ initialisation
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("norm", kmeans.NORMS)
def test_init_normal_is_seeded_and_normalised(dtype, norm):
    a = kmeans.init_state(2, 5, 8, rng=np.random.default_rng(42), norm=norm, dtype=dtype)
    b = kmeans.init_state(2, 5, 8, rng=np.random.default_rng(42), norm=norm, dtype=dtype)
    c = kmeans.init_state(2, 5, 8, rng=np.random.default_rng(43), norm=norm, dtype=dtype)
    _assert_state_equal(a, b)
    assert not np.array_equal(a["means"], c["means"])
    assert a["means"].shape == (2, 5, 8) and a["means"].dtype == dtype
    np.testing.assert_array_equal(a["counts"], np.zeros((2, 5), dtype))
    np.testing.assert_array_equal(a["sums"], a["means"])
    expected_norm = np.sqrt(8) if norm == "ln" else 1.0
    np.testing.assert_allclose(np.linalg.norm(a["means"], axis=-1), expected_norm, rtol=1e-5)


def test_init_data_is_seeded_and_picks_the_same_tokens_for_every_head(impl):
    points, _ = _data(B=2, H=3, T=10, D=4)
    runs = [kmeans.init_state(3, 6, 4, rng=np.random.default_rng(7), init="data", points=points,
                              lloyd_iters=iters, dtype=np.float64, impl=impl) for iters in (0, 0, 5, 5)]
    _assert_state_equal(runs[0], runs[1])
    _assert_state_equal(runs[2], runs[3])
    flat = points.transpose(1, 0, 2, 3).reshape(3, 20, 4)  # (H, B*T, D)
    picked = []
    for h in range(3):
        match = (runs[0]["means"][h][:, None, :] == flat[h][None]).all(axis=-1)  # (K, B*T)
        assert (match.sum(axis=1) == 1).all()  # each centroid is exactly one token of this head
        picked.append(match.argmax(axis=1))
    assert len(set(picked[0])) == 6  # K different tokens
    for h in (1, 2):
        np.testing.assert_array_equal(picked[h], picked[0])


@pytest.mark.parametrize("norm", kmeans.NORMS)
def test_init_data_lloyd_never_increases_the_objective(norm):
    points, _ = _data(B=2, H=2, T=50, D=4, norm=norm)

    def objective(means):  # mean squared distance to the nearest centroid, per head
        d2 = ((points[:, :, :, None, :] - means[None, :, None]) ** 2).sum(-1)  # (B, H, T, K)
        return d2.min(axis=-1).mean(axis=(0, 2))  # (H,)

    values = np.array([
        objective(kmeans.init_state(2, 6, 4, rng=np.random.default_rng(5), init="data", points=points,
                                    norm=norm, lloyd_iters=iters, dtype=np.float64)["means"])
        for iters in range(8)])  # (iterations, H)
    assert (np.diff(values, axis=0) <= 1e-9 * values[:-1]).all(), values
    assert (values[-1] < values[0]).all()  # and Lloyd did something


def test_kmeans_steps_are_bitwise_reproducible():
    def run():
        rng = np.random.default_rng(3)
        state = kmeans.init_state(2, 4, 8, rng=rng, dtype=np.float32)
        for _ in range(4):
            q = kmeans.normalize(rng.standard_normal((2, 2, 30, 8))).astype(np.float32)
            k = kmeans.normalize(rng.standard_normal((2, 2, 30, 8))).astype(np.float32)
            state, _ = kmeans.kmeans_step(state, [q, k], ema_decay=0.9)
        return state

    a, b = run(), run()
    _assert_state_equal(a, b)
    assert np.isfinite(a["means"]).all() and a["counts"].sum() > 0


# ---------------------------------------------------------------------- commitment loss
def test_commitment_loss_by_hand():
    # queries: p1 = (.5, .5) sits at distance^2 0.5 from (1, 0); p0, p2 are on their centroids.
    # e_q = 0.5 / (3 points * 2 dims) = 1/12.  keys: (2, 0) is at distance^2 1 from (1, 0): e_k = 1/6.
    e_q, e_k = 1 / 12, 1 / 6
    loss = kmeans.commitment_loss
    np.testing.assert_allclose(loss(QUERIES, MEANS, commitment=1.0), e_q, rtol=1e-15)
    np.testing.assert_allclose(loss(QUERIES, MEANS), 1e-4 * e_q, rtol=1e-15)  # beta = 1e-4 by default
    np.testing.assert_allclose(loss([QUERIES, KEYS], MEANS, commitment=2.0, commitment_qk="sum"),
                               2.0 * (e_q + e_k), rtol=1e-15)
    np.testing.assert_allclose(loss([QUERIES, KEYS], MEANS, commitment=2.0, commitment_qk="mean"),
                               2.0 * (e_q + e_k) / 2, rtol=1e-15)
    np.testing.assert_allclose(loss([QUERIES, QUERIES], MEANS, commitment=1.0), 2 * e_q, rtol=1e-15)
    np.testing.assert_allclose(loss(QUERIES, MEANS, commitment=1.0, commitment_qk="mean"), e_q, rtol=1e-15)


@pytest.mark.parametrize("norm", kmeans.NORMS)
@pytest.mark.parametrize("combine", kmeans.COMMITMENT_QK)
def test_commitment_loss_gradient_matches_finite_differences(norm, combine):
    rng = np.random.default_rng(9)
    raw_q = rng.standard_normal((2, 2, 5, 3))  # (B, H, T, D), float64
    raw_k = rng.standard_normal((2, 2, 5, 3))
    means = kmeans.normalize(rng.standard_normal((2, 4, 3)), norm)

    def f(q, k):  # through the normalisation, as in the model
        return kmeans.commitment_loss([kmeans.normalize(q, norm), kmeans.normalize(k, norm)], means,
                                      commitment=0.5, commitment_qk=combine)

    check_grads(f, modes=["rev"], order=1)(raw_q, raw_k)
    g = grad(f)(raw_q, raw_k)
    assert np.abs(g).max() > 0


def test_commitment_loss_gives_no_gradient_to_the_centroids():
    points, means = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # autograd warns that the output does not depend on means
        g = grad(lambda m: kmeans.commitment_loss(points, m, commitment=1.0))(means)
    np.testing.assert_array_equal(g, np.zeros_like(means))
    # ... while the points get the analytic gradient 2 beta (x - mu_a) / (N D)
    a = kmeans.nearest(points, means)  # (B, H, T)
    target = means[np.arange(3)[None, :, None], a]  # (B, H, T, D)
    gx = grad(lambda x: kmeans.commitment_loss(x, means, commitment=1.0))(points)
    np.testing.assert_allclose(gx, 2 * (points - target) / points.size, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------- membership
@pytest.mark.parametrize("W", [1, 3, 10, 20])
def test_balanced_membership_properties(impl, W):
    points, means = _data(T=20, dtype=np.float32)
    members = kmeans.balanced_membership(points, means, W, impl=impl)
    assert members.shape == (2, 3, 5, W) and members.dtype == np.int64
    assert (np.diff(members, axis=-1) > 0).all()  # ascending, hence unique within a cluster
    assert members.min() >= 0 and members.max() < 20
    scores = kmeans.cluster_scores(points, means)  # (B, H, K, T)
    chosen = np.take_along_axis(scores, members, axis=-1)  # (B, H, K, W)
    inside = np.zeros(scores.shape, bool)
    np.put_along_axis(inside, members, True, axis=-1)
    worst_in = chosen.min(axis=-1)
    best_out = np.where(inside, -np.inf, scores).max(axis=-1)
    assert (worst_in >= best_out).all()  # the W best of each cluster


def test_nearest_is_the_argmax_of_the_similarities(impl):
    points, means = _data(dtype=np.float32)
    sims = kmeans.similarities(points, means)
    assert sims.shape == (2, 3, 20, 5)
    np.testing.assert_array_equal(kmeans.nearest(points, means), sims.argmax(axis=-1))
    np.testing.assert_array_equal(kmeans.cluster_stats(points, means, impl=impl)["assignments"][0],
                                  sims.argmax(axis=-1))
    np.testing.assert_allclose(kmeans.cluster_scores(points, means), sims.swapaxes(-1, -2), rtol=1e-6)


# ---------------------------------------------------------------------------- bad input
def _good():
    points, means = _data(B=1, H=2, T=6, D=3, K=4)
    state = kmeans.state_from_means(means)
    return points, means, state


def _nan_at(x, value=np.nan):
    x = x.copy()
    x.flat[3] = value
    return x


P, M, S = _good()
RNG = np.random.default_rng(0)
BAD_CALLS = {
    # wrong ndim / shapes
    "points ndim": (lambda: kmeans.cluster_stats(P[0], M), ValueError,
                    r"points must have 4 axes, got shape \(2, 6, 3\)"),
    "means ndim": (lambda: kmeans.cluster_stats(P, M[0]), ValueError, r"means must have 3 axes, got shape \(4, 3\)"),
    "D mismatch": (lambda: kmeans.cluster_stats(P[..., :2], M), ValueError,
                   r"points of shape \(1, 2, 6, 2\) does not fit means of shape \(2, 4, 3\)"),
    "H mismatch": (lambda: kmeans.balanced_membership(P[:, :1], M, 2), ValueError,
                   r"points of shape \(1, 1, 6, 3\) does not fit means of shape \(2, 4, 3\)"),
    "stream mismatch": (lambda: kmeans.cluster_stats([P, P[:, :, :3]], M), ValueError,
                        r"streams of points .*\(1, 2, 6, 3\) and \(1, 2, 3, 3\)"),
    "empty means": (lambda: kmeans.cluster_stats(P, M[:, :0], impl="numba"), ValueError,
                    r"means must not be empty, got shape \(2, 0, 3\)"),
    "empty points": (lambda: kmeans.cluster_stats(P[:, :, :0], M), ValueError,
                     r"points must not be empty, got shape \(1, 2, 0, 3\)"),
    "K > N": (lambda: kmeans.init_state(2, 7, 3, rng=RNG, init="data", points=P, dtype=np.float64), ValueError,
              r"num_clusters=7 .*B\*T=6"),
    "data without points": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, init="data"), ValueError,
                            r"init='data' needs points"),
    "points with normal": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, points=P), ValueError, r"points.*init='normal'"),
    "num_clusters 0": (lambda: kmeans.init_state(2, 0, 3, rng=RNG), ValueError, r"num_clusters must be >= 1, got 0"),
    "num_heads float": (lambda: kmeans.init_state(2.0, 3, 3, rng=RNG), TypeError,
                        r"num_heads must be an integer, got 2\.0"),
    "lloyd_iters negative": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, init="data", points=P, lloyd_iters=-1,
                                                       dtype=np.float64),
                             ValueError, r"lloyd_iters must be >= 0, got -1"),
    # window size
    "W > T": (lambda: kmeans.balanced_membership(P, M, 7), ValueError, r"window_size must be in \[1, 6\].*got 7"),
    "W < 1": (lambda: kmeans.balanced_membership(P, M, 0), ValueError, r"window_size must be in \[1, 6\].*got 0"),
    "W float": (lambda: kmeans.balanced_membership(P, M, 2.5), TypeError, r"window_size must be an integer, got 2\.5"),
    "W bool": (lambda: kmeans.balanced_membership(P, M, True), TypeError, r"window_size must be an integer, got True"),
    # non-finite values
    "points nan": (lambda: kmeans.cluster_stats(_nan_at(P), M), ValueError,
                   r"points contains NaN or infinity: got nan"),
    "points inf": (lambda: kmeans.balanced_membership(_nan_at(P, np.inf), M, 2), ValueError,
                   r"points contains NaN or infinity: got inf"),
    "keys -inf": (lambda: kmeans.cluster_stats([P, _nan_at(P, -np.inf)], M), ValueError,
                  r"points\[1\] contains NaN or infinity: got -inf"),
    "means nan": (lambda: kmeans.cluster_stats(P, _nan_at(M)), ValueError, r"means contains NaN or infinity: got nan"),
    "commitment means inf": (lambda: kmeans.commitment_loss(P, _nan_at(M, np.inf)), ValueError,
                             r"means contains NaN or infinity: got inf"),
    "init points nan": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, init="data", points=_nan_at(P), dtype=np.float64),
                        ValueError, r"points contains NaN or infinity: got nan"),
    "state means nan": (lambda: kmeans.check_state({**S, "means": _nan_at(S["means"])}), ValueError,
                        r"state\['means'\] contains NaN or infinity: got nan"),
    "state sums inf": (lambda: kmeans.update_state({**S, "sums": _nan_at(S["sums"], np.inf)},
                                                   kmeans.cluster_stats(P, M)), ValueError,
                       r"state\['sums'\] contains NaN or infinity: got inf"),
    "state counts nan": (lambda: kmeans.kmeans_step({**S, "counts": _nan_at(S["counts"])}, P), ValueError,
                         r"state\['counts'\] contains NaN or infinity: got nan"),
    # dtypes
    "points int": (lambda: kmeans.cluster_stats(P.astype(np.int64), M), TypeError,
                   r"points must be float32 or float64, got dtype int64"),
    "points bool": (lambda: kmeans.balanced_membership(P > 0, M, 2), TypeError,
                    r"points must be float32 or float64, got dtype bool"),
    "means int": (lambda: kmeans.cluster_stats(P, M.astype(np.int32)), TypeError,
                  r"means must be float32 or float64, got dtype int32"),
    "points list": (lambda: kmeans.cluster_stats([P.tolist()], M), TypeError,
                    r"points must be an array, got list"),
    "mixed float": (lambda: kmeans.cluster_stats(P.astype(np.float32), M), TypeError,
                    r"points has dtype float32 but means has dtype float64"),
    "mixed streams": (lambda: kmeans.cluster_stats([P, P.astype(np.float32)], M), TypeError,
                      r"points\[1\] has dtype float32 but means has dtype float64"),
    "init mixed": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, init="data", points=P, dtype=np.float32), TypeError,
                   r"points have dtype float64 but dtype=float32"),
    "state mixed": (lambda: kmeans.check_state({**S, "counts": S["counts"].astype(np.float32)}), TypeError,
                    r"state arrays must share one dtype.*counts float32"),
    "dtype int": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, dtype=np.int32), TypeError,
                  r"dtype must be float32 or float64, got int32"),
    # option strings
    "norm": (lambda: kmeans.normalize(P, "layer"), ValueError, r"norm must be one of .*got 'layer'"),
    "init": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, init="kmeans++"), ValueError,
             r"init must be one of .*got 'kmeans\+\+'"),
    "init norm": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, norm="L2"), ValueError,
                  r"norm must be one of .*got 'L2'"),
    "update": (lambda: kmeans.update_state(S, kmeans.cluster_stats(P, M), centroid_update="sgd"), ValueError,
               r"centroid_update must be one of .*got 'sgd'"),
    "update norm": (lambda: kmeans.kmeans_step(S, P, norm=None), ValueError, r"norm must be one of .*got None"),
    "combine": (lambda: kmeans.commitment_loss(P, M, commitment_qk="max"), ValueError,
                r"commitment_qk must be one of .*got 'max'"),
    "impl stats": (lambda: kmeans.cluster_stats(P, M, impl="fast"), ValueError, r"impl must be one of .*got 'fast'"),
    "impl membership": (lambda: kmeans.balanced_membership(P, M, 2, impl="gpu"), ValueError,
                        r"impl must be one of .*got 'gpu'"),
    "impl init": (lambda: kmeans.init_state(2, 3, 3, rng=RNG, init="data", points=P, dtype=np.float64, impl="c"),
                  ValueError, r"impl must be one of .*got 'c'"),
    # numbers
    "decay 1": (lambda: kmeans.kmeans_step(S, P, ema_decay=1.0), ValueError,
                r"ema_decay must be < 1\.0, got 1\.0"),
    "decay negative": (lambda: kmeans.kmeans_step(S, P, ema_decay=-0.1), ValueError,
                       r"ema_decay must be >= 0\.0, got -0\.1"),
    "decay nan": (lambda: kmeans.kmeans_step(S, P, ema_decay=float("nan")), ValueError,
                  r"ema_decay must be finite, got nan"),
    "decay string": (lambda: kmeans.kmeans_step(S, P, ema_decay="0.9"), TypeError,
                     r"ema_decay must be a real number, got '0\.9' of type str"),
    "eps 0": (lambda: kmeans.kmeans_step(S, P, laplace_eps=0.0), ValueError, r"laplace_eps must be > 0\.0, got 0\.0"),
    "eps negative": (lambda: kmeans.kmeans_step(S, P, laplace_eps=-1e-5), ValueError,
                     r"laplace_eps must be > 0\.0, got -1e-05"),
    "eps inf": (lambda: kmeans.kmeans_step(S, P, laplace_eps=float("inf")), ValueError,
                r"laplace_eps must be finite, got inf"),
    "commitment negative": (lambda: kmeans.commitment_loss(P, M, commitment=-1.0), ValueError,
                            r"commitment must be >= 0\.0, got -1\.0"),
    "rng int": (lambda: kmeans.init_state(2, 3, 3, rng=42), TypeError, r"rng must be a numpy.random.Generator, got 42"),
    "rng legacy": (lambda: kmeans.init_state(2, 3, 3, rng=np.random.RandomState(0)), TypeError,
                   r"rng must be a numpy.random.Generator, got RandomState"),
    # state
    "state not dict": (lambda: kmeans.kmeans_step(S["means"], P), TypeError, r"state must be a dict .*got ndarray"),
    "state missing": (lambda: kmeans.kmeans_step({"means": S["means"], "sums": S["sums"]}, P), ValueError,
                      r"state is missing keys \['counts'\]; got keys \['means', 'sums'\]"),
    "state counts shape": (lambda: kmeans.check_state({**S, "counts": S["counts"][:, :3]}), ValueError,
                           r"state shapes disagree: .*counts \(2, 3\) \(expected \(2, 4\)\)"),
    "state sums shape": (lambda: kmeans.update_state({**S, "sums": S["sums"][:1]}, kmeans.cluster_stats(P, M)),
                         ValueError, r"state shapes disagree: .*sums \(1, 4, 3\)"),
    "state counts ndim": (lambda: kmeans.check_state({**S, "counts": S["counts"][0]}), ValueError,
                          r"state\['counts'\] must have 2 axes, got shape \(4,\)"),
    "state counts negative": (lambda: kmeans.kmeans_step({**S, "counts": S["counts"] - 0.5}, P), ValueError,
                              r"state\['counts'\] must not be negative, got minimum -0\.5"),
    "stats shape": (lambda: kmeans.update_state(S, kmeans.cluster_stats(P[:, :, :, :2], M[:, :, :2])), ValueError,
                    r"stats of shapes sums \(1, 2, 4, 2\), counts \(1, 2, 4\) do not fit .*\(2, 4, 3\)"),
    "stats not dict": (lambda: kmeans.update_state(S, [1, 2]), ValueError, r"stats must be the dict"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_is_refused_with_name_and_value(name):
    call, error, pattern = BAD_CALLS[name]
    with pytest.raises(error, match=pattern):
        call()


def test_failed_calls_leave_the_state_unchanged():
    points, means, state = _good()
    state = kmeans.kmeans_step(state, points, ema_decay=0.5)[0]
    before = _copy_state(state)
    bad_stats = kmeans.cluster_stats(points[..., :2], means[..., :2])  # wrong D
    with pytest.raises(ValueError, match="stats of shapes"):
        kmeans.update_state(state, bad_stats)
    _assert_state_equal(state, before)
    with pytest.raises(ValueError, match="points contains NaN"):
        kmeans.kmeans_step(state, _nan_at(points))
    _assert_state_equal(state, before)
    with pytest.raises(ValueError, match="ema_decay"):
        kmeans.kmeans_step(state, points, ema_decay=2.0)
    _assert_state_equal(state, before)
    with pytest.raises(TypeError, match="dtype float32"):
        kmeans.kmeans_step(state, points.astype(np.float32))
    _assert_state_equal(state, before)
    # and a good call afterwards works on the same, untouched state
    new, _ = kmeans.kmeans_step(state, points, ema_decay=0.5)
    assert np.isfinite(new["means"]).all()
    _assert_state_equal(state, before)


def test_error_patterns_are_specific():
    """The bad-input table is not vacuous: each call succeeds once its one defect is removed."""
    kmeans.cluster_stats(P, M)
    kmeans.balanced_membership(P, M, 6)
    kmeans.balanced_membership(P, M, 1)
    kmeans.init_state(2, 6, 3, rng=RNG, init="data", points=P, dtype=np.float64, lloyd_iters=0)
    kmeans.kmeans_step(S, P, ema_decay=0.0, laplace_eps=1e-5)
    kmeans.commitment_loss(P, M, commitment=0.0)
