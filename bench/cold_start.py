"""Benchmark: seconds from the command to the end of the first training step, cold and warm Numba cache.

    python bench/cold_start.py [--json PATH] [--quick] [--repeats N] [--steps N] [--one-process-too]

For each preset (``tiny`` and ``small``; ``--quick``: ``tiny`` only) a fresh
interpreter runs what ``python -m rt_numpy train --preset P`` runs before its
first step, then that step, and exits: ``import rt_numpy.train``, the corpus
loaded and split, ``init_params`` / ``init_kmeans`` / ``adamw_init``, the
kernels compiled in two processes (:func:`rt_numpy.compile_ahead.first_step`),
one ``train.train_step`` on a random batch (impl ``"auto"``).  It runs twice with
one new ``NUMBA_CACHE_DIR``: **cold** (the cache is empty, every kernel the
step uses compiles) and **warm** (everything loads from that cache).  Wall time
is measured by this process around the child; CPU time is the child's user +
system time (``resource.getrusage``, the compiling child's included), which a
machine shared with other work inflates less than the wall time.  The child also reports when each phase
ended, and whether it printed the compile notice (rt_numpy/runtime.py).

The warm run then times ``--steps`` more training steps (default 20, ``--quick``
3, after two to settle): the warm step's median s/step, the figure to compare with another
checkout's (run this script there too, one after the other) for "the warm
step slows by at most 5%".  They are left out of the seconds to the first step.

With ``--one-process-too`` each preset also gets a cold run whose kernels all
compile in the first step, in one process, as before rt_numpy/compile_ahead.py
(case ``arm``: ``"one process"``; the others are ``"two processes"``).

With ``--repeats N`` each (preset, pass) runs N times (each cold run with its
own empty cache) and the medians are quoted.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_parser, machine_line, print_table, record, write_json  # noqa: E402

PHASES = ("import", "corpus", "init", "first_step")

# The child: the training command's work up to the end of its first step, timing each phase.
CHILD = """
import json, sys, time
wall0, cpu0 = time.perf_counter(), time.process_time()
marks = {}
def mark(name):
    marks[name] = {"wall": time.perf_counter() - wall0, "cpu": time.process_time() - cpu0}
from rt_numpy import data, model, optim, runtime, train
runtime.configure_process()
import numpy as np
mark("import")
cfg, tcfg = train.PRESETS[sys.argv[1]]
corpus = data.split(data.load_corpus(tcfg.corpus)[0])
mark("corpus")
rng = np.random.default_rng(tcfg.seed)
params = model.init_params(cfg, rng)
kmeans_states = model.init_kmeans(cfg, rng)
opt_state = optim.adamw_init(params)
mark("init")
if sys.argv[3] == "two":  # as the command line does: the kernels compile in two processes
    from rt_numpy import compile_ahead
    compile_ahead.first_step(params, kmeans_states, cfg, tcfg.batch_size)
x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)
state = train.train_step(params, opt_state, kmeans_states, x, y, cfg, tcfg, 0, rng)[:3]
mark("first_step")
warm_steps = int(sys.argv[2])
times = []
if warm_steps:
    for step in range(1, warm_steps + 3):  # 2 steps to settle, then the timed ones
        x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)
        start = time.perf_counter()
        state = train.train_step(*state, x, y, cfg, tcfg, step, rng)[:3]
        times.append(time.perf_counter() - start)
marks["step_median"] = float(np.median(times[2:])) if times else None
mark("end")
print(json.dumps(marks))
"""


def run_child(preset, cache_dir, steps=0, processes="two"):
    """One child run: (wall s, CPU s, phase marks, notice printed?); with ``steps``, the marks
    hold ``step_median``, the median s/step of that many warm steps after the first three.
    ``processes``: ``"two"`` compiles as the command line does (rt_numpy/compile_ahead.py),
    ``"one"`` leaves every compile to the first step."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache_dir)
    env.pop("NUMBA_DISABLE_JIT", None)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, preset, str(steps), processes], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"the {preset} child failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    marks = json.loads(done.stdout.strip().splitlines()[-1])
    # Up to the end of the first step: less what the child did after it (the warm steps).
    wall -= marks["end"]["wall"] - marks["first_step"]["wall"]
    cpu -= marks["end"]["cpu"] - marks["first_step"]["cpu"]
    return wall, cpu, marks, "compiling Numba kernels" in done.stderr


def main():
    parser = bench_parser(__doc__, quick_help="the tiny preset only")
    parser.add_argument("--repeats", type=int, default=1, help="runs per (preset, pass); medians quoted")
    parser.add_argument("--one-process-too", action="store_true",
                        help="also time each cold start with every compile left to the first step, in one "
                             "process (the command line compiles in two: rt_numpy/compile_ahead.py)")
    parser.add_argument("--steps", type=int, default=None,
                        help="warm steps timed after the first three in the warm-cache run (default 20, "
                             "--quick 3; 0: none)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.steps is None:
        args.steps = 3 if args.quick else 20
    if args.steps < 0:
        parser.error(f"--steps must be at least 0, got {args.steps}")
    machine = machine_line()
    print(machine)
    presets = ["tiny"] if args.quick else ["tiny", "small"]
    records, rows = [], []
    for preset in presets:
        runs = {"cold cache": [], "warm cache": []}
        if args.one_process_too:
            runs["cold cache, one process"] = []
        for _ in range(args.repeats):
            if args.one_process_too:
                with tempfile.TemporaryDirectory(prefix="rt_numpy_numba_cache_") as cache_dir:
                    runs["cold cache, one process"].append(run_child(preset, cache_dir, processes="one"))
            with tempfile.TemporaryDirectory(prefix="rt_numpy_numba_cache_") as cache_dir:
                runs["cold cache"].append(run_child(preset, cache_dir))
                runs["warm cache"].append(run_child(preset, cache_dir, args.steps))
        for kind, results in runs.items():
            wall = float(np.median([r[0] for r in results]))
            cpu = float(np.median([r[1] for r in results]))
            phases = {p: float(np.median([r[2][p]["wall"] for r in results])) for p in PHASES}
            case = {"task": preset, "pass": kind.split()[0],
                    "arm": "one process" if "one process" in kind else "two processes"}
            record(records, "rt_numpy-numba", case, "seconds_to_first_step", wall, "s")
            record(records, "rt_numpy-numba", case, "cpu_seconds_to_first_step", cpu, "s")
            for p in PHASES:
                record(records, "rt_numpy-numba", case, f"{p}_ends_at", phases[p], "s")
            step = None if results[0][2]["step_median"] is None else float(
                np.median([r[2]["step_median"] for r in results]))
            if step is not None:
                record(records, "rt_numpy-numba", case, "warm_step_median", step, "s")
            notice = "yes" if all(r[3] for r in results) else ("no" if not any(r[3] for r in results) else "mixed")
            rows.append([f"{preset}, {kind}", f"{wall:.1f}", f"{cpu:.1f}", f"{phases['import']:.1f}",
                         f"{phases['corpus'] - phases['import']:.1f}", f"{phases['init'] - phases['corpus']:.1f}",
                         f"{phases['first_step'] - phases['init']:.1f}", notice,
                         "-" if step is None else f"{step * 1e3:.1f}"])
    print_table(["case", "wall s", "CPU s", "import s", "corpus s", "init s", "first step s",
                 "notice", "warm step ms"], rows)
    print(f"medians of {args.repeats} run(s); phases are wall seconds inside the child; warm step: median of "
          f"{args.steps} steps after the first three")
    write_json(args.json, records, machine)


if __name__ == "__main__":
    main()
