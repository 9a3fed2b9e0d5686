"""Tests of rt_numpy.sample: filters, one draw, and the generation loop.

What is checked (docs/algorithm.md#3-the-causal-leak, docs/algorithm.md#6-what-users-ran-into):

1. ``filter_logits``: top-k and top-p on hand-worked examples, ties, -inf entries, batches;
2. ``sample_next``: greedy is the argmax, draws follow the (filtered) distribution, a seed fixes them;
3. ``generate``: bitwise reproducible under a seed, the prompt is kept as the prefix, greedy
   decoding is the argmax of the model's logits at the last position (also past seq_len, where
   the window slides by ``slide``), ``top_k=1`` is greedy, prompts shorter than a block work;
4. the context window: where it starts, before and past seq_len; ``next_logits`` is ``forward``
   on it, never padded;
5. sampling refuses missing centroids (the PyTorch port's failure, docs/algorithm.md#6-what-users-ran-into),
   bad arguments and sizes that cannot fit in memory (before allocating).

The cache itself (and ``cache=``, ``decode_rule=``) is tested in tests/test_cache.py.
"""
import math

import numpy as np
import pytest

from rt_numpy import backend
from rt_numpy import model as M
from rt_numpy import sample as S

NEG = -np.inf


def tiny(**overrides):
    values = dict(vocab_size=256, seq_len=16, width=8, n_layers=2, num_heads=2, n_route_heads=1,
                  n_route_layers=1, num_clusters=2, window_size=4, block_size=4, ff_mult=2, dtype="float64")
    values.update(overrides)
    return M.Config(**values)


def setup(cfg, seed=0):
    rng = np.random.default_rng(seed)
    params, states = M.init_params(cfg, rng), M.init_kmeans(cfg, rng)
    params["wte"] = params["wte"] * 50  # sharper logits than the 0.02 init, so draws and argmaxes mean something
    return params, states


def prompt(B=2, n=8, seed=1, V=256):
    return np.random.default_rng(seed).integers(0, V, (B, n))


# ------------------------------------------------------------------------------ 1. filter_logits
def test_top_k_keeps_the_k_largest():
    out = S.filter_logits(np.array([1.0, 3.0, 2.0, 0.0]), top_k=2)
    np.testing.assert_array_equal(out, [NEG, 3.0, 2.0, NEG])
    np.testing.assert_array_equal(S.filter_logits(np.array([1.0, 3.0, 2.0]), top_k=3), [1.0, 3.0, 2.0])
    np.testing.assert_array_equal(S.filter_logits(np.array([1.0, 3.0, 2.0]), top_k=10), [1.0, 3.0, 2.0])


def test_top_k_ties_go_to_the_lower_token_id():
    np.testing.assert_array_equal(S.filter_logits(np.array([1.0, 2.0, 2.0, 2.0]), top_k=1), [NEG, 2.0, NEG, NEG])
    np.testing.assert_array_equal(S.filter_logits(np.array([1.0, 2.0, 2.0, 2.0]), top_k=2), [NEG, 2.0, 2.0, NEG])


def test_top_p_keeps_the_smallest_nucleus():
    logits = np.log([0.5, 0.1, 0.3, 0.1])
    kept = {p: np.isfinite(S.filter_logits(logits, top_p=p)) for p in (0.3, 0.45, 0.7, 0.85, 0.95, 1.0)}
    np.testing.assert_array_equal(kept[0.3], [True, False, False, False])  # 0.5 >= 0.3 already
    np.testing.assert_array_equal(kept[0.45], [True, False, False, False])
    np.testing.assert_array_equal(kept[0.7], [True, False, True, False])  # 0.5 + 0.3 >= 0.7
    np.testing.assert_array_equal(kept[0.85], [True, True, True, False])  # tie at 0.1: lower id first
    np.testing.assert_array_equal(kept[0.95], [True, True, True, True])
    np.testing.assert_array_equal(kept[1.0], [True, True, True, True])
    out = S.filter_logits(logits, top_p=0.7)
    np.testing.assert_array_equal(out[[0, 2]], logits[[0, 2]])  # survivors unchanged


def test_top_p_exact_boundary_needs_no_extra_token():
    # Four equal logits: probabilities exactly 0.25 each; 0.25 + 0.25 reaches 0.5, so two stay.
    np.testing.assert_array_equal(np.isfinite(S.filter_logits(np.zeros(4), top_p=0.5)), [True, True, False, False])
    np.testing.assert_array_equal(np.isfinite(S.filter_logits(np.zeros(4), top_p=0.25)), [True, False, False, False])


