"""Benchmark: generation speed with the key/value cache against the full recompute.

    python bench/generate.py [--json PATH] [--quick]

The ``small`` preset's shape (4 layers, width 128, 2 routing + 2 local heads in
the last two layers, K=4, L=64, seq_len 256, float32) with
``membership="nearest"``, the strictly causal model for which the cache is exact
(docs/algorithm.md#9-generation-and-the-keyvalue-cache).  Untrained parameters:
the speed of a step does not depend on the weights.  One prompt (B=1) of 16, 128
and 256 (= seq_len) tokens is extended by 64 sampled tokens (temperature 1, the
same seed for both arms):

* arm ``cache``: :func:`rt_numpy.sample.generate` with ``cache=True``: one
  forward pass over the prompt (the prefill), then one position per token, and a
  new prefill each time the window slides (past seq_len, every seq_len / 2 tokens);
* arm ``recompute``: ``cache=False``: a forward pass over the whole window per token.

Both arms must give the same tokens (the script asserts it).  Tokens/s is the
number of new tokens over the median wall time of a whole ``generate`` call, after
one warm-up call (which also compiles the Numba kernels); the CPU time of the
process per new token is shown too (on a shared machine it moves less).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy work: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)
from rt_numpy import backend, model, sample, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, print_table, record, write_json  # noqa: E402


def timed_generate(params, cfg, states, prompt, n_new, cache, impl, repeats):
    """The tokens of one call, then the median wall and CPU seconds of ``repeats`` more calls.

    The CPU time (of this process, all its threads) is printed beside the wall time because the
    machine may be shared: other processes lengthen the wall time, not this process's CPU time.
    """
    def run():
        return sample.generate(params, cfg, states, prompt, n_new, rng=np.random.default_rng(0), temperature=1.0,
                               cache=cache, impl=impl)

    tokens = run()  # warm-up (and the Numba compilation on a first call)
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return tokens, float(np.median(wall)), float(np.median(cpu))


def main(argv=None):
    parser = bench_parser(__doc__, quick_help="prompts of 8 and 32 tokens, 4 new tokens, one repeat")
    args = parser.parse_args(argv)
    machine = machine_line()
    print(f"machine: {machine}")
    cfg = dataclasses.replace(train.PRESETS["small"][0], membership="nearest")
    assert sample.cache_is_exact(cfg)
    rng = np.random.default_rng(0)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    impl = "numba" if backend.numba_available() else "ref"
    lengths, n_new, repeats = ([8, 32], 4, 1) if args.quick else ([16, 128, cfg.seq_len], 64, 3)
    records, rows = [], []
    for n0 in lengths:
        prompt = np.random.default_rng(n0).integers(0, cfg.vocab_size, (1, n0))
        speed, cpu_ms, tokens = {}, {}, {}
        for arm in ("recompute", "cache"):
            tokens[arm], wall, cpu = timed_generate(params, cfg, states, prompt, n_new, arm == "cache", impl,
                                                    repeats)
            speed[arm], cpu_ms[arm] = n_new / wall, 1e3 * cpu / n_new
            case = {"T": n0, "N": n_new, "arm": arm, "H": cfg.num_heads, "D": cfg.head_dim, "K": cfg.num_clusters,
                    "L": cfg.block_size, "membership": cfg.membership}
            record(records, f"rt_numpy-{impl}", case, "tokens_per_s", speed[arm], "tokens/s")
            record(records, f"rt_numpy-{impl}", case, "cpu_ms_per_token", cpu_ms[arm], "ms")
        assert np.array_equal(tokens["cache"], tokens["recompute"]), f"prompt {n0}: the arms gave different tokens"
        for arm in ("recompute", "cache"):
            rows.append([f"prompt {n0}, {n_new} new", arm, f"{speed[arm]:.1f}", f"{1e3 / speed[arm]:.2f}",
                         f"{speed[arm] / speed['recompute']:.1f}x", f"{cpu_ms[arm]:.2f}",
                         f"{cpu_ms['recompute'] / cpu_ms[arm]:.1f}x", "yes"])
    print_table(["case", "arm", "tokens/s (wall, median)", "wall ms/token", "wall vs recompute",
                 "CPU ms/token", "CPU vs recompute", "same tokens"], rows)
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
