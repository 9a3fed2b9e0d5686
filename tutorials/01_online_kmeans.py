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
# Dense self-attention compares every query with every key: $T^2$ dot products per head.
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
# what can go wrong. It ends with three exercises. Running it takes under a minute; reading it, about
# an hour.
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
from checks import ex01, report

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
# library's `normalize(x, "l2")`, which projects every vector onto the circle:
#
# $$\hat x = \frac{x}{\max(\lVert x\rVert,\ 10^{-12})}.$$

# %%
TOPIC_DEG = np.array([30, 120, 200, 290])  # the true directions, in degrees
TOPIC_DIRS = np.stack([np.cos(np.deg2rad(TOPIC_DEG)), np.sin(np.deg2rad(TOPIC_DEG))], axis=-1)  # (4, 2)


def circle_points(n, rng):
    """n raw 2-D vectors from the four clouds, their projections on the unit circle, and their topics."""
    topic = rng.integers(len(TOPIC_DIRS), size=n)  # (n,)
    raw = 1.5 * TOPIC_DIRS[topic] + 0.6 * rng.standard_normal((n, 2))  # (n, 2)
    return raw, kmeans.normalize(raw, "l2"), topic  # (n, 2), (n, 2) with norm 1, (n,)


rng = np.random.default_rng(0)
N_POINTS = 500 if FAST else 2000
raw, pts, pts_topic = circle_points(N_POINTS, rng)  # (N, 2), (N, 2), (N,)
print("norms after l2:", np.linalg.norm(pts, axis=1)[:5])

# %% [markdown]
# The left panel draws only 300 of the points, half transparent, so that they do not merge into a solid
# ring: the raw vectors (small dots) and their normalised copies on the circle, coloured by the topic that
# produced them, with the four true directions as black stars. The right panel counts all the normalised
# points by angle, with the true directions as dashed lines. Normalising throws the length away but keeps
# the four groups. They overlap at their edges, because the clouds are wide.

# %%
theta = np.linspace(0, 2 * np.pi, 200)
SHOW = 300  # points drawn in the 2-D figures


def draw_circle(ax, reach=1.15):
    """The unit circle, the true topic directions (black stars at radius ``reach``), and labelled axes."""
    ax.plot(np.cos(theta), np.sin(theta), color="0.6", lw=1)
    ax.plot(*(reach * TOPIC_DIRS).T, "*", color="k", ms=12, ls="none", label="true direction")  # (4, 2) -> 2 x (4,)
    ax.set_aspect("equal")
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")


fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
for k in range(len(TOPIC_DIRS)):
    mine = pts_topic[:SHOW] == k  # (SHOW,)
    axes[0].scatter(raw[:SHOW][mine, 0], raw[:SHOW][mine, 1], s=4, alpha=0.25, color=f"C{k}")
    axes[0].scatter(pts[:SHOW][mine, 0], pts[:SHOW][mine, 1], s=14, alpha=0.5, color=f"C{k}",
                    label=f"topic {k} ({TOPIC_DEG[k]}°)")
draw_circle(axes[0], reach=1.5)  # at the centres of the raw clouds
axes[0].legend(loc="lower left", fontsize=8)
axes[0].set_title("Raw vectors and their l2-normalised copies")
angles = np.rad2deg(np.arctan2(pts[:, 1], pts[:, 0])) % 360  # (N,) in [0, 360)
axes[1].hist([angles[pts_topic == k] for k in range(len(TOPIC_DIRS))], bins=np.arange(0, 361, 10), stacked=True,
             color=[f"C{k}" for k in range(len(TOPIC_DIRS))])
axes[1].vlines(TOPIC_DEG, 0, axes[1].get_ylim()[1], colors="k", linestyles="--", lw=0.8)
axes[1].set_xticks(np.arange(0, 361, 45))
axes[1].set_xlabel("angle of the normalised vector (degrees)")
axes[1].set_ylabel(f"points (all {N_POINTS}), per 10°")
axes[1].set_title("Angles after normalising: four groups")
fig.tight_layout()
fig.savefig(FIG_DIR / "01_circle_points.png", dpi=100)
plt.show()

