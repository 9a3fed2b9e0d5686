"""Model answers to the exercises of tutorial 06 (the family of sparse attention), run through its checks.

Run from anywhere: ``python tutorials/solutions/06_sparse_attention_family.py``.  Prints
"Exercise 6.k: correct" for each answer and exits with status 1 unless every check passes.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, for `checks`

import numpy as np  # noqa: E402
from checks import ex06, report  # noqa: E402

from rt_numpy import baselines, causality, kmeans  # noqa: E402

# The input of the tutorial's section 1 (the same seeds): one head, T = 96, four topics.
T, D, K, W = 96, 8, 4, 24
rng = np.random.default_rng(6)
topic = rng.choice(K, size=T, p=[0.4, 0.3, 0.2, 0.1])  # (T,)
q = 1.5 * rng.standard_normal((K, D))[topic] + rng.standard_normal((T, D))  # (T, D): queries = keys
v = rng.standard_normal((T, D))  # (T, D)
Wc = W // 2  # LSH chunks of W/2
rot = baselines.lsh_rotations(1, D, K, seed=0, dtype=np.float64)  # (1, 1, D, K/2)


def lib(x):
    return x[None, None]  # (T, D) -> (1, 1, T, D)


# Exercise 6.1: the strided mask.
def strided_mask(T, S):
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]  # (T, 1), (1, T)
    return (j <= i) & ((i - j) % S == 0)  # (T, T)


# Exercise 6.2: the budget, exact means (L and W divide T).
def formula_keys(kind, T, L, W):
    if kind == "dense":
        return (T + 1) / 2  # query i sees i + 1 keys
    if kind == "local":
        N = T // L  # blocks; the first sees (L + 1) / 2 on average, every other one L more
        return ((L + 1) / 2 + (N - 1) * (L + (L + 1) / 2)) / N
    if kind in ("strided", "routing"):
        return (W + 1) / 2  # strided: (T / S + 1) / 2 with S = T / W; routing: the r-th of a window sees r + 1
    raise ValueError(kind)


# Why section 1's LSH sees more than W' + 1/2: buckets longer than a chunk make the chunk before a query's
# chunk part of the same bucket, so it lies wholly before the query (W' keys, not about W'/2).
buckets = baselines.lsh_buckets(kmeans.normalize(lib(q)), rot)  # (1, 1, 1, T)
lsh = baselines.visibility("lsh", T, chunks=baselines.lsh_chunks(buckets, Wc))
print(f"LSH: {baselines.keys_per_query(lsh):.2f} keys per query against W' + 1/2 = {Wc + 0.5}; bucket sizes "
      f"{np.bincount(buckets.reshape(-1), minlength=K)} against chunks of {Wc}")


# Exercise 6.3: LSH's leak.  certify finds a failing position; a random suffix after it that moves the
# earlier outputs is then easy to draw, and two visibility rows show why.
def lsh_leak(q, v, rot, chunk_size):
    def fn(x):  # (1, 1, T, D) -> (1, 1, T, D)
        return baselines.lsh_attention(x, None, lib(v), rot, window_size=chunk_size)

    cert = causality.certify(fn, lib(q), rng=np.random.default_rng(0), time_axis=2)
    print("certify on LSH:", cert)
    draw = np.random.default_rng(1)
    base = fn(lib(q))[0, 0]
    for _, i, _ in cert.failing():
        for _ in range(50):
            q_later = q.copy()
            q_later[i + 1:] = q.std() * draw.standard_normal(q_later[i + 1:].shape)  # a new future only
            if np.abs(fn(lib(q_later))[0, 0, :i + 1] - base[:i + 1]).max() > 1e-6 * np.abs(base).max():
                seen = [baselines.visibility("lsh", T, chunks=baselines.lsh_chunks(
                    baselines.lsh_buckets(kmeans.normalize(lib(x)), rot), chunk_size))[0, 0] for x in (q, q_later)]
                t = int(np.flatnonzero((seen[0][:i + 1, :i + 1] != seen[1][:i + 1, :i + 1]).any(axis=1))[0])
                print(f"i = {i}: query {t} saw keys {np.flatnonzero(seen[0][t])}, now {np.flatnonzero(seen[1][t])}")
                return i, q_later
    raise RuntimeError("no leak found")


# Exercise 6.4: query clustering.  Lloyd's k-means on the queries of the whole sequence, started from
# evenly spaced queries; each query sees the earlier keys whose nearest centroid is its own.
def clustered_attention(q, k, v, num_clusters):
    T, D = q.shape
    mu = q[np.linspace(0, T - 1, num_clusters).round().astype(int)]  # (C, D), deterministic start

    def nearest(x):
        return ((x[:, None, :] - mu[None]) ** 2).sum(axis=-1).argmin(axis=1)  # (T, C, D) -> (T,)

    for _ in range(10):
        a = nearest(q)
        mu = np.stack([q[a == c].mean(axis=0) if (a == c).any() else mu[c] for c in range(num_clusters)])
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (nearest(q)[:, None] == nearest(k)[None, :]) & (j <= i)  # (T, T)
    logits = np.where(visible, q @ k.T / np.sqrt(D), -np.inf)  # (T, T)
    top = logits.max(axis=1, keepdims=True)
    w = np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # (T, T)
    total = w.sum(axis=1, keepdims=True)
    return np.divide(w, total, out=np.zeros_like(w), where=total > 0) @ v  # (T, T) @ (T, Dv) -> (T, Dv)


# Not causal: the centroids (and their start) are computed from every query, later ones included, so a
# later token can move an earlier token to another cluster.  Centroids fixed before the sequence (trained,
# as routing's are) with nearest membership would make it causal, at the price of clusters of any size:
# the cost is no longer bounded by a window W (docs/algorithm.md#73-the-budget, nearest routing).
is_causal = False

results = [
    report("Exercise 6.1", ex06.check_strided_mask, strided_mask),
    report("Exercise 6.2", ex06.check_formula_keys, formula_keys),
    report("Exercise 6.3", ex06.check_lsh_leak, lsh_leak, q, v, rot, Wc),
    report("Exercise 6.4", ex06.check_query_clustering, clustered_attention, is_causal),
]
sys.exit(0 if all(r is True for r in results) else 1)
