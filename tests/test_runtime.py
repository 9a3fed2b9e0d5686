"""Process-wide settings (rt_numpy.runtime): freed memory kept for reuse, OpenBLAS's short spin, Numba's threads."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from rt_numpy import runtime


@pytest.mark.parametrize("limit", [0, 1023, (1 << 20) - 1, 2**31, -5, 1.5e9, True, "1GiB", None])
def test_bad_limits_are_refused(limit):
    with pytest.raises(ValueError, match="limit"):
        runtime.reuse_freed_memory(limit)


def test_accepted_exactly_on_glibc():
    on_glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.reuse_freed_memory() is on_glibc
    assert runtime.reuse_freed_memory(1 << 20) is on_glibc  # the smallest limit; calling again is fine
    runtime.reuse_freed_memory()  # leave the default for the rest of the session


def test_large_arrays_still_work_after_it():
    runtime.reuse_freed_memory()
    for _ in range(3):  # allocate, free and allocate again blocks above glibc's default mmap limit
        x = np.ones((48, 1 << 20), np.uint8)  # 48 MiB
        assert int(x.sum()) == 48 << 20
        del x


def _timeout_seen_by_a_fresh_interpreter(env):
    code = "import os, rt_numpy, numpy; print(os.environ.get('OPENBLAS_THREAD_TIMEOUT'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_rt_numpy_first_shortens_the_openblas_spin():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    assert _timeout_seen_by_a_fresh_interpreter(env) == "20"


def test_a_spin_already_in_the_environment_is_kept():
    env = dict(os.environ, OPENBLAS_THREAD_TIMEOUT="7")
    assert _timeout_seen_by_a_fresh_interpreter(env) == "7"


def _seen_by_a_fresh_interpreter(env, code):
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_rt_numpy_picks_numba_workqueue_unless_set():
    code = "import rt_numpy, numba; print(numba.config.THREADING_LAYER)"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    assert _seen_by_a_fresh_interpreter(env, code) == "workqueue"
    assert _seen_by_a_fresh_interpreter(dict(env, NUMBA_THREADING_LAYER="omp"), code) == "omp"


def test_numba_imported_first_still_gets_workqueue():
    code = "import numba, rt_numpy; print(numba.config.THREADING_LAYER)"
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    assert _seen_by_a_fresh_interpreter(env, code) == "workqueue"


def test_configure_process_reports_every_setting():
    settings = runtime.configure_process()
    assert set(settings) == {"OPENBLAS_THREAD_TIMEOUT", "NUMBA_THREADING_LAYER", "reuse_freed_memory"}
    assert settings["reuse_freed_memory"] is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


# ----------------------------------------------------------------- the first-run compile notice
NOTICE_SCRIPT = ("import numpy as np\n"
                 "from rt_numpy.kernels import numba_scatter\n"
                 "out = np.zeros((2, 3), np.float32)\n"
                 "numba_scatter.add_rows_at(out, np.array([1, 1]), np.ones((2, 3), np.float32))\n"
                 "assert out[1, 0] == 2 and out[0, 0] == 0\n")


def _run_notice(cache_dir, **extra_env):
    env = {key: value for key, value in os.environ.items()
           if key not in ("NUMBA_DISABLE_JIT", runtime.QUIET_COMPILE_ENV)}  # really compile, and say so
    env.update(NUMBA_CACHE_DIR=str(cache_dir), **extra_env)
    done = subprocess.run([sys.executable, "-c", NOTICE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stderr


def test_compile_notice_on_the_first_run_only(tmp_path):
    first = _run_notice(tmp_path)
    assert f"rt_numpy: compiling Numba kernels for float32 (first run only; cached in {tmp_path}) ..." in first
    assert "Numba kernels compiled in" in first
    assert first.count("compiling Numba kernels") == 1
    second = _run_notice(tmp_path)  # the same cache: everything loads, nothing compiles
    assert "rt_numpy:" not in second


def test_waiting_for_another_process_counts_in_a_pending_notice(monkeypatch):
    monkeypatch.setitem(runtime._notice, "pending", False)
    monkeypatch.setitem(runtime._notice, "seconds", 1.0)
    runtime.add_compile_seconds(2.0)  # no notice was printed: nothing to add to
    assert runtime._notice["seconds"] == 1.0
    monkeypatch.setitem(runtime._notice, "pending", True)
    runtime.add_compile_seconds(2.0)
    assert runtime._notice["seconds"] == 3.0


def test_compile_notice_can_be_silenced(tmp_path):
    assert "rt_numpy:" not in _run_notice(tmp_path, **{runtime.QUIET_COMPILE_ENV: "1"})
    with pytest.raises(TypeError, match="enabled"):
        runtime.set_compile_notice("no")
    runtime.set_compile_notice(False)
    assert not runtime._notice_wanted()
    runtime.set_compile_notice(True)
