"""The first training step's Numba kernels compiled in two processes at once.

With an empty Numba cache the first training step compiles every kernel it
uses, one after the other: 12 to 15 s on a 2-core VM for the ``tiny`` and
``small`` presets, while the second core waits (BENCHMARKS.md, "Cold start").
The largest are the routing attention's forward and backward kernels.
Compiling a kernel needs only the types of its arguments, not their values,
so the backward kernel need not wait for a forward pass to give it inputs.
:func:`first_step`:

1. compiles the embedding's scatter (the gradient of the embedding lookup),
   the smallest kernel of a training step.  If that only loaded it from the
   cache, the cache is taken to be warm: nothing forks, and the first step
   loads (or compiles) the rest.
2. forks.  The child compiles the routing attention's backward kernel, the
   layer norm's gradient and the GELU derivative on small arrays of the
   model's dtype, which writes them to Numba's cache, and exits.  This
   process meanwhile runs the model's forward pass once on a batch of zeros,
   which compiles the forward kernels (layer norm, GELU, k-means, routing
   attention), then AdamW on small arrays, and waits for the child.  The two
   shares took about the same time (8 s each after the fork, on a 2-core VM,
   the ``small`` preset, 2026-12-04).

The child reads and writes the cache of its three kernels only.  The helpers
they call, which the forward kernels call too, it compiles in memory without
caching them: Numba rewrites a function's cache index without a lock, and two
processes adding entries to one index at once could make an entry point at
the other's code.  A kernel loaded from the cache holds its helpers' code.
The first step then finds every kernel compiled in memory or in the cache.
Nothing computed changes: a kernel loaded from the cache is the code its
compile wrote there, the batch of zeros touches no random generator and no
state, and the child writes nothing but its kernels' cache entries.

It is for a process rt_numpy owns, like :func:`rt_numpy.runtime.configure_process`:
the command line's ``train`` and ``demo`` (``train.train(compile_ahead=True)``)
and ``bench/cold_start.py``.  It does nothing without ``fork`` (Windows), on
one core, off the Numba path (``impl="ref"``, CuPy arrays,
``NUMBA_DISABLE_JIT=1``), or for a model that does not run the fused routing
kernels (no routing layer, nearest membership, ``mem_kv``: the choice
:func:`rt_numpy.attention.routing_attention` makes, restated here; if the two
drift apart, only the speed of a first step changes).  The first step then
compiles as before.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import numpy as np

from rt_numpy import backend, model, runtime

CHILD_TIMEOUT_S = 300.0  # a child still compiling after this long is killed; the first step compiles instead


def _uses_routing_kernels(cfg):
    """Whether a training step of ``cfg`` runs the fused routing kernels (balanced membership, no ``mem_kv``)."""
    return bool(model.routing_layers(cfg)) and cfg.membership == "balanced" and not cfg.mem_kv


def _cores():
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def applies(params, cfg, impl="auto"):
    """Whether :func:`first_step` may fork here: ``fork`` exists, more than one core, the model runs
    the fused routing kernels, and its parameters run on compiled Numba kernels under ``impl``."""
    wte = params["wte"]
    with backend.use_impl(impl, backend.get_array_module(wte)):
        on_numba = backend.kernel_impl(wte) == "numba"
    return on_numba and _uses_routing_kernels(cfg) and hasattr(os, "fork") and _cores() > 1


def _rows(cfg):
    """A small (R, D) array of the model's dtype."""
    return np.zeros((2, 4), dtype=np.dtype(cfg.dtype))


def _routing_example(cfg, batch_size):
    """Small arrays of the types the routing kernels receive in a training step of ``cfg``.

    Only the types matter to the compile: the dtype, the number of
    dimensions, the layout (C-contiguous, as the kernels' wrappers make them)
    and the work schedule, which the batch size and the number of routing
    heads choose.  Returns ``x`` (B, H, T, D) zeros and ``windows`` (B, H, K, W).
    """
    B, H, K, W = batch_size, cfg.n_route_heads, 2, 2
    x = np.zeros((B, H, K * W, 1), dtype=np.dtype(cfg.dtype))  # (B, H, T, D)
    windows = np.ascontiguousarray(np.broadcast_to(np.arange(K * W).reshape(K, W), (B, H, K, W)))
    return x, windows