# %% [markdown]
# ### Lloyd's algorithm (batch spherical k-means)
#
# The classic algorithm sees **all** the data at every iteration:
#
# 1. assign every point to the centroid with the largest dot product, $a(x) = \arg\max_c\, \hat x \cdot \mu_c$;
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
# nudges them every step (docs/algorithm.md#16-centroid-update). In one step, cluster $c$ receives $N_c$
# points whose sum is $\Sigma_c$. With the decay $\lambda$ (`ema_decay`) and the smoothing $\epsilon$
# (`laplace_eps`), the running count $n_c$ and running sum $s_c$ are updated as
#
# $$n_c \leftarrow \lambda\, n_c + (1-\lambda)\, N_c, \qquad s_c \leftarrow \lambda\, s_c + (1-\lambda)\, \Sigma_c,$$
#
# and the centroid is their ratio, the running average of the points it received:
#
# $$\tilde n_c = \frac{n_c + \epsilon}{\sum_{c'} n_{c'} + K\epsilon}\ \sum_{c'} n_{c'}, \qquad
# \mu_c = \frac{s_c}{\tilde n_c}.$$
#
# Three terms you will meet around this update:
#
# * **VQ-VAE style EMA.** VQ-VAE (van den Oord et al., 2017) is an autoencoder that replaces each encoder
#   output by the nearest vector of a codebook. In its EMA variant the codebook vectors get no gradient:
#   each one is the running sum of the outputs assigned to it, divided by their running count, exactly
#   as above. The router's centroids are that codebook.
# * **Laplace smoothing.** Laplace's rule of succession adds a small amount to every count before
#   dividing by it, so that no count is exactly zero. Here $\epsilon = 10^{-5}$ is added to each $n_c$,
#   and the result is rescaled so that the smoothed counts keep the same total. $\tilde n_c$ is used only
#   as the divisor; the stored $n_c$ stays unsmoothed.
# * **Bias correction.** An EMA that starts at 0 is too small in its first steps: after $t$ steps its
#   weights add up to $1-\lambda^t$, not 1. Adam divides its running averages by $1-\lambda^t$ to undo that.
#   This update has no such correction. Its count starts at $n = 0$ but its sum starts at the initial
#   centroids, $s = \mu_0$, so the early centroids are pulled towards $\mu_0$ (Exercise 1.1 adds the correction).
#
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
    """Centroid paths (x = start, o = end) over points coloured by their nearest final centroid."""
    shown = pts[:SHOW]  # (SHOW, 2)
    owner = np.argmax(shown @ path[-1].T, axis=1)  # (SHOW, 2) @ (2, K) -> (SHOW, K) -> (SHOW,)
    ax.scatter(shown[:, 0], shown[:, 1], s=14, alpha=0.35, c=[f"C{c}" for c in owner])
    draw_circle(ax)
    for c in range(path.shape[1]):
        ax.plot(path[:, c, 0], path[:, c, 1], "-", color=f"C{c}", lw=1.2)
        ax.plot(*path[0, c], "x", color=f"C{c}", ms=9, mew=2)
        ax.plot(*path[-1, c], "o", color=f"C{c}", ms=8, mec="k")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title(title)


fig, axes = plt.subplots(1, 2, figsize=(11, 5.8), layout="constrained")
draw_paths(axes[0], lloyd_path, f"Lloyd, all {N_POINTS} points per iteration")
draw_paths(axes[1], ema_path, f"online EMA, {BATCH_2D} points per step, λ={EMA_DECAY_2D}")
fig.suptitle("Centroid trajectories (x = start, o = end); points coloured by their nearest final centroid")
fig.savefig(FIG_DIR / "01_trajectories.png", dpi=100)
plt.show()

