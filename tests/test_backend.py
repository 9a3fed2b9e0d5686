"""Tests of rt_numpy.backend: array module, implementation choice, forcing the reference path.

Also checks that rt_numpy works without numba (and without cupy), in a fresh interpreter where
the module is made unimportable, and that ``impl=`` really dispatches to the kernels it names.
"""
import re
import subprocess
import sys
import textwrap
import threading
import types

import autograd.numpy as anp
import numpy as np
import pytest
from autograd import grad

from rt_numpy import backend, kmeans


@pytest.fixture(autouse=True)
def _no_forcing(monkeypatch):
    """Every test starts without RT_NUMPY_FORCE_REF, whatever the calling shell has set."""
    monkeypatch.delenv(backend.FORCE_REF_ENV, raising=False)


def _points_and_means(seed=0):
    rng = np.random.default_rng(seed)
    points = kmeans.normalize(rng.standard_normal((2, 3, 11, 4)))  # (B, H, T, D)
    means = kmeans.normalize(rng.standard_normal((3, 5, 4)))  # (H, K, D)
    return points, means


def _run_python(code):
    """Run ``code`` in a fresh interpreter; fail with its output when it fails."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


# ------------------------------------------------------------------------ array module
@pytest.mark.parametrize("args", [
    (np.zeros(3),),
    (np.zeros((2, 2), np.float32), None, 3, 2.5),
    (None,),
    (1, 2.0, True),
    (),
])
def test_get_array_module_numpy(args):
    assert backend.get_array_module(*args) is np


def test_get_array_module_looks_inside_autograd_boxes():
    seen = []

    def f(x):
        assert type(x).__name__ == "ArrayBox"  # the test must really see a box
        seen.append(backend.get_array_module(x, None))
        return anp.sum(x ** 2)

    g = grad(f)(np.arange(3.0))
    np.testing.assert_array_equal(g, 2 * np.arange(3.0))
    assert seen == [np]


# ------------------------------------------------------------------- implementation choice
def test_auto_prefers_numba_when_available():
    assert backend.numba_available()  # numba is a dependency of rt_numpy
    assert backend.resolve_impl("auto") == "numba"
    assert backend.resolve_impl() == "numba"


def test_explicit_impl_is_kept(impl):
    assert backend.resolve_impl(impl) == impl


@pytest.mark.parametrize("bad", ["fast", "NUMBA", "", None, 1])
def test_unknown_impl_names_parameter_and_value(bad):
    with pytest.raises(ValueError, match=rf"impl must be one of .*got {re.escape(repr(bad))}"):
        backend.resolve_impl(bad)


def test_cupy_impl_with_numpy_arrays_is_refused(monkeypatch):
    # Pretend cupy is installed so that the array-type check is the one that speaks.
    monkeypatch.setitem(backend._available, "cupy", True)
    with pytest.raises(ValueError, match=r"impl='cupy'.*NumPy arrays"):
        backend.resolve_impl("cupy", np)
    points, means = _points_and_means()
    with pytest.raises(ValueError, match=r"impl='cupy'.*NumPy arrays"):
        kmeans.cluster_stats(points, means, impl="cupy")


def test_numba_impl_with_gpu_arrays_is_refused():
    fake_cupy = types.ModuleType("cupy")  # any module other than numpy counts as the GPU one
    with pytest.raises(ValueError, match=r"impl='numba'.*CuPy arrays"):
        backend.resolve_impl("numba", fake_cupy)


# ------------------------------------------------------------------ forcing the reference
def test_reference_only_forces_ref_nested_and_restores():
    assert not backend.force_reference_active()
    with backend.reference_only():
        assert backend.force_reference_active()
        assert backend.resolve_impl("auto") == "ref"
        assert backend.resolve_impl("numba") == "ref"  # forcing wins over an explicit impl
        with backend.reference_only():
            assert backend.resolve_impl("numba") == "ref"
        assert backend.resolve_impl("auto") == "ref"  # still inside the outer block
    assert not backend.force_reference_active()
    assert backend.resolve_impl("auto") == "numba"


def test_reference_only_restores_after_an_exception():
    with pytest.raises(RuntimeError, match="boom"):
        with backend.reference_only():
            with backend.reference_only():
                raise RuntimeError("boom")
    assert not backend.force_reference_active()
    assert backend.resolve_impl("auto") == "numba"


def test_reference_only_is_per_thread():
    seen = {}
    with backend.reference_only():
        thread = threading.Thread(target=lambda: seen.setdefault("other", backend.resolve_impl("auto")))
        thread.start()
        thread.join()
        seen["this"] = backend.resolve_impl("auto")
    assert seen == {"other": "numba", "this": "ref"}


@pytest.mark.parametrize("value, forced", [
    ("1", True), ("yes", True), ("TRUE", True), ("0", False), ("", False), ("false", False), ("no", False),
])
def test_env_var_forces_ref(monkeypatch, value, forced):
    monkeypatch.setenv(backend.FORCE_REF_ENV, value)
    assert backend.FORCE_REF_ENV == "RT_NUMPY_FORCE_REF"
    assert backend.force_reference_active() is forced
    expected = "ref" if forced else "numba"
    assert backend.resolve_impl("auto") == expected
    assert backend.resolve_impl("numba") == expected


# ------------------------------------------------------------- dispatch reaches the kernel
def test_impl_dispatches_to_the_numba_kernels(monkeypatch):
    """``impl="numba"`` calls the kernels and ``"ref"`` or forcing does not (spies on both kernels)."""
    from rt_numpy.kernels import numba_kmeans

    calls = []
    real_stats, real_top = numba_kmeans.assign_and_stats, numba_kmeans.top_w_positions
    monkeypatch.setattr(numba_kmeans, "assign_and_stats",
                        lambda *a: calls.append("stats") or real_stats(*a))
    monkeypatch.setattr(numba_kmeans, "top_w_positions", lambda *a: calls.append("top") or real_top(*a))
    points, means = _points_and_means()

    kmeans.cluster_stats(points, means, impl="ref")
    kmeans.balanced_membership(points, means, 4, impl="ref")
    assert calls == []
    with backend.reference_only():
        kmeans.cluster_stats(points, means, impl="numba")
        kmeans.balanced_membership(points, means, 4, impl="numba")
    assert calls == []
    kmeans.cluster_stats(points, means, impl="numba")
    kmeans.balanced_membership(points, means, 4, impl="auto")
    assert calls == ["stats", "top"]


# ------------------------------------------------------------ optional packages missing
def test_works_without_numba():
    out = _run_python("""
        import sys
        sys.modules["numba"] = None  # makes `import numba` raise ImportError
        import numpy as np
        import rt_numpy
        from rt_numpy import backend, kmeans

        assert not backend.numba_available()
        assert backend.resolve_impl("auto") == "ref"
        rng = np.random.default_rng(0)
        x = kmeans.normalize(rng.standard_normal((2, 2, 9, 3)))  # (B, H, T, D)
        state = kmeans.init_state(2, 4, 3, rng=rng, init="data", points=x, dtype=np.float64,
                                  impl="auto")
        stats = kmeans.cluster_stats(x, state["means"], impl="auto")
        assert stats["counts"].sum() == 2 * 2 * 9
        members = kmeans.balanced_membership(x, state["means"], 3, impl="auto")
        assert members.shape == (2, 2, 4, 3)
        new_state, _ = kmeans.kmeans_step(state, [x, x], impl="auto")
        assert np.isfinite(new_state["means"]).all()
        for call in (lambda: backend.resolve_impl("numba"),
                     lambda: kmeans.cluster_stats(x, state["means"], impl="numba"),
                     lambda: kmeans.balanced_membership(x, state["means"], 3, impl="numba")):
            try:
                call()
            except ImportError as e:
                assert "numba" in str(e) and "pip install" in str(e), e
            else:
                raise AssertionError("impl='numba' without numba did not raise")
        assert "numba" not in sys.modules or sys.modules["numba"] is None
        print("ok")
    """)
    assert out.strip() == "ok"


def test_without_cupy():
    """No cupy: auto stays on the CPU, and asking for impl='cupy' raises an ImportError saying
    what to install, whatever the arrays."""
    out = _run_python("""
        import sys, types
        sys.modules["cupy"] = None
        import numpy as np
        from rt_numpy import backend, kmeans

        assert not backend.cupy_available()
        assert backend.resolve_impl("auto") == "numba"
        for xp in (np, types.ModuleType("cupy")):
            try:
                backend.resolve_impl("cupy", xp)
            except ImportError as e:
                assert "cupy" in str(e) and "pip install" in str(e), e
            else:
                raise AssertionError("impl='cupy' without cupy did not raise ImportError")
        print("ok")
    """)
    assert out.strip() == "ok"


def test_kernel_impl_is_numba_only_where_a_kernel_may_run():
    import numba

    x = np.ones((3, 4), np.float32)
    compiling = backend.numba_available() and not numba.config.DISABLE_JIT
    assert backend.kernel_impl(x, x.copy()) == ("numba" if compiling else "ref")
    assert backend.kernel_impl(np.ones((3, 4), np.int64)) == "ref"  # not a float array
    assert backend.kernel_impl(x, np.ones((3, 4), np.float64)) == "ref"  # mixed dtypes
    assert backend.kernel_impl(x, np.ones((4, 3), np.float32)) == "ref"  # mixed shapes
    with backend.reference_only():
        assert backend.kernel_impl(x) == "ref"
    with backend.use_impl("ref"):
        assert backend.kernel_impl(x) == "ref"
