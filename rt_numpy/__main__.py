"""Command line: ``python -m rt_numpy <command>`` (console script ``rt-numpy``); the commands:

* ``demo`` - the main job: train the ``small`` preset on the default corpus
  (text that ships with Python), report held-out bits per byte, print a sample
  and say where the loss plot is.
* ``train`` - train a preset (``tiny``, ``small``), optionally resuming.
* ``sample`` - generate text from a checkpoint.
* ``eval`` - held-out bits per byte of a checkpoint.
* ``kmeans-demo`` - online k-means alone, on vectors around hidden directions.
* ``certify`` - the causality certificate of a checkpoint (:mod:`rt_numpy.causality`).
* ``compare`` - the paper's comparison in miniature: the same model with routing,
  local, strided, LSH or dense attention, on text, recall and images (docs/results.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from rt_numpy import backend, data, kmeans, runtime


def _configs(args):
    from rt_numpy import train

    cfg, tcfg = train.PRESETS[args.preset]
    changes = {k: getattr(args, k) for k in ("steps", "batch_size", "lr", "seed", "corpus", "time_limit")
               if getattr(args, k, None) is not None}
    return cfg, dataclasses.replace(tcfg, **changes)


def _print_sample(params, cfg, kmeans_states, prompt, n_new, seed, temperature, top_k, top_p, impl):
    from rt_numpy import sample

    ids = data.encode(prompt)[None].astype(np.int64)  # (1, len)
    out = sample.generate(params, cfg, kmeans_states, ids, n_new, rng=np.random.default_rng(seed),
                          temperature=temperature, top_k=top_k, top_p=top_p, impl=impl)
    print("-" * 72)
    print(data.decode(out[0]))
    print("-" * 72)


def cmd_train(args, demo=False):
    from rt_numpy import train

    cfg, tcfg = _configs(args)
    print(f"model: {cfg}")
    print(f"training: {tcfg}")
    result = train.train(cfg, tcfg, out_dir=args.out, resume=args.resume, impl=args.impl,
                         progress=not args.no_progress, device=args.device)
    if result["sha256"]:
        print(f"corpus {tcfg.corpus!r}: sha256 {result['sha256']}")
    val = result["val"]
    print(f"held-out (validation) after {result['step']} steps: {val['bits_per_byte']:.3f} bits/byte")
    if demo:
        raw, _ = data.load_corpus(tcfg.corpus)
        test = train.evaluate(result["params"], result["kmeans_states"], cfg, data.split(raw)["test"],
                              batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches, impl=args.impl)
        print(f"held-out (test split): {test['bits_per_byte']:.3f} bits/byte")
        _print_sample(result["params"], cfg, result["kmeans_states"], args.prompt, args.n_new, args.seed,
                      0.8, None, 0.95, args.impl)
    if result["plot"]:
        print(f"loss plot: {os.path.abspath(result['plot'])}")
    if result["checkpoint"]:
        print(f"checkpoint: {os.path.abspath(result['checkpoint'])}.npz / .json")
    return 0


def cmd_sample(args):
    from rt_numpy import train

    state = train.load_checkpoint(args.checkpoint)
    params, kmeans_states = backend.to_device((state["params"], state["kmeans_states"]), args.device)
    _print_sample(params, state["cfg"], kmeans_states, args.prompt, args.n_new, args.seed,
                  args.temperature, args.top_k, args.top_p, args.impl)
    return 0


def cmd_eval(args):
    from rt_numpy import train

    state = train.load_checkpoint(args.checkpoint)
    cfg, tcfg = state["cfg"], state["tcfg"]
    raw, sha = data.load_corpus(tcfg.corpus)
    splits = data.split(raw)
    params, kmeans_states = backend.to_device((state["params"], state["kmeans_states"]), args.device)
    for name in ("val", "test"):
        result = train.evaluate(params, kmeans_states, cfg, splits[name],
                                batch_size=tcfg.batch_size, max_batches=args.max_batches, impl=args.impl)
        print(f"{name}: {result['bits_per_byte']:.4f} bits/byte ({result['cross_entropy']:.4f} nats)")
    if args.per_document is not None:
        if args.per_document < 0:
            raise SystemExit(f"--per-document must be >= 0, got {args.per_document}")
        _print_documents(params, kmeans_states, cfg, splits["test"], tcfg, args.per_document, args.impl)
    print(f"corpus {tcfg.corpus!r} sha256 {sha}; checkpoint step {state['step']}")
    return 0


def _print_documents(params, kmeans_states, cfg, split, tcfg, n_shown, impl):
    """Bits per byte of every test document on its own (docs/algorithm.md#8-padding): a summary and the extremes."""
    from rt_numpy import train

    docs = data.documents(split, data.DOCUMENT_MARKERS[tcfg.corpus])
    result = train.evaluate_documents(params, kmeans_states, cfg, docs, batch_size=tcfg.batch_size, impl=impl)
    scored = np.flatnonzero(result["bytes"] > 0)
    bits = result["bits_per_byte"][scored]
    print(f"test documents: {len(scored)} scored, {result['bytes'].sum()} bytes; "
          f"{result['mean_bits_per_byte']:.4f} bits/byte over all bytes, median document {np.median(bits):.4f}, "
          f"quartiles {np.quantile(bits, 0.25):.4f} .. {np.quantile(bits, 0.75):.4f}")
    order = scored[np.argsort(bits, kind="stable")]
    for label, picked in (("lowest", order[:n_shown]), ("highest", order[::-1][:n_shown])):
        for d in picked:
            title = data.decode(docs[d][:60]).split("\n")[0]
            print(f"  {label:7s} {result['bits_per_byte'][d]:7.4f} bits/byte  {result['bytes'][d]:7d} bytes  {title}")


def cmd_certify(args):
    from rt_numpy import causality, model, train

    state = train.load_checkpoint(args.checkpoint)
    cfg, tcfg = state["cfg"], state["tcfg"]
    raw, _ = data.load_corpus(tcfg.corpus)
    x, _ = next(data.eval_batches(data.split(raw)["val"], args.windows, cfg.seq_len))  # held-out windows

    def logits(ids):
        return np.asarray(model.forward(state["params"], ids, cfg, state["kmeans_states"], impl=args.impl)[0])

    cert = causality.certify(logits, x, rng=np.random.default_rng(args.seed), vocab_size=cfg.vocab_size,
                             n_positions=args.positions)
    print(f"checkpoint {args.checkpoint} (step {state['step']}), {len(x)} held-out windows of {cfg.seq_len} bytes")
    print(cert)
    return 0 if cert.passed else 1


def _clustered_points(rng, batch, heads, length, dim, centers):
    """Vectors scattered around ``centers`` (H, K, D): returns (B, H, T, D)."""
    H, K, D = centers.shape
    labels = rng.integers(0, K, size=(batch, heads, length))  # (B, H, T)
    heads_idx = np.arange(H)[None, :, None]
    return centers[heads_idx, labels] + 0.35 * rng.standard_normal((batch, heads, length, dim))  # (B, H, T, D)


def cmd_kmeans_demo(args):
    """Online k-means on a stream of batches; prints the loss and how many hidden directions were found."""
    rng = np.random.default_rng(args.seed)
    H, K, D, B, T = args.num_heads, args.num_clusters, args.dim, args.batch, args.length
    centers = kmeans.normalize(rng.standard_normal((H, K, D)), "l2")  # hidden directions (H, K, D)
    state = kmeans.init_state(H, K, D, rng=rng, norm=args.norm, dtype=np.float32)
    impl = backend.resolve_impl(args.impl)
    print(f"online k-means demo: H={H} K={K} D={D}, batches of B={B} x T={T}, norm={args.norm}, "
          f"ema_decay={args.ema_decay}, impl={impl}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        points = kmeans.normalize(_clustered_points(rng, B, H, T, D, centers).astype(np.float32), args.norm)
        loss = kmeans.commitment_loss(points, state["means"], commitment=1.0)
        state, stats = kmeans.kmeans_step(state, points, ema_decay=args.ema_decay, norm=args.norm, impl=impl)
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            used = int((stats["counts"][0] > 0).sum())
            print(f"step {step:5d}  mean squared distance to nearest centroid {float(loss):.4f}  "
                  f"clusters in use {used}/{H * K}")
    elapsed = time.perf_counter() - start
    found = kmeans.normalize(state["means"].astype(np.float64), "l2")  # (H, K, D)
    cos = np.einsum("hkd,hjd->hkj", centers, found).max(axis=-1)  # (H, K): best centroid per direction
    print(f"hidden directions recovered (cosine > 0.9): {int((cos > 0.9).sum())}/{H * K}; "
          f"median cosine {np.median(cos):.3f}")
    print(f"{args.steps} steps in {elapsed:.2f} s ({args.steps * B * T * H / elapsed:,.0f} points/s)")
    return 0


def main(argv=None) -> int:
    from rt_numpy import train

    parser = argparse.ArgumentParser(prog="rt_numpy", description="rt_numpy: the Routing Transformer in NumPy")
    sub = parser.add_subparsers(dest="command", required=True)

    def training_args(p, preset):
        p.add_argument("--preset", choices=sorted(train.PRESETS), default=preset)
        p.add_argument("--steps", type=int, help="override the preset's number of steps")
        p.add_argument("--batch-size", dest="batch_size", type=int)
        p.add_argument("--lr", type=float)
        p.add_argument("--seed", type=int)
        p.add_argument("--corpus", choices=data.CORPORA)
        p.add_argument("--time-limit", dest="time_limit", type=float, help="seconds (0: none)")
        p.add_argument("--out", default="runs/" + preset, help="checkpoint and loss-plot directory")
        p.add_argument("--resume", help="checkpoint to continue from")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        p.add_argument("--impl", choices=backend.IMPLS, default="auto")
        p.add_argument("--device", choices=backend.DEVICES, default="cpu",
                       help="gpu: CuPy arrays on an NVIDIA GPU (pip install 'rt_numpy[gpu]')")

    p = sub.add_parser("demo", help="the main job: train the small preset, report bits/byte, print a sample")
    training_args(p, "small")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--n-new", dest="n_new", type=int, default=300)
    p.set_defaults(func=lambda a: cmd_train(a, demo=True))

    p = sub.add_parser("train", help="train a preset")
    training_args(p, "tiny")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (("sample", cmd_sample, "generate text from a checkpoint"),
                                 ("eval", cmd_eval, "held-out bits per byte of a checkpoint")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="path of checkpoint (with or without .npz/.json)")
        p.add_argument("--impl", choices=backend.IMPLS, default="auto")
        p.add_argument("--device", choices=backend.DEVICES, default="cpu")
        if name == "sample":
            p.add_argument("--prompt", default="def ")
            p.add_argument("--n-new", dest="n_new", type=int, default=300)
            p.add_argument("--temperature", type=float, default=0.8)
            p.add_argument("--top-k", dest="top_k", type=int)
            p.add_argument("--top-p", dest="top_p", type=float)
            p.add_argument("--seed", type=int, default=0)
        else:
            p.add_argument("--max-batches", dest="max_batches", type=int, default=None)
            p.add_argument("--per-document", dest="per_document", type=int, nargs="?", const=5, default=None,
                           metavar="N", help="also score every test document on its own (padded batches) "
                                             "and show the N lowest and highest (default 5)")
        p.set_defaults(func=func)

    p = sub.add_parser("certify", help="does a checkpoint's output at i depend on bytes after i? (exit 1 if so)")
    p.add_argument("checkpoint", help="path of checkpoint (with or without .npz/.json)")
    p.add_argument("--windows", type=int, default=4, help="held-out windows to test")
    p.add_argument("--positions", type=int, default=32, help="positions i tested in each window")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--impl", choices=backend.IMPLS, default="auto")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("kmeans-demo", help="online k-means on clustered vectors")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-heads", dest="num_heads", type=int, default=4)
    p.add_argument("--num-clusters", dest="num_clusters", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--ema-decay", dest="ema_decay", type=float, default=0.99)
    p.add_argument("--norm", choices=kmeans.NORMS, default="ln")
    p.add_argument("--impl", choices=backend.IMPLS, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_kmeans_demo)

    from rt_numpy import compare

    p = sub.add_parser("compare", help="routing against local, strided, LSH and dense attention (docs/results.md)")
    compare.add_arguments(p)
    p.set_defaults(func=compare.run_from_args)

    args = parser.parse_args(argv)
    if getattr(args, "device", "cpu") == "gpu":
        try:
            backend.require_gpu()
        except RuntimeError as e:
            parser.error(str(e))  # exit status 2, with the reason
    runtime.configure_process()  # this process is ours (docs/design.md#process-wide-settings)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
