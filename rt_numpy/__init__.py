"""rt_numpy: the Routing Transformer in NumPy, readable first.

Modules: :mod:`rt_numpy.backend` (array module and implementation choice),
:mod:`rt_numpy.kmeans` (online k-means, the routing module), :mod:`rt_numpy.ops`
(differentiable primitives).  See README.md for the map to the paper.
"""
from rt_numpy import backend, kmeans, ops

__version__ = "0.1.0"
__all__ = ["backend", "kmeans", "ops", "__version__"]
