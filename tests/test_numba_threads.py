"""rt_numpy.kernels.numba_threads: thread_ranges cover every item once; run calls every task once, for any
thread count, and raises only after every share has finished."""
import contextlib

import numba
import numpy as np
import pytest

from rt_numpy.kernels import numba_threads


@contextlib.contextmanager
def _threads(n):
    """Run the block with ``numba.set_num_threads(n)`` (at most what the machine allows)."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(before)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 32])
@pytest.mark.parametrize("threads", [1, 2])
def test_thread_ranges_cover_every_item_once_in_order(n, threads):
    with _threads(threads) as used:
        ranges = numba_threads.thread_ranges(n)
    assert len(ranges) <= used
    covered = [i for first, stop in ranges for i in range(first, stop)]
    assert covered == list(range(n))
    assert all(stop > first for first, stop in ranges)  # no empty share


@pytest.mark.parametrize("n, min_items, ranges", [(10, 1, 2), (10, 5, 2), (9, 5, 1), (100, 30, 2), (0, 5, 0),
                                                  (1, 5, 1), (3, 1, 2)])
def test_thread_ranges_give_each_range_at_least_min_items(n, min_items, ranges):
    """With 2 threads: two ranges only when each gets min_items; the items are still covered once, in order."""
    with _threads(2) as used:
        got = numba_threads.thread_ranges(n, min_items)
    assert len(got) == (min(ranges, 1) if used == 1 else ranges)
    assert [i for first, stop in got for i in range(first, stop)] == list(range(n))
    assert all(stop - first >= min(min_items, n) for first, stop in got[:-1])


def _mark(out, i):
    out[i] += i + 1


@pytest.mark.parametrize("n_tasks", [0, 1, 2, 3, 7, 32])
@pytest.mark.parametrize("threads", [1, 2])
def test_every_task_runs_once(n_tasks, threads):
    out = np.zeros(n_tasks)
    with _threads(threads):
        numba_threads.run(_mark, [(out, i) for i in range(n_tasks)])
    np.testing.assert_array_equal(out, np.arange(1, n_tasks + 1))


@pytest.mark.parametrize("failing", [0, 4])
def test_an_error_is_raised_after_every_share_finished(failing):
    """The failing task's share stops there; every other share runs to its end before run() raises."""
    out = np.zeros(6)

    def kernel(i):
        if i == failing:
            raise ValueError(f"task {i} fails")
        out[i] = 1.0

    with _threads(2) as used:
        per_share = -(-6 // used)
        with pytest.raises(ValueError, match=f"task {failing} fails"):
            numba_threads.run(kernel, [(i,) for i in range(6)])
    share = failing // per_share
    expected = np.ones(6)
    expected[failing:(share + 1) * per_share] = 0.0  # the failing task and the rest of its share
    np.testing.assert_array_equal(out, expected)