# %% [markdown]
# Each point has the colour of the centroid it ends up closest to, so the circle splits into four
# coloured arcs, one per cluster. Each final centroid (o) sits near a true direction (dashed line).
# What to notice:
#
# * Lloyd jumps straight to the cluster directions and then stops moving; it needs the whole data set
#   at every iteration.
# * The EMA path wanders because every step sees a different small batch, and it ends *inside* the
#   circle: an average of unit vectors is shorter than 1 (the more spread the cloud, the shorter).
#   The library uses these stored centroids as they are, without re-normalising them.
# * The first EMA steps overshoot, sometimes outside the circle. That is the missing bias
#   correction. After one step,
#   $$\mu_c = \frac{\lambda\mu_0 + (1-\lambda)\Sigma_c}{(1-\lambda)N_c}
#   = \frac{\Sigma_c}{N_c} + \frac{\lambda}{(1-\lambda)N_c}\,\mu_0,$$
#   the batch mean plus a multiple of the initial centroid. The initial sum acts as a prior that fades
#   as $\lambda^t$.

# %% [markdown]
# ## 2. One EMA step by hand, against the library
#
# The library does the same thing for all heads at once, split into two calls:
# `cluster_stats(points, means)` during the forward pass (where did each point go?) and
# `update_state(state, stats)` after it. `kmeans_step` is the two together.
# Points are (B, H, T, D). `cluster_stats` can also take queries and keys together, as a list of two
# arrays, which it calls *streams*. Its results therefore have an extra leading axis S, one entry per
# stream. We pass one array, so S = 1 and we take entry `[0]`.
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
stats = kmeans.cluster_stats(batch, state["means"])
new_state = kmeans.update_state(state, stats, ema_decay=lam, laplace_eps=eps)

assert np.array_equal(stats["assignments"][0, :, 0].reshape(-1), assign)  # stream 0, head 0: (B, T) -> (B*T,)
assert np.array_equal(stats["counts"][0, 0], N_c)
assert np.allclose(stats["sums"][0, 0], S_c, rtol=1e-13, atol=1e-15)
assert np.array_equal(new_state["counts"][0], n)
assert np.allclose(new_state["sums"][0], s, rtol=1e-13, atol=1e-15)
assert np.allclose(new_state["means"][0], mu_new, rtol=1e-13, atol=1e-15)
print("by hand == cluster_stats + update_state")

# %% [markdown]
# ## 3. High-dimensional unit vectors: initialisation and the commitment loss
#
# Real heads have D = 64 or more. We make fake queries for H = 2 heads: each token belongs to one of
# K hidden "topics" (a random direction per head and topic, with *unequal* frequencies, as words
# are), plus a lot of noise. Below we look at head 0; head 1 behaves the same. The library offers two
# normalisations (docs/algorithm.md#11-normalise):
#
# * `norm="ln"`: a layer norm without parameters,
#   $\hat x = (x - \bar x) / \sqrt{\operatorname{var}(x) + 10^{-6}}$, with $\bar x$ and $\operatorname{var}(x)$
#   taken over the D entries of the vector. Every vector then has norm $\lVert \hat x\rVert \approx \sqrt D$;
# * `norm="l2"`: unit vectors, $\hat x = x / \max(\lVert x\rVert, 10^{-12})$, as in section 1.
#
# And two initialisations (docs/algorithm.md#17-initialisation):
#
# * `init="normal"`: normalised Gaussian draws, unrelated to the data;
# * `init="data"`: K of the data points, then a few Lloyd iterations.

# %%
B, H, T, D, K = (2, 2, 128, 64, 8) if FAST else (4, 2, 256, 64, 8)
TOPIC_FREQ = np.array([0.3, 0.2, 0.15, 0.1, 0.1, 0.07, 0.05, 0.03])  # (K,), unequal on purpose
topics = np.random.default_rng(1).standard_normal((H, K, D))  # (H, K, D)
heads = np.arange(H)[None, :, None]  # (1, H, 1), pairs each token with its head


