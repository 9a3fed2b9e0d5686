"""Checks for the exercises of tutorial 02 (dense -> local -> routing attention).

Each ``check_*`` raises AssertionError with a hint when the answer is wrong and
returns None when it is right.  Expected values come from rt_numpy (the
attention functions and ``rt_numpy.crosscheck``) or from properties, never
from stored numbers.
"""
import math

import numpy as np

from rt_numpy import attention, crosscheck, kmeans

BUGS = ("index_mask", "sorted_index_mask", "no_eps", "no_normalise")


def _softmax_rows(logits, visible):
    """Row softmax over the visible entries; a row with nothing visible is zeros."""
    z = np.where(visible, logits, -np.inf)
    top = z.max(axis=-1, keepdims=True)
    e = np.exp(z - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


# ----------------------------------------------------------------------------- 2.1
def check_cluster_mask(cluster_mask):
    """Exercise 2.1: ``cluster_mask(query_pos, key_pos)`` -> (W, W) bool, key position <= query position."""
    rng = np.random.default_rng(21)
    T, D, W = 20, 4, 6
    q, k, v = rng.standard_normal((3, 1, 1, T, D))  # three (B=1, H=1, T, D)
    chosen = np.sort(rng.choice(T, W, replace=False))
    shuffled = rng.permutation(chosen)
    other = rng.permutation(rng.choice(T, W, replace=False))
    cases = [("a window sorted by position (shared QK)", chosen, chosen),
             ("a window in score order, not sorted by position (shared QK)", shuffled, shuffled),
             ("separate query and key windows, in any order", shuffled, other)]
    eps = 1e-2
    for label, qpos, kpos in cases:
        mask = np.asarray(cluster_mask(qpos.copy(), kpos.copy()))
        assert mask.shape == (W, W), f"for {label}: the mask has shape {mask.shape}, expected (W, W) = {(W, W)}"
        assert mask.dtype == bool or np.isin(mask, (0, 1)).all(), "the mask should be boolean (True = visible)"
        mask = mask.astype(bool)
        x = q[0, 0, qpos] @ k[0, 0, kpos].T  # (W, W) logits
        yours = _softmax_rows(x, mask) @ v[0, 0, kpos]  # (W, D)
        lib = attention.cluster_attention_reference(q, k, v, qpos[None, None, None], kpos[None, None, None],
                                                    scale=1.0, combine_eps=eps)[0, 0, qpos] * (1 + eps)
        wrong = np.flatnonzero(~np.isclose(yours, lib, rtol=1e-12, atol=1e-14).all(axis=1))
        if wrong.size:
            r = int(wrong[0])
            should = sorted(int(p) for p in kpos[kpos <= qpos[r]])
            got = sorted(int(p) for p in kpos[mask[r]])
            raise AssertionError(
                f"for {label}, the query at position {qpos[r]} (row {r}) should see the keys at positions "
                f"{should}, your mask shows it {got}. Compare positions (query_pos[:, None] vs "
                f"key_pos[None, :]), not indices inside the window.")


# ----------------------------------------------------------------------------- 2.2
def check_scatter_mean(scatter_mean):
    """Exercise 2.2: ``scatter_mean(outs, windows, T, combine_eps)`` equals the library's combine."""
    rng = np.random.default_rng(22)
    T, D = 12, 3
    windows = np.array([[0, 2, 5, 7], [2, 3, 7, 9], [1, 5, 7, 11]])  # (K=3, W=4): 7 in three, 2 and 5 in two
    q, v = rng.standard_normal((2, 1, 1, T, D))
    for eps in (1e-2, 1e-5):
        outs = np.stack([_softmax_rows(q[0, 0, w] @ q[0, 0, w].T, w[None, :] <= w[:, None]) @ v[0, 0, w]
                         for w in windows])  # (K, W, D), each cluster's outputs, computed from its members
        lib = attention.cluster_attention_reference(q, q, v, windows[None, None], windows[None, None],
                                                    scale=1.0, combine_eps=eps)[0, 0]  # (T, D)
        yours = np.asarray(scatter_mean(outs.copy(), windows.copy(), T, eps), dtype=float)
        assert yours.shape == (T, D), f"the result has shape {yours.shape}, expected (T, D) = {(T, D)}"
        counts = np.bincount(windows.ravel(), minlength=T)
        if not np.isfinite(yours).all():
            raise AssertionError("your result has NaN or inf: positions in no cluster have count 0, so divide by "
                                 "count + combine_eps (they then get 0)")
        bad = ~np.isclose(yours, lib, rtol=1e-12, atol=1e-14).all(axis=1)  # (T,)
        if bad.any():
            if not bad[counts == 1].any() and bad[counts >= 2].any():
                hint = ("only positions that are in several clusters are wrong: did `summed[windows] += outs` "
                        "add just one of the repeats? np.add.at adds all of them")
            elif np.allclose(yours, lib * ((counts + eps) / np.maximum(counts, 1))[:, None], rtol=1e-9, atol=1e-12):
                hint = f"you divided by the count alone: divide by count + combine_eps (= {eps})"
            elif np.allclose(yours, lib * (counts + eps)[:, None], rtol=1e-9, atol=1e-12):
                hint = "these are the sums: divide each position by its count + combine_eps"
            else:
                hint = f"divide the summed outputs by (count + combine_eps), combine_eps = {eps}"
            raise AssertionError(f"positions {np.flatnonzero(bad).tolist()} differ from "
                                 f"cluster_attention_reference (combine_eps={eps}): {hint}")


# ----------------------------------------------------------------------------- 2.3
def _bug_case():
    """A small official-convention case whose raw and normalised routing differ."""
    rng = np.random.default_rng(23)
    T, D, K, W = 24, 8, 3, 8
    q = rng.standard_normal((1, 1, T, D)) + 3.0 * rng.standard_normal((1, 1, T, 1))  # per-token offsets
    v = rng.standard_normal((1, 1, T, D))
    means = kmeans.normalize(rng.standard_normal((1, K, D)), "l2")  # (H=1, K, D), not zero-mean
    case = crosscheck.reference(q, None, v, means, window_size=W, upstream=rng.standard_normal((1, 1, T, D)))
    return case, q, v, means, W


def _our_buggy(q, v, means, W, bug):
    """The check's own copy of the four planted bugs (to know which names they make fail)."""
    x, val, mu = q[0, 0], v[0, 0], means[0]
    T = len(x)
    xn = (x - x.mean(axis=1, keepdims=True)) / np.sqrt(x.var(axis=1, keepdims=True) + 1e-6)
    route = x if bug == "no_normalise" else xn
    scores = route @ mu.T
    windows = np.argsort(-scores.T, axis=1, kind="stable")[:, :W]
    if bug != "index_mask":
        windows = np.sort(windows, axis=1)
    total, count = np.zeros_like(val), np.zeros(T)
    for members in windows:
        by_index = bug in ("index_mask", "sorted_index_mask")
        visible = np.tril(np.ones((W, W), bool)) if by_index else members[None, :] <= members[:, None]
        p = _softmax_rows(xn[members] @ xn[members].T, visible)
        total[members] += p @ val[members]
        count[members] += 1
    out = total / (np.where(count > 0, count, 1) if bug == "no_eps" else count + 1e-2)[:, None]
    return {"out": out[None, None], "query_windows": windows[None, None],
            "assignments": scores.argmax(axis=1)[None, None, None]}


def _failing(case, result):
    try:
        crosscheck.assert_close(case, result, rtol=1e-9, names=("out", "query_windows", "assignments"))
    except AssertionError as failure:
        text = str(failure)
        if "has no" in text:
            raise AssertionError(f"your result must hold 'out', 'query_windows' and 'assignments' ({text})")
        return {line.split(":")[0].strip() for line in text.splitlines()[1:]}
    return set()


def check_planted_bugs(my_routing_buggy, predicted_failures):
    """Exercise 2.3: the four planted bugs, and a prediction of which crosscheck names each makes fail."""
    case, q, v, means, W = _bug_case()
    clean = _failing(case, my_routing_buggy(q.copy(), v.copy(), means.copy(), W, None))
    assert not clean, f"with bug=None your implementation should pass, but {sorted(clean)} differ"
    measured = {bug: _failing(case, my_routing_buggy(q.copy(), v.copy(), means.copy(), W, bug)) for bug in BUGS}
    expected = {bug: _failing(case, _our_buggy(q, v, means, W, bug)) for bug in BUGS}
    hints = {"index_mask": "mask with np.tril over window indices AND keep each window in top-W order "
                           "(np.argsort(-scores.T)[:, :W], no np.sort)",
             "sorted_index_mask": "the same np.tril mask, with each window sorted by position",
             "no_eps": "divide by the count alone (use 1 where the count is 0)",
             "no_normalise": "compute the scores (and so windows and assignments) from the raw q; keep the "
                             "normalised vectors for the logits"}
    for bug in BUGS:
        if measured[bug] != expected[bug]:
            raise AssertionError(f"bug={bug!r}: your version makes {sorted(measured[bug]) or 'nothing'} fail, the "
                                 f"planted bug should make {sorted(expected[bug]) or 'nothing'} fail. "
                                 f"What to plant: {hints[bug]}")
    prediction = predicted_failures()
    assert isinstance(prediction, dict) and set(prediction) == set(BUGS), \
        f"predicted_failures() should return a dict with the keys {list(BUGS)}"
    wrong = {bug: (set(prediction[bug]), measured[bug]) for bug in BUGS if set(prediction[bug]) != measured[bug]}
    if wrong:
        lines = "; ".join(f"{bug}: you predicted {sorted(p) or 'nothing'}, crosscheck reported {sorted(m) or 'nothing'}"
                          for bug, (p, m) in wrong.items())
        raise AssertionError(f"your bugs are planted right, but the prediction is off. {lines}. Why does each "
                             f"name move (or not)?")


# ----------------------------------------------------------------------------- 2.4
def _routing_core(T, D):
    W = int(round(math.sqrt(T)))
    K = T // W
    return T * K * D + K * W * W * D


def check_crossover(crossover_answer, timings):
    """Exercise 2.4: counted operations of dense and routing, and the counted and measured crossovers."""
    answer = crossover_answer()
    assert isinstance(answer, dict) and {"counted_ops", "counted_crossover", "measured_crossover"} <= set(answer), \
        "return a dict with the keys 'counted_ops', 'counted_crossover' and 'measured_crossover'"
    ops = answer["counted_ops"]
    D = 64
    for T in (1024, 4096):
        for kind, core in (("dense", T * T * D), ("routing", _routing_core(T, D))):
            ratio = ops(kind, T, D) / core
            assert 0.4 <= ratio <= 4, (f"counted_ops({kind!r}, {T}, {D}) = {ops(kind, T, D):.3g} is {ratio:.2f} "
                                       f"times the section's count {core:.3g}: a refinement should stay within a "
                                       "small factor")
    growth = ops("dense", 16384, D) / ops("dense", 8192, D)
    assert 3.8 <= growth <= 4.2, f"dense should grow as T^2: doubling T multiplied your count by {growth:.2f}"
    growth = ops("routing", 65536, D) / ops("routing", 16384, D)
    assert 7 <= growth <= 9, f"routing at W = sqrt(T) should grow as T^1.5: T x4 gave x{growth:.2f}, not about 8"
    cheaper = [ops("routing", T, D) < ops("dense", T, D) for T in range(1, 65537)]
    assert cheaper[-1], "with your counts routing is not cheaper than dense even at T = 65536"
    not_cheaper = [T for T, yes in enumerate(cheaper, start=1) if not yes]
    from_here = not_cheaper[-1] + 1 if not_cheaper else 1
    assert answer["counted_crossover"] == from_here, (
        f"with your counted_ops (D = {D}), routing's count stays below dense's from T = {from_here} on; "
        f"you gave {answer['counted_crossover']}")
    common = sorted(set(timings["dense"]) & set(timings["routing"]))
    faster = [timings["routing"][T] < timings["dense"][T] for T in common]
    measured = None
    for n in range(len(common) - 1, -1, -1):
        if not faster[n]:
            break
        measured = common[n]
    assert answer["measured_crossover"] == measured, (
        f"in the timings, routing is faster than dense at every timed T from {measured} on (None: not at the "
        f"largest); you gave {answer['measured_crossover']}")
