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
* Forward, a cluster is worked one query row at a time: its W logits stay in
  L1 and the (W, W) matrix never exists.  Backward keeps one (W, W) tile of
  probabilities and one of logit gradients per cluster, as scratch.
* Every innermost loop is elementwise (``out[s] += a0 * x0[s] + a1 * x1[s] +
  ...``), never a floating-point reduction, so LLVM vectorises it without
  reordering any sum.  Four terms are added per pass over ``out`` because the
  loads and stores of ``out``, not the arithmetic, limit these loops.  The
  cluster's keys (and, backward, values) are gathered once into transposed
  (D, W) tiles so that the loop over keys is contiguous.
* Threads (``prange``) never split the sum at one position, so the result is
  bitwise the same from run to run, for any number of threads, without
  atomics.  With many heads (``"by_head"``), each thread takes whole (b, h)
  pairs and adds each finished cluster into the output in the order (c, r).
  With few heads (``"by_cluster"``), each thread takes whole clusters and
  writes their rows into a (B, H, K, W, D) buffer; a second, serial pass adds
  the buffers into positions in the same order (c, r).  Both give the same
  bits.  Either way a call opens one parallel region.

This module is a leaf: it imports numpy and numba only.  No ``fastmath``.

Notes
-----
SPEC.md section 1 items 4-5.  Masked logits are -inf (probability exactly 0); a
query row with no visible key outputs 0; with ``last_resort`` the self logit is
-5e4, set before the causal mask.
"""
from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

# The threading layer (workqueue unless NUMBA_THREADING_LAYER is set) is chosen in
# rt_numpy/kernels/__init__.py.

SELF_LOGIT = -5e4  # the "last resort" self logit (SPEC.md 1.4), as in rt_numpy.attention


# --------------------------------------------------------------------------- building blocks
@njit(cache=True)
def _count_at_or_before(window, position):
    """How many entries of the ascending ``window`` are <= ``position`` (binary search)."""
    lo = 0
    hi = window.shape[0]
    while lo < hi:
        mid = (lo + hi) // 2
        if window[mid] <= position:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def _gather_transposed(x, window, out):
    """``out[d, s] = x[window[s], d]``: x (T, D), window (W,) -> out (D, W)."""
    D = x.shape[1]
    for s in range(window.shape[0]):
        row = x[window[s]]
        for d in range(D):
            out[d, s] = row[d]


@njit(cache=True)
def _vector_times_tile(x, tile, n, out):
    """``out[s] = sum_d x[d] tile[d, s]`` for s < n: x (D,), tile (D, W), out (W,).

    The sum over d is taken four terms at a time so that each pass over
    ``out[:n]`` (one load and one store per entry) carries four products.
    """
    D = x.shape[0]
    for s in range(n):
        out[s] = 0
    d = 0
    while d + 4 <= D:
        a0, a1, a2, a3 = x[d], x[d + 1], x[d + 2], x[d + 3]
        t0, t1, t2, t3 = tile[d], tile[d + 1], tile[d + 2], tile[d + 3]
        for s in range(n):
            out[s] += a0 * t0[s] + a1 * t1[s] + a2 * t2[s] + a3 * t3[s]
        d += 4
    for rest in range(d, D):
        a = x[rest]
        t = tile[rest]
        for s in range(n):
            out[s] += a * t[s]


@njit(cache=True)
def _add_weighted_rows(weights, rows, index, start, stop, out):
    """``out[:] += sum_i weights[i] rows[index[i]]`` over i in [start, stop): out (D,), rows (T, D).

    Four rows per pass over ``out``, as in :func:`_vector_times_tile`.
    """
    D = out.shape[0]
    i = start
    while i + 4 <= stop:
        w0, w1, w2, w3 = weights[i], weights[i + 1], weights[i + 2], weights[i + 3]
        x0, x1, x2, x3 = rows[index[i]], rows[index[i + 1]], rows[index[i + 2]], rows[index[i + 3]]
        for d in range(D):
            out[d] += w0 * x0[d] + w1 * x1[d] + w2 * x2[d] + w3 * x3[d]
        i += 4
    for rest in range(i, stop):
        w = weights[rest]
        x = rows[index[rest]]
        for d in range(D):
            out[d] += w * x[d]


@njit(cache=True)
def _probability_row(q_row, kT, key_window, n, position, scale, last_resort, self_logit, row):
    """Softmax probabilities of one query over the first ``n`` (visible) keys of its cluster.

    q_row (D,), kT (D, W) the cluster's keys transposed, key_window (W,).
    Writes ``row[:n]``; ``n >= 1``.  ``scale`` and ``self_logit`` are scalars
    of the data's dtype, so that float32 stays float32.
    """
    _vector_times_tile(q_row, kT, n, row)  # (D,) @ (D, n) -> (n,)
    for s in range(n):
        row[s] = row[s] * scale
    if last_resort:
        for s in range(n):
            if key_window[s] == position:
                row[s] = self_logit
    largest = row[0]
    for s in range(1, n):
        if row[s] > largest:
            largest = row[s]
    total = scale - scale  # a zero of the data's dtype
    for s in range(n):
        e = math.exp(row[s] - largest)
        row[s] = e
        total += e
    for s in range(n):
        row[s] = row[s] / total


# --------------------------------------------------------------------------- forward
@njit(cache=True)
def _cluster_forward(q, k, v, query_window, key_window, scale, last_resort, self_logit, out, kT, row):
    """Attention inside one cluster: ``out[r] = softmax(logits[r]) @ v[J]``.

    q, k, v (T, D) of one (b, h); query_window, key_window (W,); out (W, D)
    written; kT (D, W) and row (W,) are scratch.
    """
    W = query_window.shape[0]
    _gather_transposed(k, key_window, kT)  # (T, D) -> (D, W)
    for r in range(W):
        position = query_window[r]
        out_row = out[r]
        out_row[:] = 0
        n = _count_at_or_before(key_window, position)
        if n == 0:
            continue  # nothing visible: this row outputs 0 (SPEC.md 1.4)
        _probability_row(q[position], kT, key_window, n, position, scale, last_resort, self_logit, row)
        _add_weighted_rows(row, v, key_window, 0, n, out_row)  # (n,) @ (n, D) -> (D,)


@njit(cache=True)
def _add_rows_at(rows, window, out):
    """``out[window[r]] += rows[r]`` in the order r = 0, 1, ...: rows (W, D), window (W,), out (T, D)."""
    D = out.shape[1]
    for r in range(window.shape[0]):
        src = rows[r]
        dst = out[window[r]]
        for d in range(D):
            dst[d] += src[d]


@njit(cache=True)
def _divide_rows(x, denominators):
    """``x[t] /= denominators[t]``: x (T, D), denominators (T,)."""
    D = x.shape[1]
    for t in range(x.shape[0]):
        row = x[t]
        denominator = denominators[t]
        for d in range(D):
            row[d] = row[d] / denominator


@njit(cache=True)
def _cluster_of(i, H, K):
    """``(b, h, c)`` of the i-th cluster when clusters are numbered b-major: i = (b H + h) K + c."""
    return i // (H * K), (i // K) % H, i % K


@njit(cache=True, parallel=True)
def _forward_by_cluster(q, k, v, query_windows, key_windows, scale, last_resort, self_logit, cluster_out):
    """Every cluster's (W, D) output into ``cluster_out`` (B, H, K, W, D), one cluster per thread."""
    B, H, K, W = query_windows.shape
    D = q.shape[3]
    for i in prange(B * H * K):
        b, h, c = _cluster_of(i, H, K)
        kT = np.empty((D, W), dtype=q.dtype)
        row = np.empty(W, dtype=q.dtype)
        _cluster_forward(q[b, h], k[b, h], v[b, h], query_windows[b, h, c], key_windows[b, h, c],
                         scale, last_resort, self_logit, cluster_out[b, h, c], kT, row)


