"""Numba kernels for the attention inside routing clusters (CPU fast path of
:func:`rt_numpy.attention.cluster_attention_reference`, used by
:func:`rt_numpy.attention.cluster_attention_fused`).

Two entry points, each computing what the reference computes, to rounding
(``tests/test_routing_kernels.py`` proves it):

* :func:`forward` - causal softmax attention inside every cluster, then the
  scatter-mean back to positions.
* :func:`backward` - the gradients of ``sum(forward(...) * g)`` with respect to
  q, k and v.  Each cluster's probabilities are recomputed from q and k, as
  FlashAttention does: nothing of size (K, W, W) is kept between the passes.

How they are fast without ``fastmath``:

* Windows are sorted by position, so the keys a query may see (key position <=
  query position) are a prefix of the key window, and the queries that see a
  key are a suffix of the query window.  The invisible part is skipped, which
  halves the work of a causal cluster.
* A cluster's rows are gathered once into contiguous (W, D) tiles, padded
  with zeros, by explicit loops (Numba's ``out[s] = x[i]`` row assignment was
  6x slower).  The transposed (D, W) tiles that the products over keys need
  are made from the row tiles, in cache.  With shared QK (``k=None``) the key
  rows are the query rows: one gather fewer, and the backward returns the
  queries' and the keys' gradients already added (one scatter fewer).
* The backward keeps every query row's probabilities and logit gradients in
  (W, W) tiles, row by row as the first pass makes them; the second pass,
  over key rows, reads their columns through transposed views.
* Rows are worked ``ROWS`` = 4 at a time.  Every product is a small matrix
  product of a (4, n) or (4, D) block with a tile, written so that each number
  loaded from the tile serves four rows and each pass over an output row
  carries four terms: ``out_i[s] += a_i0 t_0[s] + a_i1 t_1[s] + a_i2 t_2[s] +
  a_i3 t_3[s]`` for i = 0..3.  The innermost loop is elementwise, never a
  floating-point reduction, so LLVM vectorises it without reordering any sum.
  Against one row at a time, this halves the loads and stores per
  multiply-add (BENCHMARKS.md, "Routing kernels worked four rows at a time").
  The four rows of a block share the longest visible prefix; the entries a
  shorter row does not see get probability 0.
* Loops over a cluster's keys run over a multiple of ``LANES`` = 16 entries
  (the padding gets probability 0), so they are whole vectors with no
  one-number-at-a-time remainder.  Softmax maxima and sums are kept as 16
  partial results, one per vector lane, added in a fixed order at the end;
  the exponential is :func:`rt_numpy.kernels.numba_exp.exp_nonpositive`,
  which vectorises, where ``math.exp`` is a library call per number.
* Threads never split the sum at one position, so the result is bitwise the
  same from run to run, for any number of threads, without atomics.  The
  kernels are serial and release the interpreter lock; Python threads call
  them once per task (:mod:`rt_numpy.kernels.numba_threads`: a ``prange``
  wrapper doubled the compile time).  With many heads (``"by_head"``), a task
  is a whole (b, h) pair whose finished clusters are added into its output in
  the order (c, r).  With few heads (``"by_cluster"``), a task is one cluster
  whose rows go into a (B, H, K, W, D) buffer; a second, serial pass adds the
  buffers into positions in the same order (c, r).  Both give the same bits.
* The small helpers that run once per block of rows or per row are compiled
  into the kernel that calls them (``inline="always"``).  A call of a
  separately compiled helper updates the reference count of each array view
  it receives or makes (an atomic operation each): for the small per-block
  helpers that had cost about as much as their arithmetic (CHANGELOG.md,
  benchmark history of 2026-11-28).  The helpers that run once per cluster
  or per head (the gathers, the transpose, the visible counts, the scratch
  tiles, the scatter) are separate functions, compiled once and shared by the
  forward and backward kernels: inlined, they made the first training step's
  compile 1.8 s longer, and the kernels were no faster (0.96-1.04x at the
  tiny, small and T=8192 shapes, 2026-12-04).  The three loops that do
  the arithmetic (:func:`_rows_times_tile`, :func:`_weights_times_rows`,
  :func:`_block_softmax`) stay separate functions: inlining them too was 10%
  faster with 8 heads but took 2.4 times as long to compile (88 s instead of
  36 s for float32, once per machine: the compiled code is cached).

This module imports numpy, numba and :mod:`rt_numpy.kernels.numba_exp` only.  No ``fastmath``;
``error_model="numpy"`` (a division by zero gives inf or NaN instead of
raising), which lets LLVM vectorise the loops that divide.  No division here
can be by zero: a softmax total is at least 1 and a denominator at least eps.

Notes
-----
docs/algorithm.md#14-attention-inside-a-cluster, docs/algorithm.md#15-combine.
Masked logits are -inf (probability exactly 0); a
query row with no visible key outputs 0; with ``last_resort`` the self logit is
-5e4, set before the causal mask.
"""
from __future__ import annotations

from collections import namedtuple

