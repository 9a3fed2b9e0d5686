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
# # Tutorial 1: online k-means, the router of the Routing Transformer
#
# Dense self-attention compares every query with every key: T² dot products per head.
# The Routing Transformer (Roy et al., arXiv:2003.05997, section 4) spends that budget only where
# it is likely to matter. Every routing head owns **K centroids**, shared by its queries and keys.
# Each query and key is compared with the centroids, the tokens are grouped by cluster, and attention
# runs only *inside* each cluster. If a query and a key are close to the same centroid, their dot
# product is probably large, so they probably attend to each other.
#
# The centroids are not learned by gradient descent. They follow the queries and keys with
# **online mini-batch k-means**: after every training step each centroid moves a little towards the
# average of the vectors that were assigned to it (an exponential moving average, EMA).
# This notebook builds that update from scratch, checks it against `rt_numpy.kmeans`, and looks at
# what can go wrong.
#
# Shapes, with the letters of docs/algorithm.md#alphabet:
#
# | array | shape | meaning |
# |---|---|---|
# | points (queries or keys) | (B, H, T, D) | batch, heads, positions, head dim |
# | centroids `means` | (H, K, D) | one set of K centroids per head |
# | `counts` | (H, K) | EMA of how many points each cluster received |
# | `sums` | (H, K, D) | EMA of the sum of those points |
#
# Head h of the points only ever meets head h's centroids, so everything below is "one head, done H
# times at once". The first part uses H = 1 and D = 2 so that we can draw it.

# %%
import os
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from rt_numpy import kmeans

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # without ipywidgets, tqdm.auto falls back to text bars and warns
    from tqdm.auto import trange

FAST = os.environ.get("RT_NUMPY_FAST") == "1"  # CI knob: fewer steps and smaller batches
FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_01_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=4, suppress=True)
print("FAST =", FAST, "| figures saved in", FIG_DIR)

# %% [markdown]
# ## 1. Two-dimensional points on the unit circle
#
# Routing compares vectors by their **dot product** after normalising them (docs/algorithm.md#11-normalise,
# docs/algorithm.md#12-similarities). With unit vectors, the largest dot product is the smallest angle, so this is
# *spherical* k-means: the data live on a sphere and only directions matter. In 2-D the sphere is
# the unit circle, which we can plot.
#
# We draw raw 2-D vectors from four Gaussian clouds ("topics") and l2-normalise them with the
# library's `normalize(x, "l2")`, which projects every vector onto the circle.

# %%
TOPIC_ANGLES = np.deg2rad([30, 120, 200, 290])
TOPIC_DIRS = np.stack([np.cos(TOPIC_ANGLES), np.sin(TOPIC_ANGLES)], axis=-1)  # (4, 2)


def circle_points(n, rng):
    """n raw 2-D vectors from the four clouds, and their projections on the unit circle."""
    topic = rng.integers(len(TOPIC_DIRS), size=n)  # (n,)
    raw = 1.5 * TOPIC_DIRS[topic] + 0.6 * rng.standard_normal((n, 2))  # (n, 2)
    return raw, kmeans.normalize(raw, "l2")  # (n, 2), (n, 2) with norm 1


rng = np.random.default_rng(0)
N_POINTS = 500 if FAST else 2000
raw, pts = circle_points(N_POINTS, rng)  # (N, 2), (N, 2)
print("norms after l2:", np.linalg.norm(pts, axis=1)[:5])

# %%
theta = np.linspace(0, 2 * np.pi, 200)


def draw_circle(ax):
    ax.plot(np.cos(theta), np.sin(theta), color="0.7", lw=1)
    ax.set_aspect("equal")


fig, ax = plt.subplots(figsize=(5, 5))
ax.scatter(raw[:, 0], raw[:, 1], s=3, color="0.8", label="raw vectors")
ax.scatter(pts[:, 0], pts[:, 1], s=3, color="C0", label="l2-normalised")
draw_circle(ax)
ax.legend(loc="lower left")
ax.set_title("Normalising keeps only the direction")
fig.savefig(FIG_DIR / "01_circle_points.png", dpi=100)
plt.show()

# %% [markdown]
# ### Lloyd's algorithm (batch spherical k-means)
#
# The classic algorithm sees **all** the data at every iteration:
#
# 1. assign every point to the centroid with the largest dot product;
# 2. replace each centroid by the normalised sum of its points (an empty cluster keeps its centroid).
#
# We start the four centroids bunched on one side of the circle so that they have somewhere to go.

