"""Generation: extend a prompt one byte at a time with a trained (or untrained) model.

* :func:`generate` - the loop: run the model on a context window, read the
  logits after the last real token, draw the next token, append, repeat.
* :func:`next_logits` - the logits of the next token after each sequence of a
  batch (the context-window rule below, in one place).
* :func:`sample_next` - one draw from logits: temperature, then top-k, then top-p.
* :func:`filter_logits` - the top-k and nucleus (top-p) filters on their own.

The context window
------------------
:func:`rt_numpy.model.forward` takes T tokens with T a multiple of the local
block length L and T <= seq_len.  For a sequence of n tokens the window is:

* n >= L, strictly causal model (``membership="nearest"``, or no routing
  heads): the last ``m = min(n, seq_len)`` tokens, right-padded with byte 0 up
  to the next multiple of L.  Every head is causal, so the padding cannot reach
  the real positions: the logits are those of an unpadded run, to rounding.
* n >= L, balanced routing (the default): the last ``ctx`` tokens, ``ctx`` the
  largest multiple of L <= min(n, seq_len); no padding.  Balanced membership is
  *not* causal (docs/algorithm.md#3-the-causal-leak): each cluster takes its W best tokens over
  the whole window, so padding tokens would compete for cluster places and
  change the routing output at earlier positions.  Dropping up to L - 1 of the
  oldest tokens instead keeps the window made of real tokens only, as in
  training; the logits are exactly ``forward(window)[:, -1]``.
* n < L: the n tokens right-padded with byte 0 to L (there is nothing else to
  do).  Exact for a strictly causal model; with balanced routing the padding
  may change the routing heads' output at the real positions (a short prompt
  is out of the training distribution anyway).

Past ``seq_len`` the window slides: the oldest tokens are dropped and, with
learned positions, the window always starts at position 0, as training windows do.

No key/value cache
------------------
Every new token recomputes the whole window, as the PyTorch port does
(docs/algorithm.md#6-what-users-ran-into).  With balanced routing a cache would be wrong, not just hard: when a
token is appended, every cluster re-picks its W members over the whole window,
so the routing output at *earlier* positions changes and the keys and values of
the following layers change with it; and once the window slides, every learned
position moves.  Only a strictly causal model could reuse its past, and the
cost here is a few hundred tokens per step: clarity wins.

Centroids are read from ``kmeans_states`` and never updated while sampling; a
model can sample before any training because :func:`rt_numpy.model.init_kmeans`
initialises them (the PyTorch port fails there, docs/algorithm.md#6-what-users-ran-into).
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from rt_numpy import backend, model

PAD_ID = 0  # the byte used to right-pad a window (see the module docstring)


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


def _is_strictly_causal(cfg):
    """True when no output at a position depends on later tokens (docs/algorithm.md#3-the-causal-leak)."""
    return cfg.membership == "nearest" or not routing_layers(cfg)


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
def context_window(n, cfg):
    """Where the window of a sequence of n tokens comes from (see the module docstring).

    Returns ``(start, pad)``: the window is ``seq[start:n]`` followed by ``pad``
    padding tokens; its length is a multiple of ``cfg.block_size``, at most
    ``cfg.seq_len``, and the next-token logits are read at index ``n - start - 1``.
    """
    L = cfg.block_size
    if n < L:
        return 0, L - n
    if _is_strictly_causal(cfg):
        m = min(n, cfg.seq_len)  # seq_len is a multiple of L, so the padded window fits
        return n - m, -m % L
    ctx = min(n, cfg.seq_len) // L * L
    return n - ctx, 0


def next_logits(params, cfg, kmeans_states, ids, *, impl="auto"):
    """Logits (B, V) of the token after each row of ``ids`` (B, n), any n >= 1.

    Runs :func:`rt_numpy.model.forward` in evaluation mode (no dropout) on the
    context window of :func:`context_window`.  Returns a NumPy array of the
    parameters' dtype.
    """
    B, n = ids.shape
    start, pad = context_window(n, cfg)
    window = np.concatenate([ids[:, start:], np.full((B, pad), PAD_ID, dtype=ids.dtype)], axis=1)
    logits, _ = model.forward(params, window, cfg, kmeans_states, rng=None, impl=impl)  # (B, T, V)
    last = logits[:, n - start - 1]  # (B, V), after the last real token
    return np.asarray(_to_numpy(last))


def generate(params, cfg, kmeans_states, prompt_ids, n_new, *, rng, temperature=1.0, top_k=None, top_p=None,
             impl="auto"):
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
        Tokens to add; the sequence may grow past ``cfg.seq_len`` (the window slides).
    rng : numpy.random.Generator
        Drives every draw; may be None when ``temperature == 0``.
    temperature, top_k, top_p
        As in :func:`sample_next` (0 = greedy).
    impl : {"auto", "ref", "numba", "cupy"}
        Passed to the model.

    Returns
    -------
    int64 NumPy array (B, n0 + n_new)
        The prompt followed by the new tokens (always two-dimensional).

    Notes
    -----
    docs/algorithm.md#3-the-causal-leak, docs/algorithm.md#6-what-users-ran-into.  Each step
    recomputes the whole window (no cache, see the module docstring), so a step
    costs one forward pass of at most ``seq_len`` tokens.
    """
    if not isinstance(cfg, model.Config):
        raise TypeError(f"cfg must be an rt_numpy.model.Config, got {type(cfg).__name__}")
    check_kmeans_states(cfg, kmeans_states)
    prompt = _to_numpy(prompt_ids)
    if not isinstance(prompt, np.ndarray) or prompt.dtype.kind not in "iu" or prompt.ndim not in (1, 2):
        got = f"{prompt.dtype} array of shape {prompt.shape}" if isinstance(prompt, np.ndarray) \
            else type(prompt).__name__
        raise TypeError(f"prompt_ids must be an integer array (B, n0) or (n0,), got {got}")
    prompt = np.atleast_2d(prompt).astype(np.int64)  # (B, n0)
    if prompt.shape[0] < 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt_ids must hold at least one token per row (there is no start token), "
                         f"got shape {prompt.shape}")
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise ValueError(f"prompt_ids must lie in [0, vocab_size={cfg.vocab_size}), got values in "
                         f"[{prompt.min()}, {prompt.max()}]")
    if isinstance(n_new, bool) or not isinstance(n_new, numbers.Integral):
        raise TypeError(f"n_new must be an integer, got {n_new!r} of type {type(n_new).__name__}")
    if n_new < 0:
        raise ValueError(f"n_new must be >= 0, got {n_new}")
    temperature = _check_temperature(temperature)
    top_k, top_p = _check_top_k(top_k), _check_top_p(top_p)
    if temperature > 0 and not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (None only when temperature=0), got {rng!r}")
    if not isinstance(impl, str) or impl not in backend.IMPLS:
        raise ValueError(f"impl must be one of {backend.IMPLS}, got {impl!r}")

    B, n0 = prompt.shape
    ids = np.empty((B, n0 + int(n_new)), dtype=np.int64)  # filled left to right
    ids[:, :n0] = prompt
    for n in range(n0, n0 + int(n_new)):
        logits = next_logits(params, cfg, kmeans_states, ids[:, :n], impl=impl)  # (B, V)
        ids[:, n] = sample_next(logits, rng, temperature, top_k, top_p)  # (B,)
    return ids
