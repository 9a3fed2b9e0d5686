"""The three attentions of the Routing Transformer: dense causal, local, routing.

* :func:`dense_causal_attention` - every query sees every earlier key.  O(T^2 D).
  The reference the other two are checked against.
* :func:`local_attention` - blocks of L tokens; each block sees itself and the
  ``look_back`` blocks before it, causally.  O(T L D).
* :func:`routing_attention` - queries and keys are routed to shared centroids
  (online k-means, :mod:`rt_numpy.kmeans`); each query attends causally to the
  keys of its clusters.  O(T W D) plus O(T K D) for routing, O(T^1.5 D) with
  K = W = sqrt(T).
* :func:`multihead_attention` - routing heads and local heads side by side,
  concatenated and projected.

Shapes: q, k, v (B, H, T, D); centroids (H, K, D); windows (B, H, K, W).
All differentiable code goes through :mod:`rt_numpy.ops` primitives, so the same
functions run on CuPy arrays (DESIGN.md, "Differentiation").  Integer routing
decisions (windows, assignments) are constants: no gradient flows through them.

SPEC.md sections 1, 2 and 4; paper sections 3 and 4.
"""
from __future__ import annotations

import contextlib
import math
import numbers

import numpy as np
from autograd.extend import defvjp_argnums, primitive
from autograd.tracer import getval

from rt_numpy import backend, kmeans, ops

SELF_ATTEND = ("allow", "last_resort")
LOGITS = ("normalized", "scaled")
MEMBERSHIP = ("balanced", "nearest")
SELF_LOGIT = -5e4  # the "last resort" self logit of the PyTorch port and Reformer (SPEC.md 1.4)


# --------------------------------------------------------------------------- checks
def _check_qkv(q, k, v):
    """q, k, v: finite float arrays of one shape (B, H, T, D) and one dtype."""
    shape = dtype = None
    checked = []  # arrays already scanned for NaN (with shared QK, k is q: scan it once)
    for name, x in (("q", q), ("k", k), ("v", v)):
        x = getval(x)
        if not hasattr(x, "dtype"):
            raise TypeError(f"{name} must be an array, got {type(x).__name__}")
        if x.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name} must be float32 or float64, got dtype {x.dtype}")
        if x.ndim != 4 or 0 in x.shape:
            raise ValueError(f"{name} must have shape (B, H, T, D) with no empty axis, got {tuple(x.shape)}")
        if shape is not None and (x.shape != shape or x.dtype != dtype):
            raise ValueError(f"q, k and v must share shape and dtype: q is {shape} {dtype}, "
                             f"{name} is {tuple(x.shape)} {x.dtype}")
        if not any(x is y for y in checked) and not bool(backend.get_array_module(x).isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinity")
        checked.append(x)
        shape, dtype = x.shape, x.dtype
    return shape


def _choice(name, value, options):
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r} of type {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _self_rule(logits, query_pos, key_pos, self_attend):
    """Apply the self-token rule: ``last_resort`` gives the self logit -5e4."""
    if self_attend == "allow":
        return logits
    return ops.masked_fill(logits, key_pos == query_pos, SELF_LOGIT)


# --------------------------------------------------------------------------- dense
def dense_causal_attention(q, k, v, *, scale=None, self_attend="allow"):
    """Causal softmax attention over the whole sequence.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
    scale : float, optional
        Logit factor, ``1 / sqrt(D)`` by default (1.0 reproduces routing's
        ``logits="normalized"`` on normalised q and k).
    self_attend : {"allow", "last_resort"}
        ``"last_resort"``: the self logit is -5e4, so a token sees itself only
        when nothing else is visible (position 0).

    Returns
    -------
    array (B, H, T, D)
    """
    B, H, T, D = _check_qkv(q, k, v)
    _choice("self_attend", self_attend, SELF_ATTEND)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    xp = backend.get_array_module(getval(q))
    pos = xp.arange(T)
    logits = ops.scale(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), scale)  # (B,H,T,D) @ (B,H,D,T) -> (B,H,T,T)
    logits = _self_rule(logits, pos[:, None], pos[None, :], self_attend)
    probs = ops.softmax(logits, mask=pos[None, :] <= pos[:, None])  # (B, H, T, T), causal
    return ops.matmul(probs, v)  # (B, H, T, T) @ (B, H, T, D) -> (B, H, T, D)