def token_batch(rng, batch=B, noise=1.5):
    """Raw, un-normalised fake queries (batch, H, T, D) and the topic of each token (batch, H, T)."""
    z = rng.choice(K, size=(batch, H, T), p=TOPIC_FREQ)  # (batch, H, T)
    return topics[heads, z] + noise * rng.standard_normal((batch, H, T, D)), z  # (batch, H, T, D), (batch, H, T)


x_ln = kmeans.normalize(token_batch(np.random.default_rng(2))[0], "ln")  # (B, H, T, D)
print("ln norms ≈ sqrt(D) =", np.sqrt(D), ":", np.linalg.norm(x_ln, axis=-1)[0, 0, :4])

# %% [markdown]
# The **commitment loss** (docs/algorithm.md#18-commitment-loss) measures how far each point is from its
# nearest centroid. Over the $N = B \cdot H \cdot T$ points,
#
# $$e = \frac{1}{N D}\sum_{x} \big\lVert \hat x - \operatorname{sg}(\mu_{a(x)}) \big\rVert^2, \qquad
# \mathcal L_{\text{commit}} = \beta\, e.$$
#
# In training it is added to the language-model loss with $\beta$ = `commitment` = $10^{-4}$. Its gradient
# pulls the queries towards their centroids. The stop-gradient sg means the centroids themselves get no
# gradient; they move only by the EMA. With `commitment=1.0` the loss is simply the mean squared
# distance, the quantity k-means minimises, so it is our training curve. Note the $\frac{1}{ND}$: a mean
# over all $N \cdot D$ numbers, not over the $N$ squared norms.

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

# %% [markdown]
# Both panels share one linear y axis. ln vectors are $\sqrt D$ times longer than l2 vectors, so their
# squared distances are $D$ times larger; the l2 panel is therefore drawn as $D \times$ its loss. You should
# see the same curves in both panels: a spike at the first update for the data start, then a fast fall
# to a floor near 0.7.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), sharey=True, layout="constrained")
for ax, norm in zip(axes, ("ln", "l2")):
    scale = 1 if norm == "ln" else D  # put l2 on the ln scale
    for init in ("normal", "data"):
        ax.plot(runs[norm, init][1] * scale, label=f'init="{init}"')
    ax.set_ylim(0, None)
    ax.tick_params(labelleft=True)  # sharey would hide the right panel's labels
    ax.grid(alpha=0.3)
    ax.set_xlabel("k-means updates before the loss is measured")
    ax.set_title(f'norm="{norm}"')
    ax.legend()
axes[0].set_ylabel("mean squared distance (commitment=1.0)")
axes[1].set_ylabel("D × mean squared distance")
fig.suptitle("Commitment loss: mean squared distance to the nearest centroid")
fig.savefig(FIG_DIR / "01_commitment.png", dpi=100)
plt.show()
for (norm, init), (_, losses) in runs.items():
    scale = D if norm == "l2" else 1
    print(f"{norm}/{init:6s}: first {losses[0]:.4f}, peak {losses.max():.4f}, last {losses[-1]:.4f}, "
          f"last x {scale} = {losses[-1] * scale:.3f}")

# %% [markdown]
# * The data start begins lower: its centroids are already on the data.
# * The loss can go *up* at the first update (clearly for the data start): the missing bias correction
#   again (section 1). After the first step a centroid is the batch mean of its $N_c$ points *plus*
#   $\frac{\lambda}{(1-\lambda)N_c}$ times its initial value. With λ = 0.99 and a few dozen points per cluster,
#   that is several times the initial centroid: far too long a vector, until the initial sum fades
#   as $\lambda^t$. The fewer points per cluster per step, the bigger the overshoot.
# * The loss does not go to zero. It flattens at the spread of the points around their centroid,
#   which the noise sets. The two normalisations give the same curve up to the factor D.

