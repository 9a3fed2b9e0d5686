"""Tests of rt_numpy.cache and of generate's ``cache=`` and ``decode_rule=``.

What is checked (docs/algorithm.md#9-generation-and-the-keyvalue-cache):

1. exactness: for strictly causal models (local heads only; nearest membership with learned or
   rotary positions, separate QK with mem_kv, rotary values and local biases, look_back 2, the
   last-resort self rule, scaled logits, two routing layers), the cached logits at every step equal
   ``model.forward(window)[:, -1]`` of the full recompute, to 1e-12 in float64 and to float32
   rounding in float32, for a batch of prompts whose length is no multiple of the block; the
   token-by-token prefill equals the one-pass prefill;
2. past seq_len: ``generate`` with the cache gives the tokens of the full recompute for the same
   seed, with learned and rotary positions, for several slides;
3. ``cache=``: "auto" uses the cache only where it is exact, True refuses balanced routing naming
   ``cache`` and the reason, ``cache_is_exact``;
4. the eviction example of the docs: appending a token changes an earlier position's output under
   balanced membership, never under nearest membership;
5. the prefix rule: equal to the full recompute when the only routing layer is the last one, not
   equal above a first routing layer (an approximation), refused with ``cache=False``.
"""
import numpy as np
import pytest

from rt_numpy import attention as A
from rt_numpy import cache as C
from rt_numpy import model as M
from rt_numpy import sample as S


def tiny(**overrides):
    values = dict(vocab_size=256, seq_len=16, width=8, n_layers=2, num_heads=2, n_route_heads=1,
                  n_route_layers=1, num_clusters=2, window_size=4, block_size=4, ff_mult=2, dtype="float64",
                  membership="nearest")
    values.update(overrides)
    return M.Config(**values)


def setup(cfg, seed=0):
    rng = np.random.default_rng(seed)
    params, states = M.init_params(cfg, rng), M.init_kmeans(cfg, rng)
    params["wte"] = params["wte"] * 50  # sharper logits than the 0.02 init
    for name in params:
        if name.endswith("_local"):  # biases start at zero: give them values so that they count
            params[name] = rng.standard_normal(params[name].shape).astype(cfg.dtype)
    return params, states


def tokens(B=3, n=16, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (B, n))


EXACT = {
    "local only": dict(n_route_heads=0),
    "nearest, learned": dict(),
    "nearest, rotary": dict(pos_encoding="rotary"),
    "port options": dict(shared_qk=False, mem_kv=True, pos_encoding="rotary", rotary_values=True,
                         local_qkv_bias=True),
    "look_back 2, last resort, scaled": dict(look_back=2, self_attend="last_resort", logits="scaled"),
    "two routing layers, separate QK, l2": dict(width=16, num_heads=4, n_route_heads=2, n_route_layers=2,
                                               shared_qk=False, norm="l2", look_back=0),
}


# ------------------------------------------------------------------------------ 1. exactness
@pytest.mark.parametrize("name", EXACT)
@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 2e-5)])
def test_every_step_equals_the_full_recompute(name, dtype, tol):
    cfg = tiny(dtype=dtype, **EXACT[name])
    params, states = setup(cfg)
    ids = tokens()  # (3, 16): a prompt of 5 (no multiple of L = 4), then one token per step to seq_len
    logits, cache = C.prefill(params, cfg, states, ids[:, :5])
    for n in range(5, 17):
        full, _ = M.forward(params, ids[:, :n], cfg, states)  # (B, n, V)
        scale = np.abs(full[:, -1]).max()
        np.testing.assert_allclose(logits, full[:, -1], rtol=0, atol=tol * scale, err_msg=f"{name}, n={n}")
        assert logits.dtype == np.dtype(dtype)
        if n < 16:
            logits, cache = C.step(params, cfg, states, cache, ids[:, n])
    assert cache["length"] == 16
    with pytest.raises(ValueError, match="cache is full"):
        C.step(params, cfg, states, cache, ids[:, 0])


@pytest.mark.parametrize("name", ["nearest, rotary", "port options"])
def test_token_by_token_equals_one_pass(name):
    cfg = tiny(**EXACT[name])
    params, states = setup(cfg)
    ids = tokens(n=11)
    full, _ = M.forward(params, ids, cfg, states)
    np.testing.assert_allclose(C.decode_logits(params, cfg, states, ids), full, rtol=0, atol=1e-12)
    _, one_pass = C.prefill(params, cfg, states, ids)
    _, stepped = C.prefill(params, cfg, states, ids, rule="prefix")  # the prefix rule feeds one token at a time
    for layer in one_pass["layers"]:
        for kind, arrays in one_pass["layers"][layer].items():
            for key, value in arrays.items():
                np.testing.assert_allclose(stepped["layers"][layer][kind][key], value, rtol=0, atol=1e-12,
                                           err_msg=f"{layer} {kind} {key}")


# ------------------------------------------------------------------------------ 2. generate, past seq_len
@pytest.mark.parametrize("pos_encoding, slide", [("learned", None), ("rotary", None), ("learned", 1), ("rotary", 5)])
def test_generate_gives_the_same_tokens_cached_or_not(pos_encoding, slide):
    cfg = tiny(pos_encoding=pos_encoding)
    params, states = setup(cfg)
    ids = tokens(n=6)
    kwargs = dict(rng=None, temperature=3.0, top_k=50, slide=slide, impl="ref")
    cached = S.generate(params, cfg, states, ids, 22, cache=True, **dict(kwargs, rng=np.random.default_rng(4)))
    full = S.generate(params, cfg, states, ids, 22, cache=False, **dict(kwargs, rng=np.random.default_rng(4)))
    np.testing.assert_array_equal(cached, full)  # 28 tokens > seq_len = 16: the window slid at least twice
    assert len(set(cached[0, 6:].tolist())) > 5  # a real sample, not one token repeated


