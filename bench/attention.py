"""Benchmark: routing attention against dense causal attention and the PyTorch port.

    python bench/attention.py [--json PATH] [--quick] [--no-torch] [--no-memory]

Forward and forward+backward, 1 head and 8 heads, D=64, float32, T from 1024 to
16384 with W = round(sqrt(T)) and K = T // W, all measured in this run:

* ``rt_numpy-numba``: our routing attention, fused Numba kernels;
* ``rt_numpy-ref``: our routing attention, reference path;
* ``numpy``: our dense causal attention (:func:`rt_numpy.attention.dense_causal_attention`);
* ``routing_transformer``: the PyTorch port's ``KmeansAttention`` (causal, shared QK);
* ``torch-sdpa``: ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``.

Routing is shared-QK everywhere (every released LM config); "forward+backward"
is the gradient of ``sum(out * g)`` (plus the commitment loss) with respect to
q and v.  NumPy and torch are timed in separate phases (their thread pools
interfere when interleaved).  Every phase runs with freed memory kept for reuse
(:func:`rt_numpy.runtime.configure_process`, set once for the whole process).
Peak memory is the growth of the process's peak resident set (VmHWM) while one forward+backward
runs, each in a fresh process.
The growth exponent is the least-squares slope of log(ms) against log(T) over
T = 2048 ... 16384.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    bench_parser,
    machine_line,
    median_ms,
    print_table,
    record,
    torch_anchors_available,
    torch_attention_loss,
    write_json,
)

D = 64
# Dense attention only up to H*T*T = 2^28 (1 head at T=16384): 8 heads at T=8192 needed over 24 GiB.
DENSE_MAX_ELEMENTS = 2**28


def window_for(T):
    W = int(round(math.sqrt(T)))
    return W, T // W


def inputs(H, T, seed=0):
    rng = np.random.default_rng(seed)
    q, v, g = (rng.standard_normal((1, H, T, D), dtype=np.float32) for _ in range(3))
    return q, v, g


# ----------------------------------------------------------------- our implementations
def ours(kind, H, T, backward):
    """A function running one forward (and backward) of ours; kind: 'numba', 'ref' or 'dense'."""
    import autograd

    from rt_numpy import attention, kmeans, ops

    q, v, g = inputs(H, T)
    W, K = window_for(T)
    means = kmeans.init_state(H, K, D, rng=np.random.default_rng(1))["means"]  # (H, K, D)

    def forward(q, v):
        if kind == "dense":
            return ops.sum(ops.multiply(attention.dense_causal_attention(q, q, v), g))
        out, loss, _ = attention.routing_attention(q, None, v, means, window_size=W, impl=kind)
        return ops.add(ops.sum(ops.multiply(out, g)), loss)

    if not backward:
        return lambda: forward(q, v)
    both = autograd.grad(lambda qv: forward(qv[0], qv[1]))
    return lambda: both((q, v))


# ----------------------------------------------------------------- torch implementations
def theirs(kind, H, T, backward):
    """kind: 'port' (routing_transformer.KmeansAttention) or 'sdpa'."""
    import torch

    q, v, g = (torch.from_numpy(a) for a in inputs(H, T))
    W, K = window_for(T)
    forward = torch_attention_loss(kind, g, K, W, H, D)

    if not backward:
        def run():
            with torch.no_grad():
                forward(q, v)
        return run

    def run():
        qq, vv = q.clone().requires_grad_(), v.clone().requires_grad_()
        forward(qq, vv).backward()
    return run


IMPLS = {  # record name -> (maker, kind)
    "rt_numpy-numba": (ours, "numba"),
    "rt_numpy-ref": (ours, "ref"),
    "numpy": (ours, "dense"),
    "routing_transformer": (theirs, "port"),
    "torch-sdpa": (theirs, "sdpa"),
}


def fits(impl, H, T):
    return not (impl == "numpy" and H * T * T > DENSE_MAX_ELEMENTS)


def repeats_for(impl, T, quick):
    if quick:
        return 2
    heavy = impl in ("numpy", "rt_numpy-ref") or (impl == "torch-sdpa" and T >= 8192)
    return 3 if heavy and T >= 8192 else 7


# ----------------------------------------------------------------- peak memory
def peak_mib(impl, H, T):
    """Growth of max RSS (MiB) during one forward+backward, in a fresh interpreter."""
    code = f"""
