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
# # Tutorial 5: the same model on a GPU
#
# rt_numpy runs on NumPy arrays or on CuPy arrays (NVIDIA GPUs) with **the same code**: every
# differentiable operation is a primitive of `rt_numpy.ops` whose forward pass and derivative call the
# array module of their input (`xp = get_array_module(x)`), so nothing in the model says "NumPy" or "GPU".
# Three things make it work (docs/design.md#differentiation):
#
# 1. **autograd learns about CuPy arrays.** `backend.use_cupy()` registers `cupy.ndarray` as a type autograd
#    boxes while tracing, with a vector space (zeros, ones, sums) made of CuPy arrays.
#    autograd.numpy's own derivatives would build NumPy arrays in the backward pass; ours never do.
# 2. **State moves as a whole.** `backend.to_device(tree, "gpu")` copies params, optimiser and k-means
#    state (nested dicts) to the GPU; checkpoints are always written as host arrays.
# 3. **A few CUDA kernels** where plain CuPy would be slow or non-deterministic: a scatter-add without atomics,
#    balanced top-W by radix select, and the fused routing attention (`rt_numpy/kernels/cupy_*.py`).
#
# This notebook trains the same tiny model on both and checks that they agree. On a machine without CuPy
# or a GPU it says so and shows the CPU side only.

# %%
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from rt_numpy import backend, data, model, ops, optim, sample, train
from rt_numpy.kernels import cupy_ops

FAST = os.environ.get("RT_NUMPY_FAST") == "1"  # CI knob: fewer steps
FIG_DIR = Path(os.environ.get("RT_NUMPY_FIG_DIR") or tempfile.mkdtemp(prefix="rt_numpy_05_"))
FIG_DIR.mkdir(parents=True, exist_ok=True)

HAVE_GPU = backend.cupy_available()
if HAVE_GPU:
    cp = backend.require_gpu()  # imports CuPy and registers it with autograd
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    print("GPU:", name.decode() if isinstance(name, bytes) else name)
else:
    print("No CuPy or no GPU here: this notebook shows the CPU side only.")
    print("On a machine with an NVIDIA GPU: pip install 'rt_numpy[gpu]', then run it again.")

# %% [markdown]
# ## 1. Why the GPU scatter-add sorts first
#
# The routing heads end with a scatter-mean: every cluster adds its output rows into the positions they came
# from, and a position in several clusters receives several rows. NumPy's `np.add.at` adds them one after
# another. On a GPU the obvious way is one thread per row with an atomic add, but atomics land in whatever
# order the threads run, so the last bits of the result change from run to run. rt_numpy instead **sorts the
# rows by destination** (a stable sort keeps their order) and lets one thread add up each destination's
# segment in that order. Here is that idea from scratch in NumPy, checked against `ops.scatter_add_rows`:

# %%
rng = np.random.default_rng(0)
y = rng.standard_normal((12, 3))  # 12 rows of width 3 ...
rows = rng.integers(0, 5, size=12)  # ... going to 5 destinations, with repeats

order = np.argsort(rows, kind="stable")  # source rows grouped by destination, in their original order
starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=5))])  # where each group begins
mine = np.zeros((5, 3))
for destination in range(5):
    for j in range(starts[destination], starts[destination + 1]):  # the segment, in order
        mine[destination] += y[order[j]]

library = ops.scatter_add_rows(y[None], rows[None], 5)[0]  # (1, 12, 3) -> (1, 5, 3)
assert np.array_equal(mine, library)  # the same additions in the same order: bitwise equal
order_lib, starts_lib = cupy_ops.segments(rows, 5)  # the GPU kernel's own bookkeeping, run here on NumPy
assert np.array_equal(order_lib, order) and np.array_equal(starts_lib, starts)
print("segments:", starts, "-> sums equal np.add.at bitwise")

# %% [markdown]
# ## 2. One training step on both backends
#
# The tiny preset in float64, so that the two backends can be compared to many digits. The batch is drawn on the
# host and `train.train_step` copies it to wherever the parameters are.

# %%
cfg, tcfg = train.PRESETS["tiny"]
cfg = dataclasses.replace(cfg, dtype="float64")
tcfg = dataclasses.replace(tcfg, steps=10 if FAST else 60, eval_every=0)
rng = np.random.default_rng(1)
params, kmeans_states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
opt_state = optim.adamw_init(params)
raw, _ = data.load_corpus("python")
corpus = data.split(raw)
x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)  # (B, T) each

