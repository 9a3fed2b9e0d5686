# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Tutorial 2: from dense to local to routing attention
#
# Tutorial 1 built the router: online k-means that keeps K centroids per head. This notebook uses
# it. We build three attentions from scratch on inputs small enough to print, check each one
# against `rt_numpy.attention`, and draw **which keys each query sees**:
#
# 1. **dense** causal attention: every query sees every earlier key, T² dot products;
# 2. **local** attention: blocks of L tokens, each sees its own block and the one before, T·2L;
# 3. **routing** attention (Roy et al., arXiv:2003.05997, section 4): queries and keys are grouped
#    by their nearest centroids, and attention runs only inside each group.
#
# Then the options of docs/algorithm.md#1-one-routing-head, the **causal leak** of balanced clusters
# (docs/algorithm.md#3-the-causal-leak), and the cost: time against T on log-log axes.
#
# Shapes, with the letters of docs/algorithm.md#alphabet: the library takes q, k, v of shape (B, H, T, D)
# and centroids `means` of shape (H, K, D). We work on one head (B = H = 1), so most arrays below are (T, D),
# and `[None, None]` adds the batch and head axes when we call the library.

# %%
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import rt_numpy
from rt_numpy import attention, kmeans

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # without ipywidgets, tqdm.auto falls back to text bars and warns
    from tqdm.auto import tqdm

FAST = os.environ.get("RT_NUMPY_FAST") == "1"  # CI knob: fewer and smaller timings
FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_02_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True, linewidth=120)
print("FAST =", FAST, "| figures saved in", FIG_DIR)


def lib(x):
    """One head's (T, D) array as the library's (B=1, H=1, T, D)."""
    return x[None, None]


# %% [markdown]
# ## 1. Dense causal attention
#
# Each query i scores every key j with a dot product, scaled by 1/√D so that the logits do not grow
# with the head dimension. The **causal mask** hides keys after the query (j > i): a language model
# predicting token i+1 must not look at it. A softmax turns each row of logits into weights that sum
# to one, and the output is the weighted sum of the values.

# %%
T, D = 16, 8
rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((3, T, D))  # three (T, D) arrays

logits = q @ k.T / np.sqrt(D)  # (T, D) @ (D, T) -> (T, T)
causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T), causal[i, j] = j <= i
masked = np.where(causal, logits, -np.inf)  # exp(-inf) = 0: hidden keys get weight exactly 0
weights = np.exp(masked - masked.max(axis=1, keepdims=True))  # (T, T), max subtracted: no overflow
weights /= weights.sum(axis=1, keepdims=True)  # rows sum to 1
out_dense = weights @ v  # (T, T) @ (T, D) -> (T, D)

out_lib = attention.dense_causal_attention(lib(q), lib(k), lib(v))[0, 0]  # (1, 1, T, D) -> (T, D)
assert np.allclose(out_dense, out_lib, rtol=1e-12, atol=1e-14)
print("by hand == attention.dense_causal_attention")

# %%
fig, ax = plt.subplots(figsize=(4.5, 4))
im = ax.imshow(np.where(causal, weights, np.nan), cmap="viridis")  # NaN (hidden) is drawn blank
fig.colorbar(im, ax=ax, label="attention weight")
ax.set_xlabel("key position j")
ax.set_ylabel("query position i")
ax.set_title("Dense causal attention weights")
fig.savefig(FIG_DIR / "02_dense_weights.png", dpi=100)
plt.show()

# %% [markdown]
# Query 0 sees only itself (weight 1); later queries spread their weight over more keys. The
# triangle has T(T+1)/2 entries, so both time and memory grow as T²: at T = 8192 that is 33 million
# logits per head and per layer.

# %% [markdown]
# ## 2. Local attention
#
# The cheapest fix: cut the sequence into blocks of L tokens; each query sees, causally, its own
# block and the `look_back` blocks before it (docs/algorithm.md#2-local-attention). A query then sees at most 2L
# keys (with `look_back=1`) whatever T is, so the cost is linear in T. What it cannot do is see
# anything further back: that is what routing adds.
#
# Local attention is dense attention with a different mask, so we can compute it with the dense
# recipe and a block mask.