# --------------------------------------------------------------------------- local
def local_attention(q, k, v, *, block_size, look_back=1, scale=None, self_attend="allow"):
    """Blocked causal attention: block n sees blocks n - look_back .. n.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        T must be a multiple of ``block_size`` (refused otherwise: pad the
        sequence yourself, so that nothing happens silently).
    block_size : int
        L, tokens per block.
    look_back : int
        Previous blocks each block also sees (>= 0).
    scale : float, optional
        Logit factor, ``1 / sqrt(D)`` by default.
    self_attend : {"allow", "last_resort"}

    Returns
    -------
    array (B, H, T, D)

    Notes
    -----
    SPEC.md section 2.  Keys before position 0 (the look-back of the first
    blocks) are zero padding and masked out.
    """
    B, H, T, D = _check_qkv(q, k, v)
    L = _positive_int("block_size", block_size)
    if isinstance(look_back, bool) or not isinstance(look_back, numbers.Integral) or look_back < 0:
        raise ValueError(f"look_back must be an integer >= 0, got {look_back!r}")
    if T % L:
        raise ValueError(f"T={T} is not a multiple of block_size={L}")
    _choice("self_attend", self_attend, SELF_ATTEND)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    xp = backend.get_array_module(getval(q))
    N, S = T // L, look_back + 1  # blocks; blocks seen by each block

    def blocks(x):
        return ops.reshape(x, (B, H, N, L, D))  # (B, H, T, D) -> (B, H, N, L, D)

    def with_look_back(x):
        padded = ops.pad_axis(blocks(x), look_back, 0, axis=2)  # (B, H, look_back + N, L, D)
        parts = [ops.slice_axis(padded, s, s + N, axis=2) for s in range(S)]  # S x (B, H, N, L, D)
        return ops.concatenate(parts, axis=3)  # (B, H, N, S*L, D), oldest block first

    qb, kb, vb = blocks(q), with_look_back(k), with_look_back(v)
    query_pos = (xp.arange(N)[:, None] * L + xp.arange(L)[None, :])[:, :, None]  # (N, L, 1)
    key_pos = ((xp.arange(N)[:, None] - look_back) * L + xp.arange(S * L)[None, :])[:, None, :]  # (N, 1, S*L)
    visible = (key_pos >= 0) & (key_pos <= query_pos)  # (N, L, S*L): no padding, causal
    logits = ops.scale(ops.matmul(qb, ops.transpose(kb, (0, 1, 2, 4, 3))), scale)  # (B,H,N,L,S*L)
    logits = _self_rule(logits, query_pos, key_pos, self_attend)
    probs = ops.softmax(logits, mask=visible)
    out = ops.matmul(probs, vb)  # (B, H, N, L, S*L) @ (B, H, N, S*L, D) -> (B, H, N, L, D)
    return ops.reshape(out, (B, H, T, D))


