"""Generation: extend a prompt one byte at a time with a trained (or untrained) model.

* :func:`generate` - the loop: read the logits after the last token of the
  context window, draw the next token, append, repeat; with a key/value cache
  (:mod:`rt_numpy.cache`) where it is exact, or by recomputing the window.
* :func:`next_logits` - the logits of the next token after each sequence of a
  batch, by the full recompute (the context-window rule below, in one place).
* :func:`cache_is_exact` - whether the cache reproduces the full recompute.
* :func:`sample_next` - one draw from logits: temperature, then top-k, then top-p.
* :func:`filter_logits` - the top-k and nucleus (top-p) filters on their own.

The context window
------------------
:func:`rt_numpy.model.forward` takes any T <= seq_len, so the window of a
sequence of n tokens is made of real tokens only, never padded:

* n <= seq_len: the whole sequence, positions 0..n-1.
* n > seq_len: the window slides by whole steps of ``slide`` tokens (default
  seq_len / 2): it starts at the smallest multiple of ``slide`` that leaves at most
  seq_len tokens, and positions (learned or rotary) and local block boundaries
  restart at its first token, as in a training window.  Its length falls back to
  seq_len - slide + 1 after each slide and grows again.

A slide of 1 would keep the longest context but change every position of the
window at every step; whole steps let the cache reuse the window between slides
(each slide costs one forward pass over the new window, a "prefill").  The
logits are always exactly ``forward(window)[:, -1]`` (the full recompute),
cached or not.

The key/value cache
-------------------
``generate(..., cache="auto")`` uses :mod:`rt_numpy.cache` when the model is
strictly causal (``membership="nearest"``, or no routing heads): the keys and
values at earlier positions never change when a token is appended, so one
position per step gives the full recompute's logits to rounding, and the same
tokens for the same seed.  With balanced routing (the default) no cache is
exact: each cluster re-picks its W members over the whole window, so a new
token can evict an earlier member and change the routing output at *earlier*
positions, and the keys and values of the following layers with it
(docs/algorithm.md#9-generation-and-the-keyvalue-cache has a worked example).
There ``cache="auto"`` recomputes the window every step, as the PyTorch port
does (docs/algorithm.md#6-what-users-ran-into); ``cache=True`` is an error; and
``decode_rule="prefix"`` offers the official decoder's rule as a documented
approximation (members chosen among the prefix, states kept).

Past seq_len the cache cannot carry over a slide: the positions of the kept
tokens change (learned positions move; rotary angles keep q.k products that
depend only on the offset, but the nearest centroid of a rotated key depends on
its absolute angle), and local block boundaries move.  So every slide refills
the cache from the new window, with learned or rotary positions alike.

Centroids are read from ``kmeans_states`` and never updated while sampling; a
model can sample before any training because :func:`rt_numpy.model.init_kmeans`
initialises them (the PyTorch port fails there, docs/algorithm.md#6-what-users-ran-into).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from rt_numpy import _checks, backend, model
from rt_numpy import cache as cache_lib


# --------------------------------------------------------------------------- checks
def _check_top_k(top_k):
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be None or an integer, got {top_k!r} of type {type(top_k).__name__}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    return int(top_k)


def _check_top_p(top_p):
    if top_p is None:
        return None
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")
    return float(top_p)


def _check_temperature(temperature):
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not 0.0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    return float(temperature)


def _to_numpy(x):
    """A CuPy array copied to the host; anything else as it is."""
    return x.get() if backend.get_array_module(x) is not np else x


def _check_logits(logits):
    logits = _to_numpy(logits)
    if not isinstance(logits, np.ndarray) or logits.dtype.kind != "f":
        got = getattr(logits, "dtype", type(logits).__name__)
        raise TypeError(f"logits must be a float array (..., V), got {got}")
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have shape (..., V) with V >= 1, got {logits.shape}")
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf")
    if not np.isfinite(logits).any(axis=-1).all():
        raise ValueError("every row of logits needs at least one finite value, got a row of -inf")
    return logits.astype(np.float64)


def routing_layers(cfg):
    """Names of the layers whose k-means state the model reads: ``["h{i}", ...]``."""
    return [f"h{i}" for i in range(cfg.n_layers) if cfg.is_routing_layer(i)]


def check_kmeans_states(cfg, kmeans_states):
    """Every routing layer has finite centroids of shape (n_route_heads, K, D).

    Raises a ValueError naming the missing layer otherwise: sampling needs
    initialised centroids (docs/algorithm.md#6-what-users-ran-into).
    """
    if not isinstance(kmeans_states, dict):
        raise TypeError(f"kmeans_states must be a dict from init_kmeans(cfg, rng), "
                        f"got {type(kmeans_states).__name__}")
    expected = (cfg.n_route_heads, cfg.num_clusters, cfg.head_dim)
    for name in routing_layers(cfg):
        state = kmeans_states.get(name)
        if not isinstance(state, dict) or "means" not in state:
            raise ValueError(f"kmeans_states has no centroids for routing layer {name!r} (routing layers: "
                             f"{routing_layers(cfg)}, got keys {sorted(kmeans_states)}): initialise them "
                             f"with rt_numpy.model.init_kmeans(cfg, rng) before sampling")
        means = state["means"]
        if tuple(getattr(means, "shape", ())) != expected:
            raise ValueError(f"kmeans_states[{name!r}]['means'] must have shape {expected}, "
                             f"got {getattr(means, 'shape', type(means).__name__)}")
        if not bool(backend.get_array_module(means).isfinite(means).all()):
            raise ValueError(f"kmeans_states[{name!r}]['means'] contains NaN or infinity")


# --------------------------------------------------------------------------- filters
def filter_logits(logits, top_k=None, top_p=None):
    """Set to -inf every logit that top-k or nucleus (top-p) filtering removes.

    Parameters
    ----------
    logits : float array (..., V)
        Each row is one distribution (already divided by the temperature).
        -inf entries are allowed (impossible tokens); NaN and +inf are not.
    top_k : int, optional
        Keep the ``top_k`` largest logits of each row (all of them when
        ``top_k >= V``).  Ties are broken towards the lower token id, so exactly
        ``min(top_k, V)`` tokens stay and ``top_k=1`` is the argmax.
    top_p : float in (0, 1], optional
        Nucleus filtering (Holtzman et al., arXiv:1904.09751): keep the smallest
        set of most likely tokens whose probability adds up to at least
        ``top_p``.  Applied after top-k, to the renormalised survivors.
        ``top_p=1`` keeps everything.

    Returns
    -------
    float64 array (..., V)
        A new array; kept entries equal the input, removed entries are -inf.
    """
    top_k, top_p = _check_top_k(top_k), _check_top_p(top_p)
    out = _check_logits(logits).copy()  # (..., V) float64
    V = out.shape[-1]
    # One stable descending order serves both filters: ties go to the lower token id.
    order = np.argsort(-out, axis=-1, kind="stable")  # (..., V) token ids, best first
    ranked = np.take_along_axis(out, order, axis=-1)  # (..., V) logits, best first
    keep = np.ones(out.shape, dtype=bool)  # (..., V) in rank order
    if top_k is not None and top_k < V:
        keep[..., top_k:] = False
    if top_p is not None and top_p < 1.0:
        z = np.where(keep, ranked, -np.inf)
        p = np.exp(z - z[..., :1])  # the first ranked logit is the row's max: no overflow
        p /= p.sum(axis=-1, keepdims=True)  # (..., V) probabilities of the survivors, best first
        before = np.cumsum(p, axis=-1) - p  # probability mass ranked above each token
        keep &= before < top_p  # a token stays while the tokens above it are not yet enough
    np.put_along_axis(out, order, np.where(keep, ranked, -np.inf), axis=-1)
    return out


def sample_next(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Draw one token from each row of ``logits``.

    Parameters
    ----------
    logits : float array (..., V)
    rng : numpy.random.Generator
        The only randomness: one uniform number per row.  May be None when
        ``temperature == 0``.
    temperature : float >= 0
        Logits are divided by it before filtering; 0 means greedy (argmax, the
        lower token id on ties; ``top_k`` and ``top_p`` cannot change it).
    top_k, top_p
        As in :func:`filter_logits`.

    Returns
    -------
    int64 array (...)
        Token ids.

    Notes
    -----
    The draw inverts the cumulative distribution with a single ``rng.random``
    call per step, so a seed fixes the tokens bitwise, on any array backend.
    """
    temperature = _check_temperature(temperature)
    top_k, top_p = _check_top_k(top_k), _check_top_p(top_p)
    logits = _check_logits(logits)  # (..., V) float64
    if temperature == 0.0:
        return np.argmax(logits, axis=-1).astype(np.int64)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator when temperature > 0, got {rng!r}")
    z = filter_logits(logits / temperature, top_k, top_p)  # (..., V)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    cdf = np.cumsum(p, axis=-1)  # (..., V), unnormalised
    u = rng.random(cdf.shape[:-1]) * cdf[..., -1]  # (...) uniform in [0, total)
    # The first token whose cumulative mass exceeds u; a removed token (p = 0)
    # never is the first, since the token before it exceeded u already.
    return np.argmax(cdf > u[..., None], axis=-1).astype(np.int64)


# --------------------------------------------------------------------------- the model side
def default_slide(cfg):
    """How far the window moves once a sequence outgrows ``seq_len``: half of it (at least 1)."""
    return max(1, cfg.seq_len // 2)


def _check_slide(cfg, slide):
    if slide is None:
        return default_slide(cfg)
    return _checks.integer("slide", slide, 1, max(1, cfg.seq_len - 1), what=f" (seq_len={cfg.seq_len})")


def context_window(n, cfg, slide=None):
    """Where the window of a sequence of n tokens starts (see the module docstring).

    Returns ``start``: the window is ``seq[start:n]``, 1 to ``seq_len`` tokens,
    and the next-token logits are those after its last token.  ``start`` is 0
    while ``n <= seq_len``, then the smallest multiple of ``slide`` (default
    :func:`default_slide`) that leaves at most ``seq_len`` tokens.
    """
    slide = _check_slide(cfg, slide)
    if n <= cfg.seq_len:
        return 0
    return -(-(n - cfg.seq_len) // slide) * slide  # ceil((n - seq_len) / slide) * slide


def next_logits(params, cfg, kmeans_states, ids, *, impl="auto", slide=None):
    """Logits (B, V) of the token after each row of ``ids`` (B, n), any n >= 1.

    Runs :func:`rt_numpy.model.forward` in evaluation mode (no dropout) on the
    context window of :func:`context_window`: the full recompute.  Returns a
    NumPy array of the parameters' dtype.
    """
    start = context_window(ids.shape[1], cfg, slide)
    logits, _ = model.forward(params, ids[:, start:], cfg, kmeans_states, rng=None, impl=impl)  # (B, T, V)
    return np.asarray(_to_numpy(logits[:, -1]))  # (B, V), after the last token


def cache_is_exact(cfg):
    """True when the key/value cache gives the full recompute's logits (a strictly causal model).

    :func:`rt_numpy.cache.inexact_reason` says why not otherwise.
    """
    return cache_lib.inexact_reason(cfg) is None


def _use_cache(cfg, cache, decode_rule):
    """Whether :func:`generate` runs the cache, from its ``cache`` and ``decode_rule`` arguments."""
    if not (isinstance(cache, bool) or cache == "auto"):
        raise ValueError(f"cache must be 'auto', True or False, got {cache!r}")
    _checks.choice("decode_rule", decode_rule, cache_lib.RULES)
    if decode_rule == "prefix":  # the approximate rule is a cached computation by definition
        if cache is False:
            raise ValueError("cache=False cannot run decode_rule='prefix': the prefix rule keeps each "
                             "position's keys and values as they were when it was the newest, which is a cache")
        cache_lib.check_rule(cfg, "prefix")
        return True
    reason = cache_lib.inexact_reason(cfg)
    if cache is True and reason is not None:
        raise ValueError(f"cache=True: a key/value cache is not exact for this model: {reason}; use "
                         f"cache='auto' or False (full recompute), or decode_rule='prefix' (approximate)")
    return cache is True or (cache == "auto" and reason is None)


def memory_estimate(cfg, B, n_total, use_cache=False):
    """A rough lower bound on the bytes :func:`generate` allocates (its largest arrays).

    The token array (B, n_total) int64; one forward pass over a full window
    (its logits (B, T, V) and feed-forward activations (B, T, ff_mult C), and one
    attention matrix (B, H, T, T)); and with the cache, every layer's keys and
    values (B, H, T, D) twice.  T = min(n_total, seq_len).
    """
    T, item = min(n_total, cfg.seq_len), np.dtype(cfg.dtype).itemsize
    window = B * T * (cfg.vocab_size + cfg.ff_mult * cfg.width + cfg.num_heads * T) * item
    stored = 2 * cfg.n_layers * B * T * cfg.width * item if use_cache else 0
    return 8 * B * n_total + window + stored


def generate(params, cfg, kmeans_states, prompt_ids, n_new, *, rng, temperature=1.0, top_k=None, top_p=None,
             impl="auto", cache="auto", decode_rule="exact", slide=None):
    """Extend each prompt by ``n_new`` sampled tokens.

    Parameters
    ----------
    params : dict
        From :func:`rt_numpy.model.init_params` (NumPy or CuPy arrays).
    cfg : rt_numpy.model.Config
    kmeans_states : dict
        From :func:`rt_numpy.model.init_kmeans` (or training); every routing
        layer needs its centroids.  Read only.
    prompt_ids : int array (B, n0), or (n0,) for one prompt
        Token ids in [0, vocab_size), n0 >= 1 (there is no start token).
    n_new : int >= 0
        Tokens to add; the sequence may grow past ``cfg.seq_len`` (the window
        slides, see ``slide``).
    rng : numpy.random.Generator
        Drives every draw; may be None when ``temperature == 0``.
    temperature, top_k, top_p
        As in :func:`sample_next` (0 = greedy).
    impl : {"auto", "ref", "numba", "cupy"}
        Passed to the model.
    cache : {"auto", True, False}
        The key/value cache of :mod:`rt_numpy.cache`.  ``"auto"``: used where it
        is exact (:func:`cache_is_exact`); True: required (a ValueError says why
        it is not exact for this model); False: every step recomputes the window.
        Cached or not, a seed gives the same tokens.
    decode_rule : {"exact", "prefix"}
        ``"exact"``: the logits of ``forward`` on the context window.
        ``"prefix"``: the official decoder's rule for balanced routing, an
        *approximation* (:mod:`rt_numpy.cache`): each cluster's members are
        chosen among the prefix when a position is decoded, and kept.
    slide : int, optional
        How far the window moves past ``seq_len`` (:func:`context_window`),
        1 <= slide < seq_len; default :func:`default_slide`.

    Returns
    -------
    int64 NumPy array (B, n0 + n_new)
        The prompt followed by the new tokens (always two-dimensional).

    Notes
    -----
    docs/algorithm.md#9-generation-and-the-keyvalue-cache.  Without the cache
    a step costs one forward pass of up to ``seq_len`` tokens; with it, one
    position per step, plus a forward pass over the window each time it slides.
    Sizes whose arrays could not fit in memory (:func:`memory_estimate`) are
    refused before anything is allocated.
    """
    if not isinstance(cfg, model.Config):
        raise TypeError(f"cfg must be an rt_numpy.model.Config, got {type(cfg).__name__}")
    check_kmeans_states(cfg, kmeans_states)
    prompt = _to_numpy(prompt_ids)
    if not isinstance(prompt, np.ndarray) or prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
        got = f"{prompt.dtype} array of shape {prompt.shape}" if isinstance(prompt, np.ndarray) \
            else type(prompt).__name__
        raise TypeError(f"prompt_ids must be an integer array (B, n0) or (n0,), got {got}")
    if isinstance(n_new, bool) or not isinstance(n_new, numbers.Integral):
        raise TypeError(f"n_new must be an integer, got {n_new!r} of type {type(n_new).__name__}")
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    B, n0 = (1, prompt.shape[0]) if prompt.ndim == 1 else prompt.shape
    if B < 1 or n0 < 1:
        raise ValueError(f"prompt_ids must hold at least one token per row (there is no start token), "
                         f"got shape {prompt.shape}")
    use_cache = _use_cache(cfg, cache, decode_rule)
    slide = _check_slide(cfg, slide)
    _checks.allocation(f"generate with {B} prompts of {n0} tokens and n_new={n_new}",
                       memory_estimate(cfg, B, n0 + int(n_new), use_cache))
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(f"prompt_ids must lie in [0, vocab_size={cfg.vocab_size}), got values in "
                         f"[{prompt.min()}, {prompt.max()}]")
    temperature = _check_temperature(temperature)
    top_k, top_p = _check_top_k(top_k), _check_top_p(top_p)
    if temperature > 0 and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (None only when temperature=0), got {rng!r}")
    if not isinstance(impl, str) or impl not in backend.IMPLS:
        raise ValueError(f"impl must be one of {backend.IMPLS}, got {impl!r}")

    ids = np.empty((B, n0 + int(n_new)), dtype=np.int64)  # filled left to right
    ids[:, :n0] = np.atleast_2d(prompt)
    state, window_start = None, None  # the cache and where its window starts
    for n in range(n0, n0 + int(n_new)):
        start = context_window(n, cfg, slide)
        if not use_cache:
            logits = next_logits(params, cfg, kmeans_states, ids[:, :n], impl=impl, slide=slide)  # (B, V)
        elif start != window_start:  # a new window: fill a new cache with it
            logits, state = cache_lib.prefill(params, cfg, kmeans_states, ids[:, start:n], rule=decode_rule,
                                              impl=impl)
            window_start = start
        else:  # the same window, one token longer
            logits, state = cache_lib.step(params, cfg, kmeans_states, state, ids[:, n - 1], impl=impl)
        ids[:, n] = sample_next(_to_numpy(logits), rng, temperature, top_k, top_p)  # (B,)
    return ids