# %%
K2 = 4
init_angles = np.deg2rad([0, 40, 80, 160])
init_means = np.stack([np.cos(init_angles), np.sin(init_angles)], axis=-1)  # (K, 2)


def lloyd_step(x, means):
    """One Lloyd iteration of spherical k-means on all points x (N, D)."""
    a = np.argmax(x @ means.T, axis=1)  # (N, D) @ (D, K) -> (N, K) -> (N,)
    sums = np.zeros_like(means)  # (K, D)
    np.add.at(sums, a, x)  # sums[a[i]] += x[i]
    length = np.linalg.norm(sums, axis=1, keepdims=True)  # (K, 1)
    return np.where(length > 0, sums / np.maximum(length, 1e-12), means)  # (K, D)


lloyd_path = [init_means]
for _ in range(10):
    lloyd_path.append(lloyd_step(pts, lloyd_path[-1]))
lloyd_path = np.stack(lloyd_path)  # (iters + 1, K, 2)

# %% [markdown]
# ### Online mini-batch k-means with an EMA
#
# A Transformer never sees "all the data": it sees one mini-batch per training step, and the queries
# themselves change as the model trains. So the router keeps **running statistics** per cluster and
# nudges them every step. This is the update of the official code (docs/algorithm.md#16-centroid-update, the
# VQ-VAE style EMA), with decay λ and smoothing ε:
#
# * count what arrived in this batch: N_c points, summing to S_c;
# * `n_c ← λ n_c + (1−λ) N_c` and `s_c ← λ s_c + (1−λ) S_c` (running count and running sum);
# * Laplace-smooth the counts, only to divide by them: `ñ_c = (n_c + ε) / (Σn + K ε) · Σn`;
# * the centroid is the running average `μ_c = s_c / ñ_c`.
#
# The state starts with `n = 0` and `s = μ₀` (the initial centroids), with no bias correction.
# λ is 0.999 in the paper; here we use 0.9 so that the centroids move visibly within a few dozen
# small steps.

# %%
def ema_step(means, counts, sums, x, decay, eps=1e-5):
    """One online k-means step on a mini-batch x (M, D) for one head, from scratch."""
    K = len(means)
    a = np.argmax(x @ means.T, axis=1)  # (M, D) @ (D, K) -> (M, K) -> (M,)
    onehot = np.eye(K)[a]  # (M, K), row i is 1 at the cluster of point i
    counts = decay * counts + (1 - decay) * onehot.sum(axis=0)  # (K,)
    sums = decay * sums + (1 - decay) * (onehot.T @ x)  # (K, M) @ (M, D) -> (K, D)
    total = counts.sum()
    smoothed = (counts + eps) / (total + K * eps) * total  # (K,), used only to divide
    return sums / smoothed[:, None], counts, sums  # (K, D), (K,), (K, D)


EMA_DECAY_2D = 0.9
STEPS_2D = 40 if FAST else 80
BATCH_2D = 64
batches_2d = np.stack([circle_points(BATCH_2D, rng)[1] for _ in range(STEPS_2D)])  # (steps, M, 2)

means, counts, sums = init_means, np.zeros(K2), init_means.copy()  # (K, 2), (K,), (K, 2)
ema_path = [means]
for x in batches_2d:
    means, counts, sums = ema_step(means, counts, sums, x, EMA_DECAY_2D)
    ema_path.append(means)
ema_path = np.stack(ema_path)  # (steps + 1, K, 2)
print("final counts (≈ points per batch per cluster):", counts)
print("final centroid norms:", np.linalg.norm(ema_path[-1], axis=1))


# %%
def draw_paths(ax, path, title):
    ax.scatter(pts[:, 0], pts[:, 1], s=2, color="0.8")
    draw_circle(ax)
    for c in range(path.shape[1]):
        ax.plot(path[:, c, 0], path[:, c, 1], "-", color=f"C{c}", lw=1.2)
        ax.plot(*path[0, c], "x", color=f"C{c}", ms=9, mew=2)
        ax.plot(*path[-1, c], "o", color=f"C{c}", ms=7)
    ax.set_title(title)


fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
draw_paths(axes[0], lloyd_path, f"Lloyd, all {N_POINTS} points per iteration")
draw_paths(axes[1], ema_path, f"online EMA, {BATCH_2D} points per step, λ={EMA_DECAY_2D}")
fig.suptitle("Centroid trajectories (x = start, o = end)")
fig.savefig(FIG_DIR / "01_trajectories.png", dpi=100)
plt.show()

