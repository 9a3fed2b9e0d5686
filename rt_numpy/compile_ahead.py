"""The first training step's Numba kernels compiled in two processes at once.

With an empty Numba cache the first training step compiles every kernel it
uses, one after the other: about 11 s on a 2-core VM for the ``tiny`` and
``small`` presets, while the second core waits (BENCHMARKS.md, "Cold start").
Compiling a kernel needs only the types of its arguments, not their values,
so the kernels of the backward pass need not wait for a forward pass to give
them inputs.  :func:`first_step` forks this process:

* the child runs the largest backward-pass kernels (the routing attention's
  and the layer norm's gradients) once on small arrays of the model's dtype,
  which compiles them and writes them to Numba's cache, and exits;
* this process meanwhile runs the model's forward pass once on a batch of
  zeros, which compiles the forward pass's kernels, then the other
  backward-pass kernels the same way, and waits for the child.

The first training step then finds every kernel compiled in memory or in the
cache.  Nothing computed changes: a kernel loaded from the cache is the code
its compile wrote there, the batch of zeros touches no random generator and no
state, and the child writes nothing but cache files (each by an atomic
rename, so a child killed half-way leaves no corrupt entry).  With a warm
cache both processes only load kernels.

It is for a process rt_numpy owns, like :func:`rt_numpy.runtime.configure_process`:
the command line's ``train`` and ``demo`` (``train.train(compile_ahead=True)``)
and ``bench/cold_start.py``.  It does nothing on a system without ``fork``
(Windows), off the Numba path (``impl="ref"``, CuPy arrays,
``NUMBA_DISABLE_JIT=1``), and on one core, where the two processes would take
turns; the first step then compiles as before.
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback

import numpy as np

from rt_numpy import backend, model, runtime


def _rows(cfg):
    """A small (R, D) array of the model's dtype: the kernels compile for its type, whatever its size."""
    return np.zeros((2, 4), dtype=np.dtype(cfg.dtype))


def _child_kernels(cfg, batch_size):
    """The child's share: the routing attention's backward kernel and the layer norm's gradient.

    The sizes of the arrays do not matter to the compile, only their types:
    the dtype, the number of dimensions, the layout (C-contiguous, as the
    kernels' wrappers make them) and, for the routing kernel, the work
    schedule that the batch size and the number of routing heads choose.
    """
    from rt_numpy.kernels import numba_norm, numba_routing

    rows = _rows(cfg)
    numba_norm.layer_norm_grad(rows, rows, rows, 1e-5)
    if model.routing_layers(cfg) and cfg.membership == "balanced" and not cfg.mem_kv:
        B, H, K, W = batch_size, cfg.n_route_heads, 2, 2
        x = np.zeros((B, H, K * W, 1), dtype=rows.dtype)  # (B, H, T, D)
        windows = np.ascontiguousarray(np.broadcast_to(np.arange(K * W).reshape(K, W), (B, H, K, W)))
        numba_routing.backward(x, x, None, x, windows, None, 1.0, False, 0.01)


def _parent_kernels(params, kmeans_states, cfg, batch_size, impl):
    """This process's share: the forward pass's kernels (the model run once on a batch of zeros),
    then the rest of the backward pass's (the GELU derivative, the embedding's gradient, AdamW).

    The two shares took about the same time on a 2-core VM (the ``small`` preset, 2026-12-04).
    """
    from rt_numpy.kernels import numba_elementwise, numba_optim, numba_scatter

    ids = np.zeros((batch_size, cfg.seq_len), dtype=np.int64)  # (B, T): the types of a real batch
    model.forward(params, ids, cfg, kmeans_states, impl=impl)
    rows = _rows(cfg)
    numba_elementwise.gelu_derivative(rows)
    numba_scatter.add_rows_at(rows, np.zeros(2, dtype=np.int64), rows)
    for decay in (True, False):  # AdamW has one kernel for decayed parameters and one for the others
        numba_optim.adamw(rows, rows, rows, rows, beta1=0.9, beta2=0.95, bias1=0.1, bias2=0.05, eps=1e-8, lr=0.1,
                          weight_decay=0.1, decay=decay)


def applies(params, impl="auto"):
    """Whether :func:`first_step` would fork here: ``fork`` exists, more than one core, and the
    model's parameters run on compiled Numba kernels under ``impl``."""
    wte = params["wte"]
    with backend.use_impl(impl, backend.get_array_module(wte)):
        on_numba = backend.kernel_impl(wte) == "numba"
    return on_numba and hasattr(os, "fork") and _cores() > 1


def _cores():
    """The cores this process may run on (its CPU affinity where the system tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


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
        True when the child compiled its kernels; False when nothing was
        forked (:func:`applies`) or the child failed (its traceback is on
        stderr; the first step then compiles what is missing).
    """
    if not applies(params, impl):
        return False
    runtime.start_of_compile_block()  # the compile notice's time includes the wait for the child
    try:
        pid = os.fork()
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
        except BaseException:
            os.kill(pid, signal.SIGKILL)  # an error or Ctrl-C here: the child's work is not wanted
            raise
        finally:
            waiting = time.perf_counter()
            _, status = os.waitpid(pid, 0)
            runtime.add_compile_seconds(time.perf_counter() - waiting)
    finally:
        runtime.end_of_compile_block()
    return os.waitstatus_to_exitcode(status) == 0
