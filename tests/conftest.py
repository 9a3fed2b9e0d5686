"""Fixtures shared by the test files (docs/design.md#tests).

``rng``: a NumPy generator seeded from the test's name, so each test draws its own fixed numbers and a
failure replays exactly.

``impl``: every CPU implementation of the primitives, ``"ref"`` and ``"numba"``.  A test that takes it
is written once and runs once per implementation; a "fast equals reference" test compares
``impl=impl`` with ``impl="ref"``.  The CuPy implementation needs CuPy arrays: its tests are in
``tests/gpu/``.

``torch_float64``: torch's default dtype set to float64 for one test and restored afterwards; the files
that compare with the PyTorch port use it for every test (``pytestmark``).
"""
import zlib

import numpy as np
import pytest

CPU_IMPLS = ("ref", "numba")


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(params=CPU_IMPLS)
def impl(request):
    return request.param


@pytest.fixture
def torch_float64():
    """Every torch module a test builds is float64 unless it casts it; the default dtype is restored."""
    torch = pytest.importorskip("torch")
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)
