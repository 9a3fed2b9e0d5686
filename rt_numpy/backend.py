"""Which array library and which implementation a call runs on.

Two independent choices are made here:

* the **array module** (``numpy`` or ``cupy``) follows the inputs: a function
  given CuPy arrays computes with CuPy, anything else with NumPy;
* the **implementation** of a hot operation is one of ``"ref"`` (the readable
  array code that students read), ``"numba"`` (fused CPU kernels in
  :mod:`rt_numpy.kernels`) or ``"cupy"`` (GPU kernels).  ``"auto"`` picks the
  fastest one available for the array module of the inputs.

:func:`resolve_impl` is the one place where an ``impl`` argument becomes what
runs.  A public function enters :func:`use_impl` around its body, and every
primitive inside asks :func:`active_impl` or :func:`kernel_impl`, forward and
backward (docs/design.md#choosing-an-implementation).

The reference path can be forced everywhere, for debugging or for checking a
result, with the :func:`reference_only` context manager or by setting the
environment variable ``RT_NUMPY_FORCE_REF=1`` before the call.  Forcing wins
over an explicit ``impl=`` argument: that is what "everywhere" means.

Neither numba nor cupy is needed to import rt_numpy or to run the reference
path.  Asking explicitly for a backend that is not installed raises an
:class:`ImportError` that says what to install.

GPU (CuPy)
----------
:func:`use_cupy` registers ``cupy.ndarray`` with HIPS autograd (as an
``ArrayBox`` type with a CuPy-backed vector space), after which
``autograd.grad`` differentiates rt_numpy's primitives on GPU arrays; it is
called by :func:`to_device` and :func:`require_gpu`.  :func:`to_device` moves a
whole tree of arrays (params, optimiser and k-means state) to ``"gpu"`` or back
to ``"cpu"``; checkpoints are always written from host arrays.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import threading

import numpy as np

from rt_numpy import runtime

IMPLS = ("auto", "ref", "numba", "cupy")
DEVICES = ("cpu", "gpu")
FORCE_REF_ENV = "RT_NUMPY_FORCE_REF"

_local = threading.local()  # per thread: depth of reference_only() blocks, the use_impl() in effect
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
    return getattr(_local, "forced", 0) > 0 or env not in ("", "0", "false", "no")


def resolve_impl(impl: str = "auto", xp=np) -> str:
    """Turn an ``impl`` argument into the implementation that will run: the one place this is decided.

    Parameters
    ----------
    impl : {"auto", "ref", "numba", "cupy"}
        What the caller asked for.  ``"auto"`` inside a :func:`use_impl` block
        is what that block resolved; outside one, the fastest implementation
        installed for ``xp``.
    xp : module
        The array module of the inputs (from :func:`get_array_module`).

    Returns
    -------
    str
        ``"ref"``, ``"numba"`` or ``"cupy"``.  Always ``"ref"`` when the
        reference path is forced (:func:`reference_only`, ``RT_NUMPY_FORCE_REF``).

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
        active = getattr(_local, "impl", None)
        if active == "ref" or (active is not None and (active == "cupy") == on_gpu):
            return active
        if on_gpu:
            return "cupy"
        return "numba" if numba_available() else "ref"
    return impl


@contextlib.contextmanager
def use_impl(impl: str = "auto", xp=np):
    """Run the block on ``resolve_impl(impl, xp)``: every primitive inside, forward and backward, honours it.

    Public functions (routing attention, the model, k-means, the optimiser)
    enter this block around their body, so an ``impl="ref"`` given at the top
    reaches every operation below, and the VJPs of :mod:`rt_numpy.ops` run
    under the implementation that was active during their forward pass
    (docs/design.md#choosing-an-implementation).  Yields the resolved name.
    """
    resolved = resolve_impl(impl, xp)
    outer = getattr(_local, "impl", None)
    _local.impl = resolved
    runtime.start_of_compile_block()  # the first-run compile notice ends with the outermost block
    try:
        yield resolved
    finally:
        _local.impl = outer
        runtime.end_of_compile_block()


@contextlib.contextmanager
def reference_only():
    """Run every rt_numpy operation inside the block on its reference path, whatever ``impl`` says.

    Examples
    --------
    >>> from rt_numpy import backend
    >>> with backend.reference_only():
    ...     backend.resolve_impl("auto")
    'ref'
    """
    _local.forced = getattr(_local, "forced", 0) + 1
    try:
        yield
    finally:
        _local.forced -= 1


def active_impl(xp=np) -> str:
    """The implementation a primitive on arrays of module ``xp`` runs now (``resolve_impl("auto", xp)``)."""
    return resolve_impl("auto", xp)


