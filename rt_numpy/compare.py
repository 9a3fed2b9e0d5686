"""The paper's comparison in miniature: ``python -m rt_numpy compare``.

One model is trained several times with only its attention changed (the arms),
on three tasks, with the same steps, data order, seeds and tuning for every arm
(docs/results.md has the tables and the reading; docs/algorithm.md#7-the-baselines
the attentions).

Arms (:data:`ARMS`), each a change of one :class:`rt_numpy.model.Config`:

* ``local`` - every head local (block L, one block of look-back);
* ``routing`` - the paper's mix: ``n_route_heads`` balanced routing heads in the
  last ``n_route_layers`` layers, the other heads local;
* ``strided``, ``lsh`` - the same heads as strided or LSH attention instead;
* ``nearest`` - routing with ``membership="nearest"`` (strictly causal);
* ``dense`` - every head dense (where T allows it).

The budget: a local query sees L + (L + 1) / 2 keys on average, and a routing,
strided or LSH query about (W + 1) / 2 with W = 3L; LSH, whose chunk also sees
the previous chunk, gets chunks of W / 2.  The table states the keys per query
measured on held-out data, and the parameter counts (equal: centroids and hash
rotations are not parameters).

Tasks (:data:`TASKS`):

* ``text`` - next byte of English Wikipedia XML (:func:`rt_numpy.data.enwik_corpus`),
  held-out and test bits per byte;
* ``recall`` - associative recall with the records ``distance`` bytes before their
  queries, accuracy per (pairs, distance) over a grid; only the answers are scored
  and trained on, with weights drawn at std 0.1 (bench/recall.py says why);
* ``images`` - next pixel of 24 x 48 images tiled from scikit-learn's digits
  (:func:`rt_numpy.data.digit_images`), held-out bits per dimension; held-out
  images use other digits than training images.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time

import numpy as np

from rt_numpy import baselines, data, kmeans, model, ops, optim, train

TASKS = ("text", "recall", "images")
ARMS = ("local", "routing", "strided", "lsh", "nearest", "dense")
IMPL = "rt_numpy-numba"  # impl="auto": the Numba kernels where they apply


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and budget of one comparison; every arm of every task uses them."""

    seq_len: dict = dataclasses.field(default_factory=lambda: {"text": 1152, "recall": 576, "images": 1152})
    width: int = 64
    n_layers: int = 2
    num_heads: int = 4
    n_route_heads: int = 2
    n_route_layers: int = 1
    block_size: int = 32  # L
    window_size: int = 96  # W = 3L: (W + 1) / 2 keys per query, a local head's L + (L + 1) / 2
    steps: dict = dataclasses.field(default_factory=lambda: {"text": 200, "recall": 400, "images": 200})
    batch_size: int = 4
    lr: float = 3e-3
    recall_lr: float = 1e-3
    recall_init_std: float = 0.1
    seeds: tuple = (0, 1, 2)
    eval_every: int = 50
    curve_batches: int = 2  # held-out batches at each curve point
    eval_batches: int = 16  # held-out batches of the final numbers
    recall_pairs: tuple = (4, 16)
    recall_distances: tuple = (32, 128, 512)
    dense_max_len: int = 1152
    num_clusters: int = 0  # K; 0: T / W rounded to an even number (LSH buckets must be even)

    def config(self, task, arm):
        """The model of ``arm`` on ``task``."""
        T, W = self.seq_len[task], self.window_size
        base = model.Config(seq_len=T, width=self.width, n_layers=self.n_layers, num_heads=self.num_heads,
                            n_route_heads=self.n_route_heads, n_route_layers=self.n_route_layers,
                            num_clusters=self.num_clusters or max(2, 2 * round(T / W / 2)), window_size=W,
                            block_size=self.block_size,
                            look_back=1)
        changes = {"local": dict(n_route_heads=0), "routing": {}, "nearest": dict(membership="nearest"),
                   "strided": dict(attention="strided"), "lsh": dict(attention="lsh", window_size=W // 2),
                   "dense": dict(attention="dense", n_route_heads=self.num_heads, n_route_layers=self.n_layers)}
        return dataclasses.replace(base, **changes[arm])

    def train_config(self, task, seed):
        lr = self.recall_lr if task == "recall" else self.lr
        steps = self.steps[task]
        return train.TrainConfig(steps=steps, batch_size=self.batch_size, lr=lr, min_lr=lr / 10,
                                 warmup_steps=max(1, steps // 10), weight_decay=0.1, grad_clip=1.0, eval_every=0,
                                 seed=seed)


QUICK = dict(seq_len={"text": 96, "recall": 96, "images": 384}, width=16, num_heads=2, n_route_heads=1,
             block_size=8, window_size=24, steps={"text": 3, "recall": 3, "images": 3}, seeds=(0, 1),
             eval_every=2, curve_batches=1, eval_batches=1, recall_pairs=(2,), recall_distances=(8, 40),
             dense_max_len=384)


# --------------------------------------------------------------------------- data of each task
class TextTask:
    """Bytes of Wikipedia XML, split 90/5/5 in order; training windows drawn at random."""

    name, metric, unit = "text", "bits_per_byte", "bits/byte"

    def __init__(self):
        raw, self.sha256 = data.load_corpus("enwik")
        self.splits = data.split(raw)
        self.provenance = f"English Wikipedia XML from the gensim wheel, {len(raw):,} bytes, sha256 {self.sha256}"

    def batch(self, B, T, rng):
        x, y = data.random_batches(self.splits["train"], B, T, rng)
        return x, y, None

    def evaluate(self, fit, cfg, batches, split="val"):
        return train.evaluate(fit["params"], fit["kmeans"], cfg, self.splits[split], batch_size=8,
                              max_batches=batches)["bits_per_byte"]


class ImageTask:
    """Next-pixel prediction on 32 x 32 tiles of digits; held-out images from other digits."""

    name, metric, unit = "images", "bits_per_dim", "bits/dim"

    def __init__(self, T):
        if T % 128:
            raise ValueError(f"images need seq_len a multiple of 128 (rows of two 8x8 digits), got {T}")
        n = T // 64  # digits per image, in 2 or 3 rows
        rows = 3 if n % 3 == 0 and n >= 9 else 2
        self.tiles, self.width = (rows, n // rows), 8 * (n // rows)
        held_out, self.sha256 = data.digit_images(256, split="held_out", rng=np.random.default_rng(12345),
                                                  tiles=self.tiles)
        self.held_out = held_out
        self.provenance = (f"scikit-learn digits (1797 8x8 images, 17 levels) tiled {self.tiles[0]}x{self.tiles[1]}; "
                           f"train from digits 0-1499, held-out from 1500-1796; sha256 {self.sha256}")

    def batch(self, B, T, rng):
        x, y = data.image_batch(data.digit_images(B, split="train", rng=rng, tiles=self.tiles)[0])
        return x, y, None

    def evaluate(self, fit, cfg, batches, split="val"):
        total, count = 0.0, 0
        for b in range(min(batches * 8, len(self.held_out)) // 8):
            x, y = data.image_batch(self.held_out[b * 8:(b + 1) * 8])
            logits, _ = model.forward(fit["params"], x, cfg, fit["kmeans"])
            total += float(ops.cross_entropy(logits, y)) * y.size
            count += y.size
        return total / count / math.log(2)


def recall_rows(B, T, *, n_pairs, distance, rng):
    """Recall rows of length T whose records lie about ``distance`` bytes before their queries.

    :func:`rt_numpy.data.recall_task` on ``distance + 2 P R`` bytes (P pairs, R = 2
    bytes a record), after random filler: the records start ``T - distance - 2 P R``
    bytes in, and each query lies between ``distance`` and ``distance + 2 P R`` bytes
    after its record.
    """
    R = 2
    n = min(T, distance + 2 * n_pairs * R)
    x, y, mask = data.recall_task(B, n, rng=rng, n_pairs=n_pairs, key_len=1, value_len=1,
                                  distance=n - (2 * n_pairs - 1) * R + 1)
    filler = np.frombuffer(data.FILLER_ALPHABET, np.uint8)
    pad = filler[rng.integers(0, len(filler), size=(B, T - n))].astype(np.int64)  # (B, T - n)
    s = np.concatenate([pad, x, y[:, -1:]], axis=1)  # (B, T + 1): filler, then the n + 1 bytes of the task
    return s[:, :-1], s[:, 1:], np.concatenate([np.zeros((B, T - n), bool), mask], axis=1)


class RecallTask:
    """Associative recall over a grid of (pairs, distance); training draws a grid cell per batch."""

    name, metric, unit = "recall", "accuracy", "fraction"

    def __init__(self, pairs, distances, T):
        self.grid = [(p, d) for p in pairs for d in distances if d + 4 * p <= T]
        self.sha256 = None
        self.provenance = f"synthetic (rt_numpy.data.recall_task), grid (pairs, distance) {self.grid}"

    def batch(self, B, T, rng):
        p, d = self.grid[rng.integers(len(self.grid))]
        return recall_rows(B, T, n_pairs=p, distance=d, rng=rng)

    def evaluate(self, fit, cfg, batches, split="val", per_cell=False):
        scores = {}
        for p, d in self.grid:
            rng = np.random.default_rng(10_000 + 100 * p + d)  # held-out rows: never the training stream
            hits = []
            for _ in range(max(1, batches // len(self.grid))):
                x, y, mask = recall_rows(8, cfg.seq_len, n_pairs=p, distance=d, rng=rng)
                logits, _ = model.forward(fit["params"], x, cfg, fit["kmeans"])
                hits.append(data.recall_accuracy(logits, y, mask))
            scores[(p, d)] = float(np.mean(hits))
        return scores if per_cell else float(np.mean(list(scores.values())))


def make_task(name, settings):
    if name == "text":
        return TextTask()
    if name == "images":
        return ImageTask(settings.seq_len["images"])
    return RecallTask(settings.recall_pairs, settings.recall_distances, settings.seq_len["recall"])


# --------------------------------------------------------------------------- one training run
def fit(task, cfg, tcfg, settings, log=print):
    """Train one arm with one seed; returns the model, its curve and its timings."""
    rng = np.random.default_rng(tcfg.seed)
    params = model.init_params(cfg, rng)  # the same draws for every arm: the shapes are the same
    if task.name == "recall":
        factor = settings.recall_init_std / 0.02
        params = {k: (v * np.asarray(factor, v.dtype) if v.ndim >= 2 else v) for k, v in params.items()}
    states = model.init_kmeans(cfg, rng)
    opt_state = optim.adamw_init(params)
    data_rng = np.random.default_rng(tcfg.seed + 1)  # the same batches, in the same order, for every arm
    result = {"params": params, "kmeans": states}
    curve, train_seconds = [], 0.0
    for step in range(1, tcfg.steps + 1):
        x, y, mask = task.batch(tcfg.batch_size, cfg.seq_len, data_rng)
        start = time.perf_counter()
        params, opt_state, states, metrics = train.train_step(params, opt_state, states, x, y, cfg, tcfg,
                                                              step - 1, None, mask=mask)
        train_seconds += time.perf_counter() - start
        if step % settings.eval_every == 0 or step == tcfg.steps:
            result.update(params=params, kmeans=states)
            value = task.evaluate(result, cfg, settings.curve_batches)
            curve.append({"step": step, "seconds": train_seconds, task.metric: value,
                          "train_loss": metrics["cross_entropy"]})
            log(f"    step {step:5d}  train loss {metrics['cross_entropy']:.3f}  held-out {task.metric} "
                f"{value:.3f}  {train_seconds:6.1f} s")
    result.update(params=params, kmeans=states, curve=curve, train_seconds=train_seconds,
                  tokens_per_s=tcfg.steps * tcfg.batch_size * cfg.seq_len / train_seconds)
    return result


# --------------------------------------------------------------------------- who sees whom, measured
def head_visibility(cfg, states, trace, layer):
    """The (B, H, T, T) visibility counts of every head of ``layer``, from a traced forward pass."""
    q = trace[f"h{layer}"]["q"]
    B, H, T, D = q.shape
    Hs = cfg.n_route_heads if cfg.is_sparse_layer(layer) else 0
    local = np.broadcast_to(baselines.visibility("local", T, block_size=cfg.block_size, look_back=cfg.look_back),
                            (B, H - Hs, T, T))
    if Hs == 0:
        return local
    qs = q[:, :Hs]
    if cfg.attention == "dense":
        sparse = np.broadcast_to(baselines.visibility("dense", T), (B, Hs, T, T))
    elif cfg.attention == "strided":
        sparse = np.broadcast_to(baselines.visibility("strided", T, stride=cfg.stride), (B, Hs, T, T))
    elif cfg.attention == "lsh":
        chunks = baselines.lsh_chunks(baselines.lsh_buckets(kmeans.normalize(qs, cfg.norm),
                                                            model.lsh_rotations(cfg, layer)), cfg.window_size)
        sparse = baselines.visibility("lsh", T, chunks=chunks)
    else:
        means = states[f"h{layer}"]["means"]
        qn = kmeans.normalize(qs, cfg.norm)
        if cfg.membership == "nearest":
            sparse = baselines.visibility("routing", T, assignments=kmeans.nearest(qn, means))
        else:
            sparse = baselines.visibility("routing", T,
                                          windows=kmeans.balanced_membership(qn, means, min(cfg.window_size, T)))
    return np.concatenate([sparse, local], axis=1)


def keys_per_query(fit_result, cfg, x):
    """Mean distinct keys per query over all heads and layers, and over the arm's own heads only."""
    trace = {}
    model.forward(fit_result["params"], x, cfg, fit_result["kmeans"], trace=trace)
    per_layer = [head_visibility(cfg, fit_result["kmeans"], trace, i) for i in range(cfg.n_layers)]
    every = float(np.mean([baselines.keys_per_query(c) for c in per_layer]))
    own = [c[:, :cfg.n_route_heads] for i, c in enumerate(per_layer) if cfg.is_sparse_layer(i)]
    own = float(np.mean([baselines.keys_per_query(c) for c in own])) if own else every
    return every, own, trace


# --------------------------------------------------------------------------- the whole comparison
def nominal_keys(cfg):
    """Keys per query of an arm's own heads by construction (docs/algorithm.md#73-the-budget)."""
    L, W, T = cfg.block_size, cfg.window_size, cfg.seq_len
    if cfg.n_route_heads == 0:  # its own block, (L + 1) / 2, and the whole blocks before it that exist
        N = T // L
        return (L + 1) / 2 + L * sum(min(n, cfg.look_back) for n in range(N)) / N
    if cfg.attention == "dense":
        return (T + 1) / 2
    if cfg.attention == "strided":
        return (T / cfg.stride + 1) / 2
    if cfg.attention == "lsh":
        return W + 0.5
    if cfg.membership == "nearest":
        return (T / cfg.num_clusters + 1) / 2
    return min(1.0, cfg.num_clusters * W / T) * (W + 1) / 2


def run(tasks, arms, settings, *, out_dir=None, json_path=None, log=print):
    """Train every (task, arm, seed); returns the records and, per task, the rows of its table.

    With ``json_path`` the records so far are written after each task, so a run cut short keeps them.
    """
    records, tables, figures = [], {}, {}
    machine = machine_line()
    for task_name in tasks:
        task = make_task(task_name, settings)
        log(f"task {task_name}: {task.provenance}")
        rows, curves, fits = [], {}, {}
        for arm in arms:
            cfg = settings.config(task_name, arm)
            if arm == "dense" and cfg.seq_len > settings.dense_max_len:
                log(f"  dense: skipped, T={cfg.seq_len} > dense_max_len={settings.dense_max_len}")
                continue
            n_params = sum(int(v.size) for v in model.init_params(cfg, np.random.default_rng(0)).values())
            per_seed = []
            for seed in settings.seeds:
                log(f"  {arm}, seed {seed}")
                tcfg = settings.train_config(task_name, seed)
                result = fit(task, cfg, tcfg, settings, log)
                final = {"val": task.evaluate(result, cfg, settings.eval_batches)}
                if task_name == "text":
                    final["test"] = task.evaluate(result, cfg, settings.eval_batches, split="test")
                if task_name == "recall":
                    final["cells"] = task.evaluate(result, cfg, settings.eval_batches * 4, per_cell=True)
                x, _, _ = task.batch(2, cfg.seq_len, np.random.default_rng(777))
                every, own, trace = keys_per_query(result, cfg, x)
                per_seed.append(dict(final, keys_all=every, keys_own=own, tokens_per_s=result["tokens_per_s"],
                                     seconds=result["train_seconds"], curve=result["curve"]))
                if seed == settings.seeds[0]:
                    fits[arm] = (result, cfg, x, trace)
                case = _case(task, arm, cfg, seed, settings)
                _record(records, case, task.metric, final["val"], task.unit)
                if "test" in final:
                    _record(records, case, "test_" + task.metric, final["test"], task.unit)
                for (p, d), acc in final.get("cells", {}).items():
                    _record(records, dict(case, n_pairs=p, distance=d), "accuracy", acc, "fraction")
                _record(records, case, "params", n_params, "count")
                _record(records, case, "keys_per_query", every, "keys")
                _record(records, case, "keys_per_query_own_heads", own, "keys")
                _record(records, case, "tokens_per_s", result["tokens_per_s"], "tokens/s")
                _record(records, case, "train_seconds", result["train_seconds"], "s")
            curves[arm] = [s["curve"] for s in per_seed]
            rows.append(_summary_row(arm, cfg, n_params, per_seed, task, settings))
            for name, values in (("mean", np.mean), ("std", _std)):
                case = dict(_case(task, arm, cfg, "all", settings), statistic=name)
                _record(records, case, task.metric, float(values([s["val"] for s in per_seed])), task.unit)
        tables[task_name] = rows
        figures[task_name] = {"curves": curves, "fits": fits, "task": task, "rows": rows}
        print_task_table(task, rows, settings)
        if "dense" in fits:
            from rt_numpy import compare_plots

            dense_fit, dense_cfg, x, _ = fits["dense"]
            shares = compare_plots.mass_recall(dense_fit, dense_cfg, x,
                                               {arm: settings.config(task_name, arm) for arm in fits})
            figures[task_name]["mass_recall"] = shares
            for arm, share in shares.items():
                _record(records, _case(task, arm, settings.config(task_name, arm), settings.seeds[0], settings),
                        "attention_mass_recall", share, "fraction")
            print("attention-mass recall on the trained dense model (seed "
                  f"{settings.seeds[0]}): " + ", ".join(f"{a} {v:.3f}" for a, v in shares.items()))
        write_json(json_path, records, machine)
    if out_dir:
        from rt_numpy import compare_plots

        compare_plots.draw_all(figures, settings, out_dir, log=log)
    return records, tables, machine


def _std(values):
    """Sample standard deviation over seeds (0 for a single seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _case(task, arm, cfg, seed, settings):
    """The record's case: ``task`` is the task object (its name and the sha256 of its data)."""
    return {"task": task.name, "arm": arm, "T": cfg.seq_len, "H": cfg.num_heads, "D": cfg.head_dim,
            "K": cfg.num_clusters, "W": cfg.window_size, "L": cfg.block_size, "C": cfg.width,
            "layers": cfg.n_layers, "N": settings.steps[task.name], "seed": seed, "data_sha256": task.sha256}


def _record(records, case, metric, value, unit):
    records.append({"impl": IMPL, "case": case, "metric": metric, "value": float(value), "unit": unit})


def _summary_row(arm, cfg, n_params, per_seed, task, settings):
    vals = [s["val"] for s in per_seed]
    row = {"arm": arm, "params": n_params, "keys_nominal": nominal_keys(cfg),
           "keys_all": float(np.mean([s["keys_all"] for s in per_seed])),
           "keys_own": float(np.mean([s["keys_own"] for s in per_seed])), "val_mean": float(np.mean(vals)),
           "val_std": _std(vals), "tokens_per_s": float(np.median([s["tokens_per_s"] for s in per_seed])),
           "seconds": float(np.median([s["seconds"] for s in per_seed])), "seeds": len(per_seed)}
    if "test" in per_seed[0]:
        tests = [s["test"] for s in per_seed]
        row.update(test_mean=float(np.mean(tests)), test_std=_std(tests))
    if "cells" in per_seed[0]:
        row["cells"] = {cell: (float(np.mean([s["cells"][cell] for s in per_seed])),
                               _std([s["cells"][cell] for s in per_seed])) for cell in per_seed[0]["cells"]}
    return row


def print_task_table(task, rows, settings):
    """arm x metric, mean +- std over seeds, with parameters, keys per query, tokens/s and time."""
    headers = ["arm", "params", "keys/query: formula", "measured (arm's heads)", "(all heads)",
               f"held-out {task.unit}"]
    if task.name == "text":
        headers.append("test bits/byte")
    if task.name == "recall":
        headers += [f"acc P={p} d={d}" for p, d in task.grid]
    headers += ["tokens/s", "train s"]
    lines = []
    for r in rows:
        line = [r["arm"], f"{r['params']:,}", f"{r['keys_nominal']:.1f}", f"{r['keys_own']:.1f}",
                f"{r['keys_all']:.1f}", f"{r['val_mean']:.3f} ± {r['val_std']:.3f}"]
        if "test_mean" in r:
            line.append(f"{r['test_mean']:.3f} ± {r['test_std']:.3f}")
        if "cells" in r:
            line += [f"{m:.2f} ± {s:.2f}" for m, s in r["cells"].values()]
        line += [f"{r['tokens_per_s']:.0f}", f"{r['seconds']:.0f}"]
        lines.append(line)
    print(f"\n{task.name} ({len(settings.seeds)} seeds, {settings.steps[task.name]} steps; {task.provenance})")
    print_table(headers, lines)


def print_table(headers, rows):
    """Print rows (lists of strings) under headers as a Markdown table (bench/ prints its tables so too)."""
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    fmt = "| " + " | ".join(f"{{:{w}}}" for w in widths) + " |"
    print(fmt.format(*headers))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(fmt.format(*r))


def machine_line():
    import numba

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, NumPy {np.__version__}, Numba {numba.__version__}")


def check_budgets(tables, tolerance=0.10, key="keys_nominal"):
    """Equal parameter counts, and keys per query (``key``: the formula, or ``"keys_own"`` measured)
    within ``tolerance`` of the local arm's, dense excepted.  Returns the problems found (a list of lines).
    """
    problems = []
    for task, rows in tables.items():
        if len({r["params"] for r in rows}) != 1:
            problems.append(f"{task}: parameter counts differ: {[(r['arm'], r['params']) for r in rows]}")
        ref = next((r[key] for r in rows if r["arm"] == "local"), None)
        for r in rows:
            if ref is not None and r["arm"] != "dense" and abs(r[key] / ref - 1) > tolerance:
                problems.append(f"{task}: {r['arm']} sees {r[key]:.1f} keys per query ({key}), local {ref:.1f}")
    return problems


def write_json(path, records, machine):
    """The records in the bench format, with the machine, atomically (nothing half-written)."""
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
    os.replace(tmp, path)
    print(f"wrote {len(records)} records to {path} ({machine})")


def main(argv=None):
    """``python -m rt_numpy.compare`` and ``bench/compare.py``: the same as ``python -m rt_numpy compare``."""
    from rt_numpy import runtime

    runtime.configure_process()  # this process is ours (docs/design.md#process-wide-settings)
    p = argparse.ArgumentParser(prog="rt_numpy compare", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def add_arguments(p):
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {TASKS}")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {ARMS}")
    p.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...); default 3")
    p.add_argument("--steps", type=int, help="training steps of every task")
    p.add_argument("--seq-len", dest="seq_len", type=int, help="T of every task")
    p.add_argument("--window", type=int, help="W of routing and strided heads (LSH chunks: W / 2)")
    p.add_argument("--block", type=int, help="L of the local heads")
    p.add_argument("--clusters", type=int, help="K (default: T / W, rounded to an even number)")
    p.add_argument("--batch-size", dest="batch_size", type=int, help="sequences per step (default 4)")
    p.add_argument("--quick", action="store_true", help="tiny models, 3 steps: a smoke test, no claim")
    p.add_argument("--json", metavar="PATH", help="write the records as JSON (after each task)")
    p.add_argument("--out", default="runs/compare", help="directory of the plots ('' for none)")


def run_from_args(args):
    settings = Settings(**QUICK) if args.quick else Settings()
    changes = {}
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    if args.steps is not None:
        changes["steps"] = {t: args.steps for t in TASKS}
    if args.seq_len is not None:
        changes["seq_len"] = {t: args.seq_len for t in TASKS}
    if args.window is not None:
        changes["window_size"] = args.window
    if args.block is not None:
        changes["block_size"] = args.block
    if args.clusters is not None:
        changes["num_clusters"] = args.clusters
    if args.batch_size is not None:
        changes["batch_size"] = args.batch_size
    settings = dataclasses.replace(settings, **changes)
    tasks = _names("tasks", args.tasks, TASKS)
    arms = _names("arms", args.arms, ARMS)
    _check_before_training(settings, tasks, arms)
    print(f"machine: {machine_line()}")
    print(f"settings: {settings}")
    start = time.perf_counter()
    records, tables, machine = run(tasks, arms, settings, out_dir=args.out or None, json_path=args.json)
    problems = check_budgets(tables)
    for problem in problems:
        print(f"budget by the formulas: {problem}")
    for problem in check_budgets(tables, key="keys_own"):
        print(f"budget as measured (differs by more than 10%): {problem}")
    print(f"whole comparison: {time.perf_counter() - start:.0f} s")
    return 1 if problems else 0  # the exit status: 1 when the arms' budgets by the formulas disagree


def _check_before_training(settings, tasks, arms):
    """Every model and training config of the run, built once before any training: a bad option fails now."""
    try:
        for name in ("window_size", "block_size", "batch_size", "num_heads"):
            if getattr(settings, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(settings, name)}")
        if not settings.seeds:
            raise ValueError(f"seeds must be at least 1, got {len(settings.seeds)}")
        if "images" in tasks and settings.seq_len["images"] % 128:
            raise ValueError(f"images need seq_len a multiple of 128, got {settings.seq_len['images']}")
        for task in tasks:
            settings.train_config(task, 0)
            for arm in arms:
                settings.config(task, arm)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"rt_numpy compare: error: {e}") from None


def _names(what, text, allowed):
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SystemExit(f"--{what} must name some of {allowed}, got {text!r}")
    return names


if __name__ == "__main__":
    raise SystemExit(main())
