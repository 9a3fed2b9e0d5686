"""Tests for rt_numpy.optim: AdamW, the learning-rate schedule, gradient clipping."""
import math

import numba
import numpy as np
import pytest

from rt_numpy import backend, optim
from rt_numpy.kernels import numba_optim

LR, BETAS, EPS, WD = 0.1, (0.9, 0.95), 1e-8, 0.1


def tiny_params(dtype=np.float64):
    return {"w": np.array([[1.0, -2.0]], dtype=dtype),  # (1, 2): decayed by default
            "b": np.array([0.5], dtype=dtype)}  # (1,): not decayed by default


def random_problem(rng, dtype=np.float64):
    params = {"emb": rng.normal(size=(5, 3)), "w": rng.normal(size=(3, 4)), "g": rng.normal(size=(4,))}
    return {k: v.astype(dtype) for k, v in params.items()}


# --------------------------------------------------------------------------- AdamW
def _steps(params, grads_list, *, reference, weight_decay=WD):
    state = optim.adamw_init(params)
    for grads in grads_list:
        if reference:
            with backend.reference_only():
                params, state = optim.adamw_update(params, grads, state, lr=LR, weight_decay=weight_decay)
        else:
            params, state = optim.adamw_update(params, grads, state, lr=LR, weight_decay=weight_decay)
    return params, state


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weight_decay", [0.0, WD])
def test_fused_adamw_is_bitwise_the_reference(dtype, weight_decay):
    # Same operations, same order, constants rounded to the dtype: the fast path (optim picks
    # rt_numpy.kernels.numba_optim when Numba compiles) must give the same bits, step after step.
    rng = np.random.default_rng(3)
    # "split" has more than 2 x 32k numbers: its slices go to two threads (numba_threads.MIN_NUMBERS_PER_THREAD).
    shapes = {"emb": (37, 5), "w": (5, 129), "g": (129,), "scalar": (), "big": (3, 1000), "split": (70001,)}
    params = {k: rng.normal(size=s).astype(dtype) for k, s in shapes.items()}
    grads_list = [{k: (rng.normal(size=s) * 10.0 ** rng.integers(-6, 3)).astype(dtype) for k, s in shapes.items()}
                  for _ in range(4)]
    fast, fast_state = _steps(params, grads_list, reference=False, weight_decay=weight_decay)
    slow, slow_state = _steps(params, grads_list, reference=True, weight_decay=weight_decay)
    for name in shapes:
        for a, b in ((fast[name], slow[name]), (fast_state["m"][name], slow_state["m"][name]),
                     (fast_state["v"][name], slow_state["v"][name])):
            assert a.dtype == dtype and a.shape == shapes[name]
            np.testing.assert_array_equal(a, b)


def test_fused_adamw_kernel_directly():
    # The kernel itself (also under NUMBA_DISABLE_JIT, where optim keeps to the formula), against the formula.
    rng = np.random.default_rng(4)
    p, g, m = (rng.normal(size=(4, 33)).astype(np.float32) for _ in range(3))
    v = rng.random(size=(4, 33)).astype(np.float32)
    for decay in (True, False):
        new_p, new_m, new_v = numba_optim.adamw(p, g, m, v.T.T, beta1=0.9, beta2=0.95, bias1=1 - 0.9**3,
                                                bias2=1 - 0.95**3, eps=1e-8, lr=0.01, weight_decay=0.1, decay=decay)
        want_m = 0.9 * m + 0.1 * g
        want_v = 0.95 * v + (1.0 - 0.95) * (g * g)
        step = (want_m / (1 - 0.9**3)) / (np.sqrt(want_v / (1 - 0.95**3)) + 1e-8)
        want_p = (p * (1.0 - 0.01 * 0.1) if decay else p) - 0.01 * step
        for got, want in ((new_p, want_p), (new_m, want_m), (new_v, want_v)):
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="g must be an array of p's shape"):
        numba_optim.adamw(p, g[:2], m, v, beta1=0.9, beta2=0.95, bias1=0.1, bias2=0.05, eps=1e-8, lr=0.01,
                          weight_decay=0.0, decay=False)
    assert not numba.config.DISABLE_JIT or backend.kernel_impl(p, g, m, v) == "ref"  # no Python-speed loops


def test_init_zeros_and_step():
    params = tiny_params(np.float32)
    state = optim.adamw_init(params)
    assert state["step"] == 0
    for key in ("m", "v"):
        assert set(state[key]) == set(params)
        for name, p in params.items():
            assert state[key][name].shape == p.shape and state[key][name].dtype == p.dtype
            assert not state[key][name].any()