# %%
L = 4
pos = np.arange(T)  # (T,)
block = pos // L  # (T,), the block of each position
local_mask = causal & (block[:, None] - block[None, :] <= 1)  # (T, T): own block or the previous one


def masked_softmax(logits, visible):
    """Softmax of each row over its visible entries; a row with nothing visible is all zeros, not NaN."""
    z = np.where(visible, logits, -np.inf)  # (Tq, Tk)
    top = z.max(axis=-1, keepdims=True)  # (Tq, 1)
    e = np.exp(z - np.where(np.isfinite(top), top, 0.0))  # (Tq, Tk), 0 where hidden
    total = e.sum(axis=-1, keepdims=True)  # (Tq, 1)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)  # (Tq, Tk)


def masked_attention(q, k, v, visible, scale):
    """Attention of q (Tq, D) over k, v (Tk, D) where visible (Tq, Tk) is True; returns (Tq, D)."""
    return masked_softmax(q @ k.T * scale, visible) @ v  # (Tq, Tk) @ (Tk, D) -> (Tq, D)


out_local = masked_attention(q, k, v, local_mask, 1 / np.sqrt(D))  # (T, D)
out_lib = attention.local_attention(lib(q), lib(k), lib(v), block_size=L, look_back=1)[0, 0]
assert np.allclose(out_local, out_lib, rtol=1e-12, atol=1e-14)

one_block = attention.local_attention(lib(q), lib(k), lib(v), block_size=T)[0, 0]  # L = T: one block
assert np.allclose(one_block, out_dense, rtol=1e-12, atol=1e-14)
print("by hand == attention.local_attention; one block (L = T) == dense")

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 4))
for ax, mask, title in ((axes[0], causal, "dense causal"), (axes[1], local_mask, f"local, L={L}, look_back=1")):
    ax.imshow(mask, cmap="Greys")
    ax.set_title(f"{title}: {mask.sum()} pairs")
    ax.set_xlabel("key position j")
axes[0].set_ylabel("query position i")
fig.suptitle("Which keys each query sees (black = visible)")
fig.savefig(FIG_DIR / "02_dense_vs_local.png", dpi=100)
plt.show()

# %% [markdown]
# ## 3. Routing attention, one step at a time
#
# Routing attention keeps the "attend to a few keys" budget of local attention but chooses the keys by
# **content**: a query should see the keys it would have given large weights to in dense attention,
# wherever they are. Large weights mean large dot products, and vectors with a large dot product tend
# to be close to the same centroid. So (docs/algorithm.md#1-one-routing-head):
#
# 1. normalise the queries (and keys) for routing;
# 2. score every token against the K centroids of the head;
# 3. give each cluster its W best tokens (**balanced** membership);
# 4. run causal attention inside each cluster, by original positions;
# 5. average back: a token in several clusters gets the mean of its outputs.
#
# We use **shared QK** (keys are the queries, as in every released language model), T = 32 tokens
# of D = 8, K = 4 clusters of W = 8 tokens, so K·W = T. The tokens come from four hidden "topics"
# with unequal frequencies, as words do.

# %%
T, D, K, W = 32, 8, 4, 8
EPS = 1e-2  # official scatter-mean eps (docs/algorithm.md#15-combine)
rng = np.random.default_rng(1)
topic = rng.choice(4, size=T, p=[0.4, 0.3, 0.2, 0.1])  # (T,), hidden topic of each token
topic_dirs = 1.5 * rng.standard_normal((4, D))  # (4, D)
q = topic_dirs[topic] + rng.standard_normal((T, D))  # (T, D), raw queries = keys
v = rng.standard_normal((T, D))  # (T, D)
pos = np.arange(T)  # (T,)
print("topics:", topic)

# %% [markdown]
# **Step 1, normalise.** The official code uses a parameter-free layer norm (`norm="ln"`): every
# vector gets norm ≈ √D, so dot products compare directions only. **Step 2, centroids and
# similarities.** In training the centroids follow the queries by online k-means (tutorial 1); here
# we take the library's data-based start (`init="data"`: K tokens, then 10 Lloyd steps), which is
# already a good clustering of this sequence.

# %%
qn = kmeans.normalize(q, "ln")  # (T, D), each row has norm ~ sqrt(D)
state = kmeans.init_state(1, K, D, rng=np.random.default_rng(2), init="data", points=lib(qn), norm="ln",
                          dtype=np.float64)
