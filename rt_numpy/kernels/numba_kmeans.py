"""Numba kernels for online k-means (CPU fast path of :mod:`rt_numpy.kmeans`).

Three kernels, each computing exactly what a reference function in
:mod:`rt_numpy.kmeans` computes (``tests/test_kmeans_kernels.py`` proves it):

* :func:`assign_and_stats` - nearest centroid of every point plus the
  per-cluster sums and counts, in one pass over the points.  The points are
  taken a tile at a time: the tile's similarities ``(P, K)`` come from one BLAS
  matrix product and stay in cache while NumPy's vectorised argmax picks each
  point's cluster and a compiled loop adds the point to its cluster's sum.  The
  full ``(N, K)`` similarity matrix of the reference path is never built.
* :func:`route_from_scores` - both at once from the (B, H, K, T) scores that
  balanced membership needs anyway (:func:`rt_numpy.kmeans.route`): each
  point's nearest centroid is read down the columns of the scores, and the
  heads, then the clusters, are shared among the threads
  (:mod:`rt_numpy.kernels.numba_threads`).
* :func:`top_w_positions` - the ``W`` most similar positions of every cluster,
  sorted by position, ties broken towards the lower position.  Instead of
  sorting ``T`` scores per cluster it finds the ``W``-th largest score (a
  selection, O(T)) and walks the positions once, keeping everything above that
  threshold and the first few equal to it.  The walk visits positions in
  increasing order, so the result comes out sorted with no extra sort.

This module imports numpy, numba, :mod:`rt_numpy.runtime` and :mod:`rt_numpy.kernels` only.  No ``fastmath``: the
kernels must agree with the reference to the last bit where they can.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from rt_numpy import runtime
from rt_numpy.kernels import check_window, numba_threads

runtime.watch_compilation()  # a line on stderr when these kernels compile (first run only)


@njit(cache=True)
def _accumulate(assignments, x, sums, counts):
    """Add every row of ``x`` to the sum of its cluster, in row order.

    assignments (P,) int64, x (P, D), sums (K, D), counts (K,) int64; the last two
    are written in place.
    """
    P, D = x.shape
    for i in range(P):
        c = assignments[i]
        counts[c] += 1
        for d in range(D):
            sums[c, d] += x[i, d]


def tile_rows(num_clusters: int, itemsize: int) -> int:
    """Points per tile so that one tile of similarities is about 1 MiB (one core's L2 here)."""
    rows = (1024 * 1024) // max(1, num_clusters * itemsize)
    return int(min(4096, max(256, rows)))


def assign_and_stats(points, means):
    """Nearest centroid, per-cluster sums and counts, without an (N, K) matrix.

    Parameters
    ----------
    points : ndarray, shape (B, H, T, D), float32 or float64
    means : ndarray, shape (H, K, D), same dtype

    Returns
    -------
    assignments : ndarray (B, H, T) int64
    sums : ndarray (H, K, D), dtype of points (summed over B and T in order)
    counts : ndarray (H, K) int64

    Notes
    -----
    Per tile: one BLAS product for the similarities, NumPy's vectorised argmax
    (the first maximum wins a tie, as in the reference), then a compiled loop
    adds each point to its cluster's sum.  The tile never leaves the cache.
    """
    for name, x, ndim in (("points", points, 4), ("means", means, 3)):
        if not isinstance(x, np.ndarray) or x.ndim != ndim or x.dtype not in (np.float32, np.float64):
            got = f"{x.ndim}-dim {x.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
            raise TypeError(f"{name} must be a {ndim}-dim float32 or float64 NumPy array, got {got}")
    B, H, T, D = points.shape
    if means.shape[0] != H or means.shape[2] != D or means.dtype != points.dtype:
        raise ValueError(f"means must be (H, K, D) = ({H}, K, {D}) of dtype {points.dtype}, got "
                         f"{means.shape} {means.dtype}")
    K = means.shape[1]
    assignments = np.empty((B, H, T), dtype=np.int64)
    sums = np.zeros((H, K, D), dtype=points.dtype)
    counts = np.zeros((H, K), dtype=np.int64)
    step = tile_rows(K, points.dtype.itemsize)
    for h in range(H):
        means_t = np.ascontiguousarray(means[h].T)  # (K, D) -> (D, K)
        for b in range(B):
            for t0 in range(0, T, step):
                x = np.ascontiguousarray(points[b, h, t0:t0 + step])  # (P, D)
                sims = x @ means_t  # (P, D) @ (D, K) -> (P, K), stays in cache
                tile = sims.argmax(axis=1)  # (P,)
                assignments[b, h, t0:t0 + step] = tile
                _accumulate(tile, x, sums[h], counts[h])
    return assignments, sums, counts


@njit(cache=True)
def _kth_largest(a, n, kth):
    """The ``kth`` largest (1 = the maximum) of ``a[:n]``, by quickselect; reorders ``a``."""
    lo = 0
    hi = n - 1
    target = kth - 1  # its index once a[:n] is in decreasing order
    while lo < hi:
        x, y, z = a[lo], a[(lo + hi) // 2], a[hi]  # pivot: the median of three
        if x < y:
            x, y = y, x
        if y < z:
            y = z
            if x < y:
                y = x
        pivot = y
        i = lo
        j = hi
        while i <= j:  # Hoare partition: larger values to the left
            while a[i] > pivot:
                i += 1
            while a[j] < pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            return a[target]
    return a[target]


@njit(cache=True)
def _top_w_of_row(row, W, out, sample, values, positions):
    """Positions of the W largest entries of ``row`` (T,), ascending; ties: lower first.

    1. A bar from a sample: the ``rank``-th largest of every ``step``-th entry.
       The W-th largest of the whole row is very likely above it.
    2. One walk over the row keeps the entries at or above the bar (about 3W),
       with their positions, in position order.
    3. The exact W-th largest of those candidates is the threshold: keep all
       entries above it and the first few equal to it.  Still in position order.
    If fewer than W entries reach the bar (unlucky sample, many ties), step 2 is
    redone with every entry as a candidate, so the result is always exact.
    """
    T = row.shape[0]
    step = max(1, W // 4)
    m = (T + step - 1) // step
    expected = W / step  # sampled entries expected among the W largest
    rank = min(m, int(expected + 3.0 * np.sqrt(expected)) + 2)
    for j in range(m):
        sample[j] = row[j * step]
    bar = _kth_largest(sample, m, rank)
    n = 0
    for t in range(T):
        v = row[t]
        if v >= bar:
            values[n] = v
            positions[n] = t
            n += 1
    if n < W:  # the bar was too high: every entry is a candidate
        for t in range(T):
            values[t] = row[t]
            positions[t] = t
        n = T
    for i in range(n):
        sample[i] = values[i]  # the sample buffer is free again: use it as scratch
    threshold = _kth_largest(sample, n, W)
    above = 0
    for i in range(n):
        if values[i] > threshold:
            above += 1
    equal_left = W - above  # how many entries equal to the threshold still fit
    j = 0
    for i in range(n):
        v = values[i]
        if v > threshold or (v == threshold and equal_left > 0):
            if v == threshold:
                equal_left -= 1
            out[j] = positions[i]
            j += 1


def _check_scores(scores, W):
    """scores a 4-dim float NumPy array (B, H, K, T) and W in [1, T]; returns the shape."""
    if not isinstance(scores, np.ndarray) or scores.ndim != 4 or scores.dtype not in (np.float32, np.float64):
        got = f"{scores.ndim}-dim {scores.dtype}" if isinstance(scores, np.ndarray) else type(scores).__name__
        raise TypeError(f"scores must be a 4-dim (B, H, K, T) float32 or float64 NumPy array, got {got}")
    check_window(W, scores.shape[3])
    return scores.shape


def top_w_positions(scores, W):
    """Balanced top-W membership from cluster-major scores.

    scores (B, H, K, T) float -> members (B, H, K, W) int64, each row ascending.

    Raises
    ------
    TypeError
        ``scores`` is not a 4-dim float NumPy array.
    ValueError
        ``W`` is not an int in [1, T].
    """
    _check_scores(scores, W)
    return _top_w_positions(scores, int(W))


@njit(cache=True)
def _top_w_positions(scores, W):
    """:func:`top_w_positions` without the checks: W must be in [1, T] (else members holds
    uninitialised memory).

    One thread: sharing the rows among threads (``prange``) was measured slower
    here (0.86 ms against 0.75 ms at T=8192, K=64, W=128 on 2 cores).
    """
    B, H, K, T = scores.shape
    members = np.empty((B, H, K, W), dtype=np.int64)
    sample = np.empty(T, dtype=scores.dtype)  # scratch, reused by every row
    values = np.empty(T, dtype=scores.dtype)
    positions = np.empty(T, dtype=np.int64)
    for b in range(B):
        for h in range(H):
            for k in range(K):
                _top_w_of_row(scores[b, h, k], W, members[b, h, k], sample, values, positions)
    return members


@njit(cache=True)
def _nearest_from_scores(scores, best, out):
    """``out[t]`` = the first c with the largest ``scores[c, t]``: scores (K, T) -> out (T,) int64.

    Cluster by cluster, each position keeps its best score so far and replaces
    it only with a strictly larger one (so the first maximum wins, as in
    ``argmax``).  The inner loop runs along positions, elementwise, and
    vectorises.  ``best`` (T,) is scratch.
    """
    K, T = scores.shape
    first = scores[0]
    for t in range(T):
        best[t] = first[t]
        out[t] = 0
    for c in range(1, K):
        row = scores[c]
        for t in range(T):
            x = row[t]
            better = x > best[t]
            best[t] = x if better else best[t]
            out[t] = c if better else out[t]


@njit(cache=True, nogil=True)
def _assign_head(scores, points, h, assignments, sums, counts):
    """Nearest centroid of every point of head ``h``, added to its cluster in (b, t) order.

    scores (B, H, K, T), points (B, H, T, D); writes assignments[:, h] (B, T),
    sums[h] (K, D) and counts[h] (K,) (both zeroed before), as the reference does.
    """
    B, H, K, T = scores.shape
    best = np.empty(T, dtype=scores.dtype)  # scratch of this task
    for b in range(B):
        _nearest_from_scores(scores[b, h], best, assignments[b, h])
        _accumulate(assignments[b, h], points[b, h], sums[h], counts[h])


@njit(cache=True, nogil=True)
def _top_w_rows(scores, W, first, stop, members):
    """Top-W members of the clusters ``first .. stop - 1``, counted over (b, h, k) flattened.

    scores (B, H, K, T); writes those rows of members (B, H, K, W).
    """
    B, H, K, T = scores.shape
    sample = np.empty(T, dtype=scores.dtype)  # scratch of this task
    values = np.empty(T, dtype=scores.dtype)
    positions = np.empty(T, dtype=np.int64)
    for row in range(first, stop):
        b, h, k = row // (H * K), (row // K) % H, row % K
        _top_w_of_row(scores[b, h, k], W, members[b, h, k], sample, values, positions)


def route_from_scores(scores, points, W):
    """Nearest centroid, per-cluster sums and counts, and balanced top-W membership, from the scores.

    Parameters
    ----------
    scores : ndarray (B, H, K, T), float32 or float64
        :func:`rt_numpy.kmeans.cluster_scores` of the points.
    points : ndarray (B, H, T, D), C-contiguous, dtype of scores
    W : int
        Members per cluster, 1 <= W <= T.

    Raises
    ------
    TypeError, ValueError
        As :func:`top_w_positions`, or ``points`` does not fit the scores.

    Returns
    -------
    assignments : ndarray (B, H, T) int64
        ``argmax`` of the scores over clusters (the first maximum on a tie).
    sums : ndarray (H, K, D), counts : ndarray (H, K) int64
        As :func:`assign_and_stats`, for these assignments.
    members : ndarray (B, H, K, W) int64
        As :func:`top_w_positions`.
    """
    B, H, K, T = _check_scores(scores, W)
    if (not isinstance(points, np.ndarray) or points.dtype != scores.dtype or points.ndim != 4
            or points.shape[:3] != (B, H, T) or not points.flags.c_contiguous):
        got = f"{points.shape} {points.dtype}" if isinstance(points, np.ndarray) else type(points).__name__
        raise ValueError(f"points must be a C-contiguous (B, H, T, D) = ({B}, {H}, {T}, D) array of the "
                         f"scores' dtype {scores.dtype}, got {got}")
    D = points.shape[3]
    W = int(W)
    assignments = np.empty((B, H, T), dtype=np.int64)
    sums = np.zeros((H, K, D), dtype=points.dtype)
    counts = np.zeros((H, K), dtype=np.int64)
    members = np.empty((B, H, K, W), dtype=np.int64)
    scores = np.ascontiguousarray(scores)
    # Each task writes its own rows, so the bits do not depend on how the work is shared
    # (numba_threads: serial kernels in Python threads, which compile faster than prange).
    numba_threads.run(_assign_head, [(scores, points, h, assignments, sums, counts) for h in range(H)])
    numba_threads.run(_top_w_rows, [(scores, W, first, stop, members)
                                    for first, stop in numba_threads.thread_ranges(B * H * K)])
    return assignments, sums, counts, members
