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
# # Tutorial 6: the family of sparse attention, content-free and content-based
#
# Dense attention lets every query see every earlier key, $T(T+1)/2$ pairs per head. Every attention in
# this notebook keeps only a few keys per query. They differ in **how they choose the keys**:
#
# | attention | chooses by | paper / code |
# |---|---|---|
# | local | position: the nearest blocks | `attention.local_attention` |
# | strided | position: every $S$-th key | `baselines.strided_attention` (Sparse Transformer) |
# | LSH | content: random hashes | `baselines.lsh_attention` (Reformer) |
# | routing | content: learned centroids | `attention.routing_attention` (Roy et al.) |
#
# **You will** build each from scratch in NumPy and check it against the library, draw which keys each
# lets one query see, walk through one routing head (what the PyTorch port's `KmeansAttention` computes),
# and read the comparison of these attentions trained in small models. **Before this:** tutorial 02.
# **Time:** about 60 minutes with the exercises. Definitions: docs/algorithm.md#2-local-attention,
# docs/algorithm.md#1-one-routing-head, docs/algorithm.md#7-the-baselines. Arrays are one head's (T, D);
# `lib()` adds the batch and head axes of the library's (B, H, T, D).

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from checks import ex06, report
from matplotlib.patches import Patch

import rt_numpy
from rt_numpy import attention, baselines, causality, crosscheck, kmeans
from rt_numpy.kernels import SELF_LOGIT  # -5e4: the logit of "a token sees itself only as a last resort"

FAST = os.environ.get("RT_NUMPY_FAST") == "1"  # CI knob: fewer positions in the causality certificates
FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_06_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True, linewidth=120)


def lib(x):
    """One head's (T, D) array as the library's (B=1, H=1, T, D)."""
    return x[None, None]


def softmax_attention(q, k, v, counts, scale, last_resort=False):
    """Attention of q (Tq, D) over k, v (Tk, D) where counts > 0; last_resort: self logit SELF_LOGIT."""
    logits = scale * q @ k.T  # (Tq, D) @ (D, Tk) -> (Tq, Tk)
    if last_resort:
        np.fill_diagonal(logits, SELF_LOGIT)
    logits = np.where(counts > 0, logits, -np.inf)
    top = logits.max(axis=1, keepdims=True)  # (Tq, 1)
    weights = counts * np.exp(logits - np.where(np.isfinite(top), top, 0.0))  # (Tq, Tk), 0 where hidden
    total = weights.sum(axis=1, keepdims=True)  # (Tq, 1)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0) @ v  # (Tq, Tk) @ (Tk, D)


# %% [markdown]
# ## 1. Four ways to choose the keys
#
# One input for all four: $T = 96$ tokens of $D = 8$, drawn around $4$ hidden "topics" with unequal
# frequencies, as words are. The keys are the queries (**shared QK**, as in every released routing
# language model). The budget follows docs/algorithm.md#73-the-budget: local blocks of $L = 8$, and
# $K = 4$ clusters of $W = 24$ tokens, so that $KW = T$.

# %%
T, D, K, W, L = 96, 8, 4, 24, 8
rng = np.random.default_rng(6)
topic = rng.choice(K, size=T, p=[0.4, 0.3, 0.2, 0.1])  # (T,), the hidden topic of each token
q = 1.5 * rng.standard_normal((K, D))[topic] + rng.standard_normal((T, D))  # (T, D): queries = keys
v = rng.standard_normal((T, D))  # (T, D)
i, j = np.arange(T)[:, None], np.arange(T)[None, :]  # (T, 1) query positions, (1, T) key positions
causal = j <= i  # (T, T)
scale = 1 / np.sqrt(D)
print("topic sizes:", np.bincount(topic))

# %% [markdown]
# ### 1.1 Local: the nearest blocks
#
# Cut the sequence into blocks of $L$. Query $i$ sees the earlier keys of its own block and of the
# block before (docs/algorithm.md#2-local-attention):
# $$j \text{ visible to } i \iff j \le i \;\text{and}\; \lfloor i/L \rfloor - \lfloor j/L \rfloor \le 1 .$$
# At most $2L$ keys, whatever $T$ is: the cost is $O(T L D)$. Nothing further back than $2L$ is ever seen.