import numba
import numpy as np
from numba import njit

from rt_numpy import runtime
from rt_numpy.kernels import (
    SELF_LOGIT,  # the "last resort" self logit (docs/algorithm.md#14-attention-inside-a-cluster)
    numba_threads,
)
from rt_numpy.kernels.numba_exp import exp_nonpositive

runtime.watch_compilation()  # a line on stderr when these kernels compile (first run only)

# No prange here: the threads are Python threads (numba_threads), so Numba's threading layer is not used.

ROWS = 4  # rows worked together (the products below are written out for exactly four)
LANES = 16  # loops over a cluster's keys run over a multiple of this many (one AVX-512 vector of float32)


# --------------------------------------------------------------------------- building blocks
@njit(cache=True, error_model="numpy", inline="always")
def _padded(n):
    """n rounded up to a multiple of LANES."""
    return (n + LANES - 1) // LANES * LANES


@njit(cache=True, error_model="numpy")
def _visible_counts(query_window, key_window, out):
    """``out[r]`` = how many keys query row r sees (key position <= query position), 0 past row W.

    Both windows ascend, so the count never decreases from one row to the
    next: one walk over the two windows together (a merge) finds them all.
    """
    W = query_window.shape[0]
    j = 0
    for r in range(W):
        while j < W and key_window[j] <= query_window[r]:
            j += 1
        out[r] = j
    out[W:] = 0


@njit(cache=True, error_model="numpy")
def _transpose_rows(rows, W, out):
    """``out[d, s] = rows[s, d]`` for s < W: rows (R, D) -> out (D, Wp), columns past W untouched.

    Four rows at a time, so that each output row receives four neighbouring
    numbers per visit.  Both tiles are already in cache (the rows were just
    gathered), which is cheaper than gathering the transposed tile from the
    (T, D) array a second time.
    """
    D = rows.shape[1]
    s = 0
    while s + 4 <= W:
        r0, r1, r2, r3 = rows[s], rows[s + 1], rows[s + 2], rows[s + 3]
        for d in range(D):
            o = out[d]
            o[s] = r0[d]
            o[s + 1] = r1[d]
            o[s + 2] = r2[d]
            o[s + 3] = r3[d]
        s += 4
    for rest in range(s, W):
        r = rows[rest]
        for d in range(D):
            out[d, rest] = r[d]


@njit(cache=True, error_model="numpy")
def _gather_rows(x, window, out):
    """``out[s] = x[window[s]]`` for s < W: x (T, D), window (W,) -> out (R, D), whose rows past W
    stay as they are (zero, from :func:`_cluster_scratch`)."""
    D = x.shape[1]
    for s in range(window.shape[0]):
        src = x[window[s]]
        dst = out[s]
        for d in range(D):  # an explicit loop: Numba's ``out[s] = x[i]`` was measured 6x slower
            dst[d] = src[d]


@njit(cache=True, error_model="numpy", inline="always")
def _add_rows(src, dst, rows):
    """``dst[:rows] += src[:rows]`` for (rows, D) blocks."""
    D = src.shape[1]
    for i in range(rows):
        a = src[i]
        b = dst[i]
        for d in range(D):
            b[d] += a[d]


@njit(cache=True, error_model="numpy", inline="always")
def _copy_rows(src, dst, rows):
    """``dst[:rows] = src[:rows]`` for (rows, D) blocks, as an explicit loop (see :func:`_gather_rows`)."""
    D = src.shape[1]
    for i in range(rows):
        a = src[i]
        b = dst[i]
        for d in range(D):
            b[d] = a[d]


@njit(cache=True, error_model="numpy")
def _rows_times_tile(a, tile, n, out):
    """``out[i, s] = sum_d a[i, d] tile[d, s]`` for i < 4, s < n: a (4, D), tile (D, W) -> out (4, W).

    Four rows of ``a`` against the tile; the sum over d is taken four terms at
    a time (one pass over the four output rows per four d).
    """
    D = a.shape[1]
    o0, o1, o2, o3 = out[0], out[1], out[2], out[3]
    for s in range(n):
        o0[s] = 0
        o1[s] = 0
        o2[s] = 0
        o3[s] = 0
    d = 0
    while d + 4 <= D:
        t0, t1, t2, t3 = tile[d], tile[d + 1], tile[d + 2], tile[d + 3]
        a00, a01, a02, a03 = a[0, d], a[0, d + 1], a[0, d + 2], a[0, d + 3]
        a10, a11, a12, a13 = a[1, d], a[1, d + 1], a[1, d + 2], a[1, d + 3]
        a20, a21, a22, a23 = a[2, d], a[2, d + 1], a[2, d + 2], a[2, d + 3]
        a30, a31, a32, a33 = a[3, d], a[3, d + 1], a[3, d + 2], a[3, d + 3]
        for s in range(n):
            x0, x1, x2, x3 = t0[s], t1[s], t2[s], t3[s]
            o0[s] += a00 * x0 + a01 * x1 + a02 * x2 + a03 * x3
            o1[s] += a10 * x0 + a11 * x1 + a12 * x2 + a13 * x3
            o2[s] += a20 * x0 + a21 * x1 + a22 * x2 + a23 * x3
            o3[s] += a30 * x0 + a31 * x1 + a32 * x2 + a33 * x3
        d += 4
    for rest in range(d, D):
        t = tile[rest]
        a0, a1, a2, a3 = a[0, rest], a[1, rest], a[2, rest], a[3, rest]
        for s in range(n):
            x = t[s]
            o0[s] += a0 * x
            o1[s] += a1 * x
            o2[s] += a2 * x
            o3[s] += a3 * x


