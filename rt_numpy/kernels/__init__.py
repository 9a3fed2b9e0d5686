"""The fast paths: Numba kernels (``numba_*.py``, CPU) and CUDA kernels through CuPy (``cupy_*.py``, GPU).

A leaf package: nothing here imports the model.  Each kernel computes what a
readable reference in :mod:`rt_numpy.ops`, :mod:`rt_numpy.kmeans` or
:mod:`rt_numpy.attention` computes, and a test says so
(docs/design.md#the-reference-path-and-the-fast-paths).  Importing this package
changes nothing process-wide; :mod:`rt_numpy.runtime` holds those settings.

A function whose name has no leading underscore checks its arguments
(:func:`check_positions`, :func:`check_window`); a kernel with a leading
underscore trusts its caller, as its docstring says.
"""
import numpy as np

SELF_LOGIT = -5e4  # the "last resort" self logit of the PyTorch port and Reformer, shared by every path


def check_positions(name, positions, size):
    """Refuse an index array with a value outside ``[0, size)``: one pass over it (its min and max).

    The compiled kernels index without bounds checks (Numba's default), so an
    index out of range would read or write outside an array; the kernels that
    can be imported check their indices with this first.

    Raises
    ------
    ValueError
        ``positions`` holds a value below 0 or at least ``size``.
    """
    if positions.size and (positions.min() < 0 or positions.max() >= size):
        raise ValueError(f"{name} must hold values in [0, {size}), got values in "
                         f"[{positions.min()}, {positions.max()}]")


def check_window(W, T):
    """Refuse a window size ``W`` that is not an int in ``[1, T]`` (O(1))."""
    if isinstance(W, bool) or not isinstance(W, (int, np.integer)) or not 1 <= W <= T:
        raise ValueError(f"W must be an int in [1, T={T}], got {W!r}")
