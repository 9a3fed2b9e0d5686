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
# 1. **dense** causal attention: every query sees every earlier key, $T^2$ dot products;
# 2. **local** attention: blocks of $L$ tokens, each sees its own block and the one before, $2TL$ dot products;
# 3. **routing** attention (Roy et al., arXiv:2003.05997, section 4): queries and keys are grouped
#    by their nearest centroids, and attention runs only inside each group.
#
# Then the **causal leak** of balanced clusters (docs/algorithm.md#3-the-causal-leak), and the cost:
# counted operations and measured time against $T$. Exercises close sections 3 and 5. An appendix
# rebuilds the options that reproduce the two public implementations; it is for researchers and can
# be skipped.
#
# Shapes, with the letters of docs/algorithm.md#alphabet: the library takes q, k, v of shape (B, H, T, D)
# and centroids `means` of shape (H, K, D). We work on one head (B = H = 1), so most arrays below are (T, D),
# and `[None, None]` adds the batch and head axes when we call the library.

# %%
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from checks import ex02, report
from matplotlib.colors import LogNorm
from matplotlib.patches import FancyBboxPatch

from rt_numpy import attention, crosscheck, kmeans

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
# Each query $i$ scores every key $j$ with a dot product, scaled by $1/\sqrt D$ so that the logits do
# not grow with the head dimension. The **causal mask** hides keys after the query ($j > i$): a
# language model predicting token $i+1$ must not look at it. A softmax turns each row of logits into
# weights that sum to one, and the output is the weighted sum of the values:
#
# $$\text{out} = \operatorname{softmax}\Big(\frac{QK^\top}{\sqrt D} + M\Big) V, \qquad
# M_{ij} = \begin{cases} 0 & j \le i \\ -\infty & j > i. \end{cases}$$

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
# triangle has $T(T+1)/2$ entries, so both time and memory grow as $T^2$: at $T = 8192$ that is 33
# million logits per head and per layer.

# %% [markdown]
# ## 2. Local attention
#
# The cheapest fix: cut the sequence into blocks of $L$ tokens; each query sees, causally, its own
# block and the `look_back` blocks before it (docs/algorithm.md#2-local-attention):
#
# $$j \text{ visible to } i \iff \lfloor i/L \rfloor - \lfloor j/L \rfloor \le \texttt{look\_back}
# \ \text{ and } \ j \le i.$$
#
# A query then sees at most $2L$ keys (with `look_back=1`) whatever $T$ is, so the cost is linear in
# $T$. What it cannot do is see anything further back: that is what routing adds.
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
# Left, the full lower triangle; right, a band of blocks along the diagonal. Nothing far below the
# diagonal is visible to local attention, however useful it would be.

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
# The diagram below draws these five steps with the shape of what each one produces.

# %%
def draw_pipeline():
    """Boxes and arrows: the five steps of one routing head, with their shapes."""
    steps = [("queries q", "(T, D)"), ("1. normalise\n$\\hat x$", "(T, D)"),
             ("2. scores\n$S = \\hat X\\mu^\\top$", "(T, K)"),
             ("3. top-W tokens\nper cluster", "windows (K, W)"),
             ("4. attend inside\neach window,\ncausal by position", "(K, W, D)"),
             ("5. scatter-mean\nback to positions", "out (T, D)")]
    fig, ax = plt.subplots(figsize=(13, 3.2))
    width, gap = 1.7, 0.55
    for n, (label, shape) in enumerate(steps):
        x = n * (width + gap)
        ax.add_patch(FancyBboxPatch((x, 0), width, 1.2, boxstyle="round,pad=0.05", fc=f"C{min(n, 5)}", alpha=0.25,
                                    ec="k"))
        ax.text(x + width / 2, 0.72, label, ha="center", va="center", fontsize=9)
        ax.text(x + width / 2, 0.15, shape, ha="center", va="center", fontsize=8, family="monospace")
        if n:
            ax.annotate("", xy=(x - 0.05, 0.6), xytext=(x - gap + 0.05, 0.6), arrowprops=dict(arrowstyle="->", lw=1.5))
    for n, label in ((2, "centroids $\\mu$ (K, D)"), (4, "values v (T, D)")):  # side inputs
        x = n * (width + gap) + width / 2
        ax.text(x, 2.0, label, ha="center", va="center", fontsize=9)
        ax.annotate("", xy=(x, 1.27), xytext=(x, 1.85), arrowprops=dict(arrowstyle="->", lw=1.2))
    ax.set_xlim(-0.2, len(steps) * (width + gap))
    ax.set_ylim(-0.2, 2.3)
    ax.axis("off")  # a diagram: no data axes
    ax.set_title("One routing head, step by step (shared QK: the keys are the queries)")
    fig.savefig(FIG_DIR / "02_pipeline.png", dpi=100, bbox_inches="tight")
    plt.show()


draw_pipeline()

