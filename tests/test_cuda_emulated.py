"""The CUDA kernels of rt_numpy.kernels.cupy_* run on the CPU, without CuPy or a GPU.

A small emulator compiles a kernel's CUDA source as C++ (g++) with one OS thread
per CUDA thread: ``threadIdx``/``blockIdx`` are thread-local, ``__shared__``
arrays are statics (blocks run one after another), ``__syncthreads()`` is a
``std::barrier`` and ``atomicAdd`` an atomic builtin.  The kernels' own Python
glue (sorting, segment starts, denominators) then runs on NumPy arrays, so the
whole GPU path - glue and CUDA source - is checked here against the NumPy
references and the Numba kernels.  Warp-level primitives are not emulated (the
kernels use none).  Timing means nothing here; tests/test_gpu.py runs the same
comparisons with CuPy on a GPU.
"""
import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

from rt_numpy import attention, kmeans
from rt_numpy.kernels import cupy_kmeans, cupy_ops, cupy_routing

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is needed to emulate the CUDA kernels")

PRELUDE = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>
struct dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
thread_local std::barrier<>* block_barrier;
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
using std::exp; using std::log; using std::min; using std::max;
inline unsigned int __float_as_uint(float x) { unsigned int u; std::memcpy(&u, &x, 4); return u; }
inline long long __double_as_longlong(double x) { long long u; std::memcpy(&u, &x, 8); return u; }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
"""

LAUNCHER = r"""
template <typename... A, std::size_t... I>
std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<A...>(*static_cast<A*>(args[I])...);
}
template <typename... A>
void emulate(void (*kernel)(A...), unsigned gx, unsigned gy, unsigned bx, void** args) {
    auto values = unpack<A...>(args, std::index_sequence_for<A...>{});
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    for (unsigned by = 0; by < gy; ++by)
        for (unsigned b = 0; b < gx; ++b) {  // blocks one after another: statics act as shared memory
            std::barrier<> barrier(bx);
            std::vector<std::thread> threads;
            for (unsigned t = 0; t < bx; ++t)
                threads.emplace_back([&, t] {
                    threadIdx = {t, 0, 0};
                    blockIdx = {b, by, 0};
                    block_barrier = &barrier;
                    std::apply(kernel, values);
                });
            for (auto& thread : threads) thread.join();
        }
}
extern "C" void run(unsigned gx, unsigned gy, unsigned bx, void** args) { emulate(&KERNEL, gx, gy, bx, args); }
"""

_BUILD = Path(tempfile.mkdtemp(prefix="rt_numpy_cuda_emulated_"))
_libraries = {}


def _library(source, name):
    key = hashlib.sha256((source + name).encode()).hexdigest()[:16]
    if key not in _libraries:
        cpp, lib = _BUILD / f"{key}.cpp", _BUILD / f"{key}.so"
        cpp.write_text(PRELUDE + source + LAUNCHER.replace("KERNEL", name))
        result = subprocess.run([GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wno-unknown-pragmas",
                                 "-o", str(lib), str(cpp)], capture_output=True, text=True)
        assert result.returncode == 0, f"g++ could not build {name}:\n{result.stderr[-4000:]}"
        _libraries[key] = ctypes.CDLL(str(lib))
    return _libraries[key]


_SCALARS = {np.dtype(np.int32): ctypes.c_int, np.dtype(np.int64): ctypes.c_longlong,
            np.dtype(np.float32): ctypes.c_float, np.dtype(np.float64): ctypes.c_double}


def emulated_launch(source, name, grid, block, args):
    """A stand-in for cupy_ops.launch: the same arguments, NumPy arrays instead of CuPy ones."""
    values = []
    for a in args:
        if isinstance(a, np.ndarray):
            assert a.flags.c_contiguous, f"{name}: a non-contiguous array argument"
            values.append(ctypes.c_void_p(a.ctypes.data))
        else:
            values.append(_SCALARS[np.dtype(type(a))](a))
    pointers = (ctypes.c_void_p * len(values))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values])
    grid = tuple(grid) + (1,) * (2 - len(grid))
    _library(source, name).run(ctypes.c_uint(grid[0]), ctypes.c_uint(grid[1]), ctypes.c_uint(block[0]), pointers)


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.setattr(cupy_ops, "LAUNCHER", emulated_launch)


# --------------------------------------------------------------------------- scatter-add
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_equals_add_at_bitwise(dtype):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((300, 5)).astype(dtype)
    rows = rng.integers(0, 37, size=300)  # repeats, and rows that nobody names
    expected = np.zeros((40, 5), dtype)
    np.add.at(expected, rows, y)  # the same order of addition: bitwise equal
    np.testing.assert_array_equal(cupy_ops.scatter_add_rows(y, rows, 40), expected)


# --------------------------------------------------------------------------- top-W
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,W", [(7, 1), (7, 7), (300, 17), (600, 256), (513, 300)])
def test_top_w_equals_reference(dtype, T, W):
    rng = np.random.default_rng(T + W)
    scores = rng.standard_normal((2, 2, 3, T)).astype(dtype)
    scores[0, 0, 0] = np.round(scores[0, 0, 0])  # many ties: the lower position must win
    scores[0, 1, 1] = 0.0
    scores[0, 1, 1, ::3] = -0.0  # -0.0 equals +0.0
    scores[1, 0, 2] = -np.abs(scores[1, 0, 2])  # all negative
    np.testing.assert_array_equal(cupy_kmeans.top_w_positions(scores, W), kmeans.top_w_reference(scores, W))


# --------------------------------------------------------------------------- fused routing attention
def _routing_case(B, H, T, D, K, W, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((H, K, D))).astype(dtype)
    qw = kmeans.balanced_membership(kmeans.normalize(q), means, W, impl="ref")
    kw = kmeans.balanced_membership(kmeans.normalize(k), means, W, impl="ref")
    return q, k, v, g, qw, kw


CASES = [  # (B, H, T, D, K, W): several row groups (W > 128 query threads) and key chunks
    (1, 2, 24, 8, 3, 8),
    (2, 1, 40, 4, 2, 40),
    (1, 1, 300, 4, 2, 150),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("last_resort", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_routing_forward_and_backward_equal_reference(case, last_resort, dtype):
    import autograd

    from rt_numpy import ops

    q, k, v, g, qw, kw = _routing_case(*case, dtype=dtype)
    scale, eps = 0.7, 1e-2
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    self_attend = "last_resort" if last_resort else "allow"

    def reference(q, k, v):
        return attention.cluster_attention_reference(q, k, v, qw, kw, scale=scale, self_attend=self_attend, eps=eps)

    out = cupy_routing.forward(q, k, v, qw, kw, scale, last_resort, eps)
    np.testing.assert_allclose(out, reference(q, k, v), **tol)
    grads = autograd.grad(lambda qkv: ops.sum(ops.multiply(reference(*qkv), g)))((q, k, v))
    for mine, theirs in zip(cupy_routing.backward(g, q, k, v, qw, kw, scale, last_resort, eps), grads):
        np.testing.assert_allclose(mine, theirs, **tol)


def test_routing_row_with_no_visible_key_outputs_zero():
    """Separate QK: a query whose cluster's keys all come later sees nothing: output 0, gradient 0."""
    q, k, v, g, _, _ = _routing_case(1, 1, 6, 4, 1, 2, np.float64)
    qw = np.array([[[[0, 1]]]])
    kw = np.array([[[[3, 4]]]])
    out = cupy_routing.forward(q, k, v, qw, kw, 1.0, False, 1e-2)
    assert np.all(out == 0)
    dq, dk, dv = cupy_routing.backward(g, q, k, v, qw, kw, 1.0, False, 1e-2)
    assert np.all(dq == 0) and np.all(dk == 0) and np.all(dv == 0)


def test_routing_shared_qk_equals_reference():
    """Shared QK: keys are the queries and both windows are one array (sorted once in the backward)."""
    import autograd

    from rt_numpy import ops

    q, _, v, g, qw, _ = _routing_case(1, 2, 48, 8, 3, 16, np.float64, seed=3)

    def reference(q, v):
        return attention.cluster_attention_reference(q, q, v, qw, qw, scale=1.0, self_attend="last_resort", eps=1e-5)

    np.testing.assert_allclose(cupy_routing.forward(q, q, v, qw, qw, 1.0, True, 1e-5), reference(q, v), rtol=1e-10,
                               atol=1e-12)
    dq, dk, dv = cupy_routing.backward(g, q, q, v, qw, qw, 1.0, True, 1e-5)
    expected = autograd.grad(lambda qv: ops.sum(ops.multiply(reference(*qv), g)))((q, v))
    np.testing.assert_allclose(dq + dk, expected[0], rtol=1e-10, atol=1e-12)  # q is both queries and keys
    np.testing.assert_allclose(dv, expected[1], rtol=1e-10, atol=1e-12)
