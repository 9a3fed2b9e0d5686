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
# # Tutorial 4: checking your own implementation against rt_numpy
#
# You wrote routing attention in PyTorch or JAX. Does it compute the same numbers as the Routing
# Transformer? This notebook is the recipe, step by step:
#
# 1. **make a case**: inputs, centroids set explicitly, the options of *your* conventions, and an
#    upstream gradient; `rt_numpy.crosscheck.reference` returns everything there is to compare;
# 2. **save it** as an `.npz` file any framework can read (`allow_pickle=False`);
# 3. **compare by name**: `crosscheck.assert_close` lists every array that differs, so a failure
#    points at the stage that is wrong (windows? outputs? gradients? the k-means update?);
# 4. the same with the implementation most people use, the PyTorch port (`routing-transformer`
#    1.6.1), as the worked example (skipped, with a message, when torch is not installed);
# 5. what each **convention** difference between the official code and the port does to the numbers;
# 6. the **golden vectors** in `tests/golden/`, for a check with no Python in common at all;
# 7. **is it causal?** A certificate for any attention callable, run on rt_numpy and on the port.
# 8. **inside a trained model**: the attention matrix a head really computes, and how much of its
#    dense softmax mass the routing windows keep.
#
# The worked example of steps 1-3 is a from-scratch NumPy implementation written here, so the
# notebook runs to the end without torch. Letters as in docs/algorithm.md#alphabet: q, k, v are (B, H, T, D),
# the centroids `means` are (H, K, D), windows are (B, H, K, W).

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import rt_numpy
from rt_numpy import crosscheck, kmeans

FAST = os.environ.get("RT_NUMPY_FAST") == "1"  # CI knob: fewer random cases in the sweeps
FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_04_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)
try:  # the PyTorch port is optional: section 4 needs it, everything else runs without it
    import torch
    from routing_transformer.routing_transformer import KmeansAttention, distribution
    HAVE_PORT = True
except ImportError:
    HAVE_PORT = False
np.set_printoptions(precision=4, suppress=True, linewidth=120)
print("FAST =", FAST, "| PyTorch port installed:", HAVE_PORT, "| figures saved in", FIG_DIR)

# %% [markdown]
# ## 1. Make a case
#
# Three things make a cross-check meaningful:
#
# * **Centroids set explicitly.** Both the official code and the port draw their centroids at random
#   (the port even does it lazily, from the first batch). Pass the same centroids to both sides.
# * **The same conventions.** The official code and the port differ in six routing options
#   (section 5). `crosscheck.official_conventions()` are rt_numpy's defaults;
#   `crosscheck.port_conventions(shared_qk)` are the port's. Pick the set your code follows.
# * **An upstream gradient.** A random $g$ (not ones) for the output, so that the gradients of
#   $L = \sum_{b,h,t,d} g_{bhtd}\,\text{out}_{bhtd}$ check every output element with a different weight.
#
# Small sizes keep every number printable; float64 leaves rounding out of the way.

# %%
B, H, T, D, K, W = 1, 2, 16, 8, 4, 4
rng = np.random.default_rng(0)
q, v, upstream = rng.standard_normal((3, B, H, T, D))  # three (B, H, T, D) arrays
means = kmeans.normalize(rng.standard_normal((H, K, D)), "l2")  # (H, K, D) unit centroids

conventions = crosscheck.port_conventions(shared_qk=True)
print(json.dumps(conventions, indent=1))
ref = crosscheck.reference(q, None, v, means, window_size=W, upstream=upstream, shared_qk=True, **conventions)
for name, array in ref.items():
    print(f"{name:18s} {str(array.shape):16s} {crosscheck.NAMES[name]}")

# %% [markdown]
# Everything is there: the routing decisions (`assignments`, `query_windows`, per-cluster
# `cluster_counts`/`cluster_sums`), the forward pass (`out`, `commitment`), the centroids after one
# k-means update (`new_means`), and the gradients, split into those of `sum(upstream * out)`
# (`grad_q`, `grad_v`) and those of the commitment loss (`commitment_grad_q`). Split, because a
# wrong total gradient does not tell you which of the two is wrong.

# %% [markdown]
# ## 2. Save it for your framework
#
# One `.npz` file, written atomically; the options travel with it as a JSON string, so nothing needs
# a pickle. Your test suite in another framework only needs `numpy.load`.

# %%
case_path = FIG_DIR / "case_port_shared_qk.npz"
crosscheck.save(case_path, ref)
with np.load(case_path, allow_pickle=False) as f:  # what your framework's test would do
    print(sorted(f.files))
    print(json.loads(str(f["options"])))
case = crosscheck.load(case_path)  # the same, with checks of the names and the options
assert all(np.array_equal(case[n], ref[n]) for n in ref)