# %% [markdown]
# *The routing pipeline.* Read it left to right. Steps 1 to 3 only decide **which** tokens meet
# (integer windows, no gradient). Step 4 is ordinary causal attention, run K times on W tokens each.
# Step 5 undoes the grouping. Only step 4 touches the values.
#
# We use **shared QK** (keys are the queries, as in every released language model), T = 32 tokens
# of D = 8, K = 4 clusters of W = 8 tokens, so K·W = T. The tokens come from four hidden "topics"
# with unequal frequencies, as words do.

# %%
T, D, K, W = 32, 8, 4, 8
EPS = 1e-2  # scatter-mean eps, combine_eps (docs/algorithm.md#15-combine)
rng = np.random.default_rng(1)
topic = rng.choice(4, size=T, p=[0.4, 0.3, 0.2, 0.1])  # (T,), hidden topic of each token
topic_dirs = 1.5 * rng.standard_normal((4, D))  # (4, D)
q = topic_dirs[topic] + rng.standard_normal((T, D))  # (T, D), raw queries = keys
v = rng.standard_normal((T, D))  # (T, D)
pos = np.arange(T)  # (T,)
print("topics:", topic)

# %% [markdown]
# **Step 1, normalise.** A layer norm without parameters, $\hat x = (x - \bar x)/\sqrt{\operatorname{var}(x)
# + 10^{-6}}$ (`norm="ln"`, docs/algorithm.md#11-normalise): every vector gets norm $\approx \sqrt D$, so dot
# products compare directions only. **Step 2, centroids and similarities**, $S = \hat X \mu^\top$. In
# training the centroids follow the queries by online k-means (tutorial 1); here we take the
# library's data-based start (`init="data"`: K tokens, then 10 Lloyd steps), which is already a good
# clustering of this sequence.

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
# **Step 3, balanced membership** (docs/algorithm.md#13-membership). Each cluster $c$ takes the $W$
# tokens with the largest $S_{tc}$ over the whole sequence, then sorts them by position:
#
# $$I_c = \operatorname{sort}\Big(\operatorname*{top-}W_{\,t \in \{0, \dots, T-1\}}\; S_{tc}\Big),
# \qquad t \in I_c \iff \#\{t' : S_{t'c} > S_{tc}\} < W \ \text{(no ties)}, \qquad |I_c| = W.$$
#
# Every cluster has exactly $W$ members, so every cluster costs the same $W^2$ dot products; the price
# is that a token may be picked by several clusters or by none. (A stable sort breaks ties in favour
# of the lower position.)

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
# **Step 4, attention inside each cluster** (docs/algorithm.md#14-attention-inside-a-cluster). Gather
# the members of each window, compute the logits between them, and mask by **original positions**:
# member $r$ of a window may see member $s$ only if $I_c[s] \le I_c[r]$,
#
# $$M^{(c)}_{rs} = \begin{cases} 0 & I_c[s] \le I_c[r] \\ -\infty & \text{otherwise,} \end{cases}
# \qquad O_c = \operatorname{softmax}\big(\hat X[I_c]\, \hat X[I_c]^\top + M^{(c)}\big)\, V[I_c]
# \quad \in \mathbb{R}^{W \times D}.$$
#
# Since the windows are sorted by position this is a lower triangle, but masking by positions stays
# correct for any order. The logits are dot products of the *normalised* vectors, with no $1/\sqrt D$
# (`logits="normalized"`).

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
# **Step 5, scatter-mean** (docs/algorithm.md#15-combine). Add each cluster's outputs back at the
# positions they came from and divide by the number of clusters the position is in, plus
# $\varepsilon$ = `combine_eps`:
#
# $$\text{out}_i = \frac{1}{n_i + \varepsilon} \sum_{c=1}^{K} \ \sum_{r\,:\, I_c[r] = i} O_c[r],
# \qquad n_i = \#\{(c, r) : I_c[r] = i\}.$$
#
# The $\varepsilon$ keeps the division safe for tokens in no cluster ($n_i = 0$: they get 0 from this
# head; the model's other heads and its skip connections still carry them). It also makes routing
# slightly smaller than a true mean, by a factor $n_i/(n_i + \varepsilon)$.

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
# `impl="ref"` asks for the readable NumPy path that we just rebuilt (the default runs compiled
# kernels that compute the same numbers). `routing_attention` also returns the commitment loss and
# the k-means statistics for the centroid update (tutorial 1); we ignore them here.
#
# ### Routing as one (T, T) weight matrix
#
# Everything above is linear in v, so routing attention is `A @ v` for a (T, T) matrix A: the
# cluster weights `p`, added at (query position, key position) and divided by the query's count.
# Building A shows exactly which keys each query sees, and with which weight. We write the five steps
# as one function (the appendix reuses it with other options) and check it once more.

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
# ### The same budget, side by side
#
# Routing computes $K$ causal triangles of $W$ tokens: $K \cdot W(W+1)/2$ logits. Local attention
# with blocks of $L = W$ and **no look-back** (`look_back=0`) computes exactly as many: $T/W = K$
# triangles of $W$ tokens, one per block. So these two spend the same budget; only the choice of
# **which** tokens share a triangle differs (neighbours for local, similar tokens for routing). The
# library's default `look_back=1` would give local twice the reach and about three times the logits.
# We draw the weights, not just 0/1: dense attention uses the same normalised vectors and no
# $1/\sqrt D$, as routing does, so the three panels compare like with like.

