"""Checks for the exercises of tutorial 03 (a tiny routing language model end to end).

Each ``check_*`` raises AssertionError with a hint when the answer is wrong and
returns None when it is right.  Expected values come from rt_numpy
(``model.param_shapes``, ``model.loss``, ``sample.filter_logits``) or from
properties, never from stored numbers.
"""
import dataclasses
import math

import numpy as np

from rt_numpy import data, model, sample

CHANCE = 1 / len(data.VALUE_ALPHABET)


# ----------------------------------------------------------------------------- 3.1
def check_count_params(count_params):
    """Exercise 3.1: ``count_params(cfg)`` -> {name: size}, equal to ``model.param_shapes`` for several Configs."""
    base = model.Config(seq_len=64, width=32, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                        num_clusters=4, window_size=16, block_size=16)
    cases = [("the tutorial's kind of Config", base),
             ("3 layers, ff_mult=2, V=100, T=32", dataclasses.replace(base, n_layers=3, ff_mult=2, vocab_size=100,
                                                                       seq_len=32)),
             ("shared_qk=False", dataclasses.replace(base, shared_qk=False)),
             ("tie_embeddings=False", dataclasses.replace(base, tie_embeddings=False)),
             ('pos_encoding="rotary"', dataclasses.replace(base, pos_encoding="rotary"))]
    for label, cfg in cases:
        yours = count_params(cfg)
        assert isinstance(yours, dict), f"return a dict name -> number of entries, got {type(yours).__name__}"
        expected = {name: math.prod(shape) for name, shape in model.param_shapes(cfg).items()}
        missing, extra = sorted(set(expected) - set(yours)), sorted(set(yours) - set(expected))
        assert not missing, f"for {label}: your dict lacks {missing[:6]} (names as in the tutorial's listing)"
        assert not extra, f"for {label}: these are not parameters of this model: {extra[:6]}"
        wrong = {name: (int(yours[name]), size) for name, size in expected.items() if int(yours[name]) != size}
        if wrong:
            name, (got, want) = next(iter(wrong.items()))
            raise AssertionError(f"for {label}: {name} has {want:,} entries, you counted {got:,}"
                                 f"{' (and ' + str(len(wrong) - 1) + ' more wrong)' if len(wrong) > 1 else ''}")


# ----------------------------------------------------------------------------- 3.2
def check_answers_cross_entropy(answers_cross_entropy):
    """Exercise 3.2: the mean cross-entropy over the masked positions, as ``model.loss(..., mask=mask)``."""
    cfg = model.Config(seq_len=32, width=16, n_layers=1, num_heads=2, n_route_heads=1, n_route_layers=1,
                       num_clusters=2, window_size=16, block_size=8, dtype="float64")
    rng = np.random.default_rng(32)
    params = model.init_params(cfg, rng)
    params["wte"] = params["wte"] * 10  # confident logits, so that a wrong mean shows
    states = model.init_kmeans(cfg, rng)
    x, y, mask = data.recall_task(3, cfg.seq_len, rng=rng, n_pairs=4, key_len=1, value_len=1, distance=16)
    logits = np.asarray(model.forward(params, x, cfg, states)[0])  # (B, T, V)
    lib = float(model.loss(params, x, y, cfg, states, mask=mask)[1]["cross_entropy"])
    yours = float(answers_cross_entropy(logits.copy(), y.copy(), mask.copy()))
    everywhere = float(model.loss(params, x, y, cfg, states)[1]["cross_entropy"])
    if not np.isclose(yours, lib, rtol=1e-9, atol=0):
        if np.isclose(yours, everywhere, rtol=1e-9):
            hint = "that is the mean over every position: count only those where the mask is True"
        elif np.isclose(yours, lib * mask.sum() / mask.size, rtol=1e-9):
            hint = "you summed over the answers but divided by B * T: divide by the number of answers"
        elif np.isclose(yours, lib * mask.sum(), rtol=1e-9):
            hint = "that is the sum over the answers: take the mean"
        else:
            hint = "check the sign, the log-softmax (log of the sum of exp over V) and the indexing by targets"
        raise AssertionError(f"got {yours:.6f} nats, expected {lib:.6f} (model.loss with mask=mask): {hint}")
    big = logits * 1000.0  # exp(1000 z) overflows without the shift
    z = big[mask]  # (N, V)
    shifted = z - z.max(axis=-1, keepdims=True)
    want = float(np.mean(np.log(np.exp(shifted).sum(-1)) - shifted[np.arange(len(z)), y[mask]]))
    with np.errstate(all="ignore"):
        got = float(answers_cross_entropy(big, y.copy(), mask.copy()))
    assert np.isfinite(got) and np.isclose(got, want, rtol=1e-9), (
        f"with logits of size ~1000 you get {got}, expected {want:.4f}: subtract each row's maximum before exp")