# %% [markdown]
# ## 4. Nearest versus balanced membership
#
# Once the centroids are trained, which tokens attend together? Two rules (docs/algorithm.md#13-membership):
#
# * `nearest`: every token joins its nearest centroid. Cluster sizes follow the data, so a popular
#   topic makes one huge cluster, and attention cost grows with the square of that size.
# * `balanced_membership(points, means, W)` (the paper's rule): every cluster takes the W tokens
#   that score highest for it, over the whole sequence. Sizes are exactly W, so the cost is a
#   fixed $K W^2$ per head; the price is that a token can be picked by several clusters or by none.

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

# %% [markdown]
# Left: how many tokens each cluster gets under each rule; nearest sizes follow the unequal topic
# frequencies, balanced sizes are all W. Right: under balanced membership, how many clusters each token
# is in. The bar at 0 is the share of tokens that no cluster picked.

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
fig.tight_layout()
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
# change when a token after i changes (docs/algorithm.md#3-the-causal-leak). The paper trains this way.
# `nearest` does not have the problem: a token's cluster depends on that token alone.
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
# Look at the smoothing once more. For a cluster that has *never* received a point, $n_c = 0$, so
#
# $$\tilde n_c = \frac{0 + \epsilon}{\sum_{c'} n_{c'} + K\epsilon}\ \sum_{c'} n_{c'} \approx \epsilon = 10^{-5}.$$
#
# Its running sum, meanwhile, still holds $\lambda^t \mu_0$ from the initialisation, so its centroid becomes
# $\mu_c = \lambda^t \mu_0 / \epsilon$, about $10^5$ times too long (the Notes of `update_state` say so).
# What happens next depends on the direction of $\mu_0$:
#
# * if some points have a positive dot product with $\mu_0$, the giant centroid wins *all* of them at the
#   next step, and the cluster is revived (brutally);
# * if all points are on the other side, it loses every comparison forever and stays huge.
#
# A small 2-D example: points within 40° of the x-axis, four centroids at 0°, 20°, 80° and 200°. We run
# it with the EMA update and, for comparison, with `centroid_update="spherical"`, which moves a centroid
# towards the normalised sum of its points,
# $\mu_c \leftarrow \lambda\mu_c + (1-\lambda)\,\Sigma_c / \lVert\Sigma_c\rVert$, and leaves an empty cluster
# where it is.

# %%
def arc_batch(rng, m=64):
    """m unit vectors at angles uniform in [-40°, 40°], as (B=1, H=1, T=m, D=2)."""
    angle = np.deg2rad(rng.uniform(-40, 40, m))  # (m,)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1)[None, None]  # (m, 2) -> (1, 1, m, 2)


START_DEG = [0, 20, 80, 200]
start = np.deg2rad(START_DEG)
start_means = np.stack([np.cos(start), np.sin(start)], axis=-1)[None]  # (H=1, K=4, 2)
STEPS_5 = 30
pitfall = {}
for update in ("ema", "spherical"):
    rng = np.random.default_rng(6)
    state = kmeans.state_from_means(start_means)
    norms, got = [], []
    for step in range(STEPS_5):
        state, stats = kmeans.kmeans_step(state, arc_batch(rng), centroid_update=update, ema_decay=0.9, norm="l2")
        norms.append(np.linalg.norm(state["means"][0], axis=-1))  # (K,)
        got.append(stats["counts"][0, 0])  # (K,) points received in this step
    pitfall[update] = np.array(norms), np.array(got)  # (steps, K), (steps, K)
    print(f'{update:9s}: points received in step 0: {got[0]}, norms after it: {norms[0]}; '
          f'norms after step {STEPS_5 - 1}: {norms[-1]}')

# %% [markdown]
# Left: the set-up, with the arc of points in grey and the four starting centroids. Middle: each
# centroid's length after every step, on a log scale (solid: EMA, dashed: spherical). Right: the points
# each cluster received per step under the EMA. What you should see: the 80° centroid (green) jumps to
# about $\lambda/\epsilon = 9\cdot10^4$ after step 0, then wins most of the batch at step 1 and comes back
# to a normal length. The 200° centroid (red) stays at about $\lambda^t/\epsilon$ and receives nothing, ever.
# Under the spherical update every length stays at 1, and the 80° and 200° clusters stay empty.

