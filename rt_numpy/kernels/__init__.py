"""Numba kernels (CPU fast paths).  A leaf package: nothing here imports the model.

Numba's default OpenMP threads keep spinning after a parallel kernel returns and
then fight NumPy's BLAS threads for the cores: on 2 cores a BLAS call right after
a kernel was measured 100x slower.  The workqueue threading layer's threads
sleep instead, so it is chosen here unless ``NUMBA_THREADING_LAYER`` is set.
"""
import os

if "NUMBA_THREADING_LAYER" not in os.environ:
    try:
        import numba

        numba.config.THREADING_LAYER = "workqueue"
    except ImportError:  # the reference path works without numba
        pass