# --------------------------------------------------------------------------- routing
def routing_attention(q, k, v, means, *, window_size=None, shared_qk=True, norm="ln", logits="normalized",
                      membership="balanced", self_attend="allow", eps=1e-2, commitment=1e-4,
                      combine="sum", mem_kv=None, impl="auto"):
    """Routing attention for H heads: route, attend inside clusters, average back.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        With ``shared_qk=True`` the keys are the queries and ``k`` is ignored
        (pass ``q`` or None).
    means : array (H, K, D)
        Centroids; a constant here (updated outside, from the returned stats).
    window_size : int
        W, members per cluster (``membership="balanced"``), 1 <= W <= T.
    shared_qk : bool
        Keys are the queries (every released LM config).
    norm : {"ln", "l2"}
        Routing normalisation (SPEC 1.1).
    logits : {"normalized", "scaled"}
        ``"normalized"`` (official): normalised q against normalised k, no
        ``1/sqrt(D)``.  ``"scaled"`` (PyTorch port): raw q against keys, divided
        by ``sqrt(D)``; with shared QK the keys are L2-normalised queries.
    membership : {"balanced", "nearest"}
        ``"balanced"``: each cluster takes its W most similar tokens (not causal,
        SPEC section 3).  ``"nearest"``: each token joins its nearest centroid
        only (strictly causal); ``window_size`` is not used.
    self_attend : {"allow", "last_resort"}
        Official: a token may attend to itself.  Port: only when nothing else
        is visible (self logit -5e4).
    eps : float
        Added to the per-token cluster count in the scatter-mean (official
        1e-2, port 1e-5).
    commitment : float
        beta of the commitment loss.
    combine : {"sum", "mean"}
        How query and key commitment errors add up (SPEC 1.8).  With shared QK,
        ``"sum"`` counts the queries twice, as the official code does.
    mem_kv : tuple (mem_k, mem_v) of arrays (H, K, D), optional
        One learned memory key/value per head and cluster, prepended to every
        key window and always visible (the port's separate-QK causal setup).
        With ``membership="nearest"`` a query sees its own cluster's memory.
    impl : {"auto", "ref", "numba", "cupy"}
        ``"numba"`` (NumPy arrays) or ``"cupy"`` (CuPy arrays): fused
        forward/backward kernels for the attention inside the clusters
        (balanced membership, no ``mem_kv``); ``"auto"`` uses them when they apply.

    Returns
    -------
    out : array (B, H, T, D)
    loss : scalar
        The commitment loss (differentiable in q and k, not in the centroids).
    stats : dict
        :func:`rt_numpy.kmeans.cluster_stats` of the normalised queries (and
        keys): pass it to :func:`rt_numpy.kmeans.update_state` after the step.
        With balanced membership it comes from :func:`rt_numpy.kmeans.route`
        (the same statistics, read from the scores that top-W ranks).

    Notes
    -----
    SPEC.md section 1 items 1-5 and 8.  Masked logits are treated as -inf
    (:func:`rt_numpy.ops.softmax`); a query with no visible key outputs 0.
    A token in no cluster gets 0 from a routing head.  No padding: every
    position is a real token.
    """
    if shared_qk:
        k = q
    B, H, T, D = _check_qkv(q, k, v)
    _choice("norm", norm, kmeans.NORMS)
    _choice("logits", logits, LOGITS)
    _choice("membership", membership, MEMBERSHIP)
    _choice("self_attend", self_attend, SELF_ATTEND)
    _choice("combine", combine, kmeans.COMBINES)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < math.inf:
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if isinstance(commitment, bool) or not isinstance(commitment, numbers.Real) or not 0 <= commitment < math.inf:
        raise ValueError(f"commitment must be a non-negative finite number, got {commitment!r}")
    _choice("impl", impl, backend.IMPLS)
    backend.resolve_impl(impl, backend.get_array_module(getval(q)))  # refuse e.g. impl="cupy" on NumPy arrays
    mu = kmeans._check_means(getval(means))
    if mu.shape[0] != H or mu.shape[2] != D or mu.dtype != getval(q).dtype:
        raise ValueError(f"means of shape {tuple(mu.shape)} and dtype {mu.dtype} do not fit q of shape "
                         f"{(B, H, T, D)} and dtype {getval(q).dtype}: expected ({H}, K, {D})")
    K = mu.shape[1]
    if membership == "balanced":
        if window_size is None:
            raise ValueError("membership='balanced' needs window_size (W), got None")
        W = _positive_int("window_size", window_size)
        if W > T:
            raise ValueError(f"window_size must be <= T={T}, got {W}")
    if mem_kv is not None:
        if shared_qk:
            raise ValueError("mem_kv is the port's separate-QK option: use it with shared_qk=False")
        if not isinstance(mem_kv, (tuple, list)) or len(mem_kv) != 2:
            got = f"length {len(mem_kv)}" if isinstance(mem_kv, (tuple, list)) else type(mem_kv).__name__
            raise ValueError(f"mem_kv must be a pair (mem_k, mem_v), got {got}")
        for name, m in zip(("mem_k", "mem_v"), mem_kv):
            m = kmeans._check_float_array(name, m, 3)
            if tuple(m.shape) != (H, K, D) or m.dtype != getval(q).dtype:
                raise ValueError(f"{name} must have shape {(H, K, D)} and dtype {getval(q).dtype}, "
                                 f"got {tuple(m.shape)} {m.dtype}")

    # 1. Normalise and route.  Routing decisions are integers: constants for autograd.
    # impl="ref" keeps the normalisation on its readable formula too (its forward; the layer
    # norm's first-order gradient may still take the fused kernel, equal to rounding).
    with backend.reference_only() if impl == "ref" else contextlib.nullcontext():
        qn = kmeans.normalize(q, norm)  # (B, H, T, D)
        kn = qn if shared_qk else kmeans.normalize(k, norm)
    streams = [qn] if shared_qk else [qn, kn]
    # The routing decisions use the k-means fast path unless the reference was asked for.  With
    # balanced membership, kmeans.route reads both decisions (nearest centroid, top-W) from one
    # score matrix per stream.
    routing_impl = "ref" if impl == "ref" else "auto"
    if membership == "balanced":
        routes = [kmeans.route(getval(x), mu, W, impl=routing_impl) for x in streams]
        xp = backend.get_array_module(mu)
        stats = {name: xp.stack([r[name] for r in routes]) for name in ("assignments", "sums", "counts")}
    else:
        stats = kmeans.cluster_stats([getval(x) for x in streams], mu, impl=routing_impl)

    # 2. Commitment loss, from the start-of-step assignments.
    errors = [_commitment_error(x, mu, a) for x, a in zip(streams, stats["assignments"])]
    loss = errors[0]
    for e in errors[1:]:
        loss = ops.add(loss, e)
    # The official code adds e_q + e_k with k = q: with shared QK and "sum" that is 2 e_q, taken here
    # as a factor of 2 (the same bits as e_q + e_q, for the value and the gradient; one pass fewer).
    twice = shared_qk and combine == "sum"
    loss = ops.scale(loss, commitment * (2 if twice else 1) / (len(errors) if combine == "mean" else 1))

    # 3. The vectors the logits are made of.
    if logits == "normalized":
        q_logit, k_logit, logit_scale = qn, kn, 1.0
    else:
        q_logit, logit_scale = q, 1.0 / math.sqrt(D)
        k_logit = ops.l2_normalize(q) if shared_qk else k

    # 4. Attention inside the clusters, then the scatter-mean back to positions.
    if membership == "nearest":
        out = _nearest_attention(q_logit, k_logit, v, stats["assignments"], logit_scale, self_attend, eps,
                                 mem_kv)
        return out, loss, stats
    query_windows = routes[0]["windows"]  # (B, H, K, W)
    key_windows = routes[-1]["windows"]  # the same array when shared_qk (one stream)
    xp = backend.get_array_module(getval(q))
    run = backend.resolve_impl(impl, xp)
    if run in ("numba", "cupy") and mem_kv is None:
        shared = k_logit is q_logit and key_windows is query_windows  # shared QK: gather each row once
        out = cluster_attention_fused(q_logit, None if shared else k_logit, v, query_windows,
                                      None if shared else key_windows, logit_scale,
                                      self_attend == "last_resort", eps)
    else:
        out = cluster_attention_reference(q_logit, k_logit, v, query_windows, key_windows,
                                          scale=logit_scale, self_attend=self_attend, eps=eps, mem_kv=mem_kv)
    return out, loss, stats