def test_top_p_applies_after_top_k_to_the_renormalised_survivors():
    logits = np.log([0.4, 0.35, 0.25])
    # top-k 2 leaves [0.4, 0.35] -> renormalised [0.533, 0.467]: 0.5 needs only the first.
    np.testing.assert_array_equal(np.isfinite(S.filter_logits(logits, top_k=2, top_p=0.5)), [True, False, False])
    # Without top-k, 0.4 < 0.5 so the second one is needed too.
    np.testing.assert_array_equal(np.isfinite(S.filter_logits(logits, top_p=0.5)), [True, True, False])


def test_filter_logits_rows_are_independent_and_input_untouched():
    logits = np.array([[0.0, 5.0, 1.0, NEG], [3.0, 2.0, 1.0, 0.0]], dtype=np.float32)
    copy = logits.copy()
    out = S.filter_logits(logits, top_k=2)
    np.testing.assert_array_equal(out, [[NEG, 5.0, 1.0, NEG], [3.0, 2.0, NEG, NEG]])
    assert out.dtype == np.float64
    np.testing.assert_array_equal(logits, copy)
    # A -inf entry stays removed even when top_k would keep it.
    np.testing.assert_array_equal(S.filter_logits(logits, top_k=4)[0], [0.0, 5.0, 1.0, NEG])


def test_filter_logits_scale_free_top_p_on_large_logits():
    logits = np.array([1000.0, 999.0, 0.0])  # exp would overflow without the max shift
    np.testing.assert_array_equal(np.isfinite(S.filter_logits(logits, top_p=0.9)), [True, True, False])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
    ({"top_k": 1.5}, TypeError, "top_k must be None or an integer, got 1.5"),
    ({"top_k": True}, TypeError, "top_k"),
    ({"top_p": 0.0}, ValueError, r"top_p must be None or a number in \(0, 1\], got 0.0"),
    ({"top_p": 1.5}, ValueError, "top_p.*1.5"),
    ({"top_p": math.nan}, ValueError, "top_p.*nan"),
])
def test_filter_logits_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        S.filter_logits(np.zeros(4), **kwargs)


@pytest.mark.parametrize("logits, error, match", [
    (np.array([1, 2, 3]), TypeError, "logits must be a float array"),
    ([1.0, 2.0], TypeError, "logits must be a float array"),
    (np.zeros((2, 0)), ValueError, "V >= 1"),
    (np.array([0.0, np.nan]), ValueError, "NaN"),
    (np.array([0.0, np.inf]), ValueError, r"\+inf"),
    (np.array([[0.0, 1.0], [NEG, NEG]]), ValueError, "row of -inf"),
])
def test_bad_logits(logits, error, match):
    with pytest.raises(error, match=match):
        S.filter_logits(logits)


# ------------------------------------------------------------------------------ 2. sample_next
def test_greedy_is_argmax_and_needs_no_rng():
    logits = np.array([[0.0, 2.0, 2.0, 1.0], [5.0, NEG, 0.0, 4.0]])
    np.testing.assert_array_equal(S.sample_next(logits, None, temperature=0), [1, 0])
    assert S.sample_next(logits, None, temperature=0).dtype == np.int64


def test_draws_follow_the_distribution():
    p = np.array([0.5, 0.0, 0.2, 0.3])
    with np.errstate(divide="ignore"):
        logits = np.tile(np.log(p), (20000, 1))  # 20000 independent rows, one draw each
    tokens = S.sample_next(logits, np.random.default_rng(0))
    freq = np.bincount(tokens, minlength=4) / tokens.size
    np.testing.assert_allclose(freq, p, atol=0.015)
    assert freq[1] == 0  # probability 0 is never drawn
    # Temperature 2 flattens: p^(1/2), renormalised.
    flat = np.sqrt(p) / np.sqrt(p).sum()
    freq = np.bincount(S.sample_next(logits, np.random.default_rng(1), temperature=2.0), minlength=4) / 20000
    np.testing.assert_allclose(freq, flat, atol=0.015)