@njit(cache=True)
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


@njit(cache=True, parallel=True)
def _forward_by_head(q, k, v, query_windows, key_windows, scale, last_resort, self_logit, denominators, out):
    """One (b, h) per thread: its clusters in order, each added into ``out`` (B, H, T, D, zeroed)
    as soon as it is done, then the division by ``denominators`` (B, H, T)."""
    B, H, K, W = query_windows.shape
    D = q.shape[3]
    for i in prange(B * H):
        b = i // H
        h = i % H
        kT = np.empty((D, W), dtype=q.dtype)
        row = np.empty(W, dtype=q.dtype)
        rows = np.empty((W, D), dtype=q.dtype)
        for c in range(K):
            _cluster_forward(q[b, h], k[b, h], v[b, h], query_windows[b, h, c], key_windows[b, h, c],
                             scale, last_resort, self_logit, rows, kT, row)
            _add_rows_at(rows, query_windows[b, h, c], out[b, h])
        _divide_rows(out[b, h], denominators[b, h])


# --------------------------------------------------------------------------- backward
@njit(cache=True)
def _cluster_backward(g, denominators, q, k, v, query_window, key_window, scale, last_resort, self_logit,
                      dq_out, dk_out, dv_out, kT, vT, p, ds, probs_t, dlogits_t):
    """Gradients of one cluster.

    g, q, k, v (T, D) and denominators (T,) = count + eps, of one (b, h).  Query
    row r with probabilities p (recomputed) receives ``g_r / den_r``, so
    ``dp_s = g_r . v_s / den_r``, ``ds_s = scale p_s (dp_s - sum_s' dp_s' p_s')``,
    then ``dq_r = sum_s ds_s k_s``, ``dk_s = sum_r ds_s q_r``,
    ``dv_s = sum_r p_s g_r / den_r``.  dq_out, dk_out, dv_out (W, D) are
    written.  Scratch: kT, vT (D, W); p, ds (W,) for one query row; probs_t,
    dlogits_t (W, W) keep every row's ``p / den`` and ``ds`` transposed, so
    that the sums over queries for dk and dv read contiguous weights (only the
    visible entries are ever written or read).
    """
    W = query_window.shape[0]
    _gather_transposed(k, key_window, kT)  # (T, D) -> (D, W)
    _gather_transposed(v, key_window, vT)  # (T, D) -> (D, W)
    zero = scale - scale
    for r in range(W):
        position = query_window[r]
        dq_row = dq_out[r]
        dq_row[:] = 0
        n = _count_at_or_before(key_window, position)
        if n == 0:
            continue  # the row outputs 0 whatever q, k, v are: no gradient
        denominator = denominators[position]
        _probability_row(q[position], kT, key_window, n, position, scale, last_resort, self_logit, p)
        # dp without the 1 / den_r factor, which is taken once below instead of for every entry.
        _vector_times_tile(g[position], vT, n, ds)  # g_r v_J^T: (D,) @ (D, n) -> (n,)
        delta = zero
        for s in range(n):
            delta += ds[s] * p[s]
        factor = scale / denominator
        for s in range(n):
            ds[s] = factor * (p[s] * (ds[s] - delta))
        if last_resort:
            for s in range(n):
                if key_window[s] == position:
                    ds[s] = zero  # the self logit is the constant -5e4: nothing reaches q or k
        _add_weighted_rows(ds, k, key_window, 0, n, dq_row)  # (n,) @ (n, D) -> (D,)
        for s in range(n):
            probs_t[s, r] = p[s] / denominator  # the weight of g_r in dv_s
            dlogits_t[s, r] = ds[s]
    for s in range(W):
        dk_row = dk_out[s]
        dv_row = dv_out[s]
        dk_row[:] = 0
        dv_row[:] = 0
        first = _count_at_or_before(query_window, key_window[s] - 1)  # queries that see key s: [first, W)
        _add_weighted_rows(dlogits_t[s], q, query_window, first, W, dk_row)  # (W,) @ (W, D) -> (D,)
        _add_weighted_rows(probs_t[s], g, query_window, first, W, dv_row)


