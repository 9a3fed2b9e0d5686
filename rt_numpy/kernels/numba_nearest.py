"""Numba kernels for ``membership="nearest"`` routing attention (CPU fast path of
:func:`rt_numpy.attention._nearest_attention`, used by
:func:`rt_numpy.attention.nearest_attention_fused`).

With nearest membership every token is in exactly one cluster per stream
(queries, keys): the one of its nearest centroid, or none for padding
(assignment -1).  Query i sees key j when both chose the same cluster and
j <= i.  The reference writes this as dense (T, T) masked attention, O(T^2)
memory; the kernels here never make anything of size (T, T):

1. **Group** (:func:`_group`): a counting sort of each (b, h)'s positions by
   cluster.  It is stable, so inside a cluster the positions ascend, and the
   keys a query may see (key position <= query position) are a prefix of its
   cluster's key list.  Padding is left out of every group.
2. **Attend** inside each cluster: a query row's logits against that prefix,
   a stable softmax (the row maximum subtracted first), the weighted sum of the
   values, divided by ``1 + eps`` as the scatter-mean of the reference does
   (each token is counted once).  Memory per cluster: its key rows, O(n D).
3. The **backward** pass recomputes each row's probabilities (as
   FlashAttention does) instead of keeping them: nothing of size (T, T) is
   kept between the passes either.

Two entry points: :func:`forward` and :func:`backward` (the gradients of
``sum(forward(...) * g)`` with respect to q, k and v).  They check their
arguments (shapes, dtypes, layout, assignment range), cheaply, before any
compiled code runs.

Threads (``prange``) take whole clusters.  A position is a query of exactly
one cluster and a key of exactly one cluster, so each thread writes rows no
other thread writes, and every sum is taken in the same order by one thread:
the results are bitwise the same for any number of threads, without atomics
or buffers.

The loops are written so that LLVM vectorises them without ``fastmath``: the
innermost loop of each product is elementwise over keys (logits, against the
transposed key tile) or over the D features (weighted sums of rows), never a
floating-point reduction.  The exponential is
:func:`rt_numpy.kernels.numba_exp.exp_nonpositive`.  ``error_model="numpy"``
(a division by zero would give inf, not raise) lets LLVM vectorise the
division of a row by its softmax total, which is at least 1.  This module
imports numpy, numba and :mod:`rt_numpy.kernels.numba_exp` only.

Notes
-----
docs/algorithm.md#13-membership, docs/algorithm.md#14-attention-inside-a-cluster,
docs/algorithm.md#15-combine.  A query row with no visible key outputs 0 and
passes no gradient; with ``last_resort`` the self logit (key position == query
position) is -5e4, set before the softmax, and passes no gradient to q or k.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from rt_numpy.kernels import SELF_LOGIT  # the "last resort" self logit
from rt_numpy.kernels.numba_exp import exp_nonpositive


# --------------------------------------------------------------------------- grouping
@njit(cache=True, parallel=True, error_model="numpy")
def _group(assignments, K, members, starts):
    """Positions grouped by cluster, ascending inside each cluster (a stable counting sort).

    assignments (B, H, T) in [-1, K) -> ``members`` (B, H, T) and ``starts``
    (B, H, K + 1): cluster c of (b, h) is ``members[b, h, starts[b, h, c]:
    starts[b, h, c + 1]]``.  Padding (-1) is in no cluster; the tail of
    ``members`` past ``starts[b, h, K]`` is left as it is.
    """
    B, H, T = assignments.shape
    for i in prange(B * H):
        b, h = i // H, i % H
        a, start = assignments[b, h], starts[b, h]
        start[:] = 0
        for t in range(T):  # start[c + 1] counts cluster c ...
            if a[t] >= 0:
                start[a[t] + 1] += 1
        for c in range(K):  # ... and the running sum turns counts into where each cluster starts
            start[c + 1] += start[c]
        filled = start[:K].copy()
        for t in range(T):  # positions in increasing order: each cluster's list ascends
            c = a[t]
            if c >= 0:
                members[b, h, filled[c]] = t
                filled[c] += 1


# --------------------------------------------------------------------------- building blocks
@njit(cache=True, error_model="numpy", inline="always")
def _gather_rows(x, positions, rows):
    """``rows[s] = x[positions[s]]``: x (T, D) -> rows (n, D)."""
    for s in range(positions.shape[0]):
        src, dst = x[positions[s]], rows[s]
        for d in range(x.shape[1]):  # an explicit loop: Numba's row assignment is slower
            dst[d] = src[d]


@njit(cache=True, error_model="numpy", inline="always")
def _gather_columns(x, positions, columns):
    """``columns[:, s] = x[positions[s]]``: x (T, D) -> columns (D, n), for products over keys."""
    for s in range(positions.shape[0]):
        src = x[positions[s]]
        for d in range(x.shape[1]):
            columns[d, s] = src[d]


@njit(cache=True, error_model="numpy", inline="always")
def _row_times_columns(x, columns, count, out):
    """``out[s] = sum_d x[d] columns[d, s]`` for s < count: x (D,) @ columns (D, n) -> out (count,).

    Four d per pass over ``out``, each pass elementwise over s (it vectorises;
    one d per pass would load and store ``out`` four times as often).
    """
    D = x.shape[0]
    out[:count] = 0
    d = 0
    while d + 4 <= D:
        x0, x1, x2, x3 = x[d], x[d + 1], x[d + 2], x[d + 3]
        c0, c1, c2, c3 = columns[d], columns[d + 1], columns[d + 2], columns[d + 3]
        for s in range(count):
            out[s] += x0 * c0[s] + x1 * c1[s] + x2 * c2[s] + x3 * c3[s]
        d += 4
    for rest in range(d, D):
        xd, c = x[rest], columns[rest]
        for s in range(count):
            out[s] += xd * c[s]


@njit(cache=True, error_model="numpy", inline="always")
def _weights_times_rows(w, rows, count, out):
    """``out[d] += sum_{s < count} w[s] rows[s, d]``: w (count,) @ rows (n, D) -> out (D,), added.

    Four rows per pass over ``out``, each pass elementwise over d.
    """
    D = rows.shape[1]
    s = 0
    while s + 4 <= count:
        w0, w1, w2, w3 = w[s], w[s + 1], w[s + 2], w[s + 3]
        r0, r1, r2, r3 = rows[s], rows[s + 1], rows[s + 2], rows[s + 3]
        for d in range(D):
            out[d] += w0 * r0[d] + w1 * r1[d] + w2 * r2[d] + w3 * r3[d]
        s += 4
    for rest in range(s, count):
        wr, r = w[rest], rows[rest]
        for d in range(D):
            out[d] += wr * r[d]


@njit(cache=True, error_model="numpy", inline="always")
def _probabilities(q_row, keys_t, keys, count, position, scale, last_resort, self_logit, p):
    """``p[:count] = softmax(scale q_row k_s)`` over the first ``count`` keys of a cluster, in place.

    q_row (D,), keys_t (D, n) the cluster's key rows as columns, keys (n,) their
    positions, ``position`` the query's.  ``count >= 1``.
    """
    _row_times_columns(q_row, keys_t, count, p)  # (D,) @ (D, count) -> (count,)
    for s in range(count):
        p[s] *= scale
    if last_resort and keys[count - 1] == position:  # keys ascend: only the last visible one can be "self"
        p[count - 1] = self_logit
    m = p[0]
    for s in range(1, count):
        m = p[s] if p[s] > m else m
    total = scale - scale  # 0 in the dtype of the data
    for s in range(count):
        p[s] = exp_nonpositive(p[s] - m)
        total += p[s]
    for s in range(count):  # total >= 1: the maximum's own term
        p[s] /= total


# --------------------------------------------------------------------------- one cluster
@njit(cache=True, error_model="numpy", inline="always")
def _visible_count(keys, position, count):
    """How many keys (ascending positions) are at or before ``position``; ``count`` is the answer for the
    previous, earlier query of the cluster, so the walk over the keys is done once per cluster."""
    while count < keys.shape[0] and keys[count] <= position:
        count += 1
    return count


@njit(cache=True, error_model="numpy", inline="always")
def _cluster_forward(q, k, v, queries, keys, scale, last_resort, self_logit, inv, out):
    """Output rows (times ``inv = 1 / (1 + eps)``) of one cluster's queries, added into ``out`` (T, D), zeros."""
    n, D = keys.shape[0], q.shape[1]
    k_t, v_rows = np.empty((D, n), q.dtype), np.empty((n, D), q.dtype)
    _gather_columns(k, keys, k_t)  # (T, D) -> (D, n)
    _gather_rows(v, keys, v_rows)  # (T, D) -> (n, D)
    p = np.empty(n, q.dtype)
    count = 0
    for r in range(queries.shape[0]):
        i = queries[r]
        count = _visible_count(keys, i, count)
        if count == 0:  # no key of the cluster at or before i: the row of ``out`` stays 0
            continue
        _probabilities(q[i], k_t, keys, count, i, scale, last_resort, self_logit, p)
        row = out[i]
        _weights_times_rows(p, v_rows, count, row)  # (count,) @ (count, D) -> (D,)
        for d in range(D):
            row[d] *= inv