@njit(cache=True, error_model="numpy")
def _weights_times_rows(w, rows, start, stop, out):
    """``out[i] = sum_{s in [start, stop)} w[i, s] rows[s]`` for i < 4: w (4, W), rows (W, D) -> out (4, D).

    Four weighted rows per pass over the four output rows.
    """
    D = rows.shape[1]
    c0, c1, c2, c3 = out[0], out[1], out[2], out[3]
    c0[:] = 0
    c1[:] = 0
    c2[:] = 0
    c3[:] = 0
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    s = start
    while s + 4 <= stop:
        x0, x1, x2, x3 = rows[s], rows[s + 1], rows[s + 2], rows[s + 3]
        a00, a01, a02, a03 = w0[s], w0[s + 1], w0[s + 2], w0[s + 3]
        a10, a11, a12, a13 = w1[s], w1[s + 1], w1[s + 2], w1[s + 3]
        a20, a21, a22, a23 = w2[s], w2[s + 1], w2[s + 2], w2[s + 3]
        a30, a31, a32, a33 = w3[s], w3[s + 1], w3[s + 2], w3[s + 3]
        for d in range(D):
            y0, y1, y2, y3 = x0[d], x1[d], x2[d], x3[d]
            c0[d] += a00 * y0 + a01 * y1 + a02 * y2 + a03 * y3
            c1[d] += a10 * y0 + a11 * y1 + a12 * y2 + a13 * y3
            c2[d] += a20 * y0 + a21 * y1 + a22 * y2 + a23 * y3
            c3[d] += a30 * y0 + a31 * y1 + a32 * y2 + a33 * y3
        s += 4
    for rest in range(s, stop):
        x = rows[rest]
        a0, a1, a2, a3 = w0[rest], w1[rest], w2[rest], w3[rest]
        for d in range(D):
            y = x[d]
            c0[d] += a0 * y
            c1[d] += a1 * y
            c2[d] += a2 * y
            c3[d] += a3 * y


@njit(cache=True, error_model="numpy", inline="always")
def _lane_max(x, n, lanes):
    """The largest of ``x[:n]``, n a multiple of LANES, taken as LANES running maxima.

    Each lane keeps the maximum of every LANES-th number, which a vector
    instruction updates for all lanes at once; the lanes are then compared in
    order.  A maximum does not depend on the order of comparison, so this is
    exactly ``max(x[:n])``.
    """
    for j in range(LANES):
        lanes[j] = x[j]
    for s0 in range(LANES, n, LANES):
        for j in range(LANES):
            y = x[s0 + j]
            lanes[j] = y if y > lanes[j] else lanes[j]
    m = lanes[0]
    for j in range(1, LANES):
        m = lanes[j] if lanes[j] > m else m
    return m


@njit(cache=True, error_model="numpy", inline="always")
def _lane_sum(x, n, lanes):
    """``sum(x[:n])``, n a multiple of LANES, as LANES partial sums (lane j adds x[j], x[j + LANES],
    ...) added in lane order at the end: a fixed order, so the same bits every time."""
    lanes[:] = 0
    for s0 in range(0, n, LANES):
        for j in range(LANES):
            lanes[j] += x[s0 + j]
    total = lanes[0]
    for j in range(1, LANES):
        total += lanes[j]
    return total


@njit(cache=True, error_model="numpy", inline="always")
def _lane_dot(x, y, n, lanes):
    """``sum(x[:n] * y[:n])`` in the order of :func:`_lane_sum`."""
    lanes[:] = 0
    for s0 in range(0, n, LANES):
        for j in range(LANES):
            lanes[j] += x[s0 + j] * y[s0 + j]
    total = lanes[0]
    for j in range(1, LANES):
        total += lanes[j]
    return total


