"""Benchmark: what the prefix decode rule costs a balanced model, in held-out bits/byte.

    python bench/decode_gap.py [CHECKPOINT] [--windows N] [--json PATH] [--quick]

A balanced-routing model (the default) is scored on the first N windows of
seq_len bytes of its corpus' test split (the python corpus for the ``small``
preset), each byte predicted from the bytes before it in its window, by three
rules (docs/algorithm.md#9-generation-and-the-keyvalue-cache):

* ``one pass``: :func:`rt_numpy.model.forward` over the whole window, as training
  and ``rt_numpy eval`` score it.  Each cluster picks its W members among all
  the window's tokens, later ones included (the causal leak,
  docs/algorithm.md#3-the-causal-leak): no decoder can compute it;
* ``full recompute``: the prediction after position t is ``forward(window[:t+1])[:, -1]``,
  what exact generation computes (``sample.generate(cache=False)``): one
  forward pass per position;
* ``prefix rule``: :func:`rt_numpy.cache.decode_logits` with ``rule="prefix"``,
  the official decoder's approximation: when position t is decoded each cluster's
  members are chosen among positions 0..t, and t's keys and values are kept as
  they are then.

The gap of interest is prefix rule minus full recompute.  Without a checkpoint
the script scores an untrained ``small`` model (a smoke run: its numbers mean
nothing).  ``--quick`` scores one window of 32 bytes.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy work: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)
from rt_numpy import backend, cache, data, model, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, print_table, record, write_json  # noqa: E402


def bits_per_byte(logits, targets):
    """Mean -log2 p(target) over every position: logits (B, T, V), targets (B, T) -> float."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # (B, T, V)
    picked = np.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # (B, T)
    return float(-picked.mean() / math.log(2))


def full_recompute(params, cfg, states, x, impl):
    """The logits (B, T, V) of forward(x[:, :t+1])[:, -1] for every t: one forward pass per position."""
    rows = [model.forward(params, x[:, :t + 1], cfg, states, impl=impl)[0][:, -1] for t in range(x.shape[1])]
    return np.stack(rows, axis=1)  # T x (B, V) -> (B, T, V)


def main(argv=None):
    parser = bench_parser(__doc__, quick_help="one window of 32 bytes")
    parser.add_argument("checkpoint", nargs="?", help="a checkpoint of a balanced model (default: untrained small)")
    parser.add_argument("--windows", type=int, default=4, help="held-out windows scored (default 4)")
    args = parser.parse_args(argv)
    machine = machine_line()
    print(f"machine: {machine}")
    if args.checkpoint:
        state = train.load_checkpoint(args.checkpoint)
        cfg, params, states, corpus = state["cfg"], state["params"], state["kmeans_states"], state["tcfg"].corpus
        source = f"{args.checkpoint} (step {state['step']})"
    else:
        cfg, corpus = train.PRESETS["small"][0], "python"
        rng = np.random.default_rng(0)
        params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
        source = "untrained small preset (smoke run)"
    if cache.inexact_reason(cfg) is None:
        print("note: this model is strictly causal, so all three rules agree (to rounding)")
    raw, sha = data.load_corpus(corpus)
    n_windows, T = (1, 32) if args.quick else (args.windows, cfg.seq_len)
    x, y = next(data.eval_batches(data.split(raw)["test"], n_windows, cfg.seq_len))  # (N, seq_len) each
    x, y = x[:, :T], y[:, :T]
    impl = "numba" if backend.numba_available() else "ref"
    print(f"model: {source}; {x.shape[0]} test windows of {T} bytes, corpus {corpus!r} sha256 {sha[:12]}")

    one_pass = model.forward(params, x, cfg, states, impl=impl)[0]  # (N, T, V)
    recompute = full_recompute(params, cfg, states, x, impl)
    prefix = cache.decode_logits(params, cfg, states, x, rule="prefix", impl=impl)
    results = {"one pass": one_pass, "full recompute": recompute, "prefix rule": prefix}
    bits = {rule: bits_per_byte(logits, y) for rule, logits in results.items()}

    records, rows = [], []
    for rule, logits in results.items():
        gap = bits[rule] - bits["full recompute"]
        differ = float(np.abs(logits.astype(np.float64) - recompute).max())
        rows.append([f"{x.shape[0]} x {T} bytes", rule, f"{bits[rule]:.4f}", f"{gap:+.4f}", f"{differ:.2e}"])
        case = {"T": T, "N": int(x.shape[0]), "arm": rule, "task": f"{corpus}-test"}
        record(records, f"rt_numpy-{impl}", case, "bits_per_byte", bits[rule], "bits/byte")
        record(records, f"rt_numpy-{impl}", case, "gap_vs_recompute", abs(gap), "bits/byte")
    print_table(["case", "rule", "bits/byte", "minus full recompute", "max |logit - recompute|"], rows)
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