def _commitment_error(x, mu, assignments):
    """mean over elements of (x - stopgrad(mu[a(x)]))^2; x (B, H, T, D), assignments (B, H, T)."""
    heads = backend.get_array_module(mu).arange(mu.shape[0])[None, :, None]  # (1, H, 1)
    target = mu[heads, assignments]  # (H, K, D) -> (B, H, T, D), a constant
    return ops.mean(ops.square(ops.subtract(x, target)))


def gather_windows(x, windows):
    """Rows of ``x`` (B, H, T, D) at ``windows`` (B, H, K, W) -> (B, H, K, W, D)."""
    B, H, K, W = windows.shape
    flat = ops.gather_rows(x, windows.reshape(B, H, K * W))  # (B, H, K*W, D)
    return ops.reshape(flat, (B, H, K, W, x.shape[-1]))


def cluster_attention_reference(q, k, v, query_windows, key_windows, *, scale, self_attend="allow",
                                eps=1e-2, mem_kv=None):
    """Causal attention inside each cluster window, then the scatter-mean.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        The vectors that make the logits (already normalised or not) and values.
    query_windows, key_windows : int arrays (B, H, K, W)
        Positions of each cluster's queries and keys.
    scale : float
        Logit factor.
    self_attend, eps, mem_kv
        As in :func:`routing_attention`.

    Returns
    -------
    array (B, H, T, D)
        ``out[i] = sum over (c, r) with I_c[r] = i of O_c[r] / (count_i + eps)``.

    Notes
    -----
    SPEC.md section 1 items 4-5.  The causal mask compares original positions.
    """
    B, H, T, D = getval(q).shape
    K, W = query_windows.shape[2:]
    xp = backend.get_array_module(getval(q))
    qw, kw, vw = gather_windows(q, query_windows), gather_windows(k, key_windows), gather_windows(v, key_windows)
    query_pos, key_pos = query_windows[..., :, None], key_windows[..., None, :]  # (B,H,K,W,1), (B,H,K,1,W)
    logits = ops.scale(ops.matmul(qw, ops.transpose(kw, (0, 1, 2, 4, 3))), scale)  # (B,H,K,W,W)
    logits = _self_rule(logits, query_pos, key_pos, self_attend)
    visible = key_pos <= query_pos  # (B, H, K, W, W), causal by original positions
    if mem_kv is not None:
        mem_k, mem_v = mem_kv  # (H, K, D) each
        mem_logit = ops.sum(ops.multiply(qw, ops.reshape(mem_k, (1, H, K, 1, D))), -1, True)  # (B,H,K,W,1)
        logits = ops.concatenate([ops.scale(mem_logit, scale), logits], axis=-1)  # (B, H, K, W, 1+W)
        visible = xp.concatenate([xp.ones((B, H, K, W, 1), bool), visible], axis=-1)
        vw = ops.concatenate([ops.broadcast_to(ops.reshape(mem_v, (1, H, K, 1, D)), (B, H, K, 1, D)), vw],
                             axis=3)  # (B, H, K, 1+W, D)
    probs = ops.softmax(logits, mask=visible)  # rows with nothing visible are 0
    outs = ops.matmul(probs, vw)  # (B, H, K, W, W') @ (B, H, K, W', D) -> (B, H, K, W, D)
    flat = ops.reshape(outs, (B, H, K * W, D))
    summed = ops.scatter_add_rows(flat, query_windows.reshape(B, H, K * W), T)  # (B, H, T, D)
    counts = _window_counts(query_windows, T, xp)  # (B, H, T)
    return ops.divide(summed, (counts + eps).astype(summed.dtype)[..., None])


