"""Padding masks and variable-length batches (docs/algorithm.md#8-padding).

The property every test here checks, in one form or another: a right-padded
batch gives, at the real positions of each row, what that row gives alone and
unpadded, and nothing at a padded position (its ids, its vectors) changes
anything at a real one.
"""
import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from rt_numpy import attention, baselines, data, kmeans, model, optim, train

B, H, T, D, K, W = 3, 2, 13, 4, 3, 4
LENGTHS = (13, 9, 3)  # a full row, a row with at least W tokens, a row with fewer than W


def _normal(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _key_mask(lengths, T):
    return np.arange(T)[None, :] < np.asarray(lengths)[:, None]  # (B, T)


MEANS = kmeans.normalize(_normal((H, K, D), 3), "l2")
ROTATIONS = baselines.lsh_rotations(H, D, 4, n_hashes=2, seed=5, dtype=np.float64)
ATTENTIONS = {  # kind -> f(q, k, v, key_mask, T) -> output (B, H, T, D)
    "dense": lambda q, k, v, m, n, s: attention.dense_causal_attention(q, k, v, self_attend=s, key_mask=m),
    "local": lambda q, k, v, m, n, s: attention.local_attention(q, k, v, block_size=4, look_back=1, self_attend=s,
                                                                key_mask=m),
    "strided": lambda q, k, v, m, n, s: baselines.strided_attention(q, k, v, stride=3, self_attend=s, key_mask=m),
    "lsh": lambda q, k, v, m, n, s: baselines.lsh_attention(q, q, v, ROTATIONS, window_size=min(3, n), self_attend=s,
                                                            key_mask=m),
    "routing-ref": lambda q, k, v, m, n, s: attention.routing_attention(
        q, k, v, MEANS, window_size=min(W, n), shared_qk=False, self_attend=s, impl="ref", key_mask=m)[0],
    "routing-numba": lambda q, k, v, m, n, s: attention.routing_attention(
        q, q, v, MEANS, window_size=min(W, n), self_attend=s, impl="numba", key_mask=m)[0],
    "nearest": lambda q, k, v, m, n, s: attention.routing_attention(
        q, k, v, MEANS, membership="nearest", shared_qk=False, self_attend=s, key_mask=m)[0],
}


@pytest.mark.parametrize("self_attend", attention.SELF_ATTEND)
@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_padded_batch_equals_each_row_alone(kind, self_attend):
    """Balanced routing too: padding ranks last in every cluster, so the windows of a row's real tokens are
    those of the row alone (with W' = min(W, n) when the row is shorter than W)."""
    q, k, v = (_normal((B, H, T, D), seed) for seed in (0, 1, 2))
    f = ATTENTIONS[kind]
    padded = f(q, k, v, _key_mask(LENGTHS, T), T, self_attend)
    for b, n in enumerate(LENGTHS):
        alone = f(q[b:b + 1, :, :n], k[b:b + 1, :, :n], v[b:b + 1, :, :n], None, n, self_attend)
        np.testing.assert_allclose(padded[b:b + 1, :, :n], alone, rtol=0, atol=1e-12, err_msg=f"row {b}")


@pytest.mark.parametrize("kind", sorted(ATTENTIONS))
def test_padding_changes_nothing_at_real_positions(kind):
    """Other vectors at the padded positions: the real positions' outputs are bitwise the same."""
    q, k, v = (_normal((B, H, T, D), seed) for seed in (0, 1, 2))
    mask = _key_mask(LENGTHS, T)
    junk = [np.where(mask[:, None, :, None], x, 10 * _normal(x.shape, 9 + i)) for i, x in enumerate((q, k, v))]
    one = ATTENTIONS[kind](q, k, v, mask, T, "allow")
    two = ATTENTIONS[kind](*junk, mask, T, "allow")
    np.testing.assert_array_equal(np.where(mask[:, None, :, None], one, 0), np.where(mask[:, None, :, None], two, 0))
    assert np.isfinite(one).all() and np.isfinite(two).all()


@pytest.mark.parametrize("kind", ["dense", "local", "strided", "lsh", "routing-ref", "nearest"])
def test_no_gradient_reaches_padding_from_real_outputs(kind):
    q, k, v = (_normal((B, H, T, D), seed) for seed in (0, 1, 2))
    mask = _key_mask(LENGTHS, T)
    g = _normal((B, H, T, D), 4) * mask[:, None, :, None]  # an upstream gradient on real positions only

    def objective(q_, k_, v_):
        return anp.sum(ATTENTIONS[kind](q_, k_, v_, mask, T, "allow") * g)

    grads = autograd.grad(objective, argnum=(0, 1, 2))(q, k, v)
    for name, grad in zip("qkv", grads):
        assert np.isfinite(grad).all(), name
        np.testing.assert_array_equal(grad[~np.broadcast_to(mask[:, None, :, None], grad.shape)], 0.0,
                                      err_msg=f"d/d{name} at padding")


def test_masked_routing_gradient_matches_finite_differences():
    q, k, v = (_normal((B, H, T, D), seed) for seed in (0, 1, 2))
    mask = _key_mask(LENGTHS, T)
    g = _normal((B, H, T, D), 4)

    def objective(q_):
        out, loss, _ = attention.routing_attention(q_, k, v, MEANS, window_size=W, shared_qk=False, impl="ref",
                                                   commitment=0.5, key_mask=mask)
        return anp.sum(out * g) + loss

    grad = autograd.grad(objective)(q)
    rng = np.random.default_rng(6)
    for _ in range(8):
        index = tuple(int(rng.integers(n)) for n in q.shape)
        step = np.zeros_like(q)
        step[index] = 1e-6
        numeric = (objective(q + step) - objective(q - step)) / 2e-6
        assert abs(numeric - grad[index]) < 1e-6 * max(1.0, abs(numeric)), index


# --------------------------------------------------------------------------- k-means statistics
@pytest.mark.parametrize("impl", ["ref", "numba"])
def test_padding_joins_no_cluster_and_enters_no_statistic(impl):
    x = kmeans.normalize(_normal((B, H, T, D), 0), "l2")
    mask = _key_mask(LENGTHS, T)
    routed = kmeans.route(x, MEANS, W, impl=impl, key_mask=mask)
    stats = kmeans.cluster_stats(x, MEANS, impl=impl, key_mask=mask)
    for got in (routed, {name: stats[name][0] for name in ("assignments", "sums", "counts")}):
        assert (got["assignments"][~np.broadcast_to(mask[:, None, :], got["assignments"].shape)] == -1).all()
        sums, counts = 0.0, 0
        for b, n in enumerate(LENGTHS):
            alone = kmeans.route(x[b:b + 1, :, :n], MEANS, min(W, n), impl="ref")
            np.testing.assert_array_equal(got["assignments"][b, :, :n], alone["assignments"][0])
            sums, counts = sums + alone["sums"], counts + alone["counts"]
        np.testing.assert_array_equal(got["counts"], counts)
        np.testing.assert_allclose(got["sums"], sums, rtol=1e-12, atol=1e-12)
    windows = routed["windows"]
    assert (windows[:2] < np.array(LENGTHS[:2])[:, None, None, None]).all()  # rows with >= W tokens: no padding
    assert set(windows[2].ravel()) >= set(range(LENGTHS[2]))  # a shorter row: every real token in every cluster


def test_numba_top_w_ranks_padding_last_as_the_reference():
    x = kmeans.normalize(_normal((B, H, T, D), 0), "l2")
    mask = _key_mask(LENGTHS, T)
    np.testing.assert_array_equal(kmeans.route(x, MEANS, W, impl="ref", key_mask=mask)["windows"],
                                  kmeans.route(x, MEANS, W, impl="numba", key_mask=mask)["windows"])


def test_commitment_is_the_mean_over_real_tokens():
    x = kmeans.normalize(_normal((B, H, T, D), 0), "l2")
    mask = _key_mask(LENGTHS, T)
    padded = kmeans.commitment_loss(x, MEANS, commitment=1.0, key_mask=mask)
    per_row = [kmeans.commitment_loss(x[b:b + 1, :, :n], MEANS, commitment=1.0) for b, n in enumerate(LENGTHS)]
    np.testing.assert_allclose(padded, np.dot(per_row, LENGTHS) / sum(LENGTHS), rtol=1e-12)
    assert kmeans.commitment_loss(x, MEANS, key_mask=np.zeros((B, T), bool)) == 0.0


def test_an_all_padding_row_gives_finite_outputs():
    q, k, v = (_normal((B, H, T, D), seed) for seed in (0, 1, 2))
    mask = _key_mask((T, 0, 5), T)
    for kind, f in ATTENTIONS.items():
        assert np.isfinite(f(q, k, v, mask, T, "allow")).all(), kind


@pytest.mark.parametrize("bad, error, match", [
    (np.ones((B, T), np.int64), TypeError, "key_mask must have dtype bool"),
    (np.ones((B, T + 1), bool), ValueError, r"key_mask must have shape \(B, T\) = \(3, 13\)"),
    ([[True] * T] * B, TypeError, "key_mask must be a bool array"),
])
def test_bad_key_mask_is_named(bad, error, match):
    q = _normal((B, H, T, D), 0)
    for kind, f in ATTENTIONS.items():
        with pytest.raises(error, match=match):
            f(q, q, q, bad, T, "allow")


# --------------------------------------------------------------------------- the model
CONFIGS = {
    "local": dict(n_route_heads=0),
    "routing": dict(),
    "routing-ref": dict(impl="ref"),
    "nearest-rotary": dict(membership="nearest", pos_encoding="rotary"),
    "strided": dict(attention="strided"),
    "lsh": dict(attention="lsh", n_hashes=2),
    "dense": dict(attention="dense"),
}


def _model(name, dtype="float64"):
    options = {**dict(vocab_size=32, seq_len=16, width=16, n_layers=2, num_heads=2, n_route_heads=1, num_clusters=2,
                      window_size=4, block_size=4, dtype=dtype), **CONFIGS[name]}
    impl = options.pop("impl", "auto")
    cfg = model.Config(**options)
    rng = np.random.default_rng(0)
    return cfg, model.init_params(cfg, rng), model.init_kmeans(cfg, rng), impl


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_model_padded_batch_equals_each_row_alone(name):
    cfg, params, states, impl = _model(name)
    lengths = (16, 11, 2)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, (3, 16))
    mask = _key_mask(lengths, 16)
    logits, aux = model.forward(params, ids, cfg, states, impl=impl, key_mask=mask)
    assert np.isfinite(logits).all()
    for b, n in enumerate(lengths):
        alone, _ = model.forward(params, ids[b:b + 1, :n], cfg, states, impl=impl)
        np.testing.assert_allclose(logits[b:b + 1, :n], alone, rtol=0, atol=1e-12, err_msg=f"row {b}")