start = time.perf_counter()
cpu_step = train.train_step(params, opt_state, kmeans_states, x, y, cfg, tcfg, 0, rng)
print(f"CPU: loss {cpu_step[3]['loss']:.6f}, grad norm {cpu_step[3]['grad_norm']:.6f} "
      f"({1e3 * (time.perf_counter() - start):.0f} ms)")

if HAVE_GPU:
    on_gpu = backend.to_device((params, opt_state, kmeans_states), "gpu")
    assert isinstance(on_gpu[0]["wte"], cp.ndarray)
    gpu_step = train.train_step(*on_gpu, x, y, cfg, tcfg, 0, rng)  # warm-up: compiles the CUDA kernels
    start = time.perf_counter()
    gpu_step = train.train_step(*on_gpu, x, y, cfg, tcfg, 0, rng)
    cp.cuda.Device().synchronize()
    print(f"GPU: loss {gpu_step[3]['loss']:.6f}, grad norm {gpu_step[3]['grad_norm']:.6f} "
          f"({1e3 * (time.perf_counter() - start):.0f} ms)")
    assert abs(gpu_step[3]["loss"] - cpu_step[3]["loss"]) < 1e-10
    new_cpu, new_gpu = cpu_step[0], backend.to_numpy(gpu_step[0])
    worst = max(float(np.max(np.abs(new_gpu[k] - new_cpu[k]))) for k in new_cpu)
    print(f"largest difference between the updated parameters: {worst:.1e}")
    assert worst < 1e-9

# %% [markdown]
# ## 3. Training runs, side by side
#
# `train.train(..., device="gpu")` is the same loop as on the CPU (the command line's `--device gpu`).
# The loss curves should lie on top of each other.

# %%
runs = {"cpu": train.train(cfg, tcfg, corpus=corpus, progress=False, device="cpu")}
if HAVE_GPU:
    runs["gpu"] = train.train(cfg, tcfg, corpus=corpus, progress=False, device="gpu")

fig, ax = plt.subplots(figsize=(6, 3.5))
for name, run in runs.items():
    ax.plot([h["step"] for h in run["history"]], [h["cross_entropy"] for h in run["history"]],
            "-" if name == "cpu" else "--", label=name)
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats/byte)")
ax.legend()
fig.tight_layout()
fig.savefig(FIG_DIR / "cpu_vs_gpu_loss.png", dpi=100)
plt.show()

if HAVE_GPU:
    losses = [np.array([h["cross_entropy"] for h in runs[name]["history"]]) for name in ("cpu", "gpu")]
    print(f"largest loss difference over {len(losses[0])} steps: {np.max(np.abs(losses[0] - losses[1])):.1e}")
    assert np.allclose(losses[0], losses[1], rtol=1e-6)  # float64 on both: agreement to rounding

# %% [markdown]
# ## 4. Sampling, and a checkpoint written on one device and read on the other
#
# Greedy sampling (temperature 0) gives the same bytes on both. A checkpoint holds host arrays, so a model
# trained on a GPU is loaded, evaluated or resumed on a laptop, and the other way round.

# %%
prompt = data.encode("def ")[None].astype(np.int64)
texts = {name: sample.generate(run["params"], cfg, run["kmeans_states"], prompt, 40, rng=None, temperature=0.0)
         for name, run in runs.items()}
for name, ids in texts.items():
    print(f"{name}: {data.decode(ids[0])!r}")
if HAVE_GPU:
    assert np.array_equal(texts["cpu"], texts["gpu"])

last = runs["gpu" if HAVE_GPU else "cpu"]
path = FIG_DIR / "checkpoint"
train.save_checkpoint(path, params=last["params"], opt_state=last["opt_state"], kmeans_states=last["kmeans_states"],
                      step=last["step"], rng=last["rng"], cfg=cfg, tcfg=tcfg)
loaded = train.load_checkpoint(path)
assert all(isinstance(a, np.ndarray) for a in loaded["params"].values())  # host arrays, whoever wrote them
assert all(np.array_equal(loaded["params"][k], backend.to_numpy(last["params"][k])) for k in loaded["params"])
print(f"checkpoint of the {'GPU' if HAVE_GPU else 'CPU'} run read back as NumPy arrays: {len(loaded['params'])} "
      f"parameters, step {loaded['step']}")