# %% [markdown]
# ## 3. Your implementation, compared by name
#
# Here is "your" implementation: routing attention written from scratch with plain loops, following
# the port's conventions (docs/algorithm.md#1-one-routing-head). Per head, with $x_t$ the query of
# position $t$ (shared QK: the keys are the queries):
#
# 1. routing vectors: the queries scaled to unit length (docs/algorithm.md#11-normalise),
#    $\hat x_t = x_t / \max(\lVert x_t \rVert, 10^{-12})$;
# 2. similarities $S = \hat X \mu^\top \in \mathbb{R}^{T \times K}$; cluster $c$ takes the $W$ positions with
#    the largest $S_{tc}$, its window $I_c$, in top-k order (docs/algorithm.md#13-membership);
# 3. inside a cluster (docs/algorithm.md#14-attention-inside-a-cluster): for window ranks $r, s$, logits
#    $\ell_{rs} = x_{I_c[r]} \cdot \hat x_{I_c[s]} / \sqrt D$; the causal mask by *original* positions,
#    $\ell_{rs} = -\infty$ where $I_c[s] > I_c[r]$; the self logit $\ell_{rr} = -5 \cdot 10^4$ ("last resort");
#    then $P_c = \operatorname{softmax}(\ell)$ by rows and $O_c = P_c\, V[I_c]$;
# 4. scatter-mean (docs/algorithm.md#15-combine): each token averages the outputs of the $n_i$ windows
#    it is in,
#    $$\text{out}_i = \frac{\sum_{(c, r):\, I_c[r] = i} (O_c)_r}{n_i + \varepsilon}, \qquad \varepsilon = 10^{-5};$$
# 5. commitment loss (docs/algorithm.md#18-commitment-loss), a mean over all $N D$ elements, with
#    $a(x) = \arg\max_c \hat x \cdot \mu_c$ the nearest centroid and $\beta = 10^{-4}$:
#    $$\beta\, \frac{1}{N D} \sum_x \big\lVert \hat x - \mu_{a(x)} \big\rVert^2;$$
# 6. centroid update (docs/algorithm.md#16-centroid-update), with $\Sigma_c = \sum_{a(x) = c} \hat x$ and
#    $\lambda = 0.999$: $\mu_c \leftarrow \lambda \mu_c + (1 - \lambda)\, \Sigma_c / \lVert \Sigma_c \rVert$; an empty
#    cluster keeps its $\mu_c$.

# %%
def my_routing_attention(q, v, means, W, *, scale_logits=True, eps=1e-5, beta=1e-4, decay=0.999):
    """A from-scratch routing attention with the port's conventions (shared QK, causal)."""
    B, H, T, D = q.shape
    K = means.shape[1]
    out = np.zeros_like(q)
    windows = np.zeros((B, H, K, W), dtype=np.int64)
    errors, pooled = [], np.zeros((H, K, D))
    received = np.zeros((H, K), dtype=bool)
    for b in range(B):
        for h in range(H):
            x = q[b, h]  # (T, D)
            unit = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # (T, D)
            sims = unit @ means[h].T  # (T, D) @ (D, K) -> (T, K)
            nearest = sims.argmax(axis=1)  # (T,)
            errors.append(np.mean((unit - means[h][nearest]) ** 2))
            np.add.at(pooled[h], nearest, unit)
            received[h, nearest] = True
            total, count = np.zeros((T, D)), np.zeros(T)
            for c in range(K):
                members = np.argsort(-sims[:, c], kind="stable")[:W]  # (W,), most similar first
                windows[b, h, c] = members
                logits = x[members] @ unit[members].T  # (W, D) @ (D, W) -> (W, W)
                if scale_logits:
                    logits = logits / np.sqrt(D)
                logits = np.where(members[None, :] > members[:, None], -np.inf, logits)  # causal
                logits = np.where(members[None, :] == members[:, None], -5e4, logits)  # self: last resort
                p = np.exp(logits - logits.max(axis=1, keepdims=True))
                p /= p.sum(axis=1, keepdims=True)
                total[members] += p @ v[b, h, members]  # (W, W) @ (W, D) -> (W, D)
                count[members] += 1
            out[b, h] = total / (count + eps)[:, None]
    target = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)  # (H, K, D)
    new_means = np.where(received[..., None], decay * means + (1 - decay) * target, means)
    return {"out": out, "query_windows": windows, "commitment": beta * np.mean(errors), "new_means": new_means}


mine = my_routing_attention(q, v, means, W)
errors = crosscheck.assert_close(case, mine, rtol=1e-12)
for name, error in errors.items():
    print(f"{name:14s} relative error {error:.1e}")

# %% [markdown]
# `compare` measures a float array's error relative to its largest value, so elements near zero do not
# blow it up. For an expected array $e$ and yours $a$:
# $$\text{err}(a, e) = \frac{\max_i |a_i - e_i|}{\max_i |e_i|}.$$
# It compares integer arrays exactly (the error is the fraction of entries that differ), and it compares
# **windows as sets**: rt_numpy's windows
# are sorted by position, the port's (and those of the from-scratch code above) by decreasing
# similarity, a convention that changes no output.
#
# What does a failing check look like? Forget the $1/\sqrt D$ (the official code has none, the port has
# it) and `assert_close` names every array that moved:

# %%
try:
    crosscheck.assert_close(case, my_routing_attention(q, v, means, W, scale_logits=False), rtol=1e-12)
    raise RuntimeError("the check should have failed")
