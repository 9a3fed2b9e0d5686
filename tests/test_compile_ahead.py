"""rt_numpy.compile_ahead: with an empty cache the two processes compile every kernel of the first
training step, which then compiles nothing and gives bitwise what a step without them gives; off the
Numba path nothing is forked; a failing child or a Ctrl-C in the parent leaves nothing behind."""
import dataclasses
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from rt_numpy import compile_ahead, model, optim, train
from rt_numpy.kernels import numba_threads

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="compile_ahead forks; this system has no fork")

# A fresh interpreter with an empty cache: the two processes compile, then one training step, whose
# compiles (Numba's events) are listed.  It prints what first_step returned, the kernels compiled in
# this process by first_step and by the step, and a hash of the parameters after the step.
CHILD = """
import hashlib, json, sys
from numba.core import event
from rt_numpy import compile_ahead, data, model, optim, train
import numpy as np

compiled = []
class Listen(event.Listener):
    def on_start(self, ev):
        compiled.append(ev.data["dispatcher"].py_func.__module__ + "." + ev.data["dispatcher"].py_func.__name__)
    def on_end(self, ev):
        pass
event.register("numba:compile", Listen())
cfg, tcfg = train.PRESETS[sys.argv[1]]
rng = np.random.default_rng(tcfg.seed)
params, kmeans_states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
opt_state = optim.adamw_init(params)
forked = compile_ahead.first_step(params, kmeans_states, cfg, tcfg.batch_size)
by_parent = sorted(set(compiled))
compiled.clear()
x = rng.integers(0, 256, size=(tcfg.batch_size, cfg.seq_len + 1))
params = train.train_step(params, opt_state, kmeans_states, x[:, :-1], x[:, 1:], cfg, tcfg, 0, rng)[0]
digest = hashlib.sha256(b"".join(np.ascontiguousarray(params[k]).tobytes() for k in sorted(params))).hexdigest()
print(json.dumps({"forked": forked, "by_parent": by_parent, "by_step": sorted(set(compiled)), "digest": digest}))
"""


def _digest_of_one_step(preset):
    """The CHILD's step, in this process (no compile_ahead, whatever this process's cache holds)."""
    cfg, tcfg = train.PRESETS[preset]
    rng = np.random.default_rng(tcfg.seed)
    params, kmeans_states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    opt_state = optim.adamw_init(params)
    x = rng.integers(0, 256, size=(tcfg.batch_size, cfg.seq_len + 1))
    params = train.train_step(params, opt_state, kmeans_states, x[:, :-1], x[:, 1:], cfg, tcfg, 0, rng)[0]
    return hashlib.sha256(b"".join(np.ascontiguousarray(params[k]).tobytes() for k in sorted(params))).hexdigest()


def _run_child(preset, cache_dir):
    env = {key: value for key, value in os.environ.items() if key != "RT_NUMPY_QUIET_COMPILE"}
    env["NUMBA_CACHE_DIR"] = str(cache_dir)
    result = subprocess.run([sys.executable, "-c", CHILD, preset], env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="nothing compiles under NUMBA_DISABLE_JIT")
@pytest.mark.skipif(compile_ahead._cores() < 2, reason="compile_ahead needs two cores")
def test_the_first_step_compiles_nothing_and_gives_the_same_bits(tmp_path):
    out, stderr = _run_child("tiny", tmp_path / "cache")
    assert out["forked"] is True
    assert out["by_step"] == []  # every kernel was compiled here or loaded from what the child cached
    # The child's kernels were not compiled in this process: the step loaded them from the cache.
    assert not {"rt_numpy.kernels.numba_routing._head_backward", "rt_numpy.kernels.numba_norm._backward",
                "rt_numpy.kernels.numba_elementwise._gelu_derivative"} & set(out["by_parent"])
    assert {"rt_numpy.kernels.numba_routing._head_forward",
            "rt_numpy.kernels.numba_scatter._add_rows_at"} <= set(out["by_parent"])
    assert out["digest"] == _digest_of_one_step("tiny")
    # One notice, from this process (the child's is silenced), with the time it waited included.
    assert stderr.count("rt_numpy: compiling Numba kernels for float32") == 1
    assert stderr.count("Numba kernels compiled in") == 1
    # With the cache now warm, nothing forks and nothing compiles, and the bits are the same.
    again, stderr = _run_child("tiny", tmp_path / "cache")
    assert again["forked"] is False and again["by_parent"] == [] and again["by_step"] == []
    assert again["digest"] == out["digest"]
    assert "rt_numpy:" not in stderr


