"""AdamW, a warm-up + cosine learning-rate schedule, and gradient clipping.

Parameters and gradients are flat dicts ``name -> array`` (the structure that
:func:`autograd.grad` returns for a params dict).  The optimiser state is a
plain dict passed in and returned, never changed in place::

    state = {"step": int,                 number of updates done so far
             "m":    {name: array},       EMA of gradients         (first moment)
             "v":    {name: array}}       EMA of squared gradients (second moment)

A training step reads::

    grads, norm = clip_by_global_norm(grads, max_norm=1.0)
    lr = lr_schedule(step, max_lr=3e-4, warmup_steps=100, total_steps=5000)
    params, opt_state = adamw_update(params, grads, opt_state, lr=lr)

Every function works on NumPy and CuPy arrays alike (the array module follows
the arrays) and returns new dicts and new arrays: inputs are never mutated, so a
caller may keep the previous params, e.g. to retry a step or compare runs.
"""
from __future__ import annotations

import math

import numpy as np

from rt_numpy import _checks, backend

GRAD_NORM_EPS = 1e-6  # added to the norm before dividing by it (as in PyTorch's clip_grad_norm_)


# --------------------------------------------------------------------------- checks
def _check_same_keys(name, d, params):
    if not isinstance(d, dict):
        raise TypeError(f"{name} must be a dict name -> array, got {type(d).__name__}")
    if set(d) != set(params):
        missing, extra = sorted(set(params) - set(d)), sorted(set(d) - set(params))
        raise ValueError(f"{name} must have the keys of params: missing {missing}, unexpected {extra}")


def _check_grads(grads):
    if not isinstance(grads, dict):
        raise TypeError(f"grads must be a dict name -> array, got {type(grads).__name__}")
    for name, g in grads.items():
        if not hasattr(g, "shape") or not hasattr(g, "dtype"):
            raise TypeError(f"grads[{name!r}] must be an array, got {type(g).__name__}")


# --------------------------------------------------------------------------- AdamW
def adamw_init(params):
    """Zero AdamW state for ``params``.

    Parameters
    ----------
    params : dict of str -> array
        The model parameters, any shapes, float32 or float64.

    Returns
    -------
    dict
        ``{"step": 0, "m": {name: zeros}, "v": {name: zeros}}``, each zero array
        with the shape, dtype and array module of its parameter.
    """
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict name -> array, got {type(params).__name__}")
    for name, p in params.items():
        if not hasattr(p, "dtype") or p.dtype not in (np.float32, np.float64):
            raise TypeError(f"params[{name!r}] must be a float32 or float64 array, got "
                            f"{getattr(p, 'dtype', type(p).__name__)}")
    m = {name: backend.get_array_module(p).zeros_like(p) for name, p in params.items()}
    v = {name: backend.get_array_module(p).zeros_like(p) for name, p in params.items()}
    return {"step": 0, "m": m, "v": v}


def default_decay_mask(params):
    """Which parameters get weight decay by default: those with ``ndim >= 2``.

    Matrices and embeddings are decayed; gains, biases and other vectors are
    not (decaying a layer-norm gain towards 0 fights the normalisation; GPT-2,
    nanoGPT and most LM code bases do the same).

    Returns
    -------
    dict of str -> bool
    """
    return {name: p.ndim >= 2 for name, p in params.items()}