except AssertionError as failure:
    print(failure)
    assert "out" in str(failure) and "commitment" not in str(failure)

# %% [markdown]
# Only `out` moved: the windows, the commitment loss and the update do not depend on the logits.
# That is the point of comparing by name.
#
# **Gradients without autodiff.** Our NumPy implementation has no backward pass, but the reference
# gradients can still be checked. Take
# $$f(q) = \sum g \odot \text{out}(q) + \text{commitment}(q).$$
# Along any direction $r$, the directional derivative $\langle \nabla_q f, r \rangle = \sum_{bhtd}
# (\nabla_q f)_{bhtd}\, r_{bhtd}$ must equal the central difference
# $$\frac{f(q + h r) - f(q - h r)}{2h} = \langle \nabla_q f, r \rangle + O(h^2).$$
# Here $\nabla_q f$ is `grad_q + commitment_grad_q` from the case. The cell asserts agreement to
# $10^{-6} \max(1, |\langle \nabla_q f, r \rangle|)$. The routing decisions are piecewise constant in $q$, so $h$
# must be small enough not to change them. The $O(h^2)$ term is not the only error: rounding adds about
# $\epsilon_{\text{mach}} |f| / h$. With $h = 10^{-6}$ the two sides differ by $10^{-10}$ to $10^{-9}$ here, mostly
# from rounding, well inside the tolerance.

# %%
def objective(q_):
    result = my_routing_attention(q_, v, means, W)
    return np.sum(upstream * result["out"]) + result["commitment"]


h = 1e-6
for trial in range(2 if FAST else 5):
    r = np.random.default_rng(10 + trial).standard_normal(q.shape)
    numeric = (objective(q + h * r) - objective(q - h * r)) / (2 * h)
    analytic = np.sum((case["grad_q"] + case["commitment_grad_q"]) * r)
    print(f"direction {trial}: finite difference {numeric:+.8f}   reference {analytic:+.8f}")
    assert abs(numeric - analytic) < 1e-6 * max(1.0, abs(analytic))

# %% [markdown]
# ## 4. The worked example: the PyTorch port
#
# The same recipe against `routing_transformer.KmeansAttention`. What it takes:
#
# * `eval()` (no k-means bookkeeping, no dropout) and `dropout=0`;
# * the centroids written into `module.kmeans.means`, and `module.kmeans.initted` set to True:
#   otherwise the port replaces them at the first forward, from the batch;
# * float64 (`.double()`) for the tight check; float32 agrees to about $10^{-7}$ (asserted below $10^{-5}$);
# * the names mapped: the port's windows come flat, (B, H, K·W), in top-k order; its memory key/value
#   (separate QK only) have an extra axis of length 1.

# %%
if HAVE_PORT:
    def port_numbers(q, v, means, upstream, dtype=torch.float64):
        torch.manual_seed(0)
        module = KmeansAttention(K, W, H, D, causal=True, shared_qk=True, dropout=0.0).to(dtype).eval()
        module.kmeans.means.data.copy_(torch.from_numpy(means))
        module.kmeans.initted.data.fill_(True)
        tq = torch.tensor(q, dtype=dtype, requires_grad=True)
        tv = torch.tensor(v, dtype=dtype, requires_grad=True)
        out, aux = module(tq, tq, tv)  # shared QK: the keys are the queries
        grad_q, grad_v = torch.autograd.grad((out * torch.tensor(upstream, dtype=dtype)).sum(), [tq, tv],
                                             retain_graph=True)
        (commitment_grad_q,) = torch.autograd.grad(aux, [tq])
        with torch.no_grad():
            dists, _ = module.kmeans(tq)  # (B, H, T, K), similarities of the unit queries
            windows = distribution(dists, W).reshape(B, H, K, W)  # flat (B, H, K*W) -> (B, H, K, W)
        found = {"out": out, "commitment": aux, "grad_q": grad_q, "grad_v": grad_v,
                 "commitment_grad_q": commitment_grad_q, "query_windows": windows,
                 "assignments": dists.argmax(-1)[None]}  # (1, B, H, T): one stream
        # the k-means update: a training-mode forward collects it, update() applies it
        module.train()
        module(tq.detach(), tq.detach(), tv.detach())
        module.kmeans.update()
        found["new_means"] = module.kmeans.means
        return {n: t.detach().numpy() for n, t in found.items()}

    port = port_numbers(q, v, means, upstream)
    for name, error in crosscheck.assert_close(case, port, rtol=1e-10).items():
        print(f"{name:18s} relative error {error:.1e}")
    port32 = port_numbers(q, v, means, upstream, torch.float32)
    worst32 = max(crosscheck.compare(case, port32).values())
    print(f"float32 port against the float64 reference: worst relative error {worst32:.1e}")
    assert worst32 < 1e-5
else:
    print("torch / routing-transformer not installed: the port sections are skipped.\n"
          "Install them with: pip install torch==2.13.0 && pip install routing-transformer==1.6.1")