@njit(cache=True, error_model="numpy", inline="always")
def _cluster_backward(g, q, k, v, queries, keys, shared, scale, last_resort, self_logit, inv, dq, dk, dv):
    """Gradient rows of one cluster into dq at its queries, dk and dv at its keys (all (T, D), zeros there);
    with ``shared``, the keys' gradient is added into dq.

    With ``P`` a row's probabilities, ``g_i = g[i] inv`` and ``dP_s = g_i . v_s``:
    ``dS_s = P_s (dP_s - sum_s dP_s P_s)``, ``dq_i = scale sum_s dS_s k_s``,
    ``dk_s += scale dS_s q_i``, ``dv_s += P_s g_i``.
    """
    n, D = keys.shape[0], q.shape[1]
    k_rows, k_t, v_t = np.empty((n, D), q.dtype), np.empty((D, n), q.dtype), np.empty((D, n), q.dtype)
    _gather_rows(k, keys, k_rows)  # (T, D) -> (n, D)
    _gather_columns(k, keys, k_t)  # (T, D) -> (D, n)
    _gather_columns(v, keys, v_t)
    dk_rows, dv_rows = np.zeros((n, D), q.dtype), np.zeros((n, D), q.dtype)
    p, ds, g_row = np.empty(n, q.dtype), np.empty(n, q.dtype), np.empty(D, q.dtype)
    count = 0
    for r in range(queries.shape[0]):
        i = queries[r]
        count = _visible_count(keys, i, count)
        if count == 0:  # the row outputs 0 whatever q, k, v are: its dq row stays 0
            continue
        _probabilities(q[i], k_t, keys, count, i, scale, last_resort, self_logit, p)
        for d in range(D):
            g_row[d] = g[i, d] * inv
        _row_times_columns(g_row, v_t, count, ds)  # dP = g_i v^T: (D,) @ (D, count) -> (count,)
        delta = scale - scale
        for s in range(count):
            delta += ds[s] * p[s]
        for s in range(count):
            ds[s] = scale * (p[s] * (ds[s] - delta))
        if last_resort and keys[count - 1] == i:
            ds[count - 1] = 0  # the self logit is the constant -5e4: nothing reaches q or k
        _weights_times_rows(ds, k_rows, count, dq[i])  # (count,) @ (count, D) -> (D,)
        q_row = q[i]
        for s in range(count):  # one query's share of dk and dv: rank-one updates of (count, D)
            w, dk_row, dv_row, ps = ds[s], dk_rows[s], dv_rows[s], p[s]
            for d in range(D):
                dk_row[d] += w * q_row[d]
                dv_row[d] += ps * g_row[d]
    for s in range(n):
        j = keys[s]
        dv[j, :] = dv_rows[s]
        if shared:  # key s is also a query of this cluster, whose dq row is written above
            for d in range(D):
                dq[j, d] += dk_rows[s, d]
        else:
            dk[j, :] = dk_rows[s]


