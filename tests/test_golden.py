"""rt_numpy still reproduces the golden vectors in tests/golden/ (made by tests/golden/make_golden.py).

Each file's outputs are recomputed from its stored inputs on the reference path and compared:
integer arrays (windows, assignments, counts) exactly, float arrays to 1e-12 relative to each
array's largest magnitude (float64; leaves room for another BLAS's summation order, nothing more).
The routing-attention files are also valid :mod:`rt_numpy.crosscheck` files.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from rt_numpy import crosscheck

GOLDEN = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", GOLDEN / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)
INPUT_NAMES = {name: sorted(arrays) for name, arrays in make_golden.make_inputs().items()}
MAX_BYTES = 300_000


def _load(name):
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as data:
        return {n: data[n] for n in data.files}


def test_golden_files_are_small_and_documented():
    files = sorted(GOLDEN.glob("*.npz"))
    assert [f.stem for f in files] == sorted(INPUT_NAMES)
    assert sum(f.stat().st_size for f in files) < MAX_BYTES
    readme = (GOLDEN / "README.md").read_text()
    for name in INPUT_NAMES:
        stored = _load(name)
        assert f"`{name}.npz`" in readme
        for array in stored:
            if not array.startswith(("param.", "grad.")):  # parameter names are described as patterns
                assert f"`{array}`" in readme, f"{name}.npz: array {array} is not described in README.md"
        floats = [a for a in stored.values() if a.dtype.kind == "f"]
        assert floats and all(a.dtype == np.float64 for a in floats)


@pytest.mark.parametrize("name", sorted(INPUT_NAMES))
def test_golden_outputs_are_reproduced(name):
    stored = _load(name)
    inputs = {n: stored[n] for n in INPUT_NAMES[name]}
    outputs = make_golden.compute(name, inputs)
    assert set(inputs) | set(outputs) | {"options"} == set(stored)
    errors = crosscheck.compare(stored, outputs)
    assert set(errors) == set(outputs) - {"options"}
    exact = {n for n in outputs if stored[n].dtype.kind in "iub"}
    bad = {n: e for n, e in errors.items() if e > (0.0 if n in exact else 1e-12)}
    assert not bad, f"{name}.npz: {bad}"
    if "options" in outputs:  # crosscheck files carry their options: they must not have changed either
        assert json.loads(str(outputs["options"])) == json.loads(str(stored["options"]))


@pytest.mark.parametrize("name", ["routing_attention_shared_qk", "routing_attention_separate_qk"])
def test_routing_golden_files_are_crosscheck_files(name):
    loaded = crosscheck.load(GOLDEN / f"{name}.npz")
    opts = crosscheck.options(loaded)
    assert opts["shared_qk"] == name.endswith("shared_qk")
    names = ("norm", "logits", "self_attend", "combine_eps", "commitment_qk", "centroid_update")
    assert {k: opts[k] for k in names} == {k: crosscheck.official_conventions()[k] for k in names}


def test_golden_check_detects_a_change(tmp_path):
    """The comparison used above fails when an output moves by more than the tolerance."""
    stored = _load("tiny_lm")
    moved = dict(stored, loss=stored["loss"] * (1 + 1e-9))
    assert crosscheck.compare(stored, moved)["loss"] > 1e-12