@pytest.mark.parametrize("name", ["routing", "lsh"])
def test_model_loss_counts_real_targets_only(name):
    cfg, params, states, impl = _model(name)
    lengths = (16, 11, 2)
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, cfg.vocab_size, (2, 3, 16))
    mask = _key_mask(lengths, 16)
    total, aux = model.loss(params, ids, targets, cfg, states, impl=impl, key_mask=mask)
    nll = []
    for b, n in enumerate(lengths):
        logits, _ = model.forward(params, ids[b:b + 1, :n], cfg, states, impl=impl)
        log_p = logits[0] - np.log(np.exp(logits[0]).sum(axis=-1, keepdims=True))  # (n, V)
        nll.extend(-log_p[np.arange(n), targets[b, :n]])
    np.testing.assert_allclose(aux["cross_entropy"], np.mean(nll), rtol=1e-12)
    answers = mask & (np.arange(16) % 2 == 0)
    _, aux2 = model.loss(params, ids, targets, cfg, states, impl=impl, key_mask=mask, mask=answers)
    assert aux2["cross_entropy"] != aux["cross_entropy"]
    with pytest.raises(ValueError, match="leave no target"):
        model.loss(params, ids, targets, cfg, states, key_mask=mask, mask=~mask)


@pytest.mark.parametrize("name", ["routing", "nearest-rotary", "lsh"])
def test_training_step_ignores_what_padding_holds(name):
    cfg, params, states, impl = _model(name)
    tcfg = train.TrainConfig(steps=10, batch_size=3, warmup_steps=2)
    rng = np.random.default_rng(1)
    x, y = rng.integers(0, cfg.vocab_size, (2, 3, 16))
    mask = _key_mask((16, 11, 2), 16)
    results = []
    for seed in (2, 3):  # two different junks at the padded positions
        junk_x, junk_y = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 3, 16))
        step = train.train_step(params, optim.adamw_init(params), states, np.where(mask, x, junk_x),
                                np.where(mask, y, junk_y), cfg, tcfg, 0, np.random.default_rng(0), impl=impl,
                                key_mask=mask)
        results.append(step)
    (p1, _, s1, m1), (p2, _, s2, m2) = results
    assert m1 == m2
    for name_ in p1:
        np.testing.assert_array_equal(p1[name_], p2[name_], err_msg=name_)
    for layer in s1:
        for field in s1[layer]:
            np.testing.assert_array_equal(s1[layer][field], s2[layer][field])


