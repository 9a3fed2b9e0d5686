"""Command line: ``python -m rt_numpy demo`` (also the console script ``rt-numpy``).

The ``demo`` command is the project's main job.  Until the language model lands
it runs online k-means, the routing module of the Routing Transformer, on
normalised vectors drawn around hidden directions and reports how well the
centroids found them.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from rt_numpy import backend, kmeans


def _clustered_points(rng, batch, heads, length, dim, centers):
    """Unit-ish vectors scattered around ``centers`` (H, K, D): returns (B, H, T, D) and labels."""
    H, K, D = centers.shape
    labels = rng.integers(0, K, size=(batch, heads, length))  # (B, H, T)
    heads_idx = np.arange(H)[None, :, None]
    x = centers[heads_idx, labels] + 0.35 * rng.standard_normal((batch, heads, length, dim))  # (B, H, T, D)
    return x, labels


def demo(args) -> int:
    """Online k-means on a stream of batches; prints the loss and how many hidden directions were found."""
    rng = np.random.default_rng(args.seed)
    H, K, D, B, T = args.heads, args.clusters, args.dim, args.batch, args.length
    centers = kmeans.normalize(rng.standard_normal((H, K, D)), "l2")  # hidden directions (H, K, D)
    state = kmeans.init_state(H, K, D, rng=rng, norm=args.norm, dtype=np.float32)
    impl = backend.resolve_impl(args.impl)
    print(f"online k-means demo: H={H} K={K} D={D}, batches of B={B} x T={T}, norm={args.norm}, "
          f"decay={args.decay}, impl={impl}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, _ = _clustered_points(rng, B, H, T, D, centers)
        points = kmeans.normalize(x.astype(np.float32), args.norm)
        loss = kmeans.commitment_loss(points, state["means"], commitment=1.0)
        state, stats = kmeans.kmeans_step(state, points, decay=args.decay, norm=args.norm, impl=impl)
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            used = int((stats["counts"][0] > 0).sum())
            print(f"step {step:5d}  mean squared distance to nearest centroid {float(loss):.4f}  "
                  f"clusters in use {used}/{H * K}")
    elapsed = time.perf_counter() - start
    # How well did the centroids find the hidden directions?  Cosine of each hidden
    # direction with its best centroid.
    found = kmeans.normalize(state["means"].astype(np.float64), "l2")  # (H, K, D)
    cos = np.einsum("hkd,hjd->hkj", centers, found).max(axis=-1)  # (H, K)
    print(f"hidden directions recovered (cosine > 0.9): {int((cos > 0.9).sum())}/{H * K}; "
          f"median cosine {np.median(cos):.3f}")
    print(f"{args.steps} steps in {elapsed:.2f} s ({args.steps * B * T * H / elapsed:,.0f} points/s)")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rt_numpy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the main job: online k-means on clustered vectors")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--decay", type=float, default=0.99)
    p.add_argument("--norm", choices=kmeans.NORMS, default="ln")
    p.add_argument("--impl", choices=backend.IMPLS, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