means = state["means"]  # (H=1, K, D)
mu = means[0]  # (K, D)
S = qn @ mu.T  # (T, D) @ (D, K) -> (T, K), larger = closer
assert np.allclose(S, kmeans.similarities(lib(qn), means)[0, 0], rtol=1e-13)
print("norms:", np.linalg.norm(qn, axis=1)[:4], "~ sqrt(D) =", np.sqrt(D))
print("nearest centroid:", S.argmax(axis=1))

# %% [markdown]
# **Step 3, balanced membership.** Each cluster c takes the W tokens with the largest `S[:, c]` over
# the whole sequence, then sorts them by position. Every cluster has exactly W members, so every
# cluster costs the same W² dot products; the price is that a token may be picked by several
# clusters or by none. (A stable sort breaks ties in favour of the lower position.)

# %%
windows = np.sort(np.argsort(-S.T, axis=1, kind="stable")[:, :W], axis=1)  # (K, T) -> (K, W) positions
assert np.array_equal(windows, kmeans.balanced_membership(lib(qn), means, W, impl="ref")[0, 0])
counts = np.bincount(windows.ravel(), minlength=T)  # (T,), clusters each token is in
print("windows (one row per cluster):\n", windows)
print("tokens in 0 / 1 / 2+ clusters:", [int((counts == 0).sum()), int((counts == 1).sum()), int((counts >= 2).sum())])

# %%
fig, ax = plt.subplots(figsize=(9, 3))
nearest_c = S.argmax(axis=1)  # (T,)
ax.scatter(pos, nearest_c, s=160, facecolors="none", edgecolors="0.6", label="nearest centroid")
for c in range(K):
    ax.scatter(windows[c], np.full(W, c), s=40, color=f"C{c}")
ax.scatter(np.flatnonzero(counts == 0), np.full((counts == 0).sum(), -1), marker="x", color="k",
           label="in no cluster")
