"""Tests of rt_numpy.crosscheck: the reference step, its .npz files and the comparison.

What is checked:

1. every array :func:`crosscheck.reference` returns is what the library computes directly
   (routing attention, balanced membership, cluster statistics, the k-means update), and its
   gradients equal central finite differences along random directions;
2. save/load round-trips bit for bit with ``allow_pickle=False``, atomically; missing, unknown or
   corrupt contents raise a ValueError naming what is wrong;
3. :func:`crosscheck.compare` compares windows as sets, integers exactly and floats relative to
   the array's scale, and :func:`crosscheck.assert_close` names the arrays that differ;
4. bad input raises a ValueError/TypeError naming the parameter.
"""
import os
import zipfile

import numpy as np
import pytest

from rt_numpy import attention, crosscheck, kmeans

B, H, T, D, K, W = 2, 2, 8, 4, 3, 3


def _case(seed=0, shared_qk=True, mem=False, **changes):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, T, D)) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((H, K, D)), changes.get("norm", "ln"))
    mem_kv = (rng.standard_normal((H, K, D)), rng.standard_normal((H, K, D))) if mem else None
    result = crosscheck.reference(q, None if shared_qk else k, v, means, window_size=W, upstream=g,
                                  shared_qk=shared_qk, mem_kv=mem_kv, **changes)
    return result, (q, k, v, g, means, mem_kv)


CASES = [dict(), dict(shared_qk=False), dict(shared_qk=False, mem=True, **crosscheck.port_conventions(False)),
         dict(**crosscheck.port_conventions(True)), dict(membership="nearest")]
CASE_IDS = ["official_shared", "official_separate", "port_separate_mem", "port_shared", "nearest"]


# ------------------------------------------------------------------------------ 1. contents
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_reference_is_the_library(case):
    case = dict(case)
    shared, mem = case.pop("shared_qk", True), case.pop("mem", False)
    result, (q, k, v, g, means, mem_kv) = _case(1, shared, mem, **case)
    update = {name: case.pop(name) for name in ("centroid_update", "ema_decay", "laplace_eps") if name in case}
    out, loss, stats = attention.routing_attention(q, k, v, means, window_size=W, shared_qk=shared,
                                                   mem_kv=mem_kv, impl="ref", **case)
    np.testing.assert_array_equal(result["out"], out)
    assert result["commitment"] == loss and result["commitment"].shape == ()
    for name in ("assignments", "sums", "counts"):
        key = {"sums": "cluster_sums", "counts": "cluster_counts"}.get(name, name)
        np.testing.assert_array_equal(result[key], stats[name])
    state = kmeans.update_state(kmeans.state_from_means(means), stats,
                                centroid_update=update.get("centroid_update", "ema"),
                                ema_decay=update.get("ema_decay", 0.999),
                                laplace_eps=update.get("laplace_eps", 1e-5),
                                norm=case.get("norm", "ln"))
    np.testing.assert_array_equal(result["new_means"], state["means"])
    np.testing.assert_array_equal(result["new_counts"], state["counts"])
    if case.get("membership", "balanced") == "balanced":
        qn = kmeans.normalize(q, case.get("norm", "ln"))
        np.testing.assert_array_equal(result["query_windows"], kmeans.balanced_membership(qn, means, W, impl="ref"))
    else:
        assert "query_windows" not in result
    assert ("k" in result) == (not shared) and ("grad_mem_k" in result) == mem
    assert set(result) <= set(crosscheck.NAMES)
    assert crosscheck.options(result)["shared_qk"] == shared