@njit(cache=True, error_model="numpy")
def _block_softmax(p, counts, n, key_window, positions, scale, last_resort, self_logit, lanes):
    """Four rows' logits (4, W) -> probabilities, in place, over the first ``n`` entries.

    Row i sees its first ``counts[i]`` keys: ``p[i, :count] <- softmax(scale
    p[i, :count])`` and ``p[i, count:n] <- 0`` (its masked logits are set to
    -inf, whose exponential is exactly 0); a row that sees nothing is all
    zeros.  ``n`` is a multiple of LANES: every loop here runs whole vectors
    (maximum and total by lanes, :func:`_lane_max` and :func:`_lane_sum`; the
    exponential from :mod:`rt_numpy.kernels.numba_exp`).  ``scale`` and
    ``self_logit`` are scalars of the data's dtype, so that float32 stays
    float32; ``positions[i]`` is row i's query position (for the self rule);
    ``lanes`` (LANES,) is scratch.
    """
    for i in range(ROWS):
        row = p[i]
        count = counts[i]
        if count == 0:
            row[:n] = 0
            continue
        for s in range(count):  # scale, self rule, mask
            row[s] = row[s] * scale
        if last_resort:
            for s in range(count):
                if key_window[s] == positions[i]:
                    row[s] = self_logit
        for s in range(count, n):
            row[s] = -np.inf
        m = _lane_max(row, n, lanes)  # finite: the row sees at least one key
        for s in range(n):
            row[s] = exp_nonpositive(row[s] - m)
        total = _lane_sum(row, n, lanes)  # at least 1 (the maximum's own term)
        for s in range(n):
            row[s] = row[s] / total


@njit(cache=True, error_model="numpy", inline="always")
def _block_probabilities(tiles, p, query_window, key_window, r0, scale, last_resort, self_logit):
    """Probabilities of query rows r0 .. r0 + 3 of a cluster into ``p`` (4, Wp); returns the block's n.

    Row i sees the first ``tiles.visible[r0 + i]`` keys of the key window;
    the block's n is the largest count (the last real row's, windows being
    sorted) rounded up to a multiple of LANES, and every row gets probability
    0 on [count, n).  Rows past the window's end (padding) have count 0.
    """
    W = query_window.shape[0]
    counts = tiles.visible[r0:r0 + ROWS]
    n = counts[min(ROWS, W - r0) - 1]
    if n > 0:
        n = _padded(n)  # whole vectors: the padding columns of kT are 0 and get probability 0
        _rows_times_tile(tiles.q_rows[r0:r0 + ROWS], tiles.kT, n, p)  # (4, D) @ (D, n) -> (4, n)
        _block_softmax(p, counts, n, key_window, query_window[r0:], scale, last_resort, self_logit, tiles.lanes)
    return n


# One thread's scratch for one cluster, with Wp = W rounded up to a multiple of LANES and
# R = max(W + ROWS - 1, Wp) rows.  q_rows, k_rows, v_rows, g_rows (R, D): the cluster's query, key,
# value and upstream (backward) rows, gathered, zero past row W (with shared QK, k_rows is not
# used: the keys are q_rows); kT, vT (D, Wp): the keys and values transposed (vT backward only),
# zero past column W; visible (R,) int64: how many keys each query row sees; p (4, Wp): a block's
# probabilities (forward); block_out (4, D): a block's output rows; probs, dlogits (R, Wp): every
# query row's p / den and logit gradients (backward); lanes (LANES,): partial maxima and sums.
Tiles = namedtuple("Tiles", ["q_rows", "k_rows", "v_rows", "g_rows", "kT", "vT", "visible", "p",
                             "block_out", "probs", "dlogits", "lanes"])


@njit(cache=True, error_model="numpy")
def _cluster_scratch(W, D, dtype):
    """A :data:`Tiles` for clusters of W rows of D numbers; the padding is zeroed here and the
    gathers never write it."""
    Wp = _padded(W)
    R = max(W + ROWS - 1, Wp)
    return Tiles(np.zeros((R, D), dtype=dtype), np.zeros((R, D), dtype=dtype),
                 np.zeros((R, D), dtype=dtype), np.zeros((R, D), dtype=dtype),
                 np.zeros((D, Wp), dtype=dtype), np.zeros((D, Wp), dtype=dtype),
                 np.zeros(R, dtype=np.int64), np.empty((ROWS, Wp), dtype=dtype),
                 np.empty((ROWS, D), dtype=dtype), np.empty((R, Wp), dtype=dtype),
                 np.empty((R, Wp), dtype=dtype), np.empty(LANES, dtype=dtype))


@njit(cache=True, error_model="numpy")
def _gather_queries_and_keys(q, k, query_window, key_window, shared, tiles):
    """Query rows, key rows and keys transposed into the tiles; returns the key rows' tile.

    With ``shared`` (k is q and the key window is the query window: shared
    QK) the keys are the query rows already gathered, and only the transpose
    is made.
    """
    _gather_rows(q, query_window, tiles.q_rows)  # (T, D) -> (W, D)
    k_rows = tiles.q_rows
    if not shared:
        k_rows = tiles.k_rows
        _gather_rows(k, key_window, k_rows)  # (T, D) -> (W, D)
    _transpose_rows(k_rows, key_window.shape[0], tiles.kT)  # (W, D) -> (D, W)
    _visible_counts(query_window, key_window, tiles.visible)
    return k_rows


