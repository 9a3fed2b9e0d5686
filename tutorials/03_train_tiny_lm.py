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
# # Tutorial 3: train a tiny Routing Transformer language model
#
# Tutorials 1 and 2 built the router (online k-means) and routing attention. This notebook puts them
# in a whole model, a byte-level decoder-only language model (Roy et al., arXiv:2003.05997,
# section 4.2; docs/algorithm.md#4-layers-and-heads), trains it on a CPU, and ends with the
# experiment that shows what routing is for:
#
# 1. build a tiny model and list its parameters;
# 2. open the model: the decoder block, drawn, then recomputed from scratch in NumPy and checked
#    against `model.forward`;
# 3. the loss, and its gradient against a finite difference;
# 4. train it with a loop written here, watching the loss and the cluster sizes of one routing head;
# 5. sample text from it;
# 6. look inside: which bytes of real text share a cluster;
# 7. associative recall: a routing model learns to look a key up far back, a local model cannot;
# 8. exercises.
#
# Running it takes about 3 minutes on a 2-core machine (`RT_NUMPY_FAST=1`: seconds), plus about half a
# minute of one-time compilation on a fresh checkout (section 1 says where). Reading it, about an hour.
#
# Shapes, with the letters of docs/algorithm.md#alphabet: a batch of ids is (B, T); the model has width C,
# H heads of D = C / H, and each routing head K centroids of dimension D. Tokens are bytes, so V = 256.

# %%
import dataclasses
import os
import tempfile
import time
import warnings
from pathlib import Path

import autograd
import autograd.test_util
import matplotlib.pyplot as plt
import numpy as np
from checks import ex03, report
from matplotlib.patches import FancyBboxPatch

from rt_numpy import attention, data, introspect, kmeans, model, ops, optim, sample, train

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # without ipywidgets, tqdm.auto falls back to text bars and warns
    from tqdm.auto import tqdm

try:  # the matrices here are tiny: BLAS threads cost more than they save, a lot more on a busy machine
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
except ImportError:
    print("threadpoolctl not installed: for speed, start Jupyter with OPENBLAS_NUM_THREADS=1")

FAST = os.environ.get("RT_NUMPY_FAST") == "1"  # CI knob: a few steps of a tinier model
FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_03_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
np.set_printoptions(precision=3, suppress=True, linewidth=120)
NOTEBOOK_START = time.perf_counter()
print("FAST =", FAST, "| figures saved in", FIG_DIR)

# %% [markdown]
# ## 1. The model and its parameters
#
# A `model.Config` holds every size and option and checks them when it is built. The last
# `n_route_layers` layers mix `n_route_heads` routing heads with local heads; earlier layers are
# local only, as in the paper (routing needs features that already know their context).

# %%
if FAST:
    cfg = model.Config(seq_len=64, width=32, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                       num_clusters=4, window_size=16, block_size=16)
else:
    cfg = model.Config(seq_len=128, width=64, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                       num_clusters=4, window_size=32, block_size=32)
print(cfg)
print("head dim D =", cfg.head_dim, "| routing layers:", [i for i in range(cfg.n_layers) if cfg.is_routing_layer(i)])

# %% [markdown]
# The parameters are a flat dict `name -> array`. The names are **stable**: checkpoints store them,
# the optimiser keys its moments by them, and tutorial 4 compares other implementations with
# rt_numpy by these names. They follow GPT-2: `wte` (token embedding), `wpe` (position embedding),
# `h{i}.…` (block i), `ln_f` (final layer norm).
#
# With shared QK (the official choice) there is no `w_k`; with tied embeddings the output projection is
# `wte` transposed, so there is no `lm_head` either. Exercise 3.1 asks you to count these parameters
# from the Config alone.

# %%
rng = np.random.default_rng(0)
params = model.init_params(cfg, rng)  # dict name -> array
kmeans_states = model.init_kmeans(cfg, rng)  # {"h1": {"means", "counts", "sums"}}: not parameters
for name, value in params.items():
    print(f"{name:16s} {str(value.shape):12s} {value.size:8,d}")
n_params = sum(v.size for v in params.values())
print(f"{'total':16s} {'':12s} {n_params:8,d}")
print("k-means state:", {layer: {k: v.shape for k, v in s.items()} for layer, s in kmeans_states.items()})

# %% [markdown]
# The centroids (H_route, K, D) sit beside the parameters: the optimiser never sees them, and they are
# updated by k-means after each step. `init_kmeans` draws them now, so even an untrained model can
# route (and sample).
#
# `model.forward` maps ids (B, T) to logits (B, T, V) and an `aux` dict with the commitment loss and
# the k-means statistics of every routing layer; `model.loss` adds the mean cross-entropy.
#
# **A one-time wait.** The next cell is the first to run the model. rt_numpy's fast paths are Numba
# kernels, compiled to machine code the first time they run. On a fresh checkout (a cold cache) the
# first cells that run the model pause for 4 to 8 s each (measured on 2 cores): the next cell, the
# float64 check of section 2, the gradient check of section 3 and the first training step of
# section 4, about 25 s in all. Numba caches the compiled code on disk, so
# on later runs these cells take a fraction of a second. Each of them prints its time.

# %%
cell_start = time.perf_counter()
x, y = rng.integers(0, 256, size=(2, 2, cfg.seq_len))  # (B, T) random bytes and random targets
logits, aux = model.forward(params, x, cfg, kmeans_states)  # (B, T) -> (B, T, V)
print("logits", logits.shape, "| aux:", sorted(aux), "| stats of", sorted(aux["stats"]))
print(f"untrained loss {model.loss(params, x, y, cfg, kmeans_states)[0]:.3f} nats ~ ln 256 = {np.log(256):.3f}")
print(f"this cell took {time.perf_counter() - cell_start:.1f} s (on a cold cache, most of it compiling)")

# %% [markdown]
# ## 2. Inside the model: the decoder block
#
# The model is a GPT-2-style decoder (docs/algorithm.md#4-layers-and-heads). With one-hot rows replaced
# by a lookup, for a sequence of ids $t_1 \dots t_T$:
#
# $$x^{(0)}_i = \texttt{wte}[t_i] + \texttt{wpe}[i] \qquad \text{(token + position embedding, } (T, C))$$
#
# Then `n_layers` **pre-LN residual blocks**. Each one normalises a copy of the residual stream $x$,
# transforms it, and adds the result back, first with attention, then with a feed-forward MLP:
#
# $$x \leftarrow x + \operatorname{Attn}\big(\operatorname{LN}_1(x)\big), \qquad
# x \leftarrow x + \operatorname{MLP}\big(\operatorname{LN}_2(x)\big),$$
#
# $$\operatorname{LN}(x) = \gamma \odot \frac{x - \bar x}{\sqrt{\operatorname{var}(x) + 10^{-5}}} + \beta,
# \qquad \operatorname{MLP}(h) = \operatorname{GELU}(h W_\text{in} + b_\text{in})\, W_\text{out} + b_\text{out}.$$
#
# "Pre-LN" means the layer norm sits *inside* the branch, so the stream itself is never normalised: each
# block only adds to it, and gradients reach the embeddings through the additions unchanged.
# $\operatorname{Attn}$ splits its input into H heads of width D. Shared QK: each head has queries
# $q = h W_q$ and uses them as keys too, values $v = h W_v$. The first `n_route_heads` heads of a
# routing layer route (tutorial 2); the others, and all heads of earlier layers, attend locally. The
# heads' outputs are concatenated and projected by $W_o$. At the top, a final layer norm and the
# **tied** output projection, the token embedding transposed:
#
# $$\text{logits} = \operatorname{LN}_f\big(x^{(n)}\big)\, \texttt{wte}^\top \qquad (T, V).$$
#
# Tying means the same vector stands for a byte at the input and scores it at the output.