ax.set_yticks(range(-1, K), ["none", *[f"cluster {c}" for c in range(K)]])
ax.set_xlabel("position in the sequence")
ax.set_title(f"Balanced cluster windows (dots, W={W} each) over the sequence")
ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
fig.savefig(FIG_DIR / "02_cluster_windows.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# A dot without a ring is a token that was pulled into a cluster that is not its nearest (a small
# topic's cluster filling its W seats); a ring without a dot is a token that lost its seat because
# its own topic has more than W tokens. Each window spans the whole sequence: this is how routing
# reaches far back, which local attention cannot.
#
# **Step 4, attention inside each cluster.** Gather the members of each window, compute the logits
# between them, and mask by **original positions**: member r of a window may see member s only if
# `windows[c, s] <= windows[c, r]`. Since the windows are sorted by position this is a lower
# triangle, but masking by positions stays correct for any order. With `logits="normalized"` (the
# official code) the logits are dot products of the *normalised* vectors, with no 1/√D.

# %%
qw = qn[windows]  # (T, D)[(K, W)] -> (K, W, D), queries of each window
kw = qn[windows]  # (K, W, D), shared QK: the same vectors are the keys
vw = v[windows]  # (K, W, D)
logits = qw @ kw.transpose(0, 2, 1)  # (K, W, D) @ (K, D, W) -> (K, W, W)
visible = windows[:, None, :] <= windows[:, :, None]  # (K, 1, W) <= (K, W, 1) -> (K, W, W)
z = np.where(visible, logits, -np.inf)  # (K, W, W)
p = np.exp(z - z.max(axis=-1, keepdims=True))  # (K, W, W); every row sees at least itself
p /= p.sum(axis=-1, keepdims=True)
outs = p @ vw  # (K, W, W) @ (K, W, D) -> (K, W, D), one output per (cluster, member)

# %% [markdown]
# **Step 5, scatter-mean.** Add each cluster's outputs back at the positions they came from and
# divide by the number of clusters the position is in, plus eps. The eps keeps the division safe for
# tokens in no cluster (they get 0 from this head; the residual stream and the local heads carry
# them) and, as we will see, makes routing slightly smaller than a true mean.

# %%
summed = np.zeros((T, D))
np.add.at(summed, windows, outs)  # summed[windows[c, r]] += outs[c, r], repeated positions add up
out_routing = summed / (counts + EPS)[:, None]  # (T, D) / (T, 1) -> (T, D)

via_windows = attention.cluster_attention_reference(lib(qn), lib(qn), lib(v), windows[None, None],
                                                    windows[None, None], scale=1.0, combine_eps=EPS)[0, 0]
out_lib, loss, stats = attention.routing_attention(lib(q), None, lib(v), means, window_size=W, impl="ref")
assert np.allclose(out_routing, via_windows, rtol=1e-12, atol=1e-14)
assert np.allclose(out_routing, out_lib[0, 0], rtol=1e-12, atol=1e-14)
print("by hand == cluster_attention_reference == routing_attention(impl='ref')")

# %% [markdown]
# `impl="ref"` asks for the readable NumPy path that we just rebuilt; `impl="auto"` runs the fused
# Numba kernels where they are installed. `routing_attention` also returns the commitment loss and
# the k-means statistics for the centroid update (tutorial 1); we ignore them here.
#
# ### Routing as one (T, T) weight matrix
#
# Everything above is linear in v, so routing attention is `A @ v` for a (T, T) matrix A: the
# cluster weights `p`, added at (query position, key position) and divided by the query's count.
# Building A shows exactly which keys each query sees. We write the five steps as one function
# (reused in section 4 with other options) and check it once more.

# %%
def routing_weights(q_logit, k_logit, query_windows, key_windows, *, scale=1.0, self_attend="allow", combine_eps=EPS):
    """A (T, T) with routing output = A @ v; q_logit, k_logit (T, D) make the logits, windows (K, W)."""
    T = len(q_logit)
    A = np.zeros((T, T))
    for qwin, kwin in zip(query_windows, key_windows):  # one cluster at a time
        logits = q_logit[qwin] @ k_logit[kwin].T * scale  # (W, D) @ (D, W) -> (W, W)
        if self_attend == "last_resort":
            logits = np.where(kwin[None, :] == qwin[:, None], attention.SELF_LOGIT, logits)  # -5e4
        p = masked_softmax(logits, kwin[None, :] <= qwin[:, None])  # (W, W), causal by positions
        np.add.at(A, (qwin[:, None], kwin[None, :]), p)  # A[qwin[r], kwin[s]] += p[r, s]
    counts = np.bincount(query_windows.ravel(), minlength=T)  # (T,)
    return A / (counts + combine_eps)[:, None]  # (T, T)


A_routing = routing_weights(qn, qn, windows, windows)  # (T, T)
assert np.allclose(A_routing @ v, out_routing, rtol=1e-12, atol=1e-14)  # (T, T) @ (T, D) -> (T, D)
print("A @ v == routing output")

# %% [markdown]
# Side by side, with the same budget: local blocks of L = W = 8 tokens, and routing windows of W = 8.

# %%
causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T) for the new T
local_mask = causal & (pos[:, None] // W - pos[None, :] // W <= 1)  # (T, T), L = W
routing_mask = A_routing > 0  # (T, T), the union over the query's clusters

fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
for ax, mask, title in ((axes[0], causal, "dense causal"), (axes[1], local_mask, f"local, L={W}"),
                        (axes[2], routing_mask, f"routing, K={K}, W={W}")):
    ax.imshow(mask, cmap="Greys")
    ax.set_title(f"{title}: {mask.sum()} pairs")
    ax.set_xlabel("key position j")
axes[0].set_ylabel("query position i")
fig.suptitle("Which keys each query sees (black = visible)")
fig.savefig(FIG_DIR / "02_which_keys.png", dpi=100, bbox_inches="tight")
plt.show()
same_topic = topic[:, None] == topic[None, :]  # (T, T)
print(f"pairs that share a topic: {same_topic[routing_mask].mean():.0%} of routed pairs, "
      f"{same_topic[causal].mean():.0%} of all causal pairs")

# %% [markdown]
# Routing's pattern is scattered: query i sees earlier keys of its own topic, near or far. Empty rows
# are tokens in no cluster. The (query, key) pairs it keeps are mostly pairs from the same topic,
# i.e. pairs whose dot product, and so whose dense attention weight, is large.
#
# **A check from the spec.** With one cluster holding the whole sequence (K = 1, W = T), routing is
# dense attention on the normalised vectors without 1/√D, except for the scatter-mean: each token is
# in exactly one cluster, so it is divided by 1 + eps.

# %%
one_cluster, _, _ = attention.routing_attention(lib(q), None, lib(v), means[:, :1], window_size=T, impl="ref")
dense_normalized = attention.dense_causal_attention(lib(qn), lib(qn), lib(v), scale=1.0)  # (1, 1, T, D)
assert np.allclose(one_cluster * (1 + EPS), dense_normalized, rtol=1e-12, atol=1e-14)
print(f"K=1, W=T: routing * (1 + eps) == dense; the gap without the factor is {EPS:.0%}")

# %% [markdown]
# ## 4. Options
#
# Each option below reproduces one of the two public implementations (docs/algorithm.md#1-one-routing-head).
# For each, one number that shows what it changes, and one check of our `routing_weights` against the library.
#
# **`logits`.** `"normalized"` (official): normalised query against normalised key, no 1/√D. With
# the layer norm both vectors have norm √D, so a logit can reach D, and the softmax is sharp.
# `"scaled"` (PyTorch port): the raw query against the L2-normalised key, divided by √D.

# %%
def sharpness(A):
    """Mean over routed queries of the largest weight in their row (1 = all weight on one key)."""
    rows = A.sum(axis=1) > 0  # (T,)
    return (A[rows].max(axis=1) / A[rows].sum(axis=1)).mean()


A_scaled = routing_weights(q, kmeans.normalize(q, "l2"), windows, windows, scale=1 / np.sqrt(D))  # (T, T)
out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), means, window_size=W, logits="scaled", impl="ref")
assert np.allclose(A_scaled @ v, out_lib[0, 0], rtol=1e-12, atol=1e-14)
print(f"largest weight per row: normalized {sharpness(A_routing):.2f}, scaled {sharpness(A_scaled):.2f}")