# %%
fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
demo = arc_batch(np.random.default_rng(7), m=200)[0, 0]  # (200, 2), only for the picture
axes[0].scatter(demo[:, 0], demo[:, 1], s=10, alpha=0.4, color="0.5", label="points (±40°)")
axes[0].plot(np.cos(theta), np.sin(theta), color="0.6", lw=1)
for c, deg in enumerate(START_DEG):
    u, v = start_means[0, c]
    axes[0].annotate("", xy=(u, v), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color=f"C{c}", lw=2))
    axes[0].text(1.15 * u, 1.15 * v, f"{deg}°", color=f"C{c}", ha="center", va="center")
axes[0].set_aspect("equal")
axes[0].set_xlim(-1.4, 1.4)
axes[0].set_ylim(-1.4, 1.4)
axes[0].set_xlabel("$x_1$")
axes[0].set_ylabel("$x_2$")
axes[0].legend(loc="lower left", fontsize=8)
axes[0].set_title("Set-up: points and starting centroids")
for c, deg in enumerate(START_DEG):
    axes[1].plot(pitfall["ema"][0][:, c], "-o", ms=3, color=f"C{c}", label=f"{deg}°, EMA")
    axes[1].plot(pitfall["spherical"][0][:, c], "--", color=f"C{c}", label=f"{deg}°, spherical")
    axes[2].plot(pitfall["ema"][1][:, c], "-o", ms=3, color=f"C{c}", label=f"{deg}°")
axes[1].set_yscale("log")
axes[1].set_xlabel("step")
axes[1].set_ylabel("centroid norm after the step (log)")
axes[1].set_title("An empty cluster's centroid explodes")
axes[1].legend(fontsize=7, ncol=2)
axes[2].set_xlabel("step")
axes[2].set_ylabel("points received in the step")
axes[2].set_title("Points per cluster, EMA update")
axes[2].legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG_DIR / "01_empty_cluster.png", dpi=100)
plt.show()

# %% [markdown]
# The 200° centroid faces away from all points. It shrinks only as $\lambda^t$, by a factor e every
# $1/(1-\lambda)$ steps: 10 steps here, 1000 steps with the paper's λ = 0.999. It never wins under `nearest`,
# so it is a wasted cluster whose centroid is $10^4$ to $10^5$ times too long. `init="data"` starts every
# centroid on the data, which makes such never-used clusters less likely. Exercise 1.2 repairs them.

# %% [markdown]
# ## Summary
#
# * The router is spherical k-means on normalised queries and keys, one set of K centroids per head.
# * The centroids follow mini-batches with an EMA of counts and sums; the Laplace-smoothed count is
#   only a divisor. Your from-scratch step equals `cluster_stats` + `update_state`.
# * There is no bias correction: the first steps overshoot, and a cluster that never receives a point
#   gets a centroid about $1/\epsilon$ times too long.
# * The commitment loss is the k-means objective, a mean over elements, scaled by $\beta = 10^{-4}$ in
#   training.
# * `balanced` membership fixes the cost (exactly W per cluster) but drops some tokens, duplicates
#   others, and is not causal; `nearest` is causal but its cluster sizes follow the data.

# %% [markdown]
# ## 6. Exercises
#
# Each exercise has a code cell with a stub to replace and a check cell that says whether your answer is
# right, and why not. The model answers are in `tutorials/solutions/01_online_kmeans.py`; try first.
#
# ### Exercise 1.1 (easy): the bias-corrected EMA
#
# Write `ema_step_corrected`, a version of `ema_step` (section 1) with Adam's bias correction. The running
# count and the running sum now both start at **zero**, and after the $t$-th update ($t = 1, 2, \dots$)
# they are corrected before use:
#
# $$\hat n_c = \frac{n_c}{1-\lambda^t}, \qquad \hat s_c = \frac{s_c}{1-\lambda^t}, \qquad
# \mu_c = \frac{\hat s_c}{\tilde{\hat n}_c},$$
#
# where $\tilde{\hat n}_c$ is the Laplace-smoothed $\hat n_c$. Return the *uncorrected* $n$ and $s$ (the next step
# builds on them) and the corrected counts $\hat n$. A cluster that has received no point yet ($n_c = 0$)
# keeps its centroid. Then answer for yourself: why does the step-1 overshoot vanish, and does the
# $1-\lambda^t$ factor itself change $\mu_c$ much?

