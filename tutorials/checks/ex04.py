"""Checks for the exercises of tutorial 04 (checking your own implementation against rt_numpy).

Every check compares against rt_numpy itself (``crosscheck.reference`` recomputed on the inputs of the
case) or against what ``crosscheck.compare`` reports, never against stored numbers.
"""
import os

import numpy as np

from rt_numpy import crosscheck, kmeans

FROM_SCRATCH_NAMES = ("out", "query_windows", "commitment", "new_means")  # what my_routing_attention returns
PORT_NAMES = FROM_SCRATCH_NAMES + ("grad_q", "grad_v", "commitment_grad_q")
TORCH_SKIP = ("Skipped (torch is not installed here): the PyTorch exercise 4.4 needs it. "
              "Install it with `pip install torch`, or port to JAX and check with ex04.check_port_numbers.")


def _fails(expected, actual, rtol):
    """The names that ``crosscheck.assert_close(expected, actual, rtol=rtol)`` would list, with their errors."""
    errors = crosscheck.compare(expected, actual)
    # `not e <= tol` rather than `e > tol`: it also fails an error of NaN, should one ever appear
    return {n: e for n, e in errors.items()
            if not e <= (0 if np.asarray(expected[n]).dtype.kind in "iub" else rtol)}, errors


def _table(errors):
    return "\n".join(f"    {n:18s} {e:.3g}" for n, e in sorted(errors.items()))


def _port_case(case, what):
    """The options of a case, checked to be the port's with shared QK (what the from-scratch code follows)."""
    opts = crosscheck.options(case)
    wanted = crosscheck.port_conventions(shared_qk=True)
    wrong = {n: opts[n] for n in wanted if opts.get(n) != wanted[n]}
    assert opts["shared_qk"] and opts["membership"] == "balanced" and not wrong, (
        f"{what} must be a case made with crosscheck.port_conventions(shared_qk=True) and shared_qk=True, "
        f"as in section 1; these options differ: {wrong or {'shared_qk': opts['shared_qk']}}")
    return opts


def fresh_port_case(seed, B=2, H=2, T=24, D=8, K=3, W=6):
    """A second case, of other sizes, so that an answer cannot lean on the tutorial's arrays."""
    rng = np.random.default_rng(seed)
    q, v, upstream = rng.standard_normal((3, B, H, T, D))  # three (B, H, T, D) arrays
    means = kmeans.normalize(rng.standard_normal((H, K, D)), "l2")  # (H, K, D)
    return crosscheck.reference(q, None, v, means, window_size=W, upstream=upstream, shared_qk=True,
                                **crosscheck.port_conventions(shared_qk=True))


# ------------------------------------------------------------------ Exercise 4.1
def check_saved_case(answer):
    """Exercise 4.1: ``answer()`` returns (path, mine): an official-convention case saved at path, and
    from-scratch ``assignments`` and ``cluster_counts`` of its queries."""
    path, mine = answer()
    assert os.path.exists(path), f"there is no file at {path}: did crosscheck.save(path, ref) run?"
    try:
        case = crosscheck.load(path)
    except ValueError as err:
        raise AssertionError(f"crosscheck.load cannot read {path}: {err}") from None
    opts = crosscheck.options(case)
    official = crosscheck.official_conventions()
    wrong = {n: (opts.get(n), official[n]) for n in official if opts.get(n) != official[n]}
    assert not wrong, ("the exercise asks for the official conventions (crosscheck.official_conventions()); "
                       f"option: (yours, official) = {wrong}")
    # the file must hold rt_numpy's numbers for its own inputs: recompute them
    again = crosscheck.reference(case["q"], case.get("k"), case["v"], case["means"], window_size=opts["window_size"],
                                 upstream=case["upstream"], shared_qk=opts["shared_qk"],
                                 membership=opts["membership"], **official,
                                 state={"means": case["means"], "counts": case["state_counts"],
                                        "sums": case["state_sums"]})
    bad, _ = _fails(again, case, 1e-12)
    assert not bad, f"the saved arrays are not what crosscheck.reference gives for the saved inputs:\n{_table(bad)}"
    assert isinstance(mine, dict), f"mine must be a dict of arrays by name, got {type(mine).__name__}"
    missing = [n for n in ("assignments", "cluster_counts") if n not in mine]
    assert not missing, f"mine has no {missing}: compute them from scratch from case['q'] and case['means']"
    shapes = {n: (np.shape(mine[n]), case[n].shape) for n in ("assignments", "cluster_counts")
              if np.shape(mine[n]) != case[n].shape}
    assert not shapes, (f"shapes (yours, expected) differ: {shapes}; the first axis is the stream S "
                        "(1 with shared QK): see crosscheck.NAMES")
    bad, errors = _fails(case, mine, 0)
    bad = {n: e for n, e in bad.items() if n in ("assignments", "cluster_counts")}
    assert not bad, ("these differ from the saved case (fraction of entries that differ):\n" + _table(bad)
                     + "\n  The official routing normalises with a layer norm, (x - mean) / sqrt(var + 1e-6), "
                       "not to unit length; the nearest centroid is the largest dot product.")


