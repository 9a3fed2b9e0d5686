"""Agreement with the PyTorch port (``routing-transformer`` 1.6.1), and every convention where they differ.

What is checked (docs/algorithm.md#1-one-routing-head; docs/conventions.md is the table these tests back):

1. with :func:`rt_numpy.crosscheck.port_conventions`, rt_numpy's routing attention equals the port's
   ``KmeansAttention`` (causal; shared QK, and separate QK with its memory key/value): outputs,
   windows, assignments, the auxiliary (commitment) loss and the gradients of q, k, v and the
   memory, to 1e-5 relative in float32 and 1e-10 in float64, with the centroids set explicitly;
2. our spherical k-means update equals the port's ``Kmeans`` update;
3. one test per convention difference (``test_convention_*``), each showing the port's behaviour
   and the rt_numpy option that reproduces it, and that rt_numpy's default differs.

Skipped cleanly when torch or the port is not installed (``pip install -e ".[port]"``).
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
rt_port = pytest.importorskip("routing_transformer.routing_transformer")

from rt_numpy import attention, crosscheck, kmeans, model  # noqa: E402

B, H, T, D, K, W = 2, 2, 16, 8, 4, 4
RTOL = {np.float32: 1e-5, np.float64: 1e-10}


# ------------------------------------------------------------------------------ helpers
pytestmark = pytest.mark.usefixtures("torch_float64")  # tests/conftest.py: port modules in float64


def _inputs(seed=0, dtype=np.float64, norm="l2"):
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((B, H, T, D)).astype(dtype) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((H, K, D)), norm).astype(dtype)
    return q, k, v, g, means


def _port_attention(shared_qk, means, *, train=False, window_size=W):
    """A causal port ``KmeansAttention`` with the given centroids, no dropout, in means' dtype."""
    torch.manual_seed(0)  # the memory key/value are drawn at construction
    heads, clusters, dim = means.shape
    module = rt_port.KmeansAttention(clusters, window_size, heads, dim, causal=True, shared_qk=shared_qk,
                                     dropout=0.0)
    module = module.to(torch.float32 if means.dtype == np.float32 else torch.float64)
    module.kmeans.means.data.copy_(torch.from_numpy(means))
    module.kmeans.initted.data.fill_(True)  # otherwise the port re-initialises from the first batch
    return module.train(train)


def _run_port(module, q, k, v, upstream):
    """The port's numbers under crosscheck's names."""
    shared = module.shared_qk
    B, H, T, _ = q.shape
    K, W = module.num_clusters, module.window_size
    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out, aux = module(tq, tq if shared else tk, tv)
    inputs = [tq, tv] + ([] if shared else [tk])
    mem = [] if shared else [module.mem_key, module.mem_value]
    grads = torch.autograd.grad((out * torch.from_numpy(upstream)).sum(), inputs + mem, retain_graph=True)
    commitment_grads = torch.autograd.grad(aux, [tq] if shared else [tq, tk])
    result = {"out": out, "commitment": aux, "grad_q": grads[0], "grad_v": grads[1],
              "commitment_grad_q": commitment_grads[0]}
    if not shared:
        result.update(grad_k=grads[2], commitment_grad_k=commitment_grads[1],
                      grad_mem_k=grads[3][:, :, 0], grad_mem_v=grads[4][:, :, 0])
    # The routing decisions, recomputed with the port's own functions.
    with torch.no_grad():
        points = torch.from_numpy(q) if shared else torch.cat([torch.from_numpy(q), torch.from_numpy(k)], dim=2)
        dists, _ = module.kmeans(points)  # (B, H, S*T, K), on L2-normalised points
        streams = rt_port.split_at_index(2, T, dists) if not shared else (dists,)
        result["assignments"] = torch.stack([d.argmax(-1) for d in streams])  # (S, B, H, T)
        windows = [rt_port.distribution(d, W).reshape(B, H, K, W) for d in streams]  # top-k order
        result["query_windows"] = windows[0]
        if not shared:
            result["key_windows"] = windows[1]
    return {name: value.detach().numpy() for name, value in result.items()}


def _mem_kv(module):
    return tuple(p.detach().numpy()[:, :, 0] for p in (module.mem_key, module.mem_value))