# %%
def ema_step_corrected(means, counts, sums, x, decay, t, eps=1e-5):
    """One bias-corrected EMA step for one head.

    means (K, D); counts (K,) and sums (K, D): running EMAs that started at zero; x (M, D); t: 1, 2, ...
    Returns (means (K, D), counts (K,), sums (K, D), counts_hat (K,)).
    """
    raise NotImplementedError


# %%
if report("Exercise 1.1", ex01.check_bias_correction, ema_step_corrected):
    corrected = [init_means]
    c_counts, c_sums = np.zeros(K2), np.zeros((K2, 2))  # (K,), (K, 2)
    for t, x in enumerate(batches_2d, start=1):
        c_means, c_counts, c_sums, _ = ema_step_corrected(corrected[-1], c_counts, c_sums, x, EMA_DECAY_2D, t)
        corrected.append(c_means)
    corrected = np.stack(corrected)  # (steps + 1, K, 2)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.linalg.norm(ema_path, axis=-1).max(axis=1), "-o", ms=3, label="as in the library (no correction)")
    ax.plot(np.linalg.norm(corrected, axis=-1).max(axis=1), "-o", ms=3, label="bias-corrected")
    ax.axhline(1, color="k", lw=0.8, ls="--")
    ax.set_xlabel("EMA step")
    ax.set_ylabel("longest centroid norm")
    ax.set_title(f"Section 1's batches, λ = {EMA_DECAY_2D}")
    ax.legend()
    fig.savefig(FIG_DIR / "01_ex1_bias_correction.png", dpi=100)
    plt.show()

# %% [markdown]
# When your answer is right, the cell above also draws the longest centroid of each step on section 1's
# batches. The library's curve jumps above 1 (the dashed line) in the first steps. The corrected curve stays
# below 1 from the first step: every centroid is an average of unit vectors.
#
# ### Exercise 1.2 (medium): restart dead clusters
#
# Section 5 left the 200° centroid dead and $10^5$ times too long. Write `step_with_restart`. It does one
# `kmeans.kmeans_step(state, points, ema_decay=ema_decay, norm="l2")`, then re-seeds every cluster that
# received no point in this step. For such a cluster $c$ of head $h$, draw one of head $h$'s points of this
# batch with `rng` and make it the new centroid. Do not change the state in place.
#
# Careful: the next update computes $\mu_c = s_c / \tilde n_c$ from the state's sums and counts. If you change
# only `means`, the old sum comes back at the next step. Set `sums[h, c]` (and, if you like, `counts[h, c]`)
# so that `sums / ñ(counts)` gives your new centroid. The check runs 30 steps on two heads like section 5's
# and expects every cluster to receive points in each of the last 10.

# %%
def step_with_restart(state, points, rng, ema_decay):
    """kmeans_step, then re-seed every cluster that received no point from a point of this batch.

    state: {"means" (H, K, D), "counts" (H, K), "sums" (H, K, D)}; points (B, H, T, D), normalised;
    rng: numpy.random.Generator. Returns the new state.
    """
    raise NotImplementedError


