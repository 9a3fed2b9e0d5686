"""CuPy kernels for the attention inside routing clusters (GPU fast path of
:func:`rt_numpy.attention.cluster_attention_reference`, used by
:func:`rt_numpy.attention.cluster_attention_fused` on CuPy arrays).

The same two entry points as :mod:`rt_numpy.kernels.numba_routing`, computing
the same things to rounding (``tests/gpu/test_gpu.py``):

* :func:`forward` - causal softmax attention inside every cluster, then the
  scatter-mean back to positions.
* :func:`backward` - the gradients of ``sum(forward(...) * g)`` with respect
  to q, k and v, recomputing each cluster's probabilities (FlashAttention
  style): nothing of size (K, W, W) is stored, on the way forward or back.

How the work is laid out (one thread block per cluster, FlashAttention-2's split):

* Windows are sorted by position, so the keys a query may see are a prefix of
  the key window and the queries that see a key are a suffix of the query
  window.  Nothing invisible is computed.
* ``cluster_forward``: one thread per query row keeps its query and its output
  row in registers and walks the visible keys, which the block stages in
  shared memory one chunk at a time (every thread reads the same key: a
  broadcast).  Softmax online: the running maximum ``m`` and sum ``l``
  rescale the output row only when the maximum grows.
* ``cluster_backward_query``: per query row, the same walk gives ``lse = m +
  log l`` and ``delta = g_r . o_r``; a second walk adds ``dq``.
* ``cluster_backward_key``: one thread per key walks the queries that see it,
  staged in shared memory, and adds ``dk`` and ``dv``.
* Each cluster writes its rows to a (B, H, K, W, D) buffer; the rows are then
  added into positions by the deterministic segment sum of
  :mod:`rt_numpy.kernels.cupy_ops`, in the order (cluster, row) - the order
  the Numba kernels and the reference use.  No atomics: the same bits on
  every run.

Masked logits are -inf (probability exactly 0); a query row with no visible
key outputs 0; with ``last_resort`` the self logit is -5e4 and passes no
gradient to q or k.  docs/algorithm.md#14-attention-inside-a-cluster, docs/algorithm.md#15-combine.
A leaf module.
"""
from __future__ import annotations

import numpy as np

from rt_numpy.kernels import (
    SELF_LOGIT,  # the "last resort" self logit (docs/algorithm.md#14-attention-inside-a-cluster)
)
from rt_numpy.kernels.cupy_ops import _array_module, ctype, launch, segment_sum, segments

QUERY_THREADS = 128  # query rows per block in the forward and query-side backward kernels
SHARED_BYTES = 40 * 1024  # stay under the 48 KiB of static shared memory a block may have