# %% [markdown]
# What to notice:
#
# * Lloyd jumps straight to the cluster directions and then stops moving; it needs the whole data set
#   at every iteration.
# * The EMA path wanders because every step sees a different small batch, and it ends *inside* the
#   circle: an average of unit vectors is shorter than 1 (the more spread the cloud, the shorter).
#   The official code uses these stored centroids as they are, without re-normalising them.
# * The first EMA steps overshoot, sometimes outside the circle. That is the missing bias
#   correction: after one step `μ = (λ μ₀ + (1−λ) S) / ((1−λ) N)`, i.e. the batch mean plus
#   `λ / ((1−λ) N)` times the initial centroid. The initial sum acts as a prior that fades as λᵗ.

# %% [markdown]
# ## 2. One EMA step by hand, against the library
#
# The library does the same thing for all heads at once, split into two calls:
# `cluster_stats(points, means)` during the forward pass (where did each point go?) and
# `update_state(state, stats)` after it. `kmeans_step` is the two together.
# Points are (B, H, T, D); a stream axis S in front of the statistics holds queries and keys
# separately (here one stream).
#
# First: the whole from-scratch trajectory above equals the library's.

# %%
state = kmeans.state_from_means(init_means[None])  # means (1, K, 2): H = 1
for step, x in enumerate(batches_2d):
    state, _ = kmeans.kmeans_step(state, x[None, None], ema_decay=EMA_DECAY_2D)  # x (M, 2) -> (B=1, H=1, T=M, 2)
    assert np.allclose(state["means"][0], ema_path[step + 1], rtol=1e-12, atol=1e-12)
print("library trajectory == from-scratch trajectory over", STEPS_2D, "steps")

# %% [markdown]
# Now one step spelled out on a state that has history (counts are not zero), with a batch laid
# out as (B, H, T, D) = (4, 1, 16, 2). Every intermediate is printed so that you can follow it.

# %%
state = kmeans.state_from_means(init_means[None])
for x in batches_2d[:5]:
    state, _ = kmeans.kmeans_step(state, x[None, None], ema_decay=EMA_DECAY_2D)  # five steps of history

batch = batches_2d[5].reshape(4, 1, 16, 2)  # (M, 2) -> (B, H, T, D)
lam, eps = EMA_DECAY_2D, 1e-5
mu = state["means"][0]  # (K, 2), centroids at the start of the step
print("counts carried in from earlier steps:", state["counts"][0])

flat = batch[:, 0].reshape(-1, 2)  # (B, T, D) -> (B*T, D): counts sum over batch and positions
assign = np.argmax(flat @ mu.T, axis=1)  # (B*T, D) @ (D, K) -> (B*T,)
N_c = np.bincount(assign, minlength=K2)  # (K,)
S_c = np.stack([flat[assign == c].sum(axis=0) for c in range(K2)])  # (K, D)
n = lam * state["counts"][0] + (1 - lam) * N_c  # (K,)
s = lam * state["sums"][0] + (1 - lam) * S_c  # (K, D)
n_smooth = (n + eps) / (n.sum() + K2 * eps) * n.sum()  # (K,)
mu_new = s / n_smooth[:, None]  # (K, D)
print("N_c =", N_c, "\nn   =", n, "\nñ   =", n_smooth, "\nμ   =\n", mu_new)
print("(ñ - n) / n =", [f"{v:.1e}" for v in (n_smooth - n) / n], "(smoothing matters only near n = 0: section 5)")

# %%
stats = kmeans.cluster_stats(batch, state["means"], impl="ref")
new_state = kmeans.update_state(state, stats, ema_decay=lam, laplace_eps=eps)

assert np.array_equal(stats["assignments"][0, :, 0].reshape(-1), assign)  # (S, B, H, T) -> (B*T,)
assert np.array_equal(stats["counts"][0, 0], N_c)
assert np.allclose(stats["sums"][0, 0], S_c, rtol=1e-13, atol=1e-15)
assert np.array_equal(new_state["counts"][0], n)
assert np.allclose(new_state["sums"][0], s, rtol=1e-13, atol=1e-15)
assert np.allclose(new_state["means"][0], mu_new, rtol=1e-13, atol=1e-15)
print("by hand == cluster_stats + update_state")

# %% [markdown]
# The library has two implementations of `cluster_stats`: `impl="ref"`, the readable NumPy code that
# builds the full (B, H, T, K) similarity matrix, and `impl="numba"`, a compiled loop that never
# stores it. They must agree: the same assignments and counts, and sums equal up to the order of
# the additions.