# %% [markdown]
# **`self_attend`.** Under shared QK a normalised query's best match is usually *itself* (the dot
# product of a vector with itself is its squared norm, D). `"allow"` (official) lets it take that
# weight; `"last_resort"` (the port, after Reformer) sets the self logit to −5·10⁴ so that a token
# looks at itself only when it sees nothing else (the first member of each window).

# %%
A_last = routing_weights(qn, qn, windows, windows, self_attend="last_resort")  # (T, T)
out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), means, window_size=W, self_attend="last_resort",
                                            impl="ref")
assert np.allclose(A_last @ v, out_lib[0, 0], rtol=1e-12, atol=1e-14)
routed = counts > 0  # (T,)
for name, A in (("allow", A_routing), ("last_resort", A_last)):
    print(f"{name:12s} mean weight on self: {(np.diag(A)[routed] / A[routed].sum(axis=1)).mean():.2f}")

# %% [markdown]
# **`shared_qk=False`.** Keys have their own projection; the key windows are chosen the same way
# from the key similarities, so a cluster's queries and keys can be different tokens. A query whose
# cluster has no key at or before its position sees nothing and outputs 0 for that cluster (our rule,
# docs/algorithm.md#14-attention-inside-a-cluster). The port avoids such rows by prepending a learned memory
# key per cluster (`mem_kv`).

# %%
k = topic_dirs[topic] + rng.standard_normal((T, D))  # (T, D), keys from the same topics, other noise
kn = kmeans.normalize(k, "ln")  # (T, D)
key_windows = kmeans.balanced_membership(lib(kn), means, W, impl="ref")[0, 0]  # (K, W)
A_sep = routing_weights(qn, kn, windows, key_windows)  # (T, T)
out_lib, _, _ = attention.routing_attention(lib(q), lib(k), lib(v), means, window_size=W, shared_qk=False,
                                            impl="ref")
assert np.allclose(A_sep @ v, out_lib[0, 0], rtol=1e-12, atol=1e-14)
blind = (key_windows[:, None, :] <= windows[:, :, None]).sum(axis=-1) == 0  # (K, W): no visible key
print(f"(cluster, query) slots with no visible key: {blind.sum()} of {K * W}, at positions {windows[blind]}")