# %% [markdown]
# With separate QK the port adds one learned memory key/value per head and cluster (always visible):
# pass them as `mem_kv=(module.mem_key[:, :, 0], module.mem_value[:, :, 0])` with
# `port_conventions(shared_qk=False)`. `tests/test_port_agreement.py` runs both setups in float32
# and float64, and the k-means update and commitment loss on their own.

# %% [markdown]
# ## 5. What each convention does to the numbers
#
# Start from the port's conventions and switch one option at a time to the official value. The
# table shows how far each quantity moves (the relative error $\text{err}$ of section 3, as `compare`
# measures it): a difference of $10^{-2}$ in `out` is not rounding, it is a different model.

# %%
official = crosscheck.official_conventions()
differences = [n for n in conventions if conventions[n] != official[n]]
quantities = ["out", "grad_q", "commitment", "new_means"]
seeds = range(2 if FAST else 8)
moved = {}
for option in differences:
    runs = []
    for seed in seeds:
        g = np.random.default_rng(100 + seed)
        q_, v_, up_ = g.standard_normal((3, B, H, T, D))
        mu_ = kmeans.normalize(g.standard_normal((H, K, D)), "l2")
        base = crosscheck.reference(q_, None, v_, mu_, window_size=W, upstream=up_, **conventions)
        changed = crosscheck.reference(q_, None, v_, mu_, window_size=W, upstream=up_,
                                       **{**conventions, option: official[option]})
        runs.append(crosscheck.compare(base, changed))
    moved[option] = {n: float(np.median([r[n] for r in runs])) for n in quantities}

print(f"{'option':16s} {'port':>12s} {'official':>12s} " + " ".join(f"{n:>11s}" for n in quantities))
for option in differences:
    print(f"{option:16s} {str(conventions[option]):>12s} {str(official[option]):>12s} "
          + " ".join(f"{moved[option][n]:11.1e}" for n in quantities))

# %% [markdown]
# Reading the table (medians over random cases):
#
# * `norm` (unit vectors vs layer norm, whose vectors have norm about $\sqrt D$) moves everything:
#   routing, outputs, the commitment loss, the update.
# * `logits` ($q \cdot \hat k / \sqrt D$, raw queries against unit keys, vs $\hat q \cdot \hat k$ with no $\sqrt D$)
#   and `self_attend` change the attention inside the clusters: `out` and its gradients, nothing else.
# * `combine_eps` of the scatter-mean scales the output row of a token in $n$ windows by
#   $\frac{n + 10^{-5}}{n + 10^{-2}}$: about 1 % for a token in one cluster.
# * `commitment_qk` doubles the commitment loss with shared QK (the official code adds the queries' error
#   twice, $e_q + e_k = 2 e_q$), and its gradient `commitment_grad_q`.
# * `centroid_update` (spherical vs the VQ-VAE EMA of counts and sums) changes only the new centroids, and by
#   a lot here: from a fresh state (counts $n_c = 0$, sums $s_c = \mu_c$, no bias correction) the first EMA
#   step divides a sum that still holds $\lambda = 0.999$ of the initial centroids by a count of about
#   $(1 - \lambda) N_c = 0.001\, N_c$, so the means grow by orders of magnitude before the counts catch up. That is the
#   official behaviour (docs/algorithm.md#16-centroid-update), and why a cross-check of the EMA update
#   should also start from a state that has seen data, as `tests/golden/kmeans_update.npz` does.
#
# Let us assert what the bullets claim.

# %%
for option in ("logits", "self_attend", "combine_eps"):
    assert moved[option]["out"] > 1e-4 and moved[option]["commitment"] == 0 and moved[option]["new_means"] == 0
assert moved["commitment_qk"]["commitment"] == 1.0 and moved["commitment_qk"]["out"] == 0  # 2x: relative error 1
assert moved["centroid_update"]["new_means"] > 1e-3 and moved["centroid_update"]["out"] == 0
assert all(moved["norm"][n] > 1e-3 for n in quantities)
assert 0.005 < moved["combine_eps"]["out"] < 0.011  # (c + 1e-5) / (c + 1e-2) - 1 for c >= 1

fig, ax = plt.subplots(figsize=(9, 3.8))  # wide enough for the six option names
xs = np.arange(len(differences))
for i, n in enumerate(quantities):
    heights = [max(moved[o][n], 1e-17) for o in differences]  # 0 drawn at the floor
    ax.bar(xs + (i - 1.5) * 0.2, heights, width=0.2, label=n)
top = 10.0 ** (np.ceil(np.log10(max(max(m.values()) for m in moved.values()))) + 1)  # room above the tallest bar
ax.set_yscale("log")
ax.set_ylim(1e-17, top)
ax.set_xticks(xs, differences)
ax.set_xlabel("option switched from the port's value to the official one")
ax.set_ylabel("relative change (0 drawn at 1e-17)")
ax.set_title("Port conventions, one option switched to the official value")
ax.legend(fontsize=8, ncol=4, loc="upper left")
fig.tight_layout()
fig.savefig(FIG_DIR / "04_conventions.png", dpi=100)
plt.show()

