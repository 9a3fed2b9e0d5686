"""CuPy kernels shared by the GPU paths: compiling and launching, and a deterministic scatter-add of rows.

* :func:`launch` - compile a templated CUDA kernel once (NVRTC, through
  ``cupy.RawModule``) and launch it.  Tests may point :data:`LAUNCHER` at a CPU
  emulator, so that the same Python glue and CUDA source also run on NumPy arrays.
* :func:`scatter_add_rows` - ``out[rows[m]] += y[m]`` for a GPU, as a segment
  sum: the source rows are sorted by destination (a stable sort keeps their
  order) and one thread per output number adds its segment in that order.  No
  atomics, so the result is the same bits on every run (``cupy.add.at`` would
  use atomics, whose order of addition varies).  It is what
  :func:`rt_numpy.ops.scatter_add_rows` runs on CuPy arrays, and what the fused
  routing kernels use for their scatter-mean.

The glue code calls the array module of its inputs (``xp``), never ``cupy``
directly, and cupy is imported only to compile: this module imports without
cupy, and its CUDA source can be checked on a machine without a GPU.
"""
from __future__ import annotations

import functools

import numpy as np

OPTIONS = ("--std=c++17",)
LAUNCHER = None  # None: CuPy.  A test may set a function (source, name, grid, block, args) -> None.
THREADS = 256


def _array_module(x):
    """numpy or cupy, by the class of ``x`` (looked up by name: importing this module never imports cupy)."""
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def ctype(dtype):
    """The CUDA C type of a float dtype, for template arguments."""
    dtype = np.dtype(dtype)
    if dtype == np.float32:
        return "float"
    if dtype == np.float64:
        return "double"
    raise TypeError(f"the CUDA kernels take float32 or float64, got {dtype}")


@functools.lru_cache(maxsize=None)
def _function(source, name):
    import cupy

    module = cupy.RawModule(code=source, options=OPTIONS, name_expressions=(name,))
    return module.get_function(name)


def launch(source, name, grid, block, args):
    """Run kernel ``name`` (a template instance, e.g. ``"segment_sum<float>"``) of ``source``.

    ``grid`` and ``block`` are tuples of up to three ints; ``args`` are arrays and
    NumPy scalars (``np.int64``, ``np.float32``, ...) in the kernel's order, as
    for ``cupy.RawKernel``.
    """
    if LAUNCHER is not None:
        return LAUNCHER(source, name, tuple(grid), tuple(block), tuple(args))
    return _function(source, name)(tuple(grid), tuple(block), tuple(args))


SOURCE = r"""
// out[row, d] = sum over j in [starts[row], starts[row + 1]) of y[order[j], d], in j order.
// One thread per output number; consecutive threads read consecutive d (coalesced).
template <typename T>
__global__ void segment_sum(const T* __restrict__ y, const long long* __restrict__ order,
                            const long long* __restrict__ starts, long long n_rows, long long dim,
                            T* __restrict__ out) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_rows * dim) return;
    long long row = i / dim, d = i % dim;
    T total = 0;
    for (long long j = starts[row]; j < starts[row + 1]; ++j) total += y[order[j] * dim + d];
    out[i] = total;
}
"""


def stable_argsort(x, axis=-1):
    """``argsort`` that keeps equal entries in index order, on NumPy and CuPy.

    CuPy's sorts are always stable and take no ``kind`` other than None.
    """
    xp = _array_module(x)
    return xp.argsort(x, axis=axis, kind="stable") if xp is np else xp.argsort(x, axis=axis)


def segments(rows, n):
    """Sort source rows by destination: ``(order, starts)``.

    rows (M,) int64 in [0, n) -> order (M,) int64, the source rows grouped by
    destination and in increasing order within a group (a stable sort), and
    starts (n + 1,) int64, where each destination's group begins in ``order``.
    """
    xp = _array_module(rows)
    order = stable_argsort(rows).astype(xp.int64)  # (M,)
    starts = xp.zeros(n + 1, dtype=xp.int64)
    starts[1:] = xp.cumsum(xp.bincount(rows, minlength=n))  # (n + 1,)
    return order, starts


def segment_sum(y, order, starts):
    """``out[i] = sum of y[order[j]] for j in [starts[i], starts[i + 1])``: y (M, D) -> (n, D)."""
    xp = _array_module(y)
    y = xp.ascontiguousarray(y)
    n, D = starts.shape[0] - 1, y.shape[1]
    out = xp.empty((n, D), dtype=y.dtype)
    if n * D:
        blocks = (n * D + THREADS - 1) // THREADS
        launch(SOURCE, f"segment_sum<{ctype(y.dtype)}>", (blocks,), (THREADS,),
               (y, order, starts, np.int64(n), np.int64(D), out))
    return out


def scatter_add_rows(y, rows, n):
    """``out[rows[m]] += y[m]`` into ``n`` zero rows, deterministically: y (M, D), rows (M,) -> (n, D).

    Repeated destinations add up in the order of ``m``, as ``numpy.add.at`` does.
    """
    xp = _array_module(y)
    order, starts = segments(xp.ascontiguousarray(rows, dtype=xp.int64), n)
    return segment_sum(y, order, starts)