# %%
if report("Exercise 1.2", ex01.check_restart, step_with_restart):
    rng = np.random.default_rng(6)  # the same batches as section 5
    state = kmeans.state_from_means(start_means)
    restart_got = []
    for step in range(STEPS_5):
        points = arc_batch(rng)  # (1, 1, 64, 2)
        restart_got.append(kmeans.cluster_stats(points, state["means"])["counts"][0, 0])  # (K,)
        state = step_with_restart(state, points, np.random.default_rng(step), 0.9)
    restart_got = np.array(restart_got)  # (steps, K)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, deg in enumerate(START_DEG):
        ax.plot(restart_got[:, c], "-o", ms=3, color=f"C{c}", label=f"started at {deg}°")
    ax.set_xlabel("step")
    ax.set_ylabel("points received in the step")
    ax.set_title("Section 5's example with restarts")
    ax.legend(fontsize=8)
    fig.savefig(FIG_DIR / "01_ex2_restart.png", dpi=100)
    plt.show()

# %% [markdown]
# When your answer is right, the cell above replays section 5's example with restarts. Compare it with the
# right panel of section 5: after a few steps the 80° and 200° clusters (green, red) receive points like the
# others, and the four clusters share the 64 points of each batch. Why not at once? In the first steps the
# restarted centroids have length 1, while their neighbours overshot to lengths of 1.2 to 1.3. A longer
# centroid wins a dot-product comparison, so the restarted ones lose (and are re-seeded again) until the
# overshoot fades.
#
# ### Exercise 1.3 (open): which converges faster, a small λ or a large batch?
#
# Train online k-means on section 3's fake queries (`token_batch(data_rng, batch=b)`, `norm="ln"`,
# `init="normal"`) for every decay in `DECAYS` and every batch size in `BATCH_SIZES`, recording the
# commitment loss per step as `train` does. Decide what "converged" means. One choice: the first step where
# a 5-step running mean of the loss is within 5% of the lowest floor of all runs. Return a table with
# one row per decay and one column per batch size, holding your cost to converge (steps, or points seen;
# `np.inf` if a run never gets there), and the fastest `(decay, batch_size)` according to that table.
#
# The check tests only what can be tested: the table's shape, and that `fastest` agrees with your own
# table. The rest is yours to answer in a markdown cell. Which converges in fewer *steps*, and which in
# fewer *points seen*? Why is λ = 0.999 so slow here, and what does the peak loss of its first steps say
# (think of Exercise 1.1)?

# %%
DECAYS = (0.9, 0.99, 0.999)
BATCH_SIZES = (1, 2, 4, 8)


def sweep(decays, batch_sizes):
    """Train one run per (decay, batch size); returns (table (len(decays), len(batch_sizes)), fastest)."""
    raise NotImplementedError


# %%
report("Exercise 1.3", ex01.check_sweep, sweep, DECAYS, BATCH_SIZES)

# %% [markdown]
# ## For the curious: two implementations, and where the options come from
#
# Not needed for the exercises; this is for readers who will compare rt_numpy with other code.
#
# * The options of this tutorial come from the two published implementations. The authors' TensorFlow code
#   uses `norm="ln"`, `init="normal"` and `centroid_update="ema"` (the library's defaults). The PyTorch
#   port (`routing-transformer`) uses `norm="l2"`, `init="data"` and `centroid_update="spherical"`. Both use
#   balanced membership. docs/conventions.md lists every difference, and tutorial 4 checks an
#   implementation against rt_numpy.
# * `cluster_stats` has two implementations in the library, chosen by `impl`: `impl="ref"`, the
#   readable NumPy code above that builds the full (B, H, T, K) similarity matrix, and `impl="numba"`, a
#   compiled loop that never stores it. They must agree: the same assignments and counts, and sums equal up
#   to the order of the additions.

# %%
ref_stats = kmeans.cluster_stats(batch, mu[None], impl="ref")  # section 2's batch and centroids
fast = kmeans.cluster_stats(batch, mu[None], impl="numba")
assert np.array_equal(fast["assignments"], ref_stats["assignments"])
assert np.array_equal(fast["counts"], ref_stats["counts"])
assert np.allclose(fast["sums"], ref_stats["sums"], rtol=1e-12, atol=1e-15)
assert np.array_equal(ref_stats["assignments"][0, :, 0].reshape(-1), assign)  # and both equal the hand computation
print("numba == ref")