# %%
causal = np.tril(np.ones((T, T), dtype=bool))  # (T, T) for the new T
local0_mask = causal & (pos[:, None] // W == pos[None, :] // W)  # (T, T): own block only, L = W
A_dense = masked_softmax(qn @ qn.T, causal)  # (T, D) @ (D, T) -> (T, T)
A_local0 = masked_softmax(qn @ qn.T, local0_mask)  # (T, T)
out_lib = attention.local_attention(lib(qn), lib(qn), lib(v), block_size=W, look_back=0, scale=1.0)[0, 0]
assert np.allclose(A_local0 @ v, out_lib, rtol=1e-12, atol=1e-14)  # (T, T) @ (T, D) -> (T, D)
assert np.allclose(A_dense @ v, attention.dense_causal_attention(lib(qn), lib(qn), lib(v), scale=1.0)[0, 0],
                   rtol=1e-12, atol=1e-14)

computed = K * W * (W + 1) // 2  # logits routing computes: K triangles
routing_mask = A_routing > 0  # (T, T), the union over the query's clusters
assert local0_mask.sum() == computed  # the same budget
print(f"logits computed: dense {causal.sum()}, local (L = W = {W}, look_back=0) {local0_mask.sum()}, "
      f"routing {computed}")
print(f"distinct (query, key) pairs routing sees: {routing_mask.sum()} "
      f"({computed - routing_mask.sum()} pairs fall in two clusters and are counted once)")

fig, axes = plt.subplots(1, 3, figsize=(14, 4.6), layout="constrained")
for ax, A, title in ((axes[0], A_dense, "dense causal"), (axes[1], A_local0, f"local, L={W}, look_back=0"),
                     (axes[2], A_routing, f"routing, K={K}, W={W}")):
    im = ax.imshow(np.where(A > 0, A, np.nan), cmap="viridis", norm=LogNorm(1e-3, 1))  # blank = not seen
    ax.set_title(f"{title}: {(A > 0).sum()} pairs")
    ax.set_xlabel("key position j")
axes[0].set_ylabel("query position i")
fig.colorbar(im, ax=axes, label="attention weight (log scale)", shrink=0.85)
fig.suptitle("Attention weights of each query (blank = not seen; weights below 1e-3 drawn as 1e-3)")
fig.savefig(FIG_DIR / "02_which_keys.png", dpi=100, bbox_inches="tight")
plt.show()
same_topic = topic[:, None] == topic[None, :]  # (T, T)
print(f"pairs that share a topic: {same_topic[routing_mask].mean():.0%} of routed pairs, "
      f"{same_topic[local0_mask].mean():.0%} of local pairs, {same_topic[causal].mean():.0%} of all causal pairs")

# %% [markdown]
# The colour scale is logarithmic: with normalised logits and shared QK a token's largest weight is
# usually on itself (the bright diagonal), and a linear scale would hide everything else. Dense
# attention spreads each row over every earlier key. Local attention keeps the four triangles on the
# diagonal. Routing keeps the same number of logits but scatters them: query $i$ sees earlier keys of
# its own cluster, near or far. Empty rows are tokens in no cluster; in the rows of tokens in two
# clusters, each cluster's weights are halved by the mean. The printed shares say that the
# pairs routing keeps mostly share a topic: pairs whose dot product, and so whose dense weight, is large.
#
# The scatter is a block structure in disguise. Reorder rows and columns by cluster (each token under
# the cluster where it scores highest among those it joined; tokens in no cluster last) and the K
# triangles reappear. The tick labels give each token's position, coloured by its hidden topic.

# %%
member = np.zeros((T, K), dtype=bool)  # (T, K): is token t in cluster c
member[windows, np.arange(K)[:, None]] = True
home = np.where(counts > 0, np.where(member, S, -np.inf).argmax(axis=1), K)  # (T,), K = in no cluster
order = np.lexsort((pos, home))  # (T,): by home cluster, then by position
A_sorted = A_routing[np.ix_(order, order)]  # (T, T), rows and columns permuted
bounds = np.flatnonzero(np.diff(home[order])) + 0.5  # between groups

fig, ax = plt.subplots(figsize=(7.5, 6.5))
im = ax.imshow(np.where(A_sorted > 0, A_sorted, np.nan), cmap="viridis", norm=LogNorm(1e-3, 1))
for b in bounds:
    ax.axhline(b, color="0.5", lw=0.8)
    ax.axvline(b, color="0.5", lw=0.8)
ax.set_xticks(range(T), order, fontsize=7)
ax.set_yticks(range(T), order, fontsize=7)
for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
    for label, t in zip(labels, order):
        label.set_color(f"C{topic[t]}")
ax.set_xlabel("key position, grouped by home cluster (colour = hidden topic)")
ax.set_ylabel("query position, grouped by home cluster")
ax.set_title("Routing weights sorted by cluster: K blocks")
fig.colorbar(im, ax=ax, label="attention weight (log scale)", shrink=0.85)
fig.savefig(FIG_DIR / "02_routing_sorted.png", dpi=100, bbox_inches="tight")
plt.show()
print("home cluster sizes:", np.bincount(home, minlength=K + 1)[:K], "| in no cluster:", int((home == K).sum()))

# %% [markdown]
# *Routing sorted by cluster.* Each grey square holds the tokens of one home cluster, and inside it
# the weights form a causal triangle (a query sees the earlier members of its cluster). Within a
# square the tick colours are mostly one topic: the clusters found the topics. Weights outside the
# squares belong to tokens that joined a second cluster (cluster 1 shares four of its members with
# cluster 2, which is why its square is small). The last rows, tokens in no cluster, are empty.
#
# **A check from docs/algorithm.md#110-checking-an-implementation.** With one cluster holding the
# whole sequence (K = 1, W = T), routing is dense attention on the normalised vectors without
# $1/\sqrt D$, except for the scatter-mean: each token is in exactly one cluster, so it is divided by
# $1 + \varepsilon$.

# %%
one_cluster, _, _ = attention.routing_attention(lib(q), None, lib(v), means[:, :1], window_size=T, impl="ref")
dense_normalized = attention.dense_causal_attention(lib(qn), lib(qn), lib(v), scale=1.0)  # (1, 1, T, D)
assert np.allclose(one_cluster * (1 + EPS), dense_normalized, rtol=1e-12, atol=1e-14)
print(f"K=1, W=T: routing * (1 + eps) == dense; the gap without the factor is {EPS:.0%}")
SEC3 = {"T": T, "W": W, "q": q, "v": v, "topic": topic}  # section 3's sequence, for the appendix

# %% [markdown]
# ### Exercises for section 3
#
# **Exercise 2.1 (easy): the causal mask by original positions.** Write `cluster_mask(query_pos,
# key_pos)`: given the positions of one cluster's W queries and W keys (two integer arrays of length
# W, in any order), return the (W, W) boolean matrix $M_{rs}$ = "query $r$ may see key $s$", i.e. key
# position ≤ query position. The check uses your mask inside one cluster and compares the result
# with `attention.cluster_attention_reference`, also for windows that are not sorted and for
# separate key windows. (Hint: `np.tril` is right only in one of those cases.)

# %%
def cluster_mask(query_pos, key_pos):
    """(W,) query positions, (W,) key positions -> (W, W) bool, True where the key is visible."""
    raise NotImplementedError  # your code here


report("Exercise 2.1", ex02.check_cluster_mask, cluster_mask)

# %% [markdown]
# **Exercise 2.2 (easy): the scatter-mean.** Write `scatter_mean(outs, windows, T, combine_eps)`:
# `outs` (K, W, D) holds one output per (cluster, member), `windows` (K, W) the members' positions;
# return the (T, D) combine of step 5. Watch for two traps: a position that is in two clusters
# (`summed[windows] += outs` adds only one of them; `np.add.at` adds both), and a position in no
# cluster (divide by $n_i + \varepsilon$, not by $n_i$).

# %%
def scatter_mean(outs, windows, T, combine_eps):
    """outs (K, W, D), windows (K, W) positions -> (T, D)."""
    raise NotImplementedError  # your code here


report("Exercise 2.2", ex02.check_scatter_mean, scatter_mean)

# %% [markdown]
# **Exercise 2.3 (medium): plant a bug, see which names fail.** `rt_numpy.crosscheck` compares
# another implementation with the library *by name* (tutorial 4 is the full story):
# `crosscheck.reference(...)` computes every named array of one routing step, and
# `crosscheck.compare(case, mine)` / `crosscheck.assert_close(case, mine, rtol=...)` report, per
# name, how far yours is. Below is a from-scratch routing head that returns three names: `out`,
# `query_windows` and `assignments` (each token's nearest centroid). It passes.
#
# Copy it into `my_routing_buggy(q, v, means, W, bug)`, where `bug` is one of
#
# * `"index_mask"`: mask by **index inside the window** (`np.tril`) instead of by position, *and* keep
#   each window in top-W order (most similar first) instead of sorting it by position;
# * `"sorted_index_mask"`: the same index mask, with the windows sorted by position as before;
# * `"no_eps"`: divide by the count alone, forgetting `combine_eps` (tokens in no cluster: use 1
#   instead of 0 to avoid a division by zero);
# * `"no_normalise"`: route (scores, windows, assignments) with the raw q instead of $\hat q$;
#
# and `None` for no bug. Then, **before running anything**, write in `predicted_failures()` the set of
# names you expect `assert_close(case, ..., rtol=1e-9)` to report for each bug (an empty set if none).
# The check runs your buggy versions on its own case, tells you which names really fail, and compares
# with your prediction.

# %%
def my_routing(q, v, means, W):
    """Routing attention from scratch, one head, shared QK: q, v (1, 1, T, D), means (1, K, D)."""
    x, val, mu = q[0, 0], v[0, 0], means[0]  # (T, D), (T, D), (K, D)
    T, K = len(x), len(mu)
    xn = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-6)  # (T, D)
    scores = xn @ mu.T  # (T, D) @ (D, K) -> (T, K)
    windows = np.sort(np.argsort(-scores.T, axis=1, kind="stable")[:, :W], axis=1)  # (K, W), by position
    total, count = np.zeros_like(val), np.zeros(T)
    for c in range(K):
        members = windows[c]  # (W,) positions
        logits = xn[members] @ xn[members].T  # (W, D) @ (D, W) -> (W, W)
        p = masked_softmax(logits, members[None, :] <= members[:, None])  # (W, W), causal by position
        total[members] += p @ val[members]  # (W, W) @ (W, D) -> (W, D); a window has no repeats
        count[members] += 1
    out = total / (count + EPS)[:, None]  # (T, D)
    return {"out": out[None, None], "query_windows": windows[None, None],
            "assignments": scores.argmax(axis=1)[None, None, None]}  # (1, 1, T, D), (1, 1, K, W), (1, 1, 1, T)