def _window_counts(windows, T, xp):
    """How many windows each position is in: (B, H, K, W) -> (B, H, T) float."""
    B, H = windows.shape[:2]
    rows = windows.reshape(B * H, -1) + xp.arange(B * H)[:, None] * T  # (B*H, K*W): position in (b, h)'s own range
    counts = xp.bincount(rows.reshape(-1), minlength=B * H * T)  # exact integer counts
    return counts.reshape(B, H, T).astype(xp.float64)


def _nearest_attention(q, k, v, assignments, scale, self_attend, eps, mem_kv=None):
    """``membership="nearest"``: query i sees key j iff both chose the same centroid and j <= i.

    Written as dense attention with a cluster mask: O(T^2) memory, chosen for
    readability (the reference).  Each token is in exactly one cluster, so the
    scatter-mean divides by 1 + eps.  With ``mem_kv``, query i also sees the
    memory key/value of its own cluster, always visible.
    """
    B, H, T, D = getval(q).shape
    xp = backend.get_array_module(getval(q))
    aq = assignments[0]  # (B, H, T)
    ak = assignments[-1]  # the keys' assignments (the queries' with shared QK)
    pos = xp.arange(T)
    visible = (ak[..., None, :] == aq[..., :, None]) & (pos[None, :] <= pos[:, None])  # (B, H, T, T)
    logits = ops.scale(ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))), scale)  # (B, H, T, T)
    logits = _self_rule(logits, pos[:, None], pos[None, :], self_attend)
    if mem_kv is None:
        probs = ops.softmax(logits, mask=visible)
        return ops.scale(ops.matmul(probs, v), 1.0 / (1.0 + eps))  # (B, H, T, D)

    def own_cluster(m):  # (H, K, D) -> (B, H, T, D): row i is m[h, a(i)]
        K = getval(m).shape[1]
        return ops.gather_rows(ops.broadcast_to(ops.reshape(m, (1, H, K, D)), (B, H, K, D)), aq)

    mem_k, mem_v = (own_cluster(m) for m in mem_kv)  # (B, H, T, D) each
    mem_logit = ops.scale(ops.sum(ops.multiply(q, mem_k), -1, True), scale)  # (B, H, T, 1)
    logits = ops.concatenate([mem_logit, logits], axis=-1)  # (B, H, T, 1+T), memory first
    visible = xp.concatenate([xp.ones((B, H, T, 1), bool), visible], axis=-1)
    probs = ops.softmax(logits, mask=visible)
    out = ops.add(ops.multiply(ops.slice_axis(probs, 0, 1, axis=-1), mem_v),  # (B,H,T,1) * (B,H,T,D)
                  ops.matmul(ops.slice_axis(probs, 1, T + 1, axis=-1), v))  # (B,H,T,T) @ (B,H,T,D)
    return ops.scale(out, 1.0 / (1.0 + eps))  # (B, H, T, D)