# ----------------------------------------------------------------------------- 3.3
def check_nucleus_probs(nucleus_probs):
    """Exercise 3.3: probabilities after temperature and top-p, equal to softmax(sample.filter_logits(z / t))."""
    rng = np.random.default_rng(33)
    z = rng.standard_normal(64) * 2.0  # no ties
    for temperature, top_p in ((1.0, 0.9), (0.5, 0.6), (2.0, 0.3), (1.3, 1.0), (0.7, 0.05)):
        filtered = sample.filter_logits(z / temperature, top_p=top_p)  # (V,), -inf where removed
        want = np.exp(filtered - filtered.max())
        want /= want.sum()
        yours = np.asarray(nucleus_probs(z.copy(), temperature, top_p), dtype=float)
        label = f"temperature {temperature}, top_p {top_p}"
        assert yours.shape == z.shape, f"for {label}: return a (V,) vector, got shape {yours.shape}"
        assert np.isclose(yours.sum(), 1.0, atol=1e-9), (
            f"for {label}: your probabilities add up to {yours.sum():.4f}: renormalise the kept bytes")
        kept, want_kept = np.flatnonzero(yours > 0), np.flatnonzero(want > 0)
        if len(kept) != len(want_kept) or not np.array_equal(kept, want_kept):
            hint = ""
            if len(kept) == len(want_kept) - 1:
                hint = " the byte whose probability crosses top_p must stay (keep while the mass *above* it < top_p)"
            elif len(kept) == len(want_kept) + 1:
                hint = " you keep one byte too many"
            else:
                hint = " (divide by the temperature before filtering: the set of kept bytes depends on it)"
            raise AssertionError(f"for {label}: you keep {len(kept)} bytes, the nucleus has {len(want_kept)}.{hint}")
        assert np.allclose(yours, want, rtol=1e-9, atol=1e-12), (
            f"for {label}: the right bytes, wrong probabilities: softmax of logits / temperature over the kept "
            f"bytes (largest gap {np.abs(yours - want).max():.2e})")


# ----------------------------------------------------------------------------- 3.4
def check_local_limit(local_limit):
    """Exercise 3.4: ``local_limit()`` -> ({distance: accuracy}, reach); local is at chance beyond 2 * reach."""
    answer = local_limit()
    assert isinstance(answer, tuple) and len(answer) == 2, "return a pair (results, reach)"
    results, reach = answer
    assert isinstance(results, dict) and len(results) >= 3, "results: a dict of at least three distances"
    assert isinstance(reach, (int, np.integer)) and reach >= 1, f"reach: a positive integer, got {reach!r}"
    for d, acc in results.items():
        assert isinstance(d, (int, np.integer)) and d >= 1, f"distances are positive integers, got {d!r}"
        assert 0.0 <= float(acc) <= 1.0, f"accuracy at distance {d} is {acc}: a fraction in [0, 1]"
    assert min(results) <= reach, f"try at least one distance within the local reach ({reach} tokens)"
    assert max(results) > 2 * reach, f"try at least one distance beyond twice the reach (> {2 * reach} tokens)"
    far = {d: float(a) for d, a in results.items() if d > 2 * reach}
    too_good = {d: a for d, a in far.items() if a > CHANCE + 0.2}
    assert not too_good, (
        f"at distances {sorted(too_good)} (beyond twice the reach of {reach}) your local model scores "
        f"{[round(a, 2) for a in too_good.values()]}, far above chance ({CHANCE:.2f}): no local-only model can "
        f"see that far. Is it really local only (n_route_heads=0)? Is `reach` the reach of that model? Are the "
        f"held-out rows drawn apart from the training rows?")