# %%
def draw_box(ax, xy, text, color, width=3.2, height=0.62):
    """A rounded box centred at xy with text in it."""
    ax.add_patch(FancyBboxPatch((xy[0] - width / 2, xy[1] - height / 2), width, height,
                                boxstyle="round,pad=0.04", fc=color, ec="0.3", lw=1))
    ax.text(*xy, text, ha="center", va="center", fontsize=9)


def draw_arrow(ax, start, end, **kw):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color="0.25", lw=1.2, **kw))


fig, ax = plt.subplots(figsize=(7.5, 8.2))
stages = [  # (y, text, colour) from the input (bottom) to the output (top)
    (0.0, "ids (B, T)", "0.92"),
    (1.1, "wte[ids] + wpe[:T]\ntoken + position embedding → x (B, T, C)", "#cfe2f3"),
    (2.4, "LN$_1$ (layer norm)", "#fff2cc"),
    (3.5, "attention: H heads of D = C / H, shared QK\nrouting heads (last layers) | local heads\n"
          "concatenate, then @ $W_o$", "#f4cccc"),
    (4.6, "+", "white"),
    (5.5, "LN$_2$ (layer norm)", "#fff2cc"),
    (6.6, "MLP: GELU(h $W_{in}$ + $b_{in}$) $W_{out}$ + $b_{out}$\n(B, T, C) → (B, T, F) → (B, T, C)", "#d9ead3"),
    (7.7, "+", "white"),
    (8.8, "LN$_f$, then @ wte$^T$ (tied)\n→ logits (B, T, V)", "#cfe2f3"),
]
for y0, text, color in stages:
    if text == "+":
        ax.text(0, y0, "+", ha="center", va="center", fontsize=13, bbox=dict(boxstyle="circle", fc="white", ec="0.3"))
    else:
        draw_box(ax, (0, y0), text, color, height=0.9 if "\n" in text else 0.55)
for (y0, t0, _), (y1, t1, _) in zip(stages, stages[1:]):
    gap0 = 0.22 if t0 == "+" else (0.45 if "\n" in t0 else 0.28)
    gap1 = 0.22 if t1 == "+" else (0.45 if "\n" in t1 else 0.28)
    draw_arrow(ax, (0, y0 + gap0), (0, y1 - gap1))
for y_from, y_plus in ((1.85, 4.6), (4.9, 7.7)):  # the residual connections, around each branch
    ax.plot([0, 2.1, 2.1], [y_from, y_from, y_plus], color="0.25", lw=1.2)
    draw_arrow(ax, (2.1, y_plus), (0.22, y_plus))
    ax.text(2.2, (y_from + y_plus) / 2, "residual\nstream x", fontsize=8, va="center")
ax.add_patch(FancyBboxPatch((-2.4, 1.8), 5.7, 6.3, boxstyle="round,pad=0.05", fc="none", ec="0.5", ls="--"))
ax.text(-2.05, 4.95, "block i, repeated n_layers times", rotation=90, ha="center", va="center", fontsize=9,
        color="0.3")