# --------------------------------------------------------------------------- multi-head
def init_attention_params(width, *, shared_qk=True, rng, dtype=np.float32):
    """Projection weights of one attention layer, as a dict (SPEC.md section 4).

    ``w_q``, ``w_v``, ``w_o`` (and ``w_k`` without shared QK), each (C, C), drawn
    from N(0, 0.02^2) as in GPT-2.  ``x @ w_q`` maps (B, T, C) to (B, T, C).
    """
    names = ["w_q", "w_v", "w_o"] if shared_qk else ["w_q", "w_k", "w_v", "w_o"]
    return {name: (0.02 * rng.standard_normal((width, width))).astype(dtype) for name in names}


def apply_rotary(x, cos, sin):
    """Rotate pairs (d, d + D/2) of every head vector by position-dependent angles.

    x (B, H, T, D), cos and sin (T, D) -> (B, H, T, D):
    ``x * cos + rotate_half(x) * sin`` with ``rotate_half([a, b]) = [-b, a]``
    (Su et al., arXiv:2104.09864).
    """
    D = getval(x).shape[-1]
    first, second = ops.slice_axis(x, 0, D // 2), ops.slice_axis(x, D // 2, D)  # (B, H, T, D/2) each
    rotated = ops.concatenate([ops.scale(second, -1.0), first], axis=-1)  # (B, H, T, D)
    return ops.add(ops.multiply(x, cos), ops.multiply(rotated, sin))


def multihead_attention(x, params, means, *, num_heads, n_route_heads, window_size=None, block_size,
                        look_back=1, shared_qk=True, self_attend="allow", rotary=None, impl="auto", **routing):
    """One attention layer: routing heads and local heads side by side, then the output projection.

    Parameters
    ----------
    x : array (B, T, C)
    params : dict
        ``w_q``, ``w_v``, ``w_o`` and, without shared QK, ``w_k``; each (C, C).
    means : array (n_route_heads, K, D) or None
        Centroids of the routing heads (None when ``n_route_heads == 0``).
    num_heads : int
        H; C must be a multiple of H (D = C / H).
    n_route_heads : int
        The first ``n_route_heads`` heads route; the others attend locally.
    window_size : int
        W of the routing heads.
    block_size, look_back : int
        L and look-back of the local heads.
    shared_qk, self_attend, impl
        As in :func:`routing_attention`, for both kinds of heads.
    rotary : tuple (cos, sin) of arrays (T, D), optional
        Rotary position embedding applied to queries and keys of every head
        before routing (the PyTorch port's positions); see
        :func:`rt_numpy.model.rotary_tables`.
    **routing
        Further options of :func:`routing_attention` (``norm``, ``logits``,
        ``membership``, ``eps``, ``commitment``, ``combine``).

    Returns
    -------
    y : array (B, T, C)
    loss : scalar
        The routing heads' commitment loss (0.0 without routing heads).
    stats : dict or None
        The routing heads' k-means statistics, for :func:`rt_numpy.kmeans.update_state`.

    Notes
    -----
    SPEC.md section 4; paper section 4.2 (routing and local heads mixed).
    """
    xv = getval(x)
    if getattr(xv, "ndim", None) != 3:
        raise ValueError(f"x must have shape (B, T, C), got {getattr(xv, 'shape', type(xv).__name__)}")
    B, T, C = xv.shape
    H = _positive_int("num_heads", num_heads)
    if C % H:
        raise ValueError(f"width C={C} is not a multiple of num_heads={H}")
    if isinstance(n_route_heads, bool) or not isinstance(n_route_heads, numbers.Integral) \
            or not 0 <= n_route_heads <= H:
        raise ValueError(f"n_route_heads must be an integer in [0, {H}], got {n_route_heads!r}")
    needed = {"w_q", "w_v", "w_o"} | (set() if shared_qk else {"w_k"})
    plain = getval(params)  # a DictBox while autograd traces
    if not isinstance(plain, dict) or needed - set(plain):
        got = sorted(plain) if isinstance(plain, dict) else type(plain).__name__
        raise ValueError(f"params must hold {sorted(needed)}, got {got}")
    for name in needed:
        if tuple(getval(plain[name]).shape) != (C, C):
            raise ValueError(f"params[{name!r}] must have shape {(C, C)}, got {tuple(getval(plain[name]).shape)}")
    _choice("impl", impl, backend.IMPLS)
    Hr = int(n_route_heads)
    q = ops.split_heads(ops.matmul(x, params["w_q"]), H)  # (B, T, C) @ (C, C) -> (B, H, T, D)
    k = q if shared_qk else ops.split_heads(ops.matmul(x, params["w_k"]), H)
    v = ops.split_heads(ops.matmul(x, params["w_v"]), H)
    if rotary is not None:
        q = apply_rotary(q, *rotary)
        k = q if shared_qk else apply_rotary(k, *rotary)
    parts, loss, stats = [], 0.0, None
    if Hr:
        def route_heads(t):
            return ops.slice_axis(t, 0, Hr, axis=1)  # (B, H, T, D) -> (B, Hr, T, D)

        out, loss, stats = routing_attention(route_heads(q), route_heads(k), route_heads(v), means,
                                             window_size=window_size, shared_qk=shared_qk,
                                             self_attend=self_attend, impl=impl, **routing)
        parts.append(out)
    if Hr < H:
        def local_heads(t):
            return ops.slice_axis(t, Hr, H, axis=1)  # (B, H, T, D) -> (B, H - Hr, T, D)

        parts.append(local_attention(local_heads(q), local_heads(k), local_heads(v), block_size=block_size,
                                     look_back=look_back, self_attend=self_attend))
    out = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)  # (B, H, T, D)
    y = ops.matmul(ops.merge_heads(out), params["w_o"])  # (B, T, C) @ (C, C) -> (B, T, C)
    return y, loss, stats


