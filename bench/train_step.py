"""Benchmark: one full training step of the language model against the PyTorch port.

    python bench/train_step.py [--json PATH] [--quick] [--no-torch] [--no-memory]

Training-step throughput (tokens/s) at the PyTorch port's configuration: width
C=512, 2 layers, 8 heads (D=64) of which 4 local and 4 routing in every layer,
window W=128 (routing clusters of 128 tokens, local blocks of 128 looking one
block back), K = T // 128 clusters, vocabulary 256, batch 1, T in {1024, 8192},
float32, causal, shared QK, all measured in this run:

* ``rt_numpy-numba`` / ``rt_numpy-ref``: :func:`rt_numpy.train.train_step` with
  ``impl="numba"`` / ``"ref"`` (``ref`` at T=1024 only): the loss and its
  gradient by autograd, global-norm clipping at 1.0, AdamW (lr 3e-3, betas
  (0.9, 0.95), weight decay 0.1 on matrices) and the EMA k-means update of both
  routing layers.  Config: ``n_route_layers=2, num_clusters=T//128,
  window_size=block_size=128`` and the library's defaults otherwise (learned
  absolute positions, tied embeddings, ff_mult 4).
* ``routing_transformer``: the port's ``RoutingTransformerLM(num_tokens=256,
  dim=512, depth=2, max_seq_len=T, heads=8, dim_head=64, n_local_attn_heads=4,
  window_size=128, causal=True)``, its defaults otherwise: shared QK (default
  when causal), local window 128 (defaults to window_size) with one block of
  look-back and relative position embeddings, rotary positions on the routing
  heads, untied output layer, ff_mult 4, k-means EMA decay 0.999, commitment
  1e-4; its ``num_clusters`` is ``max_seq_len // window_size = T // 128``
  (8 at T=1024, 64 at T=8192), the same as ours.  One step = forward,
  ``cross_entropy(logits, y) + aux_loss``, backward, ``clip_grad_norm_(1.0)``,
  ``torch.optim.AdamW`` (same hyper-parameters and decay groups as ours), the
  k-means update and ``zero_grad``.  The port applies the k-means update from a
  backward hook that it registers itself (``_register_kmeans_update=True``);
  after each backward the script checks every ``Kmeans`` module and calls
  ``update()`` on any whose hook did not run, so the update happens every step
  either way.  ``torch.set_num_threads(2)``.

NumPy and torch are timed in separate phases (their thread pools interfere when
interleaved).  Every phase runs with freed memory kept for reuse
(:func:`rt_numpy.runtime.configure_process`, set once for the whole process).
Times are medians over several steps after warm-up steps (the port's first step also runs its lazy
k-means initialisation).  Peak memory is
the growth of the process's peak resident set (VmHWM) during one training step
at T, in a fresh interpreter per (impl, T), after a warm-up step of a small
model (compiling the Numba kernels, loading torch's kernels) and after the
model, its optimiser and the batch at T exist (the port's measured step is its
first at T: it includes the lazy k-means initialisation and AdamW's state).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, median_ms, print_table, record, torch_anchors_available, write_json  # noqa: E402

V, LAYERS, HEADS, LOCAL_HEADS = 256, 2, 8, 4
FULL = {"C": 512, "W": 128, "Ts": [1024, 8192]}
QUICK = {"C": 128, "W": 64, "Ts": [256]}
LR, BETAS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.95), 0.1, 1.0
TORCH_THREADS = 2


def batch(T, seed=0):
    """Random byte ids (1, T) and next-byte targets (1, T)."""
    seq = np.random.default_rng(seed).integers(0, V, size=(1, T + 1))
    return seq[:, :-1], seq[:, 1:]


# ----------------------------------------------------------------- ours
def ours(kind, T, C, W):
    """A function running one rt_numpy training step per call; kind: 'numba' or 'ref'."""
    from rt_numpy import model, optim, train

    cfg = model.Config(vocab_size=V, seq_len=T, width=C, n_layers=LAYERS, num_heads=HEADS,
                       n_route_heads=HEADS - LOCAL_HEADS, n_route_layers=LAYERS, num_clusters=T // W,
                       window_size=W, block_size=W, dtype="float32")
    tcfg = train.TrainConfig(steps=10**6, batch_size=1, lr=LR, warmup_steps=0, weight_decay=WEIGHT_DECAY,
                             grad_clip=CLIP)
    rng = np.random.default_rng(0)
    state = {"params": model.init_params(cfg, rng), "kmeans": model.init_kmeans(cfg, rng), "step": 0}
    state["opt"] = optim.adamw_init(state["params"])
    x, y = batch(T)

    def step():
        state["params"], state["opt"], state["kmeans"], _ = train.train_step(
            state["params"], state["opt"], state["kmeans"], x, y, cfg, tcfg, state["step"], rng, impl=kind)
        state["step"] += 1
    return step


# ----------------------------------------------------------------- the PyTorch port
def port(kind, T, C, W):
    """A function running one training step of the port's RoutingTransformerLM per call."""
    import torch
    import torch.nn.functional as F
    from routing_transformer import RoutingTransformerLM
    from routing_transformer.routing_transformer import Kmeans

    del kind
    # The port registers its k-means update as a non-full backward hook; torch warns about it every step.
    warnings.filterwarnings("ignore", message="Using a non-full backward hook", category=FutureWarning)
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(0)
    net = RoutingTransformerLM(num_tokens=V, dim=C, depth=LAYERS, max_seq_len=T, heads=HEADS,
                               dim_head=C // HEADS, n_local_attn_heads=LOCAL_HEADS, window_size=W, causal=True)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=1e-8)
    kmeans_modules = [m for m in net.modules() if isinstance(m, Kmeans)]
    assert len(kmeans_modules) == LAYERS, "expected one Kmeans module per layer"
    x, y = (torch.from_numpy(a) for a in batch(T))

    def step():
        logits, aux_loss = net(x)  # (1, T, V), scalar
        loss = F.cross_entropy(logits.transpose(1, 2), y) + aux_loss
        loss.backward()
        for m in kmeans_modules:  # the port's backward hook normally did this already
            if m.new_means is not None:
                m.update()
                step.missed_hooks += 1
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.missed_hooks = 0
    step.kmeans_modules = kmeans_modules
    return step


IMPLS = {  # record name -> (maker, kind)
    "rt_numpy-numba": (ours, "numba"),
    "rt_numpy-ref": (ours, "ref"),
    "routing_transformer": (port, "port"),
}
PORT = "routing_transformer"


def runs_at(impl, T, quick):
    return impl != "rt_numpy-ref" or quick or T <= 1024


def schedule(T, quick):
    """(warm-up steps, timed steps).  Enough timed steps that the median is steady on a shared
    machine (with 5 and 3 of them, the runs of 2026-11-28 saw medians move by 8% from run to run)."""
    if quick:
        return 1, 2
    return (3, 11) if T <= 1024 else (2, 7)


# ----------------------------------------------------------------- peak memory
def peak_mib(impl, T, C, W):
    """Growth of the peak resident set (MiB) during one training step at T, in a fresh interpreter.

    The peak is the process's ``VmHWM`` (Linux), which starts afresh at exec; the
    ``ru_maxrss`` of a child process also counts the parent's resident set at the
    fork, so after the parent's own large steps it would hide the child's growth.
    ``ru_maxrss`` is the fallback where ``/proc`` is missing.
    """
    small = 2 * W
    code = f"""
import resource, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import train_step as b
from rt_numpy import runtime; runtime.configure_process()  # as in the timing phase
maker, kind = b.IMPLS[{impl!r}]
maker(kind, {small}, {C}, {W})()      # compile / warm up on a small model
run = maker(kind, {T}, {C}, {W})      # model, optimiser and batch allocated before the baseline
before = b.peak_kib()
run()
print((b.peak_kib() - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {impl} T={T} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def peak_kib():
    """This process's peak resident set so far, KiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def check_port_kmeans(step):
    """The port's centroids must move in a step (the k-means update ran)."""
    before = [m.means.clone() for m in step.kmeans_modules]
    step()
    moved = all(not bool((m.means == b).all()) for m, b in zip(step.kmeans_modules, before))
    if not moved:
        raise RuntimeError("the port's k-means centroids did not change during a training step")


def main(argv=None):
    parser = bench_parser(__doc__, "T=256, width 128, 2 steps (a smoke test)", torch_and_memory=True)
    args = parser.parse_args(argv)
    have_torch = torch_anchors_available(skip=args.no_torch)
    sizes = QUICK if args.quick else FULL
    C, W, Ts = sizes["C"], sizes["W"], sizes["Ts"]
    impls = [i for i in IMPLS if have_torch or i != PORT]
    machine = machine_line() + (f"; torch threads {TORCH_THREADS}" if have_torch else "")
    print(f"machine: {machine}")

    def case(T):
        return {"T": T, "B": 1, "C": C, "layers": LAYERS, "H": HEADS, "H_local": LOCAL_HEADS, "W": W, "V": V}

    records, times, memory = [], {}, {}
    # Phase by library: all NumPy/Numba timings, then all torch timings.
    for impl in impls:
        maker, kind = IMPLS[impl]
        for T in Ts:
            if not runs_at(impl, T, args.quick):
                continue
            warmup, repeats = schedule(T, args.quick)
            step = maker(kind, T, C, W)
            if impl == PORT:  # two warm-up steps: the lazy k-means init, then a checked update
                step()
                check_port_kmeans(step)
                warmup = max(warmup - 2, 0)
            ms = median_ms(step, repeats, warmup=warmup)
            if impl == PORT and step.missed_hooks:
                print(f"  note: the port's backward hook missed {step.missed_hooks} k-means updates "
                      "(done by the script instead)")
            del step
            times[impl, T] = ms
            record(records, impl, case(T), "ms", ms, "ms")
            record(records, impl, case(T), "tokens_per_s", T / (ms * 1e-3), "tokens/s")
            print(f"  {impl:20s} T={T:5d}  {ms:9.1f} ms/step  {T / (ms * 1e-3):9.0f} tokens/s", flush=True)

    if not args.no_memory:
        for impl in impls:
            for T in Ts:
                if runs_at(impl, T, args.quick):
                    memory[impl, T] = peak_mib(impl, T, C, W)
                    record(records, impl, case(T), "peak_mib", max(memory[impl, T], 1e-3), "MiB")
                    print(f"  {impl:20s} T={T:5d}  peak {memory[impl, T]:8.0f} MiB", flush=True)

    print(f"\n### training step, B=1, C={C}, {LAYERS} layers, {HEADS} heads ({LOCAL_HEADS} local), W={W}, V={V}, "
          "float32 (median; ratio = ours / port tokens/s)")
    rows = []
    for T in Ts:
        port_ms = times.get((PORT, T))
        for impl in impls:
            if (impl, T) not in times:
                continue
            ms = times[impl, T]
            mem = memory.get((impl, T))
            rows.append([str(T), impl, f"{ms:.1f}", f"{T / (ms * 1e-3):,.0f}",
                         f"{mem:.0f}" if mem is not None else "-",
                         f"{port_ms / ms:.2f}x" if port_ms else "-"])
    print_table(["T", "impl", "ms/step", "tokens/s", "peak MiB", "ours/port"], rows)
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
