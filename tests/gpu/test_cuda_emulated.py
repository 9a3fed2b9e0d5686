"""The CUDA kernels of rt_numpy.kernels.cupy_* run on the CPU, without CuPy or a GPU.

tests/gpu/cuda_emulator.py compiles a kernel's CUDA source as C++ (g++) with one OS
thread per CUDA thread.  The kernels' own Python glue (sorting, segment starts,
denominators) runs here on NumPy arrays, so the GPU path - glue and CUDA source -
is checked against the NumPy references.  Timing means nothing here;
tests/gpu/test_gpu.py runs the same comparisons with CuPy on a GPU, and
tests/gpu/test_gpu_emulated.py runs tests/gpu/test_gpu.py itself on a stand-in CuPy built
on this emulator.
"""
import numpy as np
import pytest
from cuda_emulator import GXX, emulated_launch

from rt_numpy import attention, kmeans
from rt_numpy.kernels import cupy_kmeans, cupy_ops, cupy_routing

pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is needed to emulate the CUDA kernels")


@pytest.fixture(autouse=True)
def _emulated(monkeypatch):
    monkeypatch.setattr(cupy_ops, "LAUNCHER", emulated_launch)


# --------------------------------------------------------------------------- scatter-add
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_rows_equals_add_at_bitwise(dtype):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((300, 5)).astype(dtype)
    rows = rng.integers(0, 37, size=300)  # repeats, and rows that nobody names
    expected = np.zeros((40, 5), dtype)
    np.add.at(expected, rows, y)  # the same order of addition: bitwise equal
    np.testing.assert_array_equal(cupy_ops.scatter_add_rows(y, rows, 40), expected)


# --------------------------------------------------------------------------- top-W
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("T,W", [(7, 1), (7, 7), (300, 17), (600, 256), (513, 300)])
def test_top_w_equals_reference(dtype, T, W):
    rng = np.random.default_rng(T + W)
    scores = rng.standard_normal((2, 2, 3, T)).astype(dtype)
    scores[0, 0, 0] = np.round(scores[0, 0, 0])  # many ties: the lower position must win
    scores[0, 1, 1] = 0.0
    scores[0, 1, 1, ::3] = -0.0  # -0.0 equals +0.0
    scores[1, 0, 2] = -np.abs(scores[1, 0, 2])  # all negative
    np.testing.assert_array_equal(cupy_kmeans.top_w_positions(scores, W), kmeans.top_w_reference(scores, W))


# --------------------------------------------------------------------------- fused routing attention
def _routing_case(B, H, T, D, K, W, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((H, K, D))).astype(dtype)
    qw = kmeans.balanced_membership(kmeans.normalize(q), means, W, impl="ref")
    kw = kmeans.balanced_membership(kmeans.normalize(k), means, W, impl="ref")
    return q, k, v, g, qw, kw


CASES = [  # (B, H, T, D, K, W): several row groups (W > 128 query threads) and key chunks
    (1, 2, 24, 8, 3, 8),
    (2, 1, 40, 4, 2, 40),
    (1, 1, 300, 4, 2, 150),
]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("last_resort", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_routing_forward_and_backward_equal_reference(case, last_resort, dtype):
    import autograd

    from rt_numpy import ops

    q, k, v, g, qw, kw = _routing_case(*case, dtype=dtype)
    scale, eps = 0.7, 1e-2
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-4, atol=2e-5)
    self_attend = "last_resort" if last_resort else "allow"

    def reference(q, k, v):
        return attention.cluster_attention_reference(q, k, v, qw, kw, scale=scale, self_attend=self_attend,
                                                     combine_eps=eps)

    out = cupy_routing.forward(q, k, v, qw, kw, scale, last_resort, eps)
    np.testing.assert_allclose(out, reference(q, k, v), **tol)
    grads = autograd.grad(lambda qkv: ops.sum(ops.multiply(reference(*qkv), g)))((q, k, v))
    for mine, theirs in zip(cupy_routing.backward(g, q, k, v, qw, kw, scale, last_resort, eps), grads):
        np.testing.assert_allclose(mine, theirs, **tol)


def test_routing_row_with_no_visible_key_outputs_zero():
    """Separate QK: a query whose cluster's keys all come later sees nothing: output 0, gradient 0."""
    q, k, v, g, _, _ = _routing_case(1, 1, 6, 4, 1, 2, np.float64)
    qw = np.array([[[[0, 1]]]])
    kw = np.array([[[[3, 4]]]])
    out = cupy_routing.forward(q, k, v, qw, kw, 1.0, False, 1e-2)
    assert np.all(out == 0)
    dq, dk, dv = cupy_routing.backward(g, q, k, v, qw, kw, 1.0, False, 1e-2)
    assert np.all(dq == 0) and np.all(dk == 0) and np.all(dv == 0)


def test_routing_shared_qk_equals_reference():
    """Shared QK: keys are the queries and both windows are one array (sorted once in the backward)."""
    import autograd

    from rt_numpy import ops

    q, _, v, g, qw, _ = _routing_case(1, 2, 48, 8, 3, 16, np.float64, seed=3)

    def reference(q, v):
        return attention.cluster_attention_reference(q, q, v, qw, qw, scale=1.0, self_attend="last_resort",
                                                     combine_eps=1e-5)

    np.testing.assert_allclose(cupy_routing.forward(q, q, v, qw, qw, 1.0, True, 1e-5), reference(q, v), rtol=1e-10,
                               atol=1e-12)
    dq, dk, dv = cupy_routing.backward(g, q, q, v, qw, qw, 1.0, True, 1e-5)
    expected = autograd.grad(lambda qv: ops.sum(ops.multiply(reference(*qv), g)))((q, v))
    np.testing.assert_allclose(dq + dk, expected[0], rtol=1e-10, atol=1e-12)  # q is both queries and keys
    np.testing.assert_allclose(dv, expected[1], rtol=1e-10, atol=1e-12)
