"""rt_numpy: the Routing Transformer in NumPy, readable first.

Read in this order: :mod:`rt_numpy.ops` (differentiable primitives),
:mod:`rt_numpy.kmeans` (online k-means, the routing module),
:mod:`rt_numpy.attention`, :mod:`rt_numpy.model`, :mod:`rt_numpy.train`.
README.md maps each module to the paper and docs/algorithm.md.

Importing rt_numpy changes two process-wide thread settings, each only when you
have not set it yourself: :func:`rt_numpy.runtime.set_thread_defaults` says which
and why (docs/design.md#process-wide-settings).
"""
from rt_numpy import runtime

runtime.set_thread_defaults()  # before NumPy is imported: OpenBLAS reads its setting when it loads

from rt_numpy import backend, kmeans, ops  # noqa: E402  (after the setting above)

__version__ = "0.1.0"
__all__ = ["backend", "kmeans", "ops", "__version__"]