def test_draws_stay_inside_the_filter():
    logits = np.tile(np.log([0.3, 0.25, 0.25, 0.2]), (5000, 1))
    assert set(S.sample_next(logits, np.random.default_rng(0), top_k=2).tolist()) == {0, 1}
    assert set(S.sample_next(logits, np.random.default_rng(0), top_p=0.5).tolist()) == {0, 1}
    assert set(S.sample_next(logits, np.random.default_rng(0), top_k=1).tolist()) == {0}


def test_sample_next_is_fixed_by_the_seed():
    logits = np.random.default_rng(0).standard_normal((64, 10))
    a = S.sample_next(logits, np.random.default_rng(3), temperature=0.7, top_p=0.9)
    b = S.sample_next(logits, np.random.default_rng(3), temperature=0.7, top_p=0.9)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": -1.0}, ValueError, "temperature must be a finite number >= 0.*-1.0"),
    ({"temperature": math.inf}, ValueError, "temperature.*inf"),
    ({"temperature": "hot"}, ValueError, "temperature.*'hot'"),
    ({"rng": 3}, TypeError, "rng must be a numpy.random.Generator"),
    ({"rng": None}, TypeError, "rng must be a numpy.random.Generator"),
    ({"top_k": -2}, ValueError, "top_k must be >= 1, got -2"),
])
def test_sample_next_bad_arguments(kwargs, error, match):
    args = {"rng": np.random.default_rng(0), "temperature": 1.0}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        S.sample_next(np.zeros((2, 4)), **args)


# ------------------------------------------------------------------------------ 3. generate
def test_generate_is_bitwise_reproducible_and_keeps_the_prompt():
    cfg = tiny()
    params, states = setup(cfg)
    ids = prompt()
    a = S.generate(params, cfg, states, ids, 6, rng=np.random.default_rng(42), impl="ref")
    b = S.generate(params, cfg, states, ids, 6, rng=np.random.default_rng(42), impl="ref")
    c = S.generate(params, cfg, states, ids, 6, rng=np.random.default_rng(43), impl="ref")
    assert a.shape == (2, 14) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    np.testing.assert_array_equal(a[:, :8], ids)
    assert a.min() >= 0 and a.max() < cfg.vocab_size


def test_generate_leaves_states_and_params_unchanged():
    cfg = tiny()
    params, states = setup(cfg)
    means = states["h1"]["means"].copy()
    wte = params["wte"].copy()
    S.generate(params, cfg, states, prompt(), 3, rng=np.random.default_rng(0), impl="ref")
    np.testing.assert_array_equal(states["h1"]["means"], means)
    np.testing.assert_array_equal(params["wte"], wte)


def test_zero_new_tokens_and_one_dimensional_prompt():
    cfg = tiny()
    params, states = setup(cfg)
    out = S.generate(params, cfg, states, prompt(B=1)[0], 0, rng=np.random.default_rng(0), impl="ref")
    np.testing.assert_array_equal(out, prompt(B=1))
    out = S.generate(params, cfg, states, prompt(B=1)[0].astype(np.uint8), 2, rng=np.random.default_rng(0),
                     impl="ref")
    assert out.shape == (1, 10) and out.dtype == np.int64


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_greedy_is_argmax_of_forward_at_the_last_position(pos_encoding):
    cfg = tiny(pos_encoding=pos_encoding)
    params, states = setup(cfg)
    ids = prompt(n=8)
    out = S.generate(params, cfg, states, ids, 1, rng=None, temperature=0, impl="ref")
    logits, _ = M.forward(params, ids, cfg, states, impl="ref")
    np.testing.assert_array_equal(out[:, -1], np.argmax(logits[:, -1], axis=-1))
    assert len(set(np.argmax(logits[:, -1], axis=-1).tolist())) == 2  # the rows really differ


