"""rt_numpy.introspect: each head's attention matrix times its values is the head's output, and the
routes are the library's own routing decisions."""
import numpy as np
import pytest

from rt_numpy import attention as A
from rt_numpy import baselines, introspect, kmeans, model

SIZES = dict(seq_len=32, width=16, n_layers=2, num_heads=2, n_route_heads=1, num_clusters=4, window_size=8,
             block_size=8, dtype="float64")
KINDS = [{}, dict(membership="nearest"), dict(attention="strided"), dict(attention="lsh"),
         dict(attention="lsh", n_hashes=2), dict(attention="dense"), dict(self_attend="last_resort"),
         dict(logits="scaled"), dict(pos_encoding="rotary")]


def _model(changes):
    cfg = model.Config(**{**SIZES, **changes})
    rng = np.random.default_rng(0)
    params = model.init_params(cfg, rng)
    params = {k: v * 10 if v.ndim == 2 else v for k, v in params.items()}  # sharper attention
    return cfg, params, model.init_kmeans(cfg, rng), rng.integers(0, 256, (2, 32))


def _library_head_outputs(cfg, states, lay, layer):
    """Every head's output (B, H, T, D), computed by the library's attention functions from the trace."""
    q, v = lay["q"], lay["v"]
    Hr = cfg.n_route_heads if cfg.is_sparse_layer(layer) else 0
    qr, vr, ql, vl = q[:, :Hr], v[:, :Hr], q[:, Hr:], v[:, Hr:]
    parts = []
    if Hr:
        kind = cfg.attention
        if kind == "routing":
            parts.append(A.routing_attention(qr, None, vr, states[f"h{layer}"]["means"], window_size=cfg.window_size,
                                             membership=cfg.membership, self_attend=cfg.self_attend,
                                             logits=cfg.logits, impl="ref")[0])
        elif kind == "strided":
            parts.append(baselines.strided_attention(qr, qr, vr, stride=cfg.stride, self_attend=cfg.self_attend))
        elif kind == "lsh":
            parts.append(baselines.lsh_attention(qr, None, vr, model.lsh_rotations(cfg, layer),
                                                 window_size=cfg.window_size, self_attend=cfg.self_attend,
                                                 logits=cfg.logits))
        else:
            parts.append(A.dense_causal_attention(qr, qr, vr, self_attend=cfg.self_attend))
    if Hr < cfg.num_heads:
        parts.append(A.local_attention(ql, ql, vl, block_size=cfg.block_size, look_back=cfg.look_back,
                                       self_attend=cfg.self_attend))
    return np.concatenate(parts, axis=1)


@pytest.mark.parametrize("changes", KINDS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "routing")
def test_attention_matrix_times_values_is_the_head_output(changes):
    cfg, params, states, ids = _model(changes)
    trace = {}
    model.forward(params, ids, cfg, states, trace=trace)
    for layer in range(cfg.n_layers):
        lay = trace[f"h{layer}"]
        want = _library_head_outputs(cfg, states, lay, layer)
        for head in range(cfg.num_heads):
            M = introspect.attention_matrix(params, ids, cfg, states, layer=layer, head=head)
            assert M.shape == (2, 32, 32)
            assert not np.triu(M, 1).any()  # nothing above the diagonal: no later key is ever weighted
            np.testing.assert_allclose(M @ lay["v"][:, head], want[:, head], rtol=0, atol=1e-10)


def test_row_sums_tell_the_combine():
    cfg, params, states, ids = _model({})
    M = introspect.attention_matrix(params, ids, cfg, states, layer=1, head=0)
    windows = introspect.routes(params, ids, cfg, states)["h1"]["windows"][:, 0]
    n = np.stack([np.bincount(w.reshape(-1), minlength=32) for w in windows])
    np.testing.assert_allclose(M.sum(-1), n / (n + cfg.combine_eps), rtol=0, atol=1e-12)
    local = introspect.attention_matrix(params, ids, cfg, states, layer=1, head=1)
    np.testing.assert_allclose(local.sum(-1), 1.0, rtol=0, atol=1e-12)


def test_routes_are_the_routing_decisions():
    cfg, params, states, ids = _model({})
    got = introspect.routes(params, ids, cfg, states)
    assert set(got) == {"h1"}
    trace = {}
    _, aux = model.forward(params, ids, cfg, states, trace=trace)
    np.testing.assert_array_equal(got["h1"]["assignments"], aux["stats"]["h1"]["assignments"][0])
    qn = kmeans.normalize(trace["h1"]["q"][:, :1])
    np.testing.assert_array_equal(got["h1"]["windows"], kmeans.balanced_membership(qn, states["h1"]["means"], 8))
    cfg_n, params_n, states_n, _ = _model(dict(membership="nearest"))
    assert introspect.routes(params_n, ids, cfg_n, states_n)["h1"]["windows"] is None


def test_bad_head_and_layer_are_named():
    cfg, params, states, ids = _model({})
    with pytest.raises(ValueError, match=r"layer must be in \[0, 1\], got 2"):
        introspect.attention_matrix(params, ids, cfg, states, layer=2, head=0)
    with pytest.raises(ValueError, match=r"head must be in \[0, 1\], got -1"):
        introspect.attention_matrix(params, ids, cfg, states, layer=0, head=-1)