@njit(cache=True)
def _backward_scratch(W, D, dtype):
    """One thread's scratch for :func:`_cluster_backward`: kT, vT (D, W); p, ds (W,); probs_t, dlogits_t (W, W)."""
    return (np.empty((D, W), dtype=dtype), np.empty((D, W), dtype=dtype), np.empty(W, dtype=dtype),
            np.empty(W, dtype=dtype), np.empty((W, W), dtype=dtype), np.empty((W, W), dtype=dtype))


@njit(cache=True, parallel=True)
def _backward_by_cluster(g, denominators, q, k, v, query_windows, key_windows, scale, last_resort, self_logit,
                         dq_clusters, dk_clusters, dv_clusters):
    """Every cluster's gradient rows into the (B, H, K, W, D) buffers, one cluster per thread."""
    B, H, K, W = query_windows.shape
    D = q.shape[3]
    for i in prange(B * H * K):
        b, h, c = _cluster_of(i, H, K)
        kT, vT, p, ds, probs_t, dlogits_t = _backward_scratch(W, D, q.dtype)
        _cluster_backward(g[b, h], denominators[b, h], q[b, h], k[b, h], v[b, h], query_windows[b, h, c],
                          key_windows[b, h, c], scale, last_resort, self_logit, dq_clusters[b, h, c],
                          dk_clusters[b, h, c], dv_clusters[b, h, c], kT, vT, p, ds, probs_t, dlogits_t)


