"""Which array library and which implementation a call runs on.

Two independent choices are made here:

* the **array module** (``numpy`` or ``cupy``) follows the inputs: a function
  given CuPy arrays computes with CuPy, anything else with NumPy;
* the **implementation** of a hot operation is one of ``"ref"`` (the readable
  array code that students read), ``"numba"`` (fused CPU kernels in
  :mod:`rt_numpy.kernels`) or ``"cupy"`` (GPU kernels).  ``"auto"`` picks the
  fastest one available for the array module of the inputs.

The reference path can be forced everywhere, for debugging or for checking a
result, with the :func:`reference_only` context manager or by setting the
environment variable ``RT_NUMPY_FORCE_REF=1`` before the call.  Forcing wins
over an explicit ``impl=`` argument: that is what "everywhere" means.

Neither numba nor cupy is needed to import rt_numpy or to run the reference
path.  Asking explicitly for a backend that is not installed raises an
:class:`ImportError` that says what to install.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import numpy as np

IMPLS = ("auto", "ref", "numba", "cupy")
FORCE_REF_ENV = "RT_NUMPY_FORCE_REF"

_local = threading.local()  # per-thread depth of reference_only() blocks
_available: dict[str, bool] = {}


def _module_available(name: str) -> bool:
    """True when ``import name`` works (cached; a failed import is not retried)."""
    if name not in _available:
        try:
            importlib.import_module(name)
            _available[name] = True
        except Exception:  # ImportError, or a broken install (e.g. CUDA missing)
            _available[name] = False
    return _available[name]


def numba_available() -> bool:
    """True when numba can be imported."""
    return _module_available("numba")


def cupy_available() -> bool:
    """True when cupy can be imported and sees at least one GPU."""
    if not _module_available("cupy"):
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def _is_cupy_array(x) -> bool:
    # Look the class up by module name so that numpy-only installs never import cupy.
    return type(x).__module__.split(".")[0] == "cupy"


def _unbox(x):
    """The raw array inside an autograd ArrayBox (or ``x`` itself)."""
    while hasattr(x, "_value") and type(x).__name__.endswith("Box"):
        x = x._value
    return x


def get_array_module(*arrays):
    """The array module (``numpy`` or ``cupy``) that ``arrays`` live in.

    CuPy when any argument is a CuPy array (also inside an autograd box),
    NumPy otherwise; ``None`` arguments and Python scalars are ignored.
    """
    for x in arrays:
        if _is_cupy_array(_unbox(x)):
            import cupy

            return cupy
    return np


def force_reference_active() -> bool:
    """True inside :func:`reference_only` or when ``RT_NUMPY_FORCE_REF`` is set."""
    env = os.environ.get(FORCE_REF_ENV, "").strip().lower()
    return getattr(_local, "depth", 0) > 0 or env not in ("", "0", "false", "no")


@contextlib.contextmanager
def reference_only():
    """Run every rt_numpy operation inside the block on its reference path.

    Examples
    --------
    >>> from rt_numpy import backend
    >>> with backend.reference_only():
    ...     backend.resolve_impl("auto")
    'ref'
    """
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def resolve_impl(impl: str = "auto", xp=np) -> str:
    """Turn an ``impl`` argument into the implementation that will run.

    Parameters
    ----------
    impl : {"auto", "ref", "numba", "cupy"}
        What the caller asked for.
    xp : module
        The array module of the inputs (from :func:`get_array_module`).

    Returns
    -------
    str
        ``"ref"``, ``"numba"`` or ``"cupy"``.

    Raises
    ------
    ValueError
        ``impl`` is not one of :data:`IMPLS`, or does not fit the array module
        (``"numba"`` with CuPy arrays, ``"cupy"`` with NumPy arrays).
    ImportError
        ``impl`` names a backend that is not installed.
    """
    if not isinstance(impl, str) or impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "numba" and not numba_available():
        raise ImportError("impl='numba' needs numba: pip install numba")
    if impl == "cupy" and not _module_available("cupy"):
        raise ImportError("impl='cupy' needs cupy: pip install 'rt_numpy[gpu]'")
    on_gpu = xp is not np
    if impl == "numba" and on_gpu:
        raise ValueError("impl='numba' runs on NumPy arrays only, got CuPy arrays")
    if impl == "cupy" and not on_gpu:
        raise ValueError("impl='cupy' needs CuPy arrays, got NumPy arrays")
    if force_reference_active():
        return "ref"
    if impl == "auto":
        if on_gpu:
            return "cupy"
        return "numba" if numba_available() else "ref"
    return impl