# %% [markdown]
# *Figure: how far each quantity moves when one option is switched.* A bar at the floor ($10^{-17}$) is
# exactly 0: that quantity does not depend on the option. Read it column by column: `logits`,
# `self_attend` and `combine_eps` move only `out` and `grad_q`; `commitment_qk` moves only the loss (by a
# relative 1, a factor 2); `centroid_update` moves only `new_means`, by orders of magnitude; `norm` moves
# all four.

# %% [markdown]
# Beyond these six options the two codes also differ in where the centroids come from and when they
# move (the port initialises them lazily from raw data and updates them only through its language
# model's backward hook), in the memory key/value with separate QK, in the rotary positions, and in
# the port's language model ignoring its `commitment_factor`. `docs/conventions.md` lists every
# difference with the test that shows it.

# %% [markdown]
# ## 6. Golden vectors: a check with nothing in common but NumPy files
#
# `tests/golden/` holds small float64 `.npz` files made by `tests/golden/make_golden.py` with the
# official conventions: a k-means step, routing attention forward and backward (shared and separate
# QK), local attention (the function and a layer), and a tiny language model's loss and parameter
# gradients. `tests/golden/README.md` describes every array. Your framework's test loads a file,
# runs its own code on the stored inputs, and compares; here our NumPy implementation checks its
# routing decisions against the official-convention file (it follows the port's logits, so only
# the routing part is comparable: a nice illustration of section 5).

# %%
golden_dir = Path(rt_numpy.__file__).resolve().parent.parent / "tests" / "golden"
if (golden_dir / "routing_attention_shared_qk.npz").exists():
    golden = crosscheck.load(golden_dir / "routing_attention_shared_qk.npz")
    print({k: v for k, v in crosscheck.options(golden).items() if k != "format"})
    ln_q = kmeans.normalize(golden["q"], "ln")  # the official routing normalisation
    nearest = np.argmax(ln_q @ np.swapaxes(golden["means"], -1, -2)[None], axis=-1)  # (B, H, T)
    top_w = np.argsort(-(golden["means"][None] @ np.swapaxes(ln_q, -1, -2)), axis=-1, kind="stable")
    windows = np.sort(top_w[..., : golden["query_windows"].shape[-1]], axis=-1)  # (B, H, K, W)
    checked = crosscheck.assert_close(golden, {"assignments": nearest[None], "query_windows": windows}, rtol=0)
    print("routing decisions match the golden file:", checked)
else:
    print("tests/golden/ not found next to the installed package: skipped (run from a source checkout).")

# %% [markdown]
# ## 7. Is it causal?
#
# A causal mask hides later keys, but a content-based selection can still look ahead: with balanced
# membership a later token can evict an earlier one from its cluster (docs/algorithm.md#3-the-causal-leak).
# `causality.certify(fn, x, rng=...)` tests the property on any callable from NumPy to NumPy. For
# positions i it changes the inputs after i (one token, the whole suffix, copies of earlier tokens that
# compete for their clusters) and reports how far the outputs at positions ≤ i move. Here it checks
# rt_numpy's two memberships and, when torch is installed, the port's `KmeansAttention` through a
# wrapper that converts both ways.

# %%
from rt_numpy import attention, causality  # noqa: E402


def ours(membership):
    return lambda q_: attention.routing_attention(q_, None, v, means, window_size=W, membership=membership,
                                                  impl="ref")[0]


rng_c = np.random.default_rng(7)
for membership in ("nearest", "balanced"):
    cert = causality.certify(ours(membership), q, rng=rng_c, time_axis=2)
    print(f"rt_numpy, membership={membership!r}: {cert}\n")
    assert cert.passed == (membership == "nearest")

if HAVE_PORT:
    def port_attention(q_):
        module = KmeansAttention(K, W, H, D, causal=True, shared_qk=True, dropout=0.0).double().eval()
        module.kmeans.means.data.copy_(torch.from_numpy(means))
        module.kmeans.initted.data.fill_(True)
        with torch.no_grad():
            tq, tv = torch.from_numpy(q_), torch.from_numpy(v)
            return module(tq, tq, tv)[0].numpy()

    cert = causality.certify(port_attention, q, rng=rng_c, time_axis=2)
    print(f"the PyTorch port's KmeansAttention(causal=True): {cert}")
    assert not cert.passed  # the port trains with balanced membership too: the same leak

# %% [markdown]
# ## 8. Looking inside a model: the attention it really computes
#
# So far we checked one attention call. `rt_numpy.introspect` looks at a whole model:
# `attention_matrix(params, ids, cfg, states, layer=, head=)` rebuilds, from one traced forward pass,
# the (T, T) matrix A of a head whose output is exactly `A @ v` (tests/test_introspect.py holds it to
# 1e-10 for every kind of head), and `routes(...)` returns the windows of every routing layer. We
# train a tiny model for a few seconds on the Python corpus: two layers of four heads; in the second,
# heads 0-1 route (K = 4 windows of W = 16) and heads 2-3 are local (blocks of 16, one block back).

# %%
from matplotlib.colors import PowerNorm  # noqa: E402

from rt_numpy import baselines, data, introspect, model, optim, train  # noqa: E402

