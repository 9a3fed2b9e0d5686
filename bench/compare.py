"""Benchmark: the paper's comparison in miniature, routing against local, strided, LSH and dense attention.

    python bench/compare.py [--quick] [--json PATH] [--tasks text,recall,images] [--arms ...] [--seeds N] ...

The same as ``python -m rt_numpy compare``: :mod:`rt_numpy.compare` says what it
trains and measures, and docs/results.md shows a full run.  Records are
``{"impl", "case", "metric", "value", "unit"}`` with ``impl`` "rt_numpy-numba"
and ``case`` holding ``task``, ``arm``, ``T``, ``H``, ``D``, ``K``, ``W``, ``L``,
``N`` (steps) and ``seed``.
"""
import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)
from rt_numpy import compare

if __name__ == "__main__":
    raise SystemExit(compare.main())