# %%
fast = kmeans.cluster_stats(batch, state["means"], impl="numba")
assert np.array_equal(fast["assignments"], stats["assignments"])
assert np.array_equal(fast["counts"], stats["counts"])
assert np.allclose(fast["sums"], stats["sums"], rtol=1e-12, atol=1e-15)
print("numba == ref")

# %% [markdown]
# ## 3. High-dimensional unit vectors: initialisation and the commitment loss
#
# Real heads have D = 64 or more. We make fake queries for H = 2 heads: each token belongs to one of
# K hidden "topics" (a random direction per head and topic, with *unequal* frequencies, as words
# are), plus a lot of noise. Two normalisations exist (docs/algorithm.md#11-normalise):
#
# * `norm="ln"` (official): a parameter-free layer norm, so every vector has norm ≈ √D;
# * `norm="l2"` (PyTorch port): unit vectors.
#
# And two initialisations (item 7):
#
# * `init="normal"` (official): normalised Gaussian draws, unrelated to the data;
# * `init="data"` (port): K of the data points, then a few Lloyd iterations.

# %%
B, H, T, D, K = (2, 2, 128, 64, 8) if FAST else (4, 2, 256, 64, 8)
TOPIC_FREQ = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])  # (K,), unequal on purpose
topics = np.random.default_rng(1).standard_normal((H, K, D))  # (H, K, D)
heads = np.arange(H)[None, :, None]  # (1, H, 1), pairs each token with its head


def token_batch(rng, noise=1.5):
    """Raw, un-normalised fake queries (B, H, T, D) and the topic of each token (B, H, T)."""
    z = rng.choice(K, size=(B, H, T), p=TOPIC_FREQ)  # (B, H, T)
    return topics[heads, z] + noise * rng.standard_normal((B, H, T, D)), z  # (B, H, T, D), (B, H, T)


x_ln = kmeans.normalize(token_batch(np.random.default_rng(2))[0], "ln")  # (B, H, T, D)
print("ln norms ≈ sqrt(D) =", np.sqrt(D), ":", np.linalg.norm(x_ln, axis=-1)[0, 0, :4])

# %% [markdown]
# The **commitment loss** (item 8) measures how far each point is from its nearest centroid:
# `β · mean over elements of (x̂ − μ_{a(x)})²`. In training it is added to the language-model loss
# with β = `commitment` = 1e-4, and its gradient pulls the queries towards their centroids (the
# centroids themselves get no gradient; they move only by the EMA). With `commitment=1.0` it is
# simply the mean squared distance, the quantity k-means minimises, so it is our training curve.
# Note "mean over elements": a mean over B·H·T·D numbers, not over B·H·T squared norms.

# %%
state0 = kmeans.init_state(H, K, D, rng=np.random.default_rng(3), init="normal", norm="ln", dtype=np.float64)
loss = kmeans.commitment_loss(x_ln, state0["means"], commitment=1.0)
nearest_mu = state0["means"][heads, kmeans.nearest(x_ln, state0["means"])]  # (H, K, D) gathered -> (B, H, T, D)
assert np.isclose(loss, np.mean((x_ln - nearest_mu) ** 2))
print("commitment loss at init (commitment=1.0):", loss)

# %% [markdown]
# The training loop: a fresh batch every step, the loss measured with the centroids at the start of
# the step, then one `kmeans_step`. λ = 0.99 here to keep the notebook short; 0.999 (the paper) just
# takes about ten times more steps.

# %%
DECAY = 0.99
STEPS = 60 if FAST else 200


def train(norm, init, steps=STEPS, seed=4):
    """Online k-means on a stream of fake query batches; returns the final state and the losses."""
    data_rng = np.random.default_rng(seed)  # the same batches for every run
    first = kmeans.normalize(token_batch(data_rng)[0], norm)  # (B, H, T, D)
    state = kmeans.init_state(H, K, D, rng=np.random.default_rng(seed + 1), init=init, norm=norm,
                              dtype=np.float64, points=first if init == "data" else None)
    losses = []
    for _ in trange(steps, desc=f"{norm}/{init}", leave=False, mininterval=0.5):
        x = kmeans.normalize(token_batch(data_rng)[0], norm)  # (B, H, T, D)
        losses.append(kmeans.commitment_loss(x, state["means"], commitment=1.0))
        state, _ = kmeans.kmeans_step(state, x, ema_decay=DECAY, norm=norm)
    return state, np.array(losses)


