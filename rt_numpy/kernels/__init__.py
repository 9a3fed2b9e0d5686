"""The fast paths: Numba kernels (``numba_*.py``, CPU) and CUDA kernels through CuPy (``cupy_*.py``, GPU).

A leaf package: nothing here imports the model.  Each kernel computes what a
readable reference in :mod:`rt_numpy.ops`, :mod:`rt_numpy.kmeans` or
:mod:`rt_numpy.attention` computes, and a test says so
(docs/design.md#the-reference-path-and-the-fast-paths).  Importing this package
changes nothing process-wide; :mod:`rt_numpy.runtime` holds those settings.
"""

SELF_LOGIT = -5e4  # the "last resort" self logit of the PyTorch port and Reformer, shared by every path