import resource, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import attention as b
from rt_numpy import runtime; runtime.configure_process()  # as in the timing phase
maker, kind = b.IMPLS[{impl!r}]
maker(kind, {H}, 64, True)()          # compile / warm up on a small size
run = maker(kind, {H}, {T}, True)     # inputs allocated before the baseline
def high_water_kib():  # VmHWM: this process's peak resident set (ru_maxrss can carry the parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
before = high_water_kib()
run()
print((high_water_kib() - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {impl} T={T} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def growth_exponent(ts, ms):
    slope, _ = np.polyfit(np.log(ts), np.log(ms), 1)
    return float(slope)


def main(argv=None):
    parser = bench_parser(__doc__, torch_and_memory=True)
    parser.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 1024 ... 16384)")
    parser.add_argument("--heads", type=int, nargs="+", help="head counts (default 1 8)")
    parser.add_argument("--impls", nargs="+", choices=list(IMPLS), help="implementations (default all)")
    args = parser.parse_args(argv)
    have_torch = torch_anchors_available(skip=args.no_torch)
    Ts = args.T or ([256, 512] if args.quick else [1024, 2048, 4096, 8192, 16384])
    heads = args.heads or ([1, 2] if args.quick else [1, 8])
    impls = [i for i in (args.impls or IMPLS) if have_torch or i in ("rt_numpy-numba", "rt_numpy-ref", "numpy")]
    if "rt_numpy-numba" not in impls:
        impls.insert(0, "rt_numpy-numba")  # the ratio column needs it
    machine = machine_line()
    print(f"machine: {machine}")
    records, times = [], {}
    # Phase by library: all NumPy/Numba timings, then all torch timings.
    for impl in impls:
        maker, kind = IMPLS[impl]
        for H in heads:
            for T in Ts:
                if not fits(impl, H, T):
                    continue
                W, K = window_for(T)
                for backward in (False, True):
                    ms = median_ms(maker(kind, H, T, backward), repeats_for(impl, T, args.quick), warmup=1)
                    times[impl, H, T, backward] = ms
                    case = {"T": T, "H": H, "D": D, "K": K, "W": W, "pass": "fwd+bwd" if backward else "fwd",
                            "dtype": "float32"}
                    record(records, impl, case, "ms", ms, "ms")
                    record(records, impl, case, "tokens_per_s", T / (ms * 1e-3), "tokens/s")
                print(f"  {impl:20s} H={H} T={T:6d}  fwd {times[impl, H, T, False]:9.2f} ms   "
                      f"fwd+bwd {times[impl, H, T, True]:9.2f} ms", flush=True)

    memory = {}
    if not args.no_memory:
        for impl in impls:
            for T in ([512] if args.quick else [t for t in (4096, 16384) if t in Ts]):
                if fits(impl, 1, T):
                    memory[impl, T] = peak_mib(impl, 1, T)
                    W, K = window_for(T)
                    record(records, impl, {"T": T, "H": 1, "D": D, "K": K, "W": W, "pass": "fwd+bwd"},
                           "peak_mib", max(memory[impl, T], 1e-3), "MiB")

    for H in heads:
        print(f"\n### {H} head{'s' if H > 1 else ''}, D={D}, float32 (median ms; ratio = port / ours-numba)")
        rows = []
        for T in Ts:
            W, K = window_for(T)
            for backward in (False, True):
                row = [str(T), f"{W}/{K}", "fwd+bwd" if backward else "fwd"]
                for impl in impls:
                    ms = times.get((impl, H, T, backward))
                    row.append(f"{ms:.1f}" if ms is not None else "-")
                port = times.get(("routing_transformer", H, T, backward))
                mine = times[("rt_numpy-numba", H, T, backward)]
                row.append(f"{port / mine:.1f}x" if port else "-")
                rows.append(row)
        print_table(["T", "W/K", "pass", *impls, "port/ours"], rows)

    fit_ts = [T for T in Ts if T >= 2048] or Ts
    print("\ngrowth exponent of forward+backward time in T (T = "
          f"{fit_ts[0]}..{fit_ts[-1]}, 1 head):")
    for impl in impls:
        pts = [(T, times[impl, heads[0], T, True]) for T in fit_ts if (impl, heads[0], T, True) in times]
        if len(pts) >= 2:
            slope = growth_exponent(*zip(*pts))
            print(f"  {impl:20s} {slope:.2f}")
            record(records, impl, {"T": f"{pts[0][0]}..{pts[-1][0]}", "H": heads[0], "D": D, "pass": "fwd+bwd"},
                   "growth_exponent", slope, "1")
    if memory:
        print("\npeak memory of one forward+backward, 1 head (MiB, growth of max RSS):")
        print_table(["impl", *[f"T={T}" for T in sorted({t for _, t in memory})]],
                    [[impl, *[f"{memory[impl, T]:.0f}" if (impl, T) in memory else "-"
                              for T in sorted({t for _, t in memory})]] for impl in impls])
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