# --------------------------------------------------------------------------- per-document evaluation
def test_documents_cut_at_markers_and_concatenate_back():
    text = data.encode("tail of one# file: a.py\nx = 1\n# file: b.py\ny = 2\n")
    docs = data.documents(text, data.DOCUMENT_MARKERS["python"])
    assert [data.decode(d) for d in docs] == ["tail of one", "# file: a.py\nx = 1\n", "# file: b.py\ny = 2\n"]
    np.testing.assert_array_equal(np.concatenate(docs), text)
    with pytest.raises(ValueError, match="marker must be non-empty bytes"):
        data.documents(text, "")


def test_document_batches_score_every_target_once_and_never_cross_documents():
    docs = [np.arange(1, 12), np.arange(20, 23), np.array([7]), np.arange(30, 36)]
    seen = {d: [] for d in range(len(docs))}
    for x, y, mask, doc in data.document_batches(docs, 2, 4):
        for row in range(len(doc)):
            n = int(mask[row].sum())
            assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
            np.testing.assert_array_equal(y[row, :n - 1], x[row, 1:n])
            seen[int(doc[row])].extend(y[row, :n])
    for d, text in enumerate(docs):
        assert seen[d] == list(text[1:])


def test_evaluate_documents_equals_each_document_alone():
    cfg, params, states, impl = _model("routing")
    docs = [np.random.default_rng(d).integers(0, cfg.vocab_size, n) for d, n in enumerate((40, 7, 1, 17))]
    result = train.evaluate_documents(params, states, cfg, docs, batch_size=3)
    np.testing.assert_array_equal(result["bytes"], [39, 6, 0, 16])
    assert np.isnan(result["bits_per_byte"][2])
    for d in (0, 1, 3):
        nll = []
        for start in range(0, len(docs[d]) - 1, cfg.seq_len):
            piece = docs[d][start:start + cfg.seq_len + 1]
            logits, _ = model.forward(params, piece[None, :-1], cfg, states)
            log_p = logits[0] - np.log(np.exp(logits[0]).sum(axis=-1, keepdims=True))
            nll.extend(-log_p[np.arange(len(piece) - 1), piece[1:]])
        np.testing.assert_allclose(result["bits_per_byte"][d], np.mean(nll) / np.log(2), rtol=1e-10)
    mean = np.nansum(result["bits_per_byte"] * result["bytes"]) / result["bytes"].sum()
    np.testing.assert_allclose(result["mean_bits_per_byte"], mean, rtol=1e-12)
    with pytest.raises(ValueError, match="hold no target"):
        train.evaluate_documents(params, states, cfg, [np.array([1])], batch_size=2)


def test_cli_prints_per_document_summary_and_extremes(capsys):
    from types import SimpleNamespace

    from rt_numpy import __main__ as cli

    cfg, params, states, _ = _model("routing")
    cfg = model.Config(**{**cfg.to_dict(), "vocab_size": 256})
    params, states = model.init_params(cfg, np.random.default_rng(0)), model.init_kmeans(cfg, np.random.default_rng(0))
    split = data.encode("tail# file: a.py\nx = 1\n# file: b.py\n" + "y = 2\n" * 9)
    cli._print_documents(params, states, cfg, split, SimpleNamespace(corpus="python", batch_size=4), 1, "auto")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test documents: 3 scored, ")
    assert len(lines) == 3 and lines[1].split()[0] == "lowest" and lines[2].split()[0] == "highest"
    assert {lines[1].split()[-1], lines[2].split()[-1]} <= {"tail", "a.py", "b.py"}