def test_adamw_two_steps_by_hand():
    # lr 0.1, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on "w" only (ndim 2).
    # w[0,0]: g = 0.1, 0.3.  Step 1: m = 0.01, v = 0.0005, m_hat = 0.1, v_hat = 0.01,
    #   p = 1 * (1 - 0.01) - 0.1 * 0.1 / (0.1 + 1e-8) = 0.89000001.
    #   Step 2: m = 0.9*0.01 + 0.1*0.3 = 0.039, v = 0.95*0.0005 + 0.05*0.09 = 0.004975,
    #   m_hat = 0.039/0.19 = 0.2052632, v_hat = 0.004975/0.0975 = 0.0510256, sqrt = 0.2258886,
    #   p = 0.89000001 * 0.99 - 0.1 * 0.2052632 / 0.2258886 = 0.7902308.
    # w[0,1]: g = -0.2, 0.  Step 1: p = -2 * 0.99 + 0.1 = -1.88.
    #   Step 2: m = -0.018, v = 0.0019, m_hat = -0.0947368, v_hat = 0.0194872, sqrt = 0.1395966,
    #   p = -1.88 * 0.99 + 0.1 * 0.0947368 / 0.1395966 = -1.7933352.
    # b: g = 0.3, 0.3 (no decay).  Both steps m_hat = 0.3, v_hat = 0.09, so each step moves by lr:
    #   p = 0.5 - 0.1 - 0.1 = 0.3.
    params = tiny_params()
    state = optim.adamw_init(params)
    grads = [{"w": np.array([[0.1, -0.2]]), "b": np.array([0.3])},
             {"w": np.array([[0.3, 0.0]]), "b": np.array([0.3])}]
    params, state = optim.adamw_update(params, grads[0], state, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    np.testing.assert_allclose(params["w"], [[0.89000001, -1.88]], rtol=0, atol=1e-8)
    np.testing.assert_allclose(params["b"], [0.4], rtol=0, atol=1e-8)
    np.testing.assert_allclose(state["m"]["w"], [[0.01, -0.02]], rtol=1e-12)
    np.testing.assert_allclose(state["v"]["w"], [[0.0005, 0.002]], rtol=1e-12)
    params, state = optim.adamw_update(params, grads[1], state, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
    assert state["step"] == 2
    np.testing.assert_allclose(state["m"]["w"], [[0.039, -0.018]], rtol=1e-12)
    np.testing.assert_allclose(state["v"]["w"], [[0.004975, 0.0019]], rtol=1e-12)
    np.testing.assert_allclose(params["w"], [[0.7902308, -1.7933352]], rtol=0, atol=1e-7)
    np.testing.assert_allclose(params["b"], [0.3], rtol=0, atol=1e-7)


def test_adamw_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = random_problem(rng)
    names = sorted(params)
    tparams = [torch.tensor(params[n], requires_grad=True) for n in names]
    topt = torch.optim.AdamW(tparams, lr=1e-2, betas=BETAS, eps=EPS, weight_decay=WD)
    state = optim.adamw_init(params)
    mask = {n: True for n in names}  # torch decays every parameter
    for step in range(5):
        lr = optim.lr_schedule(step, max_lr=1e-2, warmup_steps=2, total_steps=5, min_lr=1e-3)
        grads = {n: rng.normal(size=p.shape) for n, p in params.items()}
        params, state = optim.adamw_update(params, grads, state, lr=lr, betas=BETAS, eps=EPS,
                                           weight_decay=WD, decay_mask=mask)
        for group in topt.param_groups:
            group["lr"] = lr
        for n, tp in zip(names, tparams):
            tp.grad = torch.tensor(grads[n])
        topt.step()
    for n, tp in zip(names, tparams):
        np.testing.assert_allclose(params[n], tp.detach().numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state["m"][n], topt.state[tp]["exp_avg"].numpy(), rtol=1e-12)
        np.testing.assert_allclose(state["v"][n], topt.state[tp]["exp_avg_sq"].numpy(), rtol=1e-12)


def test_decay_mask():
    params = tiny_params()
    zero = {n: np.zeros_like(p) for n, p in params.items()}  # zero gradient: only decay moves params
    state = optim.adamw_init(params)
    new, _ = optim.adamw_update(params, zero, state, lr=LR, weight_decay=WD)  # default: ndim >= 2
    np.testing.assert_allclose(new["w"], params["w"] * (1 - LR * WD))
    np.testing.assert_array_equal(new["b"], params["b"])
    new, _ = optim.adamw_update(params, zero, state, lr=LR, weight_decay=WD, decay_mask={"w": False, "b": True})
    np.testing.assert_array_equal(new["w"], params["w"])
    np.testing.assert_allclose(new["b"], params["b"] * (1 - LR * WD))
    assert optim.default_decay_mask(params) == {"w": True, "b": False}


def test_adamw_does_not_mutate_inputs():
    rng = np.random.default_rng(1)
    params = random_problem(rng)
    grads = {n: rng.normal(size=p.shape) for n, p in params.items()}
    state = optim.adamw_init(params)
    params, state = optim.adamw_update(params, grads, state, lr=0.1)  # non-zero m, v to start from
    copies = [{n: a.copy() for n, a in d.items()} for d in (params, grads, state["m"], state["v"])]
    new_params, new_state = optim.adamw_update(params, grads, state, lr=0.1)
    for d, c in zip((params, grads, state["m"], state["v"]), copies):
        for n in d:
            np.testing.assert_array_equal(d[n], c[n])
    assert state["step"] == 1 and new_state["step"] == 2
    for n in params:
        assert new_params[n] is not params[n] and not np.shares_memory(new_params[n], params[n])
        assert not np.shares_memory(new_state["m"][n], state["m"][n])


def test_adamw_keeps_float32():
    rng = np.random.default_rng(2)
    params = random_problem(rng, np.float32)
    state = optim.adamw_init(params)
    grads = {n: rng.normal(size=p.shape).astype(np.float32) for n, p in params.items()}
    grads["g"] = grads["g"].astype(np.float64)  # a float64 gradient is cast to its parameter's dtype
    lr = np.float64(1e-3)  # a NumPy float64 scalar must not promote float32 params either
    for _ in range(2):
        params, state = optim.adamw_update(params, grads, state, lr=lr)
    for n in params:
        assert params[n].dtype == state["m"][n].dtype == state["v"][n].dtype == np.float32


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_adamw_rejects_nonfinite_grad(bad):
    params = tiny_params()
    grads = {"w": np.array([[0.1, bad]]), "b": np.array([0.0])}
    with pytest.raises(ValueError, match=r"grads\['w'\].*NaN or inf"):
        optim.adamw_update(params, grads, optim.adamw_init(params), lr=0.1)


@pytest.mark.parametrize("kwargs, match", [
    ({"lr": -0.1}, r"lr must be >= 0.0, got -0.1"),
    ({"lr": float("nan")}, r"lr must be finite, got nan"),
    ({"lr": "0.1"}, r"lr must be a real number, got '0.1'"),
    ({"lr": 0.1, "betas": (1.0, 0.95)}, r"betas\[0\] must be < 1.0, got 1.0"),
    ({"lr": 0.1, "betas": (0.9, -0.5)}, r"betas\[1\] must be >= 0.0, got -0.5"),
    ({"lr": 0.1, "betas": 0.9}, r"betas must be a pair"),
    ({"lr": 0.1, "eps": 0.0}, r"eps must be > 0.0, got 0.0"),
    ({"lr": 0.1, "weight_decay": -1}, r"weight_decay must be >= 0.0, got -1.0"),
    ({"lr": 0.1, "decay_mask": {"w": True}}, r"decay_mask must have the keys of params: missing \['b'\]"),
])
def test_adamw_rejects_bad_hyperparameters(kwargs, match):
    params = tiny_params()
    grads = {n: np.ones_like(p) for n, p in params.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        optim.adamw_update(params, grads, optim.adamw_init(params), **kwargs)


def test_adamw_rejects_mismatched_grads_and_state():
    params = tiny_params()
    state = optim.adamw_init(params)
    with pytest.raises(ValueError, match=r"grads must have the keys of params: missing \['b'\], unexpected \['c'\]"):
        optim.adamw_update(params, {"w": np.ones((1, 2)), "c": np.ones(1)}, state, lr=0.1)
    with pytest.raises(ValueError, match=r"shapes differ for 'w': params \(1, 2\), grads \(2, 1\)"):
        optim.adamw_update(params, {"w": np.ones((2, 1)), "b": np.ones(1)}, state, lr=0.1)
    with pytest.raises(TypeError, match=r"grads\['b'\] must be an array, got list"):
        optim.adamw_update(params, {"w": np.ones((1, 2)), "b": [1.0]}, state, lr=0.1)
    with pytest.raises(ValueError, match=r"state\['step'\] must be >= 0, got -1"):
        optim.adamw_update(params, {n: np.ones_like(p) for n, p in params.items()}, {**state, "step": -1}, lr=0.1)
    with pytest.raises(TypeError, match=r"params\['w'\] must be a float32 or float64 array, got int64"):
        optim.adamw_init({"w": np.ones((2, 2), dtype=np.int64)})


# --------------------------------------------------------------------------- schedule
SCHED = dict(max_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.1)


def test_schedule_values():
    assert optim.lr_schedule(0, **SCHED) == pytest.approx(0.1)  # max_lr * 1 / 10
    assert optim.lr_schedule(4, **SCHED) == pytest.approx(0.5)
    assert optim.lr_schedule(9, **SCHED) == pytest.approx(1.0)  # last warm-up step reaches max_lr
    assert optim.lr_schedule(10, **SCHED) == pytest.approx(1.0)  # cosine starts at max_lr
    assert optim.lr_schedule(60, **SCHED) == pytest.approx(0.55)  # half-way: (max + min) / 2
    assert optim.lr_schedule(35, **SCHED) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert optim.lr_schedule(110, **SCHED) == pytest.approx(0.1)  # total_steps: min_lr
    assert optim.lr_schedule(10_000, **SCHED) == 0.1
    assert optim.lr_schedule(0, max_lr=0.5, warmup_steps=0, total_steps=4) == pytest.approx(0.5)
    assert optim.lr_schedule(3, max_lr=0.5, warmup_steps=3, total_steps=3) == 0.0  # no decay phase
    assert isinstance(optim.lr_schedule(5, **SCHED), float)


def test_schedule_shape():
    lrs = np.array([optim.lr_schedule(s, **SCHED) for s in range(130)])
    assert np.all(np.diff(lrs[:10]) > 0)  # warm-up rises
    assert np.all(np.diff(lrs[10:111]) < 0)  # strictly decreasing until total_steps
    assert np.all(np.diff(lrs[10:]) <= 0)  # and never rises again
    # continuous at the end of the decay: the last cosine step is close to min_lr
    assert lrs[109] - lrs[110] < 1e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"step": -1}, r"step must be >= 0, got -1"),
    ({"step": 1.5}, r"step must be an integer, got 1.5"),
    ({"max_lr": -1.0}, r"max_lr must be >= 0.0, got -1.0"),
    ({"warmup_steps": -2}, r"warmup_steps must be >= 0, got -2"),
    ({"total_steps": 5}, r"total_steps must be >= 10 \(warmup_steps\), got 5"),
    ({"min_lr": 2.0}, r"min_lr must be <= 1.0, got 2.0"),
    ({"min_lr": -0.1}, r"min_lr must be >= 0.0, got -0.1"),
])
def test_schedule_rejects_bad_arguments(kwargs, match):
    args = {"step": 0, **SCHED, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        optim.lr_schedule(args.pop("step"), **args)


# --------------------------------------------------------------------------- clipping
def clip_grads():
    return {"a": np.array([[3.0, 0.0]], dtype=np.float32), "b": np.array([0.0, 4.0, 12.0], dtype=np.float32)}


def test_global_norm():
    assert optim.global_norm(clip_grads()) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    assert optim.global_norm({}) == 0.0
    big = {"x": np.full(4, 1e30, dtype=np.float32)}  # its square overflows float32
    assert optim.global_norm(big) == pytest.approx(2e30)


def test_clip_scales_to_max_norm():
    grads = clip_grads()
    clipped, norm = optim.clip_by_global_norm(grads, 1.0)
    assert norm == pytest.approx(13.0)
    assert optim.global_norm(clipped) == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(clipped["b"], grads["b"] / 13.0, rtol=1e-6)  # direction kept
    assert all(clipped[n].dtype == np.float32 for n in clipped)
    np.testing.assert_array_equal(grads["a"], [[3.0, 0.0]])  # input untouched


@pytest.mark.parametrize("max_norm", [13.5, 100.0, None, np.inf])
def test_clip_leaves_small_gradients(max_norm):
    grads = clip_grads()
    clipped, norm = optim.clip_by_global_norm(grads, max_norm)
    assert norm == pytest.approx(13.0)
    assert clipped is not grads
    for n in grads:
        np.testing.assert_allclose(clipped[n], grads[n], rtol=1e-6)


@pytest.mark.parametrize("max_norm, error, match", [
    (0.0, ValueError, r"max_norm must be > 0.0, got 0.0"),
    (-1, ValueError, r"max_norm must be > 0.0, got -1.0"),
    (np.nan, ValueError, r"max_norm must be finite, got nan"),
    ("1", TypeError, r"max_norm must be a real number, got '1'"),
])
def test_clip_rejects_bad_max_norm(max_norm, error, match):
    with pytest.raises(error, match=match):
        optim.clip_by_global_norm(clip_grads(), max_norm)