# %% [markdown]
# **`membership="nearest"`.** Every token joins only its nearest centroid. No token is dropped or
# duplicated, but cluster sizes follow the data, so the cost is no longer a fixed K·W² (a popular
# topic makes one large, quadratic cluster). Since each token is in exactly one cluster, this is
# dense attention with the mask "same cluster and j ≤ i", divided by 1 + eps.

# %%
a = S.argmax(axis=1)  # (T,), nearest centroid
same_cluster = causal & (a[:, None] == a[None, :])  # (T, T)
out_nearest = masked_attention(qn, qn, v, same_cluster, 1.0)  # (T, D)
out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), means, membership="nearest", impl="ref")
assert np.allclose(out_nearest / (1 + EPS), out_lib[0, 0], rtol=1e-12, atol=1e-14)
print("nearest cluster sizes:", np.bincount(a, minlength=K), "| balanced: W =", W, "each")

# %% [markdown]
# ## 5. The causal leak of balanced membership
#
# Look again at step 3: cluster c takes the top W tokens **of the whole sequence**. Whether token j
# gets a seat therefore depends on the tokens *after* j: a later token that scores higher takes the
# seat of the weakest member, which may sit early in the sequence. The causal mask inside the cluster
# is perfect, yet the output at position i ≤ j can change when a token after i changes: the evicted
# token's own output changes (its count drops), and the cluster's later queries lose a key.
# (docs/algorithm.md#3-the-causal-leak.)
#
# We take a longer sequence, T = 64, and change the single token at position j = 40 (its query and
# its value) to a copy of centroid 0, then compare every output before and after.

# %%
T, W, j = 64, 16, 40
rng = np.random.default_rng(3)
topic = rng.choice(4, size=T, p=[0.4, 0.3, 0.2, 0.1])  # (T,)
q = topic_dirs[topic] + rng.standard_normal((T, D))  # (T, D)
v = rng.standard_normal((T, D))  # (T, D)
q_changed, v_changed = q.copy(), v.copy()
q_changed[j], v_changed[j] = 10 * mu[0], rng.standard_normal(D)  # only token j changes


def max_change(membership, q_new, v_new):
    """Largest |change| of the routing output at each position when (q, v) becomes (q_new, v_new): (T,)."""
    before, _, _ = attention.routing_attention(lib(q), None, lib(v), means, window_size=W, membership=membership,
                                               impl="ref")
    after, _, _ = attention.routing_attention(lib(q_new), None, lib(v_new), means, window_size=W,
                                              membership=membership, impl="ref")
    return np.abs(after - before)[0, 0].max(axis=1)  # (1, 1, T, D) -> (T,)


change = {m: max_change(m, q_changed, v_changed) for m in ("balanced", "nearest")}
before_j = slice(0, j)  # positions 0 .. j-1, which must not depend on token j
for m, d in change.items():
    print(f"{m:9s}: largest change before position {j}: {d[before_j].max():.1e} at position {d[before_j].argmax()}")
assert change["balanced"][before_j].max() > 1e-3  # the leak
assert change["nearest"][before_j].max() < 1e-12  # strictly causal, up to rounding

# %%
old = kmeans.balanced_membership(lib(kmeans.normalize(q, "ln")), means, W, impl="ref")[0, 0]  # (K, W)
new = kmeans.balanced_membership(lib(kmeans.normalize(q_changed, "ln")), means, W, impl="ref")[0, 0]
for c in range(K):
    gone = sorted(set(old[c].tolist()) - set(new[c].tolist()))
    came = sorted(set(new[c].tolist()) - set(old[c].tolist()))
    if gone or came:
        print(f"cluster {c}: evicted positions {gone}, new members {came}")

# %%
fig, ax = plt.subplots(figsize=(9, 3.5))
floor = 1e-18  # an exact zero cannot be drawn on a log axis
for m, marker in (("balanced", "o"), ("nearest", "s")):
    ax.semilogy(np.arange(T), np.maximum(change[m], floor), marker, ms=4, label=f'membership="{m}"')
