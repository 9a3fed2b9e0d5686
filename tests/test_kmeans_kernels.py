"""The Numba k-means kernels compute what the reference computes.

* ``cluster_stats(impl="numba")`` vs ``impl="ref"``: assignments and counts exactly equal, sums
  equal to rounding (1e-5 relative in float32, 1e-12 in float64, relative to the sum of magnitudes);
* ``balanced_membership(impl="numba")`` vs ``impl="ref"``: exactly equal;
* ``route(impl="numba")`` vs ``impl="ref"`` (both decisions from one score matrix): as the two above;

over a grid of shapes and dtypes, on integer-valued inputs with many exact ties, and on edge cases
with hand-computed answers: K=1, W=T, W=1, tied centroids and tied scores, empty clusters, the
sample-threshold path of ``_top_w_of_row`` and its fallback, tile boundaries of ``assign_and_stats``.

With ``NUMBA_DISABLE_JIT=1`` the kernels run as plain Python; the sizes here keep that fast too.
"""
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rt_numpy import backend, kmeans
from rt_numpy.kernels import numba_kmeans

RTOL = {np.float32: 1e-5, np.float64: 1e-12}


@pytest.fixture(autouse=True)
def _kernels_really_run(monkeypatch):
    """RT_NUMPY_FORCE_REF in the calling shell would turn every comparison into ref vs ref."""
    monkeypatch.delenv(backend.FORCE_REF_ENV, raising=False)
    assert backend.resolve_impl("numba") == "numba"


def _data(B, H, T, D, K, dtype, seed=0):
    rng = np.random.default_rng(seed)
    points = kmeans.normalize(rng.standard_normal((B, H, T, D))).astype(dtype)  # (B, H, T, D)
    means = kmeans.normalize(rng.standard_normal((H, K, D))).astype(dtype)  # (H, K, D)
    return points, means


def _assert_stats_match(points, means):
    """numba == ref: assignments, counts exactly; sums to rounding. Returns the reference stats."""
    ref = kmeans.cluster_stats(points, means, impl="ref")
    fast = kmeans.cluster_stats(points, means, impl="numba")
    np.testing.assert_array_equal(fast["assignments"], ref["assignments"])
    np.testing.assert_array_equal(fast["counts"], ref["counts"])
    assert fast["assignments"].dtype == np.int64 and fast["counts"].dtype == np.int64
    assert fast["sums"].dtype == points.dtype
    rtol = RTOL[points.dtype.type]
    scale = np.abs(points).sum(axis=(0, 2)).max()  # a bound on any |partial sum| over (B, T)
    np.testing.assert_allclose(fast["sums"], ref["sums"], rtol=rtol, atol=rtol * scale)
    # The statistics are consistent with the assignments (guards against both paths being wrong alike).
    B, H, T, D = points.shape
    assert ref["counts"].sum() == B * H * T
    np.testing.assert_array_equal(ref["counts"].sum(axis=-1), B * T)
    return ref


def _assert_membership_match(points, means, W):
    ref = kmeans.balanced_membership(points, means, W, impl="ref")
    fast = kmeans.balanced_membership(points, means, W, impl="numba")
    assert fast.dtype == np.int64 and fast.shape == ref.shape == (*points.shape[:2], means.shape[1], W)
    np.testing.assert_array_equal(fast, ref)
    return ref


def _assert_route_match(points, means, W):
    """kmeans.route: numba == ref (assignments, counts, windows exactly; sums to rounding), and the
    windows are balanced_membership's, the assignments the first argmax of the scores."""
    ref = kmeans.route(points, means, W, impl="ref")
    fast = kmeans.route(points, means, W, impl="numba")
    for name in ("assignments", "counts", "windows"):
        assert fast[name].dtype == np.int64
        np.testing.assert_array_equal(fast[name], ref[name], err_msg=name)
    assert fast["sums"].dtype == points.dtype
    rtol = RTOL[points.dtype.type]
    scale = np.abs(points).sum(axis=(0, 2)).max()
    np.testing.assert_allclose(fast["sums"], ref["sums"], rtol=rtol, atol=rtol * scale)
    np.testing.assert_array_equal(ref["windows"], kmeans.balanced_membership(points, means, W, impl="ref"))
    scores = kmeans.cluster_scores(points, means)  # (B, H, K, T)
    first_best = (scores == scores.max(axis=-2, keepdims=True)).argmax(axis=-2)  # (B, H, T)
    np.testing.assert_array_equal(ref["assignments"], first_best)
    B, H, T, D = points.shape
    np.testing.assert_array_equal(ref["counts"].sum(axis=-1), B * T)
    return ref


