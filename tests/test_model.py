"""Tests of rt_numpy.model: the config, the parameters, forward and loss, the k-means bookkeeping.

What is checked (docs/algorithm.md#1-one-routing-head, docs/algorithm.md#4-layers-and-heads,
docs/algorithm.md#6-what-users-ran-into; docs/design.md#tests):

1. every invalid Config field raises a ValueError/TypeError naming the field and the value;
   ``from_dict(to_dict())`` round-trips, unknown keys are refused;
2. parameter names are stable (a fixed list), their count follows the options;
   ``init_params`` has the config's dtype and is a pure function of the seed;
3. forward has shape (B, T, V) for every option combination and for T < seq_len; a model
   without routing heads equals a plain NumPy GPT written here;
4. the whole-model gradient equals finite differences (``check_grads``), the fused Numba path
   gives the reference's loss and gradient;
5. plain gradient descent lowers the loss; ``update_kmeans`` moves the centroids of routing
   layers only; loss = cross-entropy + commitment, the commitment recomputed here by hand;
6. dropout is active only with an rng; bad ids and missing k-means states raise;
7. the PyTorch port's options (``mem_kv``, ``rotary_values``, ``local_qkv_bias``;
   docs/conventions.md#the-language-model-around-it): their checks, their parameters and where
   each acts; a checkpoint written before they existed loads as the official model.  Agreement
   with the port itself is tests/test_port_lm.py.

Everything is float64 on a tiny model unless a test says otherwise.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from autograd import value_and_grad
from autograd.test_util import check_grads

from rt_numpy import attention, backend, optim, train
from rt_numpy import model as M


def tiny(**overrides):
    """The gradient-check size: T=16, C=8, 2 heads (1 routing), K=2, W=4, L=4, routing in the last layer."""
    values = dict(vocab_size=32, seq_len=16, width=8, n_layers=2, num_heads=2, n_route_heads=1,
                  n_route_layers=1, num_clusters=2, window_size=4, block_size=4, ff_mult=2, dtype="float64")
    values.update(overrides)
    return M.Config(**values)


def setup(cfg, seed=0, B=2, T=None):
    rng = np.random.default_rng(seed)
    params, states = M.init_params(cfg, rng), M.init_kmeans(cfg, rng)
    data = rng.integers(0, cfg.vocab_size, (B, (T or cfg.seq_len) + 1))
    return params, states, data[:, :-1], data[:, 1:]


# ------------------------------------------------------------------------------ 1. Config
BAD_FIELDS = [  # (field, bad value, exception); every other field at its default
    ("vocab_size", 0, ValueError), ("vocab_size", 2.0, TypeError), ("seq_len", 0, ValueError),
    ("seq_len", True, TypeError), ("width", -8, ValueError), ("n_layers", 0, ValueError),
    ("num_heads", 0, ValueError), ("num_clusters", 0, ValueError), ("window_size", 0, ValueError),
    ("block_size", 0, ValueError), ("ff_mult", 0, ValueError), ("look_back", -1, ValueError),
    ("n_route_heads", -1, ValueError), ("n_route_layers", -1, ValueError), ("n_route_layers", 1.5, TypeError),
    ("width", 130, ValueError),  # not a multiple of num_heads=4
    ("n_route_heads", 5, ValueError),  # > num_heads=4
    ("n_route_layers", 3, ValueError),  # > n_layers=2
    ("seq_len", 200, ValueError),  # not a multiple of block_size=64
    ("window_size", 512, ValueError),  # > seq_len=256
    ("pos_encoding", "absolute", ValueError), ("norm", "l1", ValueError), ("logits", "raw", ValueError),
    ("membership", "greedy", ValueError), ("self_attend", "never", ValueError), ("commitment_qk", "max", ValueError),
    ("centroid_update", "sgd", ValueError), ("dtype", "float16", ValueError), ("dtype", np.float32, ValueError),
    ("shared_qk", 1, TypeError), ("tie_embeddings", "yes", TypeError),
    ("dropout", 1.0, ValueError), ("dropout", -0.1, ValueError), ("dropout", "0.1", TypeError),
    ("ema_decay", 1.0, ValueError), ("ema_decay", -0.5, ValueError),
    ("commitment", -1e-4, ValueError), ("commitment", math.inf, ValueError), ("commitment", math.nan, ValueError),
    ("combine_eps", 0.0, ValueError), ("combine_eps", math.inf, ValueError), ("combine_eps", True, TypeError),
    ("mem_kv", 1, TypeError), ("rotary_values", "yes", TypeError), ("local_qkv_bias", None, TypeError),
    ("mem_kv", True, ValueError),  # needs shared_qk=False (the default is True)
    ("rotary_values", True, ValueError),  # needs pos_encoding="rotary" (the default is "learned")
]


@pytest.mark.parametrize("field, value, error", BAD_FIELDS)
def test_config_rejects_bad_field_naming_it(field, value, error):
    with pytest.raises(error) as info:
        M.Config(**{field: value})
    message = str(info.value)
    assert field in message
    assert repr(value) in message or str(value) in message


def test_config_rotary_needs_even_head_dim():
    with pytest.raises(ValueError, match=r"pos_encoding='rotary'.*= 3"):
        M.Config(width=12, num_heads=4, pos_encoding="rotary")
    M.Config(width=12, num_heads=4)  # learned positions do not care


def test_config_defaults_are_valid_and_frozen():
    cfg = M.Config()
    assert cfg.head_dim == cfg.width // cfg.num_heads
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.width = 64


def test_config_dict_round_trip_through_json():
    cfg = tiny(pos_encoding="rotary", shared_qk=False, tie_embeddings=False, dropout=0.25, norm="l2",
               membership="nearest", commitment=0.5)
    assert M.Config.from_dict(cfg.to_dict()) == cfg
    assert M.Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_config_from_dict_rejects_unknown_keys():
    values = M.Config().to_dict()
    values["n_embd"] = 128
    with pytest.raises(ValueError, match="n_embd"):
        M.Config.from_dict(values)


def test_routing_layers_are_the_last_ones():
    cfg = tiny(n_layers=4, n_route_layers=2)
    assert [cfg.is_routing_layer(i) for i in range(4)] == [False, False, True, True]
    assert not any(tiny(n_route_heads=0).is_routing_layer(i) for i in range(2))
    assert not any(tiny(n_route_layers=0).is_routing_layer(i) for i in range(2))


# ------------------------------------------------------------------------------ 2. parameters
def test_param_names_are_stable():
    cfg = tiny()  # learned positions, shared QK, tied embeddings
    layer = ["ln1.g", "ln1.b", "attn.w_q", "attn.w_v", "attn.w_o", "ln2.g", "ln2.b",
             "mlp.w_in", "mlp.b_in", "mlp.w_out", "mlp.b_out"]
    expected = ["wte", "wpe"] + [f"h{i}.{n}" for i in range(2) for n in layer] + ["ln_f.g", "ln_f.b"]
    assert list(M.param_shapes(cfg)) == expected
    shapes = M.param_shapes(cfg)
    assert shapes["wte"] == (32, 8) and shapes["wpe"] == (16, 8)
    assert shapes["h1.attn.w_q"] == (8, 8) and shapes["h0.mlp.w_in"] == (8, 16) and shapes["h0.mlp.b_in"] == (16,)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_param_count_follows_options(pos_encoding, shared_qk, tie):
    cfg = tiny(n_layers=3, pos_encoding=pos_encoding, shared_qk=shared_qk, tie_embeddings=tie)
    names = list(M.param_shapes(cfg))
    per_layer = 11 + (0 if shared_qk else 1)
    assert len(names) == 1 + (pos_encoding == "learned") + 3 * per_layer + 2 + (not tie)
    assert ("wpe" in names) == (pos_encoding == "learned")
    assert ("lm_head" in names) == (not tie)
    assert ("h2.attn.w_k" in names) == (not shared_qk)
    C, V = cfg.width, cfg.vocab_size
    n_numbers = sum(math.prod(s) for s in M.param_shapes(cfg).values())
    F = cfg.ff_mult * C
    per_layer_numbers = 4 * C + (3 if shared_qk else 4) * C * C + 2 * C * F + F + C
    assert n_numbers == V * C + (pos_encoding == "learned") * cfg.seq_len * C + 3 * per_layer_numbers + 2 * C \
        + (not tie) * C * V


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_init_params_dtype_shapes_and_values(dtype):
    cfg = tiny(dtype=dtype, width=64, num_heads=4, ff_mult=4, vocab_size=256)
    params = M.init_params(cfg, np.random.default_rng(0))
    assert list(params) == list(M.param_shapes(cfg))
    for name, value in params.items():
        assert value.dtype == np.dtype(dtype), name
        assert value.shape == M.param_shapes(cfg)[name], name
    assert np.all(params["ln_f.g"] == 1) and np.all(params["h0.mlp.b_in"] == 0)
    assert abs(params["wte"].std() - 0.02) < 0.002  # 16k draws
    assert abs(params["h0.mlp.w_out"].std() - 0.02 / math.sqrt(2 * cfg.n_layers)) < 0.002


def test_init_params_is_a_function_of_the_seed():
    cfg = tiny()
    a, b = M.init_params(cfg, np.random.default_rng(7)), M.init_params(cfg, np.random.default_rng(7))
    c = M.init_params(cfg, np.random.default_rng(8))
    assert all(np.array_equal(a[n], b[n]) for n in a)
    assert not np.array_equal(a["wte"], c["wte"])
    with pytest.raises(TypeError, match="rng"):
        M.init_params(cfg, 7)


def test_init_kmeans_has_one_state_per_routing_layer():
    cfg = tiny(n_layers=3, n_route_layers=2, n_route_heads=1, num_clusters=3)
    states = M.init_kmeans(cfg, np.random.default_rng(0))
    assert sorted(states) == ["h1", "h2"]
    for state in states.values():
        assert state["means"].shape == (1, 3, cfg.head_dim) and state["means"].dtype == np.float64
        assert np.isfinite(state["means"]).all()
    assert M.init_kmeans(tiny(n_route_heads=0), np.random.default_rng(0)) == {}


# ------------------------------------------------------------------------------ 3. forward
@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_forward_shapes(pos_encoding, shared_qk, tie):
    cfg = tiny(pos_encoding=pos_encoding, shared_qk=shared_qk, tie_embeddings=tie)
    params, states, ids, _ = setup(cfg, B=3)
    logits, aux = M.forward(params, ids, cfg, states, impl="ref")
    assert logits.shape == (3, cfg.seq_len, cfg.vocab_size) and logits.dtype == np.float64
    assert np.isfinite(logits).all()
    assert sorted(aux["stats"]) == ["h1"] and float(aux["commitment"]) > 0
    streams = 1 if shared_qk else 2
    assert aux["stats"]["h1"]["counts"].shape == (streams, 1, cfg.num_clusters)
    assert aux["stats"]["h1"]["counts"].sum() == streams * 3 * cfg.seq_len  # every token assigned once


@pytest.mark.parametrize("T", [4, 8, 12])
@pytest.mark.parametrize("membership", ["balanced", "nearest"])
def test_forward_shorter_than_seq_len(T, membership):
    cfg = tiny(membership=membership)
    params, states, ids, _ = setup(cfg, T=T)
    logits, _ = M.forward(params, ids, cfg, states, impl="ref")
    assert logits.shape == (2, T, cfg.vocab_size) and np.isfinite(logits).all()


def test_forward_float32():
    cfg = tiny(dtype="float32")
    params, states, ids, targets = setup(cfg)
    logits, aux = M.forward(params, ids, cfg, states)
    assert logits.dtype == np.float32
    total, _ = M.loss(params, ids, targets, cfg, states)
    assert abs(float(total) - math.log(cfg.vocab_size)) < 0.1  # small init: nearly uniform


def _gpt_reference(params, ids, cfg):
    """A plain NumPy GPT: what the model must be without routing heads and with one local block."""
    def layer_norm(x, g, b, eps=1e-5):
        xc = x - x.mean(-1, keepdims=True)
        return xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + eps) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    B, T = ids.shape
    H, D = cfg.num_heads, cfg.head_dim
    t = np.arange(T)
    angles = t[:, None] * 10000.0 ** (-np.arange(D // 2) * 2.0 / D)  # (T, D/2)
    cos, sin = np.cos(angles), np.sin(angles)

    def rotate(x):  # (B, H, T, D), pairs (d, d + D/2)
        a, b = x[..., :D // 2], x[..., D // 2:]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    x = params["wte"][ids] + (params["wpe"][:T] if cfg.pos_encoding == "learned" else 0)
    for i in range(cfg.n_layers):
        p = {k[len(f"h{i}."):]: v for k, v in params.items() if k.startswith(f"h{i}.")}
        h = layer_norm(x, p["ln1.g"], p["ln1.b"])
        heads = {w: (h @ p["attn." + w]).reshape(B, T, H, D).transpose(0, 2, 1, 3)
                 for w in ("w_q", "w_k", "w_v") if "attn." + w in p}
        q, v = heads["w_q"], heads["w_v"]
        k = heads.get("w_k", q)
        if cfg.pos_encoding == "rotary":
            q, k = rotate(q), rotate(k)
        s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D)  # (B, H, T, T)
        s = np.where(t[None, :] <= t[:, None], s, -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        x = x + (a @ v).transpose(0, 2, 1, 3).reshape(B, T, H * D) @ p["attn.w_o"]
        h = layer_norm(x, p["ln2.g"], p["ln2.b"])
        x = x + gelu(h @ p["mlp.w_in"] + p["mlp.b_in"]) @ p["mlp.w_out"] + p["mlp.b_out"]
    x = layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    return x @ (params["wte"].T if cfg.tie_embeddings else params["lm_head"])


@pytest.mark.parametrize("pos_encoding, shared_qk, tie", [
    ("learned", True, True), ("rotary", False, False), ("learned", False, True), ("rotary", True, False)])
def test_forward_without_routing_is_a_plain_gpt(pos_encoding, shared_qk, tie):
    cfg = tiny(n_route_heads=0, block_size=16, pos_encoding=pos_encoding, shared_qk=shared_qk,
               tie_embeddings=tie)
    params, states, ids, _ = setup(cfg)
    rng = np.random.default_rng(1)  # non-trivial gains and biases, so each one is tested
    params = {n: v + 0.3 * rng.standard_normal(v.shape) for n, v in params.items()}
    logits, aux = M.forward(params, ids, cfg, states, impl="ref")
    np.testing.assert_allclose(logits, _gpt_reference(params, ids, cfg), rtol=0, atol=1e-12)
    assert aux["commitment"] == 0.0 and aux["stats"] == {}


# ------------------------------------------------------------------------------ 4. gradients
PORT_OPTIONS = dict(pos_encoding="rotary", shared_qk=False, logits="scaled", norm="l2", commitment_qk="mean",
                    mem_kv=True, rotary_values=True, local_qkv_bias=True)  # the port's LM (tests/test_port_lm.py)
GRAD_CONFIGS = {  # commitment raised so that its gradient weighs in the check
    "learned-shared-tied": tiny(commitment=0.5),
    "rotary-separate-untied": tiny(commitment=0.5, pos_encoding="rotary", shared_qk=False, tie_embeddings=False,
                                   self_attend="last_resort", logits="scaled", norm="l2", commitment_qk="mean"),
    "port-lm-options": tiny(commitment=0.5, **PORT_OPTIONS),  # memory key/value, rotated values, local biases
}


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_whole_model_gradient_matches_finite_differences(name):
    cfg = GRAD_CONFIGS[name]
    params, states, ids, targets = setup(cfg, seed=3)
    rng = np.random.default_rng(5)  # non-zero local biases, so that they weigh in the check too
    params = {n: v + 0.3 * rng.standard_normal(v.shape) if n.endswith("_local") else v for n, v in params.items()}

    def f(p):
        return M.loss(p, ids, targets, cfg, states, impl="ref")[0]

    check_grads(f, modes=["rev"], order=1)(params)


@pytest.mark.parametrize("name", list(GRAD_CONFIGS))
def test_auto_impl_gives_the_reference_loss_and_gradient(name):
    if not backend.numba_available():
        pytest.skip("numba is not installed")
    cfg = GRAD_CONFIGS[name]
    params, states, ids, targets = setup(cfg, seed=4)
    results = {}
    for impl in ("ref", "auto"):
        results[impl] = value_and_grad(lambda p: M.loss(p, ids, targets, cfg, states, impl=impl)[0])(params)
    (loss_ref, grad_ref), (loss_auto, grad_auto) = results["ref"], results["auto"]
    assert abs(loss_auto - loss_ref) <= 1e-10
    for n in grad_ref:
        np.testing.assert_allclose(grad_auto[n], grad_ref[n], rtol=0, atol=1e-10, err_msg=n)


# ------------------------------------------------------------------------------ 5. training pieces
@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_gradient_descent_lowers_the_loss(pos_encoding):
    cfg = tiny(pos_encoding=pos_encoding)
    params, states, ids, targets = setup(cfg, seed=0)
    losses = []
    for _ in range(20):
        aux = {}  # autograd's value_and_grad returns no aux: the closure keeps it

        def f(p):
            total, a = M.loss(p, ids, targets, cfg, states, impl="ref")
            aux.update(a)
            return total

        value, grads = value_and_grad(f)(params)
        losses.append(float(value))
        params = {n: params[n] - 0.1 * grads[n] for n in params}
        states = M.update_kmeans(cfg, states, aux["stats"])
    assert losses[-1] < losses[0] - 0.25, losses
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 17  # nearly every step goes down


def test_update_kmeans_moves_routing_centroids_only():
    cfg = tiny(n_layers=3, n_route_layers=2)
    params, states, ids, _ = setup(cfg)
    before = {n: {k: v.copy() for k, v in s.items()} for n, s in states.items()}
    _, aux = M.forward(params, ids, cfg, states, impl="ref")
    assert sorted(aux["stats"]) == sorted(states) == ["h1", "h2"]  # layer h0 is local: no state, no stats
    new = M.update_kmeans(cfg, states, aux["stats"])
    assert sorted(new) == ["h1", "h2"]
    for n in states:
        assert not np.allclose(new[n]["means"], before[n]["means"]), n
        assert np.array_equal(states[n]["means"], before[n]["means"]), "the input state was changed in place"


@pytest.mark.parametrize("shared_qk, combine", [(True, "sum"), (True, "mean"), (False, "sum"), (False, "mean")])
def test_loss_is_cross_entropy_plus_commitment(shared_qk, combine):
    cfg = tiny(n_layers=1, commitment=0.3, shared_qk=shared_qk, commitment_qk=combine)
    params, states, ids, targets = setup(cfg)
    total, aux = M.loss(params, ids, targets, cfg, states, impl="ref")
    logits, _ = M.forward(params, ids, cfg, states, impl="ref")
    # Cross-entropy by hand.
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    ce = -np.take_along_axis(logp, targets[..., None], -1).mean()
    assert abs(aux["cross_entropy"] - ce) < 1e-12
    # Commitment by hand: the one layer's routing-head queries (and keys), layer-normalised,
    # against their nearest centroid, mean over elements (docs/algorithm.md#18-commitment-loss).
    B, T = ids.shape
    x = params["wte"][ids] + params["wpe"][:T]
    xc = x - x.mean(-1, keepdims=True)
    h = xc / np.sqrt((xc ** 2).mean(-1, keepdims=True) + 1e-5) * params["h0.ln1.g"] + params["h0.ln1.b"]
    mu = states["h0"]["means"][0]  # (K, D) of the single routing head
    errors = []
    for w in ("w_q",) if shared_qk else ("w_q", "w_k"):
        r = (h @ params["h0.attn." + w])[..., :cfg.head_dim]  # head 0 routes: channels 0..D-1
        r = r - r.mean(-1, keepdims=True)
        r = r / np.sqrt((r ** 2).mean(-1, keepdims=True) + 1e-6)
        nearest = np.argmax(r @ mu.T, axis=-1)
        errors.append(((r - mu[nearest]) ** 2).mean())
    if shared_qk:
        errors = errors * 2  # the official code adds e_q + e_k with k = q
    expected = 0.3 * (sum(errors) if combine == "sum" else sum(errors) / len(errors))
    assert abs(aux["commitment"] - expected) < 1e-12
    assert abs(total - (ce + expected)) < 1e-12


def test_loss_without_routing_is_cross_entropy():
    cfg = tiny(n_route_heads=0)
    params, states, ids, targets = setup(cfg)
    total, aux = M.loss(params, ids, targets, cfg, states, impl="ref")
    assert states == {} and aux["commitment"] == 0.0 and total == aux["cross_entropy"]


def test_commitment_scales_with_beta():
    params, states, ids, targets = setup(tiny())
    small = M.loss(params, ids, targets, tiny(commitment=0.1), states, impl="ref")[1]["commitment"]
    large = M.loss(params, ids, targets, tiny(commitment=0.3), states, impl="ref")[1]["commitment"]
    assert abs(large - 3 * small) < 1e-12
    assert M.loss(params, ids, targets, tiny(commitment=0.0), states, impl="ref")[1]["commitment"] == 0.0


# ------------------------------------------------------------------------------ 6. dropout and bad input
def test_dropout_only_with_an_rng():
    cfg = tiny(dropout=0.3)
    params, states, ids, _ = setup(cfg)
    evaluation, _ = M.forward(params, ids, tiny(), states, impl="ref")  # the same model without dropout
    no_rng, _ = M.forward(params, ids, cfg, states, rng=None, impl="ref")
    assert np.array_equal(no_rng, evaluation)
    a, _ = M.forward(params, ids, cfg, states, rng=np.random.default_rng(5), impl="ref")
    b, _ = M.forward(params, ids, cfg, states, rng=np.random.default_rng(5), impl="ref")
    c, _ = M.forward(params, ids, cfg, states, rng=np.random.default_rng(6), impl="ref")
    assert not np.allclose(a, evaluation) and not np.allclose(a, c)
    assert np.array_equal(a, b)  # the rng is the only randomness


def test_dropout_gradient_matches_finite_differences():
    cfg = tiny(dropout=0.2)
    params, states, ids, targets = setup(cfg)

    def f(p):  # a fresh generator per call: the same masks at every evaluation
        return M.loss(p, ids, targets, cfg, states, rng=np.random.default_rng(0), impl="ref")[0]

    check_grads(f, modes=["rev"], order=1)(params)


@pytest.mark.parametrize("make_ids, error, match", [
    (lambda ids: ids.astype(np.float64), TypeError, "ids must be an integer array"),
    (lambda ids: ids[0], ValueError, r"ids must have shape \(B, T\)"),
    (lambda ids: ids[:0], ValueError, r"ids must have shape \(B, T\) with B >= 1, got \(0, 16\)"),
    (lambda ids: ids.tolist(), TypeError, "ids must be an integer array"),
    (lambda ids: np.concatenate([ids, ids], axis=1), ValueError, "seq_len=16, got T=32"),
    (lambda ids: ids[:, :0], ValueError, "got T=0"),
    (lambda ids: ids + 32, ValueError, r"ids must lie in \[0, vocab_size=32\)"),
    (lambda ids: ids - 40, ValueError, r"ids must lie in \[0, vocab_size=32\)"),
])
def test_bad_ids_raise(make_ids, error, match):
    cfg = tiny()
    params, states, ids, _ = setup(cfg)
    with pytest.raises(error, match=match):
        M.forward(params, make_ids(ids), cfg, states, impl="ref")


def test_missing_kmeans_state_raises():
    cfg = tiny()
    params, _, ids, _ = setup(cfg)
    with pytest.raises(ValueError, match=r"no state for routing layers \['h1'\].*init_kmeans"):
        M.forward(params, ids, cfg, {}, impl="ref")
    M.forward(params, ids, tiny(n_route_heads=0), {}, impl="ref")  # no routing layer, nothing needed


# ------------------------------------------------------------------------------ 7. the port's options
@pytest.mark.parametrize("changes, match", [
    (dict(mem_kv=True), r"mem_kv=True.*shared_qk=False.*got shared_qk=True"),
    (dict(mem_kv=True, shared_qk=False, attention="dense"), r"mem_kv=True.*got shared_qk=False, attention='dense'"),
    (dict(rotary_values=True), r"rotary_values=True.*got pos_encoding='learned'"),
])
def test_port_options_name_what_they_need(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny(**changes)


def test_port_option_parameters():
    cfg = tiny(n_layers=3, num_heads=4, width=16, n_route_heads=3, n_route_layers=2, num_clusters=2, **PORT_OPTIONS)
    shapes = M.param_shapes(cfg)
    D, K = cfg.head_dim, cfg.num_clusters
    new = {n: s for n, s in shapes.items() if n not in M.param_shapes(tiny(n_layers=3, num_heads=4, width=16,
                                                                             pos_encoding="rotary", shared_qk=False))}
    assert new == {"h0.attn.b_q_local": (4 * D,), "h0.attn.b_k_local": (4 * D,), "h0.attn.b_v_local": (4 * D,),
                   **{f"h{i}.attn.{n}": (3, K, D) for i in (1, 2) for n in ("mem_k", "mem_v")},
                   **{f"h{i}.attn.b_{n}_local": (D,) for i in (1, 2) for n in "qkv"}}
    params = M.init_params(cfg, np.random.default_rng(0))
    assert all(np.all(params[n] == 0) for n in new if n.endswith("_local"))
    assert 0.7 < params["h1.attn.mem_k"].std() < 1.3  # N(0, 1), as the port draws them
    # With shared QK only the local biases are there, and no b_k_local; no local heads, no biases.
    shared = M.param_shapes(tiny(local_qkv_bias=True))
    assert [n for n in shared if n.endswith("_local")] == ["h0.attn.b_q_local", "h0.attn.b_v_local",
                                                           "h1.attn.b_q_local", "h1.attn.b_v_local"]
    assert not [n for n in M.param_shapes(tiny(n_layers=1, n_route_heads=2, local_qkv_bias=True)) if "_local" in n]


@pytest.mark.parametrize("option", ["mem_kv", "rotary_values", "local_qkv_bias"])
def test_port_option_acts_where_it_should(option):
    """Each option changes the output; mem_kv and rotary_values only through the routing heads,
    local_qkv_bias only through the local heads, and the bias never reaches a routing head."""
    cfg = tiny(n_layers=1, **PORT_OPTIONS)  # one layer: head 0 routes, head 1 is local
    params, states, ids, _ = setup(cfg)
    rng = np.random.default_rng(1)
    params = {n: v + 0.3 * rng.standard_normal(v.shape) if n.endswith("_local") else v for n, v in params.items()}
    without = dataclasses.replace(cfg, **{option: False})
    traces = {}
    for c in (cfg, without):
        traces[c] = {}
        M.forward({n: params[n] for n in M.param_shapes(c)}, ids, c, states, impl="ref", trace=traces[c])
    on, off = traces[cfg]["h0"], traces[without]["h0"]
    if option == "local_qkv_bias":  # the projections of head 1 move, head 0's do not
        for name in "qkv":
            assert np.array_equal(on[name][:, 0], off[name][:, 0]) and not np.allclose(on[name][:, 1], off[name][:, 1])
    elif option == "rotary_values":  # head 0's values are rotated, head 1's are not
        assert not np.allclose(on["v"][:, 0], off["v"][:, 0]) and np.array_equal(on["v"][:, 1], off["v"][:, 1])
        cos, sin = M.rotary_tables(cfg.seq_len, cfg.head_dim, dtype=np.float64)
        np.testing.assert_allclose(on["v"][:, :1], attention.apply_rotary(off["v"][:, :1], cos, sin), atol=1e-15)
    logits_on = M.forward(params, ids, cfg, states, impl="ref")[0]
    logits_off = M.forward({n: params[n] for n in M.param_shapes(without)}, ids, without, states, impl="ref")[0]
    assert np.abs(logits_on - logits_off).max() > 1e-4


def test_bad_port_parameters_are_named():
    cfg = tiny(**PORT_OPTIONS)
    params, states, ids, _ = setup(cfg)
    with pytest.raises(ValueError, match=r"params\['h1.attn.b_v_local'\] must have shape \(4,\).*got \(8,\)"):
        M.forward({**params, "h1.attn.b_v_local": np.zeros(8)}, ids, cfg, states, impl="ref")
    with pytest.raises(ValueError, match=r"params\['h1.attn.mem_k'\] must have shape \(1, 2, 4\)"):
        M.forward({**params, "h1.attn.mem_k": np.zeros((1, 3, 4))}, ids, cfg, states, impl="ref")


def test_old_config_and_checkpoint_load_as_the_official_model(tmp_path):
    """A config (or checkpoint JSON) written before the port's options existed has none of their keys."""
    cfg = tiny()
    old = {k: v for k, v in cfg.to_dict().items() if k not in ("mem_kv", "rotary_values", "local_qkv_bias")}
    assert len(old) == len(cfg.to_dict()) - 3
    assert M.Config.from_dict(old) == cfg and not (cfg.mem_kv or cfg.rotary_values or cfg.local_qkv_bias)

    params, states, _, _ = setup(cfg)
    train.save_checkpoint(tmp_path / "old", params=params, opt_state=optim.adamw_init(params), kmeans_states=states,
                          step=3, rng=np.random.default_rng(0), cfg=cfg, tcfg=train.TrainConfig())
    with np.load(tmp_path / "old.npz", allow_pickle=False) as npz:  # the metadata is inside the .npz
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(arrays[train.META_NAME].tobytes())
    meta["model"] = {k: v for k, v in meta["model"].items() if k in old}
    arrays[train.META_NAME] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)  # (n_bytes,)
    np.savez(tmp_path / "old.npz", **arrays)
    (tmp_path / "old.json").unlink()  # the readable copy is not needed to load
    loaded = train.load_checkpoint(tmp_path / "old", expect_model=cfg)
    assert loaded["cfg"] == cfg and loaded["step"] == 3
    assert sorted(loaded["params"]) == sorted(params)
    assert all(np.array_equal(loaded["params"][n], params[n]) for n in params)


SEEDED_RUN = """
import hashlib
import numpy as np
from rt_numpy import model, optim, train
cfg, tcfg = train.PRESETS["tiny"]
rng = np.random.default_rng(5)
params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
opt = optim.adamw_init(params)
for step in range(3):
    x, y = rng.integers(0, 256, (2, 2, cfg.seq_len))
    params, opt, states, _ = train.train_step(params, opt, states, x, y, cfg, tcfg, step, rng)
digest = hashlib.sha256()
for name in sorted(params):
    digest.update(params[name].tobytes())
for layer in sorted(states):
    digest.update(states[layer]["means"].tobytes())
print(digest.hexdigest())
"""


def test_seeded_training_is_bitwise_equal_across_processes_at_one_blas_thread_count():
    """docs/design.md#reproducibility: two fresh interpreters, one seed, the same OPENBLAS_NUM_THREADS
    (2, so that BLAS may split its work) give the same bits, parameters and centroids."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "2"}
    digests = [subprocess.run([sys.executable, "-c", SEEDED_RUN], env=env, capture_output=True, text=True,
                              check=True, timeout=300).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]
