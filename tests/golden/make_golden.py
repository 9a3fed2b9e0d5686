"""Make the golden vectors in tests/golden/ from rt_numpy's reference path (official conventions).

    python tests/golden/make_golden.py          # rewrite the .npz files next to this script
    python tests/golden/make_golden.py --check  # recompute and compare, write nothing

Each file holds its inputs (drawn here from seeded generators) and the outputs
rt_numpy computes from them; README.md in this folder describes every array.
tests/test_golden.py recomputes the outputs from the stored inputs with
:func:`compute` and compares.  Everything is float64 on ``impl="ref"``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from autograd import grad

from rt_numpy import attention, crosscheck, kmeans, model, ops

HERE = Path(__file__).resolve().parent
B, H, T, D, K, W = 2, 2, 8, 4, 3, 3  # routing and k-means cases
LOCAL = {"block_size": 4, "look_back": 1}  # local attention: T = 8 is two blocks
LAYER = {"num_heads": 2, "n_route_heads": 0, "block_size": 4, "look_back": 1}  # width C = 8
LM = model.Config(vocab_size=16, seq_len=8, width=8, n_layers=2, num_heads=2, n_route_heads=1, n_route_layers=1,
                  num_clusters=2, window_size=4, block_size=4, ff_mult=2, dtype="float64")
UPDATE = {"centroid_update": "ema", "ema_decay": 0.999, "laplace_eps": 1e-5, "norm": "ln"}


def _normal(rng, *shape):
    return rng.standard_normal(shape)


# --------------------------------------------------------------------------- inputs
def make_inputs():
    """Inputs of every golden file, from fixed seeds: {file name: {array name: array}}."""
    rng = np.random.default_rng(20261128)
    files = {}

    # 1. one k-means EMA step from a state that has already seen data (queries and keys, two streams)
    means = kmeans.normalize(_normal(rng, H, K, D), "ln")
    counts = rng.uniform(0.5, 3.0, (H, K))
    files["kmeans_update"] = {"q": _normal(rng, B, H, T, D), "k": _normal(rng, B, H, T, D), "means": means,
                              "state_counts": counts, "state_sums": means * counts[..., None]}

    # 2-3. routing attention, shared and separate QK (crosscheck.reference names)
    for name in ("routing_attention_shared_qk", "routing_attention_separate_qk"):
        files[name] = {"q": _normal(rng, B, H, T, D), "k": _normal(rng, B, H, T, D), "v": _normal(rng, B, H, T, D),
                       "means": kmeans.normalize(_normal(rng, H, K, D), "ln"), "upstream": _normal(rng, B, H, T, D)}
        if name.endswith("shared_qk"):
            del files[name]["k"]

    # 4. local attention: the function on (B, H, T, D) and a whole layer on (B, T, C)
    C = LAYER["num_heads"] * D
    files["local_attention"] = {
        "q": _normal(rng, B, H, T, D), "k": _normal(rng, B, H, T, D), "v": _normal(rng, B, H, T, D),
        "upstream": _normal(rng, B, H, T, D),
        "x": _normal(rng, B, T, C), "w_q": 0.3 * _normal(rng, C, C), "w_v": 0.3 * _normal(rng, C, C),
        "w_o": 0.3 * _normal(rng, C, C), "layer_upstream": _normal(rng, B, T, C)}

    # 5. a tiny language model: parameters, k-means centroids, one batch
    params = model.init_params(LM, rng)
    params = {n: p + 0.1 * _normal(rng, *p.shape) for n, p in params.items()}  # no zero biases or unit gains
    states = model.init_kmeans(LM, rng)
    ids = rng.integers(0, LM.vocab_size, (2, LM.seq_len + 1))
    lm = {f"param.{n}": p for n, p in params.items()}
    lm.update({f"kmeans.{layer}.means": s["means"] for layer, s in states.items()})
    lm.update(ids=ids[:, :-1], targets=ids[:, 1:])
    files["tiny_lm"] = lm
    return files


# --------------------------------------------------------------------------- outputs
def compute(name, inputs):
    """The outputs of golden file ``name`` from its ``inputs`` (rt_numpy's reference path)."""
    return {"kmeans_update": _kmeans_update, "routing_attention_shared_qk": _routing,
            "routing_attention_separate_qk": _routing, "local_attention": _local,
            "tiny_lm": _tiny_lm}[name](inputs)


def _kmeans_update(x):
    streams = [kmeans.normalize(x["q"], "ln"), kmeans.normalize(x["k"], "ln")]
    stats = kmeans.cluster_stats(streams, x["means"], impl="ref")
    state = {"means": x["means"], "counts": x["state_counts"], "sums": x["state_sums"]}
    new = kmeans.update_state(state, stats, **UPDATE)
    return {"q_normalized": streams[0], "k_normalized": streams[1], "assignments": stats["assignments"],
            "cluster_counts": stats["counts"], "cluster_sums": stats["sums"], "new_means": new["means"],
            "new_counts": new["counts"], "new_sums": new["sums"],
            "commitment": np.asarray(kmeans.commitment_loss(streams, x["means"], commitment=1e-4, commitment_qk="sum"))}


def _routing(x):
    shared = "k" not in x
    result = crosscheck.reference(x["q"], x.get("k"), x["v"], x["means"], window_size=W, upstream=x["upstream"],
                                  shared_qk=shared, **crosscheck.official_conventions())
    return {n: a for n, a in result.items() if n not in x}


def _local(x):
    def local(q, k, v):
        return attention.local_attention(q, k, v, **LOCAL)

    def objective(q, k, v):
        return ops.sum(ops.multiply(local(q, k, v), x["upstream"]))

    gq, gk, gv = grad(objective, (0, 1, 2))(x["q"], x["k"], x["v"])
    weights = ("x", "w_q", "w_v", "w_o")

    def layer(inp, w_q, w_v, w_o):
        y, _, _ = attention.multihead_attention(inp, {"w_q": w_q, "w_v": w_v, "w_o": w_o}, None, impl="ref",
                                                **LAYER)
        return y

    def layer_objective(*args):
        return ops.sum(ops.multiply(layer(*args), x["layer_upstream"]))

    layer_grads = grad(layer_objective, (0, 1, 2, 3))(*(x[n] for n in weights))
    result = {"out": local(x["q"], x["k"], x["v"]), "grad_q": gq, "grad_k": gk, "grad_v": gv,
              "layer_out": layer(*(x[n] for n in weights))}
    result.update({f"layer_grad_{n}": g for n, g in zip(weights, layer_grads)})
    return result


def _tiny_lm(x):
    params = {n[len("param."):]: a for n, a in x.items() if n.startswith("param.")}
    states = {n.split(".")[1]: kmeans.state_from_means(a) for n, a in x.items() if n.startswith("kmeans.")}

    def total(p):
        return model.loss(p, x["ids"], x["targets"], LM, states, impl="ref")[0]

    grads = grad(total)(params)
    value, aux = model.loss(params, x["ids"], x["targets"], LM, states, impl="ref")
    logits, _ = model.forward(params, x["ids"], LM, states, impl="ref")
    new_states = model.update_kmeans(LM, states, aux["stats"])
    result = {"logits": logits, "loss": np.asarray(value), "cross_entropy": np.asarray(aux["cross_entropy"]),
              "commitment": np.asarray(aux["commitment"])}
    result.update({f"grad.{n}": g for n, g in grads.items()})
    result.update({f"kmeans.{layer}.new_means": s["means"] for layer, s in new_states.items()})
    return result


def options(name):
    """The options of golden file ``name``, stored in it as JSON (array ``options``)."""
    common = {"dtype": "float64", "impl": "ref", "rt_numpy_conventions": "official (the defaults)"}
    if name == "kmeans_update":
        return {**common, "norm": "ln", "streams": ["q", "k"], "commitment": 1e-4, "commitment_qk": "sum", **UPDATE}
    if name.startswith("routing_attention"):
        return {**common, "note": "crosscheck.reference; the full options are in the array 'options'"}
    if name == "local_attention":
        return {**common, **LOCAL, "scale": "1/sqrt(D)", "self_attend": "allow", "layer": LAYER}
    return {**common, "config": LM.to_dict(), "loss": "mean cross-entropy (nats) + commitment"}


def build():
    """Every golden file's arrays: inputs, outputs and an ``options`` JSON string."""
    files = {}
    for name, inputs in make_inputs().items():
        outputs = compute(name, inputs)
        arrays = {**inputs, **{n: np.asarray(a) for n, a in outputs.items()}}
        if "options" not in arrays:
            arrays["options"] = np.array(json.dumps(options(name), sort_keys=True))
        files[name] = arrays
    return files


def _write(path, arrays):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored files, write nothing")
    args = parser.parse_args(argv)
    worst = 0.0
    for name, arrays in build().items():
        path = HERE / f"{name}.npz"
        if args.check:
            with np.load(path, allow_pickle=False) as stored:
                errors = crosscheck.compare({n: stored[n] for n in stored.files}, arrays)
            worst = max([worst, *errors.values()])
            print(f"{path.name}: worst relative error {max(errors.values()):.2e}")
        else:
            _write(path, arrays)
            print(f"wrote {path.relative_to(HERE.parent.parent)} ({path.stat().st_size} bytes, {len(arrays)} arrays)")
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
