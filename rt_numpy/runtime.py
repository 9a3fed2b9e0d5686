"""Process-wide settings: every one rt_numpy makes, and why, in one place.

None of them changes what is computed; they change how fast a small machine
runs it.  Three matter on the 2-core machines rt_numpy is benchmarked on:

* **OpenBLAS's idle threads** spin for a while (2^28 cycles by default) after
  each matrix product and hold a core that a Numba kernel started just after
  needs: a parallel kernel right after a product took twice as long.  2^20
  cycles (well under a millisecond) let them sleep before the next kernel, yet
  keep them awake between back-to-back products (the T=8192 training step of
  ``bench/train_step.py`` went from about 2.18 to 2.00 s).  OpenBLAS reads the
  variable ``OPENBLAS_THREAD_TIMEOUT`` once, when NumPy loads it, so this only
  takes effect when it is set before NumPy is imported.
* **Numba's threading layer.**  Its default OpenMP threads keep spinning after
  a parallel kernel returns and then fight NumPy's BLAS threads for the cores:
  a BLAS call right after a kernel was measured 100x slower.  The
  ``workqueue`` layer's threads sleep instead.
* **Freed memory kept for reuse** (:func:`reuse_freed_memory`).  A training
  step at long context allocates and frees the same large arrays every step:
  at T=8192 each feed-forward activation (B, T, 4C) is 64 MiB, and autograd
  makes a dozen of them.  glibc serves blocks above its mmap threshold with
  fresh pages and returns them on ``free``, so each is page-faulted in again,
  4 KiB at a time, on every step; at T=8192 that took more time than the
  arithmetic (3.1 s against 2.2 s per step once freed memory was kept).

What ``import rt_numpy`` changes
--------------------------------
Only the two thread settings, through :func:`set_thread_defaults`, and each
only when the user has not chosen it: ``OPENBLAS_THREAD_TIMEOUT=20`` when the
variable is unset (it acts only if NumPy was not loaded yet), and
``NUMBA_THREADING_LAYER=workqueue`` when that variable is unset (also set on
``numba.config`` when numba is already imported).  Nothing else: the
allocator setting is made by :func:`configure_process`, which the ``rt_numpy``
command line and the ``bench/`` scripts call because they own their process.
A library user may call it too.

The first-run compile notice
----------------------------
With an empty Numba cache the first training step compiles every kernel it
uses (tens of seconds on a small machine); :func:`watch_compilation` says so
on stderr, once per call that compiles (a first training step, a first
evaluation in float64, ...), and how long it took, in a terminal and in a
notebook alike.  Nothing is printed when the kernels load from the cache.
``RT_NUMPY_QUIET_COMPILE=1`` or ``set_compile_notice(False)`` silences it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import sys
import time

OPENBLAS_TIMEOUT = "20"  # 2^20 cycles
NUMBA_LAYER = "workqueue"
M_TRIM_THRESHOLD = -1  # glibc's malloc.h: how much free memory at the top of the heap is kept
M_MMAP_THRESHOLD = -3  # blocks at least this large are served by mmap
MMAP_LIMIT = 1 << 28  # 256 MiB: larger blocks keep their own mmap, so they cannot fragment the heap
_INT_MAX = 2**31 - 1


def set_thread_defaults():
    """Short OpenBLAS spin and Numba's sleeping thread pool, unless the user chose otherwise.

    Called by ``import rt_numpy`` (before it imports NumPy).  Returns the two
    values now in effect, as ``{"OPENBLAS_THREAD_TIMEOUT": ..., "NUMBA_THREADING_LAYER": ...}``.
    """
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", OPENBLAS_TIMEOUT)
    layer = os.environ.setdefault("NUMBA_THREADING_LAYER", NUMBA_LAYER)
    numba = sys.modules.get("numba")
    if numba is not None:  # imported before rt_numpy: its config has already read the environment
        numba.config.THREADING_LAYER = layer
    return {"OPENBLAS_THREAD_TIMEOUT": os.environ["OPENBLAS_THREAD_TIMEOUT"], "NUMBA_THREADING_LAYER": layer}


def reuse_freed_memory(limit: int = MMAP_LIMIT) -> bool:
    """Ask glibc to serve blocks below ``limit`` bytes from the heap and to keep freed memory.

    Parameters
    ----------
    limit : int
        The new mmap threshold in bytes, 1 MiB to 2 GiB - 1 (glibc takes a C
        ``int``).  Blocks at least this large still get their own mmap: with a
        1 GiB limit, dense attention over 8 heads at T=8192 fragmented the heap
        past 24 GiB.

    Returns
    -------
    bool
        True when glibc accepted both settings; False on other C libraries
        (macOS, Windows, musl), where nothing is changed.

    Raises
    ------
    ValueError
        ``limit`` is not an int in [1 MiB, 2 GiB - 1].

    Notes
    -----
    The price is that the process's resident memory stays at its peak after a
    large step.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or not (1 << 20) <= limit <= _INT_MAX:
        raise ValueError(f"limit must be an int in [{1 << 20}, {_INT_MAX}] bytes, got {limit!r}")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(M_MMAP_THRESHOLD, limit)) and bool(mallopt(M_TRIM_THRESHOLD, _INT_MAX))