# --------------------------------------------------------------------------- forward
@njit(cache=True, error_model="numpy", inline="always")
def _cluster_forward(q, k, v, query_window, key_window, scale, last_resort, self_logit, shared, out, tiles):
    """Attention inside one cluster: ``out[r] = softmax(logits[r]) @ v[J]``.

    q, k, v (T, D) of one (b, h); query_window, key_window (W,); ``shared``:
    k is q and the windows are the same (:func:`_gather_queries_and_keys`);
    out (W, D) written; tiles from :func:`_cluster_scratch`.
    """
    W = query_window.shape[0]
    v_rows, p, block_out = tiles.v_rows, tiles.p, tiles.block_out
    _gather_queries_and_keys(q, k, query_window, key_window, shared, tiles)
    _gather_rows(v, key_window, v_rows)  # (T, D) -> (W, D)
    for r0 in range(0, W, ROWS):
        rows = min(ROWS, W - r0)
        n = _block_probabilities(tiles, p, query_window, key_window, r0, scale, last_resort, self_logit)
        if n == 0:
            out[r0:r0 + rows] = 0  # nothing visible: output 0 (docs/algorithm.md#14-attention-inside-a-cluster)
            continue
        _weights_times_rows(p, v_rows, 0, n, block_out)  # (4, n) @ (n, D) -> (4, D)
        _copy_rows(block_out, out[r0:r0 + rows], rows)


@njit(cache=True, error_model="numpy")
def _add_rows_at(rows, window, out):
    """``out[window[r]] += rows[r]`` in the order r = 0, 1, ...: rows (W, D), window (W,), out (T, D)."""
    D = out.shape[1]
    for r in range(window.shape[0]):
        src = rows[r]
        dst = out[window[r]]
        for d in range(D):
            dst[d] += src[d]


@njit(cache=True, error_model="numpy")
def _divide_rows(x, denominators):
    """``x[t] /= denominators[t]``: x (T, D), denominators (T,)."""
    D = x.shape[1]
    for t in range(x.shape[0]):
        row = x[t]
        denominator = denominators[t]
        for d in range(D):
            row[d] = row[d] / denominator


@njit(cache=True, error_model="numpy", nogil=True)
def _one_cluster_forward(q, k, v, query_window, key_window, scale, last_resort, self_logit, shared, out):
    """:func:`_cluster_forward` with its own scratch: q, k, v (T, D) of one (b, h), out (W, D)."""
    tiles = _cluster_scratch(query_window.shape[0], q.shape[1], q.dtype)
    _cluster_forward(q, k, v, query_window, key_window, scale, last_resort, self_logit, shared, out, tiles)


@njit(cache=True, error_model="numpy")
def _scatter_mean(cluster_out, query_windows, denominators, out):
    """``out[t] = (sum of the cluster rows at position t) / denominators[t]``.

    cluster_out (B, H, K, W, D), query_windows (B, H, K, W), denominators
    (B, H, T) = count + eps, out (B, H, T, D) zeroed.  Serial: it is cheap next
    to the clusters (one add per output number), and "by_cluster" serves few heads.
    """
    B, H, K, W = query_windows.shape
    for b in range(B):
        for h in range(H):
            for c in range(K):
                _add_rows_at(cluster_out[b, h, c], query_windows[b, h, c], out[b, h])
            _divide_rows(out[b, h], denominators[b, h])


@njit(cache=True, error_model="numpy", nogil=True)
def _head_forward(q, k, v, query_windows, key_windows, scale, last_resort, self_logit, shared, denominators,
                  out):
    """Every cluster of one (b, h), in order, each added into ``out`` (T, D, zeroed) as soon as it
    is done, then the division by ``denominators`` (T,): q, k, v (T, D), windows (K, W)."""
    K, W = query_windows.shape
    D = q.shape[1]
    tiles = _cluster_scratch(W, D, q.dtype)
    rows = np.empty((W, D), dtype=q.dtype)
    for c in range(K):
        _cluster_forward(q, k, v, query_windows[c], key_windows[c], scale, last_resort, self_logit, shared,
                         rows, tiles)
        _add_rows_at(rows, query_windows[c], out)
    _divide_rows(out, denominators)