runs = {(norm, init): train(norm, init) for norm in ("ln", "l2") for init in ("normal", "data")}

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, norm in zip(axes, ("ln", "l2")):
    for init in ("normal", "data"):
        ax.plot(runs[norm, init][1], label=f'init="{init}"')
    ax.set_yscale("log")
    ax.yaxis.set_minor_formatter(plt.NullFormatter())  # keep the log axis readable
    ax.set_xlabel("step")
    ax.set_title(f'norm="{norm}"')
    ax.legend()
axes[0].set_ylabel("commitment loss, commitment=1.0")
fig.suptitle("Mean squared distance to the nearest centroid")
fig.savefig(FIG_DIR / "01_commitment.png", dpi=100)
plt.show()
for (norm, init), (_, losses) in runs.items():
    scale = D if norm == "l2" else 1  # ln vectors are sqrt(D) times longer: squared distances D times larger
    print(f"{norm}/{init:6s}: first {losses[0]:.4f}, last {losses[-1]:.4f}, last x {scale} = {losses[-1] * scale:.3f}")

# %% [markdown]
# * The data start begins lower: its centroids are already on the data.
# * The loss can go *up* at step 1 (clearly for the data start; note the log scale): the missing
#   bias correction again (section 1). After the first step a centroid is the batch mean of its
#   N_c points *plus* `λ / ((1−λ) N_c)` times its initial value. With λ = 0.99 and a few dozen points per cluster
#   that is several times the initial centroid: far too long a vector, until the initial sum fades
#   as λᵗ. The fewer points per cluster per step, the bigger the overshoot.
# * The loss does not go to zero. It flattens at the spread of the points around their centroid,
#   which the noise sets. The two normalisations give the same curve up to the factor D.

# %% [markdown]
# ## 4. Nearest versus balanced membership
#
# Once the centroids are trained, which tokens attend together? Two rules (docs/algorithm.md#13-membership):
#
# * `nearest`: every token joins its nearest centroid. Cluster sizes follow the data, so a popular
#   topic makes one huge cluster, and attention cost grows with the square of that size.
# * `balanced_membership(points, means, W)` (paper and both codes): every cluster takes the W tokens
#   that score highest for it, over the whole sequence. Sizes are exactly W, so the cost is a
#   fixed K·W² per head; the price is that a token can be picked by several clusters or by none.

# %%
state_ln = runs["ln", "data"][0]
x, z = token_batch(np.random.default_rng(5))
x = kmeans.normalize(x, "ln")  # (B, H, T, D)
W = T // K  # K·W = T: on average one cluster per token

a = kmeans.nearest(x, state_ln["means"])  # (B, H, T)
members = kmeans.balanced_membership(x, state_ln["means"], W)  # (B, H, K, W) positions
nearest_sizes = np.bincount(a[0, 0], minlength=K)  # (K,) for batch 0, head 0
print("nearest sizes :", nearest_sizes, "(sum", nearest_sizes.sum(), ")")
print("balanced sizes:", [len(set(row)) for row in members[0, 0]], "(W =", W, ")")
assert np.all(np.diff(members, axis=-1) > 0)  # each window: distinct positions, sorted

# %%
times_picked = np.zeros((B, H, T), dtype=int)
np.add.at(times_picked, (np.arange(B)[:, None, None, None], heads[..., None], members), 1)  # (B, H, T)
assert times_picked.sum() == B * H * K * W

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].bar(np.arange(K) - 0.2, nearest_sizes, width=0.4, label="nearest")
axes[0].bar(np.arange(K) + 0.2, np.full(K, W), width=0.4, label="balanced")
axes[0].set_xlabel("cluster")
axes[0].set_ylabel("tokens (batch 0, head 0)")
axes[0].legend()
axes[0].set_title("Cluster sizes")
axes[1].bar(*np.unique(times_picked, return_counts=True))
axes[1].set_xlabel("number of clusters a token belongs to (balanced)")
axes[1].set_ylabel("tokens (all batches and heads)")
axes[1].set_title(f"Balanced membership, W = T/K = {W}")
fig.savefig(FIG_DIR / "01_membership.png", dpi=100)
plt.show()
print("fraction of tokens in no cluster:", np.mean(times_picked == 0))

