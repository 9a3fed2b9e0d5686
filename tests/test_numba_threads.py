"""rt_numpy.kernels.numba_threads.run: every task once, any thread count, errors after every share."""
import numba
import numpy as np
import pytest

from rt_numpy.kernels import numba_threads


def _mark(out, i):
    out[i] += i + 1


@pytest.mark.parametrize("n_tasks", [0, 1, 2, 3, 7, 32])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_task_runs_once(n_tasks, threads):
    if threads > numba.config.NUMBA_NUM_THREADS:
        threads = numba.config.NUMBA_NUM_THREADS
    out = np.zeros(n_tasks)
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(threads)
        numba_threads.run(_mark, [(out, i) for i in range(n_tasks)])
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(out, np.arange(1, n_tasks + 1))


@pytest.mark.parametrize("failing", [0, 4])
def test_an_error_is_raised_after_every_share_finished(failing):
    """The failing task's share stops there; every other share runs to its end before run() raises."""
    out = np.zeros(6)

    def kernel(i):
        if i == failing:
            raise ValueError(f"task {i} fails")
        out[i] = 1.0

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        per_share = -(-6 // numba.get_num_threads())
        with pytest.raises(ValueError, match=f"task {failing} fails"):
            numba_threads.run(kernel, [(i,) for i in range(6)])
    finally:
        numba.set_num_threads(before)
    share = failing // per_share
    expected = np.ones(6)
    expected[failing:(share + 1) * per_share] = 0.0  # the failing task and the rest of its share
    np.testing.assert_array_equal(out, expected)