ax.axvline(j, color="k", ls=":", label=f"changed token j = {j}")
ax.axhline(1e-12, color="0.6", lw=0.8)
ax.set_xlabel("position i")
ax.set_ylabel("max |Δ output[i]|")
ax.set_title("Changing one token: which outputs move? (zero drawn at 1e-18)")
ax.legend(fontsize=8)
fig.savefig(FIG_DIR / "02_causal_leak.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# The token we planted is extreme, but ordinary changes leak too. Replace token j by a fresh token
# from the same distribution a number of times and count how often some output before j moves.

# %%
TRIALS = 20 if FAST else 100
leaks = {"balanced": 0, "nearest": 0}
for _ in tqdm(range(TRIALS), desc="random replacements", leave=False, mininterval=0.5):
    q_new, v_new = q.copy(), v.copy()
    q_new[j] = topic_dirs[rng.choice(4)] + rng.standard_normal(D)
    v_new[j] = rng.standard_normal(D)
    for m in leaks:
        leaks[m] += max_change(m, q_new, v_new)[before_j].max() > 1e-12
print({m: f"{n} of {TRIALS} replacements changed an earlier output" for m, n in leaks.items()})
assert leaks["nearest"] == 0

# %% [markdown]
# Why it matters: in training, the loss at position i is computed from outputs that can depend on
# tokens i+1, i+2, … — including the token the model is asked to predict. The dependence is weak and
# indirect (through who gets a seat), but a model trained on billions of tokens could in principle
# learn to exploit it. Both public implementations train this way. At generation time the future does not exist yet,
# so the windows are chosen among the tokens generated so far: the model decodes under a different
# rule than the one it was trained with.
#
# `membership="nearest"` has no leak: a token's cluster depends on that token alone, and the mask
# does the rest. Its outputs before j agree up to rounding (here even exactly; in general they may
# differ in the last bits, because the cluster sizes change the shapes of the matrix products, hence
# the 1e-12 tolerance).

# %% [markdown]
# ## 6. Cost: time against T
#
# Dense attention computes T² logits. Routing with K clusters of W tokens computes T·K similarities
# and K·W² logits; with the paper's choice W = K = √T both are T^1.5. On log-log axes the time of an
# algorithm that costs c·T^a is a straight line of slope a, so we fit the slope.
#
# We time the benchmark's own functions (`bench/attention.py`: one head, D = 64, float32, W = round(√T),
# K = T // W, forward pass) on small sizes. Small sizes flatter neither method: fixed per-call
# overheads make every slope smaller than its asymptote. For the full picture, run
# `python bench/attention.py --json bench.json` (T up to 16384, forward and backward, against the
# PyTorch port) and set `RT_NUMPY_BENCH_JSON=bench.json` before running this notebook: the cell below
# then plots those records instead.

# %%
BENCH_DIR = Path(rt_numpy.__file__).resolve().parents[1] / "bench"  # the notebook may run from any directory
sys.path.insert(0, str(BENCH_DIR))
import attention as bench_attention  # noqa: E402  bench/attention.py, not rt_numpy.attention

try:
    import rt_numpy.kernels.numba_routing  # noqa: F401  the fused routing kernels
    ROUTING_KIND = "numba"
except ImportError:
    ROUTING_KIND = "ref"
print("routing timed with impl =", ROUTING_KIND)

# %%
bench_json = os.environ.get("RT_NUMPY_BENCH_JSON")
if bench_json and Path(bench_json).is_file():
    records = [r for r in json.loads(Path(bench_json).read_text()) if r["metric"] == "ms"]
    print(f"{len(records)} timing records from {bench_json}")
else:
    Ts = [128, 256, 512] if FAST else [256, 512, 1024, 2048, 4096]
    REPEATS = 5 if FAST else 7
    kinds = {"numpy": "dense", f"rt_numpy-{ROUTING_KIND}": ROUTING_KIND}  # record name -> bench kind
    records = []
    for impl, kind in kinds.items():  # one implementation at a time: BLAS and Numba thread pools interfere
        runs = {T: bench_attention.ours(kind, 1, T, False) for T in Ts}  # H = 1, forward only
        for run in runs.values():
            run()  # warm-up: compiles the Numba kernels, touches the memory
        best = dict.fromkeys(Ts, np.inf)
        for _ in tqdm(range(REPEATS), desc=impl, leave=False):
            for T, run in runs.items():  # rounds over T: a burst of load elsewhere spoils one round, not one T
                start = time.perf_counter()
                run()
                best[T] = min(best[T], 1e3 * (time.perf_counter() - start))  # ms; the least disturbed call
        records += [{"impl": impl, "case": {"T": T, "H": 1, "pass": "fwd"}, "metric": "ms", "value": best[T]}
                    for T in Ts]
H_plot = min(r["case"]["H"] for r in records)  # one head when the records have it
for r in records:
    if r["case"]["H"] == H_plot:
        print(f"{r['impl']:20s} {r['case']['pass']:8s} T={r['case']['T']:6d}  {r['value']:9.2f} ms")

# %%
series = {}  # (impl, pass) -> [(T, ms)]
for r in records:
    if r["case"]["H"] == H_plot:
        series.setdefault((r["impl"], r["case"]["pass"]), []).append((r["case"]["T"], r["value"]))

fig, ax = plt.subplots(figsize=(7, 5))
slopes = {}
colors = {impl: f"C{n}" for n, impl in enumerate(sorted({impl for impl, _ in series}))}
for (impl, pass_), points in sorted(series.items()):
    t, ms = np.array(sorted(points)).T  # (n,), (n,)
    slopes[impl, pass_] = np.polyfit(np.log(t), np.log(ms), 1)[0]  # slope of log(ms) against log(T)
    ax.loglog(t, ms, "o-" if pass_ == "fwd" else "s--", color=colors[impl],
              label=f"{impl} {pass_}: slope {slopes[impl, pass_]:.2f}")
t_all = np.array(sorted({T for points in series.values() for T, _ in points}), dtype=float)
last_ms = [ms for _, ms in (max(points) for points in series.values())]  # each series' time at its largest T
for a, anchor, style in ((2.0, max(last_ms), "k:"), (1.5, min(last_ms), "k-.")):  # through the top and bottom ends
    ax.loglog(t_all, anchor * (t_all / t_all[-1]) ** a, style, lw=1, label=f"slope {a} (reference)")
ax.set_xticks(t_all, [str(int(t)) for t in t_all])
ax.xaxis.set_minor_formatter(plt.NullFormatter())  # keep the log axis readable
ax.set_xlabel("sequence length T")
ax.set_ylabel("time per call (ms)")
ax.set_title(f"Attention time against T, {H_plot} head(s), D = 64")
ax.legend(fontsize=8)
fig.savefig(FIG_DIR / "02_cost.png", dpi=100, bbox_inches="tight")
plt.show()
for (impl, pass_), s in slopes.items():
    print(f"{impl:20s} {pass_:8s} log-log slope {s:.2f}")

# %% [markdown]
# Reading the plot: dense attention's slope approaches 2 as T grows (the (T, T) logits dominate
# once they no longer fit in cache). Routing's slope stays well below: at these sizes most of its
# time is work linear in T (normalising, gathering and scattering rows) and fixed per-call costs;
# the T^1.5 terms (T·K similarities, K·W² logits) take over only at larger T. Either way the gap
# between the two lines widens by a factor of about √T, which is why the paper can reach T = 8192.
# Timings on a shared machine are noisy; `bench/attention.py` measures more carefully.
#
# The released configurations fix W = 512 instead of √T (docs/algorithm.md#5-released-configurations): for a fixed
# W the attention inside the clusters is linear in T (K = T / W clusters of W² logits each), and only the
# routing, T·K similarities, still grows as T².
#
# ## Summary
#
# * Dense, local and routing attention are one recipe with three masks: all earlier keys; the
#   earlier keys of the same or previous block; the earlier keys of the same clusters.
# * Routing, from scratch: normalise, score against K centroids, take the W best tokens per cluster,
#   attend causally by original positions inside each cluster, average back dividing by
#   count + eps. It equals `routing_attention(..., impl="ref")`, and with K = 1, W = T it is dense
#   attention divided by 1 + eps.
# * The options reproduce either public implementation: `logits`, `self_attend`, `shared_qk`, `eps`
#   and `mem_kv`.
# * Balanced membership leaks information from later tokens into earlier outputs; `nearest` is
#   strictly causal but its cluster sizes, and so its cost, follow the data.
# * Routing's time grows more slowly than dense attention's: about T^1.5 against T².