# --------------------------------------------------------------------------- every cluster
@njit(cache=True, parallel=True, error_model="numpy")
def _forward(q, k, v, query_members, query_starts, key_members, key_starts, scale, last_resort, self_logit,
             inv, out):
    """Every cluster's output rows into ``out`` (B, H, T, D), zeros; one cluster of one (b, h) per task."""
    B, H, K = query_starts.shape[0], query_starts.shape[1], query_starts.shape[2] - 1
    for task in prange(B * H * K):
        b, h, c = task // (H * K), task // K % H, task % K
        queries = query_members[b, h, query_starts[b, h, c]:query_starts[b, h, c + 1]]
        keys = key_members[b, h, key_starts[b, h, c]:key_starts[b, h, c + 1]]
        _cluster_forward(q[b, h], k[b, h], v[b, h], queries, keys, scale, last_resort, self_logit, inv, out[b, h])


@njit(cache=True, parallel=True, error_model="numpy")
def _backward(g, q, k, v, query_members, query_starts, key_members, key_starts, shared, scale, last_resort,
              self_logit, inv, dq, dk, dv):
    """Every cluster's gradient rows into dq, dk, dv (B, H, T, D), zeros; one cluster of one (b, h) per task."""
    B, H, K = query_starts.shape[0], query_starts.shape[1], query_starts.shape[2] - 1
    for task in prange(B * H * K):
        b, h, c = task // (H * K), task // K % H, task % K
        queries = query_members[b, h, query_starts[b, h, c]:query_starts[b, h, c + 1]]
        keys = key_members[b, h, key_starts[b, h, c]:key_starts[b, h, c + 1]]
        _cluster_backward(g[b, h], q[b, h], k[b, h], v[b, h], queries, keys, shared, scale, last_resort,
                          self_logit, inv, dq[b, h], dk[b, h], dv[b, h])


