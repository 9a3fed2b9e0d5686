"""Benchmark: associative recall beyond the local window, routing model vs local-only model.

    python bench/recall.py [--json PATH] [--quick] [--steps N] [--seed S] ...

Task (``rt_numpy.data.recall_task``): each row starts with ``n_pairs`` key/value
records, then random filler, then the same records again in a random order; the
model must predict each queried value byte, which it saw ``distance`` or more
positions earlier.  A local head sees at most ``block_size * (look_back + 1)``
tokens (its window); ``distance`` is set to at least 4 times that window, so the
earlier record is out of reach of the local heads (also of two stacked local
layers, whose receptive field is at most twice the window).

Two models of the same size (the same parameters: routing adds only k-means
centroids, which are not parameters) are trained on fresh random batches from a
seeded generator, with ``impl="auto"``:

* ``routing``: the last layer has ``n_route_heads`` routing heads (shared QK,
  balanced membership, EMA k-means: the official defaults).  The circuit it can
  learn is an induction head: layer 1 (local) lets each value token know the key
  just before it; the routing layer puts the query and that earlier value token
  in one cluster and matches them by content inside it, copying the value.
* ``local``: the same Config with ``n_route_heads=0``.

Training choices (defaults), each needed to learn the task in a few minutes of CPU:

* ``--loss answers``: the cross-entropy of the answers only (the masked value
  bytes), as associative-recall benchmarks do: ``rt_numpy.train.train_step``
  with ``mask`` (clipping, AdamW, warm-up + cosine, k-means update after the
  step).  ``--loss all`` runs it without a mask, on every next byte: there the
  answers are 16 of 128 targets, the rest random filler, and the model stayed
  at chance for 3000 steps.
* ``--init-std 0.1``: every weight matrix of ``model.init_params`` (GPT-2's 0.02)
  is multiplied by 5.  With 0.02 the routing model stayed at chance for 1500
  steps, and a PyTorch replica with dense attention was below 40% after 3000 to
  9000 steps; with 0.1 the replica learns in ~500 steps.
* ``--lr 1e-3`` (3e-3 plateaued near 40% in the replica).
* ``--clusters 2 --window 64`` (K W = T): each query sees at most half the
  sequence.  With K=4, W=32 the query and its target shared a cluster for only
  ~7% of the answers and accuracy stayed at chance: a pair can only learn to
  match when it is already routed together.
* ``--blas-threads 1``: on a busy 2-core machine two OpenBLAS threads made a
  step ~10x slower.

Accuracy is ``rt_numpy.data.recall_accuracy`` (argmax of the logits) on the
masked value positions of held-out batches drawn from another seed; chance is
1 / (number of possible values) = 1/10.  For the routing model the log also shows
the fraction of answers whose query position shares a cluster with its target
(any routing head; only then can it attend to it).  ``--quick`` is a smoke test
(tiny model, a few steps): it makes no accuracy claim.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

import rt_numpy  # noqa: F401  (before NumPy: it sets OPENBLAS_THREAD_TIMEOUT, see rt_numpy/__init__.py)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from autograd.tracer import getval  # noqa: E402
from common import machine_line, print_table, record, write_json  # noqa: E402

from rt_numpy import attention, data, kmeans, model, optim, train  # noqa: E402

IMPL = "rt_numpy-numba"
EVAL_SEED_OFFSET = 10_000  # held-out batches come from seed + this: never the training stream


def local_window(cfg):
    """Tokens a local head can see: its own block and ``look_back`` previous ones."""
    return cfg.block_size * (cfg.look_back + 1)


def task_kwargs(args, cfg):
    distance = args.distance if args.distance else args.distance_factor * local_window(cfg)
    return {"n_pairs": args.n_pairs, "key_len": args.key_len, "value_len": args.value_len, "distance": distance}


def evaluate(params, kmeans_states, cfg, task, *, batches, batch_size, seed):
    """Held-out accuracy on the answers over ``batches`` batches drawn from ``seed``, and for a
    routing model the fraction of answers whose query shares a cluster with its target (else None)."""
    rng = np.random.default_rng(seed)
    hits, shared, count = 0.0, 0.0, 0
    for _ in range(batches):
        x, y, mask = data.recall_task(batch_size, cfg.seq_len, rng=rng, **task)
        logits, _ = model.forward(params, x, cfg, kmeans_states, impl="auto")
        n = int(mask.sum())
        hits += data.recall_accuracy(np.asarray(logits), y, mask) * n
        if cfg.n_route_heads:
            shared += co_routing(params, kmeans_states, cfg, x, mask, task) * n
        count += n
    return hits / count, (shared / count if cfg.n_route_heads else None)


def recall_targets(x, mask, n_pairs, key_len, value_len):
    """For every answer position i (``mask``), the position j of the same value byte in the first records.

    A query record starting at ``qs`` asks for the earlier record ``p`` with the same key; the answer
    at ``i`` (``y[i]`` is a value byte) is found at ``x[j]`` with ``j = p * R + (i - qs) + 1``.
    Returns two int arrays (N,) of flat indices b * T + i and b * T + j, in mask order.
    """
    B, T = x.shape
    R = key_len + value_len
    Q = T + 1 - n_pairs * R  # first position of the queries in s (and in x)
    rows, cols = np.nonzero(mask)  # (N,) each, row-major
    targets = np.empty_like(cols)
    for n, (b, i) in enumerate(zip(rows, cols)):
        qs = Q + ((i - Q) // R) * R  # start of this query record
        key = x[b, qs:qs + key_len]
        firsts = x[b, :n_pairs * R].reshape(n_pairs, R)[:, :key_len]  # (P, key_len) keys of the records
        p = int(np.flatnonzero((firsts == key).all(axis=1))[0])
        targets[n] = p * R + (i - qs) + 1
    return rows * T + cols, rows * T + targets


def co_routing(params, kmeans_states, cfg, x, mask, task):
    """Fraction of answers whose query position shares a cluster with its target (last routing layer).

    Query i and target j share a cluster when some routing head has a cluster whose query window
    holds i and whose key window holds j: only then can i attend to j.  Diagnostic only: it spies
    on ``attention.routing_attention`` during one forward pass to read the routed vectors.
    """
    seen = []
    original = attention.routing_attention

    def spy(q, k, v, means, **kw):
        seen.append((getval(q), getval(k), getval(means), kw))
        return original(q, k, v, means, **kw)

    attention.routing_attention = spy
    try:
        model.forward(params, x, cfg, kmeans_states, impl="auto")
    finally:
        attention.routing_attention = original
    q, k, means, kw = seen[-1]
    B, Hr, T, _ = q.shape
    qn = kmeans.normalize(q, kw["norm"])
    kn = qn if kw["shared_qk"] else kmeans.normalize(k, kw["norm"])
    if kw["membership"] == "nearest":
        member_q = kmeans.nearest(qn, means)[..., None, :] == np.arange(means.shape[1])[:, None]  # (B,Hr,K,T)
        member_k = kmeans.nearest(kn, means)[..., None, :] == np.arange(means.shape[1])[:, None]
    else:
        member_q = np.zeros((B, Hr, means.shape[1], T), bool)
        member_k = np.zeros_like(member_q)
        np.put_along_axis(member_q, kmeans.balanced_membership(qn, means, kw["window_size"]), True, axis=-1)
        np.put_along_axis(member_k, kmeans.balanced_membership(kn, means, kw["window_size"]), True, axis=-1)
    qi, kj = recall_targets(x, mask, task["n_pairs"], task["key_len"], task["value_len"])
    mq = member_q.transpose(0, 3, 1, 2).reshape(B * T, -1)  # (B*T, Hr*K)
    mk = member_k.transpose(0, 3, 1, 2).reshape(B * T, -1)
    return float((mq[qi] & mk[kj]).any(axis=1).mean())


GPT2_STD = 0.02  # the std of model.init_params


def scale_init(params, init_std):
    """Multiply every weight matrix (ndim >= 2) by ``init_std / 0.02``; gains and biases are kept.

    ``model.init_params`` draws GPT-2's N(0, 0.02^2) (residual projections / sqrt(2 n_layers));
    this keeps its shape and only changes the scale.
    """
    factor = init_std / GPT2_STD
    return {k: (v * np.asarray(factor, dtype=v.dtype) if v.ndim >= 2 else v) for k, v in params.items()}


def train_model(name, cfg, tcfg, task, args, log=print):
    """Train one model on fresh recall batches; returns a dict of results."""
    rng = np.random.default_rng(tcfg.seed)
    params = scale_init(model.init_params(cfg, rng), args.init_std)
    kmeans_states = model.init_kmeans(cfg, rng)
    opt_state = optim.adamw_init(params)
    data_rng = np.random.default_rng(tcfg.seed + 1)
    n_params = sum(int(np.asarray(v).size) for v in params.values())
    start = time.perf_counter()
    step, ce = 0, float("nan")
    for step in range(1, tcfg.steps + 1):
        x, y, mask = data.recall_task(tcfg.batch_size, cfg.seq_len, rng=data_rng, **task)
        if args.loss == "answers":
            params, opt_state, kmeans_states, metrics = train.train_step(
                params, opt_state, kmeans_states, x, y, cfg, tcfg, step - 1, rng, impl="auto", mask=mask)
        else:
            params, opt_state, kmeans_states, metrics = train.train_step(
                params, opt_state, kmeans_states, x, y, cfg, tcfg, step - 1, rng, impl="auto")
        ce = metrics["cross_entropy"]
        if args.log_every and (step % args.log_every == 0 or step == tcfg.steps):
            acc, shared = evaluate(params, kmeans_states, cfg, task, batches=2, batch_size=tcfg.batch_size,
                                   seed=tcfg.seed + EVAL_SEED_OFFSET + 1)
            routed = f"  query+target share a cluster {shared:.2f}" if shared is not None else ""
            log(f"  {name:7s} step {step:5d}  loss {ce:.3f}  held-out acc (quick look) {acc:.3f}{routed}  "
                f"{time.perf_counter() - start:6.1f} s")
        if tcfg.time_limit and time.perf_counter() - start > tcfg.time_limit:
            log(f"  {name}: time limit of {tcfg.time_limit:.0f} s reached after {step} steps")
            break
    seconds = time.perf_counter() - start
    acc, shared = evaluate(params, kmeans_states, cfg, task, batches=args.eval_batches,
                           batch_size=args.eval_batch_size, seed=tcfg.seed + EVAL_SEED_OFFSET)
    return {"model": name, "params": n_params, "steps": step, "seconds": seconds, "accuracy": acc,
            "co_routed": shared, "train_loss": ce}


def build_configs(args):
    cfg_route = model.Config(
        vocab_size=256, seq_len=args.seq_len, width=args.width, n_layers=args.layers, num_heads=args.heads,
        n_route_heads=args.route_heads, n_route_layers=args.route_layers, num_clusters=args.clusters,
        window_size=args.window, block_size=args.block, look_back=args.look_back, ff_mult=args.ff_mult,
        shared_qk=not args.separate_qk, pos_encoding=args.pos, ema_decay=args.ema_decay,
        self_attend=args.self_attend, membership=args.membership)
    cfg_local = dataclasses.replace(cfg_route, n_route_heads=0)
    tcfg = train.TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, min_lr=args.lr / 10,
                             warmup_steps=args.warmup, weight_decay=args.weight_decay, grad_clip=1.0,
                             eval_every=0, seed=args.seed, time_limit=args.time_limit)
    return cfg_route, cfg_local, tcfg


QUICK = dict(seq_len=64, width=32, layers=2, heads=4, route_heads=2, clusters=2, window=32, block=4,
             look_back=1, ff_mult=2, steps=40, batch_size=4, n_pairs=2, warmup=5, eval_batches=8,
             eval_batch_size=8, log_every=0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", metavar="PATH", help="write the figures as JSON records")
    p.add_argument("--quick", action="store_true", help="tiny model, a few steps (a smoke test, no claim)")
    p.add_argument("--models", default="routing,local", help="which models to train (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    # task
    p.add_argument("--n-pairs", type=int, default=16)
    p.add_argument("--key-len", type=int, default=1)
    p.add_argument("--value-len", type=int, default=1)
    p.add_argument("--distance-factor", type=int, default=4, help="distance = this x the local window")
    p.add_argument("--distance", type=int, default=0, help="explicit distance (overrides --distance-factor)")
    # model
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--route-heads", type=int, default=2)
    p.add_argument("--route-layers", type=int, default=1)
    p.add_argument("--clusters", type=int, default=2)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--block", type=int, default=8)
    p.add_argument("--look-back", type=int, default=1)
    p.add_argument("--ff-mult", type=int, default=4)
    p.add_argument("--separate-qk", action="store_true", help="shared_qk=False (the official default is shared)")
    p.add_argument("--pos", default="learned", choices=model.POS_ENCODINGS)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--self-attend", default="allow")
    p.add_argument("--membership", default="balanced")
    # training
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--loss", default="answers", choices=("all", "answers"),
                   help="cross-entropy on every next byte (train.train_step) or on the answers only")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--init-std", type=float, default=0.1,
                   help="std of the weight matrices at init (model.init_params draws 0.02; rescaled)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--time-limit", type=float, default=0.0, help="seconds per model (0: none)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=32)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--blas-threads", type=int, default=1,
                   help="BLAS threads (default 1: these matrices are small, and on a busy machine two "
                        "OpenBLAS threads waiting for each other were 10x slower; 0 leaves the default)")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    return args


def limit_blas_threads(n):
    """Limit the BLAS thread pool to ``n`` threads (threadpoolctl); returns the limiter or None."""
    if n <= 0:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        print(f"threadpoolctl not installed: BLAS threads not limited (set OPENBLAS_NUM_THREADS={n})")
        return None
    return threadpool_limits(limits=n, user_api="blas")


def main(argv=None):
    args = parse_args(argv)
    limiter = limit_blas_threads(args.blas_threads)  # noqa: F841 (kept alive for the whole run)
    machine = machine_line()
    print(f"machine: {machine}")
    cfg_route, cfg_local, tcfg = build_configs(args)
    task = task_kwargs(args, cfg_route)
    window = local_window(cfg_route)
    chance = 1.0 / len(data.VALUE_ALPHABET)  # accuracy is per value byte, each uniform over the digits
    print(f"task: recall, T={cfg_route.seq_len}, {task}; local window {window} tokens "
          f"(block {cfg_route.block_size} x {cfg_route.look_back + 1}), distance/window = "
          f"{task['distance'] / window:.1f}; chance {chance:.3f}")
    print(f"routing model: {cfg_route}")
    print(f"training: {tcfg}")
    configs = {"routing": cfg_route, "local": cfg_local}
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    results = []
    for name in names:
        results.append(train_model(name, configs[name], tcfg, task, args))
    counts = {r["params"] for r in results}
    listed = ", ".join(f"{r['model']} {r['params']:,}" for r in results)
    print(f"parameter counts: {listed}"
          + (" (equal)" if len(counts) == 1 else " (DIFFERENT!)"))
    if len(counts) != 1:
        raise SystemExit("the two models must have the same parameter count")
    case_name = f"recall T={cfg_route.seq_len} dist={task['distance']}"
    rows, records = [], []
    for r in results:
        cfg = configs[r["model"]]
        case = {"task": "recall", "model": r["model"], "T": cfg.seq_len, "distance": task["distance"],
                "local_window": window, "n_pairs": task["n_pairs"], "key_len": task["key_len"],
                "value_len": task["value_len"], "C": cfg.width, "layers": cfg.n_layers, "H": cfg.num_heads,
                "route_heads": cfg.n_route_heads, "route_layers": cfg.n_route_layers if cfg.n_route_heads else 0,
                "K": cfg.num_clusters, "W": cfg.window_size, "shared_qk": cfg.shared_qk,
                "steps": r["steps"], "batch_size": tcfg.batch_size, "seed": tcfg.seed, "quick": bool(args.quick)}
        record(records, IMPL, case, "accuracy", r["accuracy"], "fraction")
        record(records, IMPL, case, "chance", chance, "fraction")
        record(records, IMPL, case, "train_seconds", r["seconds"], "s")
        record(records, IMPL, case, "params", r["params"], "count")
        if r["co_routed"] is not None:
            record(records, IMPL, case, "query_target_share_cluster", r["co_routed"], "fraction")
        rows.append([case_name, r["model"], f"{r['params']:,}", str(r["steps"]), f"{r['seconds']:.1f} s",
                     f"{r['accuracy']:.3f}", f"{chance:.3f}",
                     "-" if r["co_routed"] is None else f"{r['co_routed']:.2f}"])
    print_table(["case", "model", "params", "steps", "train time", "held-out accuracy", "chance",
                 "query+target share a cluster"], rows)
    if args.quick:
        print("(--quick: a smoke test; the accuracies mean nothing)")
    write_json(args.json, records, machine)
    return records


if __name__ == "__main__":
    main()