case = crosscheck.reference(lib(q), None, lib(v), means, window_size=W, upstream=np.ones((1, 1, T, D)))
errors = crosscheck.assert_close(case, my_routing(lib(q), lib(v), means, W), rtol=1e-12)
print({name: f"{error:.1e}" for name, error in errors.items()})


# %%
def my_routing_buggy(q, v, means, W, bug):
    """my_routing with one planted bug (bug=None: none); same inputs and outputs."""
    raise NotImplementedError  # your code here


def predicted_failures():
    """{bug: set of names you expect assert_close to report}, for the four bugs."""
    raise NotImplementedError  # your prediction here


report("Exercise 2.3", ex02.check_planted_bugs, my_routing_buggy, predicted_failures)

# %% [markdown]
# ## 4. The causal leak of balanced membership
#
# Look again at step 3: cluster c takes the top W tokens **of the whole sequence**. Whether token j
# gets a seat therefore depends on the tokens *after* j: a later token that scores higher takes the
# seat of the weakest member, which may sit early in the sequence. The causal mask inside the cluster
# is perfect, yet the output at position i ≤ j can change when a token after i changes: the evicted
# token's own output changes (its count drops), and the cluster's later queries lose a key
# (docs/algorithm.md#3-the-causal-leak).
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
# Under balanced membership, outputs far before position j move (the evicted token and the later
# members of its cluster); under nearest membership nothing before j moves at all.
#
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
# learn to exploit it. Both public implementations train this way. At generation time the future does
# not exist yet, so the windows are chosen among the tokens generated so far: the model decodes under
# a different rule than the one it was trained with.
#
# `membership="nearest"` has no leak: a token's cluster depends on that token alone, and the mask
# does the rest. Its outputs before j agree up to rounding (here even exactly; in general they may
# differ in the last bits, because the cluster sizes change the shapes of the matrix products, hence
# the 1e-12 tolerance).