ax.set_xlim(-2.6, 3.4)
ax.set_ylim(-0.5, 9.5)
ax.axis("off")
ax.set_title("The decoder of rt_numpy.model, from ids to logits")
fig.savefig(FIG_DIR / "03_decoder_block.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# *The decoder, read from the bottom.* Each block reads a layer-normalised copy of the residual stream
# x and adds its result back (the two "+" circles); the stream itself goes straight up. Only the last
# `n_route_layers` blocks have routing heads. In our model, block 0 is all local and block 1 has 2
# routing and 2 local heads.
#
# Now the same thing in plain NumPy, in float64, with nothing from the library but the parameter dict
# and the centroids. The two attention kinds are written as (T, T) weight matrices: local heads see
# their block and the `look_back` blocks before it (docs/algorithm.md#2-local-attention); a routing
# head lets each of its K clusters take the W tokens most similar to its centroid, runs a causal
# softmax inside each cluster with the normalised queries as logits, and averages over the clusters
# that hold a token, dividing by $n_i + \varepsilon$ (docs/algorithm.md#15-combine).

# %%
def layer_norm(x, g=None, b=None, eps=1e-5):
    """Over the last axis, population variance; without g and b, the parameter-free norm of routing."""
    x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
    return x if g is None else x * g + b


def gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # the tanh form, as GPT-2


def softmax_where(logits, visible):
    """Row softmax over the visible entries; a row with nothing visible is all 0."""
    z = np.where(visible, logits, -np.inf)
    w = np.exp(z - z.max(-1, keepdims=True, initial=-1e300))  # initial: a finite shift for empty rows
    return w / np.maximum(w.sum(-1, keepdims=True), 1e-300)


def routing_weights(qn, means, W, eps):
    """(B, Hr, T, T) weights of balanced routing heads from normalised queries (B, Hr, T, D)."""
    scores = np.einsum("bhtd,hkd->bhkt", qn, means)  # (B, Hr, K, T) token-centroid similarities
    member = np.zeros(scores.shape, bool)  # (B, Hr, K, T): the W best tokens of each cluster
    np.put_along_axis(member, np.argsort(-scores, axis=-1, kind="stable")[..., :W], True, axis=-1)
    T = qn.shape[2]
    causal = np.tril(np.ones((T, T), bool))
    logits = qn @ qn.swapaxes(-1, -2)  # (B, Hr, T, T): normalised logits, no 1/sqrt(D)
    A = sum(softmax_where(logits, m[..., :, None] & m[..., None, :] & causal) * m[..., :, None]
            for m in np.moveaxis(member, 2, 0))  # one causal softmax per cluster, summed
    return A / (member.sum(2)[..., None] + eps)  # scatter-mean over the n_i clusters that hold i


def forward_numpy(params, ids, cfg, kmeans_states):
    """The logits (B, T, V) of model.forward, from scratch (learned positions, shared QK, tied)."""
    B, T = ids.shape
    H, D = cfg.num_heads, cfg.head_dim
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    local = (j <= i) & (j // cfg.block_size >= i // cfg.block_size - cfg.look_back)  # (T, T)
    x = params["wte"][ids] + params["wpe"][:T]  # (B, T, C)
    for layer in range(cfg.n_layers):
        p = f"h{layer}."
        h = layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])  # (B, T, C)
        q = (h @ params[p + "attn.w_q"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D), keys = q
        v = (h @ params[p + "attn.w_v"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        A = softmax_where(q @ q.swapaxes(-1, -2) / np.sqrt(D), local)  # (B, H, T, T), every head local
        if cfg.is_routing_layer(layer):  # ... except the first n_route_heads of a routing layer
            Hr = cfg.n_route_heads
            A[:, :Hr] = routing_weights(layer_norm(q[:, :Hr], eps=1e-6), kmeans_states[f"h{layer}"]["means"],
                                        min(cfg.window_size, T), cfg.combine_eps)
        heads = (A @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, C)
        x = x + heads @ params[p + "attn.w_o"]
        h = layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
        h = h @ params[p + "mlp.w_in"] + params[p + "mlp.b_in"]  # (B, T, C) @ (C, F) -> (B, T, F)
        x = x + gelu(h) @ params[p + "mlp.w_out"] + params[p + "mlp.b_out"]  # (B, T, F) -> (B, T, C)
    return layer_norm(x, params["ln_f.g"], params["ln_f.b"]) @ params["wte"].T  # (B, T, C) @ (C, V)


cell_start = time.perf_counter()
cfg64 = dataclasses.replace(cfg, dtype="float64")
assert cfg64.pos_encoding == "learned" and cfg64.shared_qk and cfg64.tie_embeddings  # what forward_numpy covers
assert cfg64.membership == "balanced" and cfg64.logits == "normalized" and cfg64.self_attend == "allow"
rng64 = np.random.default_rng(2)
params64 = model.init_params(cfg64, rng64)
kmeans64 = model.init_kmeans(cfg64, rng64)
ids64 = rng64.integers(0, 256, size=(2, cfg64.seq_len))  # (B, T)
ours = forward_numpy(params64, ids64, cfg64, kmeans64)  # (B, T, V)
theirs = np.asarray(model.forward(params64, ids64, cfg64, kmeans64)[0])  # (B, T, V)
gap = np.abs(ours - theirs).max()
print(f"from scratch vs model.forward: max |difference| {gap:.1e} (logits up to {np.abs(theirs).max():.2f})")
assert gap < 1e-12
print(f"this cell took {time.perf_counter() - cell_start:.1f} s (float64 kernels compile here on a cold cache)")

# %% [markdown]
# The two agree to about $10^{-15}$, the rounding of float64: that is the whole model. (GELU is the
# tanh approximation $\tfrac12 x\big(1 + \tanh(\sqrt{2/\pi}\,(x + 0.044715\,x^3))\big)$ of GPT-2, as in
# `ops.gelu`.) Everything `model.forward` adds to this is speed (Numba kernels, gathers of W rows
# instead of (T, T) masks) and autograd: the matrices above cost $T^2$ per head, which is what routing exists to avoid.
#
# ## 3. The loss, and its gradient against finite differences
#
# Training minimises the mean next-byte cross-entropy plus the **commitment loss** of every routing
# layer (docs/algorithm.md#18-commitment-loss). With $z_{b,t}$ the logits at position $t$ of row $b$,
# $y_{b,t}$ the next byte, and $M$ the set of positions that count (all of them here; only the answers
# in section 7):
#
# $$\mathcal L = \frac{1}{|M|} \sum_{(b,t) \in M} -\log \frac{e^{z_{b,t,y_{b,t}}}}{\sum_{v} e^{z_{b,t,v}}}
# \;+\; \beta \sum_{\text{routing layers}} (e_q + e_k),
# \qquad e = \frac{1}{N D} \sum_{x} \big\lVert \hat x - \operatorname{sg}(\mu_{a(x)}) \big\rVert^2 .$$
#
# $e$ is the mean squared distance between each of the N normalised queries $\hat x$ of a layer's
# routing heads and its nearest centroid $\mu_{a(x)}$; sg (stop-gradient) means the loss moves the
# queries towards the centroids, never the centroids (k-means moves those). $\beta$ = `commitment` =
# $10^{-4}$. With shared QK the keys are the queries, and the official code still adds both terms:
# $e_q + e_k = 2 e_q$. We recompute it from the queries, which `model.forward` hands out with `trace`:

# %%
trace = {}
_, aux = model.forward(params64, ids64, cfg64, kmeans64, trace=trace)
commitment = 0.0
for name, state in kmeans64.items():
    qn = layer_norm(trace[name]["q"][:, :cfg64.n_route_heads], eps=1e-6)  # (B, Hr, T, D), norm="ln"
    scores = np.einsum("bhtd,hkd->bhtk", qn, state["means"])  # (B, Hr, T, K)
    nearest_mu = np.take_along_axis(state["means"][None], scores.argmax(-1)[..., None], axis=2)  # (B, Hr, T, D)
    e_q = np.mean((qn - nearest_mu) ** 2)  # the mean over N * D numbers
    commitment += cfg64.commitment * 2 * e_q  # e_q + e_k, the keys being the queries
print(f"commitment: ours {commitment:.6e}, model.forward {float(aux['commitment']):.6e}")
assert np.isclose(commitment, aux["commitment"], rtol=1e-10, atol=0)

# %% [markdown]
# Training takes the gradient of $\mathcal L$ with HIPS autograd, through every primitive of
# `rt_numpy.ops` (each has a hand-written backward). One wrong backward anywhere would silently
# slow or spoil training, so we check the whole thing once on a tiny **float64** model.
#
# A gradient $g$ is right if, for any direction $u$, the directional derivative $g \cdot u$ equals the
# central finite difference
#
# $$\frac{\mathcal L(p + hu) - \mathcal L(p - hu)}{2h} = g \cdot u + O(h^2).$$
#
# Routing decisions (nearest centroids, balanced windows) are integers: piecewise constant in the
# parameters, with no gradient. The loss is smooth between the points where a decision flips, and a
# step of $h = 10^{-6}$ is far too small to flip one here.

# %%
cell_start = time.perf_counter()
cfg_gc = model.Config(seq_len=16, width=8, n_layers=2, num_heads=2, n_route_heads=1, n_route_layers=1,
                      num_clusters=2, window_size=8, block_size=8, dtype="float64")
rng_gc = np.random.default_rng(1)
params_gc = model.init_params(cfg_gc, rng_gc)  # float64
kmeans_gc = model.init_kmeans(cfg_gc, rng_gc)
x_gc = rng_gc.integers(0, 256, size=(2, cfg_gc.seq_len))  # (B, T)
y_gc = rng_gc.integers(0, 256, size=(2, cfg_gc.seq_len))  # (B, T)


def whole_loss(p):
    """Cross-entropy plus commitment of the tiny model: a scalar function of the params dict."""
    return model.loss(p, x_gc, y_gc, cfg_gc, kmeans_gc)[0]


grads = autograd.grad(whole_loss)(params_gc)  # dict name -> array, the shapes of params_gc
u = {k: rng_gc.standard_normal(v.shape) for k, v in params_gc.items()}  # a random direction
norm_u = np.sqrt(sum(np.sum(d * d) for d in u.values()))
u = {k: d / norm_u for k, d in u.items()}  # unit length over all parameters together
h = 1e-6
f_plus = whole_loss({k: v + h * u[k] for k, v in params_gc.items()})
f_minus = whole_loss({k: v - h * u[k] for k, v in params_gc.items()})
finite_diff = (f_plus - f_minus) / (2 * h)
autograd_dir = sum(np.sum(grads[k] * u[k]) for k in params_gc)  # g . u
rel_err = abs(finite_diff - autograd_dir) / max(abs(finite_diff), abs(autograd_dir))
print(f"finite difference {finite_diff:.10f} | autograd {autograd_dir:.10f} | relative error {rel_err:.1e}")
assert rel_err < 1e-6
print(f"this cell took {time.perf_counter() - cell_start:.1f} s (the backward kernels compile here on a cold cache)")

# %% [markdown]
# `autograd.test_util.check_grads` does the same along its own random directions (and can check
# second derivatives and forward mode, which `rt_numpy.ops` does not implement); the test suite runs
# it on the model. Here, reverse mode, first order:

# %%
autograd.test_util.check_grads(whole_loss, modes=["rev"], order=1)(params_gc)  # raises if wrong
print("check_grads passed")
# %% [markdown]
# ## 4. Training on the Python-shipped corpus
#
# The corpus is text that ships with Python (the pydoc topics, then the standard library's sources),
# so it needs no download; its sha256 pins the exact bytes of your Python version. We split it 90/5/5
# into contiguous train / validation / test pieces (a random split of a byte stream would leak the
# neighbours of every held-out byte into training).

# %%
raw, sha256 = data.load_corpus("python")  # (N,) uint8
corpus = data.split(raw)  # {"train", "val", "test"}
print(f"{len(raw):,} bytes, sha256 {sha256}")
print({k: len(v) for k, v in corpus.items()})
print(repr(data.decode(corpus["train"][:120])))

# %% [markdown]
# The loop, written out (`train.train` does the same plus checkpoints). One step of
# `train.train_step`:
#
# 1. loss and gradient by autograd, for a batch of random windows (B, T) and their next bytes;
# 2. clip the global gradient norm, then AdamW with warm-up and cosine decay of the learning rate;
# 3. **k-means update** of every routing layer, from the statistics of that same forward pass: the
#    centroids used in the step are those from before it (docs/algorithm.md#16-centroid-update).
#
# We record the cluster sizes of head 0 of the routing layer at every step. `train_step` does not
# return the statistics, but the k-means state keeps them in an EMA (tutorial 1): with $N_c$ the number
# of tokens whose nearest centroid is $c$ in this step and $\lambda$ = `ema_decay`,
#
# $$n_c^\text{new} = \lambda\, n_c^\text{old} + (1 - \lambda) N_c
# \quad\Longrightarrow\quad N_c = \frac{n_c^\text{new} - \lambda\, n_c^\text{old}}{1 - \lambda}.$$
#
# We check this once against the statistics of `model.forward` on the same batch.

# %%
STEPS, BATCH = (30, 4) if FAST else (1000, 8)
tcfg = train.TrainConfig(steps=STEPS, batch_size=BATCH, lr=3e-3, min_lr=3e-4, warmup_steps=STEPS // 10,
                         eval_every=0, eval_batches=4)
LAYER = [f"h{i}" for i in range(cfg.n_layers) if cfg.is_routing_layer(i)][-1]  # the routing layer we watch
decay = cfg.ema_decay  # λ


def step_counts(before, after):
    """Cluster sizes (H_route, K) of one step, recovered from the EMA counts before and after it."""
    return np.rint((after["counts"] - decay * before["counts"]) / (1 - decay)).astype(int)


rng = np.random.default_rng(0)
params = model.init_params(cfg, rng)
kmeans_states = model.init_kmeans(cfg, rng)
opt_state = optim.adamw_init(params)  # AdamW moments, one per parameter name

cell_start = time.perf_counter()
x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)  # (B, T), (B, T)
_, aux = model.forward(params, x, cfg, kmeans_states)  # the statistics train_step is about to use
_, _, after, _ = train.train_step(params, opt_state, kmeans_states, x, y, cfg, tcfg, 0, rng)
assert np.array_equal(step_counts(kmeans_states[LAYER], after[LAYER]), aux["stats"][LAYER]["counts"][0])
print("cluster sizes of the first batch, per routing head:\n", aux["stats"][LAYER]["counts"][0])
print(f"this cell took {time.perf_counter() - cell_start:.1f} s (the training step's kernels compile here on a "
      "cold cache)")

# %% [markdown]
# Each head's counts add up to B·T: every token is assigned to its nearest centroid (the balanced
# windows are a separate matter; these counts are what k-means learns from). Now the loop, from
# fresh parameters again; held-out bits per byte are measured five times along the way.

# %%
rng = np.random.default_rng(0)
params = model.init_params(cfg, rng)
kmeans_states = model.init_kmeans(cfg, rng)
opt_state = optim.adamw_init(params)
history, sizes, val_points = [], [], []
eval_at = set(np.linspace(0, tcfg.steps, 6).astype(int)[1:])
start = time.perf_counter()
bar = tqdm(range(tcfg.steps), desc="train", unit="step", mininterval=1.0)
for step in bar:
    x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)  # (B, T), (B, T)
    before = kmeans_states[LAYER]
    params, opt_state, kmeans_states, metrics = train.train_step(params, opt_state, kmeans_states, x, y,
                                                                 cfg, tcfg, step, rng)
    sizes.append(step_counts(before, kmeans_states[LAYER])[0])  # (K,), head 0
    history.append(metrics)
    bar.set_postfix(bpb=f"{data.bits_per_byte(metrics['cross_entropy']):.2f}", refresh=False)
    if step + 1 in eval_at:
        val = train.evaluate(params, kmeans_states, cfg, corpus["val"], batch_size=tcfg.batch_size,
                             max_batches=tcfg.eval_batches)
        val_points.append((step + 1, val["bits_per_byte"]))
bar.close()
train_seconds = time.perf_counter() - start
sizes = np.array(sizes)  # (steps, K)
tokens_per_s = tcfg.steps * tcfg.batch_size * cfg.seq_len / train_seconds
print(f"{tcfg.steps} steps in {train_seconds:.1f} s ({tokens_per_s:,.0f} tokens/s); "
      f"held-out {val_points[-1][1]:.3f} bits/byte")

# %%
train_bpb = np.array([data.bits_per_byte(m["cross_entropy"]) for m in history])  # (steps,)
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
ax = axes[0]
ax.plot(np.arange(1, len(train_bpb) + 1), train_bpb, lw=0.8, label="train batch")
ax.plot(*zip(*val_points), "o-", label="held-out (validation)")
ax.axhline(8, color="0.6", ls=":", lw=1, label="uniform over bytes: 8 bits")
ax.set_xlabel("step")
ax.set_ylabel("bits per byte")
ax.set_title("Loss while training")
ax.legend(fontsize=8)
ax = axes[1]
steps_axis = np.arange(1, len(sizes) + 1)
ax.stackplot(steps_axis, (sizes / sizes.sum(axis=1, keepdims=True)).T,
             labels=[f"cluster {c}" for c in range(cfg.num_clusters)], alpha=0.85)
ax.set_xlim(1, len(sizes))
ax.set_ylim(0, 1)
ax.set_xlabel("step")
ax.set_ylabel("share of the batch's tokens")
ax.set_title(f"Nearest-centroid cluster sizes, layer {LAYER}, head 0")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
fig.tight_layout()
fig.savefig(FIG_DIR / "03_training.png", dpi=100, bbox_inches="tight")
plt.show()
last = sizes[-max(1, len(sizes) // 10):]  # (steps / 10, K), the last tenth of the run
shares = last.sum(axis=0) / last.sum()  # (K,)
print("head 0, share of the tokens per cluster over the last tenth of the run:",
      ", ".join(f"cluster {c} {s:.0%}" for c, s in enumerate(shares)))

# %% [markdown]
# Reading the left plot: the model starts near 8 bits per byte (uniform over 256 values), learns
# the byte frequencies within a few dozen steps, then which byte tends to follow which. The training
# curve is noisy because each point is one batch of B windows. The held-out points come from another
# part of the corpus (the split is contiguous: the validation bytes are the standard library files
# from `profile.py` to `selectors.py`), so their level is not the training curve's (here it is lower:
# those files are easier to predict): compare held-out numbers with each other, not with the training
# curve. For scale, published byte-level models reach about
# 1 bit per byte on English text, with a thousand times more parameters and steps.
#
# The right plot is the **EMA** k-means of tutorial 1 inside a real model: at each step, the share of
# the batch's B·T tokens whose nearest centroid is each cluster. In the first steps the running counts
# are tiny, so a centroid that received few tokens is divided by a small count, grows long, and wins
# many tokens at the next step: the shares swing, and one cluster can take almost every token (the
# short FAST run shows only this phase). As the network learns to tell kinds of bytes apart, its
# queries spread out and the other centroids win shares back. In our full run the shares then
# settled (printed above): about 54% for cluster 1, 30% for cluster 3, 15% for cluster 2, and
# cluster 0 stayed nearly empty, about 2%: almost no token prefers it, the pitfall of tutorial 1.
# Balanced routing hides this imbalance from the attention: every cluster window still takes exactly
# W tokens, the W most similar to its centroid, so a small cluster's window is filled with tokens
# that are merely *closer to it than most*.

# %% [markdown]
# ## 5. Sampling
#
# `sample.generate` extends a prompt one byte at a time: it runs the model on the window of the
# last tokens, divides the next-byte logits by a **temperature** and samples. Temperature 0 is greedy
# (argmax); lower temperatures sharpen the distribution, higher ones flatten it. **Top-p** (nucleus)
# sampling keeps only the smallest set of bytes whose probability adds up to p, which cuts the long
# tail of unlikely bytes that makes samples derail (exercise 3.3 writes it by hand). Each new byte
# reruns the model on the whole window: with balanced routing, appending a token can change the
# clusters of earlier ones, so their keys and values cannot be kept from the previous step
# (docs/algorithm.md §9 shows such an eviction). A strictly causal model (`membership="nearest"`, or
# local heads only) has no such problem, and `sample.generate` keeps its keys and values in a cache.

# %%
N_NEW = 60 if FAST else 200
prompt = data.encode("def ")[None].astype(np.int64)  # (1, n0)
for temperature, top_p in ((0.0, None), (0.7, 0.9), (1.0, None)):
    out = sample.generate(params, cfg, kmeans_states, prompt, N_NEW, rng=np.random.default_rng(0),
                          temperature=temperature, top_p=top_p)  # (1, n0 + N_NEW)
    print(f"--- temperature {temperature}, top_p {top_p} ---")
    print(data.decode(out[0]))

# %% [markdown]
# After a few hundred steps the samples are not Python yet: they have the statistics of its bytes
# (short groups of letters between spaces, newlines followed by indentation, an occasional `_`, `(`
# or quote) and frequent pairs such as "th" or "se", but no words beyond the commonest. Greedy
# decoding, and often a low temperature, falls into a loop of the likeliest bytes ("the the the", or
# indentation that never ends); temperature 1 without top-p picks rare bytes and invents punctuation.
# Run the full version
# (without `RT_NUMPY_FAST`), or `python -m rt_numpy demo` (a larger model, a few minutes), for better
# samples.

# %% [markdown]
# ## 6. Looking inside: which bytes share a cluster?
#
# Take a snippet of held-out text and ask the routing layer where each byte goes. `model.forward`
# returns the cluster statistics, which include each token's nearest centroid, but not the
# normalised queries themselves. To look at those we replay the forward pass up to the routing
# layer's queries, with the library's building blocks, and check that our queries give exactly the
# assignments the library's routing used.

# %%
def routing_queries(params, ids, cfg, kmeans_states, layer):
    """Normalised queries (B, H_route, T, D) of the routing heads of `layer`, as model.forward makes them."""
    B, T = ids.shape
    H, D = cfg.num_heads, cfg.head_dim
    x = params["wte"][ids]  # (B, T) -> (B, T, C), token embeddings
    x = x + params["wpe"][:T]  # (B, T, C) + (T, C), learned positions
    for i in range(layer):  # the layers below `layer`, in full; local only (asserted below)
        p = f"h{i}."
        h = ops.layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])  # (B, T, C)
        y, _, _ = attention.multihead_attention(h, {w: params[p + "attn." + w] for w in ("w_q", "w_v", "w_o")},
                                                None, num_heads=H, n_route_heads=0, block_size=cfg.block_size,
                                                look_back=cfg.look_back)  # (B, T, C)
        x = x + y
        h = ops.layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
        h = ops.gelu(h @ params[p + "mlp.w_in"] + params[p + "mlp.b_in"])  # (B, T, C) @ (C, F) -> (B, T, F)
        x = x + h @ params[p + "mlp.w_out"] + params[p + "mlp.b_out"]  # (B, T, F) @ (F, C) -> (B, T, C)
    p = f"h{layer}."
    h = ops.layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])  # (B, T, C)
    q = (h @ params[p + "attn.w_q"]).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, T, C) -> (B, H, T, D)
    return kmeans.normalize(q[:, :cfg.n_route_heads], cfg.norm)  # (B, H_route, T, D)


