"""A stand-in for CuPy on a machine without a GPU: NumPy arrays of a class named ``cupy.ndarray``.

Only for tests/gpu/test_gpu_emulated.py, which puts this folder first on ``PYTHONPATH`` and
runs tests/gpu/test_gpu.py against it.  What it gives:

* ``cupy.ndarray``, a NumPy subclass whose module is ``cupy``, so rt_numpy takes it
  for a GPU array (``backend.get_array_module``, the kernels' dispatch, autograd's
  registration in ``backend.use_cupy``);
* every ``cupy.<function>`` as the NumPy function with its array results turned into
  ``cupy.ndarray`` (reductions give 0-d arrays, and sorts are stable, as in CuPy);
* ``cupy.RawModule``: the CUDA source compiled by g++ and run by tests/gpu/cuda_emulator.py;
* CuPy's strictness where NumPy would quietly mix devices: a ufunc, a ``cupy.<function>``
  or a ``numpy.<function>`` given a GPU array and a (non-scalar) host array raises
  ``TypeError``; ``numpy.<function>`` of GPU arrays alone runs and returns GPU arrays, as
  CuPy's ``__array_function__`` does.

It cannot catch everything a real GPU would (``numpy.asarray`` of a GPU array silently
works here, and nothing runs in parallel), so it complements tests/gpu/test_gpu.py on a GPU.
"""
import sys
from pathlib import Path

import numpy as _np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for cuda_emulator
import cuda_emulator  # noqa: E402

__version__ = "0.0-emulated"


class ndarray(_np.ndarray):
    """A host array that rt_numpy treats as a GPU array."""

    def get(self):
        """Copy to a NumPy array (CuPy's device-to-host copy)."""
        return _np.array(self.view(_np.ndarray))

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        for x in inputs:
            if type(x) is _np.ndarray and x.ndim > 0:
                raise TypeError(f"cupy stand-in: {ufunc.__name__}.{method} mixes a GPU array with a NumPy array "
                                f"of shape {x.shape}")
        args = [_host(x) for x in inputs]
        if out is not None:
            kwargs["out"] = tuple(_host(o) for o in out)
        result = getattr(ufunc, method)(*args, **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types, args, kwargs):
        # CuPy runs numpy.<function> of its arrays as cupy.<function>: the same here.
        _no_host_arrays(func.__name__, args)
        return _device(func(*_unwrap(args), **{k: _unwrap(v) for k, v in kwargs.items()}))


def _no_host_arrays(name, args):
    """CuPy refuses NumPy arrays (other than scalars) where it expects GPU arrays."""
    for x in args:
        if isinstance(x, (tuple, list)):
            _no_host_arrays(name, x)
        elif type(x) is _np.ndarray and x.ndim > 0:
            raise TypeError(f"cupy stand-in: {name} was given a NumPy array of shape {x.shape} among GPU arrays")


def _host(x):
    return x.view(_np.ndarray) if isinstance(x, ndarray) else x


def _device(x):
    """Array results as ``cupy.ndarray`` (0-d for scalars of reductions), in tuples and lists too."""
    if isinstance(x, _np.ndarray):
        return x.view(ndarray)
    if isinstance(x, _np.generic) and not isinstance(x, (_np.str_, _np.bytes_)):
        return _np.asarray(x).view(ndarray)
    if isinstance(x, (tuple, list)):
        return type(x)(_device(v) for v in x)
    return x


def _unwrap(x):
    if isinstance(x, ndarray):
        return x.view(_np.ndarray)
    if isinstance(x, (tuple, list)):
        return type(x)(_unwrap(v) for v in x)
    return x


def _as_cupy_function(name, func):
    def wrapped(*args, **kwargs):
        if name in ("argsort", "sort"):
            kwargs["kind"] = "stable"  # CuPy's sorts are stable and take no kind=
        _no_host_arrays(f"cupy.{name}", args)
        args = [_unwrap(a) for a in args]
        kwargs = {k: _unwrap(v) for k, v in kwargs.items()}
        return _device(func(*args, **kwargs))
    wrapped.__name__ = name
    return wrapped


def __getattr__(name):
    value = getattr(_np, name)
    if isinstance(value, _np.ufunc):
        return value  # a ufunc dispatches to ndarray.__array_ufunc__ above
    if callable(value) and not isinstance(value, type):
        return _as_cupy_function(name, value)
    return value  # dtypes (float32, int64), constants (inf)


def asarray(x, dtype=None):
    if isinstance(x, ndarray):
        return x if dtype is None or x.dtype == dtype else x.astype(dtype)
    return _np.array(_unwrap(x), dtype=dtype).view(ndarray)


def argsort(a, axis=-1, kind=None):
    if kind not in (None, "stable"):
        raise ValueError("cupy stand-in: argsort takes kind=None or 'stable' only")
    return _device(_np.argsort(_unwrap(a), axis=axis, kind="stable"))


class RawModule:
    """CUDA source compiled with g++ and run on CPU threads (tests/gpu/cuda_emulator.py)."""

    def __init__(self, code, options=(), name_expressions=()):
        self.code = code

    def get_function(self, name):
        def launch(grid, block, args):
            args = tuple(a.view(_np.ndarray) if isinstance(a, ndarray) else a for a in args)
            cuda_emulator.emulated_launch(self.code, name, grid, block, args)
        return launch


class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(device):
        return {"name": b"CPU emulation of a GPU (tests/gpu/fake_cupy)"}


class _Device:
    def __init__(self, device=0):
        pass

    def synchronize(self):
        pass


class _Cuda:
    runtime = _Runtime()
    Device = _Device


cuda = _Cuda()
