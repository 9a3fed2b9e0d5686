"""The CUDA sources of rt_numpy.kernels.cupy_* compile for a Hopper GPU, with no GPU present.

With ``nvcc`` on the PATH every template instance the kernels launch is compiled to
machine code for sm_90 (``-cubin``, so ptxas runs too); otherwise with NVRTC through
``cupy_backends`` when CuPy is installed; otherwise the test skips.
tests/gpu/test_cuda_emulated.py checks what the kernels compute.
"""
import shutil
import subprocess

import numpy as np
import pytest

from rt_numpy.kernels import cupy_kmeans, cupy_ops, cupy_routing

DTYPES = (np.float32, np.float64)
HEAD_DIMS = (4, 8, 16, 32, 64, 128)
SOURCES = {
    "cupy_ops": (cupy_ops.SOURCE, [f"segment_sum<{cupy_ops.ctype(t)}>" for t in DTYPES]),
    "cupy_kmeans": (cupy_kmeans.SOURCE, [cupy_kmeans.kernel_name(t) for t in DTYPES]),
    "cupy_routing": (cupy_routing.SOURCE, [name for t in DTYPES for D in HEAD_DIMS
                                           for name in cupy_routing.kernel_names(t, D)]),
}


def _compile_with_nvcc(nvcc, source, names, tmp_path):
    # Taking the address of each template instance makes nvcc compile it.
    keep = "\n".join(f"void* keep_{i} = (void*)&{name};" for i, name in enumerate(names))
    path = tmp_path / "kernels.cu"
    path.write_text(source + "\n" + keep + "\n")
    result = subprocess.run([nvcc, "-arch=sm_90", "-std=c++17", "-cubin", "-o", str(tmp_path / "k.cubin"),
                             str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def _compile_with_nvrtc(nvrtc, source, names):
    program = nvrtc.createProgram(source, "kernels.cu", [], [])
    for name in names:
        nvrtc.addNameExpression(program, name)
    try:
        nvrtc.compileProgram(program, ["-arch=compute_90", "--std=c++17"])
    except Exception:
        pytest.fail(nvrtc.getProgramLog(program))
    for name in names:
        assert nvrtc.getLoweredName(program, name)


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(SOURCES))
def test_cuda_source_compiles_for_sm90(module, tmp_path):
    source, names = SOURCES[module]
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        return _compile_with_nvcc(nvcc, source, names, tmp_path)
    nvrtc = pytest.importorskip("cupy_backends.cuda.libs.nvrtc", reason="neither nvcc nor CuPy's NVRTC is here")
    _compile_with_nvrtc(nvrtc, source, names)
