"""The reference path is one: under ``impl="ref"`` or ``RT_NUMPY_FORCE_REF=1`` no compiled code runs.

Each case builds the tiny model and trains it for one step in a fresh interpreter in which every
function of the ``rt_numpy.kernels.numba_*`` modules records its calls (Python functions through a
wrapper, compiled ones through the signatures Numba keeps of what it compiled for a call).  The
``impl="numba"`` case is the control: there the kernels do run, so the check can fail
(docs/design.md#choosing-an-implementation).
"""
import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import functools, importlib, json, pkgutil, sys
import numpy as np
import rt_numpy.kernels
from rt_numpy import backend, model, optim, train

import numba.core.registry

called, dispatchers = set(), {}
for info in pkgutil.iter_modules(rt_numpy.kernels.__path__):
    if not info.name.startswith("numba_"):
        continue
    module = importlib.import_module(f"rt_numpy.kernels.{info.name}")
    for attr, obj in list(vars(module).items()):
        if not callable(obj) or isinstance(obj, type) or getattr(obj, "__module__", None) != module.__name__:
            continue
        if isinstance(obj, numba.core.registry.CPUDispatcher):  # compiled: it records its compiled calls
            dispatchers[f"{info.name}.{attr}"] = obj
        elif info.name != "numba_exp":  # Python (all of them under NUMBA_DISABLE_JIT=1): wrapped to record calls
            def spy(*a, _f=obj, _n=f"{info.name}.{attr}", **kw):
                called.add(_n)
                return _f(*a, **kw)
            setattr(module, attr, functools.wraps(obj)(spy))

impl = sys.argv[1]
cfg = model.Config(vocab_size=32, seq_len=16, width=8, n_layers=2, num_heads=2, n_route_heads=1,
                   n_route_layers=1, num_clusters=2, window_size=4, block_size=4, ff_mult=2, dtype="float32")
tcfg = train.TrainConfig(steps=2, batch_size=2, warmup_steps=1)
rng = np.random.default_rng(0)
with backend.use_impl(impl):  # the initial centroids are layer-normed too
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
ids = rng.integers(0, 32, size=(2, 17))
opt = optim.adamw_init(params)
train.train_step(params, opt, states, ids[:, :-1], ids[:, 1:], cfg, tcfg, 0, rng, impl=impl)
called |= {name for name, d in dispatchers.items() if d.signatures}
print(json.dumps(sorted(called)))
"""

def _kernel_calls(impl, **env):
    environ = {k: v for k, v in os.environ.items() if k != "RT_NUMPY_FORCE_REF"}
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT, impl], capture_output=True, text=True, env=environ,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.parametrize("impl,env", [("ref", {}), ("auto", {"RT_NUMPY_FORCE_REF": "1"}),
                                      ("numba", {"RT_NUMPY_FORCE_REF": "1"})],
                         ids=["impl=ref", "FORCE_REF+auto", "FORCE_REF+numba"])
def test_a_reference_training_step_calls_no_kernel(impl, env):
    assert _kernel_calls(impl, **env) == []


def test_control_a_numba_training_step_does_call_kernels():
    called = _kernel_calls("numba")
    assert {"numba_routing.forward", "numba_routing.backward"} <= set(called), called
