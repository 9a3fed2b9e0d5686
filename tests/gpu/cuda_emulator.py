"""A CPU emulator for rt_numpy's CUDA kernels: the CUDA source compiled by g++, one OS thread per CUDA thread.

``threadIdx``/``blockIdx`` are thread-local, ``__shared__`` arrays are statics (the
blocks of a launch run one after another, so a static is one block's shared memory),
``__syncthreads()`` is a ``std::barrier`` over the block's threads and ``atomicAdd``
an atomic builtin.  Warp-level primitives are not emulated (the kernels use none).
:func:`emulated_launch` takes the arguments of ``rt_numpy.kernels.cupy_ops.launch``
with NumPy arrays (or subclasses) in place of CuPy arrays.  Used by
tests/gpu/test_cuda_emulated.py and by the stand-in CuPy of tests/gpu/fake_cupy.
"""
import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

GXX = shutil.which("g++")

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

_BUILD = Path(tempfile.mkdtemp(prefix="rt_numpy_cuda_emulated_"))  # one build folder per process
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