layer = int(LAYER[1:])
assert not any(cfg.is_routing_layer(i) for i in range(layer))  # what routing_queries mirrors:
assert cfg.pos_encoding == "learned" and cfg.shared_qk and cfg.dropout == 0  # local layers below, learned positions
snippet_start = 2000  # an arbitrary place in the held-out split
ids = corpus["val"][snippet_start:snippet_start + cfg.seq_len].astype(np.int64)[None]  # (1, T)
qn = routing_queries(params, ids, cfg, kmeans_states, layer)  # (1, H_route, T, D)
means = kmeans_states[LAYER]["means"]  # (H_route, K, D)
ours = kmeans.cluster_stats(qn, means)  # assignments (1, 1, H_route, T), counts (1, H_route, K)
_, aux = model.forward(params, ids, cfg, kmeans_states)
assert np.array_equal(ours["assignments"], aux["stats"][LAYER]["assignments"])
assert np.array_equal(ours["counts"], aux["stats"][LAYER]["counts"])
print("our normalised queries route exactly as model.forward did; counts per head:\n", ours["counts"][0])

# %% [markdown]
# First, **nearest centroids**: each byte of the snippet, coloured by the cluster of head 0 it is
# closest to (the assignment k-means learns from).

# %%
def visible(ch):
    """A byte as one printable character: ⏎ newline, ␣ space, · anything else unprintable."""
    return {10: "⏎", 32: "␣"}.get(int(ch), chr(ch) if 32 < ch < 127 else "·")