def _ours(q, k, v, g, means, shared_qk, module=None, **changes):
    options = {**crosscheck.port_conventions(shared_qk), **changes}
    mem = _mem_kv(module) if module is not None and not shared_qk and "mem_kv" not in changes else None
    if "mem_kv" in changes:
        mem = options.pop("mem_kv")
    return crosscheck.reference(q, None if shared_qk else k, v, means, window_size=W, upstream=g,
                                shared_qk=shared_qk, mem_kv=mem, **options)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# ------------------------------------------------------------------------------ 1-2. agreement
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_routing_attention_equals_port(shared_qk, dtype):
    q, k, v, g, means = _inputs(1, dtype)
    module = _port_attention(shared_qk, means)
    theirs = _run_port(module, q, k, v, g)
    ours = _ours(q, k, v, g, means, shared_qk, module)
    names = ["out", "commitment", "grad_q", "grad_v", "commitment_grad_q", "assignments", "query_windows"]
    if not shared_qk:
        names += ["grad_k", "commitment_grad_k", "grad_mem_k", "grad_mem_v", "key_windows"]
    errors = crosscheck.assert_close(ours, theirs, rtol=RTOL[dtype], names=names)
    assert set(errors) == set(names)
    assert ours["out"].dtype == dtype and float(ours["commitment"]) > 0


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_kmeans_update_equals_port(shared_qk, dtype):
    q, k, v, g, means = _inputs(2, dtype)
    module = _port_attention(shared_qk, means, train=True)
    module(*(torch.from_numpy(x) for x in (q, q if shared_qk else k, v)))  # train mode: collects new means
    module.kmeans.update()
    ours = _ours(q, k, v, g, means, shared_qk, module)
    new_means = module.kmeans.means.numpy()
    assert _rel(ours["new_means"], new_means) <= RTOL[dtype]
    assert _rel(new_means, means) > 1e-6  # the step moved the centroids: the check is not vacuous


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shared_qk", [True, False], ids=["shared_qk", "separate_qk"])
def test_commitment_loss_equals_port_auxiliary_loss(shared_qk, dtype):
    q, k, v, g, means = _inputs(3, dtype)
    points = torch.from_numpy(q) if shared_qk else torch.cat([torch.from_numpy(q), torch.from_numpy(k)], dim=2)
    _, aux = _port_attention(shared_qk, means).kmeans(points)
    streams = [kmeans.normalize(q, "l2")] + ([] if shared_qk else [kmeans.normalize(k, "l2")])
    ours = kmeans.commitment_loss(streams, means, commitment=1e-4, commitment_qk="mean")
    assert abs(float(ours) - aux.item()) <= RTOL[dtype] * aux.item()


@settings(max_examples=12, deadline=None, derandomize=True)
@given(shape=st.tuples(st.integers(1, 2), st.integers(1, 2), st.integers(1, 12), st.sampled_from([2, 4, 6]),
                       st.integers(1, 4)),
       window=st.integers(1, 12), shared_qk=st.booleans(), seed=st.integers(0, 2**16))
def test_agreement_over_shapes(shape, window, shared_qk, seed):
    """Float64 agreement for any (B, H, T, D, K) and W <= T, including K = 1, W = 1 and W = T."""
    b, h, t, d, c = shape
    w = min(window, t)
    rng = np.random.default_rng(seed)
    q, k, v, g = (rng.standard_normal((b, h, t, d)) for _ in range(4))
    means = kmeans.normalize(rng.standard_normal((h, c, d)), "l2")
    module = _port_attention(shared_qk, means, window_size=w)
    theirs = _run_port(module, q, k, v, g)
    ours = crosscheck.reference(q, None if shared_qk else k, v, means, window_size=w, upstream=g,
                                shared_qk=shared_qk, mem_kv=None if shared_qk else _mem_kv(module),
                                **crosscheck.port_conventions(shared_qk))
    names = sorted(set(theirs))
    crosscheck.assert_close(ours, theirs, rtol=1e-10, names=names)


# ------------------------------------------------------------------------------ 3. conventions
def test_convention_norm_port_routes_unit_vectors():
    """Port: L2 (unit vectors); official and rt default: parameter-free layer norm."""
    q, _, _, _, means = _inputs(4)
    dists, _ = _port_attention(True, means).kmeans(torch.from_numpy(q))
    ours_l2 = kmeans.similarities(kmeans.normalize(q, "l2"), means)
    ours_ln = kmeans.similarities(kmeans.normalize(q, "ln"), means)
    assert _rel(ours_l2, dists.numpy()) < 1e-12
    assert _rel(ours_ln, dists.numpy()) > 0.5  # ln vectors have norm about sqrt(D)


