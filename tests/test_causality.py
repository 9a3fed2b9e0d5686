"""rt_numpy.causality.certify on every attention of the library and on models.

Every strictly causal attention passes (dense, local, strided, nearest routing), and the two whose
selection depends on the whole sequence fail: balanced routing, through eviction, and LSH, through
the chunk boundaries (docs/algorithm.md#3-the-causal-leak, docs/algorithm.md#72-lsh-attention).
"""
import numpy as np
import pytest

from rt_numpy import attention as A
from rt_numpy import baselines, causality, kmeans, model

B, H, T, D, K, W = 1, 2, 32, 4, 4, 8


def _means(rng):
    return kmeans.normalize(rng.standard_normal((H, K, D)))


def _attentions(rng):
    """name -> (fn of x = [q | v] (B, H, T, 2D), expected to be causal)."""
    means = _means(rng)
    rot = baselines.lsh_rotations(H, D, K, seed=3, dtype=np.float64)

    def split(fn):
        return lambda x: fn(x[..., :D], x[..., D:])

    return {
        "dense": (split(lambda q, v: A.dense_causal_attention(q, q, v)), True),
        "local": (split(lambda q, v: A.local_attention(q, q, v, block_size=8)), True),
        "strided": (split(lambda q, v: baselines.strided_attention(q, q, v, stride=4)), True),
        "nearest": (split(lambda q, v: A.routing_attention(q, None, v, means, membership="nearest", impl="ref")[0]),
                    True),
        "balanced": (split(lambda q, v: A.routing_attention(q, None, v, means, window_size=W, impl="ref")[0]),
                     False),
        "balanced-numba": (split(lambda q, v: A.routing_attention(q, None, v, means, window_size=W,
                                                                  impl="numba")[0]), False),
        "lsh": (split(lambda q, v: baselines.lsh_attention(q, None, v, rot, window_size=W)), False),
    }


@pytest.mark.parametrize("name", ["dense", "local", "strided", "nearest", "balanced", "balanced-numba", "lsh"])
def test_every_attention_gets_the_certificate_it_deserves(name, rng):
    fn, causal = _attentions(rng)[name]
    x = rng.standard_normal((B, H, T, 2 * D))
    cert = causality.certify(fn, x, rng=rng, time_axis=2, n_positions=T - 1)
    assert cert.passed == causal, str(cert)
    if causal:
        assert cert.worst <= 1e-12
    else:
        assert cert.worst > 1e-3  # a leak at the size of the outputs, not rounding
        assert cert.failing()[0][2] == pytest.approx(cert.worst)


def test_balanced_routing_leaks_through_eviction_above_all(rng):
    """Copies of earlier tokens compete for their clusters: the evict perturbation finds more leaking
    positions than one random token does."""
    fn, _ = _attentions(rng)["balanced"]
    x = rng.standard_normal((B, H, T, 2 * D))
    cert = causality.certify(fn, x, rng=rng, time_axis=2, n_positions=T - 1)
    tol = cert.tol * cert.scale
    assert (cert.leak["evict"] > tol).sum() >= (cert.leak["token"] > tol).sum()
    assert (cert.leak["evict"] > tol).any()


@pytest.mark.parametrize("changes,causal", [(dict(n_route_heads=0), True), (dict(membership="nearest"), True),
                                            (dict(attention="strided"), True), ({}, False),
                                            (dict(attention="lsh"), False)])
def test_models_through_token_ids(changes, causal, rng):
    sizes = dict(seq_len=32, width=16, n_layers=2, num_heads=2, n_route_heads=1, num_clusters=4, window_size=8,
                 block_size=8, dtype="float64")
    cfg = model.Config(**{**sizes, **changes})
    r = np.random.default_rng(0)
    params, states = model.init_params(cfg, r), model.init_kmeans(cfg, r)
    # larger weights than GPT-2's 0.02, so that the routing choices depend clearly on the content
    params = {k: v * 10 if v.ndim == 2 and k != "wpe" else v for k, v in params.items()}
    ids = rng.integers(0, 256, (2, 32))
    cert = causality.certify(lambda x: model.forward(params, x, cfg, states)[0], ids, rng=rng, vocab_size=256,
                             n_positions=31)
    assert cert.passed == causal, str(cert)


def test_a_callback_from_another_framework_is_just_a_function(rng):
    """What tutorials do with torch: a wrapper that converts to and from NumPy (here float32 round trips)."""
    def framework_attention(x):
        q = x.astype(np.float32)
        return A.dense_causal_attention(q, q, q).astype(np.float32)

    cert = causality.certify(framework_attention, rng.standard_normal((1, 1, 16, 4)), rng=rng, time_axis=2)
    assert cert.passed and cert.tol == 1e-4
    assert "causal" in str(cert) and "NOT" not in str(cert)


def test_a_future_peek_is_caught_at_the_right_position(rng):
    """An attention with an off-by-one mask (query i sees key i + 1) fails at every tested position."""
    def off_by_one(x):
        T = x.shape[2]
        visible = np.arange(T)[None, :] <= np.arange(T)[:, None] + 1
        return A.masked_attention(x, x, x, visible, scale=0.5)

    cert = causality.certify(off_by_one, rng.standard_normal((1, 1, 12, 4)), rng=rng, time_axis=2,
                             perturbations=("token",), positions=[0, 5, 10])
    assert not cert.passed
    assert [c[1] for c in cert.failing()] and set(c[1] for c in cert.failing()) == {0, 5, 10}


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(fn=3), TypeError, "fn must be callable"),
    (dict(x=np.zeros((1, 1))), ValueError, "at least 2 positions"),
    (dict(x=np.array([[1.0, np.nan, 2.0]])), ValueError, "non-finite"),
    (dict(x=np.zeros((1, 4), np.int64)), ValueError, "needs vocab_size"),
    (dict(time_axis=3), ValueError, "time_axis must be in"),
    (dict(positions=[3]), ValueError, r"positions must be in \[0, 2\] \(T=4\), got 3"),
    (dict(perturbations=("swap",)), ValueError, "perturbations must be one of"),
    (dict(fn=lambda x: x[:, :2]), ValueError, "must return an array with T=4 positions"),
    (dict(rng=0), TypeError, "rng"),
])
def test_bad_input_is_named(kwargs, exc, pattern):
    args = dict(fn=lambda x: x, x=np.zeros((1, 4)), rng=np.random.default_rng(0))
    args.update(kwargs)
    fn, x = args.pop("fn"), args.pop("x")
    with pytest.raises(exc, match=pattern):
        causality.certify(fn, x, **args)


def test_certify_command_on_a_balanced_routing_checkpoint(tmp_path):
    """`python -m rt_numpy certify` exits 1 with the report for the tiny preset (balanced routing)."""
    import subprocess
    import sys

    run = [sys.executable, "-m", "rt_numpy"]
    trained = subprocess.run(run + ["train", "--preset", "tiny", "--steps", "5", "--out", str(tmp_path),
                                    "--no-progress"], capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = subprocess.run(run + ["certify", str(tmp_path / "checkpoint"), "--windows", "2", "--positions", "8"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "NOT causal" in result.stdout and "evict" in result.stdout