@pytest.mark.skipif(numba.config.DISABLE_JIT, reason="nothing compiles under NUMBA_DISABLE_JIT")
@pytest.mark.parametrize("batch_size, route_heads", [(4, 2), (1, 1)])  # the tiny preset's; one (b, h) pair
def test_the_child_caches_its_own_kernels_only(tmp_path, batch_size, route_heads):
    """Two processes must never write one function's cache index: the child's share, run alone on an
    empty cache, leaves entries for its entry kernels and for nothing they call, with either schedule
    of the routing kernels (one (b, h) pair on 2 threads is shared out by cluster)."""
    code = ("import dataclasses; from rt_numpy import compile_ahead, train\n"
            "from rt_numpy.kernels import numba_routing\n"
            f"cfg = dataclasses.replace(train.PRESETS['tiny'][0], n_route_heads={route_heads})\n"
            f"compile_ahead._child_kernels(cfg, {batch_size})\n"
            f"print(numba_routing._schedule('auto', {batch_size}, {route_heads}))\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), RT_NUMPY_QUIET_COMPILE="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    schedule = result.stdout.split()[-1]
    routing = (["numba_routing._head_backward"] if schedule == "by_head"
               else ["numba_routing._one_cluster_backward", "numba_routing._scatter_rows"])
    indexes = sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.nbi"))
    assert indexes == sorted(["numba_elementwise._gelu_derivative", "numba_norm._backward", *routing])


def test_off_the_numba_path_nothing_is_forked(monkeypatch):
    cfg, tcfg = train.PRESETS["tiny"]
    params = model.init_params(cfg, np.random.default_rng(0))
    kmeans_states = model.init_kmeans(cfg, np.random.default_rng(0))
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked with impl='ref'"))
    assert compile_ahead.applies(params, cfg, impl="ref") is False
    assert compile_ahead.first_step(params, kmeans_states, cfg, tcfg.batch_size, impl="ref") is False


def _forking_setup(monkeypatch):
    """The tiny preset's state, with compile_ahead told that it applies (whatever the machine)."""
    cfg, tcfg = train.PRESETS["tiny"]
    rng = np.random.default_rng(0)
    params, kmeans_states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    monkeypatch.setattr(compile_ahead, "applies", lambda params, cfg, impl="auto": True)
    # Every look at the count of compiles sees a new one, as with an empty cache.
    monkeypatch.setattr(compile_ahead.runtime, "kernel_compiles", itertools.count().__next__)
    return params, kmeans_states, cfg, tcfg


def test_a_failing_child_is_reported_and_changes_nothing(monkeypatch, capfd):
    params, kmeans_states, cfg, tcfg = _forking_setup(monkeypatch)
    before = {k: v.copy() for k, v in params.items()}
    centroids = {(layer, k): np.copy(v) for layer, state in kmeans_states.items() for k, v in state.items()}

    def fail(cfg, batch_size):
        raise RuntimeError("the child's compile failed on purpose")

    monkeypatch.setattr(compile_ahead, "_child_kernels", fail)
    assert compile_ahead.first_step(params, kmeans_states, cfg, tcfg.batch_size) is False
    assert "the child's compile failed on purpose" in capfd.readouterr().err
    for name, value in before.items():
        np.testing.assert_array_equal(params[name], value)
    for (layer, name), value in centroids.items():
        np.testing.assert_array_equal(kmeans_states[layer][name], value)


def test_ctrl_c_in_the_parent_stops_the_child_at_once(monkeypatch):
    params, kmeans_states, cfg, tcfg = _forking_setup(monkeypatch)
    real_fork, children = os.fork, []

    def fork():
        pid = real_fork()
        if pid:  # the parent records its child
            children.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    monkeypatch.setattr(compile_ahead, "_child_kernels", lambda cfg, batch_size: time.sleep(60))

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(compile_ahead, "_parent_kernels", interrupted)
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        compile_ahead.first_step(params, kmeans_states, cfg, tcfg.batch_size)
    assert time.perf_counter() - start < 30  # the sleeping child was killed and reaped, not waited for
    assert len(children) == 1
    with pytest.raises(ChildProcessError):
        os.waitpid(children[0], os.WNOHANG)  # already reaped: no child left behind


def _double(out, i):
    out[i] = 2 * i


def test_a_forked_child_gets_its_own_thread_pool():
    """numba_threads' pool threads do not exist in a fork: the child must make its own, not hang."""
    before = numba.get_num_threads()
    numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
    try:
        out = np.zeros(4)
        numba_threads.run(_double, [(out, i) for i in range(4)])  # the parent's pool now exists
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                child_out = np.zeros(4)
                numba_threads.run(_double, [(child_out, i) for i in range(4)])
                code = 0 if child_out.tolist() == [0, 2, 4, 6] else 1
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if not done:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        assert done, "the forked child hung on the parent's thread pool"
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        numba.set_num_threads(before)


def test_train_compiles_ahead_once_when_asked(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(compile_ahead, "first_step", lambda *args: calls.append(args) or True)
    cfg, tcfg = train.PRESETS["tiny"]
    tcfg = dataclasses.replace(tcfg, steps=2)
    train.train(cfg, tcfg, progress=False, impl="ref", log=lambda line: None)
    assert calls == []  # off by default: a library call does not fork
    done = train.train(cfg, tcfg, progress=False, impl="ref", log=lambda line: None, compile_ahead=True,
                       out_dir=str(tmp_path / "run"))
    assert len(calls) == 1 and calls[0][2] == cfg and calls[0][3] == tcfg.batch_size
    # Resuming a finished run trains no step: nothing to compile ahead of.
    train.train(cfg, tcfg, progress=False, impl="ref", log=lambda line: None, compile_ahead=True,
                resume=done["checkpoint"])
    assert len(calls) == 1


def test_the_command_line_compiles_ahead(monkeypatch, tmp_path):
    from rt_numpy import __main__ as cli

    seen = {}

    def fake_train(cfg, tcfg, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)

    monkeypatch.setattr(train, "train", fake_train)
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    assert seen["compile_ahead"] is True