@pytest.mark.parametrize("shared_qk", [True, False])
def test_convention_logits_scaled_raw_queries(shared_qk):
    """Port: raw q against (L2-normalised with shared QK) keys over sqrt(D); official: normalised, no 1/sqrt(D)."""
    q, k, v, g, means = _inputs(5)
    module = _port_attention(shared_qk, means)
    theirs = _run_port(module, q, k, v, g)["out"]
    assert _rel(_ours(q, k, v, g, means, shared_qk, module)["out"], theirs) < 1e-10
    assert _rel(_ours(q, k, v, g, means, shared_qk, module, logits="normalized")["out"], theirs) > 1e-3


def test_convention_raw_keys_under_shared_qk_differ_by_order_one():
    """With shared QK the port L2-normalises the keys: q_i . q_j / (|q_j| sqrt(D)), not q_i . q_j / sqrt(D)."""
    q, k, v, g, means = _inputs(5)
    module = _port_attention(True, means)
    theirs = _run_port(module, q, k, v, g)["out"]
    # Separate QK with k = q and the self rule is exactly "raw keys under shared QK".
    raw_keys = crosscheck.reference(q, q, v, means, window_size=W, upstream=g, shared_qk=False,
                                    **crosscheck.port_conventions(True))["out"]
    assert _rel(raw_keys, theirs) > 1e-2


def test_convention_self_token_last_resort():
    """Port (shared QK): the self logit is -5e4; official and rt default: a token may attend to itself."""
    q, k, v, g, means = _inputs(6)
    theirs = _run_port(_port_attention(True, means), q, k, v, g)["out"]
    assert rt_port.TOKEN_SELF_ATTN_VALUE == attention.SELF_LOGIT
    assert _rel(_ours(q, k, v, g, means, True)["out"], theirs) < 1e-10
    assert _rel(_ours(q, k, v, g, means, True, self_attend="allow")["out"], theirs) > 1e-3


def test_convention_masked_logits_change_nothing():
    """Port fills masked logits with -finfo.max; rt_numpy leaves them out of the softmax (weight exactly 0).

    The two agree bit for bit whenever a row has a visible key, which every port row has (the self
    logit under shared QK, the memory key otherwise).
    """
    fill = rt_port.max_neg_value(torch.zeros(1))
    assert fill == -torch.finfo(torch.float64).max
    logits = torch.tensor([fill, -5e4, fill, 1.0 - 5e4])
    port_probs = logits.softmax(-1).numpy()
    from rt_numpy import ops
    ours = ops.softmax(np.array([0.0, -5e4, 0.0, 1.0 - 5e4]), mask=np.array([False, True, False, True]))
    assert port_probs[0] == 0.0 and port_probs[2] == 0.0
    np.testing.assert_allclose(ours, port_probs, rtol=1e-15, atol=0)


def test_convention_window_order_top_k():
    """Port: each window in decreasing similarity; official and rt: sorted by position (the same set)."""
    q, k, v, g, means = _inputs(7)
    theirs = _run_port(_port_attention(True, means), q, k, v, g)["query_windows"]
    ours = _ours(q, k, v, g, means, True)["query_windows"]
    np.testing.assert_array_equal(np.sort(theirs, axis=-1), ours)
    assert np.all(np.diff(ours, axis=-1) > 0)
    assert np.any(np.diff(theirs, axis=-1) < 0)  # the port's order is not by position


def test_convention_scatter_mean_eps():
    """Port: eps 1e-5; official and rt default: 1e-2.  The outputs differ by (count + 1e-5) / (count + 1e-2)."""
    q, k, v, g, means = _inputs(8)
    theirs = _run_port(_port_attention(True, means), q, k, v, g)["out"]
    official_eps = _ours(q, k, v, g, means, True, combine_eps=1e-2)
    windows = official_eps["query_windows"]
    counts = np.zeros((B, H, T))
    for b in range(B):
        for h in range(H):
            np.add.at(counts[b, h], windows[b, h].ravel(), 1)
    expected = theirs * ((counts + 1e-5) / (counts + 1e-2))[..., None]
    np.testing.assert_allclose(official_eps["out"], expected, rtol=1e-10, atol=1e-14)
    assert _rel(official_eps["out"], theirs) > 1e-3