cfg_m = model.Config(seq_len=64, width=32, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                     num_clusters=4, window_size=16, block_size=16)
tcfg_m = train.TrainConfig(steps=60 if FAST else 200, batch_size=8, warmup_steps=5, eval_every=0)
corpus = data.split(data.load_corpus("python")[0])  # {"train", "val", "test"}: byte ids
rng_m = np.random.default_rng(0)
params_m, states_m = model.init_params(cfg_m, rng_m), model.init_kmeans(cfg_m, rng_m)
opt_m = optim.adamw_init(params_m)
for step in range(tcfg_m.steps):
    x, y = data.random_batches(corpus["train"], tcfg_m.batch_size, cfg_m.seq_len, rng_m)  # (B, T), (B, T)
    params_m, opt_m, states_m, metrics = train.train_step(params_m, opt_m, states_m, x, y, cfg_m, tcfg_m, step,
                                                          rng_m)
ids = corpus["val"][1000:1000 + cfg_m.seq_len].astype(np.int64)[None]  # (1, T): held-out bytes
print(f"{tcfg_m.steps} steps, last batch {data.bits_per_byte(metrics['cross_entropy']):.2f} bits/byte; "
      f"snippet {data.decode(ids[0])!r}")

# %% [markdown]
# The matrices of a routing head and a local head of layer 1, and the windows of the routing head.
# Two checks that the pictures show what the head computes: A is nonzero exactly where the
# visibility pattern of the windows (or of the local blocks) lets query $i$ see key $j$, and row $i$ sums
# to $n_i / (n_i + \varepsilon)$ for a token in $n_i$ windows (the scatter-mean, $\varepsilon$ = `combine_eps`),
# so to 0 for a token in none; a local row sums to 1.

# %%
T_m, K_m = ids.shape[1], cfg_m.num_clusters
A_route = introspect.attention_matrix(params_m, ids, cfg_m, states_m, layer=1, head=0)[0]  # (T, T)
A_local = introspect.attention_matrix(params_m, ids, cfg_m, states_m, layer=1, head=2)[0]  # (T, T)
win = introspect.routes(params_m, ids, cfg_m, states_m)["h1"]["windows"][:, :1]  # (1, 1, K, W): head 0
seen = baselines.visibility("routing", T_m, windows=win)[0, 0]  # (T, T): in how many windows i sees j
seen_local = baselines.visibility("local", T_m, block_size=cfg_m.block_size, look_back=cfg_m.look_back)
n_in = np.bincount(win.ravel(), minlength=T_m)  # (T,): windows holding each token
assert np.array_equal(A_route > 0, seen > 0) and np.array_equal(A_local > 0, seen_local > 0)  # the pattern
np.testing.assert_allclose(A_route.sum(1), n_in / (n_in + cfg_m.combine_eps), rtol=0, atol=1e-12)  # 0 if in none
np.testing.assert_allclose(A_local.sum(1), 1.0, rtol=0, atol=1e-12)

first = np.full(T_m, K_m)  # each token's first window (K: in none), to sort the positions by cluster
for c in reversed(range(K_m)):
    first[win[0, 0, c]] = c