# %% [markdown]
# Under `nearest` every token is in exactly one cluster. Under `balanced`, tokens of frequent topics
# overflow their cluster's window and some are dropped (they get nothing from this routing head;
# local heads and the residual carry them), while small clusters fill their window with tokens that
# another cluster already took.
#
# **Balanced membership is not causal.** Cluster c takes the top W tokens *of the whole sequence*,
# so whether token j is in cluster c depends on tokens after j: a later token that scores higher can
# push j out. Even with a perfect position mask inside each cluster, the output at position i can
# change when a token after i changes (docs/algorithm.md#3-the-causal-leak). Both published implementations
# train this way. `nearest` does not have the problem: a token's cluster depends on that token alone.
# Tutorial 2 measures the leak. A two-line glimpse: make the last token a copy of centroid 0
# and see who gets evicted.

# %%
x_changed = x.copy()
x_changed[0, 0, -1] = kmeans.normalize(state_ln["means"][0, 0], "ln")  # only the last token changes
members_changed = kmeans.balanced_membership(x_changed, state_ln["means"], W)  # (B, H, K, W)
print("evicted from cluster 0:", sorted(set(members[0, 0, 0].tolist()) - set(members_changed[0, 0, 0].tolist())),
      "| the changed token is at position", T - 1)

# %% [markdown]
# ## 5. A pitfall of the EMA: clusters that never receive a point
#
# Look at the smoothing once more: `ñ_c = (n_c + ε) / (Σn + K ε) · Σn`. For a cluster that has
# *never* received a point, `n_c = 0`, so `ñ_c ≈ ε · Σn / Σn = ε = 1e-5`. Its running sum, meanwhile,
# still holds `λᵗ μ₀` from the initialisation, so its centroid becomes `λᵗ μ₀ / ε`, about 10⁵ times
# too long (the Notes of `update_state` say so). This is the official behaviour. What happens next
# depends on the direction of μ₀:
#
# * if some points have a positive dot product with μ₀, the giant centroid wins *all* of them at the
#   next step, and the cluster is revived (brutally);
# * if all points are on the other side, it loses every comparison forever and stays huge.
#
# A small 2-D example: points within 40° of the x-axis, four centroids at 0°, 20°, 80° and 200°.

# %%
def arc_batch(rng, m=64):
    """m unit vectors at angles uniform in [-40°, 40°], as (B=1, H=1, T=m, D=2)."""
    angle = np.deg2rad(rng.uniform(-40, 40, m))  # (m,)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)[None, None]  # (m, 2) -> (1, 1, m, 2)


start = np.deg2rad([0, 20, 80, 200])
start_means = np.stack([np.cos(start), np.sin(start)], axis=-1)[None]  # (H=1, K=4, 2)
for update in ("ema", "spherical"):
    rng = np.random.default_rng(6)
    state = kmeans.state_from_means(start_means)
    print(f'centroid_update="{update}"')
    for step in range(5):
        state, stats = kmeans.kmeans_step(state, arc_batch(rng), centroid_update=update, ema_decay=0.9, norm="l2")
        print(f"  step {step}: points received {stats['counts'][0, 0]}, "
              f"centroid norms after {np.linalg.norm(state['means'][0], axis=-1)}")

# %% [markdown]
# With `centroid_update="ema"` the 80° centroid receives nothing at step 0, its norm jumps to about
# λ/ε = 9·10⁴, and at step 1 it takes every point with a positive dot product (most of the batch);
# having received points, it is back to a normal length. The 200° centroid faces away from all
# points: it stays at about λᵗ/ε, shrinking by a factor e only every 1/(1−λ) steps (1000 steps with
# the paper's λ = 0.999). It never wins under `nearest`, so it is a wasted cluster whose centroid is
# 10⁴–10⁵ times too long. `init="data"` starts every centroid on the data, which makes such
# never-used clusters less likely.
#
# With `centroid_update="spherical"` (the PyTorch port), an empty cluster simply keeps its centroid: no
# explosion, but also no revival; the 80° and 200° centroids are dead weight.

# %% [markdown]
# ## Summary
#
# * The router is spherical k-means on normalised queries and keys, one set of K centroids per head.
# * The centroids follow mini-batches with an EMA of counts and sums; the Laplace-smoothed count is
#   only a divisor. Your from-scratch step equals `cluster_stats` + `update_state`, and the Numba
#   path equals the reference.
# * The commitment loss is the k-means objective, a mean over elements, scaled by β = 1e-4 in
#   training.
# * `balanced` membership fixes the cost (exactly W per cluster) but drops some tokens, duplicates
#   others, and is not causal; `nearest` is causal but its cluster sizes follow the data.
