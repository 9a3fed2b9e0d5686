"""Benchmark: ``membership="nearest"`` routing attention, the dense reference against the fused kernel.

    python bench/nearest.py [--json PATH] [--quick]

One routing attention call (:func:`rt_numpy.attention.routing_attention`, shared
QK, float32, B=1, H=2, D=64, K = round(sqrt(T))) at T = 2048 ... 16384, all
measured in this run, three arms:

* ``rt_numpy-ref`` / ``arm="nearest"``: nearest membership on the reference path,
  dense (B, H, T, T) masked attention (:func:`rt_numpy.attention._nearest_attention`);
* ``rt_numpy-numba`` / ``arm="nearest"``: nearest membership on the fused kernel
  (:mod:`rt_numpy.kernels.numba_nearest`);
* ``rt_numpy-numba`` / ``arm="balanced"``: balanced membership (W = T // K) on its
  fused kernel (:mod:`rt_numpy.kernels.numba_routing`), the cost to compare with.

"fwd+bwd" is the gradient of ``sum(out * g)`` plus the commitment loss with
respect to q and v.  Times are medians (``bench/common.py``).  Peak memory is
the largest total of the NumPy arrays alive during one forward+backward, by
:mod:`tracemalloc` (NumPy reports its allocations to it).  Arrays that a Numba
kernel allocates inside compiled code are not traced: for the nearest kernel
they are one cluster's key and value tiles per thread, a few (T_c, D) arrays
for a cluster of T_c tokens.  The reference is skipped where its (B, H, T, T)
arrays would pass ``REF_MAX_BYTES`` (:func:`reference_bytes`); the table says so.
"""
from __future__ import annotations

import math
import os
import sys
import tracemalloc

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, median_ms, print_table, record, write_json  # noqa: E402

B, H, D = 1, 2, 64
ARMS = [("rt_numpy-ref", "nearest"), ("rt_numpy-numba", "nearest"), ("rt_numpy-numba", "balanced")]
REF_MAX_BYTES = 4 * 2**30
# Bytes the reference holds per (b, h, query, key) entry at its peak (forward+backward), measured with
# tracemalloc (float32, H=2): 16.9 at T = 2048, 16.4 at T = 4096.  The visible mask, the logits, the
# probabilities and their gradients are among them.
REF_BYTES_PER_ENTRY = 17


def sizes(T):
    """K = round(sqrt(T)) clusters; balanced windows of W = T // K tokens."""
    K = int(round(math.sqrt(T)))
    return K, T // K


def reference_bytes(T):
    """About how many bytes the dense reference needs for one forward+backward at T."""
    return REF_BYTES_PER_ENTRY * B * H * T * T


def make_run(impl, arm, T, backward):
    """A function running one forward (and backward) of routing attention."""
    import autograd

    from rt_numpy import attention, kmeans, ops

    rng = np.random.default_rng(0)
    q, v, g = (rng.standard_normal((B, H, T, D), dtype=np.float32) for _ in range(3))
    K, W = sizes(T)
    means = kmeans.init_state(H, K, D, rng=np.random.default_rng(1))["means"]  # (H, K, D)
    run = impl.removeprefix("rt_numpy-")

    def loss(q, v):
        out, commitment, _ = attention.routing_attention(q, None, v, means, membership=arm, window_size=W,
                                                         impl=run)
        return ops.add(ops.sum(ops.multiply(out, g)), commitment)

    if not backward:
        return lambda: loss(q, v)
    both = autograd.grad(lambda qv: loss(qv[0], qv[1]))
    return lambda: both((q, v))


def peak_mib(fn):
    """The largest total (MiB) of traced allocations while ``fn()`` runs, above what was there before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return (peak - before) / 2**20


def main(argv=None):
    import numba

    parser = bench_parser(__doc__)
    parser.add_argument("--T", type=int, nargs="+", help="sequence lengths (default 2048 4096 8192 16384)")
    args = parser.parse_args(argv)
    # --quick is a smoke run (also in CI with Numba's JIT off, where the kernels are Python loops):
    # one untimed-warm-up-free call per figure, so its times include compiling.
    Ts = args.T or ([64] if args.quick else [2048, 4096, 8192, 16384])
    machine = f"{machine_line()}; numba threads {numba.get_num_threads()}"
    print(f"machine: {machine}")
    records, times, memory, skipped = [], {}, {}, []
    for T in Ts:
        K, W = sizes(T)
        for impl, arm in ARMS:
            if impl == "rt_numpy-ref" and reference_bytes(T) > REF_MAX_BYTES:
                skipped.append(f"T={T}: reference skipped, its (B, H, T, T) arrays would need about "
                               f"{reference_bytes(T) / 2**30:.1f} GiB (> {REF_MAX_BYTES / 2**30:.0f} GiB)")
                continue
            heavy = impl == "rt_numpy-ref" and T >= 8192
            repeats = 1 if args.quick else (3 if heavy else 5)
            warmup = 0 if args.quick else 1  # the warm-up call compiles (or loads the cache): never timed
            for backward in (False, True):
                pass_name = "fwd+bwd" if backward else "fwd"
                case = {"T": T, "H": H, "D": D, "K": K, "W": W, "B": B, "pass": pass_name, "arm": arm,
                        "dtype": "float32"}
                ms = median_ms(make_run(impl, arm, T, backward), repeats, warmup=warmup)
                times[impl, arm, T, pass_name] = ms
                record(records, impl, case, "ms", ms, "ms")
                record(records, impl, case, "tokens_per_s", T / (ms * 1e-3), "tokens/s")
            memory[impl, arm, T] = peak_mib(make_run(impl, arm, T, True))
            record(records, impl, {**case, "pass": "fwd+bwd"}, "peak_mib", max(memory[impl, arm, T], 1e-3), "MiB")
            print(f"  {impl:15s} {arm:9s} T={T:6d}  fwd {times[impl, arm, T, 'fwd']:9.1f} ms  fwd+bwd "
                  f"{times[impl, arm, T, 'fwd+bwd']:9.1f} ms  peak {memory[impl, arm, T]:8.1f} MiB", flush=True)

    names = [f"{impl.removeprefix('rt_numpy-')} {arm}" for impl, arm in ARMS]
    print(f"\n### nearest vs balanced routing attention, B={B}, H={H}, D={D}, float32, shared QK "
          "(median ms; peak MiB of one fwd+bwd)")
    rows = []
    for T in Ts:
        K, W = sizes(T)
        for pass_name in ("fwd", "fwd+bwd"):
            ref, fused, balanced = (times.get((impl, arm, T, pass_name)) for impl, arm in ARMS)
            rows.append([f"T={T} K={K} W={W} {pass_name}",
                         *[f"{ms:.1f}" if ms is not None else "-" for ms in (ref, fused, balanced)],
                         f"{ref / fused:.1f}x" if ref else "-", f"{fused / balanced:.2f}"])
        rows.append([f"T={T} K={K} W={W} peak MiB",
                     *[f"{memory[key]:.0f}" if key in memory else "-"
                       for key in ((impl, arm, T) for impl, arm in ARMS)], "", ""])
    print_table(["case", *names, "ref/numba nearest", "nearest/balanced"], rows)
    for line in skipped:
        print(line)
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
