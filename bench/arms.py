"""Benchmark: the training step of every arm of the comparison, against the routing arm's.

    python bench/arms.py [--json PATH] [--quick] [--repeats N]

The issue's speed target for the baselines: each arm's training step within 2x
the routing arm's at T=1024.  One :func:`rt_numpy.train.train_step` (forward,
backward, clipping, AdamW, the k-means update) of the model of
:class:`rt_numpy.compare.Settings` (width 64, 2 layers, 4 heads of which 2
routing or baseline heads in the last layer), batch 4, float32, ``impl="auto"``,
for each arm at T=1152 (the compare command's text task: L=32, W=96, K=12) and at
T=1024 (W=128, K=8, the local blocks L=32).  Medians over ``--repeats`` steps
after two warm-up steps, all in this run; the last column is the ratio to the
routing arm's median in the same case.  The arms have no other anchor: they are
each other's.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, median_ms, print_table, record, write_json  # noqa: E402

from rt_numpy import compare, model, optim, train  # noqa: E402

IMPL = "rt_numpy-numba"


def step_ms(cfg, repeats, batch_size=4):
    rng = np.random.default_rng(0)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    opt = optim.adamw_init(params)
    tcfg = train.TrainConfig(steps=100, batch_size=batch_size, lr=1e-3, warmup_steps=1)
    x, y = rng.integers(0, 256, (batch_size, cfg.seq_len)), rng.integers(0, 256, (batch_size, cfg.seq_len))
    return median_ms(lambda: train.train_step(params, opt, states, x, y, cfg, tcfg, 1, None), repeats)


def main(argv=None):
    p = bench_parser(__doc__)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    machine = machine_line()
    print(f"machine: {machine}")
    cases = [(1152, 96), (1024, 128)] if not args.quick else [(96, 24)]
    settings = compare.Settings(**compare.QUICK) if args.quick else compare.Settings()
    repeats = 2 if args.quick else args.repeats
    rows, records = [], []
    for T, W in cases:
        s = dataclasses.replace(settings, seq_len={t: T for t in compare.TASKS}, window_size=W)
        times = {arm: step_ms(s.config("text", arm), repeats) for arm in compare.ARMS}
        for arm, ms in times.items():
            cfg = s.config("text", arm)
            case = {"T": T, "W": cfg.window_size, "K": cfg.num_clusters, "L": cfg.block_size, "H": cfg.num_heads,
                    "D": cfg.head_dim, "arm": arm, "pass": "train_step", "B": 4}
            record(records, IMPL, case, "step_ms", ms, "ms")
            record(records, IMPL, case, "ratio_to_routing", ms / times["routing"], "x")
            rows.append([f"T={T} W={W}", arm, f"{ms:.0f}", f"{ms / times['routing']:.2f}x"])
    print_table(["case", "arm", "train step (ms, median)", "vs routing"], rows)
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
