"""CuPy kernel for balanced top-W membership (GPU fast path of
:func:`rt_numpy.kmeans.balanced_membership`; the CPU one is
:func:`rt_numpy.kernels.numba_kmeans.top_w_positions`).

:func:`top_w_positions` returns, for every row of cluster scores, the W
positions with the largest scores, ascending, ties going to the lower position:
exactly what :func:`rt_numpy.kmeans.top_w_reference` returns.  One thread block
per row:

1. **Radix select.**  Each score becomes an unsigned integer key that sorts
   like the score (flip every bit of a negative float, only the sign bit of a
   non-negative one; -0.0 is read as +0.0).  The W-th largest key is found one
   8-bit digit at a time, from the most significant: a 256-bin histogram (in
   shared memory) of the digit among the keys that still match the prefix found
   so far tells which digit the W-th largest has.  4 passes over the row for
   float32, 8 for float64; no sort.
2. **Compaction in position order.**  Every key above that threshold is a
   member, and so are the first few keys equal to it (as many as are still
   missing).  The row is walked in chunks of one position per thread; a
   block-wide prefix sum gives every kept position its place in the output,
   which therefore comes out sorted by position.

The cluster statistics (nearest centroid, sums, counts) need no kernel of their
own on a GPU: :func:`rt_numpy.kmeans.cluster_stats` runs its reference on CuPy
arrays, whose sums go through the deterministic scatter-add of
:mod:`rt_numpy.kernels.cupy_ops`.

A leaf module: it imports numpy and, to compile, cupy.  No atomics on floats.
"""
from __future__ import annotations

import numpy as np

from rt_numpy.kernels.cupy_ops import _array_module, ctype, launch

THREADS = 256  # one row per block; the prefix sum below assumes a power of two

SOURCE = r"""
// An unsigned key that sorts like the float: larger float, larger key.
__device__ __forceinline__ unsigned int order_key(float x) {
    if (x == 0.0f) x = 0.0f;  // -0.0 and +0.0 are equal scores: one key
    unsigned int u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ unsigned long long order_key(double x) {
    if (x == 0.0) x = 0.0;
    unsigned long long u = (unsigned long long)__double_as_longlong(x);
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

// Exclusive prefix sum of one int per thread over the block (Hillis-Steele, blockDim.x a
// power of two); *total gets the sum over the block.  buf holds blockDim.x ints.
__device__ int block_exclusive_sum(int value, int* buf, int* total) {
    int tid = threadIdx.x;
    buf[tid] = value;
    __syncthreads();
    for (int offset = 1; offset < (int)blockDim.x; offset <<= 1) {
        int add = tid >= offset ? buf[tid - offset] : 0;
        __syncthreads();
        buf[tid] += add;
        __syncthreads();
    }
    int inclusive = buf[tid];
    *total = buf[blockDim.x - 1];
    __syncthreads();  // everybody has read buf before it is used again
    return inclusive - value;
}

// scores (rows, T) -> members (rows, W): the W largest of each row, by position, ties to the
// lower position.  One block of THREADS threads per row.
template <typename T, typename Key, int THREADS>
__global__ void top_w(const T* __restrict__ scores, long long n_rows, long long length, long long W,
                      long long* __restrict__ members) {
    __shared__ int histogram[256];
    __shared__ int scan_buffer[THREADS];
    __shared__ Key prefix_shared;
    __shared__ long long still_needed_shared;
    const long long row = blockIdx.x;
    const int tid = threadIdx.x;
    const T* x = scores + row * length;
    long long* out = members + row * W;

    // 1. Radix select of the W-th largest key, most significant digit first.
    Key prefix = 0, mask = 0;
    long long still_needed = W;  // rank of the W-th largest among keys matching the prefix
    for (int shift = 8 * (int)sizeof(Key) - 8; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += THREADS) histogram[i] = 0;
        __syncthreads();
        for (long long t = tid; t < length; t += THREADS) {
            Key key = order_key(x[t]);
            if ((key & mask) == prefix) atomicAdd(&histogram[(int)((key >> shift) & 255)], 1);
        }
        __syncthreads();
        if (tid == 0) {  // walk the digits from the largest: where does the W-th largest fall?
            long long above = 0;
            int digit = 255;
            while (above + histogram[digit] < still_needed) above += histogram[digit--];
            prefix_shared = prefix | ((Key)digit << shift);
            still_needed_shared = still_needed - above;
        }
        __syncthreads();
        prefix = prefix_shared;
        still_needed = still_needed_shared;
        mask |= (Key)255 << shift;
        __syncthreads();  // prefix_shared is rewritten by the next pass
    }
    const Key threshold = prefix;       // the key of the W-th largest score
    const long long equal_to_take = still_needed;  // how many keys equal to it are members

    // 2. Keep keys above the threshold and the first equal_to_take equal to it, in position order.
    long long written = 0, equal_seen = 0;
    for (long long start = 0; start < length; start += THREADS) {
        long long t = start + tid;
        int above = 0, equal = 0;
        if (t < length) {
            Key key = order_key(x[t]);
            above = key > threshold;
            equal = key == threshold;
        }
        int chunk_total;
        // Both counts in one prefix sum: "above" in the low 16 bits, "equal" in the high ones.
        int before = block_exclusive_sum(above | (equal << 16), scan_buffer, &chunk_total);
        long long above_before = before & 0xFFFF, equal_before = before >> 16;
        long long equal_room = equal_to_take - equal_seen;  // equal keys that still fit
        if (equal_room < 0) equal_room = 0;
        long long kept_equal_before = equal_before < equal_room ? equal_before : equal_room;
        bool keep = above || (equal && equal_before < equal_room);
        if (keep) out[written + above_before + kept_equal_before] = t;
        long long chunk_above = chunk_total & 0xFFFF, chunk_equal = chunk_total >> 16;
        written += chunk_above + (chunk_equal < equal_room ? chunk_equal : equal_room);
        equal_seen += chunk_equal;
    }
}
"""


def kernel_name(dtype):
    """The template instance for float32 or float64 scores (their keys: 32- or 64-bit unsigned)."""
    key = "unsigned int" if np.dtype(dtype) == np.float32 else "unsigned long long"
    return f"top_w<{ctype(dtype)}, {key}, {THREADS}>"


def top_w_positions(scores, W):
    """Balanced top-W membership from cluster-major scores, on the GPU.

    Parameters
    ----------
    scores : array (B, H, K, T), float32 or float64
        Similarities of every position to every centroid (finite).
    W : int
        Members per cluster, 1 <= W <= T.

    Returns
    -------
    array (B, H, K, W) int64
        Positions, ascending along the last axis; ties in score go to the lower position.

    Notes
    -----
    docs/algorithm.md#13-membership; equals :func:`rt_numpy.kmeans.top_w_reference`.
    """
    xp = _array_module(scores)
    B, H, K, T = scores.shape
    if not 1 <= W <= T:
        raise ValueError(f"W must be in [1, T={T}], got {W}")
    if T >= 1 << 31:
        raise ValueError(f"T must be < 2**31 for the top-W kernel, got {T}")
    scores = xp.ascontiguousarray(scores)
    members = xp.empty((B, H, K, W), dtype=xp.int64)
    rows = B * H * K
    launch(SOURCE, kernel_name(scores.dtype), (rows,), (THREADS,),
           (scores, np.int64(rows), np.int64(T), np.int64(W), members))
    return members
