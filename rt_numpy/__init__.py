"""rt_numpy: the Routing Transformer in NumPy, readable first.

Modules: :mod:`rt_numpy.backend` (array module and implementation choice),
:mod:`rt_numpy.kmeans` (online k-means, the routing module), :mod:`rt_numpy.ops`
(differentiable primitives).  See README.md for the map to the paper.
"""
import os

# OpenBLAS's idle threads spin for a while (2^28 cycles by default) after each matrix product and
# hold a core that a Numba kernel started just after needs: on 2 cores a parallel kernel right after a
# product took twice as long (rt_numpy/kernels/__init__.py has the mirror-image fix for Numba's own
# threads).  2^20 cycles (well under a millisecond) let them sleep before the next kernel, yet keep
# them awake between back-to-back products: measured here, the T=8192 training step of
# bench/train_step.py went from about 2.18 to 2.00 s, and T=1024 did not change.  It only takes
# effect when NumPy is not loaded yet (the rt_numpy command line, the bench scripts); a value already
# in the environment is kept.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")

from rt_numpy import backend, kmeans, ops  # noqa: E402  (after the setting above, which must precede NumPy)

__version__ = "0.1.0"
__all__ = ["backend", "kmeans", "ops", "__version__"]