def kernel_impl(*arrays) -> str:
    """Which implementation of an elementwise or row-wise primitive runs on ``arrays``.

    ``"numba"`` when the active implementation is Numba and every array is a
    NumPy float32/float64 array of one dtype and one shape, compiled code
    running (under ``NUMBA_DISABLE_JIT=1`` a kernel's loop would run element by
    element in Python, so the array code runs instead); ``"cupy"`` on CuPy
    arrays unless the reference is forced; ``"ref"`` otherwise.
    """
    xp = get_array_module(*arrays)
    run = active_impl(xp)
    if run != "numba":
        return run
    first = arrays[0]
    if any(type(x) is not np.ndarray for x in arrays) or first.dtype not in (np.float32, np.float64):
        return "ref"
    if any(x.dtype != first.dtype or x.shape != first.shape for x in arrays):
        return "ref"
    from numba.core.config import DISABLE_JIT

    return "ref" if DISABLE_JIT else "numba"


# --------------------------------------------------------------------------- GPU (CuPy)
def require_gpu():
    """The ``cupy`` module, ready for autograd; a clear error when no GPU can be used.

    Raises
    ------
    RuntimeError
        CuPy is not installed, or it sees no CUDA device.
    """
    if not _module_available("cupy"):
        raise RuntimeError("device 'gpu' needs CuPy and an NVIDIA GPU: pip install 'rt_numpy[gpu]' "
                           "(cupy is not installed here)")
    if not cupy_available():
        raise RuntimeError("device 'gpu' needs an NVIDIA GPU, but CuPy sees no CUDA device here")
    use_cupy()
    import cupy

    return cupy


_cupy_registered = False


def use_cupy():
    """Register ``cupy.ndarray`` with autograd (once): boxes while tracing, a vector space for gradients.

    autograd's tracing core is array-library agnostic; it only needs to know
    which Box class wraps a value and how to make zeros, ones and sums in its
    vector space.  Both are given here for CuPy.  autograd.numpy's own VJPs
    would still build NumPy arrays, which is why rt_numpy differentiates only
    through :mod:`rt_numpy.ops` (docs/design.md#differentiation).
    """
    global _cupy_registered
    if _cupy_registered:
        return
    import cupy
    from autograd.extend import VSpace
    from autograd.numpy.numpy_boxes import ArrayBox

    class CupyVSpace(VSpace):
        """The vector space of CuPy arrays of one shape and dtype."""

        def __init__(self, value):
            self.shape, self.dtype = value.shape, value.dtype

        @property
        def size(self):
            return int(np.prod(self.shape))

        @property
        def ndim(self):
            return len(self.shape)

        def zeros(self):
            return cupy.zeros(self.shape, dtype=self.dtype)

        def ones(self):
            return cupy.ones(self.shape, dtype=self.dtype)

        def standard_basis(self):
            for index in np.ndindex(*self.shape):
                vector = cupy.zeros(self.shape, dtype=self.dtype)
                vector[index] = 1
                yield vector

        def randn(self):
            return cupy.asarray(np.random.randn(*self.shape)).astype(self.dtype)

        def _inner_prod(self, x, y):
            return cupy.dot(cupy.ravel(x), cupy.ravel(y))

    ArrayBox.register(cupy.ndarray)
    VSpace.register(cupy.ndarray, CupyVSpace)
    _cupy_registered = True


def _map_arrays(tree, fn):
    """``tree`` with ``fn`` applied to every array inside dicts, lists and tuples."""
    if isinstance(tree, dict):
        return {key: _map_arrays(value, fn) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map_arrays(value, fn) for value in tree)
    if hasattr(tree, "shape") and hasattr(tree, "dtype"):
        return fn(tree)
    return tree  # ints (an optimiser step), strings, None


def to_numpy(tree):
    """Every array in ``tree`` (dicts, lists, tuples) as a NumPy array on the host."""
    return _map_arrays(tree, lambda x: x.get() if _is_cupy_array(x) else np.asarray(x))


def to_device(tree, device):
    """Every array in ``tree`` on ``device``: ``"cpu"`` (NumPy) or ``"gpu"`` (CuPy).

    Parameters
    ----------
    tree : array, or dict / list / tuple of them (nested)
        E.g. the params, an optimiser state ``{"step", "m", "v"}`` or the k-means states.
    device : {"cpu", "gpu"}

    Returns
    -------
    The same structure with arrays copied where needed (already there: unchanged).

    Raises
    ------
    ValueError
        ``device`` is not one of :data:`DEVICES`.
    RuntimeError
        ``device="gpu"`` on a machine without CuPy or without a GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if device == "cpu":
        return to_numpy(tree)
    cupy = require_gpu()
    return _map_arrays(tree, cupy.asarray)


def device_of(x):
    """``"gpu"`` for a CuPy array (also inside an autograd box), ``"cpu"`` otherwise."""
    return "gpu" if _is_cupy_array(_unbox(x)) else "cpu"
