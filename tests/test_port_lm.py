"""The whole language model against the PyTorch port's ``RoutingTransformerLM`` (``routing-transformer`` 1.6.1).

What is checked (docs/conventions.md#the-language-model-around-it, docs/algorithm.md#4-layers-and-heads):

1. the port's causal LM with separate QK and tied embeddings, mapped by
   :func:`rt_numpy.crosscheck.port_lm_config` and :func:`rt_numpy.crosscheck.params_from_port`, equals
   rt_numpy's model in float64 over a few configurations (depth 1 and 2, a local-only first layer,
   routing-only layers, look-back 2, L != W): the logits, the total loss (cross-entropy plus the
   commitment losses), every parameter's gradient (:func:`rt_numpy.crosscheck.grads_from_port`) and
   one k-means update, each to 1e-12 relative;
2. each of the port's options of :class:`rt_numpy.model.Config` (``mem_kv``, ``rotary_values``,
   ``local_qkv_bias``) matters: with it off the logits differ by more than 1e-3;
3. the mapping refuses, naming the argument or tensor, a port model it cannot reproduce and a
   state_dict that does not fit the config.

The port module is float64 with its position tables rebuilt in float64 (it builds them in float32),
``ff_activation=GELU_`` (rt_numpy's tanh GELU), non-trivial biases, gains and centroids, and its k-means
marked initialised.  Skipped cleanly when torch or the port is not installed (``pip install -e ".[port]"``).
"""
import dataclasses

import numpy as np
import pytest
from autograd import grad

torch = pytest.importorskip("torch")
rt_port = pytest.importorskip("routing_transformer.routing_transformer")
local_attention = pytest.importorskip("local_attention")

from rt_numpy import crosscheck  # noqa: E402
from rt_numpy import model as M  # noqa: E402

# The port builds empty (0, C) projections for the routing heads of a local-only layer; torch warns.
pytestmark = [pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op"),
              pytest.mark.usefixtures("torch_float64")]  # tests/conftest.py: port modules in float64
RTOL = 1e-12
TIED_SEPARATE = dict(causal=True, shared_qk=False, tie_embedding=True)
CASES = {  # the port's constructor arguments; dim_head = dim // heads
    "depth2-local-first": dict(num_tokens=16, dim=24, depth=2, max_seq_len=32, heads=3, dim_head=8, window_size=8,
                               local_attn_window_size=8, n_local_attn_heads=(3, 1)),
    "depth1-all-routing": dict(num_tokens=16, dim=16, depth=1, max_seq_len=16, heads=2, dim_head=8, window_size=8,
                               local_attn_window_size=8, n_local_attn_heads=0),
    "depth2-lookback2-L<W": dict(num_tokens=32, dim=32, depth=2, max_seq_len=64, heads=4, dim_head=8,
                                 window_size=16, local_attn_window_size=8, local_attn_radius_blocks=2,
                                 n_local_attn_heads=(3, 3)),
}


def _port_lm(arguments, seed=0):
    """The port LM in float64 and eval mode, with values that make every parameter count."""
    torch.manual_seed(seed)
    lm = rt_port.RoutingTransformerLM(**arguments, **TIED_SEPARATE, ff_activation=rt_port.GELU_,
                                      _register_kmeans_update=False)  # its hook asserts in eval mode
    lm = lm.double().eval()
    # The port's position tables are float32 even in a float64 model: rebuilt in float64.
    D, T = arguments["dim_head"], arguments["max_seq_len"]
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq[None, :]
    lm.sinu_pos_emb.emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    for m in lm.modules():
        if isinstance(m, local_attention.LocalAttention) and m.rel_pos is not None:
            m.rel_pos.inv_freq = inv_freq.clone()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            elif "token_emb" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "mem_" not in name:
                p.mul_(2.0)  # larger logits than PyTorch's default initialisation
        for m in rt_port.find_modules(lm, rt_port.Kmeans):
            m.means.copy_(torch.nn.functional.normalize(torch.randn(m.means.shape, generator=g), dim=-1))
            m.initted.fill_(True)  # otherwise its first forward, even in eval, re-initialises them
    return lm


def _numpy(tensors):
    return {name: t.detach().numpy() for name, t in tensors.items()}


def _rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _setup(name, seed=0, B=2):
    arguments = CASES[name]
    lm = _port_lm(arguments, seed)
    cfg = crosscheck.port_lm_config(**arguments, **TIED_SEPARATE, dtype="float64")
    params, states = crosscheck.params_from_port(_numpy(lm.state_dict()), cfg)
    rng = np.random.default_rng(seed + 2)
    ids, targets = (rng.integers(0, cfg.vocab_size, (B, cfg.seq_len)) for _ in range(2))
    return lm, cfg, params, states, ids, targets