order = np.argsort(first, kind="stable")  # by cluster, then by position
edges = np.cumsum(np.bincount(first, minlength=K_m + 1))  # where each group ends in the sorted order
centres = (np.concatenate([[0], edges[:-1]]) + edges) / 2 - 0.5
fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained")
colours = dict(cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
for ax, M, title in ((axes[0], A_route, "routing head (layer 1, head 0)"),
                     (axes[1], A_route[np.ix_(order, order)], "the same, positions grouped by window"),
                     (axes[2], A_local, "local head (layer 1, head 2)")):
    shown = ax.imshow(np.ma.masked_equal(M, 0), **colours)  # masked (white): a key the query does not see
    ax.set(title=title, xlabel="key position", ylabel="query position")
names = [f"w{c}" for c in range(K_m)] + ["none"]
axes[1].set(xticks=centres, xticklabels=names, yticks=centres, yticklabels=names,
            xlabel="key, by first window", ylabel="query, by first window")
for e in edges[:-1]:
    axes[1].axhline(e - 0.5, color="0.6", lw=0.6)
    axes[1].axvline(e - 0.5, color="0.6", lw=0.6)
fig.colorbar(shown, ax=axes, shrink=0.85, label="attention weight (white: not seen)")
fig.savefig(FIG_DIR / "04_attention_matrices.png", dpi=100)
plt.show()

# %% [markdown]
# In the sorted panel each window is a triangle on the diagonal (causal inside the window); the few
# weights off the blocks belong to tokens held by two windows, and the last rows, of tokens held by
# none, are empty: the routing head gives them 0 and only the local heads carry them.
#
# **Attention-mass recall** asks what the windows leave out: had this head attended to every earlier
# key with its own logits ($\hat q_i \cdot \hat q_j$, the `"normalized"` logits), how much of each query's
# softmax mass would fall on the keys its windows show? With $\mathcal{V}_i$ the keys query $i$ sees
# (positions from 0):
# $$p_{ij} = \frac{\exp(\hat q_i \cdot \hat q_j)}{\sum_{j' \le i} \exp(\hat q_i \cdot \hat q_{j'})} \ (j \le i), \qquad
# \text{recall}_i = \sum_{j \in \mathcal{V}_i} p_{ij}.$$
# A content-blind choice of as many keys per query keeps, on average, their share of the earlier keys,
# $|\mathcal{V}_i| / (i + 1)$; routing earns its keep if it does better than that.

# %%
trace_m = {}
model.forward(params_m, ids, cfg_m, states_m, trace=trace_m)
qn_m = kmeans.normalize(trace_m["h1"]["q"][:, :1], cfg_m.norm)  # (1, 1, T, D): routing head 0
recall, blind = {}, {}
for name, counts in (("routing windows", seen), ("local blocks", seen_local),
                     ("dense", baselines.visibility("dense", T_m))):
    recall[name] = baselines.attention_mass_recall(qn_m, qn_m, counts, scale=1.0).mean()
    blind[name] = np.mean((counts > 0).sum(1) / np.arange(1, T_m + 1))  # a random pick of as many earlier keys
    print(f"{name:16s} {baselines.keys_per_query(counts):5.1f} keys per query   mass recall {recall[name]:.2f}   "
          f"(content-blind, as many keys: {blind[name]:.2f})")
print(f"{(n_in == 0).sum()} of {T_m} tokens are in no window of head 0")
assert recall["routing windows"] > blind["routing windows"]  # the windows pick keys by content

# %% [markdown]
# After the full 200 steps the windows keep about 1.5 times the mass of a blind pick of as many keys
# (0.41 against 0.28 when this was written; the cell above prints this run's numbers), while the local
# blocks keep no more than their share of the keys: what
# this head would attend to is found by content, not by distance. After the 60 steps of the fast run
# the centroids have only begun to separate, and the gain is small.

# %% [markdown]
# ## Summary
#
# * `crosscheck.reference(...)` gives every intermediate a framework author wants, with documented
#   names (`crosscheck.NAMES`); `save`/`load` keep them in an `.npz` without pickles.
# * `crosscheck.assert_close(expected, yours, rtol=...)` names the arrays that differ; windows are
#   compared as sets, integers exactly.
# * Set the centroids explicitly, match the conventions, use a random upstream gradient, compare in
#   float64 first.
# * With `port_conventions`, rt_numpy equals the PyTorch port to rounding (1e-10 in float64 here,
#   1e-15 in practice); with the official defaults it does not, by design: section 5 shows by how much.
# * `causality.certify(fn, x, rng=...)` tells whether any attention callable looks ahead; balanced
#   membership does, in rt_numpy and in the port alike, and `membership="nearest"` does not.
# * `introspect.attention_matrix` and `introspect.routes` show what a model's heads compute;
#   `baselines.attention_mass_recall` measures what the windows leave out.

# %% [markdown]
# ## Exercises
#
# Four exercises, from easy to open. Each has a stub: replace its `raise NotImplementedError` with your
# answer and run the check cell below it. The checks recompute rt_numpy's numbers on your inputs, or ask
# `crosscheck.compare` what differs; they never compare with numbers stored in advance. Model answers are
# in `tutorials/solutions/04_crosscheck.py`: try first.
#
# ### Exercise 4.1 (easy): a case of your own, saved, reloaded and compared by name
#
# Make a case with the **official** conventions, `crosscheck.official_conventions()`, for inputs of your
# own (the sizes of section 1, another seed). Save it with `crosscheck.save`, reload it with
# `crosscheck.load`, and compute from scratch, from the reloaded `q` and `means` only, two routing
# decisions:
#
# * `assignments`, shape (1, B, H, T): the nearest centroid $a(x) = \arg\max_c \hat x \cdot \mu_c$ of each
#   query after the official normalisation, a layer norm with no scale or shift
#   (docs/algorithm.md#11-normalise):
#   $$\hat x = \frac{x - \bar x}{\sqrt{\operatorname{var}(x) + 10^{-6}}};$$
# * `cluster_counts`, shape (1, H, K): $N_c$, how many of the $B \cdot T$ queries of each head have $a(x) = c$.
#
# The leading axis of length 1 is the stream axis S: one stream with shared QK (see `crosscheck.NAMES`).
# Return the path and a dict `{name: array}`. The check reloads your file, recomputes the reference
# from the inputs it holds, and compares your two arrays by name (exactly: they are integers).

# %%
from checks import ex04, report  # noqa: E402


def official_case():
    """Return (path, mine): the path of your saved official-convention case, and {name: array} computed
    from scratch from the reloaded q and means."""
    raise NotImplementedError


# %%
report("Exercise 4.1", ex04.check_saved_case, official_case)

# %% [markdown]
# ### Exercise 4.2 (medium): plant a bug, predict which names fail
#
# Comparing by name helps only if you can read a failure. Plant three bugs in copies of
# `my_routing_attention` (section 3), one bug per copy:
#
# * `"causal_by_rank"`: the causal mask compares ranks inside the window, $s > r$, instead of original
#   positions, $I_c[s] > I_c[r]$;
# * `"no_combine_eps"`: the scatter-mean divides by $n_i$ instead of $n_i + \varepsilon$;
# * `"commitment_squared_norms"`: the commitment loss as a mean of squared norms,
#   $\frac{\beta}{N} \sum_x \lVert \hat x - \mu_{a(x)} \rVert^2$ (a sum over D, then a mean over the $N$
#   points), instead of the mean over all $N D$ elements;
# * optional: a bug of your own. Can you find one that moves `query_windows` but not `commitment`?
#
# For each bug, **first** write down which of the four names the function returns (`out`,
# `query_windows`, `commitment`, `new_means`) will fail against `case` at `rtol=1e-12`. **Then** run
# `crosscheck.compare(case, buggy(q, v, means, W))` and look. A name fails when its error is above
# `rtol`, or when an integer array differs. A NaN or an infinity where the reference has none is an
# error of `inf`: it always fails.
#
# Return `{bug: (buggy_fn, predicted_names)}`, where `buggy_fn(q, v, means, W)` returns a dict like
# `my_routing_attention`'s. The check runs every function on `case` and compares your prediction with what
# `compare` reports. It also checks that each named bug does what its description says.
#
# Then answer for yourself. Why would an implementation whose windows are sorted by position, as
# rt_numpy's are, never notice `"causal_by_rank"`? Where does the NaN of `"no_combine_eps"` come from?

# %%
def planted_bugs():
    """Return {bug name: (buggy_fn, predicted failing names)}, buggy_fn(q, v, means, W) -> dict."""
    raise NotImplementedError


# %%
report("Exercise 4.2", ex04.check_planted_bugs, planted_bugs, case)

# %% [markdown]
# ### Exercise 4.3 (medium): the backward pass of the scatter-mean, by hand
#
# The routing decisions depend on $q$ only. For a fixed $q$, the windows $I_c$ and the weights $P_c$ are
# fixed too, and the output is linear in the values. With $\tilde g_i = g_i / (n_i + \varepsilon)$, the
# objective of section 1 is
# $$L = \sum_i g_i \cdot \text{out}_i = \sum_c \sum_r \tilde g_{I_c[r]} \cdot \big(P_c\, V[I_c]\big)_r .$$
# Write `my_grad_v(q, v, means, W, upstream)`, which returns $\partial L / \partial V$ with shape
# (B, H, T, D), with no autodiff and no finite differences: replay the loops of `my_routing_attention`,
# and send each window's share of the upstream gradient back through $O_c = P_c V[I_c]$. It must equal
# the case's `grad_v` to a relative error of $10^{-10}$, on `case` and on a fresh case of other sizes
# that the check makes.
#
# Then check your answer with a central difference along a random direction of $v$, as in section 3,
# for $h = 10^{-3}$, $1$ and $100$. Why is the difference exact, up to rounding, for every $h$?

# %%
def my_grad_v(q, v, means, W, upstream):
    """d sum(upstream * out) / dv of the port-convention routing attention, by hand: (B, H, T, D)."""
    raise NotImplementedError


# %%
report("Exercise 4.3", ex04.check_grad_v, my_grad_v, case)

# %% [markdown]
# ### Exercise 4.4 (open): port the loop version to PyTorch, and check it against the saved `.npz`
#
# Write `torch_routing_attention(q, v, means, W)` in PyTorch. The inputs are float tensors: q and v are
# (B, H, T, D) and means is (H, K, D). Follow the port's conventions of section 3, and return a dict of
# tensors: `out` (B, H, T, D), `query_windows` (B, H, K, W), `commitment` (0-d) and `new_means` (H, K, D).
#
# The check makes the gradients itself with `torch.autograd.grad`: `grad_q` and `grad_v` of $L$, and
# `commitment_grad_q`. So keep the graph: no `.numpy()`, `.detach()` or `torch.no_grad()` on the way
# from q and v to `out` and `commitment` (the centroid update may run under `torch.no_grad()`, since
# the centroids get no gradient). The check compares all seven names with three cases: the file you
# saved in section 2 (`case_path`) in float64 to $10^{-10}$, the same file in float32 to $10^{-5}$, and
# a fresh case of other sizes (B = 2, T = 24, K = 3, W = 6).
#
# Start with a loop-for-loop translation. Once it passes, go further in any direction you like:
#
# * remove the loops over b, h and c: one gather of the windows, batched matrix products, one
#   `scatter_add`;
# * time your version against the port's `KmeansAttention` (section 4) as T grows;
# * write the same in JAX, and check it with `ex04.check_port_numbers(numbers, case)`, where `numbers`
#   holds the seven names as NumPy arrays, your `jax.grad` results included.
#
# Without torch, the check cell says that it skipped this exercise.

# %%
def torch_routing_attention(q, v, means, W):
    """Routing attention with the port's conventions, in PyTorch: a dict of tensors, differentiable in q, v."""
    raise NotImplementedError


# %%
if ex04.torch_installed():
    report("Exercise 4.4", ex04.check_torch_port, torch_routing_attention, case_path)
else:
    print(ex04.TORCH_SKIP)
