"""Moving state between devices, and what happens when a GPU is asked for where there is none.

These run on every machine; tests/gpu/test_gpu.py holds the comparisons that need a GPU.
"""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rt_numpy import backend, model, optim, train

NO_GPU = not backend.cupy_available()


def _state():
    cfg, _ = train.PRESETS["tiny"]
    rng = np.random.default_rng(0)
    params = model.init_params(cfg, rng)
    return params, optim.adamw_init(params), model.init_kmeans(cfg, rng)


def test_to_device_cpu_keeps_structure_and_arrays():
    params, opt, states = _state()
    moved = backend.to_device((params, opt, states), "cpu")
    assert isinstance(moved, tuple) and len(moved) == 3
    assert moved[1]["step"] == 0  # non-arrays pass through
    for name, value in params.items():
        assert moved[0][name] is value  # NumPy arrays already on the host are not copied
    assert backend.device_of(params["wte"]) == "cpu"


def test_to_numpy_copies_lists_and_nested_dicts():
    tree = {"a": [np.zeros(2), (np.ones(3), 4)], "b": {"c": np.arange(3)}, "d": "text"}
    out = backend.to_numpy(tree)
    assert isinstance(out["a"], list) and isinstance(out["a"][1], tuple)
    np.testing.assert_array_equal(out["b"]["c"], np.arange(3))
    assert out["a"][1][1] == 4 and out["d"] == "text"


@pytest.mark.parametrize("device", ["tpu", "GPU", None, 0])
def test_unknown_device_names_parameter_and_value(device):
    with pytest.raises(ValueError, match=r"device must be one of .*got"):
        backend.to_device(np.zeros(2), device)


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_gpu_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="device 'gpu' needs"):
        backend.to_device(np.zeros(2), "gpu")
    with pytest.raises(RuntimeError, match="device 'gpu' needs"):
        backend.require_gpu()


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("command", [["train", "--preset", "tiny"], ["demo"], ["eval", "runs/none"],
                                     ["sample", "runs/none"]])
def test_cli_device_gpu_without_gpu_fails_clearly(command, tmp_path):
    result = subprocess.run([sys.executable, "-m", "rt_numpy", *command, "--device", "gpu"],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "device 'gpu' needs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing was trained or written


def test_train_refuses_unknown_device():
    cfg, tcfg = train.PRESETS["tiny"]
    corpus = {name: np.zeros(1000, dtype=np.uint8) for name in ("train", "val", "test")}
    with pytest.raises(ValueError, match="device must be one of"):
        train.train(cfg, tcfg, corpus=corpus, progress=False, device="cuda")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_gpu_check_without_gpu_says_so():
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"
    result = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "gpu_check: device 'gpu' needs" in result.stderr and "Traceback" not in result.stderr