# ------------------------------------------------------------ fused (Numba / CuPy) cluster attention
def _gpu_kernels(x):
    """:mod:`rt_numpy.kernels.cupy_routing` when ``x`` is a CuPy array, else None (Numba runs)."""
    if backend.get_array_module(x) is np:
        return None
    from rt_numpy.kernels import cupy_routing

    return cupy_routing


@primitive
def cluster_attention_fused(q, k, v, query_windows, key_windows, scale, last_resort, eps):
    """:func:`cluster_attention_reference` as one fused kernel (no ``mem_kv``): Numba or CuPy.

    Same arguments and result as the reference (``last_resort`` is
    ``self_attend == "last_resort"``), except that ``k=None`` with
    ``key_windows=None`` means shared QK: the keys are the queries, in the
    same windows, and the Numba kernels gather each cluster's rows once.
    Nothing of size (K, W, W) is kept for the backward pass: the backward
    kernel recomputes each cluster's probabilities, as FlashAttention does.  First-order gradients only.
    On CuPy arrays :mod:`rt_numpy.kernels.cupy_routing` runs, with the same
    signature as the Numba module.
    """
    gpu = _gpu_kernels(q)
    if gpu is not None:
        k, key_windows = (q, query_windows) if k is None else (k, key_windows)
        return gpu.forward(q, k, v, query_windows, key_windows, float(scale), bool(last_resort), float(eps))
    from rt_numpy.kernels import numba_routing

    return numba_routing.forward(np.ascontiguousarray(q), _contiguous(k), np.ascontiguousarray(v),
                                 np.ascontiguousarray(query_windows, dtype=np.int64),
                                 _contiguous(key_windows, np.int64), float(scale), bool(last_resort), float(eps))