# --------------------------------------------------------------------------- backward
@njit(cache=True, error_model="numpy", inline="always")
def _cluster_backward(g, denominators, q, k, v, query_window, key_window, scale, last_resort, self_logit,
                      shared, dq_out, dk_out, dv_out, tiles):
    """Gradients of one cluster.

    g, q, k, v (T, D) and denominators (T,) = count + eps, of one (b, h).  Query
    row r with probabilities p (recomputed) receives ``g_r / den_r``, so
    ``dp_s = g_r . v_s / den_r``, ``ds_s = scale p_s (dp_s - sum_s' dp_s' p_s')``,
    then ``dq_r = sum_s ds_s k_s``, ``dk_s = sum_r ds_s q_r``,
    ``dv_s = sum_r p_s g_r / den_r``.  dq_out, dk_out, dv_out (W, D) are
    written; with ``shared`` (k is q, one window) row r of dq_out is the
    whole gradient of position ``query_window[r]``, its query's and its
    key's (``dq_r + dk_r``), and dk_out is left alone.  The first pass goes over query blocks (probabilities, ds, dq)
    and keeps every row's ``p / den`` and ``ds`` in ``tiles.probs`` and
    ``tiles.dlogits``; the second goes over key blocks (dk, dv), whose
    weights are columns of those tiles.
    """
    W = query_window.shape[0]
    vT, q_rows, g_rows = tiles.vT, tiles.q_rows, tiles.g_rows
    block_out, probs, dlogits = tiles.block_out, tiles.probs, tiles.dlogits
    k_rows = _gather_queries_and_keys(q, k, query_window, key_window, shared, tiles)
    _gather_rows(v, key_window, tiles.v_rows)  # (T, D) -> (W, D)
    _transpose_rows(tiles.v_rows, W, vT)  # (W, D) -> (D, W)
    _gather_rows(g, query_window, g_rows)
    zero = scale - scale
    for r0 in range(0, W, ROWS):
        rows = min(ROWS, W - r0)
        p, ds = probs[r0:r0 + ROWS], dlogits[r0:r0 + ROWS]  # (4, Wp) each: this block's rows
        n = _block_probabilities(tiles, p, query_window, key_window, r0, scale, last_resort, self_logit)
        if n == 0:
            p[:] = 0
            ds[:] = 0
            dq_out[r0:r0 + rows] = 0  # these rows output 0 whatever q, k, v are: no gradient
            continue
        # dp without the 1 / den_r factor, which is taken once below instead of for every entry.
        _rows_times_tile(g_rows[r0:r0 + ROWS], vT, n, ds)  # g_r v_J^T: (4, D) @ (D, n) -> (4, n)
        for i in range(rows):
            position = query_window[r0 + i]
            denominator = denominators[position]
            pi, dsi = p[i], ds[i]
            delta = _lane_dot(dsi, pi, n, tiles.lanes)
            factor = scale / denominator
            for s in range(n):
                dsi[s] = factor * (pi[s] * (dsi[s] - delta))
            if last_resort:
                for s in range(min(n, W)):
                    if key_window[s] == position:
                        dsi[s] = zero  # the self logit is the constant -5e4: nothing reaches q or k
            for s in range(n):
                pi[s] = pi[s] / denominator  # now the weight of g_r in dv_s
        p[:, n:] = 0  # the second pass reads whole columns
        ds[:, n:] = 0
        # Padding rows (past W) have zero upstream rows, hence ds = 0: they add nothing to dq.
        _weights_times_rows(ds, k_rows, 0, n, block_out)  # (4, n) @ (n, D) -> (4, D)
        _copy_rows(block_out, dq_out[r0:r0 + rows], rows)
    # Key rows s0 .. s0 + 3: their weights are columns of probs and dlogits, read through transposed
    # views.  Queries from ``first`` on see key s0 (a merge walk, as in _visible_counts); the
    # entries of a later key that its query does not see are 0.
    first = 0
    for s0 in range(0, W, ROWS):
        rows = min(ROWS, W - s0)
        while first < W and query_window[first] < key_window[s0]:
            first += 1
        _weights_times_rows(dlogits.T[s0:s0 + ROWS], q_rows, first, W, block_out)  # (4, W) @ (W, D) -> (4, D)
        if shared:
            _add_rows(block_out, dq_out[s0:s0 + rows], rows)  # key s0 + i is query s0 + i
        else:
            _copy_rows(block_out, dk_out[s0:s0 + rows], rows)
        _weights_times_rows(probs.T[s0:s0 + ROWS], g_rows, first, W, block_out)
        _copy_rows(block_out, dv_out[s0:s0 + rows], rows)


@njit(cache=True, error_model="numpy", nogil=True)
def _one_cluster_backward(g, denominators, q, k, v, query_window, key_window, scale, last_resort, self_logit,
                          shared, dq_out, dk_out, dv_out):
    """:func:`_cluster_backward` with its own scratch: g, q, k, v (T, D) of one (b, h)."""
    tiles = _cluster_scratch(query_window.shape[0], q.shape[1], q.dtype)
    _cluster_backward(g, denominators, q, k, v, query_window, key_window, scale, last_resort, self_logit,
                      shared, dq_out, dk_out, dv_out, tiles)


@njit(cache=True, error_model="numpy", nogil=True)
def _scatter_rows(cluster_rows, windows, out):
    """``out[b, h, windows[b, h, c, r]] += cluster_rows[b, h, c, r]`` in the order (b, h, c, r)."""
    B, H, K, W = windows.shape
    for b in range(B):
        for h in range(H):
            for c in range(K):
                _add_rows_at(cluster_rows[b, h, c], windows[b, h, c], out[b, h])