# ------------------------------------------------------------------ Exercise 4.2
_FINGERPRINTS = {
    # bug name -> (what the planted bug must do, a test of the compare errors and the two results)
    "causal_by_rank": "the mask compares ranks inside the window instead of original positions: "
                      "only `out` can move (the windows, the loss and the update do not see the mask)",
    "no_combine_eps": "the scatter-mean divides by the count n alone: `out` moves by at most "
                      "combine_eps / n = 1e-5 relative, but is 0/0 = NaN at a token in no window, "
                      "and nothing else moves",
    "commitment_squared_norms": "the loss is a mean of squared norms (sum over D, then mean): "
                                "D times the reference's commitment",
}


def _check_fingerprint(bug, errors, found, case):
    D = case["q"].shape[-1]
    if bug == "causal_by_rank":
        moved = {n for n, e in errors.items() if e > 1e-12}
        assert moved == {"out"}, f"{bug}: {_FINGERPRINTS[bug]}; yours moved {sorted(moved) or 'nothing'}"
    elif bug == "no_combine_eps":
        moved = {n for n, e in errors.items() if not e <= 1e-12}
        out, expected = np.asarray(found["out"], dtype=float), case["out"]  # (B, H, T, D)
        counts = np.stack([np.bincount(w.ravel(), minlength=out.shape[2])  # (B*H, T): windows holding each token
                           for w in case["query_windows"].reshape(-1, *case["query_windows"].shape[2:])])
        in_none = (counts == 0).reshape(out.shape[:3])  # (B, H, T)
        nan_rows = np.isnan(out).any(-1)  # (B, H, T)
        finite = ~nan_rows
        drift = np.max(np.abs(out[finite] - expected[finite])) / np.max(np.abs(expected)) if finite.any() else 0.0
        assert moved == {"out"} and drift <= 1.01e-5 and not (nan_rows & ~in_none).any(), (
            f"{bug}: {_FINGERPRINTS[bug]}; yours moved {sorted(moved)}, the finite rows of out by {drift:.2g}, "
            f"and {int((nan_rows & ~in_none).sum())} rows of tokens that are in a window hold NaN")
    elif bug == "commitment_squared_norms":
        ratio = float(np.asarray(found["commitment"]) / case["commitment"])
        assert abs(ratio - D) < 1e-9 * D, (f"{bug}: {_FINGERPRINTS[bug]} (D = {D}); "
                                           f"yours is {ratio:.4g} times the reference")


def check_planted_bugs(answer, case):
    """Exercise 4.2: ``answer()`` returns {bug: (fn, predicted)}; fn(q, v, means, W) is a buggy copy of
    my_routing_attention, predicted the names you expect ``assert_close(case, ..., rtol=1e-12)`` to list."""
    bugs = answer()
    opts = _port_case(case, "case")
    assert isinstance(bugs, dict) and len(bugs) >= 3, (
        "return a dict with at least three planted bugs, {name: (buggy_fn, predicted_names)}: "
        f"the three of the exercise are {sorted(_FINGERPRINTS)}")
    named = sorted(set(_FINGERPRINTS) - set(bugs))
    assert not named, f"plant the exercise's three bugs too; missing: {named}"
    seen = []
    for bug, entry in bugs.items():
        assert isinstance(entry, tuple) and len(entry) == 2 and callable(entry[0]), (
            f"bugs[{bug!r}] must be a pair (buggy_fn, predicted_names)")
        fn, predicted = entry
        predicted = {predicted} if isinstance(predicted, str) else set(predicted)
        found = fn(case["q"], case["v"], case["means"], opts["window_size"])
        assert isinstance(found, dict), f"{bug}: the buggy function must return a dict, as my_routing_attention does"
        unknown = sorted(predicted - set(found))
        assert not unknown, (f"{bug}: you predict {unknown}, which the function does not return; "
                             f"it returns {sorted(found)}")
        with np.errstate(invalid="ignore"):
            bad, errors = _fails(case, found, 1e-12)
        assert bad, (f"{bug}: nothing differs from the reference, so no bug was planted "
                     f"(errors:\n{_table(errors)})")
        observed = set(bad)
        assert predicted == observed, (
            f"{bug}: you predicted {sorted(predicted)}, but these fail: {sorted(observed)} (an error above "
            f"rtol=1e-12, including inf for a NaN, or an integer array that differs). The errors compare reports:\n"
            f"{_table(errors)}\n  Why does each failing name depend on the line you changed, and why do the "
            "others not?")
        if bug in _FINGERPRINTS:
            _check_fingerprint(bug, errors, found, case)
        seen.append(tuple(sorted((n, "nan" if np.isnan(e) else round(np.log10(e + 1e-300), 3))
                                 for n, e in errors.items())))
    assert len(set(seen)) == len(seen), "two of your bugs give exactly the same errors: plant different bugs"