# %% [markdown]
# ## 5. Cost: counted operations and measured time
#
# **Counting.** We count the multiply-adds of the dot products (logits and scores) for one head; the
# weighted sum of the values adds as many again inside each attention and changes no slope
# (docs/algorithm.md#19-cost):
#
# $$\text{dense: } T^2 D, \qquad \text{local: } T \cdot 2L \cdot D \ (\texttt{look\_back}=1), \qquad
# \text{routing: } \underbrace{T K D}_{\text{scores}} + \underbrace{K W^2 D}_{\text{inside the clusters}}.$$
#
# With $KW = T$ the routing count is $TD(K + W)$. For a fixed product $KW = T$ the sum $K + W$ is
# smallest when $K = W = \sqrt T$, where it equals $2\sqrt T$:
#
# $$T D (K + W) \ \ge\ 2\, T^{1.5} D, \qquad \text{equality at } K = W = \sqrt T,$$
#
# so routing is $O(T^{1.5} D)$ against $O(T^2 D)$ for dense. That holds **only** when $W$ grows
# with $T$. The released configurations (docs/algorithm.md#5-released-configurations) fix $W$ (often
# 512) and set $K = T/W$: then the clusters cost $T W D$, linear in $T$, and the scores cost
# $T^2 D / W$, quadratic with a small constant, which takes over only beyond $T \approx W^2$.
#
# **Measuring.** We time one forward call of each attention on one head, D = 64, float32, with
# $W$ = round($\sqrt T$), $K = T // W$ for routing and $L = 64$ for local. Routing runs the library's
# fast path (`impl="auto"`: the fused Numba kernels where they are installed). Every call runs on
# **one thread**, so that time measures work, not how well the work splits over cores (on our shared
# two-core machine, two BLAS threads also added a wake-up delay of about 15 ms to every small dense
# call); each time is the best of a few calls. Dense stops where its (T, T) logits no longer fit comfortably in memory.

