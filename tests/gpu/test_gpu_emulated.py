"""tests/gpu/test_gpu.py on a machine without a GPU: against a stand-in CuPy whose kernels run on CPU threads.

tests/gpu/fake_cupy/cupy is NumPy arrays under the class name ``cupy.ndarray`` (so rt_numpy
takes them for GPU arrays and dispatches to the CUDA kernels), with CuPy's refusal to mix
host and device arrays, and a ``RawModule`` that compiles the kernels' CUDA source with
g++ (tests/gpu/cuda_emulator.py).  This exercises, on every CI run, the GPU path that a GPU
machine runs: autograd's registration of the array type, ``to_device``, the dispatch in
ops, kmeans and attention, the kernels' glue and CUDA source, the training loop, sampling
and checkpoints.  The largest cases of tests/gpu/test_gpu.py and its command-line test are left
out here for time; on a GPU all of it runs (bench/gpu_check.py).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cuda_emulator import GXX

ROOT = Path(__file__).resolve().parents[2]
LEFT_OUT = "not cli and not 4096 and not 1500 and not 600 and not 256"  # the slowest to emulate


@pytest.mark.slow
@pytest.mark.skipif(GXX is None, reason="g++ is needed to emulate the CUDA kernels")
def test_gpu_tests_pass_on_the_emulated_gpu():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "gpu" / "fake_cupy"), str(ROOT)]))
    env.pop("RT_NUMPY_FORCE_REF", None)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", LEFT_OUT,
                             str(ROOT / "tests" / "gpu" / "test_gpu.py")], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1]