# --------------------------------------------------------------------------- entry points
def _check(q, k, v, query_assignments, key_assignments, num_clusters, g=None):
    """Shapes, dtypes, layout and assignment range the kernels rely on; returns the dtype."""
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
    if isinstance(num_clusters, bool) or not isinstance(num_clusters, (int, np.integer)) or num_clusters < 1:
        raise ValueError(f"num_clusters must be an integer >= 1, got {num_clusters!r}")
    for name, a in (("query_assignments", query_assignments), ("key_assignments", key_assignments)):
        if not isinstance(a, np.ndarray) or a.dtype != np.int64:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"{name} must be an int64 NumPy array, got {got}")
        if a.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape (B, H, T) = {q.shape[:3]}, got {a.shape}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name} must be C-contiguous")
        if a.min() < -1 or a.max() >= num_clusters:
            raise ValueError(f"{name} must hold clusters in [-1, {num_clusters}) (-1: padding), "
                             f"got values in [{a.min()}, {a.max()}]")
    return q.dtype


def _shared(q, k, query_assignments, key_assignments):
    """``(shared, k, key_assignments)``: ``k=None`` with ``key_assignments=None`` means shared QK."""
    if (k is None) != (key_assignments is None):
        raise ValueError("k and key_assignments must both be given, or both be None (shared QK: the keys are "
                         f"the queries), got k={type(k).__name__}, key_assignments={type(key_assignments).__name__}")
    if k is None:
        return True, q, query_assignments
    return False, k, key_assignments


def _groups(assignments, K):
    """``(members, starts)`` of :func:`_group`: (B, H, T) and (B, H, K + 1) int64."""
    members = np.zeros(assignments.shape, np.int64)
    starts = np.empty(assignments.shape[:2] + (K + 1,), np.int64)
    _group(assignments, K, members, starts)
    return members, starts


def forward(q, k, v, query_assignments, key_assignments, num_clusters, scale, last_resort, eps):
    """Causal attention inside each nearest-centroid cluster, divided by ``1 + eps``.

    Parameters
    ----------
    q, k, v : ndarray (B, H, T, D), float32 or float64, C-contiguous
        ``k=None``: shared QK, the keys are the queries (and then
        ``key_assignments`` must be None too: the keys' clusters are the queries').
    query_assignments, key_assignments : ndarray (B, H, T) int64, C-contiguous
        Each position's cluster in [0, num_clusters), or -1 (padding: in no cluster).
    num_clusters : int
        K.
    scale : float
        Logit factor.
    last_resort : bool
        Give the self logit (key position == query position) the value -5e4.
    eps : float
        ``combine_eps``: every output row is divided by ``1 + eps``.

    Returns
    -------
    ndarray (B, H, T, D)
        ``out[i] = softmax_j(scale q_i k_j, over j <= i with key_assignments[j] ==
        query_assignments[i]) v / (1 + eps)``; 0 where nothing is visible
        (padding queries among them).

    Notes
    -----
    docs/algorithm.md#13-membership; the reference is
    :func:`rt_numpy.attention._nearest_attention`.  Memory: O(B H T) for the
    groups plus, per running thread, one cluster's key and value rows.
    """
    shared, k, key_assignments = _shared(q, k, query_assignments, key_assignments)
    dtype = _check(q, k, v, query_assignments, key_assignments, num_clusters)
    query_groups = _groups(query_assignments, int(num_clusters))
    key_groups = query_groups if shared else _groups(key_assignments, int(num_clusters))
    out = np.zeros_like(q)  # rows of padding queries are never written: they stay 0
    _forward(q, k, v, *query_groups, *key_groups, dtype.type(scale), bool(last_resort), dtype.type(SELF_LOGIT),
             dtype.type(1.0 / (1.0 + float(eps))), out)
    return out


def backward(g, q, k, v, query_assignments, key_assignments, num_clusters, scale, last_resort, eps):
    """Gradients of ``sum(forward(q, k, v, ...) * g)`` with respect to q, k and v.

    Parameters
    ----------
    g : ndarray (B, H, T, D)
        Upstream gradient, the dtype of q.
    q, k, v, query_assignments, key_assignments, num_clusters, scale, last_resort, eps
        As in :func:`forward`.

    Returns
    -------
    dq, dk, dv : ndarray (B, H, T, D)
        With ``k=None`` (shared QK), dk is None and dq is the whole gradient
        of the shared queries and keys.
    """
    shared, k, key_assignments = _shared(q, k, query_assignments, key_assignments)
    dtype = _check(q, k, v, query_assignments, key_assignments, num_clusters, g)
    query_groups = _groups(query_assignments, int(num_clusters))
    key_groups = query_groups if shared else _groups(key_assignments, int(num_clusters))
    dq, dv = np.zeros_like(q), np.zeros_like(q)  # padding rows are never written: they stay 0
    dk = dq if shared else np.zeros_like(q)  # with shared QK the keys' gradient goes into dq
    _backward(g, q, k, v, *query_groups, *key_groups, shared, dtype.type(scale), bool(last_resort),
              dtype.type(SELF_LOGIT), dtype.type(1.0 / (1.0 + float(eps))), dq, dk, dv)
    return dq, (None if shared else dk), dv
