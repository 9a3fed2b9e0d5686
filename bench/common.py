"""Shared helpers for the bench/ scripts: timing, machine description, tables, JSON records.

Every bench script prints a table and, with ``--json PATH``, writes a list of
records ``{"impl", "case", "metric", "value", "unit"}`` (see README.md).
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np

from rt_numpy.compare import print_table  # noqa: F401  (one Markdown table printer, shared)


def median_ms(fn, repeats, warmup=2):
    """Median wall time of ``fn()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def matmul_peak_gflops(repeats=7, n=2048):
    """This machine's float32 matrix-product speed (GFLOP/s), measured now with NumPy's BLAS."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    ms = median_ms(lambda: a @ b, repeats)
    return 2 * n**3 / (ms * 1e-3) / 1e9


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line():
    """One line naming the machine, the libraries and the thread pools."""
    parts = [f"{cpu_name()}, {os.cpu_count()} cores", f"Python {platform.python_version()}",
             f"numpy {np.__version__}"]
    try:
        import numba

        parts.append(f"numba {numba.__version__}")
    except ImportError:
        parts.append("no numba")
    try:
        from threadpoolctl import threadpool_info

        pools = {f"{p['internal_api']}:{p['num_threads']}" for p in threadpool_info()}
        parts.append("threads " + ",".join(sorted(pools)))
    except ImportError:
        pass
    env = [f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_THREAD_TIMEOUT")
           if k in os.environ]
    if env:
        parts.append(" ".join(env))
    return "; ".join(parts)


def record(records, impl, case, metric, value, unit):
    records.append({"impl": impl, "case": dict(case), "metric": metric, "value": float(value), "unit": unit})


def write_json(path, records, machine):
    if path:
        with open(path, "w") as f:
            json.dump(records, f, indent=1)
        print(f"wrote {len(records)} records to {path} ({machine})")


def torch_anchors_available(skip=False):
    """True when torch and the PyTorch port (routing_transformer) import; says so when they don't."""
    if skip:
        return False
    try:
        import routing_transformer  # noqa: F401
        import torch  # noqa: F401
    except Exception as e:  # not installed, or installed but broken (e.g. a mismatched torch)
        print(f"torch / routing_transformer do not import ({type(e).__name__}: {e}): no torch anchors")
        return False
    return True


def torch_attention_loss(kind, g, num_clusters, window, heads, dim):
    """The loss ``forward(q, v)`` that the attention benches differentiate, for a torch anchor.

    ``kind``: ``"port"`` (the PyTorch port's causal, shared-QK ``KmeansAttention``;
    the loss is ``sum(out * g)`` plus its auxiliary commitment loss) or ``"sdpa"``
    (``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``,
    ``sum(out * g)``).  ``g`` is a torch tensor (B, H, T, D); the port's module is
    put on ``g``'s device.
    """
    import torch

    if kind == "port":
        from routing_transformer.routing_transformer import KmeansAttention

        module = KmeansAttention(num_clusters, window, heads, dim, causal=True, shared_qk=True).to(g.device)

        def forward(q, v):
            out, aux = module(q, q, v)
            return (out * g).sum() + aux
        return forward
    if kind == "sdpa":
        def forward(q, v):
            return (torch.nn.functional.scaled_dot_product_attention(q, q, v, is_causal=True) * g).sum()
        return forward
    raise ValueError(f"kind must be 'port' or 'sdpa', got {kind!r}")


def bench_parser(doc, quick_help="tiny sizes, few repeats (a smoke test)", torch_and_memory=False):
    """The options every bench script shares: ``--json PATH``, ``--quick`` (and ``--no-torch``, ``--no-memory``)."""
    import argparse

    # Every library timed in this process (ours and the torch anchors) gets the same process-wide
    # settings: freed memory is kept for reuse (rt_numpy/runtime.py says why).
    from rt_numpy import runtime

    runtime.configure_process()
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON records")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if torch_and_memory:
        parser.add_argument("--no-torch", action="store_true", help="leave out the torch anchors")
        parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    return parser