def _contiguous(x, dtype=None):
    """``np.ascontiguousarray(x, dtype)``, and None for None (a shared-QK key argument)."""
    return None if x is None else np.ascontiguousarray(x, dtype=dtype)


def _cluster_attention_fused_vjp(argnums, ans, args, kwargs):
    """One backward kernel call gives the gradients of q, k and v together."""
    from rt_numpy.kernels import numba_routing

    q, k, v, query_windows, key_windows, scale, last_resort, eps = args
    gpu = _gpu_kernels(q)

    def vjp(g):
        if gpu is not None:
            shared = k is None
            dq, dk, dv = gpu.backward(g.astype(ans.dtype, copy=False), q, q if shared else k, v, query_windows,
                                      query_windows if shared else key_windows, float(scale), bool(last_resort),
                                      float(eps))
            if shared:
                dq, dk = dq + dk, None  # the keys are the queries: both gradients reach q
            return tuple((dq, dk, dv)[i] for i in argnums)
        # g can arrive in float64 for a float32 output (a loss mixing in float64 constants).
        # With shared QK (k None) dq already holds the keys' gradient too, and dk is None.
        dq, dk, dv = numba_routing.backward(
            np.ascontiguousarray(g, dtype=ans.dtype), np.ascontiguousarray(q), _contiguous(k),
            np.ascontiguousarray(v), np.ascontiguousarray(query_windows, dtype=np.int64),
            _contiguous(key_windows, np.int64), float(scale), bool(last_resort), float(eps))
        return tuple((dq, dk, dv)[i] for i in argnums)

    return vjp


defvjp_argnums(cluster_attention_fused, _cluster_attention_fused_vjp)