def adamw_update(params, grads, state, *, lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                 decay_mask=None):
    """One AdamW step; returns new params and new state, the inputs are left untouched.

    With ``t = state["step"] + 1``, for every parameter ``p`` with gradient ``g``::

        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        m_hat = m / (1 - beta1**t)              # bias correction: m, v start at 0
        v_hat = v / (1 - beta2**t)
        p = p - lr * weight_decay * p           # only where decay_mask[name]
        p = p - lr * m_hat / (sqrt(v_hat) + eps)

    Parameters
    ----------
    params : dict of str -> array
        Current parameters, float32 or float64, NumPy or CuPy.
    grads : dict of str -> array
        Gradients, same keys and shapes as ``params``; all entries finite.  Each is
        cast to its parameter's dtype, so the new params keep the old dtypes.
    state : dict
        From :func:`adamw_init` or a previous call.
    lr : float
        Learning rate, >= 0 (e.g. from :func:`lr_schedule`).
    betas : (float, float)
        EMA decays of the first and second moments, each in [0, 1).
    eps : float
        Added to ``sqrt(v_hat)``, > 0.
    weight_decay : float
        Decoupled weight-decay coefficient, >= 0.
    decay_mask : dict of str -> bool, optional
        Which parameters are decayed; keys must equal those of ``params``.
        Default :func:`default_decay_mask`: arrays with ``ndim >= 2`` only.

    Returns
    -------
    new_params : dict of str -> array
    new_state : dict
        ``step`` increased by one, new ``m`` and ``v``.

    Raises
    ------
    TypeError, ValueError
        Mismatched keys or shapes, a NaN or infinite gradient (the message names
        the parameter), or a hyper-parameter out of range.

    Notes
    -----
    Adam: Kingma & Ba, arXiv:1412.6980, Algorithm 1.  Decoupled weight decay:
    Loshchilov & Hutter, arXiv:1711.05101, Algorithm 2.  As in PyTorch's
    ``torch.optim.AdamW`` the decay is scaled by ``lr`` (the paper scales it by
    the schedule multiplier ``eta_t`` alone), and decay uses the parameter
    before the Adam step; the results match PyTorch to rounding.  On NumPy
    arrays with Numba, :mod:`rt_numpy.kernels.numba_optim` does the same
    operations in one pass per parameter, with bitwise the same results.
    """
    lr = _checks.real("lr", lr, low=0.0)
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    beta1 = _checks.real("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    beta2 = _checks.real("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    eps = _checks.real("eps", eps, low=0.0, low_open=True)
    weight_decay = _checks.real("weight_decay", weight_decay, low=0.0)

    if not isinstance(state, dict) or not {"step", "m", "v"} <= set(state):
        raise ValueError(f"state must be a dict with keys step, m, v (from adamw_init), got {state!r:.80}")
    t = _checks.integer("state['step']", state["step"], 0) + 1
    _check_grads(grads)
    for name, d in (("grads", grads), ("state['m']", state["m"]), ("state['v']", state["v"])):
        _check_same_keys(name, d, params)
    if decay_mask is None:
        decay_mask = default_decay_mask(params)
    _check_same_keys("decay_mask", decay_mask, params)

    bias1, bias2 = 1.0 - beta1**t, 1.0 - beta2**t
    new_params, new_m, new_v = {}, {}, {}
    for name, p in params.items():
        xp = backend.get_array_module(p)
        g = grads[name]
        if g.shape != p.shape or state["m"][name].shape != p.shape or state["v"][name].shape != p.shape:
            raise ValueError(f"shapes differ for {name!r}: params {tuple(p.shape)}, grads {tuple(g.shape)}, "
                             f"m {tuple(state['m'][name].shape)}, v {tuple(state['v'][name].shape)}")
        if not bool(xp.isfinite(g).all()):
            raise ValueError(f"grads[{name!r}] contains NaN or infinity")
        g = g.astype(p.dtype, copy=False)
        if backend.kernel_impl(p, g, state["m"][name], state["v"][name]) != "numba":
            m = beta1 * state["m"][name] + (1.0 - beta1) * g
            v = beta2 * state["v"][name] + (1.0 - beta2) * (g * g)
            step = (m / bias1) / (xp.sqrt(v / bias2) + eps)
            if decay_mask[name]:
                p = p * (1.0 - lr * weight_decay)  # decoupled: not part of the gradient, so not in m or v
            new_params[name] = p - lr * step
            new_m[name], new_v[name] = m, v
            continue
        from rt_numpy.kernels import numba_optim  # one fused pass, bitwise the same as the lines above

        new_params[name], new_m[name], new_v[name] = numba_optim.adamw(
            p, g, state["m"][name], state["v"][name], beta1=beta1, beta2=beta2, bias1=bias1, bias2=bias2,
            eps=eps, lr=lr, weight_decay=weight_decay, decay=bool(decay_mask[name]))
    return new_params, {"step": t, "m": new_m, "v": new_v}


# --------------------------------------------------------------------------- schedule
def lr_schedule(step, *, max_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate at ``step`` (0-based): linear warm-up, then cosine decay.

    * ``step < warmup_steps``: ``max_lr * (step + 1) / warmup_steps``, so step 0
      already moves and step ``warmup_steps - 1`` reaches ``max_lr``;
    * ``warmup_steps <= step < total_steps``: cosine from ``max_lr`` (at
      ``warmup_steps``) down to ``min_lr`` (reached at ``total_steps``)::

          progress = (step - warmup_steps) / (total_steps - warmup_steps)
          lr = min_lr + 0.5 * (max_lr - min_lr) * (1 + cos(pi * progress))

    * ``step >= total_steps``: ``min_lr``.

    Parameters
    ----------
    step : int
        The update about to be made, >= 0.
    max_lr : float
        Peak learning rate, >= 0.
    warmup_steps : int
        Length of the warm-up, >= 0 (0: start at ``max_lr``).
    total_steps : int
        Step at which the decay ends, >= ``warmup_steps``.
    min_lr : float
        Final learning rate, in [0, max_lr].

    Returns
    -------
    float

    Notes
    -----
    Warm-up for Adam-trained transformers: Vaswani et al., arXiv:1706.03762,
    section 5.3; cosine decay: Loshchilov & Hutter (SGDR), arXiv:1608.03983, eq. 5.
    """
    step = _checks.integer("step", step, 0)
    max_lr = _checks.real("max_lr", max_lr, low=0.0)
    warmup_steps = _checks.integer("warmup_steps", warmup_steps, 0)
    total_steps = _checks.integer("total_steps", total_steps, warmup_steps, what=" (warmup_steps)")
    min_lr = _checks.real("min_lr", min_lr, low=0.0, high=max_lr)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in [0, 1)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- clipping
def global_norm(grads):
    """Euclidean norm of all gradients taken together, as a Python float.

    Parameters
    ----------
    grads : dict of str -> array

    Returns
    -------
    float
        ``sqrt(sum over names of sum(g**2))``, accumulated in float64 so that
        float32 gradients cannot overflow; 0.0 for an empty dict.
    """
    _check_grads(grads)
    total = 0.0
    for g in grads.values():
        xp = backend.get_array_module(g)
        g = g.astype(xp.float64, copy=False)
        total = total + xp.sum(g * g)  # stays on the device until the float() below
    return math.sqrt(float(total))


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients together so that their global norm is at most ``max_norm``.

    Parameters
    ----------
    grads : dict of str -> array
    max_norm : float or None
        Largest allowed norm, > 0.  ``None`` or ``inf``: no clipping (the norm
        is still computed, for logging).

    Returns
    -------
    clipped : dict of str -> array
        A new dict; each gradient multiplied by ``min(1, max_norm / (norm + 1e-6))``,
        dtypes kept.  Without clipping the arrays are the input arrays.
    norm : float
        The global norm before clipping (NaN if any gradient is NaN).

    Notes
    -----
    Pascanu et al., arXiv:1211.5063, section 3.2 (Algorithm 1); same rule as
    ``torch.nn.utils.clip_grad_norm_``.  One scale for all gradients keeps the
    direction of the update.
    """
    if max_norm is not None:
        max_norm = _checks.real("max_norm", max_norm, low=0.0, low_open=True, allow_inf=True)
    norm = global_norm(grads)
    if max_norm is None or math.isinf(max_norm):
        return dict(grads), norm
    scale = min(1.0, max_norm / (norm + GRAD_NORM_EPS))
    return {name: g * scale for name, g in grads.items()}, norm