SOURCE = f"constexpr double SELF_LOGIT = {SELF_LOGIT!r};\n" + r"""

// The most negative finite number: the running maximum before any logit is seen.
template <typename T> __device__ __forceinline__ T lowest();
template <> __device__ __forceinline__ float lowest<float>() { return -3.402823466e38f; }
template <> __device__ __forceinline__ double lowest<double>() { return -1.7976931348623157e308; }

// How many entries of the ascending window[0:n] are <= position (binary search).
__device__ __forceinline__ int count_at_or_before(const long long* window, int n, long long position) {
    int lo = 0, hi = n;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (window[mid] <= position) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Stage keys [c0, c0 + CHUNK) of one cluster (and their values) in shared memory.
template <typename T, int D, int CHUNK>
__device__ void stage_keys(const T* k, const T* v, const long long* key_window, int W, int c0,
                           T (*ks)[D], T (*vs)[D], long long* key_pos) {
    for (int i = threadIdx.x; i < CHUNK * D; i += blockDim.x) {
        int s = c0 + i / D, d = i % D;
        if (s < W) {
            long long row = key_window[s] * D;
            ks[i / D][d] = k[row + d];
            vs[i / D][d] = v[row + d];
        }
    }
    for (int j = threadIdx.x; j < CHUNK; j += blockDim.x)
        if (c0 + j < W) key_pos[j] = key_window[c0 + j];
}

// One query row's walk over its n visible keys (staged CHUNK at a time; the block walks n_block, the
// most any of its rows sees, so every thread reaches every __syncthreads), softmax online:
// m the running maximum, l = sum_s exp(logit_s - m), acc = sum_s exp(logit_s - m) v_s.
// The output row is acc / l.  Used by the forward and by the first pass of the query-side backward.
template <typename T, int D, int CHUNK>
__device__ __forceinline__ void attend_row(const T* k, const T* v, const long long* kw, int W,
                                           const T* q_row, long long position, int n, int n_block,
                                           T scale, int last_resort, T (*ks)[D], T (*vs)[D],
                                           long long* key_pos, T* acc, T& m, T& l) {
    m = lowest<T>();
    l = 0;
    #pragma unroll
    for (int d = 0; d < D; ++d) acc[d] = 0;
    for (int c0 = 0; c0 < n_block; c0 += CHUNK) {
        __syncthreads();  // the previous chunk is no longer read
        stage_keys<T, D, CHUNK>(k, v, kw, W, c0, ks, vs, key_pos);
        __syncthreads();
        const int stop = min(CHUNK, n - c0);
        for (int j = 0; j < stop; ++j) {
            T dot = 0;
            #pragma unroll
            for (int d = 0; d < D; ++d) dot += q_row[d] * ks[j][d];
            T logit = dot * scale;
            if (last_resort && key_pos[j] == position) logit = T(SELF_LOGIT);
            if (logit > m) {  // a new maximum: rescale what was summed so far
                T correction = exp(m - logit);
                l *= correction;
                #pragma unroll
                for (int d = 0; d < D; ++d) acc[d] *= correction;
                m = logit;
            }
            T p = exp(logit - m);
            l += p;
            #pragma unroll
            for (int d = 0; d < D; ++d) acc[d] += p * vs[j][d];
        }
    }
}

// Forward: rows (clusters, W, D) = softmax(scale q[I_c] k[J_c]^T, causal) v[J_c].
// q, k, v (B*H, T, D); windows (clusters, W) with clusters = B*H*K.  Block = one cluster.
template <typename T, int D, int CHUNK>
__global__ void cluster_forward(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                const long long* __restrict__ query_windows,
                                const long long* __restrict__ key_windows,
                                long long K, long long T_len, int W, T scale, int last_resort,
                                T* __restrict__ rows) {
    __shared__ T ks[CHUNK][D];
    __shared__ T vs[CHUNK][D];
    __shared__ long long key_pos[CHUNK];
    const long long cluster = blockIdx.x;
    const long long head_offset = (cluster / K) * T_len * D;  // start of this (b, h) in q, k, v
    const long long* qw = query_windows + cluster * W;
    const long long* kw = key_windows + cluster * W;
    q += head_offset; k += head_offset; v += head_offset;

    for (int r0 = 0; r0 < W; r0 += blockDim.x) {
        const int r = r0 + threadIdx.x;
        const bool active = r < W;
        const long long position = active ? qw[r] : -1;
        const int n = active ? count_at_or_before(kw, W, position) : 0;  // visible keys
        const int last_row = min(r0 + (int)blockDim.x, W) - 1;
        const int n_block = count_at_or_before(kw, W, qw[last_row]);  // the most any row here sees
        T q_row[D], acc[D];
        #pragma unroll
        for (int d = 0; d < D; ++d) q_row[d] = active ? q[position * D + d] : T(0);
        T m, l;
        attend_row<T, D, CHUNK>(k, v, kw, W, q_row, position, n, n_block, scale, last_resort,
                                ks, vs, key_pos, acc, m, l);
        if (active) {
            T* out = rows + (cluster * W + r) * D;
            #pragma unroll
            for (int d = 0; d < D; ++d) out[d] = n > 0 ? acc[d] / l : T(0);  // nothing visible: 0
        }
    }
}

// Backward, query side: per query row, lse = m + log(l) and delta = g~ . o (g~ = g / den), then
// dq = scale * sum_s p_s (g~ . v_s - delta) k_s.  dq_rows (clusters, W, D); lse, delta (clusters, W).
template <typename T, int D, int CHUNK>
__global__ void cluster_backward_query(const T* __restrict__ g, const T* __restrict__ den,
                                       const T* __restrict__ q, const T* __restrict__ k,
                                       const T* __restrict__ v, const long long* __restrict__ query_windows,
                                       const long long* __restrict__ key_windows,
                                       long long K, long long T_len, int W, T scale, int last_resort,
                                       T* __restrict__ dq_rows, T* __restrict__ lse_out,
                                       T* __restrict__ delta_out) {
    __shared__ T ks[CHUNK][D];
    __shared__ T vs[CHUNK][D];
    __shared__ long long key_pos[CHUNK];
    const long long cluster = blockIdx.x;
    const long long head = cluster / K;
    const long long head_offset = head * T_len * D;
    const long long* qw = query_windows + cluster * W;
    const long long* kw = key_windows + cluster * W;
    g += head_offset; q += head_offset; k += head_offset; v += head_offset;
    den += head * T_len;

    for (int r0 = 0; r0 < W; r0 += blockDim.x) {
        const int r = r0 + threadIdx.x;
        const bool active = r < W;
        const long long position = active ? qw[r] : -1;
        const int n = active ? count_at_or_before(kw, W, position) : 0;
        const int last_row = min(r0 + (int)blockDim.x, W) - 1;
        const int n_block = count_at_or_before(kw, W, qw[last_row]);
        T q_row[D], vec[D];  // vec: the output row in pass 1, then dq in pass 2
        #pragma unroll
        for (int d = 0; d < D; ++d) q_row[d] = active ? q[position * D + d] : T(0);

        // Pass 1: the forward pass again, for lse and delta.
        T m, l;
        attend_row<T, D, CHUNK>(k, v, kw, W, q_row, position, n, n_block, scale, last_resort,
                                ks, vs, key_pos, vec, m, l);
        // g~ = g / den of this row, in registers for pass 2; delta = g~ . o with o = vec / l.
        T g_row[D];
        const T inv_den = active ? T(1) / den[position] : T(0);
        T delta = 0;
        #pragma unroll
        for (int d = 0; d < D; ++d) {
            g_row[d] = active ? g[position * D + d] * inv_den : T(0);
            delta += n > 0 ? g_row[d] * (vec[d] / l) : T(0);
        }
        const T lse = n > 0 ? m + log(l) : T(0);
        if (active) {
            lse_out[cluster * W + r] = lse;
            delta_out[cluster * W + r] = delta;
        }

        // Pass 2: dq = scale * sum_s p_s (g~ . v_s - delta) k_s.
        #pragma unroll
        for (int d = 0; d < D; ++d) vec[d] = 0;
        for (int c0 = 0; c0 < n_block; c0 += CHUNK) {
            __syncthreads();
            stage_keys<T, D, CHUNK>(k, v, kw, W, c0, ks, vs, key_pos);
            __syncthreads();
            const int stop = min(CHUNK, n - c0);
            for (int j = 0; j < stop; ++j) {
                if (last_resort && key_pos[j] == position) continue;  // a constant logit: no gradient
                T dot = 0, dp = 0;
                #pragma unroll
                for (int d = 0; d < D; ++d) {
                    dot += q_row[d] * ks[j][d];
                    dp += g_row[d] * vs[j][d];
                }
                const T p = exp(dot * scale - lse);
                const T ds = p * (dp - delta) * scale;
                #pragma unroll
                for (int d = 0; d < D; ++d) vec[d] += ds * ks[j][d];
            }
        }
        if (active) {
            T* out = dq_rows + (cluster * W + r) * D;
            #pragma unroll
            for (int d = 0; d < D; ++d) out[d] = vec[d];
        }
    }
}

// Backward, key side: one thread per key s of a cluster; the queries that see it (a suffix of the
// query window) are staged CH at a time.  dk_s = sum_r ds_rs q_r, dv_s = sum_r p_rs g~_r.
// grid (clusters, ceil(W / KEYS)), block KEYS.  dk_rows, dv_rows (clusters, W, D).
template <typename T, int D, int KEYS, int CH>
__global__ void cluster_backward_key(const T* __restrict__ g, const T* __restrict__ den,
                                     const T* __restrict__ q, const T* __restrict__ k,
                                     const T* __restrict__ v, const long long* __restrict__ query_windows,
                                     const long long* __restrict__ key_windows,
                                     const T* __restrict__ lse, const T* __restrict__ delta,
                                     long long K, long long T_len, int W, T scale, int last_resort,
                                     T* __restrict__ dk_rows, T* __restrict__ dv_rows) {
    __shared__ T k_mine[KEYS][D + 1];  // + 1: each thread reads its own row, without bank conflicts
    __shared__ T v_mine[KEYS][D + 1];
    __shared__ T qs[CH][D];
    __shared__ T gs[CH][D];  // g / den of the staged queries
    __shared__ T lse_s[CH], delta_s[CH];
    __shared__ long long query_pos[CH];
    const long long cluster = blockIdx.x;
    const long long head = cluster / K;
    const long long head_offset = head * T_len * D;
    const long long* qw = query_windows + cluster * W;
    const long long* kw = key_windows + cluster * W;
    g += head_offset; q += head_offset; k += head_offset; v += head_offset;
    den += head * T_len;
    lse += cluster * W;
    delta += cluster * W;

    const int s0 = blockIdx.y * KEYS;
    const int s = s0 + threadIdx.x;
    const bool active = s < W;
    const long long position = active ? kw[s] : 0;
    for (int i = threadIdx.x; i < KEYS * D; i += blockDim.x) {
        int key = s0 + i / D, d = i % D;
        if (key < W) {
            k_mine[i / D][d] = k[kw[key] * D + d];
            v_mine[i / D][d] = v[kw[key] * D + d];
        }
    }
    // Queries that see key s: positions >= position, i.e. [first, W).  The block's first key
    // is seen by the most queries.
    const int first = active ? count_at_or_before(qw, W, position - 1) : W;
    const int first_block = count_at_or_before(qw, W, kw[s0] - 1);
    T dk[D], dv[D];
    #pragma unroll
    for (int d = 0; d < D; ++d) { dk[d] = 0; dv[d] = 0; }
    for (int r0 = first_block; r0 < W; r0 += CH) {
        __syncthreads();  // staged queries (and, the first time, k_mine, v_mine) are ready / free
        for (int i = threadIdx.x; i < CH * D; i += blockDim.x) {
            int r = r0 + i / D, d = i % D;
            if (r < W) {
                long long row = qw[r];
                qs[i / D][d] = q[row * D + d];
                gs[i / D][d] = g[row * D + d] / den[row];
            }
        }
        for (int j = threadIdx.x; j < CH; j += blockDim.x) {
            if (r0 + j < W) {
                lse_s[j] = lse[r0 + j];
                delta_s[j] = delta[r0 + j];
                query_pos[j] = qw[r0 + j];
            }
        }
        __syncthreads();
        const int stop = min(CH, W - r0);
        for (int j = 0; j < stop; ++j) {
            if (r0 + j < first) continue;  // this query does not see key s
            T dot = 0, dp = 0;
            #pragma unroll
            for (int d = 0; d < D; ++d) {
                dot += qs[j][d] * k_mine[threadIdx.x][d];
                dp += gs[j][d] * v_mine[threadIdx.x][d];
            }
            const bool self = last_resort && query_pos[j] == position;
            const T logit = self ? T(SELF_LOGIT) : dot * scale;
            const T p = exp(logit - lse_s[j]);
            const T ds = self ? T(0) : p * (dp - delta_s[j]) * scale;
            #pragma unroll
            for (int d = 0; d < D; ++d) {
                dk[d] += ds * qs[j][d];
                dv[d] += p * gs[j][d];
            }
        }
    }
    if (active) {
        T* dk_out = dk_rows + (cluster * W + s) * D;
        T* dv_out = dv_rows + (cluster * W + s) * D;
        #pragma unroll
        for (int d = 0; d < D; ++d) { dk_out[d] = dk[d]; dv_out[d] = dv[d]; }
    }
}
"""