# %%
local = causal & (i // L - j // L <= 1)  # (T, T)
out_local = softmax_attention(q, q, v, local, scale)  # (T, D)
assert np.array_equal(local, baselines.visibility("local", T, block_size=L))
assert np.allclose(out_local, attention.local_attention(lib(q), lib(q), lib(v), block_size=L)[0, 0],
                   rtol=1e-12, atol=1e-14)
print("local by hand == attention.local_attention")

# %% [markdown]
# ### 1.2 Strided: every $S$-th key
#
# Query $i$ sees the earlier keys at distance $0, S, 2S, \dots$ (docs/algorithm.md#71-strided-attention):
# $$j \text{ visible to } i \iff j \le i \;\text{and}\; (i - j) \bmod S = 0 .$$
# The positions with the same remainder mod $S$ form a **class** of $T/S$ tokens, and each class is an
# ordinary causal attention. So we compute it class by class, as `strided_attention` does with one
# reshape. With $S = T/W = 4$ a class holds $W = 24$ tokens, as a routing cluster does. Query $i$ sees
# $\lfloor i/S \rfloor + 1$ keys; the cost is $O(T^2 D / S)$. Strided is content-free, like local, but it
# reaches across the whole sequence.

# %%
S = T // W  # 4 classes of W tokens
out_strided = np.zeros((T, D))
for c in range(S):
    members = np.arange(c, T, S)  # (W,): positions c, c + S, c + 2S, ...
    inside = np.tril(np.ones((len(members), len(members)), bool))  # (W, W): causal inside the class
    out_strided[members] = softmax_attention(q[members], q[members], v[members], inside, scale)  # (W, D)
assert np.allclose(out_strided, baselines.strided_attention(lib(q), lib(q), lib(v), stride=S)[0, 0],
                   rtol=1e-12, atol=1e-14)
strided = baselines.visibility("strided", T, stride=S) > 0  # (T, T): the mask itself is Exercise 6.1
print("strided by hand, class by class == baselines.strided_attention")

# %% [markdown]
# ### 1.3 LSH: random hashes, sorted and chunked
#
# Reformer's attention chooses by content, but without training anything
# (docs/algorithm.md#72-lsh-attention). Normalise each query (the parameter-free layer norm
# $\hat x = (x - \bar x)/\sqrt{\operatorname{var}(x) + 10^{-6}}$), then hash it with a fixed random
# matrix $R \in \mathbb{R}^{D \times K/2}$:
# $$\text{bucket}(x) = \arg\max\,[\hat x R,\; -\hat x R] \in \{0, \dots, K-1\}.$$
# Vectors at a small angle tend to land in the same bucket. Sort the positions by bucket (then by
# position), cut the order into chunks of $W' = W/2$, and let each query see the earlier keys of its own
# chunk and of the chunk before. With $c(t)$ the chunk that holds position $t$:
# $$j \text{ visible to } i \iff j \le i \;\text{and}\; c(i) - c(j) \in \{0, 1\}.$$
# A token sees itself only when it sees nothing else (Reformer's rule for shared QK), and the logits are
# $\hat q_i \cdot \hat q_j$ without $1/\sqrt D$. The cost is $O(T \log T)$ for the sort plus $O(T W' D)$.

# %%
Wc = W // 2  # chunks of W/2, as in the comparison (docs/algorithm.md#73-the-budget)
rot = baselines.lsh_rotations(1, D, K, seed=0, dtype=np.float64)  # (H=1, rounds=1, D, K/2), fixed
qn = (q - q.mean(axis=1, keepdims=True)) / np.sqrt(q.var(axis=1, keepdims=True) + 1e-6)  # (T, D)
assert np.allclose(qn, kmeans.normalize(q, "ln"), rtol=1e-12)
proj = qn @ rot[0, 0]  # (T, D) @ (D, K/2) -> (T, K/2)
bucket = np.argmax(np.concatenate([proj, -proj], axis=1), axis=1)  # (T, K) -> (T,)
order = np.argsort(bucket * T + np.arange(T))  # (T,): positions sorted by bucket, then by position
chunk = np.empty(T, int)
chunk[order] = np.arange(T) // Wc  # (T,): the chunk that holds each position
lsh = causal & np.isin(chunk[:, None] - chunk[None, :], (0, 1))  # (T, T)
out_lsh = softmax_attention(qn, qn, v, lsh, 1.0, last_resort=True)  # (T, D)

chunks = baselines.lsh_chunks(bucket[None, None, None], Wc)  # (B, H, rounds, T / Wc, Wc)
assert np.array_equal(lsh, baselines.visibility("lsh", T, chunks=chunks)[0, 0] > 0)
assert np.allclose(out_lsh, baselines.lsh_attention(lib(q), None, lib(v), rot, window_size=Wc)[0, 0],
                   rtol=1e-12, atol=1e-14)
print("LSH by hand == baselines.lsh_attention; bucket sizes:", np.bincount(bucket, minlength=K))

# %% [markdown]
# ### 1.4 Routing: learned centroids, balanced windows
#
# Routing replaces the random hash by $K$ centroids $\mu$ that online k-means trains (tutorial 01), and the
# chunks by one window per cluster (docs/algorithm.md#13-membership): cluster $c$ takes the $W$ tokens
# with the largest similarity $\hat x_t \cdot \mu_c$ over the whole sequence. Attention runs causally
# inside each window $I_c$, and a token in several windows gets the mean of its outputs
# (docs/algorithm.md#15-combine), with $n_i$ the number of windows that hold $i$:
# $$\text{out}_i = \frac{1}{n_i + \varepsilon} \sum_{c:\, i \in I_c} \operatorname{softmax}_{j \in I_c,\, j \le i}
# \big(\hat q_i \cdot \hat q_j\big)\, v_j .$$
# Query $i$ sees key $j$ when some window holds both. The cost is $O(TKD)$ to route plus $O(KW^2D)$ inside
# the windows; with $K = W = \sqrt T$ that is $O(T^{1.5} D)$ (docs/algorithm.md#19-cost). Our centroids
# stand in for trained ones: the library's data-based start (K tokens, then 10 Lloyd steps).

# %%
mu = kmeans.init_state(1, K, D, rng=np.random.default_rng(2), init="data", points=lib(qn),
                       dtype=np.float64)["means"][0]  # (K, D)
scores = qn @ mu.T  # (T, D) @ (D, K) -> (T, K)
windows = np.sort(np.argsort(-scores.T, axis=1, kind="stable")[:, :W], axis=1)  # (K, W): W best, by position
member = np.zeros((K, T), int)  # (K, T): 1 where cluster c holds position t
np.put_along_axis(member, windows, 1, axis=1)
routing = (member.T @ member) * causal  # (T, K) @ (K, T) -> (T, T): in how many windows i meets j
out_routing = np.zeros((T, D))
for c in range(K):
    I = windows[c]  # (W,)
    out_routing[I] += softmax_attention(qn[I], qn[I], v[I], causal[np.ix_(I, I)], 1.0)  # (W, D)
out_routing /= (member.sum(axis=0) + 1e-2)[:, None]  # scatter-mean, the official eps 1e-2

out_lib, _, _ = attention.routing_attention(lib(q), None, lib(v), mu[None], window_size=W)
assert np.allclose(out_routing, out_lib[0, 0], rtol=1e-10, atol=1e-12)
assert np.array_equal(routing, baselines.visibility("routing", T, windows=windows[None, None])[0, 0])
print("routing by hand == attention.routing_attention;", int((member.sum(axis=0) == 0).sum()),
      "tokens are in no window")

# %% [markdown]
# ### 1.5 Which keys one query sees
#
# One query, the four patterns. We pick the last token that exactly one routing window holds.

# %%
masks = {"local": local, "strided": strided, "LSH": lsh, "routing": routing > 0}
query = int(np.flatnonzero(member.sum(axis=0) == 1).max())
colors = plt.get_cmap("tab10").colors[:K]
cols = 12  # the sequence is drawn in rows of 12 positions
fig, axes = plt.subplots(1, 4, figsize=(15, 3.9), sharey=True)
for ax, (name, mask) in zip(axes, masks.items()):
    seen = mask[query]  # (T,)
    rgba = np.ones((T, 4))  # (T, 4): later positions stay white
    rgba[:query + 1, :3] = np.array(colors)[topic[:query + 1]]  # earlier tokens in their topic's colour
    rgba[:query + 1, 3] = np.where(seen[:query + 1], 1.0, 0.12)  # faint where the query does not look
    ax.imshow(rgba.reshape(T // cols, cols, 4))
    ax.plot(query % cols, query // cols, marker="*", color="k", markersize=14)
    same = (topic[seen] == topic[query]).mean()
    ax.set(title=f"{name}: {seen.sum()} keys, {same:.0%} same topic", xticks=range(0, cols, 2),
           yticks=range(T // cols), yticklabels=[str(r * cols) for r in range(T // cols)], xlabel="position mod 12")
axes[0].set_ylabel("position at the row start")
fig.legend([Patch(color=c) for c in colors], [f"topic {t}" for t in range(K)], loc="lower center", ncol=K)
fig.suptitle(f"Keys that query {query} (the star, topic {topic[query]}) sees; faint: earlier keys not seen")
fig.tight_layout(rect=(0, 0.08, 1, 1))
fig.savefig(FIG_DIR / "06_keys_of_one_query.png", dpi=100)
plt.show()

# %% [markdown]
# Read each panel like a page, twelve positions per row. **Local** lights one solid band just before
# the star, whatever the colours. **Strided** lights columns: positions with the query's remainder mod
# $S = 4$, whatever the topic. **Routing** lights scattered tokens, all of the star's colour: its window
# is one cluster, and the centroids were fitted to these vectors. **LSH** lights scattered tokens too,
# but for this query mostly of another colour: the random hash put it in a bucket whose tokens are
# mostly of topic 1. One query is one draw. Over all queries both content-based choices pick the
# query's topic more often than chance, routing much more so:

# %%
share = {name: np.mean([(topic[m[t]] == topic[t]).mean() for t in range(T) if m[t].any()])
         for name, m in masks.items()}  # mean over queries of the same-topic share of the keys seen
for name, mask in masks.items():
    print(f"{name:8s} keys per query {baselines.keys_per_query(mask):5.2f}   same-topic share {share[name]:.2f}")
chance = np.mean([(topic[:t + 1] == topic[t]).mean() for t in range(T)])
print(f"{'(all)':8s} a random earlier key has the query's topic with probability {chance:.2f}")
assert (topic[routing[query] > 0] == topic[query]).all()
assert np.bincount(topic[bucket == bucket[query]]).argmax() == 1 != topic[query]  # the caption's bucket
assert share["routing"] > share["LSH"] > chance + 0.1 > max(share["local"], share["strided"])
assert round(baselines.keys_per_query(lsh), 1) == 14.5  # the number quoted in Exercise 6.2

# %% [markdown]
# **Causality.** A causal mask makes later keys invisible, but a content-based choice can still depend
# on later tokens: balanced windows are chosen over the whole sequence, so a later token can push an
# earlier one out of a window (docs/algorithm.md#3-the-causal-leak). `causality.certify` changes the
# inputs after position $i$ and measures how much the outputs at positions $\le i$ move. LSH is
# Exercise 6.3.

# %%
n_pos = 6 if FAST else 16
runs = {"local": lambda x: attention.local_attention(x, x, lib(v), block_size=L),
        "strided": lambda x: baselines.strided_attention(x, x, lib(v), stride=S),
        "routing": lambda x: attention.routing_attention(x, None, lib(v), mu[None], window_size=W)[0]}
for name, fn in runs.items():
    cert = causality.certify(fn, lib(q), rng=np.random.default_rng(0), time_axis=2, n_positions=n_pos)
    print(f"{name:8s} {'causal' if cert.passed else 'NOT causal'}: worst relative change {cert.worst:.2g}")
    assert cert.passed == (name != "routing")

# %% [markdown]
# ## 2. Inside one routing head: what the port's `KmeansAttention` does
#
# Users of the PyTorch port asked: *"Could you please illustrate more about KmeansAttention?"*, about the
# intuition and the principle (lucidrains/routing-transformer, issues 28 and 29). Here is one head,
# step by step.
#
# **The intuition.** A query's softmax weight on a key grows with $q \cdot k$. For unit vectors,
# $q \cdot k = 1 - \tfrac12 \lVert q - k \rVert^2$: a large dot product means a small distance. Two
# vectors close to the same centroid are close to each other, so k-means on the unit vectors groups the
# pairs that dense attention would weigh most. Attention then runs only inside the groups. Taking the
# top $W$ per cluster (balanced) makes every group the same size, so the $K$ attentions are one batched
# product of $(W, W)$ blocks.
#
# **The port's forward, line by line** (shared QK, `causal=True`), against docs/algorithm.md:
#
# | line of `KmeansAttention.forward` | what it computes (docs/algorithm.md §) | shape |
# |---|---|---|
# | `dists, aux_loss = self.kmeans(q)` | $S = \hat Q \mu^\top$ (unit vectors); commitment (1.1, 1.2, 1.8) | (T, K) |
# | `indices = distribution(dists, wsz)` | each cluster's top $W$ tokens: the windows (1.3) | (K, W) |
# | `batched_index_select`, `reshape_with_window` | each window's queries, unit keys, values | (K, W, D) |
# | `dots = ... * d ** -0.5`, `masked_fill_` | $q_i \cdot \hat k_j / \sqrt D$; causal; self last (1.4) | (K, W, W) |
# | `dots.softmax(dim=-1)`, `einsum` | softmax inside each window, times the values (1.4) | (K, W, D) |
# | `scatter_mean(out, so, indices, -2)` | each token's mean over its windows, $\varepsilon = 10^{-5}$ (1.5) | (T, D) |
# | `Kmeans.update()`, after the backward pass | centroids move by an EMA of their members (1.6) | (K, D) |
#
# The port's choices differ from section 1.4 in four places (docs/algorithm.md#1-one-routing-head):
# L2 normalisation, raw queries against unit keys divided by $\sqrt D$, the self rule and $\varepsilon$.
# `crosscheck.port_conventions()` names them. The same steps, with those choices:

# %%
port = {name: value for name, value in crosscheck.port_conventions().items()
        if name in ("norm", "logits", "self_attend", "combine_eps")}  # the four that routing_attention takes
qu = q / np.linalg.norm(q, axis=1, keepdims=True)  # (T, D): F.normalize, unit queries and keys
mu_u = kmeans.init_state(1, K, D, rng=np.random.default_rng(2), init="data", points=lib(qu), norm="l2",
                         dtype=np.float64)["means"][0]  # (K, D), unit centroids
dists = qu @ mu_u.T  # (T, D) @ (D, K) -> (T, K)
indices = np.argsort(-dists.T, axis=1, kind="stable")[:, :W]  # (K, W): top-W, best first (the port's order)
qw, kw, vw = q[indices], qu[indices], v[indices]  # each (K, W, D)
dots = qw @ kw.transpose(0, 2, 1) / np.sqrt(D)  # (K, W, D) @ (K, D, W) -> (K, W, W)
dots = np.where(indices[:, :, None] >= indices[:, None, :], dots, -np.inf)  # causal by original position
dots = np.where(indices[:, :, None] == indices[:, None, :], SELF_LOGIT, dots)  # itself: only as a last resort
weights = np.exp(dots - dots.max(axis=2, keepdims=True))  # (K, W, W)
bo = (weights / weights.sum(axis=2, keepdims=True)) @ vw  # (K, W, W) @ (K, W, D) -> (K, W, D)
summed = np.zeros((T, D))
np.add.at(summed, indices.reshape(-1), bo.reshape(K * W, D))  # (K*W, D) added onto (T, D)
out_port = summed / (np.bincount(indices.reshape(-1), minlength=T) + 1e-5)[:, None]  # (T, D) scatter-mean

out_ours = attention.routing_attention(lib(q), None, lib(v), mu_u[None], window_size=W, **port)[0][0, 0]
assert np.allclose(out_port, out_ours, rtol=1e-10, atol=1e-12)
print("the port's steps by hand == routing_attention(**port_conventions())")

try:
    import torch
    from routing_transformer.routing_transformer import KmeansAttention
except ImportError:
    print("torch / routing-transformer not installed: the check against the port itself is skipped")
else:
    module = KmeansAttention(K, W, 1, D, causal=True, shared_qk=True, dropout=0.0).double().eval()
    module.kmeans.means.data.copy_(torch.from_numpy(mu_u[None]))  # our centroids, (H, K, D)
    module.kmeans.initted.data.fill_(True)  # otherwise it replaces them from the first batch
    with torch.no_grad():
        out_torch = module(*map(torch.from_numpy, (lib(q), lib(q), lib(v))))[0][0, 0].numpy()  # (T, D)
    assert np.allclose(out_port, out_torch, rtol=1e-10, atol=1e-12)
    print("the port's KmeansAttention == the same steps by hand")

# %%
fig, ax = plt.subplots(figsize=(12, 2.6))
in_window = (indices[:, :, None] == np.arange(T)).any(axis=1)  # (K, W, T) -> (K, T)
grid = np.where(in_window[..., None], np.array(colors)[topic], 1.0)  # (K, T, 3): topic colour where held, white
ax.imshow(grid, aspect="auto", interpolation="nearest")
for c in np.flatnonzero(np.isin(indices, query).any(axis=1)):
    ax.plot(query, c, marker="*", color="k", markersize=12)
ax.set(xlabel="position", ylabel="cluster", yticks=range(K), xticks=range(0, T + 1, 12),
       title=f"The {K} windows of one routing head, W = {W} tokens each (colour: topic; star: query {query})")
fig.legend([Patch(color=c) for c in colors], [f"topic {t}" for t in range(K)], loc="center right")
fig.tight_layout(rect=(0, 0, 0.9, 1))
fig.savefig(FIG_DIR / "06_windows.png", dpi=100)
plt.show()
held = np.bincount(indices.reshape(-1), minlength=T)  # (T,)
purity = [np.bincount(topic[r]).max() / W for r in indices]  # (K,): share of each window's main topic
print("windows' main-topic share:", np.round(purity, 2), "| positions held by 0 / 1 / 2+ windows:",
      (held == 0).sum(), "/", (held == 1).sum(), "/", (held >= 2).sum())
assert sorted(purity)[1] == 1.0 and np.isin(np.flatnonzero(topic == 3), indices[np.argmin(purity)]).all()

# %% [markdown]
# Each row is one cluster's window: exactly $W = 24$ coloured cells, spread over the whole sequence.
# Three rows are a single colour, one topic each. The fourth holds all 10 tokens of the rarest topic and
# must still take 24, so it fills up with others: balanced membership gives every cluster $W$ members,
# whatever the data. A query attends, causally, to the earlier cells of the rows that hold it. An empty
# column is a token no cluster took (this head gives it 0; the local heads and the residual stream carry
# it); a column coloured twice gets the mean of two outputs. Each window is the top $W$ of the **whole**
# sequence, so a later token can change it: the leak of section 1.5.

# %% [markdown]
# ## 3. The comparison: these attentions, trained
#
# `python -m rt_numpy compare` trains one small model (width 64, 2 layers, 4 heads, 181k parameters) per
# arm; only two heads of the last layer change: local, balanced routing, strided, LSH, nearest routing, or
# dense everywhere, at about 48 keys per query (docs/results.md). Tasks: next byte of Wikipedia XML,
# associative recall (chance 0.1), next pixel of tiled digits; three seeds each.
# `docs/results/compare_summary.json` keeps the final held-out number of every arm and seed.

# %%
SUMMARY = Path(rt_numpy.__file__).resolve().parents[1] / "docs" / "results" / "compare_summary.json"
summary = json.loads(SUMMARY.read_text())
print(summary["date"], "|", summary["machine"])
tasks = summary["tasks"]
fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
for ax, (task, t) in zip(axes, tasks.items()):
    arms = list(t["arms"])
    values = np.array([t["arms"][a] for a in arms])  # (arms, seeds)
    x = np.arange(len(arms))
    for s, marker in zip(range(values.shape[1]), "os^"):
        ax.scatter(x + 0.15 * (s - 1), values[:, s], marker=marker, s=22, alpha=0.6, label=f"seed {s}")
    ax.errorbar(x, values.mean(axis=1), yerr=values.std(axis=1, ddof=1), fmt="_", color="k", markersize=16,
                capsize=5, label="mean ± sd over seeds")
    if "chance" in t:
        ax.axhline(t["chance"], color="grey", linestyle=":", label="chance")
    ax.set(xticks=x, xticklabels=arms, xlabel="arm", ylabel=f"held-out {t['metric'].replace('_', ' ')} ({t['unit']})",
           title=f"{task}: T = {t['T']}, {t['steps']} steps ({t['better']} is better)")
handles, labels = axes[1].get_legend_handles_labels()
fig.legend(handles, labels, loc="lower center", ncol=len(labels))
fig.suptitle(f"The comparison of {summary['date']}: the final held-out metric of every arm and seed")
fig.tight_layout(rect=(0, 0.07, 1, 1))
fig.savefig(FIG_DIR / "06_comparison.png", dpi=100)
plt.show()

# %% [markdown]
# Each dot is one seed; the black bar is the mean, and the whisker the sample standard deviation over
# the three seeds. Each panel has its own y scale: compare the whiskers with the gaps between arms, not
# the panels with each other. On text, the three low dots are all seed 1. On recall every arm sits at
# or just under the dotted chance line, and seed 0 is the lowest for all six arms. Against local, in units of the
# pooled seed spread $\sigma = \sqrt{(s_\text{arm}^2 + s_\text{local}^2)/2}$:

# %%
def against_local(t, arm):
    """(mean difference, difference / pooled seed sd) of an arm against the local arm."""
    a, b = np.array(t["arms"][arm]), np.array(t["arms"]["local"])
    pooled = np.sqrt((a.std(ddof=1) ** 2 + b.std(ddof=1) ** 2) / 2)
    return a.mean() - b.mean(), (a.mean() - b.mean()) / pooled


for task, t in tasks.items():
    print(f"{task:7s}", "  ".join(f"{arm} {d:+.3f} ({z:+.2f}σ)" for arm in t["arms"] if arm != "local"
                                  for d, z in [against_local(t, arm)]))

text, recall, images = (tasks[name]["arms"] for name in ("text", "recall", "images"))
gain = np.subtract(text["routing"], text["local"])  # (seeds,): routing - local, per seed
dip = {arm: x[1] - (x[0] + x[2]) / 2 for arm, x in text.items()}  # seed 1 against the arm's other seeds
print("text, routing - local per seed:", gain.round(3), "| seed 1 - mean of seeds 0, 2:",
      {arm: round(d, 2) for arm, d in dip.items()})
assert gain[1] < -0.2 and np.abs(gain[[0, 2]]).max() < 0.02  # the mean gain is one seed's
assert min(dip[a] for a in ("local", "dense", "strided")) > -0.15 > max(dip[a] for a in ("routing", "lsh", "nearest"))
assert max(max(a) for a in recall.values()) < tasks["recall"]["chance"] + 0.005  # every arm, every seed
assert all(abs(against_local(tasks["images"], arm)[1]) < 1 for arm in images if arm != "local")
assert np.ptp([np.mean(x) for x in images.values()]) < 0.01

# %% [markdown]
# **Reading.**
#
# - **Text.** Routing's mean is 0.11 bits/byte below local's, but that is one seed: in seed 1 routing
#   reached 4.40 against local's 4.69; in seeds 0 and 2 it was within 0.02 of local. The gap is 0.9
#   pooled $\sigma$, not a result. Seed 1 also helped LSH (4.32) and nearest routing (4.44), by 0.27 to
#   0.40 against their other seeds; strided gained 0.10 there, local and dense nothing. Dense is 0.02
#   below local at 1.2 $\sigma$: the largest standardised gap, and a small one.
# - **Recall.** Every arm, dense included, is at chance: no seed of any arm beat 0.1 by more than
#   0.004, and every mean (0.083 to 0.090) is below it. Dense attention sees every record and still
#   failed, so the run was too short to learn the task: it says nothing about routing.
#   (`bench/recall.py`, with about ten times the sequences, is where routing learns recall and local not.)
# - **Images.** All five arms are within 0.01 bits/dim of each other and within 1 pooled $\sigma$ of
#   local (strided is the closest, at $-0.98\sigma$). A pixel is predicted from the rows just above it,
#   which local attention already sees.
#
# At 181k parameters and 200 steps the models are still learning byte and pixel statistics, which every
# attention here can see. The paper's margins come from far larger models that have learned them.

# %% [markdown]
# ## 4. Exercises
#
# **Exercise 6.1 (easy): the strided mask.** Write `strided_mask(T, S)`, the (T, T) boolean matrix of
# section 1.2 (True where query $i$ sees key $j$), from the formula alone. It must hold for any $T$,
# including $T$ not a multiple of $S$.

# %%
def strided_mask(T, S):
    """bool (T, T): True where query i sees key j in strided attention with stride S."""
    raise NotImplementedError


# %%
report("Exercise 6.1", ex06.check_strided_mask, strided_mask)

# %% [markdown]
# **Exercise 6.2 (easy): the budget.** docs/algorithm.md#73-the-budget gives the mean number of keys a
# query sees. Write `formula_keys(kind, T, L, W)` for `kind` in `"dense"`, `"local"` (one block of
# look-back, blocks of $L$; count the first block, which has no block before it), `"strided"` ($S = T/W$)
# and `"routing"` ($K = T/W$ windows that do not overlap), assuming $L$ and $W$ divide $T$. The check
# counts the keys of each mask with `baselines.keys_per_query(baselines.visibility(...))`. Then look at
# section 1's `lsh` mask, with chunks of $W' = 12$: it sees 14.5 keys per query, more than the table's
# $W' + 1/2$. Why? (Hint: compare `np.bincount(bucket)` with $W'$.)

# %%
def formula_keys(kind, T, L, W):
    """The mean number of keys per query of `kind`, from the formulas of docs/algorithm.md#73-the-budget."""
    raise NotImplementedError


# %%
report("Exercise 6.2", ex06.check_formula_keys, formula_keys)

# %% [markdown]
# **Exercise 6.3 (medium): LSH's leak.** LSH never shows a query a later key, yet it is not causal: a
# later token that changes bucket shifts the sorted order, and with it the chunk boundaries of earlier
# tokens. Run `causality.certify` on `baselines.lsh_attention` (with `q`, `v`, `rot` and `Wc` of
# section 1.3) and take a failing position $i$ from `cert.failing()`. Then build `q_later`: equal to `q`
# at positions $0..i$, changed only after $i$, such that the LSH outputs at positions $\le i$ change. Return
# `(i, q_later)`, and print which earlier query's visible keys changed (compare two `visibility` rows).

# %%
def lsh_leak(q, v, rot, chunk_size):
    """(i, q_later): q_later equals q at positions <= i, and the LSH outputs at positions <= i differ."""
    raise NotImplementedError


# %%
report("Exercise 6.3", ex06.check_lsh_leak, lsh_leak, q, v, rot, Wc)

# %% [markdown]
# **Exercise 6.4 (open): query clustering.** Another content-based choice: run k-means on the queries of
# the sequence itself (no trained centroids), and let each query attend, causally, to the keys of its own
# cluster (a key joins the cluster of its nearest centroid). Write
# `clustered_attention(q, k, v, num_clusters)` (q, k (T, D), v (T, Dv); logits $q \cdot k / \sqrt D$;
# deterministic: seed any randomness inside), and decide whether it is causal: `is_causal`. The check
# tests one cluster against dense attention, that no weight lands on a later key, and your verdict
# against `causality.certify`. Then: what would make it causal, and what would that cost?

# %%
def clustered_attention(q, k, v, num_clusters):
    """Causal attention of each query to the keys of its own cluster, from k-means of the queries."""
    raise NotImplementedError


is_causal = None  # True or False: your verdict

# %%
report("Exercise 6.4", ex06.check_query_clustering, clustered_attention, is_causal)

# %% [markdown]
# ## Summary
#
# - Each attention here is softmax attention under its mask, `baselines.visibility(kind, T, ...)`.
# - **Local** and **strided** choose by position: strictly causal, blind to content. **LSH** (random
#   hashes) and **routing** (trained centroids) choose by content; both picked same-topic keys more often
#   than chance here, routing far more, and neither is strictly causal (docs/algorithm.md#3-the-causal-leak).
# - The port's `KmeansAttention` is section 2's head: top-$W$ windows, attention inside, mean back.
# - Trained small, no attention beat local beyond the seed spread (section 3).