def _child_kernels(cfg, batch_size):
    """The child's share: the routing attention's backward kernel, the layer norm's gradient and the
    GELU derivative.

    Every other kernel's cache is turned off first (loads and saves): the
    helpers these call are compiled in memory, and only the entry kernels,
    which the parent never compiles, get cache entries.
    """
    from numba.core.dispatcher import Dispatcher

    from rt_numpy.kernels import numba_elementwise, numba_norm, numba_routing

    cached = {numba_routing._head_backward, numba_routing._one_cluster_backward, numba_routing._scatter_rows,
              numba_norm._backward, numba_elementwise._gelu_derivative}  # (by_head or by_cluster schedule)
    for name, module in list(sys.modules.items()):
        if name.startswith("rt_numpy.kernels.numba_"):
            for kernel in vars(module).values():
                if isinstance(kernel, Dispatcher) and kernel not in cached:
                    kernel._cache.disable()  # Numba's cache object of the kernel: no loads, no saves
    rows = _rows(cfg)
    numba_norm.layer_norm_grad(rows, rows, rows, 1e-5)
    numba_elementwise.gelu_derivative(rows)
    x, windows = _routing_example(cfg, batch_size)
    numba_routing.backward(x, x, None, x, windows, None, 1.0, False, 0.01)


def _parent_kernels(params, kmeans_states, cfg, batch_size, impl):
    """This process's share: the forward kernels (the model run once on a batch of zeros), then AdamW
    on small arrays."""
    from rt_numpy.kernels import numba_optim

    ids = np.zeros((batch_size, cfg.seq_len), dtype=np.int64)  # (B, T): the types of a real batch
    model.forward(params, ids, cfg, kmeans_states, impl=impl)
    rows = _rows(cfg)
    for decay in (True, False):  # AdamW has one kernel for decayed parameters and one for the others
        numba_optim.adamw(rows, rows, rows, rows, beta1=0.9, beta2=0.95, bias1=0.1, bias2=0.05, eps=1e-8, lr=0.1,
                          weight_decay=0.1, decay=decay)


def _wait(pid, timeout):
    """Wait for child ``pid`` to exit; True when it exited with status 0.  After ``timeout`` seconds
    it is killed (and reaped) and the answer is False."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        if time.monotonic() > deadline:
            _kill(pid)
            return False
        time.sleep(0.01)


def _kill(pid):
    """Kill child ``pid`` and reap it (nothing to do if it was reaped already)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def first_step(params, kmeans_states, cfg, batch_size, impl="auto"):
    """Compile the kernels of a training step of ``cfg`` (batches of ``batch_size``) in two processes.

    Parameters
    ----------
    params, kmeans_states : dict
        The model's state, as :func:`rt_numpy.model.forward` takes it; read, not changed.
    cfg : rt_numpy.model.Config
    batch_size : int
        The training batch size (with the number of routing heads, it chooses
        the routing kernels' schedule).
    impl : str
        As in :func:`rt_numpy.train.train_step`.

    Returns
    -------
    bool
        True when a child compiled its share; False when nothing was forked
        (:func:`applies`, a warm cache, ``fork`` failed) or the child failed
        (its traceback is on stderr) or ran out of time.  The first step then
        compiles whatever is still missing.
    """
    if not applies(params, cfg, impl):
        return False
    from rt_numpy.kernels import numba_scatter

    runtime.start_of_compile_block()  # one compile notice for all of it, its time including the wait
    try:
        compiled_before = runtime.kernel_compiles()
        rows = _rows(cfg)
        numba_scatter.add_rows_at(rows, np.zeros(2, dtype=np.int64), rows)  # the embedding's gradient
        if runtime.kernel_compiles() == compiled_before:  # it loaded from the cache: take the cache as warm
            return False
        try:
            pid = os.fork()
        except OSError:  # no memory or no process slot: compile here, as without this module
            return False
        if pid == 0:  # the child: compile, then leave at once (no atexit handlers, no flushing of parent buffers)
            status = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
                runtime.set_compile_notice(False)  # the parent says it, once
                _child_kernels(cfg, batch_size)
                status = 0
            except BaseException:
                traceback.print_exc(file=sys.stderr)
                sys.stderr.flush()
            finally:
                os._exit(status)
        try:
            _parent_kernels(params, kmeans_states, cfg, batch_size, impl)
            waiting = time.perf_counter()
            ok = _wait(pid, CHILD_TIMEOUT_S)
            runtime.add_compile_seconds(time.perf_counter() - waiting)
        except BaseException:  # an error, or Ctrl-C, here or while waiting: the child's work is not wanted
            _kill(pid)
            raise
        return ok
    finally:
        runtime.end_of_compile_block()