def configure_process():
    """Every setting of this module, for a process rt_numpy owns (the command line, bench/).

    Returns a dict of what is in effect: the two thread settings and
    ``"reuse_freed_memory"`` (True where glibc took it).
    """
    settings = set_thread_defaults()
    settings["reuse_freed_memory"] = reuse_freed_memory()
    return settings


# --------------------------------------------------------------------------- the first-run compile notice
QUIET_COMPILE_ENV = "RT_NUMPY_QUIET_COMPILE"
_KERNEL_MODULES = "rt_numpy.kernels."
_notice = {"enabled": True, "listening": False, "depth": 0, "seconds": 0.0,
           "pending": False, "blocks": 0, "compiles": 0}


def set_compile_notice(enabled: bool):
    """Say (True, the default) or do not say on stderr when rt_numpy's Numba kernels compile.

    The notice can also be silenced by setting ``RT_NUMPY_QUIET_COMPILE=1``.

    Raises
    ------
    TypeError
        ``enabled`` is not a bool.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    _notice["enabled"] = enabled


def _notice_wanted() -> bool:
    quiet = os.environ.get(QUIET_COMPILE_ENV, "").strip().lower()
    return _notice["enabled"] and quiet in ("", "0", "false", "no")


def _cache_dir() -> str:
    import numba

    return numba.config.CACHE_DIR or "__pycache__ next to rt_numpy/kernels"


def watch_compilation():
    """Listen (once per process) for Numba compiling one of rt_numpy's kernels.

    Numba fires its ``numba:compile`` event only when a kernel is really
    compiled, not when it is loaded from the cache, so a run whose kernels
    are all cached says nothing.  The first compile of the process prints
    ``rt_numpy: compiling Numba kernels for float32 (first run only; cached in
    DIR) ...`` on stderr; :func:`end_of_compile_block` prints how long it took.
    Called when a kernel module is imported (rt_numpy/kernels/numba_*.py).
    """
    if _notice["listening"]:
        return
    from numba.core import event

    class KernelCompileListener(event.Listener):
        def on_start(self, ev):
            _notice["depth"] += 1
            if _notice["depth"] == 1:  # the outermost compile: the callee kernels compile inside it
                _notice["kernel"] = ev.data["dispatcher"].py_func.__module__.startswith(_KERNEL_MODULES)
                _notice["compiles"] += _notice["kernel"]
                _notice["start"] = time.perf_counter()
                if _notice["kernel"] and not _notice["pending"] and _notice_wanted():
                    dtypes = sorted({str(a.dtype) for a in ev.data["args"]  # the data's, not the indices'
                                     if str(getattr(a, "dtype", "")).startswith("float")})
                    print(f"rt_numpy: compiling Numba kernels for {' and '.join(dtypes) or 'integers'} "
                          f"(first run only; cached in {_cache_dir()}) ...", file=sys.stderr, flush=True)
                    _notice["pending"] = True
                    _notice["seconds"] = 0.0

        def on_end(self, ev):
            _notice["depth"] -= 1
            if _notice["depth"] == 0 and _notice["kernel"]:
                _notice["seconds"] += time.perf_counter() - _notice["start"]
                if _notice["blocks"] == 0:  # a kernel called directly, outside any rt_numpy function
                    end_of_compile_block()

    event.register("numba:compile", KernelCompileListener())
    _notice["listening"] = True


def kernel_compiles() -> int:
    """How many times one of rt_numpy's kernels has been compiled (not loaded from the cache) in this
    process so far, counting a kernel's callees with it; 0 before a kernel module is imported."""
    return _notice["compiles"]


def add_compile_seconds(seconds: float):
    """Count ``seconds`` this process spent waiting for kernels compiled by another one
    (:mod:`rt_numpy.compile_ahead`) in the time the compile notice reports, when one is pending."""
    if _notice["pending"]:
        _notice["seconds"] += seconds


def start_of_compile_block():
    """Entered by :func:`rt_numpy.backend.use_impl`: compiles inside are summed until the outermost block ends."""
    _notice["blocks"] += 1


def end_of_compile_block():
    """Left by :func:`rt_numpy.backend.use_impl`: after the outermost block, ``rt_numpy: ... Numba
    kernels compiled in 7.3 s`` on stderr if the compile notice was printed and not yet finished."""
    _notice["blocks"] = max(0, _notice["blocks"] - 1)
    if _notice["blocks"] == 0 and _notice["pending"]:
        _notice["pending"] = False
        if _notice_wanted():
            print(f"rt_numpy: ... Numba kernels compiled in {_notice['seconds']:.1f} s", file=sys.stderr,
                  flush=True)