@pytest.mark.parametrize("case", CASES[:3], ids=CASE_IDS[:3])
def test_gradients_equal_finite_differences(case):
    case = dict(case)
    shared, mem = case.pop("shared_qk", True), case.pop("mem", False)
    result, (q, k, v, g, means, mem_kv) = _case(2, shared, mem, **case)
    for name in ("centroid_update", "ema_decay", "laplace_eps"):
        case.pop(name, None)
    inputs = {"q": q, "v": v, **({} if shared else {"k": k}),
              **({"mem_k": mem_kv[0], "mem_v": mem_kv[1]} if mem else {})}

    def f(values, what):
        mkv = (values["mem_k"], values["mem_v"]) if mem else None
        out, loss, _ = attention.routing_attention(values["q"], values.get("k"), values["v"], means, window_size=W,
                                                   shared_qk=shared, mem_kv=mkv, impl="ref", **case)
        return float(np.sum(out * g)) if what == "out" else float(loss)

    rng, h = np.random.default_rng(3), 1e-6
    for name in inputs:
        for what, prefix in (("out", "grad_"), ("commitment", "commitment_grad_")):
            if prefix + name not in result:
                continue
            direction = rng.standard_normal(inputs[name].shape)
            plus = {**inputs, name: inputs[name] + h * direction}
            minus = {**inputs, name: inputs[name] - h * direction}
            numeric = (f(plus, what) - f(minus, what)) / (2 * h)
            analytic = float(np.sum(result[prefix + name] * direction))
            assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (prefix + name, numeric, analytic)


# ------------------------------------------------------------------------------ 2. files
def test_save_load_round_trip(tmp_path):
    result, _ = _case(4, shared_qk=False, mem=True)
    path = tmp_path / "case.npz"
    crosscheck.save(path, result)
    crosscheck.save(path, result)  # overwriting is fine
    assert sorted(os.listdir(tmp_path)) == ["case.npz"]  # no temporary file left behind
    loaded = crosscheck.load(path)
    assert sorted(loaded) == sorted(result)
    for name in result:
        np.testing.assert_array_equal(loaded[name], result[name])
        assert loaded[name].dtype == result[name].dtype
    with np.load(path, allow_pickle=False) as data:  # readable by anyone, without pickles
        assert "out" in data.files


def test_load_names_what_is_missing_or_unknown(tmp_path):
    result, _ = _case(5, shared_qk=False)
    path = tmp_path / "bad.npz"
    np.savez(path, **{n: a for n, a in result.items() if n not in ("grad_k", "out")})
    with pytest.raises(ValueError, match=r"missing names.*'out'.*'grad_k'"):
        crosscheck.load(path)
    np.savez(path, **result, extra=np.zeros(2))
    with pytest.raises(ValueError, match="unknown names.*extra"):
        crosscheck.load(path)
    with pytest.raises(ValueError, match="unknown names.*extra"):
        crosscheck.save(tmp_path / "x.npz", {**result, "extra": np.zeros(2)})
    assert not (tmp_path / "x.npz").exists()


def test_load_refuses_corrupt_files_and_foreign_options(tmp_path):
    result, _ = _case(6)
    path = tmp_path / "case.npz"
    crosscheck.save(path, result)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable crosscheck .npz"):
        crosscheck.load(path)
    with pytest.raises(ValueError, match="not a readable crosscheck .npz"):
        crosscheck.load(tmp_path / "absent.npz")
    np.savez(path, **{**result, "options": np.array('{"format": "something else"}')})
    with pytest.raises(ValueError, match="do not come from rt_numpy.crosscheck"):
        crosscheck.load(path)
    np.savez(path, **{**result, "options": np.array("not json")})
    with pytest.raises(ValueError, match="JSON"):
        crosscheck.load(path)
    assert zipfile.is_zipfile(path)


def test_save_refuses_object_arrays(tmp_path):
    result, _ = _case(7)
    result["out"] = np.array([None, 1], dtype=object)
    with pytest.raises(ValueError, match="out.*dtype object"):
        crosscheck.save(tmp_path / "o.npz", result)