def test_convention_memory_key_value_with_separate_qk():
    """Port, causal with separate QK: one learned memory key/value per (head, cluster); official: none."""
    q, k, v, g, means = _inputs(9)
    module = _port_attention(False, means)
    assert tuple(module.mem_key.shape) == (H, K, 1, D)
    theirs = _run_port(module, q, k, v, g)["out"]
    assert _rel(_ours(q, k, v, g, means, False, module)["out"], theirs) < 1e-10
    assert _rel(_ours(q, k, v, g, means, False, mem_kv=None)["out"], theirs) > 1e-2


def test_convention_centroid_update_spherical():
    """Port: mu <- decay mu + (1 - decay) normalize(sum); official and rt default: VQ-VAE EMA of counts and sums."""
    q, k, v, g, means = _inputs(10)
    module = _port_attention(False, means, train=True)
    module(*(torch.from_numpy(x) for x in (q, k, v)))
    module.kmeans.update()
    theirs = module.kmeans.means.numpy()
    assert _rel(_ours(q, k, v, g, means, False, module)["new_means"], theirs) < 1e-12
    ema = _ours(q, k, v, g, means, False, module, centroid_update="ema")["new_means"]
    assert _rel(ema, theirs) > 1e-2  # a fresh EMA state pulls the means to the batch's cluster means


def test_convention_several_passes_average_their_targets():
    """Port: forward passes before one update average their targets.  rt: one update per statistics;
    averaging the updates of each pass (from the same start) reproduces the port, pooling does not."""
    q, k, v, g, means = _inputs(11)
    q2, k2, v2, _, _ = _inputs(12)
    module = _port_attention(False, means, train=True)
    for a, b, c in ((q, k, v), (q2, k2, v2)):
        module(*(torch.from_numpy(x) for x in (a, b, c)))
    module.kmeans.update()
    theirs = module.kmeans.means.numpy()
    state = kmeans.state_from_means(means)
    stats = [kmeans.cluster_stats([kmeans.normalize(a, "l2"), kmeans.normalize(b, "l2")], means, impl="ref")
             for a, b in ((q, k), (q2, k2))]
    updated = [kmeans.update_state(state, s, centroid_update="spherical", norm="l2")["means"] for s in stats]
    assert _rel((updated[0] + updated[1]) / 2, theirs) < 1e-12
    pooled = {"sums": stats[0]["sums"] + stats[1]["sums"], "counts": stats[0]["counts"] + stats[1]["counts"]}
    assert _rel(kmeans.update_state(state, pooled, centroid_update="spherical", norm="l2")["means"], theirs) > 1e-6


def _port_lm(commitment_factor=1e-4):
    torch.manual_seed(0)
    return rt_port.RoutingTransformerLM(num_tokens=16, dim=16, depth=1, max_seq_len=16, heads=2, dim_head=8,
                                        window_size=8, causal=True, commitment_factor=commitment_factor)


@pytest.mark.filterwarnings("ignore:Using a non-full backward hook")  # the port's hook, not ours
def test_convention_updates_only_through_the_lm_hook():
    """Port: a bare KmeansAttention never updates its centroids; its LM updates them in a backward hook.
    rt_numpy: the caller applies kmeans.update_state (or train.train_step does)."""
    q, k, v, g, means = _inputs(13)
    module = _port_attention(True, means, train=True)
    out, aux = module(torch.from_numpy(q).requires_grad_(), torch.from_numpy(q), torch.from_numpy(v))
    (out.sum() + aux).backward()
    np.testing.assert_array_equal(module.kmeans.means.numpy(), means)

    lm = _port_lm().train()
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(1))
    lm(ids)  # the first forward initialises the centroids from the data
    kmeans_module = rt_port.find_modules(lm, rt_port.Kmeans)[0]
    before = kmeans_module.means.clone()
    logits, aux = lm(ids)
    (logits.sum() + aux).backward()
    assert not torch.equal(before, kmeans_module.means)