# %%
D_COST, L_COST, W_FIXED = 64, 64, 512
Ts = [2**n for n in range(8, 12 if FAST else 17)]  # 256 ... 2048 (fast: CI runs it with Numba's JIT off too) or 65536
DENSE_MAX = 1024 if FAST else 8192


def counted(kind, T, D=D_COST):
    """Multiply-adds of the logits and scores of one head (see the formulas above)."""
    if kind == "dense":
        return T * T * D
    if kind == "local":
        return T * 2 * L_COST * D
    W = int(round(math.sqrt(T))) if kind == "routing" else W_FIXED
    K = T // W
    return T * K * D + K * W * W * D


def attention_call(kind, T):
    """A no-argument function running one forward of `kind` at length T (inputs made once)."""
    rng = np.random.default_rng(0)
    q, v = rng.standard_normal((2, 1, 1, T, D_COST), dtype=np.float32)  # two (B=1, H=1, T, D)
    if kind == "dense":
        return lambda: attention.dense_causal_attention(q, q, v)
    if kind == "local":
        return lambda: attention.local_attention(q, q, v, block_size=L_COST)
    W = int(round(math.sqrt(T)))
    means = kmeans.init_state(1, T // W, D_COST, rng=np.random.default_rng(1))["means"]  # (1, K, D)
    return lambda: attention.routing_attention(q, None, v, means, window_size=W)


def best_ms(run, budget_s=0.5, most=5):
    """Best of up to `most` calls after a warm-up (the warm-up also compiles the kernels)."""
    run()
    best, spent = np.inf, 0.0
    for _ in range(most):
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent > budget_s:  # slow calls: fewer repeats
            break
    return 1e3 * best


def one_thread():
    """Limit BLAS (and Numba, if installed) to one thread; returns a function that restores them."""
    try:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(limits=1, user_api="blas")
    except ImportError:
        limiter = None
        print("threadpoolctl not installed: BLAS may use every core (install the tutorials extra)")
    try:
        import numba
        before = numba.get_num_threads()
        numba.set_num_threads(1)
    except ImportError:
        numba, before = None, None

    def restore():
        if limiter is not None:
            limiter.restore_original_limits()
        if numba is not None:
            numba.set_num_threads(before)
    return restore


restore = one_thread()
timings = {"dense": {}, "local": {}, "routing": {}}  # kind -> {T: ms}
try:
    for kind in timings:  # one kind at a time
        for T in tqdm([T for T in Ts if kind != "dense" or T <= DENSE_MAX], desc=kind, leave=False):
            timings[kind][T] = best_ms(attention_call(kind, T))
finally:
    restore()

print(f"{'T':>6s} {'W':>4s} {'K':>4s} | " + " | ".join(f"{k:>7s} Mops {k[:5]:>5s} ms" for k in timings))
for T in Ts:
    cells = [f"{counted(k, T) / 1e6:12.1f} {timings[k][T]:8.2f}" if T in timings[k] else f"{'':12s} {'-':>8s}"
             for k in timings]
    print(f"{T:6d} {round(math.sqrt(T)):4d} {T // round(math.sqrt(T)):4d} | " + " | ".join(cells))

# %% [markdown]
# (Mops: millions of counted multiply-adds.) Now both on log-log axes. A cost $c\,T^a$ is a straight
# line of slope $a$, so we fit slopes: over every $T$, and over the upper half of each line's $T$
# values, where fixed per-call costs matter least.

# %%
def slope(ts, values):
    """Least-squares slope of log(values) against log(ts)."""
    return float(np.polyfit(np.log(ts), np.log(values), 1)[0])


def upper_half(ts):
    return ts[len(ts) // 2:]


fig, (ax_count, ax_time) = plt.subplots(1, 2, figsize=(13, 5))
colors = {"dense": "C3", "local": "C2", "routing": "C0", "routing, W = 512": "C0"}
slopes = {}
for kind in ("dense", "local", "routing", "routing, W = 512"):
    ts = [T for T in Ts if T >= W_FIXED] if kind == "routing, W = 512" else sorted(timings[kind])
    ops = [counted("fixed" if kind == "routing, W = 512" else kind, T) for T in ts]
    slopes[kind, "counted"] = slope(upper_half(ts), upper_half(ops))
    ax_count.loglog(ts, ops, "--" if "512" in kind else "o-", color=colors[kind], ms=4,
                    label=f"{kind}: slope {slopes[kind, 'counted']:.2f}")
    if kind in timings:
        ms = [timings[kind][T] for T in ts]
        slopes[kind, "measured"] = slope(upper_half(ts), upper_half(ms))
        slopes[kind, "measured, all T"] = slope(ts, ms)
        label = f"{kind}: slope {slopes[kind, 'measured']:.2f} (all T: {slopes[kind, 'measured, all T']:.2f})"
        ax_time.loglog(ts, ms, "o-", color=colors[kind], ms=4, label=label)
for ax in (ax_count, ax_time):
    ax.set_xticks(Ts, [str(T) for T in Ts], rotation=45)
    ax.xaxis.set_minor_formatter(plt.NullFormatter())  # keep the log axis readable
    ax.set_xlabel("sequence length T")
    ax.legend(fontsize=8, title="slope over the upper half of T", title_fontsize=8)
ax_count.set_ylabel("counted multiply-adds (logits and scores)")
ax_count.set_title(f"Counted operations, one head, D = {D_COST}")
ax_time.set_ylabel("time per forward call (ms, one thread)")
ax_time.set_title(f"Measured time, one head, D = {D_COST}, float32")
fig.savefig(FIG_DIR / "02_cost.png", dpi=100, bbox_inches="tight")
plt.show()
for kind in timings:
    print(f"{kind:8s} slope over T >= {upper_half(sorted(timings[kind]))[0]:5d}: counted "
          f"{slopes[kind, 'counted']:.2f}, measured {slopes[kind, 'measured']:.2f} "
          f"(measured over every T: {slopes[kind, 'measured, all T']:.2f})")
for kind in timings:
    lo, hi = min(timings[kind]), max(timings[kind])
    rate = {T: counted(kind, T) / timings[kind][T] / 1e6 for T in (lo, hi)}  # Mops per ms -> G per s
    print(f"{kind:8s} counted multiply-adds per second: {rate[lo]:4.1f} G at T = {lo}, {rate[hi]:4.1f} G at T = {hi}")

# %% [markdown]
# *Counted operations (left) and measured time (right).* Left: the counts are exact, so the slopes
# are the formulas: 2 for dense, 1 for local, about 1.5 for routing at $W = \sqrt T$ (the rounding of
# $W$ and $K = T // W$ moves it a little). The dashed line, routing at the released configurations'
# fixed $W = 512$, costs more than $W = \sqrt T$ below $T = 512^2$ and is nearly linear there
# (slope about 1): the $K W^2 D$ clusters dominate, and the quadratic $T K D$ scores are still small.
#
# Right: the measurement. It agrees with the counts for dense and local, and not quite for routing:
#
# * Dense's measured slope is close to 2. At full size it goes above 2 (2.2 to 2.4 on our runs):
#   beyond a few thousand tokens its (T, T) arrays leave the cache, and its work per second *falls*
#   as $T$ grows (the last printed lines). That is a property of this machine's memory, not of the
#   algorithm.
# * Routing's measured slope stays below the counted 1.5, over the upper half of $T$ too (from 1.1
#   to 1.45 on our runs, full size and fast, depending on the load from other jobs). Two reasons,
#   both visible in the printed rates. Part of routing's time is work linear in $T$ that the count
#   leaves out (normalising, sorting the scores, gathering and scattering rows), and fixed costs per
#   call weigh on small $T$. And its work
#   per second *rises* with $T$: larger windows make larger products, which the CPU runs more
#   efficiently (0.4 G/s at T = 256, 3 to 7 G/s at 65536 on our runs). $T^{1.5}$ is the growth
#   of the work; the time grows more slowly over this range, and can follow the count only once the
#   rate stops rising.
# * Over small $T$ every line is flatter than its count, because of those fixed costs. That is why an
#   earlier version of this notebook, timing routing only from 256 to 4096 on two threads, measured a
#   routing slope of 0.66 and wrote "T^1.5" beside it.
# * So counted operations say who wins *eventually*; only the measurement says from which $T$
#   (exercise 2.4).
#
# Timings on a shared machine are noisy; rerun the cell and the slopes move by a tenth or more.
# `bench/attention.py` measures more carefully, forward and backward, against the PyTorch port.

# %% [markdown]
# ### Exercise for section 5
#
# **Exercise 2.4 (open): where does routing become cheaper than dense?** Write `counted_ops(kind,
# T, D)` for `kind` in `"dense"` and `"routing"` (with $W$ = round($\sqrt T$), $K = T // W$). You may
# refine the count of this section (the causal half of dense, the values product, the
# normalisation), as long as dense grows as $T^2 D$ and routing as $T^{1.5} D$. Then find:
#
# * `counted_crossover`: the smallest $T$ from which routing's count (at $D = 64$) stays below
#   dense's up to $T = 65536$;
# * `measured_crossover`: the smallest $T$ of this notebook's timing grid from which routing's measured
#   time stays below dense's (over the $T$ where dense was timed), or None.
#
# Return them as a dict with keys `counted_ops`, `counted_crossover`, `measured_crossover`. Then think
# (the check cannot): why are the two crossovers so far apart, and which one would you expect to move
# on a GPU?

# %%
def crossover_answer():
    """{'counted_ops': function(kind, T, D), 'counted_crossover': int, 'measured_crossover': int or None}."""
    raise NotImplementedError  # your code here


report("Exercise 2.4", ex02.check_crossover, crossover_answer, timings)

# %% [markdown]
# ## Summary
#
# * Dense, local and routing attention are one recipe with three masks: all earlier keys; the
#   earlier keys of the same or previous block; the earlier keys of the same clusters.
# * Routing, from scratch: normalise, score against K centroids, take the W best tokens per cluster,
#   attend causally by original positions inside each cluster, average back dividing by
#   $n_i + \varepsilon$. It equals `routing_attention(..., impl="ref")`, and with K = 1, W = T it is
#   dense attention divided by $1 + \varepsilon$.
# * At the same budget of logits as local attention (`look_back=0`, $L = W$), routing spends them on
#   similar tokens instead of neighbours; sorted by cluster its weights are K causal blocks.
# * Balanced membership leaks information from later tokens into earlier outputs; `nearest` is
#   strictly causal but its cluster sizes, and so its cost, follow the data.
# * Counted, routing costs $TKD + KW^2D$: $\propto T^{1.5}$ at $K = W = \sqrt T$, nearly linear at a
#   fixed $W$ until $T \approx W^2$. Measured on one CPU thread up to $T = 65536$, its slope is 1.1
#   to 1.45, below the count (linear work the count leaves out, and a rate that rises with $W$); dense's
#   is 2 or a little more. Routing's time drops below dense's only at some hundreds of tokens, far later
#   than the count alone says.

# %% [markdown]
# ## Appendix: the options of the two public implementations (for researchers)
#
# rt_numpy's defaults follow the official code. Each option below switches one convention to the
# PyTorch port's (docs/algorithm.md#1-one-routing-head), and each is checked once more against our
# `routing_weights`. Tutorial 4, section 5, measures what each difference moves in a full cross-check;
# docs/conventions.md lists them all. We go back to section 3's sequence (T = 32, K = 4, W = 8).

# %%
T, W, q, v, topic = (SEC3[name] for name in ("T", "W", "q", "v", "topic"))
rng = np.random.default_rng(4)


def sharpness(A):
    """Mean over routed queries of the largest weight in their row (1 = all weight on one key)."""
    rows = A.sum(axis=1) > 0  # (T,)
    return (A[rows].max(axis=1) / A[rows].sum(axis=1)).mean()


# `logits="scaled"` (port): the raw query against the L2-normalised key, divided by sqrt(D).
# The official "normalized" logits reach D (both vectors have norm sqrt(D)): a sharper softmax.
A_scaled = routing_weights(q, kmeans.normalize(q, "l2"), windows, windows, scale=1 / np.sqrt(D))  # (T, T)
out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), means, window_size=W, logits="scaled", impl="ref")
assert np.allclose(A_scaled @ v, out_lib[0, 0], rtol=1e-12, atol=1e-14)
print(f"largest weight per row: normalized {sharpness(A_routing):.2f}, scaled {sharpness(A_scaled):.2f}")