def _floor_pow2(n):
    return 1 << (max(1, int(n)).bit_length() - 1)


def _chunk(D, itemsize):
    """Keys staged per chunk in the query-side kernels: two (CHUNK, D) tiles within SHARED_BYTES."""
    return max(1, min(64, _floor_pow2(SHARED_BYTES // (2 * D * itemsize + 8))))


def _key_config(D, itemsize):
    """(KEYS, CH) of the key-side kernel: KEYS own rows of k and v, CH staged queries, within SHARED_BYTES."""
    keys = max(1, min(64, _floor_pow2(SHARED_BYTES // 2 // (2 * (D + 1) * itemsize))))
    rest = SHARED_BYTES - keys * 2 * (D + 1) * itemsize
    ch = max(1, min(32, _floor_pow2(rest // ((2 * D + 2) * itemsize + 8))))
    return keys, ch


def kernel_names(dtype, D):
    """The template instances for one dtype and head dim: forward, backward query side, backward key side."""
    t, itemsize = ctype(dtype), np.dtype(dtype).itemsize
    chunk, (keys, ch) = _chunk(D, itemsize), _key_config(D, itemsize)
    return (f"cluster_forward<{t}, {D}, {chunk}>", f"cluster_backward_query<{t}, {D}, {chunk}>",
            f"cluster_backward_key<{t}, {D}, {keys}, {ch}>")


def _check(q, k, v, query_windows, key_windows, g=None):
    xp = _array_module(q)
    for name, x in (("q", q), ("k", k), ("v", v)) + ((("g", g),) if g is not None else ()):
        if x.dtype not in (np.float32, np.float64) or x.dtype != q.dtype or x.shape != q.shape or x.ndim != 4:
            raise ValueError(f"{name} must be float32/float64 (B, H, T, D) like q {q.shape} {q.dtype}, "
                             f"got {x.shape} {x.dtype}")
    B, H, T, D = q.shape
    if query_windows.shape != key_windows.shape or query_windows.ndim != 4 or query_windows.shape[:2] != (B, H):
        raise ValueError(f"windows must both have shape (B, H, K, W) = ({B}, {H}, K, W), got "
                         f"{query_windows.shape} and {key_windows.shape}")
    if query_windows.shape[3] >= 1 << 31:
        raise ValueError("W must be < 2**31")
    return xp


def _layout(q, query_windows, key_windows):
    """Contiguous int64 windows and the sizes every kernel takes."""
    xp = _array_module(q)
    B, H, K, W = query_windows.shape
    qw = xp.ascontiguousarray(query_windows, dtype=xp.int64)
    kw = xp.ascontiguousarray(key_windows, dtype=xp.int64)
    return qw, kw, B, H, K, W


def _positions(windows, T):
    """Output row of every window entry: (B, H, K, W) -> (B*H*K*W,), ``(b*H + h)*T + position``."""
    xp = _array_module(windows)
    B, H = windows.shape[:2]
    heads = xp.arange(B * H, dtype=xp.int64).reshape(B, H, 1, 1) * T
    return (windows + heads).reshape(-1)


def _denominators(query_windows, T, eps, dtype):
    """``count + eps`` per position, (B, H, T): counted exactly, summed in float64, cast to dtype."""
    xp = _array_module(query_windows)
    B, H = query_windows.shape[:2]
    counts = xp.bincount(_positions(query_windows, T), minlength=B * H * T)  # (B*H*T,)
    return (counts.reshape(B, H, T) + float(eps)).astype(dtype)


def forward(q, k, v, query_windows, key_windows, scale, last_resort, eps):
    """Causal attention inside every cluster, then the scatter-mean (as ``numba_routing.forward``).

    Parameters
    ----------
    q, k, v : array (B, H, T, D), float32 or float64
    query_windows, key_windows : int array (B, H, K, W)
        Positions, ascending along W.
    scale : float
    last_resort : bool
    eps : float

    Returns
    -------
    array (B, H, T, D)
    """
    xp = _check(q, k, v, query_windows, key_windows)
    q, k, v = (xp.ascontiguousarray(x) for x in (q, k, v))
    qw, kw, B, H, K, W = _layout(q, query_windows, key_windows)
    T, D = q.shape[2:]
    dtype = q.dtype
    rows = xp.empty((B * H * K, W, D), dtype=dtype)  # every cluster's output rows
    launch(SOURCE, kernel_names(dtype, D)[0], (B * H * K,), (QUERY_THREADS,),
           (q, k, v, qw, kw, np.int64(K), np.int64(T), np.int32(W), dtype.type(scale), np.int32(bool(last_resort)),
            rows))
    order, starts = segments(_positions(qw, T), B * H * T)
    summed = segment_sum(rows.reshape(-1, D), order, starts)  # (B*H*T, D), in the order (c, r)
    return summed.reshape(B, H, T, D) / _denominators(qw, T, eps, dtype)[..., None]  # the scatter-mean


def backward(g, q, k, v, query_windows, key_windows, scale, last_resort, eps):
    """Gradients of ``sum(forward(q, k, v, ...) * g)`` with respect to q, k and v.

    Returns ``(dq, dk, dv)``, each (B, H, T, D).  See ``numba_routing.backward``
    for the formulas; here lse and delta of every query row are computed first
    (query side, which also gives dq), then dk and dv (key side).
    """
    xp = _check(q, k, v, query_windows, key_windows, g)
    g, q, k, v = (xp.ascontiguousarray(x) for x in (g, q, k, v))
    qw, kw, B, H, K, W = _layout(q, query_windows, key_windows)
    T, D = q.shape[2:]
    dtype = q.dtype
    den = _denominators(qw, T, eps, dtype)  # (B, H, T)
    clusters = B * H * K
    sizes = (np.int64(K), np.int64(T), np.int32(W), dtype.type(scale), np.int32(bool(last_resort)))
    dq_rows = xp.empty((clusters, W, D), dtype=dtype)
    lse = xp.empty((clusters, W), dtype=dtype)
    delta = xp.empty((clusters, W), dtype=dtype)
    _, query_side, key_side = kernel_names(dtype, D)
    launch(SOURCE, query_side, (clusters,), (QUERY_THREADS,),
           (g, den, q, k, v, qw, kw, *sizes, dq_rows, lse, delta))
    dk_rows = xp.empty((clusters, W, D), dtype=dtype)
    dv_rows = xp.empty((clusters, W, D), dtype=dtype)
    keys, _ = _key_config(D, dtype.itemsize)
    launch(SOURCE, key_side, (clusters, (W + keys - 1) // keys), (keys,),
           (g, den, q, k, v, qw, kw, lse, delta, *sizes, dk_rows, dv_rows))
    query_order, query_starts = segments(_positions(qw, T), B * H * T)
    shared = key_windows is query_windows  # shared QK: one set of windows, sorted once
    key_order, key_starts = (query_order, query_starts) if shared else segments(_positions(kw, T), B * H * T)
    dq = segment_sum(dq_rows.reshape(-1, D), query_order, query_starts)
    dk = segment_sum(dk_rows.reshape(-1, D), key_order, key_starts)
    dv = segment_sum(dv_rows.reshape(-1, D), key_order, key_starts)
    return tuple(x.reshape(B, H, T, D) for x in (dq, dk, dv))
