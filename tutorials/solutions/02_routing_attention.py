"""Model answers to the exercises of tutorial 02 (dense -> local -> routing attention).

    python tutorials/solutions/02_routing_attention.py    # "Exercise 2.k: correct" lines; exit 1 otherwise

Try the exercises first.  Each answer is run through the same check as the tutorial's check cell.
"""
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tutorials/, for `checks`

import numpy as np  # noqa: E402
from checks import ex02, report  # noqa: E402

from rt_numpy import attention, kmeans  # noqa: E402

FAST = os.environ.get("RT_NUMPY_FAST") == "1"
EPS = 1e-2  # combine_eps, as in the tutorial


def masked_softmax(logits, visible):
    """Softmax of each row over its visible entries; a row with nothing visible is all zeros."""
    z = np.where(visible, logits, -np.inf)  # (Tq, Tk)
    top = z.max(axis=-1, keepdims=True)  # (Tq, 1)
    e = np.exp(z - np.where(np.isfinite(top), top, 0.0))  # (Tq, Tk)
    total = e.sum(axis=-1, keepdims=True)  # (Tq, 1)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


# --------------------------------------------------------------------------- 2.1
def cluster_mask(query_pos, key_pos):
    """(W,) query positions, (W,) key positions -> (W, W) bool: key position <= query position."""
    return key_pos[None, :] <= query_pos[:, None]  # (1, W) <= (W, 1) -> (W, W)


# --------------------------------------------------------------------------- 2.2
def scatter_mean(outs, windows, T, combine_eps):
    """outs (K, W, D), windows (K, W) positions -> (T, D)."""
    summed = np.zeros((T, outs.shape[-1]))  # (T, D)
    np.add.at(summed, windows, outs)  # a position in several clusters receives each of its outputs
    counts = np.bincount(windows.ravel(), minlength=T)  # (T,)
    return summed / (counts + combine_eps)[:, None]  # (T, D) / (T, 1) -> (T, D)


# --------------------------------------------------------------------------- 2.3
def my_routing_buggy(q, v, means, W, bug):
    """The tutorial's my_routing with one planted bug (bug=None: none)."""
    x, val, mu = q[0, 0], v[0, 0], means[0]  # (T, D), (T, D), (K, D)
    T = len(x)
    xn = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-6)  # (T, D)
    scores = (x if bug == "no_normalise" else xn) @ mu.T  # (T, D) @ (D, K) -> (T, K)
    windows = np.argsort(-scores.T, axis=1, kind="stable")[:, :W]  # (K, W), most similar first
    if bug != "index_mask":
        windows = np.sort(windows, axis=1)  # by position
    total, count = np.zeros_like(val), np.zeros(T)
    for members in windows:  # (W,) positions of one cluster
        logits = xn[members] @ xn[members].T  # (W, D) @ (D, W) -> (W, W)
        if bug in ("index_mask", "sorted_index_mask"):
            visible = np.tril(np.ones((W, W), dtype=bool))  # by index inside the window
        else:
            visible = members[None, :] <= members[:, None]  # by position
        total[members] += masked_softmax(logits, visible) @ val[members]  # (W, D)
        count[members] += 1
    divisor = np.where(count > 0, count, 1) if bug == "no_eps" else count + EPS  # (T,)
    out = total / divisor[:, None]  # (T, D)
    return {"out": out[None, None], "query_windows": windows[None, None],
            "assignments": scores.argmax(axis=1)[None, None, None]}


def predicted_failures():
    """Which crosscheck names each bug moves, and why.

    * index_mask: the windows are the same sets (compared as sets) and the assignments do not depend on the
      mask, but in score order np.tril hides some earlier keys and shows some later ones: only `out`.
    * sorted_index_mask: with windows sorted by position, index order is position order, and the mask is
      exactly the position mask (the official code masks ranks this way): nothing fails.
    * no_eps: only the division changes: `out` (by a factor count / (count + 0.01), about 1 %).
    * no_normalise: the raw scores pick other windows and other nearest centroids, and so other outputs.
    """
    return {"index_mask": {"out"}, "sorted_index_mask": set(), "no_eps": {"out"},
            "no_normalise": {"out", "query_windows", "assignments"}}


# --------------------------------------------------------------------------- 2.4
def counted_ops(kind, T, D):
    """Multiply-adds of logits and scores, as in the tutorial's section 5."""
    if kind == "dense":
        return T * T * D
    W = int(round(math.sqrt(T)))
    K = T // W
    return T * K * D + K * W * W * D


def measure(Ts, dense_max):
    """Best-of-3 forward time (ms) of dense and routing at each T, as in the tutorial (default threads)."""
    timings = {"dense": {}, "routing": {}}
    for T in Ts:
        rng = np.random.default_rng(0)
        q, v = rng.standard_normal((2, 1, 1, T, 64), dtype=np.float32)
        W = int(round(math.sqrt(T)))
        means = kmeans.init_state(1, T // W, 64, rng=np.random.default_rng(1))["means"]
        calls = {"routing": lambda: attention.routing_attention(q, None, v, means, window_size=W)}
        if T <= dense_max:
            calls["dense"] = lambda: attention.dense_causal_attention(q, q, v)
        for kind, run in calls.items():
            run()  # warm-up, compiles the kernels
            best = np.inf
            for _ in range(3):
                start = time.perf_counter()
                run()
                best = min(best, time.perf_counter() - start)
            timings[kind][T] = 1e3 * best
    return timings


TIMINGS = measure([256, 512, 1024, 2048] if FAST else [256, 512, 1024, 2048, 4096], 2048 if FAST else 4096)


def crossover_answer():
    D = 64
    cheaper = [counted_ops("routing", T, D) < counted_ops("dense", T, D) for T in range(1, 65537)]
    not_cheaper = [T for T, yes in enumerate(cheaper, start=1) if not yes]
    common = sorted(set(TIMINGS["dense"]) & set(TIMINGS["routing"]))
    measured = None
    for T in reversed(common):  # walk down from the largest T while routing stays faster
        if TIMINGS["routing"][T] >= TIMINGS["dense"][T]:
            break
        measured = T
    return {"counted_ops": counted_ops, "counted_crossover": not_cheaper[-1] + 1 if not_cheaper else 1,
            "measured_crossover": measured}


if __name__ == "__main__":
    verdicts = [
        report("Exercise 2.1", ex02.check_cluster_mask, cluster_mask),
        report("Exercise 2.2", ex02.check_scatter_mean, scatter_mean),
        report("Exercise 2.3", ex02.check_planted_bugs, my_routing_buggy, predicted_failures),
        report("Exercise 2.4", ex02.check_crossover, crossover_answer, TIMINGS),
    ]
    answer = crossover_answer()
    print(f"counted crossover: T = {answer['counted_crossover']}; measured: T = {answer['measured_crossover']} "
          "(the count leaves out fixed costs per call and work linear in T, which dominate routing's time "
          "at small T; a GPU, with larger fixed costs per kernel launch, would move the measured crossover up)")
    sys.exit(0 if all(v is True for v in verdicts) else 1)