# ------------------------------------------------------------------ Exercise 4.3
def check_grad_v(my_grad_v, case):
    """Exercise 4.3: my_grad_v(q, v, means, W, upstream) -> (B, H, T, D), d sum(upstream * out) / dv by hand."""
    for where, c in (("the tutorial's case", case), ("a fresh case (B = 2, T = 24, K = 3, W = 6)", fresh_port_case(4))):
        opts = _port_case(c, where)
        g = np.asarray(my_grad_v(c["q"], c["v"], c["means"], opts["window_size"], c["upstream"]))
        assert g.shape == c["v"].shape, f"on {where}: grad_v must have the shape of v, {c['v'].shape}; got {g.shape}"
        bad, errors = _fails(c, {"grad_v": g}, 1e-10)
        if bad:
            ratio = np.sum(g * c["grad_v"]) / np.sum(c["grad_v"] ** 2)
            hint = (" Your gradient is the reference scaled by a constant close to 1: check the division by "
                    "count + combine_eps." if 0.9 < ratio < 1.1 and errors["grad_v"] < 1e-2 else
                    " Go backwards one step at a time: the scatter-mean sends g_i / (n_i + eps) to every window "
                    "that holds token i, and a window's output O = P V[window] sends P^T of that to its values "
                    "(a token in several windows collects from each).")
            raise AssertionError(f"on {where}: grad_v differs from the reference by {errors['grad_v']:.3g} "
                                 f"(relative, rtol 1e-10).{hint}")


# ------------------------------------------------------------------ Exercise 4.4
def torch_installed():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def check_port_numbers(found, case, rtol=1e-10, where="the case"):
    """Your port's numbers (a dict of NumPy arrays with the names of PORT_NAMES) against a case."""
    missing = [n for n in PORT_NAMES if n not in found]
    assert not missing, f"on {where}: your numbers have no {missing} (needed: {list(PORT_NAMES)})"
    bad, errors = _fails(case, {n: found[n] for n in PORT_NAMES}, rtol)
    assert not bad, (f"on {where}: these arrays differ beyond rtol={rtol:g}:\n{_table(bad)}\n  all errors:\n"
                     f"{_table(errors)}\n  Compare by name: which stage does the first failing name belong to?")


def _torch_numbers(fn, case, dtype):
    import torch

    W = crosscheck.options(case)["window_size"]
    tq = torch.tensor(case["q"], dtype=dtype, requires_grad=True)
    tv = torch.tensor(case["v"], dtype=dtype, requires_grad=True)
    res = fn(tq, tv, torch.tensor(case["means"], dtype=dtype), W)
    missing = [n for n in FROM_SCRATCH_NAMES if n not in res]
    assert not missing, f"torch_routing_attention must return {list(FROM_SCRATCH_NAMES)}; it has no {missing}"
    try:
        grad_q, grad_v = torch.autograd.grad((res["out"] * torch.tensor(case["upstream"], dtype=dtype)).sum(),
                                             [tq, tv], retain_graph=True)
        (commitment_grad_q,) = torch.autograd.grad(res["commitment"], [tq])
    except RuntimeError as err:
        raise AssertionError(f"torch.autograd.grad failed ({err}); keep out and commitment differentiable: no "
                             ".detach(), .numpy() or torch.no_grad() on the way from q and v") from None
    found = {**res, "grad_q": grad_q, "grad_v": grad_v, "commitment_grad_q": commitment_grad_q}
    return {n: (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)) for n, t in found.items()}


def check_torch_port(torch_routing_attention, path):
    """Exercise 4.4: torch_routing_attention(q, v, means, W) on torch tensors -> dict of tensors named as
    FROM_SCRATCH_NAMES; checked with torch autograd against the saved case at path (float64 to 1e-10,
    float32 to 1e-5) and against a fresh case of other sizes."""
    if not torch_installed():
        raise AssertionError(TORCH_SKIP)
    import torch

    try:
        case = crosscheck.load(path)
    except ValueError as err:
        raise AssertionError(f"cannot read the saved case {path}: {err}") from None
    _port_case(case, str(path))
    for where, c in ((f"the saved case {os.path.basename(str(path))}", case),
                     ("a fresh case (B = 2, T = 24, K = 3, W = 6)", fresh_port_case(5))):
        check_port_numbers(_torch_numbers(torch_routing_attention, c, torch.float64), c, 1e-10, where + ", float64")
    check_port_numbers(_torch_numbers(torch_routing_attention, case, torch.float32), case, 1e-5,
                       "the saved case, float32")