# ------------------------------------------------------------------------------ grids
def _stats_grid():
    cases = []
    for i, (T, D, K, dtype) in enumerate(itertools.product(
            [1, 7, 64, 257, 1000], [1, 5, 16], [1, 2, 7, 64], [np.float32, np.float64])):
        B, H = 1 + i % 2, (1, 3)[(i // 2) % 2]  # B and H cycle so that every (B, H) pair occurs
        cases.append(pytest.param(B, H, T, D, K, dtype, id=f"B{B}H{H}T{T}D{D}K{K}-{dtype.__name__}"))
    return cases


def _membership_grid():
    cases = []
    pairs = [(T, W) for T in [1, 7, 64, 257, 1000] for W in sorted({1, T // 2, T}) if W >= 1]
    for i, ((T, W), K, dtype) in enumerate(itertools.product(pairs, [1, 2, 7, 64],
                                                             [np.float32, np.float64])):
        B, H, D = 1 + i % 2, (1, 3)[(i // 2) % 2], (1, 5, 16)[i % 3]
        cases.append(pytest.param(B, H, T, D, K, W, dtype, id=f"B{B}H{H}T{T}D{D}K{K}W{W}-{dtype.__name__}"))
    return cases


@pytest.mark.parametrize("B, H, T, D, K, dtype", _stats_grid())
def test_cluster_stats_numba_equals_reference(B, H, T, D, K, dtype):
    points, means = _data(B, H, T, D, K, dtype, seed=B * 1000 + T + D + K)
    _assert_stats_match(points, means)


@pytest.mark.parametrize("B, H, T, D, K, W, dtype", _membership_grid())
def test_balanced_membership_numba_equals_reference(B, H, T, D, K, W, dtype):
    points, means = _data(B, H, T, D, K, dtype, seed=B * 1000 + T + D + K + W)
    _assert_membership_match(points, means, W)


@pytest.mark.parametrize("B, H, T, D, K, W, dtype", _membership_grid())
def test_route_numba_equals_reference(B, H, T, D, K, W, dtype):
    points, means = _data(B, H, T, D, K, dtype, seed=B * 1000 + T + D + K + W + 1)
    ref = _assert_route_match(points, means, W)
    # On continuous data the scores and the similarities round alike: the same decisions as
    # cluster_stats and balanced_membership called apart.
    stats = kmeans.cluster_stats(points, means, impl="ref")
    np.testing.assert_array_equal(ref["assignments"], stats["assignments"][0])
    np.testing.assert_array_equal(ref["counts"], stats["counts"][0])


@pytest.mark.parametrize("B, H", [(1, 1), (2, 3)])
def test_route_is_the_same_for_any_number_of_threads(B, H):
    """The top-W rows are shared among threads in runs whose length depends on the thread count."""
    import numba

    points, means = _data(B, H, 300, 8, 13, np.float32, seed=9)
    before = numba.get_num_threads()
    results = []
    try:
        for threads in sorted({1, before}):
            numba.set_num_threads(threads)
            results.append(kmeans.route(points, means, 40, impl="numba"))
    finally:
        numba.set_num_threads(before)
    for other in results[1:]:
        for name in ("assignments", "sums", "counts", "windows"):
            np.testing.assert_array_equal(other[name], results[0][name], err_msg=name)


def test_route_refuses_bad_input():
    points, means = _data(1, 2, 10, 3, 4, np.float32)
    with pytest.raises(ValueError, match="window_size"):
        kmeans.route(points, means, 11)
    with pytest.raises(TypeError, match="window_size"):
        kmeans.route(points, means, 2.0)
    with pytest.raises(TypeError, match="once per stream"):
        kmeans.route([points, points], means, 2)
    with pytest.raises(ValueError, match="points"):
        kmeans.route(points[:, :1], means, 2)  # 1 head of points, 2 heads of means
    with pytest.raises(ValueError):
        kmeans.route(points, means, 2, impl="fast")


@settings(max_examples=150, deadline=None, derandomize=True)
@given(B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 40), D=st.integers(1, 4),
       K=st.integers(1, 6), w=st.floats(0, 1), levels=st.integers(1, 3), seed=st.integers(0, 2**32 - 1),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_kernels_equal_reference_with_exact_ties(B, H, T, D, K, w, levels, seed, dtype):
    """Small integer coordinates: every dot product is exact and ties are everywhere."""
    rng = np.random.default_rng(seed)
    points = rng.integers(-levels, levels + 1, (B, H, T, D)).astype(dtype)  # (B, H, T, D)
    means = rng.integers(-levels, levels + 1, (H, K, D)).astype(dtype)  # (H, K, D)
    _assert_stats_match(points, means)
    W = 1 + int(w * (T - 1))
    members = _assert_membership_match(points, means, W)
    _assert_route_match(points, means, W)
    # Ties go to the lower cluster index / the lower position: check against a hand rule too.
    sims = kmeans.similarities(points, means)  # (B, H, T, K)
    first_best = (sims == sims.max(axis=-1, keepdims=True)).argmax(axis=-1)  # first index of the max
    np.testing.assert_array_equal(kmeans.cluster_stats(points, means, impl="numba")["assignments"][0], first_best)
    scores = kmeans.cluster_scores(points, means)  # (B, H, K, T)
    key = scores * (T + 1) - np.arange(T)  # exact for these sizes: larger score, then lower position
    expected = np.sort(np.argsort(-key, axis=-1, kind="stable")[..., :W], axis=-1)
    np.testing.assert_array_equal(members, expected)


# ---------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_one_cluster(dtype):
    points, means = _data(2, 3, 50, 5, 1, dtype)
    ref = _assert_stats_match(points, means)
    assert (ref["assignments"] == 0).all()
    np.testing.assert_array_equal(ref["counts"], [[[100], [100], [100]]])
    np.testing.assert_allclose(ref["sums"][0, :, 0], points.sum(axis=(0, 2)), rtol=RTOL[dtype], atol=1e-4)
    members = _assert_membership_match(points, means, 50)  # K = 1, W = T: everybody
    np.testing.assert_array_equal(members, np.broadcast_to(np.arange(50), (2, 3, 1, 50)))


def test_window_equals_sequence_length():
    points, means = _data(2, 1, 33, 4, 7, np.float64)
    members = _assert_membership_match(points, means, 33)
    np.testing.assert_array_equal(members, np.broadcast_to(np.arange(33), (2, 1, 7, 33)))


def test_window_of_one_is_the_first_argmax():
    points, means = _data(2, 3, 40, 4, 7, np.float32)
    members = _assert_membership_match(points, means, 1)
    scores = kmeans.cluster_scores(points, means)  # (B, H, K, T)
    np.testing.assert_array_equal(members[..., 0], scores.argmax(axis=-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assignment_ties_go_to_the_lower_cluster(dtype):
    means = np.array([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.5, 0.5]]], dtype)  # (1, 4, 2): 1 and 2 equal
    points = np.array([[[[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 1.0], [-1.0, -1.0]]]], dtype)
    # scores (exact):   [0, 1, 1, .5], [.5, .5, .5, .5], [1, 0, 0, .5], [1, 1, 1, 1], [-1, -1, -1, -1]
    ref = _assert_stats_match(points, means)
    np.testing.assert_array_equal(ref["assignments"][0, 0, 0], [1, 0, 0, 0, 0])
    np.testing.assert_array_equal(ref["counts"][0, 0], [4, 1, 0, 0])
    np.testing.assert_array_equal(ref["sums"][0, 0], [[0.5, 1.5], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])


def test_membership_ties_go_to_the_lower_position(impl):
    points = np.array([1.0, 2.0, 2.0, 1.0, 2.0, 0.0])[None, None, :, None]  # (1, 1, T=6, D=1)
    means = np.array([[[1.0], [-1.0], [0.0]]])  # (1, K=3, 1): scores x, -x and all zeros
    expected = {
        2: [[1, 2], [0, 5], [0, 1]],
        4: [[0, 1, 2, 4], [0, 1, 3, 5], [0, 1, 2, 3]],
    }
    for W, rows in expected.items():
        members = kmeans.balanced_membership(points, means, W, impl=impl)
        np.testing.assert_array_equal(members[0, 0], rows)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_cluster_has_zero_count_and_sum(dtype):
    rng = np.random.default_rng(3)
    points = np.abs(rng.standard_normal((2, 1, 30, 3))).astype(dtype)  # all coordinates >= 0
    means = np.array([[[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.0, 0.0, 0.0]]], dtype)  # cluster 1 opposite
    ref = _assert_stats_match(points, means)
    assert ref["counts"][0, 0, 1] == 0
    np.testing.assert_array_equal(ref["sums"][0, 0, 1], 0.0)
    assert (ref["assignments"] != 1).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_tile_boundaries(dtype):
    K, itemsize = 64, np.dtype(dtype).itemsize
    rows = numba_kmeans.tile_rows(K, itemsize)
    assert 64 <= rows <= 4096
    assert numba_kmeans.tile_rows(1, 4) == 4096 and numba_kmeans.tile_rows(10**6, 8) == 256
    for T in (rows - 1, rows, rows + 1, 2 * rows + 1):
        points, means = _data(1, 1, T, 4, K, dtype, seed=T)
        _assert_stats_match(points, means)
    points, means = _data(2, 2, rows + 1, 3, K, dtype, seed=1)  # last tile of one point, several (b, h)
    _assert_stats_match(points, means)


# ------------------------------------------------------------- _top_w_of_row: both paths
def _top_w_row(row, W):
    """Run ``_top_w_of_row`` on one row; returns (positions, took_fallback, candidates_were_pruned)."""
    T = row.shape[0]
    out = np.full(W, -1, np.int64)
    sample = np.empty(T, row.dtype)
    values = np.empty(T, row.dtype)
    positions = np.full(T, -1, np.int64)  # untouched entries stay -1
    numba_kmeans._top_w_of_row(row, W, out, sample, values, positions)
    return out, bool((positions == np.arange(T)).all()), bool((positions == -1).any())


def _reference_row(row, W):
    return kmeans.top_w_reference(row[None, None, None], W)[0, 0, 0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_top_w_sample_threshold_path(dtype):
    T, W = 5000, 40
    row = np.random.default_rng(7).standard_normal(T).astype(dtype)
    out, fallback, pruned = _top_w_row(row, W)
    assert pruned and not fallback  # only a few candidates were kept: the sample bar worked
    np.testing.assert_array_equal(out, _reference_row(row, W))
    np.testing.assert_array_equal(out, np.sort(np.argsort(-row, kind="stable")[:W]))
    rounded = np.round(row, 1)  # many ties, also around the W-th value
    out, _, _ = _top_w_row(rounded, W)
    np.testing.assert_array_equal(out, _reference_row(rounded, W))
    scores = np.stack([row, rounded, -row])[None, None]  # (1, 1, 3, T) through the public kernel
    np.testing.assert_array_equal(numba_kmeans.top_w_positions(scores, W),
                                  kmeans.top_w_reference(scores, W))


def test_top_w_fallback_when_only_the_sample_is_high():
    """Sampled positions (every step-th) high, the rest low: too few entries reach the bar."""
    T, W = 5000, 40
    step = max(1, W // 4)
    row = np.zeros(T)
    row[::step] = np.arange(1, len(row[::step]) + 1)  # distinct, only at sampled positions
    out, fallback, _ = _top_w_row(row, W)
    assert fallback
    np.testing.assert_array_equal(out, np.arange(0, T, step)[-W:])  # the W highest sampled positions
    np.testing.assert_array_equal(out, _reference_row(row, W))


def test_top_w_fallback_with_ties_by_hand():
    T, W = 100, 50
    step = W // 4  # 12: the sampled positions are 0, 12, ..., 96
    row = np.zeros(T)
    row[::step] = 1.0
    out, fallback, _ = _top_w_row(row, W)
    assert fallback
    sampled = np.arange(0, T, step)  # 9 ones
    others = np.setdiff1d(np.arange(T), sampled)[:W - len(sampled)]  # then the first 41 zeros
    np.testing.assert_array_equal(out, np.sort(np.concatenate([sampled, others])))
    np.testing.assert_array_equal(out, _reference_row(row, W))


@pytest.mark.parametrize("T, W", [(5000, 40), (257, 128), (64, 1), (7, 7)])
@pytest.mark.parametrize("kind", ["equal", "increasing", "decreasing", "two_levels"])
def test_top_w_ordered_and_tied_rows(T, W, kind):
    row = {
        "equal": np.full(T, 0.25),
        "increasing": np.arange(T, dtype=float),
        "decreasing": -np.arange(T, dtype=float),
        "two_levels": (np.arange(T) % 3 == 0).astype(float),
    }[kind]
    out, _, _ = _top_w_row(row, W)
    np.testing.assert_array_equal(out, _reference_row(row, W))
    if kind == "equal":
        np.testing.assert_array_equal(out, np.arange(W))  # all tied: the first W positions
    elif kind == "increasing":
        np.testing.assert_array_equal(out, np.arange(T - W, T))
    elif kind == "decreasing":
        np.testing.assert_array_equal(out, np.arange(W))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kth_largest(dtype):
    rng = np.random.default_rng(11)
    for n in (1, 2, 3, 10, 101):
        for values in (rng.standard_normal(n), np.round(rng.standard_normal(n)), np.ones(n), np.arange(n)):
            values = values.astype(dtype)
            for kth in sorted({1, (n + 1) // 2, n}):
                a = values.copy()
                assert numba_kmeans._kth_largest(a, n, kth) == np.sort(values)[::-1][kth - 1]
                np.testing.assert_array_equal(np.sort(a), np.sort(values))  # only reordered