def test_auto_is_the_cache_for_a_causal_model(monkeypatch):
    cfg = tiny()
    params, states = setup(cfg)
    calls = []
    monkeypatch.setattr(S, "next_logits", lambda *a, **k: calls.append(1))  # the full recompute must not run
    S.generate(params, cfg, states, tokens(n=4), 5, rng=np.random.default_rng(0))
    assert calls == []


# ------------------------------------------------------------------------------ 3. cache=
def test_cache_true_refuses_balanced_routing():
    cfg = tiny(membership="balanced")
    params, states = setup(cfg)
    assert not S.cache_is_exact(cfg) and S.cache_is_exact(tiny()) and S.cache_is_exact(tiny(n_route_heads=0))
    assert S.cache_is_exact(tiny(membership="balanced", n_route_heads=0))  # balanced but no routing heads
    with pytest.raises(ValueError, match=r"cache=True: .* not exact .*membership='balanced'.*evict"):
        S.generate(params, cfg, states, tokens(n=4), 2, rng=np.random.default_rng(0), cache=True)
    auto = S.generate(params, cfg, states, tokens(n=4), 6, rng=np.random.default_rng(0), impl="ref")  # recompute
    off = S.generate(params, cfg, states, tokens(n=4), 6, rng=np.random.default_rng(0), cache=False, impl="ref")
    np.testing.assert_array_equal(auto, off)
    assert "attention='lsh'" in C.inexact_reason(tiny(attention="lsh"))
    with pytest.raises(ValueError, match=r"rule='exact'.*not exact"):
        C.prefill(params, cfg, states, tokens(n=4))


# ------------------------------------------------------------------------------ 4. the eviction example
@pytest.mark.parametrize("membership, changes", [("balanced", True), ("nearest", False)])
def test_appending_a_token_evicts_an_earlier_member(membership, changes):
    """docs/algorithm.md#9-generation-and-the-keyvalue-cache: one head, one cluster of W = 1 member.
    Token 0 is the member while it is alone; token 1 is closer to the centroid and takes its place,
    so position 0's output drops from v0 / (1 + eps) to 0."""
    q = np.array([[1.0, 0.5], [1.0, 0.0]])[None, None]  # (1, 1, 2, 2): cosines 0.894 and 1 to the centroid
    v = np.array([[1.0, 2.0], [3.0, 4.0]])[None, None]
    means = np.array([[[1.0, 0.0]]])  # (1, 1, 2)
    args = dict(window_size=1, norm="l2", membership=membership, impl="ref")
    alone, _, _ = A.routing_attention(q[:, :, :1], None, v[:, :, :1], means, **args)
    both, _, _ = A.routing_attention(q, None, v, means, **args)
    np.testing.assert_allclose(alone[0, 0, 0], [1.0 / 1.01, 2.0 / 1.01])
    if changes:
        np.testing.assert_array_equal(both[0, 0, 0], [0.0, 0.0])  # token 0 is in no cluster any more
    else:
        np.testing.assert_allclose(both[0, 0, 0], alone[0, 0, 0], rtol=0, atol=1e-15)


# ------------------------------------------------------------------------------ 5. the prefix rule
def full_recompute(params, cfg, states, ids):
    """The logits (B, n, V) of forward(ids[:, :t+1])[:, -1] for every t: what exact generation computes."""
    rows = [M.forward(params, ids[:, :t + 1], cfg, states, impl="ref")[0][:, -1] for t in range(ids.shape[1])]
    return np.stack(rows, axis=1)


def test_prefix_rule_is_the_full_recompute_in_the_first_routing_layer():
    cfg = tiny(membership="balanced", n_route_layers=1)  # layer 0 local, layer 1 routes
    params, states = setup(cfg)
    ids = tokens(n=12)
    recompute = full_recompute(params, cfg, states, ids)
    np.testing.assert_allclose(C.decode_logits(params, cfg, states, ids, rule="prefix", impl="ref"), recompute,
                               rtol=0, atol=1e-12)
    teacher, _ = M.forward(params, ids, cfg, states, impl="ref")  # one pass over the window: the training rule
    assert np.abs(teacher - recompute).max() > 1e-3  # which does see the future (docs §3)


def test_prefix_rule_is_an_approximation_above_the_first_routing_layer():
    cfg = tiny(membership="balanced", n_route_layers=2, window_size=2)
    params, states = setup(cfg)
    ids = tokens(n=12)
    recompute = full_recompute(params, cfg, states, ids)
    prefix = C.decode_logits(params, cfg, states, ids, rule="prefix", impl="ref")
    np.testing.assert_allclose(prefix[:, 0], recompute[:, 0], rtol=0, atol=1e-12)  # one token: nothing kept yet
    assert np.abs(prefix - recompute).max() > 1e-8  # kept states differ from recomputed ones


def test_generate_with_the_prefix_rule():
    cfg = tiny(membership="balanced", n_route_layers=1)
    params, states = setup(cfg)
    ids = tokens(n=5)
    prefix = S.generate(params, cfg, states, ids, 20, rng=None, temperature=0, decode_rule="prefix", impl="ref")
    full = S.generate(params, cfg, states, ids, 20, rng=None, temperature=0, cache=False, impl="ref")
    np.testing.assert_array_equal(prefix, full)  # exact here: the only routing layer is the last
    with pytest.raises(ValueError, match="cache=False cannot run decode_rule='prefix'"):
        S.generate(params, cfg, states, ids, 2, rng=None, temperature=0, cache=False, decode_rule="prefix")
    with pytest.raises(ValueError, match="rule must be one of"):
        C.decode_logits(params, cfg, states, ids, rule="approximate")
