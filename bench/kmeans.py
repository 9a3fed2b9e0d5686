"""Benchmark: one online k-means training step, and balanced top-W membership.

    python bench/kmeans.py [--json PATH] [--quick]

Step = nearest-centroid assignment of N unit-normalised float32 points plus the
EMA centroid update (``rt_numpy.kmeans.kmeans_step``), against scikit-learn's
``MiniBatchKMeans.partial_fit`` on the same points and centroids, all in this run.
Top-W = the W best positions of each of K clusters over T positions
(``rt_numpy.kernels.numba_kmeans.top_w_positions``) against ``numpy.argpartition``
on the same (K, T) score matrix.  The libraries are timed one after the other,
never interleaved.  Figures are medians.
"""
from __future__ import annotations

import os
import sys

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, matmul_peak_gflops, median_ms, print_table, record, write_json  # noqa: E402

from rt_numpy import kmeans  # noqa: E402
from rt_numpy.kernels import numba_kmeans  # noqa: E402


def unit_points(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)  # (N, D), unit rows


def bench_step(n, d, k, repeats, records, peak):
    rng = np.random.default_rng(0)
    x = unit_points(rng, n, d)  # (N, D)
    means = x[rng.choice(n, k, replace=False)].copy()  # (K, D): K of the points
    points = x[None, None]  # (N, D) -> (B=1, H=1, T=N, D)
    state = kmeans.state_from_means(means[None])  # (H=1, K, D)
    case = {"N": n, "D": d, "K": k, "op": "assign+ema", "dtype": "float32"}
    rows = []
    results = {}
    for impl in ("ref", "numba"):
        ms = median_ms(lambda: kmeans.kmeans_step(state, points, norm="l2", impl=impl), repeats)
        results[f"rt_numpy-{impl}"] = ms
    try:
        from sklearn.cluster import MiniBatchKMeans

        model = MiniBatchKMeans(n_clusters=k, init=means, n_init=1, batch_size=n, random_state=0)
        model.partial_fit(x)  # the first call only initialises
        results["sklearn"] = median_ms(lambda: model.partial_fit(x), repeats)
    except ImportError:
        print("scikit-learn not installed: no anchor for the k-means step")
    anchor = results.get("sklearn")
    for impl, ms in results.items():
        gflops = 2 * n * k * d / (ms * 1e-3) / 1e9  # the similarity products only
        record(records, impl, case, "ms", ms, "ms")
        record(records, impl, case, "points_per_s", n / (ms * 1e-3), "points/s")
        record(records, impl, case, "share_of_matmul_peak", gflops / peak, "fraction")
        rows.append([f"step N={n} D={d} K={k}", impl, f"{ms:.2f}", f"{n / (ms * 1e-3) / 1e6:.1f}",
                     f"{100 * gflops / peak:.0f}%", f"{anchor / ms:.2f}x" if anchor else "-"])
    return rows


def bench_top_w(t, k, w, repeats, records):
    rng = np.random.default_rng(1)
    x = unit_points(rng, t, 64)[None, None]  # (1, 1, T, 64)
    means = unit_points(rng, k, 64)[None]  # (1, K, 64)
    scores = kmeans.cluster_scores(x, means)  # (1, 1, K, T)
    assert (numba_kmeans.top_w_positions(scores, w) == kmeans.top_w_reference(scores, w)).all()
    case = {"T": t, "K": k, "W": w, "op": "top_w", "dtype": "float32"}
    results = {
        "rt_numpy-ref": median_ms(lambda: kmeans.top_w_reference(scores, w), repeats),
        "rt_numpy-numba": median_ms(lambda: numba_kmeans.top_w_positions(scores, w), repeats),
        # What a NumPy user writes for "the W largest per row" (unsorted, ties arbitrary).
        "numpy": median_ms(lambda: np.argpartition(-scores, w - 1, axis=-1)[..., :w], repeats),
    }
    rows = []
    for impl, ms in results.items():
        record(records, impl, case, "ms", ms, "ms")
        rows.append([f"top-W T={t} K={k} W={w}", impl, f"{ms:.3f}", f"{t * k / (ms * 1e-3) / 1e6:.0f}",
                     "-", f"{results['numpy'] / ms:.2f}x"])
    return rows


def main(argv=None):
    parser = bench_parser(__doc__)
    args = parser.parse_args(argv)
    records = []
    machine = machine_line()
    print(f"machine: {machine}")
    peak = matmul_peak_gflops(repeats=2 if args.quick else 7, n=256 if args.quick else 2048)
    print(f"float32 matmul peak measured now: {peak:.0f} GFLOP/s")
    if args.quick:
        cases, repeats, top_w_case = [(1024, 16, 8)], 3, (512, 8, 16)
    else:
        cases, repeats, top_w_case = [(8192, 64, 64), (65536, 64, 256)], 25, (8192, 64, 128)
    rows = []
    for n, d, k in cases:
        rows += bench_step(n, d, k, repeats, records, peak)
    rows += bench_top_w(*top_w_case, repeats * 2, records)
    print_table(["case", "impl", "median ms", "M points/s (top-W: M scores/s)", "% of matmul peak",
                 "speed-up vs anchor"], rows)
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