@njit(cache=True, error_model="numpy", nogil=True)
def _head_backward(g, denominators, q, k, v, query_windows, key_windows, scale, last_resort, self_logit, shared,
                   dq, dk, dv):
    """Every cluster of one (b, h), in order, each added into dq, dk, dv (T, D, zeroed) when done
    (with ``shared``, dk is already in dq): g, q, k, v (T, D), windows (K, W)."""
    K, W = query_windows.shape
    D = q.shape[1]
    tiles = _cluster_scratch(W, D, q.dtype)
    dq_rows = np.empty((W, D), dtype=q.dtype)
    dk_rows = np.empty((W, D), dtype=q.dtype)
    dv_rows = np.empty((W, D), dtype=q.dtype)
    for c in range(K):
        _cluster_backward(g, denominators, q, k, v, query_windows[c], key_windows[c], scale, last_resort,
                          self_logit, shared, dq_rows, dk_rows, dv_rows, tiles)
        _add_rows_at(dq_rows, query_windows[c], dq)
        if not shared:
            _add_rows_at(dk_rows, key_windows[c], dk)
        _add_rows_at(dv_rows, key_windows[c], dv)


# --------------------------------------------------------------------------- entry points
def _check(q, k, v, query_windows, key_windows, g=None):
    """Shapes, dtypes, layout and window contents the kernels rely on; returns the dtype."""
    arrays = (("q", q), ("k", k), ("v", v)) + ((("g", g),) if g is not None else ())
    for name, x in arrays:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
        if x.dtype not in (np.float32, np.float64) or x.dtype != q.dtype:
            raise TypeError(f"{name} must be float32 or float64 like q ({q.dtype}), got {x.dtype}")
        if x.ndim != 4 or x.shape != q.shape or 0 in x.shape:
            raise ValueError(f"{name} must have the shape (B, H, T, D) of q {q.shape}, got {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
    B, H, T, D = q.shape
    for name, w in (("query_windows", query_windows), ("key_windows", key_windows)):
        if not isinstance(w, np.ndarray) or w.dtype != np.int64:
            got = w.dtype if isinstance(w, np.ndarray) else type(w).__name__
            raise TypeError(f"{name} must be an int64 NumPy array, got {got}")
        if w.ndim != 4 or w.shape[:2] != (B, H) or w.shape != query_windows.shape or 0 in w.shape:
            raise ValueError(f"{name} must have shape (B, H, K, W) = ({B}, {H}, K, W), the same for "
                             f"query and key windows; got {w.shape}")
        if not w.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if w.min() < 0 or w.max() >= T:
            raise ValueError(f"{name} must hold positions in [0, {T}), got values in [{w.min()}, {w.max()}]")
        if np.any(w[..., 1:] < w[..., :-1]):
            raise ValueError(f"{name} must be sorted by position along the last axis")
    return q.dtype


def _shared(q, k, query_windows, key_windows):
    """``(shared, k, key_windows)``: ``k=None`` with ``key_windows=None`` means shared QK."""
    if (k is None) != (key_windows is None):
        raise ValueError("k and key_windows must both be given, or both be None (shared QK: the keys are "
                         f"the queries), got k={type(k).__name__}, key_windows={type(key_windows).__name__}")
    if k is None:
        return True, q, query_windows
    return False, k, key_windows


def _denominators(query_windows, T, eps, dtype):
    """``count + eps`` per position: (B, H, K, W) -> (B, H, T), summed in float64 and cast to
    ``dtype``, as the reference does."""
    B, H = query_windows.shape[:2]
    offsets = (np.arange(B * H) * T).reshape(B, H, 1, 1)  # (B, H, 1, 1): where each (b, h) starts
    counts = np.bincount((query_windows + offsets).ravel(), minlength=B * H * T)  # (B*H*T,)
    return (counts.reshape(B, H, T) + float(eps)).astype(dtype)


SCHEDULES = ("auto", "by_cluster", "by_head")


def _schedule(schedule, B, H):
    """``"by_head"`` when the (b, h) pairs share out evenly among the threads, else ``"by_cluster"``.

    Both give bitwise the same result: every cluster is computed by the same
    code, and its rows reach each position in the same order (c, r).
    ``"by_cluster"`` keeps every thread busy with a single head but needs the
    (B, H, K, W, D) buffers and a second pass; ``"by_head"`` needs neither.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule != "auto":
        return schedule
    threads = numba.get_num_threads()
    return "by_head" if (B * H) % threads == 0 or B * H >= 4 * threads else "by_cluster"


def forward(q, k, v, query_windows, key_windows, scale, last_resort, eps, *, schedule="auto"):
    """Causal attention inside every cluster, then the scatter-mean.

    Parameters
    ----------
    q, k, v : ndarray (B, H, T, D), float32 or float64, C-contiguous
        ``k=None``: shared QK, the keys are the queries (and then
        ``key_windows`` must be None too: the key windows are the query
        windows).  Each cluster's rows are then gathered once.
    query_windows, key_windows : ndarray (B, H, K, W) int64, C-contiguous
        Positions of each cluster's queries and keys, ascending along W (as
        :func:`rt_numpy.kmeans.balanced_membership` returns them).
    scale : float
        Logit factor.
    last_resort : bool
        Give the self logit (key position == query position) the value -5e4.
    eps : float
        Added to each position's cluster count in the scatter-mean.
    schedule : {"auto", "by_cluster", "by_head"}
        How the work is shared among threads (:func:`_schedule`); it never
        changes the result.

    Returns
    -------
    ndarray (B, H, T, D)
        ``out[t] = sum over (c, r) with I_c[r] = t of O_c[r] / (count_t + eps)``
        with ``O_c = softmax(scale q[I_c] k[J_c]^T, causal by position) v[J_c]``.

    Notes
    -----
    docs/algorithm.md#14-attention-inside-a-cluster, docs/algorithm.md#15-combine;
    the reference is
    :func:`rt_numpy.attention.cluster_attention_reference`.
    """
    shared, k, key_windows = _shared(q, k, query_windows, key_windows)
    dtype = _check(q, k, v, query_windows, key_windows)
    B, H, K, W = query_windows.shape
    T, D = q.shape[2:]
    denominators = _denominators(query_windows, T, eps, dtype)  # (B, H, T)
    constants = (dtype.type(scale), bool(last_resort), dtype.type(SELF_LOGIT), shared)
    out = np.zeros_like(q)
    if _schedule(schedule, B, H) == "by_head":  # one task per (b, h), into its own slice of out
        numba_threads.run(_head_forward, [(q[b, h], k[b, h], v[b, h], query_windows[b, h], key_windows[b, h],
                                           *constants, denominators[b, h], out[b, h])
                                          for b in range(B) for h in range(H)])
    else:  # one task per cluster, into its own rows of the buffer; then the scatter-mean, serial
        cluster_out = np.empty((B, H, K, W, D), dtype=dtype)
        numba_threads.run(_one_cluster_forward, [(q[b, h], k[b, h], v[b, h], query_windows[b, h, c],
                                                  key_windows[b, h, c], *constants, cluster_out[b, h, c])
                                                 for b in range(B) for h in range(H) for c in range(K)])
        _scatter_mean(cluster_out, query_windows, denominators, out)
    return out


def backward(g, q, k, v, query_windows, key_windows, scale, last_resort, eps, *, schedule="auto"):
    """Gradients of ``sum(forward(q, k, v, ...) * g)`` with respect to q, k and v.

    Parameters
    ----------
    g : ndarray (B, H, T, D)
        Upstream gradient, the dtype of q.
    q, k, v, query_windows, key_windows, scale, last_resort, eps, schedule
        As in :func:`forward`.

    Returns
    -------
    dq, dk, dv : ndarray (B, H, T, D)
        With ``k=None`` (shared QK), dk is None and dq is the whole gradient
        of the shared queries and keys.

    Notes
    -----
    Each cluster's probabilities are recomputed here (FlashAttention style).
    With ``P`` the probabilities, ``dP = g_c v_J^T`` and ``g_c = g[I] / (count + eps)``:
    ``dS = P * (dP - rowsum(dP * P))``, ``dq = scale dS k_J``, ``dk = scale dS^T q_I``,
    ``dv = P^T g_c``; the self entry under ``last_resort`` is a constant and
    passes nothing to q or k.
    """
    shared, k, key_windows = _shared(q, k, query_windows, key_windows)
    dtype = _check(q, k, v, query_windows, key_windows, g)
    B, H, K, W = query_windows.shape
    T, D = q.shape[2:]
    denominators = _denominators(query_windows, T, eps, dtype)  # (B, H, T)
    constants = (dtype.type(scale), bool(last_resort), dtype.type(SELF_LOGIT), shared)
    dq, dv = np.zeros_like(q), np.zeros_like(q)
    dk = dq if shared else np.zeros_like(q)  # with shared QK the kernels never write dk
    if _schedule(schedule, B, H) == "by_head":  # one task per (b, h), into its own slices of dq, dk, dv
        numba_threads.run(_head_backward, [(g[b, h], denominators[b, h], q[b, h], k[b, h], v[b, h],
                                            query_windows[b, h], key_windows[b, h], *constants, dq[b, h],
                                            dk[b, h], dv[b, h]) for b in range(B) for h in range(H)])
    else:  # one task per cluster into its rows of the buffers; then dq, dk, dv filled, one task each
        dq_clusters, dv_clusters = (np.empty((B, H, K, W, D), dtype=dtype) for _ in range(2))  # each cluster's rows
        dk_clusters = dq_clusters if shared else np.empty_like(dq_clusters)
        numba_threads.run(_one_cluster_backward, [
            (g[b, h], denominators[b, h], q[b, h], k[b, h], v[b, h], query_windows[b, h, c], key_windows[b, h, c],
             *constants, dq_clusters[b, h, c], dk_clusters[b, h, c], dv_clusters[b, h, c])
            for b in range(B) for h in range(H) for c in range(K)])
        scatters = [(dq_clusters, query_windows, dq), (dv_clusters, key_windows, dv)]
        if not shared:  # with shared QK, dk is already in dq
            scatters.append((dk_clusters, key_windows, dk))
        numba_threads.run(_scatter_rows, scatters)
    return dq, (None if shared else dk), dv