# ------------------------------------------------------------------------------ 1. agreement
@pytest.mark.parametrize("name", list(CASES))
def test_lm_equals_port(name):
    lm, cfg, params, states, ids, targets = _setup(name)
    assert cfg.mem_kv and cfg.rotary_values and cfg.local_qkv_bias and cfg.tie_embeddings
    # The port: logits, CE + auxiliary (commitment) loss, and its gradients.
    logits_port, aux_port = lm(torch.from_numpy(ids))
    loss_port = torch.nn.functional.cross_entropy(logits_port.transpose(1, 2), torch.from_numpy(targets)) \
        + aux_port.sum()
    loss_port.backward()
    grads_port = crosscheck.grads_from_port(
        {n: (p.grad if p.grad is not None else torch.zeros_like(p)).numpy() for n, p in lm.named_parameters()},
        cfg)
    # rt_numpy.
    logits, _ = M.forward(params, ids, cfg, states, impl="ref")
    total, aux = M.loss(params, ids, targets, cfg, states, impl="ref")
    grads = grad(lambda p: M.loss(p, ids, targets, cfg, states, impl="ref")[0])(params)

    assert _rel(logits, logits_port.detach().numpy()) <= RTOL
    assert _rel(total, loss_port.item()) <= RTOL
    assert _rel(aux["commitment"], aux_port.sum().item()) <= RTOL and float(aux["commitment"]) > 0
    assert sorted(grads) == sorted(grads_port) == sorted(M.param_shapes(cfg))
    errors = {n: _rel(grads[n], grads_port[n]) for n in grads}
    assert max(errors.values()) <= RTOL, {n: e for n, e in errors.items() if e > RTOL}
    new_params = [n for n in grads if n.endswith(("mem_k", "mem_v", "_local"))]
    assert new_params and all(np.abs(grads[n]).max() > 1e-8 for n in new_params)  # they are trained

    # One k-means update: the port collects in train mode and updates on request.
    lm.train()
    with torch.no_grad():
        lm(torch.from_numpy(ids))
    lm.update_kmeans()
    _, moved_port = crosscheck.params_from_port(_numpy(lm.state_dict()), cfg)
    moved = M.update_kmeans(cfg, states, aux["stats"])
    assert sorted(moved) == sorted(moved_port) == sorted(states)
    for layer in moved:
        assert _rel(moved[layer]["means"], moved_port[layer]["means"]) <= RTOL
        assert _rel(moved_port[layer]["means"], states[layer]["means"]) > 1e-6  # the update moved them


def test_port_lm_config_reads_the_port_arguments():
    cfg = crosscheck.port_lm_config(**CASES["depth2-lookback2-L<W"], **TIED_SEPARATE, kmeans_ema_decay=0.9)
    assert (cfg.vocab_size, cfg.seq_len, cfg.width, cfg.n_layers, cfg.num_heads) == (32, 64, 32, 2, 4)
    assert (cfg.n_route_heads, cfg.n_route_layers, cfg.num_clusters) == (1, 2, 4)
    assert (cfg.window_size, cfg.block_size, cfg.look_back, cfg.ema_decay) == (16, 8, 2, 0.9)
    conventions = crosscheck.port_conventions(shared_qk=False)
    assert all(getattr(cfg, k) == conventions[k] for k in ("norm", "logits", "self_attend", "combine_eps",
                                                           "commitment", "commitment_qk", "centroid_update"))
    local_first = crosscheck.port_lm_config(**CASES["depth2-local-first"], **TIED_SEPARATE)
    assert (local_first.n_route_heads, local_first.n_route_layers) == (2, 1)
    assert [local_first.n_local_heads(i) for i in range(2)] == [3, 1]


# ------------------------------------------------------------------------------ 2. every option matters
@pytest.mark.parametrize("option", ["mem_kv", "rotary_values", "local_qkv_bias"])
def test_each_port_option_matters(option):
    lm, cfg, params, states, ids, _ = _setup("depth2-local-first")
    with torch.no_grad():
        theirs = lm(torch.from_numpy(ids))[0].numpy()
    assert _rel(M.forward(params, ids, cfg, states, impl="ref")[0], theirs) <= RTOL
    without = dataclasses.replace(cfg, **{option: False})
    kept = {n: params[n] for n in M.param_shapes(without)}
    assert len(kept) < len(params) or option == "rotary_values"  # the option's parameters are gone
    assert _rel(M.forward(kept, ids, without, states, impl="ref")[0], theirs) > 1e-3


# ------------------------------------------------------------------------------ 3. what the mapping refuses
@pytest.mark.parametrize("change, match", [
    (dict(causal=False), "causal=True"), (dict(shared_qk=True), "shared_qk=False"),
    (dict(tie_embedding=False), "tie_embedding=True"), (dict(rel_pos_emb=False), "rel_pos_emb=True"),
    (dict(dim_head=64), "dim_head=64"), (dict(n_local_attn_heads=(1, 3)), r"n_local_attn_heads.*\(1, 3\)"),
    (dict(n_local_attn_heads=(3,)), r"n_local_attn_heads.*\(3,\)"), (dict(window_size=12), "max_seq_len.*32"),
])
def test_port_lm_config_refuses_what_it_cannot_reproduce(change, match):
    arguments = {**CASES["depth2-local-first"], **TIED_SEPARATE, **change}
    with pytest.raises(ValueError, match=match):
        crosscheck.port_lm_config(**arguments)


def test_params_from_port_names_a_missing_or_misshaped_tensor():
    lm, cfg, *_ = _setup("depth2-local-first")
    state = _numpy(lm.state_dict())
    mem = "routing_transformer.layers.layers.1.0.fn.global_attn.mem_key"
    with pytest.raises(ValueError, match=f"no '{mem}'"):
        crosscheck.params_from_port({k: v for k, v in state.items() if k != mem}, cfg)
    with pytest.raises(ValueError, match=rf"'{mem}' has shape \(2, 4, 2, 8\), expected \(2, 4, 1, 8\)"):
        crosscheck.params_from_port({**state, mem: np.zeros((2, 4, 2, 8))}, cfg)
    with pytest.raises(ValueError, match=r"\['out.bias'\]"):  # an untied port's output bias has no place
        crosscheck.params_from_port({**state, "out.bias": np.zeros(16)}, cfg)
    with pytest.raises(ValueError, match="mem_kv"):
        crosscheck.params_from_port(state, dataclasses.replace(cfg, mem_kv=False))
    with pytest.raises(TypeError, match="cfg"):
        crosscheck.params_from_port(state, cfg.to_dict())
