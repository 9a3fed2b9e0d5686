"""Every public Numba kernel refuses out-of-range indices and window sizes with a clear ValueError.

The compiled loops index without bounds checks, so an index outside its array
would read or write outside it (a segfault, or uninitialised memory returned).
The functions without a leading underscore in rt_numpy/kernels/numba_*.py
check first (rt_numpy/kernels/__init__.py); these tests say so for each, and
that a valid call still gives the reference's result.
"""
import numpy as np
import pytest

from rt_numpy import kmeans
from rt_numpy.kernels import check_positions, check_window, numba_exp, numba_kmeans, numba_routing, numba_scatter


@pytest.mark.parametrize("bad", [-1, 3, 100])
def test_add_rows_at_refuses_a_row_out_of_range(bad):
    out = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=rf"rows must hold values in \[0, 3\).*{bad}"):
        numba_scatter.add_rows_at(out, np.array([0, bad]), np.ones((2, 2), np.float32))
    assert not out.any()  # nothing half-written


def test_add_rows_at_refuses_bad_shapes_and_types():
    out = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match="rows"):
        numba_scatter.add_rows_at(out, np.array([0, 1, 2]), np.ones((2, 2), np.float32))
    with pytest.raises(TypeError, match="dtype of out"):
        numba_scatter.add_rows_at(out, np.array([0, 1]), np.ones((2, 2), np.float64))
    with pytest.raises(TypeError, match="rows must be an integer"):
        numba_scatter.add_rows_at(out, np.array([0.0, 1.0]), np.ones((2, 2), np.float32))
    numba_scatter.add_rows_at(out, np.array([2, 2], dtype=np.int32), np.ones((2, 2), np.float32))
    np.testing.assert_array_equal(out, [[0, 0], [0, 0], [2, 2]])


def _scores(T=8, K=2, seed=0):
    return np.random.default_rng(seed).standard_normal((1, 2, K, T)).astype(np.float32)  # (B, H, K, T)


@pytest.mark.parametrize("W", [0, -1, 9, 64, 2.0, True, "4"])
def test_top_w_positions_refuses_a_window_outside_1_to_T(W):
    with pytest.raises(ValueError, match=r"W must be an int in \[1, T=8\]"):
        numba_kmeans.top_w_positions(_scores(), W)


@pytest.mark.parametrize("W", [1, 5, 8])
def test_top_w_positions_still_exact(W):
    scores = _scores()
    np.testing.assert_array_equal(numba_kmeans.top_w_positions(scores, W), kmeans.top_w_reference(scores, W))


def test_top_w_positions_refuses_scores_that_are_not_4_dim_floats():
    with pytest.raises(TypeError, match="scores"):
        numba_kmeans.top_w_positions(_scores()[0], 2)
    with pytest.raises(TypeError, match="scores"):
        numba_kmeans.top_w_positions(_scores().astype(np.int64), 2)


@pytest.mark.parametrize("W", [0, 9, 1000])
def test_route_from_scores_refuses_a_window_outside_1_to_T(W):
    points = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(ValueError, match=r"W must be an int in \[1, T=8\]"):
        numba_kmeans.route_from_scores(_scores(), points, W)


def test_route_from_scores_refuses_points_that_do_not_fit():
    with pytest.raises(ValueError, match="points"):
        numba_kmeans.route_from_scores(_scores(), np.zeros((1, 2, 7, 4), np.float32), 2)
    with pytest.raises(ValueError, match="points"):
        numba_kmeans.route_from_scores(_scores(), np.zeros((1, 2, 8, 4), np.float64), 2)


def test_assign_and_stats_refuses_means_that_do_not_fit():
    points = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(ValueError, match="means"):
        numba_kmeans.assign_and_stats(points, np.zeros((3, 2, 4), np.float32))
    with pytest.raises(TypeError, match="means"):
        numba_kmeans.assign_and_stats(points, np.zeros((2, 4), np.float32))


@pytest.mark.parametrize("bad", [-1, 8])
@pytest.mark.parametrize("which", ["query_windows", "key_windows"])
def test_routing_kernels_refuse_a_window_position_out_of_range(which, bad):
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 1, 8, 4)).astype(np.float32) for _ in range(3))
    windows = {"query_windows": np.array([[[[0, 2, 5]]]]), "key_windows": np.array([[[[1, 3, 6]]]])}
    windows[which] = windows[which].copy()
    windows[which][0, 0, 0, -1 if bad > 0 else 0] = bad
    for call in (lambda: numba_routing.forward(q, k, v, windows["query_windows"], windows["key_windows"],
                                               0.5, False, 1e-6),
                 lambda: numba_routing.backward(q, q, k, v, windows["query_windows"], windows["key_windows"],
                                                0.5, False, 1e-6)):
        with pytest.raises(ValueError, match=rf"{which} must hold positions in \[0, 8\)"):
            call()


@pytest.mark.parametrize("x", [1e-30, 0.5, np.float32(2.0), np.inf])
def test_exp_nonpositive_refuses_a_positive_argument(x):
    with pytest.raises(ValueError, match="x must be <= 0"):
        numba_exp.exp_nonpositive(x)
    assert numba_exp.exp_nonpositive(np.float32(0.0)) == 1.0


def test_the_shared_checks():
    check_positions("rows", np.array([], dtype=np.int64), 0)  # nothing to check
    check_positions("rows", np.array([0, 4]), 5)
    with pytest.raises(ValueError, match=r"rows must hold values in \[0, 5\), got values in \[0, 5\]"):
        check_positions("rows", np.array([0, 5]), 5)
    check_window(np.int64(3), 3)
    with pytest.raises(ValueError, match="W must be an int"):
        check_window(None, 3)