def test_convention_initialisation_from_raw_data():
    """Port: lazily at the first forward (even in eval), K raw tokens then 10 Lloyd steps on raw vectors.
    rt_numpy: init_state at construction; init="data" on the points given (the port's quirk: pass raw ones)."""
    q, _, _, _, _ = _inputs(14)
    port_kmeans = rt_port.Kmeans(H, D, K).eval()
    torch.manual_seed(5)
    picks = torch.randperm(B * T)[:K].numpy()  # the draw the port makes next
    torch.manual_seed(5)
    with torch.no_grad():
        port_kmeans(torch.from_numpy(q))
    assert bool(port_kmeans.initted)
    theirs = port_kmeans.means.numpy()
    rng = np.random.default_rng(0)
    replay = kmeans.init_state(H, K, D, rng=rng, init="data", points=q, norm="l2", picks=picks)["means"]
    assert _rel(replay, theirs) < 1e-12
    normalised = kmeans.init_state(H, K, D, rng=rng, init="data", points=kmeans.normalize(q, "l2"), norm="l2",
                                   picks=picks)["means"]
    assert _rel(normalised, theirs) > 1e-2  # raw and unit vectors vote differently in the Lloyd steps


@pytest.mark.parametrize("shared_qk", [True, False])
def test_convention_commitment_combine(shared_qk):
    """Port: one mean over cat(q, k) (e_q with shared QK); official and rt default "sum": e_q + e_k (2 e_q)."""
    q, k, v, g, means = _inputs(15)
    theirs = _run_port(_port_attention(shared_qk, means), q, k, v, g)["commitment"]
    summed = _ours(q, k, v, g, means, shared_qk, commitment_qk="sum",
                   mem_kv=None if shared_qk else _mem_kv(_port_attention(False, means)))["commitment"]
    np.testing.assert_allclose(summed, 2 * theirs, rtol=1e-12)


def test_convention_lm_ignores_commitment_factor():
    """Port: RoutingTransformerLM drops its commitment_factor (every Kmeans keeps 1e-4).  rt_numpy honours it."""
    default, asked = _port_lm(1e-4).eval(), _port_lm(1.0).eval()
    assert [m.commitment for m in rt_port.find_modules(asked, rt_port.Kmeans)] == [1e-4]
    ids = torch.randint(0, 16, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.manual_seed(3)  # the lazy k-means initialisation draws its tokens at the first forward
        aux_default = default(ids)[1].item()
        torch.manual_seed(3)
        aux_asked = asked(ids)[1].item()
    assert aux_asked == aux_default > 0

    cfg = model.Config(vocab_size=16, seq_len=16, width=16, n_layers=1, num_heads=2, n_route_heads=2,
                       n_route_layers=1, num_clusters=2, window_size=8, block_size=8, dtype="float64")
    params = model.init_params(cfg, np.random.default_rng(0))
    states = model.init_kmeans(cfg, np.random.default_rng(1))
    ids_np = ids.numpy()
    base = model.forward(params, ids_np, cfg, states, impl="ref")[1]["commitment"]
    cfg_big = model.Config(**{**cfg.to_dict(), "commitment": 1.0})
    big = model.forward(params, ids_np, cfg_big, states, impl="ref")[1]["commitment"]
    np.testing.assert_allclose(big, base * 1e4, rtol=1e-12)


def test_convention_rotary_pairs_and_values():
    """Port: rotary on interleaved pairs (2i, 2i+1) and also on the values; rt_numpy: on pairs (i, i + D/2) of
    queries and keys only.  The two rotations are the same up to a permutation of the head dims."""
    rng = np.random.default_rng(16)
    q, k, v = (rng.standard_normal((B, H, T, D)) for _ in range(3))
    inv_freq = 10000.0 ** (-np.arange(0, D, 2) / D)  # the port's FixedPositionalEmbedding, in float64
    angles = np.arange(T)[:, None] * inv_freq[None, :]
    table = torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)[None])  # (1, T, D)
    pq, pk, pv = (t.numpy() for t in rt_port.apply_rotary_pos_emb(*(torch.from_numpy(x) for x in (q, k, v)), table))
    cos, sin = model.rotary_tables(T, D, dtype=np.float64)
    halves = np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])  # interleaved -> halves
    ours = attention.apply_rotary(q[..., halves], cos, sin)
    np.testing.assert_allclose(ours, pq[..., halves], rtol=1e-12, atol=1e-12)
    assert _rel(attention.apply_rotary(q, cos, sin), pq) > 1e-2  # without the permutation they differ
    assert _rel(pv, v) > 1e-2  # the port rotates the values too