@njit(cache=True)
def _scatter_gradients(dq_clusters, dk_clusters, dv_clusters, query_windows, key_windows, dq, dk, dv):
    """Add the cluster gradient rows into positions in the order (c, r); serial, as :func:`_scatter_mean`."""
    B, H, K, W = query_windows.shape
    for b in range(B):
        for h in range(H):
            for c in range(K):
                _add_rows_at(dq_clusters[b, h, c], query_windows[b, h, c], dq[b, h])
                _add_rows_at(dk_clusters[b, h, c], key_windows[b, h, c], dk[b, h])
                _add_rows_at(dv_clusters[b, h, c], key_windows[b, h, c], dv[b, h])


@njit(cache=True, parallel=True)
def _backward_by_head(g, denominators, q, k, v, query_windows, key_windows, scale, last_resort, self_logit,
                      dq, dk, dv):
    """One (b, h) per thread: its clusters in order, each added into dq, dk, dv (zeroed) when done."""
    B, H, K, W = query_windows.shape
    D = q.shape[3]
    for i in prange(B * H):
        b = i // H
        h = i % H
        kT, vT, p, ds, probs_t, dlogits_t = _backward_scratch(W, D, q.dtype)
        dq_rows = np.empty((W, D), dtype=q.dtype)
        dk_rows = np.empty((W, D), dtype=q.dtype)
        dv_rows = np.empty((W, D), dtype=q.dtype)
        for c in range(K):
            _cluster_backward(g[b, h], denominators[b, h], q[b, h], k[b, h], v[b, h], query_windows[b, h, c],
                              key_windows[b, h, c], scale, last_resort, self_logit, dq_rows, dk_rows, dv_rows,
                              kT, vT, p, ds, probs_t, dlogits_t)
            _add_rows_at(dq_rows, query_windows[b, h, c], dq[b, h])
            _add_rows_at(dk_rows, key_windows[b, h, c], dk[b, h])
            _add_rows_at(dv_rows, key_windows[b, h, c], dv[b, h])


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
    SPEC.md section 1 items 4-5; the reference is
    :func:`rt_numpy.attention.cluster_attention_reference`.
    """
    dtype = _check(q, k, v, query_windows, key_windows)
    B, H, K, W = query_windows.shape
    T, D = q.shape[2:]
    denominators = _denominators(query_windows, T, eps, dtype)  # (B, H, T)
    constants = (dtype.type(scale), bool(last_resort), dtype.type(SELF_LOGIT))
    out = np.zeros_like(q)
    if _schedule(schedule, B, H) == "by_head":
        _forward_by_head(q, k, v, query_windows, key_windows, *constants, denominators, out)
    else:
        cluster_out = np.empty((B, H, K, W, D), dtype=dtype)
        _forward_by_cluster(q, k, v, query_windows, key_windows, *constants, cluster_out)
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

    Notes
    -----
    Each cluster's probabilities are recomputed here (FlashAttention style).
    With ``P`` the probabilities, ``dP = g_c v_J^T`` and ``g_c = g[I] / (count + eps)``:
    ``dS = P * (dP - rowsum(dP * P))``, ``dq = scale dS k_J``, ``dk = scale dS^T q_I``,
    ``dv = P^T g_c``; the self entry under ``last_resort`` is a constant and
    passes nothing to q or k.
    """
    dtype = _check(q, k, v, query_windows, key_windows, g)
    B, H, K, W = query_windows.shape
    T, D = q.shape[2:]
    denominators = _denominators(query_windows, T, eps, dtype)  # (B, H, T)
    constants = (dtype.type(scale), bool(last_resort), dtype.type(SELF_LOGIT))
    dq, dk, dv = np.zeros_like(q), np.zeros_like(q), np.zeros_like(q)
    if _schedule(schedule, B, H) == "by_head":
        _backward_by_head(g, denominators, q, k, v, query_windows, key_windows, *constants, dq, dk, dv)
    else:
        buffers = [np.empty((B, H, K, W, D), dtype=dtype) for _ in range(3)]  # dq, dk, dv of each cluster
        _backward_by_cluster(g, denominators, q, k, v, query_windows, key_windows, *constants, *buffers)
        _scatter_gradients(*buffers, query_windows, key_windows, dq, dk, dv)
    return dq, dk, dv