# ------------------------------------------------------------------------------ 3. comparing
def test_compare_windows_as_sets_and_detects_changes():
    result, _ = _case(8, shared_qk=False)
    theirs = {name: result[name].copy() for name in ("out", "query_windows", "key_windows", "assignments")}
    theirs["query_windows"] = theirs["query_windows"][..., ::-1]  # another order inside each window
    theirs["key_windows"] = theirs["key_windows"].reshape(B, H, K * W)  # the port's flat layout
    errors = crosscheck.assert_close(result, theirs, rtol=0.0)
    assert errors == {"out": 0.0, "query_windows": 0.0, "key_windows": 0.0, "assignments": 0.0}

    theirs["out"] = theirs["out"] * (1 + 1e-4)
    theirs["assignments"] = theirs["assignments"].copy()
    theirs["assignments"][0, 0, 0, 0] = (theirs["assignments"][0, 0, 0, 0] + 1) % K
    errors = crosscheck.compare(result, theirs)
    assert 0.9e-4 < errors["out"] < 1.1e-4
    assert errors["assignments"] == pytest.approx(1 / result["assignments"].size)
    with pytest.raises(AssertionError, match=r"2 of 4 arrays differ.*\n.*assignments.*\n.*out"):
        crosscheck.assert_close(result, theirs, rtol=1e-5)
    assert crosscheck.compare(result, {"out": result["out"][0]})["out"] == float("inf")
    with pytest.raises(AssertionError, match=r"actual has no \['grad_q'\]"):
        crosscheck.assert_close(result, theirs, rtol=1e-3, names=["grad_q"])
    with pytest.raises(AssertionError, match=r"expected has no \['k'\]"):
        crosscheck.assert_close(_case(8)[0], {"k": result["k"]}, rtol=1e-3, names=["k"])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_output_never_passes(bad):
    result, _ = _case(8)
    theirs = {"out": result["out"].copy()}
    theirs["out"][0, 0, 0, 0] = bad
    assert crosscheck.compare(result, theirs)["out"] == float("inf")
    with pytest.raises(AssertionError, match=r"1 of 1 arrays differ.*\n.*out: inf"):
        crosscheck.assert_close(result, theirs, rtol=1e9)
    full = {"out": np.full_like(result["out"], bad)}  # an array that is all NaN or inf
    with pytest.raises(AssertionError, match="out: inf"):
        crosscheck.assert_close(result, full, rtol=1e9)
    same = {"out": theirs["out"]}  # the same non-finite values on both sides are a match
    assert crosscheck.compare({"out": theirs["out"].copy()}, same)["out"] == 0.0


@pytest.mark.parametrize("rtol, error", [(np.nan, ValueError), (np.inf, ValueError), (-1e-3, ValueError),
                                         ("1e-3", TypeError)])
def test_assert_close_rejects_a_bad_rtol(rtol, error):
    result, _ = _case(8)
    with pytest.raises(error, match="rtol"):
        crosscheck.assert_close(result, {"out": result["out"]}, rtol=rtol)


# ------------------------------------------------------------------------------ 4. bad input
def test_bad_input_names_the_parameter():
    _, (q, k, v, g, means, _) = _case(9)
    with pytest.raises(ValueError, match=r"upstream must have shape \(2, 2, 8, 4\)"):
        crosscheck.reference(q, None, v, means, window_size=W, upstream=g[0])
    bad = g.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="upstream contains NaN"):
        crosscheck.reference(q, None, v, means, window_size=W, upstream=bad)
    with pytest.raises(TypeError, match="upstream must be a NumPy array"):
        crosscheck.reference(q, None, v, means, window_size=W, upstream=g.tolist())
    with pytest.raises(ValueError, match="update must be one of"):
        crosscheck.reference(q, None, v, means, window_size=W, upstream=g, centroid_update="lloyd")
    with pytest.raises(ValueError, match="window_size must be <= T=8, got 9"):
        crosscheck.reference(q, None, v, means, window_size=9, upstream=g)
    state = kmeans.state_from_means(means + 1)
    with pytest.raises(ValueError, match=r"state\['means'\] must equal means"):
        crosscheck.reference(q, None, v, means, window_size=W, upstream=g, state=state)


def test_convention_presets_are_accepted_and_differ():
    official, port = crosscheck.official_conventions(), crosscheck.port_conventions(True)
    assert set(official) == set(port)
    assert {n for n in official if official[n] != port[n]} == {"norm", "logits", "self_attend", "combine_eps",
                                                               "commitment_qk", "centroid_update"}
    assert crosscheck.port_conventions(False)["self_attend"] == "allow"
    a, _ = _case(10, **official)
    b, _ = _case(10)
    np.testing.assert_array_equal(a["out"], b["out"])  # the official conventions are the defaults