nearest_c = ours["assignments"][0, 0, 0]  # (T,), head 0
COLS = 32
rows = -(-cfg.seq_len // COLS)
fig, ax = plt.subplots(figsize=(COLS * 0.3, rows * 0.42 + 0.6))
for t, ch in enumerate(ids[0]):
    r, c = divmod(t, COLS)
    ax.text(c, -r, visible(ch), ha="center", va="center", family="monospace", fontsize=10,
            bbox=dict(boxstyle="square,pad=0.25", fc=f"C{nearest_c[t]}", alpha=0.45, lw=0))
ax.set_xlim(-0.7, COLS - 0.3)
ax.set_ylim(-rows + 0.3, 0.7)
ax.axis("off")
handles = [plt.Rectangle((0, 0), 1, 1, fc=f"C{c}", alpha=0.45) for c in range(cfg.num_clusters)]
ax.legend(handles, [f"cluster {c}" for c in range(cfg.num_clusters)], loc="upper left",
          bbox_to_anchor=(1.01, 1), fontsize=8)
ax.set_title(f"Nearest centroid of each byte, layer {LAYER}, routing head 0 (⏎ newline, ␣ space)")
fig.savefig(FIG_DIR / "03_clusters_text.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# Then the **balanced windows** that attention actually runs on: each cluster takes the W bytes of
# the snippet that are most similar to its centroid (tutorial 2). Below, one line per cluster: its
# members in place, every other byte as `·`. Bytes in the same window attend to each other, however
# far apart they are.

# %%
windows = kmeans.balanced_membership(qn, means, min(cfg.window_size, cfg.seq_len))[0, 0]  # (K, W), head 0
print("text     ", "".join(visible(ch) for ch in ids[0]))
for c, win in enumerate(windows):
    line = np.full(cfg.seq_len, "·", dtype="<U1")
    line[win] = [visible(ch) for ch in ids[0, win]]
    print(f"cluster {c}", "".join(line))

# %% [markdown]
# Over more text, which bytes does each cluster of head 0 attract? We count nearest-centroid
# assignments over a few validation windows and list each cluster's most frequent bytes, with the
# share of that byte's occurrences that land in the cluster.

# %%
n_windows = 4 if FAST else 16
pairs = np.zeros((cfg.num_clusters, 256), dtype=int)  # (K, V): how often byte v goes to cluster c
for xb, _ in data.eval_batches(corpus["val"][:n_windows * cfg.seq_len + 1], 8, cfg.seq_len):
    _, aux = model.forward(params, xb, cfg, kmeans_states)
    a = aux["stats"][LAYER]["assignments"][0, :, 0]  # (S, B, H_route, T) -> (B, T), head 0
    np.add.at(pairs, (a, xb), 1)
for c in range(cfg.num_clusters):
    top = np.argsort(-pairs[c])[:12]  # (12,) most frequent bytes of cluster c
    share = pairs[c, top] / np.maximum(pairs[:, top].sum(axis=0), 1)  # of all occurrences of that byte
    listing = "  ".join(f"{visible(v)}:{s:.0%}" for v, s in zip(top, share) if pairs[c, v])
    print(f"cluster {c} ({pairs[c].sum() / pairs.sum():.0%} of tokens)  {listing}")

# %% [markdown]
# What you see depends on the run (and on FAST). In our full run, head 0 sorted the held-out bytes
# into letters (cluster 1, about half of the tokens: nearly every `e`, `t`, `r`, `s`), whitespace with
# `,` `:` `=` (cluster 3, about a third: every newline, most spaces), and brackets, quotes and
# underscores (cluster 2, about 15%: every `(`, `'` and `[`); cluster 0, nearly empty during training,
# wins no token here. The balanced windows show the same: one window holds the newlines and the
# indentation after them, one the brackets and quotes, one the letters of words. Cluster 0's window
# still holds W bytes, those merely closest to its centroid (`__`, `({`), as section 4 said. A small
# model that has trained for a minute routes by **what the byte is**, plus a little
# of its neighbourhood, mixed in by the local layer below. That is already useful to attention: all
# the brackets and quotes of a function, however far apart, can look at each other. In the paper's
# large models the clusters become topical: one gathers the mentions of the same entity or the same
# subject across thousands of tokens.


# %% [markdown]
# ## 7. Associative recall: routing against local attention
#
# Bits per byte on real text mix many skills. A sharper test of routing is **associative recall**
# (`data.recall_task`). Each row starts with P key/value records (a letter, then a digit: `u2 b8 x3 …`),
# then random upper-case filler, then the same keys again in another order. At each repeated key the
# model must predict the digit that followed it the first time. The answer lies far back, several times
# the reach of a local head, so a local-only model can only guess (chance: 1 in 10 digits). A routing
# head can put the repeated key in the same cluster as the earlier record and copy the digit from there.

# %%
if FAST:
    T_R, P_R, WIDTH_R = 32, 4, 32
else:
    T_R, P_R, WIDTH_R = 64, 8, 64
cfg_route = model.Config(seq_len=T_R, width=WIDTH_R, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                         num_clusters=2, window_size=T_R // 2, block_size=4, look_back=1)
cfg_local = dataclasses.replace(cfg_route, n_route_heads=0)  # the same parameters, local heads only
R = 2  # bytes per record: key_len = value_len = 1
task = dict(n_pairs=P_R, key_len=1, value_len=1, distance=T_R + 1 - (2 * P_R - 1) * R)  # the shortest offset
reach = cfg_route.block_size * (cfg_route.look_back + 1)  # tokens a local head can see
x_r, y_r, mask_r = data.recall_task(1, T_R, rng=np.random.default_rng(0), **task)  # (1, T) each
print(data.decode(x_r[0]))
print("".join("^" if m else " " for m in mask_r[0]), " <- the scored targets: the next byte is a value")
print(f"record -> query: {task['distance']} to {T_R - 1} positions back; a local head sees {reach} tokens")

# %% [markdown]
# `data.recall_task` puts the records at the start and the queries at the end, so every query is
# between `distance` and T − 1 positions after its record. The `^` marks the positions whose next
# byte is scored: the repeated keys, whose next byte is the value.
#
# The recipe of `bench/recall.py`, each choice needed to learn this in a few minutes of CPU:
#
# * **Answers-only loss.** Only the P value bytes of each row count, $M$ = the `mask` of
#   `data.recall_task` in the formula of section 3 (`train.train_step(..., mask=mask)`). On every
#   byte, the answers would be 8 targets among 64, the rest random filler that teaches nothing.
# * **Larger initial weights**: every weight matrix is drawn with standard deviation 0.1 instead of
#   GPT-2's 0.02 (we multiply `init_params`' matrices by 5; gains and biases stay). With 0.02 the
#   model stays at chance for many more steps.
# * **lr** $10^{-3}$ with 100 warm-up steps, then cosine decay.
# * **Two clusters of T/2 tokens** (K = 2, W = T/2, so K·W = T): each routing query sees at most half
#   the sequence, and a query and its record share a cluster often enough for the pair to be learned.
#
# The two models have the same parameters and start from the same initial weights (the same seed);
# they differ only in what the first two heads of layer 1 do. Both are scored on the same 64
# held-out rows as they train. `train_recall` is reusable: exercise 3.4 calls it.

# %%
INIT_SCALE = 0.1 / 0.02  # std 0.1 instead of init_params' 0.02
RECALL_STEPS, RECALL_BATCH, EVAL_EVERY = (20, 8, 10) if FAST else (1000, 16, 50)


def train_recall(cfg, task, *, steps=RECALL_STEPS, batch_size=RECALL_BATCH, eval_every=EVAL_EVERY, seed=0):
    """Train one model on fresh recall batches with the answers-only loss.

    Returns a dict: params, kmeans_states, steps and accuracy (held-out, every eval_every steps), seconds.
    """
    tcfg = train.TrainConfig(steps=steps, batch_size=batch_size, lr=1e-3, min_lr=1e-4,
                             warmup_steps=min(100, steps // 10), weight_decay=0.1, grad_clip=1.0, eval_every=0)
    x_eval, y_eval, mask_eval = data.recall_task(64, cfg.seq_len, rng=np.random.default_rng(123), **task)
    rng = np.random.default_rng(seed)
    params = {k: (v * INIT_SCALE).astype(v.dtype) if v.ndim >= 2 else v
              for k, v in model.init_params(cfg, rng).items()}
    kmeans_states = model.init_kmeans(cfg, rng)
    opt_state = optim.adamw_init(params)
    data_rng = np.random.default_rng(seed + 1)  # the training stream; held-out rows come from seed 123
    out = {"steps": [], "accuracy": []}
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="routing" if cfg.n_route_heads else "local", mininterval=1.0):
        x, y, mask = data.recall_task(batch_size, cfg.seq_len, rng=data_rng, **task)  # (B, T) each
        params, opt_state, kmeans_states, _ = train.train_step(params, opt_state, kmeans_states, x, y, cfg,
                                                               tcfg, step, rng, mask=mask)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            logits, _ = model.forward(params, x_eval, cfg, kmeans_states)  # (B, T, V)
            out["steps"].append(step + 1)
            out["accuracy"].append(data.recall_accuracy(logits, y_eval, mask_eval))
    out.update(params=params, kmeans_states=kmeans_states, seconds=time.perf_counter() - start)
    return out


recall = {}
for name, c in (("routing", cfg_route), ("local", cfg_local)):
    recall[name] = train_recall(c, task)
    print(f"{name:8s} {sum(v.size for v in recall[name]['params'].values()):,} parameters, "
          f"{RECALL_STEPS} steps in {recall[name]['seconds']:.0f} s, "
          f"held-out accuracy {recall[name]['accuracy'][-1]:.3f}")
if not FAST:  # (FAST trains for a few steps only: no claim)
    assert recall["routing"]["accuracy"][-1] >= 0.9, "routing should have learned the recall task"
    assert recall["local"]["accuracy"][-1] <= 0.3, "local attention cannot see the records"

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
for (name, run), style in zip(recall.items(), ("o-", "s--")):
    label = "routing model (2 routing + 2 local heads in layer 1)" if name == "routing" else "local-only model"
    ax.plot(run["steps"], run["accuracy"], style, ms=4, mfc="none", label=label)
ax.axhline(1 / len(data.VALUE_ALPHABET), color="0.6", ls=":", label="chance (1/10)")
ax.set_ylim(0, 1.02)
ax.set_xlabel("training step")
ax.set_ylabel("held-out accuracy on the values")
ax.set_title(f"Associative recall, T = {T_R}, {P_R} records, {task['distance']}+ tokens back")
ax.legend(fontsize=8, loc="center right")
fig.savefig(FIG_DIR / "03_recall.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# *Accuracy on 64 held-out rows (8 values each) against training step.* The local model (squares)
# never leaves chance: whatever it learns, the record is out of its sight. The routing model (circles)
# sits at chance too for about 200 steps, then climbs to 100% within another 200. We ran this cell's
# code with three seeds: routing left chance near step 200, passed 0.9 between steps 400 and 500 and
# ended at 1.000 each time; the local model ended at 0.086 to 0.098. Such a sudden jump after a
# plateau is typical when a task needs a circuit across two layers, as this one does (below). The FAST
# run trains for a few steps only and shows both at chance.
#
# **Where does the routing head look?** `introspect.attention_matrix` rebuilds the full (T, T) weight
# matrix of one head, exactly what the head multiplies the values by. For each answer we know where
# its record lies, so we can measure how much weight the query puts on the record.

# %%
def record_position(x, i, task):
    """Position of the value byte of the earlier record whose key is x[i] (a query key)."""
    R = task["key_len"] + task["value_len"]
    keys = x[:task["n_pairs"] * R:R]  # (P,) the keys of the records, in order
    return int(np.flatnonzero(keys == x[i])[0]) * R + task["key_len"]


trained = recall["routing"]
x_show, _, mask_show = data.recall_task(8, T_R, rng=np.random.default_rng(7), **task)  # (B, T) each
weights = {head: introspect.attention_matrix(trained["params"], x_show, cfg_route, trained["kmeans_states"],
                                             layer=1, head=head) for head in range(cfg_route.n_route_heads)}
pairs = [(b, i, record_position(x_show[b], i, task)) for b, i in zip(*np.nonzero(mask_show))]
on_value = {head: np.mean([A[b, i, j] for b, i, j in pairs]) for head, A in weights.items()}
on_key = {head: np.mean([A[b, i, j - 1] for b, i, j in pairs]) for head, A in weights.items()}
windows = introspect.routes(trained["params"], x_show, cfg_route, trained["kmeans_states"])["h1"]["windows"]
together = np.mean([any(i in w and j in w for w in windows[b].reshape(-1, windows.shape[-1])) for b, i, j in pairs])
for head in weights:
    print(f"routing head {head}: mean weight on the record's value {on_value[head]:.2f}, on its key "
          f"{on_key[head]:.3f}")
print(f"query and record share a cluster (some head) for {together:.0%} of the answers")

# %%
HEAD = max(on_value, key=on_value.get)
A = weights[HEAD][0]  # (T, T), row 0
answers = [(i, j) for b, i, j in pairs if b == 0]
q_i, r_j = answers[0]
fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.6]})
ax = axes[0]
im = ax.imshow(np.where(A > 0, A, np.nan), cmap="viridis", vmin=0, vmax=max(A.max(), 1e-9))
ax.scatter([j for _, j in answers], [i for i, _ in answers], s=90, facecolors="none", edgecolors="red", lw=1.5,
           label="query key → its record's value")
ax.set_xlabel("key position j")
ax.set_ylabel("query position i")
ax.set_title(f"Routing head {HEAD} of layer 1, one recall row")
ax.legend(fontsize=8, loc="upper right")
fig.colorbar(im, ax=ax, label="attention weight", shrink=0.85)
ax = axes[1]
ax.bar(np.arange(T_R), A[q_i], color=["red" if t == r_j else "C0" for t in range(T_R)])
ax.axvspan(q_i - reach + 0.5, q_i + 0.5, color="0.85", zorder=0, label=f"a local head's reach ({reach} tokens)")
ax.annotate("the query itself", (q_i, A[q_i, q_i]), xytext=(q_i + 2, max(A[q_i]) * 0.9 + 0.02), fontsize=8,
            arrowprops=dict(arrowstyle="->", color="0.3"))
ax.set_xticks(np.arange(T_R))
ax.set_xticklabels([chr(c) for c in x_show[0]], family="monospace", fontsize=7)
ax.set_xlim(-0.7, T_R - 0.3)
ax.set_xlabel("key position (its byte)")
ax.set_ylabel("attention weight")
ax.set_title(f"The query at position {q_i} (key '{chr(x_show[0, q_i])}'): its record's value, "
             f"{q_i - r_j} tokens back, in red")
ax.legend(fontsize=8, loc="upper center")
fig.tight_layout()
fig.savefig(FIG_DIR / "03_recall_attention.png", dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# *Left: the weights of the routing head with the most weight on the records, on one held-out row*
# (blank: weight 0; row i holds the weights query i gives to each key j). The red circles mark, for
# each of the row's queries, the value byte of its record. Right: the row of the first query as bars,
# with the bytes of the row on the axis. In the full run the red bar stands about 40 tokens back, far
# outside the grey band that a local head could reach: the query takes about a third of its weight
# from exactly the byte it needs (0.38 and 0.34 on average over 64 answers, for the two routing
# heads). Most of the rest goes to the query itself, which is always in its own window; the other
# keys of the window get almost nothing. The bands of blank rows on the left are tokens that are in
# neither of this head's two windows: they get nothing from it (the local heads still serve them).
#
# The weight lands on the record's **value** byte, not on its key, though the query is a key. That is
# the two-layer circuit (an *induction head*). Layer 0 is local: there each value byte can read the
# key just before it, so its vector comes to carry "I follow key b". In layer 1 the query key "b"
# matches that vector, and the value it copies is the digit itself. One layer alone could not do it:
# a key cannot know its value yet (causality), and a value does not know its key without layer 0.
# The balanced windows hold half of the row each, so query and record share one nearly always.
#
# ## Summary
#
# * A model is a `Config`, a flat dict of parameters with stable names, and the k-means state of its
#   routing layers beside them (not parameters: updated by k-means after each step, never by the
#   optimiser).
# * The decoder is embeddings, pre-LN blocks $x + \operatorname{Attn}(\operatorname{LN}(x))$,
#   $x + \operatorname{MLP}(\operatorname{LN}(x))$, a final LN and the tied output: 45 lines of NumPy
#   give `model.forward`'s logits to $10^{-15}$.
# * The gradient of the whole loss (cross-entropy plus commitment) agrees with a central finite
#   difference to about $10^{-8}$: routing decisions are constants for autograd, and the loss is smooth
#   between them.
# * A training step is: batch, loss and gradient, clipping, AdamW, then the k-means update from the
#   statistics of the same forward pass. The cluster sizes can be read back from the EMA counts.
# * Replaying the forward pass up to the routing layer gives exactly the library's routing, and
#   shows which bytes share a cluster.
# * On associative recall the routing model learns to fetch a value 35 to 63 tokens back and reaches
#   100%; the same model with local heads only stays at chance.

# %% [markdown]
# ## 8. Exercises
#
# Each exercise has a stub to replace and a check cell that tells you whether your answer is right.
# The model answers are in `tutorials/solutions/03_train_tiny_lm.py`; try first.
#
# **Exercise 3.1 (easy): count the parameters from the Config.** Write `count_params(cfg)` returning a
# dict `name -> number of entries` for every parameter, computed from the Config's sizes alone (V, T,
# C, F = `ff_mult` · C, `n_layers`), not from `init_params` or `param_shapes`. Mind the options:
# `shared_qk=False` adds `w_k`, `tie_embeddings=False` adds `lm_head` (C, V), `pos_encoding="rotary"`
# removes `wpe`. The check compares names and sizes with the library over several Configs.

# %%
def count_params(cfg):
    """{parameter name: number of entries} from the Config's sizes."""
    raise NotImplementedError  # your code here


report("Exercise 3.1", ex03.check_count_params, count_params)

# %% [markdown]
# **Exercise 3.2 (medium): the answers-only cross-entropy.** Write
# `answers_cross_entropy(logits, targets, mask)`: logits (B, T, V), targets and a boolean mask (B, T);
# return the mean of $-\log \operatorname{softmax}(z_{b,t})_{y_{b,t}}$ over the positions where the mask
# is True (the first term of $\mathcal L$ in section 3). Subtract each row's maximum before the
# exponential (the log-sum-exp trick): the check also feeds logits of size 1000. The check compares
# with `model.loss(..., mask=mask)`.

# %%
def answers_cross_entropy(logits, targets, mask):
    """Mean cross-entropy (nats) over the masked positions."""
    raise NotImplementedError  # your code here


report("Exercise 3.2", ex03.check_answers_cross_entropy, answers_cross_entropy)

# %% [markdown]
# **Exercise 3.3 (medium): top-p sampling by hand.** Write `nucleus_probs(logits, temperature, top_p)`:
# the probability vector (V,) from which `sample.sample_next` draws the next byte. Divide the logits by
# the temperature, turn them into probabilities, keep the smallest set of most likely bytes whose
# probabilities add up to at least `top_p` (the byte that crosses `top_p` stays), set the others to 0
# and renormalise. The check compares with `sample.filter_logits`; the cell after it draws 20,000
# bytes with `sample.sample_next` from the trained model's logits after "def " and compares their
# frequencies with your probabilities.

# %%
def nucleus_probs(logits, temperature, top_p):
    """(V,) logits -> (V,) probabilities after temperature and top-p."""
    raise NotImplementedError  # your code here


report("Exercise 3.3", ex03.check_nucleus_probs, nucleus_probs)

# %%
next_byte = sample.next_logits(params, cfg, kmeans_states, data.encode("def ")[None].astype(np.int64))[0]  # (V,)
try:
    yours = nucleus_probs(next_byte, 0.8, 0.9)  # (V,)
except NotImplementedError:
    print("(exercise 3.3 not attempted yet: nothing to compare)")
else:
    draws = sample.sample_next(np.broadcast_to(next_byte, (20_000, len(next_byte))), np.random.default_rng(0),
                               temperature=0.8, top_p=0.9)  # (20000,) byte ids
    frequency = np.bincount(draws, minlength=len(next_byte)) / len(draws)  # (V,)
    kept = np.flatnonzero(yours > 0)
    listing = f": {data.decode(kept)!r}" if len(kept) <= 40 else " (an untrained model keeps most)"
    print(f"your nucleus keeps {len(kept)} bytes{listing}; sample_next drew "
          f"{len(np.unique(draws))} distinct bytes; largest |frequency - your probability| "
          f"{np.abs(frequency - yours).max():.3f} (sampling noise is about 0.003)")

# %% [markdown]
# **Exercise 3.4 (open): where does local attention fail?** Section 7 set every record 35 or more
# tokens before its query, far beyond the reach of a local head. Move the records closer and find the
# distance at which the local-only model stops recalling. In `data.recall_task` the shortest offset
# is `distance = T + 1 - (2P - 1)R` and the longest T − 1, so change T (and P) to move them, or keep the
# task and change the local reach (`block_size`, `look_back`). Train with `train_recall(cfg, task,
# steps=...)` (a few hundred steps of a small local model take a few seconds each).
#
# Return `(results, reach)`: `results` maps each shortest distance you tried to the local model's
# held-out accuracy, and `reach` is L · (`look_back` + 1) of your model. Try at least three distances,
# at least one within `reach` and one beyond twice it. Questions to answer in a markdown cell: is the
# limit `reach`, or twice it (two stacked local layers could pass a value along)? What does the routing
# model do at the distances where local fails? The check tests what any correct experiment shows: a
# local model cannot beat chance beyond twice its reach.

# %%
def local_limit():
    """Returns ({shortest distance: held-out accuracy of a local-only model}, reach)."""
    raise NotImplementedError  # your code here


report("Exercise 3.4", ex03.check_local_limit, local_limit)

# %%
print(f"notebook ran in {time.perf_counter() - NOTEBOOK_START:.0f} s")