# `self_attend="last_resort"` (port, after Reformer): the self logit is -5e4, so a token looks at itself
# only when it sees nothing else; under shared QK a normalised query's best match is otherwise itself.
A_last = routing_weights(qn, qn, windows, windows, self_attend="last_resort")  # (T, T)
out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), means, window_size=W, self_attend="last_resort",
                                            impl="ref")
assert np.allclose(A_last @ v, out_lib[0, 0], rtol=1e-12, atol=1e-14)
routed = counts > 0  # (T,)
for name, A in (("allow", A_routing), ("last_resort", A_last)):
    print(f"{name:12s} mean weight on self: {(np.diag(A)[routed] / A[routed].sum(axis=1)).mean():.2f}")

# %% [markdown]
# **`shared_qk=False`.** Keys have their own projection and their own windows, so a query whose
# cluster has no key at or before its position sees nothing and outputs 0 for that cluster
# (docs/algorithm.md#14-attention-inside-a-cluster); the port avoids such rows with a learned memory
# key per cluster (`mem_kv`). **`membership="nearest"`.** Each token joins only its nearest centroid:
# dense attention with the mask "same cluster and $j \le i$", divided by $1 + \varepsilon$; cluster
# sizes, and so the cost, follow the data.

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

a = S.argmax(axis=1)  # (T,), nearest centroid
same_cluster = causal & (a[:, None] == a[None, :])  # (T, T)
out_nearest = masked_attention(qn, qn, v, same_cluster, 1.0)  # (T, D)
out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), means, membership="nearest", impl="ref")
assert np.allclose(out_nearest / (1 + EPS), out_lib[0, 0], rtol=1e-12, atol=1e-14)
print("nearest cluster sizes:", np.bincount(a, minlength=K), "| balanced: W =", W, "each")