@pytest.mark.parametrize("membership, slide", [("balanced", None), ("nearest", None), ("balanced", 1)])
def test_greedy_past_seq_len_follows_the_sliding_window(membership, slide):
    cfg = tiny(membership=membership)
    params, states = setup(cfg)
    ids = prompt(n=10)
    n_new = 14  # 10 + 14 = 24 > seq_len = 16
    out = S.generate(params, cfg, states, ids, n_new, rng=None, temperature=0, impl="ref", slide=slide)
    assert out.shape == (2, 24)
    np.testing.assert_array_equal(out[:, :10], ids)
    step = 8 if slide is None else slide  # the default slide is seq_len // 2
    for n in range(10, 24):
        start = 0 if n <= 16 else -(-(n - 16) // step) * step
        logits, _ = M.forward(params, out[:, start:n], cfg, states, impl="ref")
        np.testing.assert_array_equal(out[:, n], np.argmax(logits[:, -1], axis=-1), err_msg=f"step n={n}")


def test_top_k_one_is_greedy():
    cfg = tiny()
    params, states = setup(cfg)
    greedy = S.generate(params, cfg, states, prompt(), 5, rng=None, temperature=0, impl="ref")
    top1 = S.generate(params, cfg, states, prompt(), 5, rng=np.random.default_rng(9), top_k=1, impl="ref")
    np.testing.assert_array_equal(top1, greedy)


def test_auto_impl_gives_the_reference_tokens():
    if not backend.numba_available():
        pytest.skip("numba is not installed")
    cfg = tiny()
    params, states = setup(cfg)
    ref = S.generate(params, cfg, states, prompt(), 4, rng=np.random.default_rng(0), impl="ref")
    auto = S.generate(params, cfg, states, prompt(), 4, rng=np.random.default_rng(0), impl="auto")
    np.testing.assert_array_equal(auto, ref)


@pytest.mark.parametrize("membership", ["balanced", "nearest"])
@pytest.mark.parametrize("n0", [1, 3])
def test_prompt_shorter_than_a_block(membership, n0):
    cfg = tiny(membership=membership)
    params, states = setup(cfg)
    ids = prompt(n=n0)
    out = S.generate(params, cfg, states, ids, 6, rng=np.random.default_rng(0), temperature=0.8, top_p=0.95,
                     impl="ref")
    assert out.shape == (2, n0 + 6)
    np.testing.assert_array_equal(out[:, :n0], ids)


def test_sampling_before_any_training_works():
    """The PyTorch port fails here (centroids initialised lazily, docs/algorithm.md#6-what-users-ran-into)."""
    cfg = tiny(n_layers=2, n_route_layers=2)
    params, states = setup(cfg)
    assert sorted(states) == ["h0", "h1"]
    out = S.generate(params, cfg, states, prompt(), 2, rng=np.random.default_rng(0), impl="ref")
    assert out.shape == (2, 10)


# ------------------------------------------------------------------------------ 4. the context window
@pytest.mark.parametrize("n, slide, expected", [
    (1, None, 0), (3, None, 0), (15, None, 0), (16, None, 0),  # up to seq_len: the whole sequence
    (17, None, 8), (24, None, 8), (25, None, 16), (23, 1, 7), (17, 5, 5), (26, 5, 10), (31, 15, 15),
])
def test_context_window(n, slide, expected):
    cfg = tiny()
    start = S.context_window(n, cfg, slide)
    assert start == expected
    assert 1 <= n - start <= cfg.seq_len
    assert start % (slide or S.default_slide(cfg)) == 0


@pytest.mark.parametrize("slide", [0, 16, 2.0, True])
def test_context_window_bad_slide(slide):
    with pytest.raises((ValueError, TypeError), match="slide"):
        S.context_window(20, tiny(), slide)


@pytest.mark.parametrize("membership", ["balanced", "nearest"])
def test_next_logits_is_forward_on_the_window(membership):
    cfg = tiny(membership=membership)
    params, states = setup(cfg)
    ids = prompt(n=21)  # past seq_len: the window is ids[:, 8:]
    logits, _ = M.forward(params, ids[:, 8:], cfg, states, impl="ref")
    np.testing.assert_array_equal(S.next_logits(params, cfg, states, ids, impl="ref"), logits[:, -1])
    short, _ = M.forward(params, ids[:, :3], cfg, states, impl="ref")  # shorter than a block: no padding
    np.testing.assert_array_equal(S.next_logits(params, cfg, states, ids[:, :3], impl="ref"), short[:, -1])


# ------------------------------------------------------------------------------ 5. errors
def test_missing_routing_state_is_a_clear_error():
    cfg = tiny(n_layers=3, n_route_layers=2)
    params, states = setup(cfg)
    del states["h2"]
    with pytest.raises(ValueError, match=r"no centroids for routing layer 'h2'.*init_kmeans"):
        S.generate(params, cfg, states, prompt(), 1, rng=np.random.default_rng(0), impl="ref")
    with pytest.raises(ValueError, match=r"routing layer 'h1'"):
        S.generate(params, cfg, {}, prompt(), 1, rng=np.random.default_rng(0), impl="ref")
    with pytest.raises(ValueError, match=r"routing layer 'h1'"):
        S.generate(params, cfg, {"h1": {"counts": None}, "h2": states["h1"]}, prompt(), 1,
                   rng=np.random.default_rng(0), impl="ref")
    with pytest.raises(TypeError, match="kmeans_states must be a dict"):
        S.generate(params, cfg, None, prompt(), 1, rng=np.random.default_rng(0), impl="ref")


def test_bad_centroids_are_a_clear_error():
    cfg = tiny()
    params, states = setup(cfg)
    wrong = {"h1": dict(states["h1"], means=states["h1"]["means"][:, :1])}
    with pytest.raises(ValueError, match=r"kmeans_states\['h1'\]\['means'\] must have shape \(1, 2, 4\)"):
        S.generate(params, cfg, wrong, prompt(), 1, rng=np.random.default_rng(0), impl="ref")
    nan = {"h1": dict(states["h1"], means=np.full_like(states["h1"]["means"], np.nan))}
    with pytest.raises(ValueError, match="NaN"):
        S.generate(params, cfg, nan, prompt(), 1, rng=np.random.default_rng(0), impl="ref")


@pytest.mark.parametrize("change, error, match", [
    ({"prompt_ids": prompt().astype(np.float64)}, TypeError, "prompt_ids must be an integer array"),
    ({"prompt_ids": prompt()[None]}, TypeError, "prompt_ids must be an integer array.*shape"),
    ({"prompt_ids": [1, 2, 3]}, TypeError, "prompt_ids must be an integer array.*list"),
    ({"prompt_ids": np.zeros((2, 0), np.int64)}, ValueError, "at least one token"),
    ({"prompt_ids": prompt() + 256}, ValueError, r"prompt_ids must lie in \[0, vocab_size=256\)"),
    ({"prompt_ids": prompt() - 300}, ValueError, r"prompt_ids must lie in \[0, vocab_size=256\)"),
    ({"n_new": -1}, ValueError, "n_new must be >= 0, got -1"),
    ({"n_new": 2.0}, TypeError, "n_new must be an integer, got 2.0"),
    ({"temperature": -0.5}, ValueError, "temperature.*-0.5"),
    ({"top_k": 0}, ValueError, "top_k must be >= 1, got 0"),
    ({"top_p": 2}, ValueError, "top_p.*2"),
    ({"rng": 0}, TypeError, "rng must be a numpy.random.Generator"),
    ({"rng": None}, TypeError, "rng must be a numpy.random.Generator"),
    ({"impl": "gpu"}, ValueError, "impl must be one of.*'gpu'"),
    ({"cfg": {"vocab_size": 256}}, TypeError, "cfg must be an rt_numpy.model.Config"),
    ({"slide": 0}, ValueError, "slide"),
    ({"cache": "yes"}, ValueError, "cache must be 'auto', True or False, got 'yes'"),
    ({"decode_rule": "fast"}, ValueError, "decode_rule"),
])
def test_generate_bad_arguments(change, error, match):
    cfg = tiny()
    params, states = setup(cfg)
    args = dict(cfg=cfg, prompt_ids=prompt(), n_new=2, rng=np.random.default_rng(0), impl="ref")
    args.update(change)
    with pytest.raises(error, match=match):
        S.generate(params, args.pop("cfg"), states, args.pop("prompt_ids"), args.pop("n_new"), **args)


@pytest.mark.parametrize("B, n_new", [(10**9, 2), (2, 10**13)])
def test_absurd_sizes_are_refused_before_allocating(B, n_new):
    cfg = tiny()
    params, states = setup(cfg)
    ids = np.broadcast_to(np.zeros((1, 3), np.int64), (B, 3))  # a view: nothing of size B exists yet
    with pytest.raises(ValueError, match=rf"generate with {B} prompts of 3 tokens and n_new={n_new} "
                                         rf"would need about .* GiB"):
        S.generate(params, cfg, states, ids, n_new, rng=np.random.default_rng(0), impl="ref")


def test_memory_estimate_grows_with_every_size():
    cfg = tiny()
    base = S.memory_estimate(cfg, 2, 10)
    assert S.memory_estimate(cfg, 4, 10) > base and S.memory_estimate(cfg, 2, 12) > base
    assert S.memory_estimate(cfg, 2, 10, use_cache=True) > base
    assert base >= 8 * 2 * 10 + 2 * 10 * 256 * 8  # at least the tokens and one window's logits
