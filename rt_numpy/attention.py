"""The three attentions of the Routing Transformer: dense causal, local, routing.

All three are one computation, :func:`masked_attention` (``softmax(q kᵀ)`` over
the keys a query may see, times ``v``); they differ only in which keys each
query may see, which is the paper's point:

* :func:`dense_causal_attention` - every earlier key.  O(T^2 D).  The reference
  the other two are checked against.
* :func:`local_attention` - the keys of its own block of L tokens and of the
  ``look_back`` blocks before it, causally.  O(T L D).
* :func:`routing_attention` - queries and keys are routed to shared centroids
  (online k-means, :mod:`rt_numpy.kmeans`); each query sees the earlier keys of
  its clusters.  O(T W D) plus O(T K D) for routing, O(T^1.5 D) with
  K = W = sqrt(T).
* :func:`multihead_attention` - routing heads and local heads side by side,
  concatenated and projected.

Shapes: q, k, v (B, H, T, D); centroids (H, K, D); windows (B, H, K, W).
All differentiable code goes through :mod:`rt_numpy.ops` primitives, so the same
functions run on CuPy arrays (docs/design.md#differentiation).  Integer routing
decisions (windows, assignments) are constants: no gradient flows through them.

docs/algorithm.md#1-one-routing-head, docs/algorithm.md#2-local-attention, docs/algorithm.md#4-layers-and-heads;
paper sections 3 and 4.
"""
from __future__ import annotations

import math

import numpy as np
from autograd.extend import defvjp_argnums, primitive
from autograd.tracer import getval

from rt_numpy import _checks, backend, baselines, kmeans, ops
from rt_numpy.kernels import SELF_LOGIT  # -5e4, the "last resort" self logit (PyTorch port, Reformer)

SELF_ATTEND = ("allow", "last_resort")
LOGITS = ("normalized", "scaled")
MEMBERSHIP = ("balanced", "nearest")
HEAD_KINDS = ("routing", "strided", "lsh", "dense")  # what the non-local heads of a layer compute


# --------------------------------------------------------------------------- the core
def masked_attention(q, k, v, visible, *, scale, self_mask=None):
    """``softmax(scale q kᵀ, where visible) v``: the computation every attention here shares.

    Parameters
    ----------
    q : array (..., Tq, D)
    k, v : arrays (..., Tk, D)
    visible : bool array, broadcastable to (..., Tq, Tk)
        Which keys each query may see.  Hidden logits count as -inf; a query
        that sees no key outputs 0 (docs/algorithm.md#14-attention-inside-a-cluster).
    scale : float
        Logit factor.
    self_mask : bool array, broadcastable to (..., Tq, Tk), optional
        Where a query meets its own token: those logits become the "last
        resort" -5e4 (``self_attend="last_resort"``).  None: no self rule.

    Returns
    -------
    array (..., Tq, D)
    """
    probs = ops.softmax(masked_logits(q, k, scale=scale, self_mask=self_mask), mask=visible)  # (.., Tq, Tk)
    return ops.matmul(probs, v)  # (..., Tq, Tk) @ (..., Tk, D) -> (..., Tq, D)


def masked_logits(q, k, *, scale, self_mask=None):
    """``scale q kᵀ`` (..., Tq, Tk), with the "last resort" logit where ``self_mask`` is set."""
    n = getval(k).ndim
    k_t = ops.transpose(k, tuple(range(n - 2)) + (n - 1, n - 2))  # (..., Tk, D) -> (..., D, Tk)
    logits = ops.scale(ops.matmul(q, k_t), scale)  # (..., Tq, D) @ (..., D, Tk) -> (..., Tq, Tk)
    return logits if self_mask is None else ops.masked_fill(logits, self_mask, SELF_LOGIT)


def _self_mask(query_pos, key_pos, self_attend):
    """Where a query meets its own position, for ``self_attend="last_resort"``; None for ``"allow"``."""
    return key_pos == query_pos if self_attend == "last_resort" else None


def _default_scale(scale, D):
    return 1.0 / math.sqrt(D) if scale is None else float(scale)


def _real_keys(key_mask, B, T, xp):
    """The checked padding mask (B, T), True at real tokens, on the device of the queries; None stays None."""
    key_mask = _checks.key_mask(key_mask, B, T)
    return None if key_mask is None else xp.asarray(key_mask)


# --------------------------------------------------------------------------- dense
def dense_causal_attention(q, k, v, *, scale=None, self_attend="allow", key_mask=None):
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
    key_mask : bool array (B, T), optional
        True at real tokens; no query sees a padded key (docs/algorithm.md#8-padding).

    Returns
    -------
    array (B, H, T, D)
    """
    B, H, T, D = _checks.qkv(q, k, v)
    _checks.choice("self_attend", self_attend, SELF_ATTEND)
    xp = backend.get_array_module(getval(q))
    real = _real_keys(key_mask, B, T, xp)  # (B, T) or None
    pos = xp.arange(T)
    query_pos, key_pos = pos[:, None], pos[None, :]  # (T, 1), (1, T)
    visible = key_pos <= query_pos  # (T, T)
    if real is not None:
        visible = visible & real[:, None, None, :]  # (B, 1, T, T): padding is never seen
    return masked_attention(q, k, v, visible, scale=_default_scale(scale, D),
                            self_mask=_self_mask(query_pos, key_pos, self_attend))


# --------------------------------------------------------------------------- local
def local_attention(q, k, v, *, block_size, look_back=1, scale=None, self_attend="allow", key_mask=None):
    """Blocked causal attention: block n sees blocks n - look_back .. n.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        Any T: when T is not a multiple of ``block_size`` the last block is
        short (padded inside, the padding never seen and never returned).
    block_size : int
        L, tokens per block.
    look_back : int
        Previous blocks each block also sees (>= 0).
    scale : float, optional
        Logit factor, ``1 / sqrt(D)`` by default.
    self_attend : {"allow", "last_resort"}
    key_mask : bool array (B, T), optional
        True at real tokens; no query sees a padded key (docs/algorithm.md#8-padding).

    Returns
    -------
    array (B, H, T, D)

    Notes
    -----
    docs/algorithm.md#2-local-attention.  A query sees at most
    ``(look_back + 1) * L`` keys.  Keys before position 0 (the look-back of
    the first blocks) and after position T - 1 (the padding of the last block)
    are zeros and hidden.
    """
    B, H, T, D = _checks.qkv(q, k, v)
    L = _checks.integer("block_size", block_size, 1)
    look_back = _checks.integer("look_back", look_back, 0)
    _checks.choice("self_attend", self_attend, SELF_ATTEND)
    xp = backend.get_array_module(getval(q))
    real = _real_keys(key_mask, B, T, xp)  # (B, T) or None
    N, S = -(-T // L), look_back + 1  # blocks (the last one may be short); blocks seen by each block
    pad = N * L - T

    def blocks(x):
        x = ops.pad_axis(x, 0, pad, axis=2) if pad else x  # (B, H, N*L, D)
        return ops.reshape(x, (B, H, N, L, D))  # (B, H, N*L, D) -> (B, H, N, L, D)

    def with_look_back(x):
        padded = ops.pad_axis(blocks(x), look_back, 0, axis=2)  # (B, H, look_back + N, L, D)
        parts = [ops.slice_axis(padded, s, s + N, axis=2) for s in range(S)]  # S x (B, H, N, L, D)
        return ops.concatenate(parts, axis=3)  # (B, H, N, S*L, D), oldest block first

    query_pos = (xp.arange(N)[:, None] * L + xp.arange(L)[None, :])[:, :, None]  # (N, L, 1)
    key_pos = ((xp.arange(N)[:, None] - look_back) * L + xp.arange(S * L)[None, :])[:, None, :]  # (N, 1, S*L)
    visible = (key_pos >= 0) & (key_pos < T) & (key_pos <= query_pos)  # (N, L, S*L): real keys, causal
    if real is not None:
        real = xp.concatenate([real, xp.zeros((B, pad), bool)], axis=1)  # (B, N*L)
        real = xp.concatenate([xp.zeros((B, look_back * L), bool), real], axis=1)  # (B, (look_back + N) * L)
        seen = real[:, key_pos[:, 0, :] + look_back * L]  # (B, N, S*L): whether each block's keys are real
        visible = visible & seen[:, None, :, None, :]  # (B, 1, N, L, S*L): padding is never seen
    out = masked_attention(blocks(q), with_look_back(k), with_look_back(v), visible,
                           scale=_default_scale(scale, D),
                           self_mask=_self_mask(query_pos, key_pos, self_attend))  # (B, H, N, L, D)
    out = ops.reshape(out, (B, H, N * L, D))
    return ops.slice_axis(out, 0, T, axis=2) if pad else out  # (B, H, T, D)


# --------------------------------------------------------------------------- routing
def _check_routing_args(q, k, v, means, window_size, mem_kv, options):
    """Every argument check of :func:`routing_attention`; returns the centroids (unboxed) and W."""
    B, H, T, D = _checks.qkv(q, k, v)
    for name, allowed in (("norm", kmeans.NORMS), ("logits", LOGITS), ("membership", MEMBERSHIP),
                          ("self_attend", SELF_ATTEND), ("commitment_qk", kmeans.COMMITMENT_QK),
                          ("impl", backend.IMPLS)):
        _checks.choice(name, options[name], allowed)
    _checks.real("combine_eps", options["combine_eps"], low=0.0, low_open=True)
    _checks.real("commitment", options["commitment"], low=0.0)
    backend.resolve_impl(options["impl"], backend.get_array_module(getval(q)))  # e.g. "cupy" on NumPy arrays
    mu = _checks.means(getval(means))
    dtype = getval(q).dtype
    if mu.shape[0] != H or mu.shape[2] != D or mu.dtype != dtype:
        raise ValueError(f"means of shape {tuple(mu.shape)} and dtype {mu.dtype} do not fit q of shape "
                         f"{(B, H, T, D)} and dtype {dtype}: expected ({H}, K, {D})")
    W = None
    if options["membership"] == "balanced":
        if window_size is None:
            raise ValueError("membership='balanced' needs window_size (W), got None")
        W = _checks.integer("window_size", window_size, 1)
        if W > T:
            raise ValueError(f"window_size must be <= T={T}, got {W}")
    if mem_kv is not None:
        if options["shared_qk"]:
            raise ValueError("mem_kv is the port's separate-QK option: use it with shared_qk=False")
        if not isinstance(mem_kv, (tuple, list)) or len(mem_kv) != 2:
            got = f"length {len(mem_kv)}" if isinstance(mem_kv, (tuple, list)) else type(mem_kv).__name__
            raise ValueError(f"mem_kv must be a pair (mem_k, mem_v), got {got}")
        for name, m in zip(("mem_k", "mem_v"), mem_kv):
            m = _checks.float_array(name, m, 3)
            if tuple(m.shape) != (H, mu.shape[1], D) or m.dtype != dtype:
                raise ValueError(f"{name} must have shape {(H, mu.shape[1], D)} and dtype {dtype}, "
                                 f"got {tuple(m.shape)} {m.dtype}")
    return mu, W


def routing_attention(q, k, v, means, *, window_size=None, shared_qk=True, norm="ln", logits="normalized",
                      membership="balanced", self_attend="allow", combine_eps=1e-2, commitment=1e-4,
                      commitment_qk="sum", mem_kv=None, impl="auto", key_mask=None):
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
        Routing normalisation (docs/algorithm.md#11-normalise).
    logits : {"normalized", "scaled"}
        ``"normalized"`` (official): normalised q against normalised k, no
        ``1/sqrt(D)``.  ``"scaled"`` (PyTorch port): raw q against keys, divided
        by ``sqrt(D)``; with shared QK the keys are L2-normalised queries.
    membership : {"balanced", "nearest"}
        ``"balanced"``: each cluster takes its W most similar tokens (not causal,
        docs/algorithm.md#3-the-causal-leak).  ``"nearest"``: each token joins
        its nearest centroid only (strictly causal); ``window_size`` is not used.
    self_attend : {"allow", "last_resort"}
        Official: a token may attend to itself.  Port: only when nothing else
        is visible (self logit -5e4).  With separate QK, ``"last_resort"``
        applies to the key at the query's own position: an rt_numpy option that
        neither public implementation has (both apply the rule only with shared
        QK; ``crosscheck.port_conventions(shared_qk=False)`` uses ``"allow"``).
    combine_eps : float
        Added to the per-token cluster count in the scatter-mean (official
        1e-2, port 1e-5; docs/algorithm.md#15-combine).
    commitment : float
        beta of the commitment loss.
    commitment_qk : {"sum", "mean"}
        How query and key commitment errors add up
        (docs/algorithm.md#18-commitment-loss).  With shared QK, ``"sum"``
        counts the queries twice, as the official code does.
    mem_kv : tuple (mem_k, mem_v) of arrays (H, K, D), optional
        One learned memory key/value per head and cluster, prepended to every
        key window and always visible (the port's separate-QK causal setup).
        With ``membership="nearest"`` a query sees its own cluster's memory.
    impl : {"auto", "ref", "numba", "cupy"}
        Runs for the whole call, forward and backward
        (docs/design.md#choosing-an-implementation).  ``"numba"`` (NumPy
        arrays) or ``"cupy"`` (CuPy arrays): the routing decisions and the
        attention inside the clusters run fused kernels (balanced membership,
        no ``mem_kv``; nearest membership without ``mem_kv`` on ``"numba"``:
        :func:`nearest_attention_fused`); ``"ref"`` runs no compiled code.
    key_mask : bool array (B, T), optional
        True at real tokens.  Padding joins no cluster, enters no k-means
        statistic and no commitment loss, and no query sees it
        (docs/algorithm.md#8-padding).  The fused kernel runs when every row
        has at least W real tokens (no window then holds padding); otherwise
        the reference does.

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
    docs/algorithm.md#1-one-routing-head, steps 1.1 to 1.5 and 1.8.  Masked
    logits are treated as -inf; a query with no visible key outputs 0.  A
    token in no cluster gets 0 from a routing head.
    """
    k = q if shared_qk else k
    options = {"norm": norm, "logits": logits, "membership": membership, "self_attend": self_attend,
               "commitment_qk": commitment_qk, "impl": impl, "combine_eps": combine_eps,
               "commitment": commitment, "shared_qk": shared_qk}
    mu, W = _check_routing_args(q, k, v, means, window_size, mem_kv, options)
    B, H, T, D = getval(q).shape
    xp = backend.get_array_module(getval(q))
    real = _real_keys(key_mask, B, T, xp)  # (B, T) or None
    with backend.use_impl(impl, xp) as run:
        # 1. Normalise for routing (docs/algorithm.md#11-normalise).
        qn = kmeans.normalize(q, norm)  # (B, H, T, D)
        kn = qn if shared_qk else kmeans.normalize(k, norm)
        streams = [qn] if shared_qk else [qn, kn]

        # 2. Route: nearest centroids (for the k-means update) and, with balanced membership, each
        #    cluster's top-W window, from one score matrix per stream (docs/algorithm.md#13-membership).
        #    Routing decisions are integers: constants for autograd.
        if membership == "balanced":
            routes = [kmeans.route(getval(x), mu, W, key_mask=real) for x in streams]
            stats = {name: xp.stack([r[name] for r in routes]) for name in ("assignments", "sums", "counts")}
        else:
            stats = kmeans.cluster_stats([getval(x) for x in streams], mu, key_mask=real)

        # 3. The vectors the logits are made of (docs/algorithm.md#14-attention-inside-a-cluster).
        q_logit, k_logit, scale = logit_vectors(q, k, qn, kn, logits, shared_qk)

        # 4. Attend inside the clusters and 5. combine back to positions by a scatter-mean
        #    (docs/algorithm.md#15-combine).
        if membership == "nearest" and run == "numba" and mem_kv is None:
            shared = shared_qk and logits == "normalized"  # the keys are the queries: one array, one grouping
            aq, ak = stats["assignments"][0], stats["assignments"][-1]  # (B, H, T) each; padding is -1
            out = nearest_attention_fused(q_logit, None if shared else k_logit, v, aq, None if shared else ak,
                                          mu.shape[1], scale, self_attend == "last_resort", combine_eps)
        elif membership == "nearest":
            out = _nearest_attention(q_logit, k_logit, v, stats["assignments"], scale, self_attend,
                                     combine_eps, mem_kv)
        elif run != "ref" and mem_kv is None and (real is None or int(real.sum(axis=1).min()) >= W):
            shared = shared_qk and logits == "normalized"  # the keys are the queries: gather each row once
            out = cluster_attention_fused(q_logit, None if shared else k_logit, v, routes[0]["windows"],
                                          None if shared else routes[-1]["windows"], scale,
                                          self_attend == "last_resort", combine_eps)
        else:
            out = cluster_attention_reference(q_logit, k_logit, v, routes[0]["windows"], routes[-1]["windows"],
                                              scale=scale, self_attend=self_attend, combine_eps=combine_eps,
                                              mem_kv=mem_kv, key_mask=real)

        # 6. Commitment loss, from the start-of-step assignments (docs/algorithm.md#18-commitment-loss).
        committed, assigned = streams, list(stats["assignments"])
        if shared_qk and commitment_qk == "sum":  # the official code adds e_q + e_k with k = q
            committed, assigned = committed * 2, assigned * 2
        loss = kmeans.commitment_loss(committed, mu, commitment=commitment, commitment_qk=commitment_qk,
                                      assignments=assigned, key_mask=real)
    return out, loss, stats


def logit_vectors(q, k, qn, kn, logits, shared_qk):
    """The vectors the logits are made of, and their factor (docs/algorithm.md#14-attention-inside-a-cluster).

    ``"normalized"``: the routing-normalised ``qn`` and ``kn``, factor 1.  ``"scaled"``: the raw q
    against the keys (with shared QK, the L2-normalised queries), factor ``1 / sqrt(D)``.
    Returns ``(q_logit, k_logit, scale)``.
    """
    if logits == "normalized":
        return qn, kn, 1.0
    return q, ops.l2_normalize(q) if shared_qk else k, 1.0 / math.sqrt(getval(q).shape[-1])


def gather_windows(x, windows):
    """Rows of ``x`` (B, H, T, D) at ``windows`` (B, H, K, W) -> (B, H, K, W, D)."""
    B, H, K, W = windows.shape
    flat = ops.gather_rows(x, windows.reshape(B, H, K * W))  # (B, H, K*W, D)
    return ops.reshape(flat, (B, H, K, W, x.shape[-1]))


def cluster_attention_reference(q, k, v, query_windows, key_windows, *, scale, self_attend="allow",
                                combine_eps=1e-2, mem_kv=None, key_mask=None):
    """Causal attention inside each cluster window, then the scatter-mean.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        The vectors that make the logits (already normalised or not) and values.
    query_windows, key_windows : int arrays (B, H, K, W)
        Positions of each cluster's queries and keys.
    scale : float
        Logit factor.
    self_attend, combine_eps, mem_kv
        As in :func:`routing_attention`.
    key_mask : bool array (B, T), optional
        True at real tokens: a padded key in a window is never seen.

    Returns
    -------
    array (B, H, T, D)
        ``out[i] = sum over (c, r) with I_c[r] = i of O_c[r] / (count_i + combine_eps)``.

    Notes
    -----
    docs/algorithm.md#14-attention-inside-a-cluster, docs/algorithm.md#15-combine.
    The causal mask compares original positions.  The memory key of ``mem_kv``
    goes first in every key window, always visible and never "self".
    """
    B, H, T, D = getval(q).shape
    K, W = query_windows.shape[2:]
    xp = backend.get_array_module(getval(q))
    qw, kw, vw = gather_windows(q, query_windows), gather_windows(k, key_windows), gather_windows(v, key_windows)
    query_pos, key_pos = query_windows[..., :, None], key_windows[..., None, :]  # (B,H,K,W,1), (B,H,K,1,W)
    visible = key_pos <= query_pos  # (B, H, K, W, W), causal by original positions
    if key_mask is not None:
        real = key_mask[xp.arange(B)[:, None, None, None], key_windows]  # (B, H, K, W): is each key real
        visible = visible & real[..., None, :]  # (B, H, K, W, W): padding is never seen
    self_mask = _self_mask(query_pos, key_pos, self_attend)
    if mem_kv is not None:
        def prepend(m, rows):  # (H, K, D) -> (B, H, K, 1, D), then before the W gathered rows
            memory = ops.broadcast_to(ops.reshape(m, (1, H, K, 1, D)), (B, H, K, 1, D))
            return ops.concatenate([memory, rows], axis=3)  # (B, H, K, 1+W, D)

        kw, vw = prepend(mem_kv[0], kw), prepend(mem_kv[1], vw)
        always = xp.ones((B, H, K, W, 1), bool)
        visible = xp.concatenate([always, visible], axis=-1)  # (B, H, K, W, 1+W)
        if self_mask is not None:
            self_mask = xp.concatenate([~always, xp.broadcast_to(self_mask, visible[..., 1:].shape)], axis=-1)
    outs = masked_attention(qw, kw, vw, visible, scale=scale, self_mask=self_mask)  # (B, H, K, W, D)
    flat = ops.reshape(outs, (B, H, K * W, D))
    summed = ops.scatter_add_rows(flat, query_windows.reshape(B, H, K * W), T)  # (B, H, T, D)
    counts = _window_counts(query_windows, T, xp)  # (B, H, T)
    return ops.divide(summed, (counts + combine_eps).astype(summed.dtype)[..., None])


def _window_counts(windows, T, xp):
    """How many windows each position is in: (B, H, K, W) -> (B, H, T) float."""
    B, H = windows.shape[:2]
    rows = windows.reshape(B * H, -1) + xp.arange(B * H)[:, None] * T  # (B*H, K*W): position in (b, h)'s own range
    counts = xp.bincount(rows.reshape(-1), minlength=B * H * T)  # exact integer counts
    return counts.reshape(B, H, T).astype(xp.float64)


def _nearest_attention(q, k, v, assignments, scale, self_attend, combine_eps, mem_kv=None):
    """``membership="nearest"``: query i sees key j iff both chose the same centroid and j <= i.

    Written as dense attention with a cluster mask: O(T^2) memory, chosen for
    readability (the reference).  Each token is in exactly one cluster, so the
    scatter-mean divides by 1 + combine_eps.  With ``mem_kv``, the K memory
    keys of the head go first, and query i sees the one of its own cluster.
    :func:`nearest_attention_fused` computes the same without ``mem_kv`` in
    O(T) memory (what ``impl="numba"`` runs).
    """
    T = getval(q).shape[2]
    xp = backend.get_array_module(getval(q))
    aq, ak = assignments[0], assignments[-1]  # (B, H, T): queries, keys (the queries' with shared QK)
    pos = xp.arange(T)
    visible = (ak[..., None, :] == aq[..., :, None]) & (pos[None, :] <= pos[:, None])  # (B, H, T, T)
    visible = visible & (ak[..., None, :] >= 0)  # padding (assignment -1) is in no cluster, never seen
    self_mask = _self_mask(pos[:, None], pos[None, :], self_attend)
    if mem_kv is not None:
        B, H = aq.shape[:2]
        K, D = getval(mem_kv[0]).shape[1:]

        def prepend(m, rows):  # (H, K, D) memory rows before the T rows: (B, H, K+T, D)
            return ops.concatenate([ops.broadcast_to(ops.reshape(m, (1, H, K, D)), (B, H, K, D)), rows], axis=2)

        k, v = prepend(mem_kv[0], k), prepend(mem_kv[1], v)
        own = aq[..., :, None] == xp.arange(K)  # (B, H, T, K): a query sees its own cluster's memory
        visible = xp.concatenate([own, visible], axis=-1)  # (B, H, T, K+T)
        if self_mask is not None:
            self_mask = xp.concatenate([xp.zeros((T, K), bool), self_mask], axis=-1)  # (T, K+T)
    out = masked_attention(q, k, v, visible, scale=scale, self_mask=self_mask)  # (B, H, T, D)
    return ops.scale(out, 1.0 / (1.0 + combine_eps))


# --------------------------------------------------------------------------- multi-head
def init_attention_params(width, *, shared_qk=True, rng, dtype=np.float32):
    """Projection weights of one attention layer, as a dict (docs/algorithm.md#4-layers-and-heads).

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
                        look_back=1, shared_qk=True, self_attend="allow", rotary=None, rotary_values=False,
                        impl="auto", kind="routing", stride=None, rotations=None, trace=None, key_mask=None,
                        **routing):
    """One attention layer: routing (or baseline) heads and local heads side by side, then the output projection.

    Parameters
    ----------
    x : array (B, T, C)
    params : dict
        ``w_q``, ``w_v``, ``w_o`` and, without shared QK, ``w_k``; each (C, C).
        Optionally, as in the PyTorch port's LM (docs/conventions.md#the-language-model-around-it):
        ``mem_k`` and ``mem_v`` (n_route_heads, K, D), the routing heads' memory key and value
        (``mem_kv`` of :func:`routing_attention`; ``kind="routing"``, separate QK), and ``b_q_local``,
        ``b_v_local`` (and ``b_k_local`` without shared QK), each ((H - n_route_heads) D,), biases
        of the local heads' projections.
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
    rotary_values : bool
        Rotate the values of the first ``n_route_heads`` heads too, as the
        PyTorch port's routing heads do (needs ``rotary``).
    kind : {"routing", "strided", "lsh", "dense"}
        What the first ``n_route_heads`` heads compute: routing attention, or
        one of the paper's baselines (:mod:`rt_numpy.baselines`) in their place.
    stride : int
        S of ``kind="strided"``.
    rotations : array (n_route_heads, n_hashes, D, K/2)
        The fixed rotations of ``kind="lsh"`` (its chunks are ``window_size`` long).
    **routing
        Further options of :func:`routing_attention` (``norm``, ``logits``,
        ``membership``, ``combine_eps``, ``commitment``, ``commitment_qk``);
        LSH heads read ``norm`` and ``logits``.
    trace : dict, optional
        Receives the layer's per-head ``q``, ``k`` and ``v`` (B, H, T, D),
        plain arrays after the biases and the rotary embedding, for who-sees-whom
        measurements (:mod:`rt_numpy.baselines`, :mod:`rt_numpy.introspect`).
    key_mask : bool array (B, T), optional
        True at real tokens; every head hides padding (docs/algorithm.md#8-padding).

    Returns
    -------
    y : array (B, T, C)
    loss : scalar
        The routing heads' commitment loss (0.0 without routing heads).
    stats : dict or None
        The routing heads' k-means statistics, for :func:`rt_numpy.kmeans.update_state`.

    Notes
    -----
    docs/algorithm.md#4-layers-and-heads; paper section 4.2 (routing and local heads mixed).
    """
    H, Hr = _check_multihead_args(x, params, num_heads, n_route_heads, shared_qk, impl)
    _checks.choice("kind", kind, HEAD_KINDS)
    _checks.boolean("rotary_values", rotary_values)
    if kind == "lsh" and not shared_qk:
        raise ValueError("kind='lsh' hashes shared queries and keys: use it with shared_qk=True")
    if rotary_values and rotary is None:
        raise ValueError("rotary_values=True rotates the values by the rotary tables: pass rotary=(cos, sin)")
    mem_kv = (params["mem_k"], params["mem_v"]) if "mem_k" in getval(params) else None
    if mem_kv is not None and kind != "routing":
        raise ValueError(f"params['mem_k'] and params['mem_v'] are memory of routing heads, got kind={kind!r}")
    xp = backend.get_array_module(getval(x))
    D = getval(x).shape[2] // H
    with backend.use_impl(impl, xp):
        def project(name):  # (B, T, C) @ (C, C) -> (B, H, T, D), plus the local heads' bias if any
            y = ops.matmul(x, params["w_" + name])  # (B, T, C)
            if f"b_{name}_local" in getval(params):  # the port's routing heads project without a bias
                no_bias = xp.zeros(Hr * D, getval(y).dtype)  # (Hr D,)
                y = ops.add(y, ops.concatenate([no_bias, params[f"b_{name}_local"]], axis=0))  # (B, T, C) + (C,)
            return ops.split_heads(y, H)

        q = project("q")
        k = q if shared_qk else project("k")
        v = project("v")
        if rotary is not None:
            q = apply_rotary(q, *rotary)
            k = q if shared_qk else apply_rotary(k, *rotary)
            if rotary_values and Hr:  # the port rotates its routing heads' values; its local heads' stay
                rotated = apply_rotary(ops.slice_axis(v, 0, Hr, axis=1), *rotary)  # (B, Hr, T, D)
                v = rotated if Hr == H else ops.concatenate([rotated, ops.slice_axis(v, Hr, H, axis=1)], axis=1)
        if trace is not None:
            trace.update(q=getval(q), k=getval(k), v=getval(v))
        parts, loss, stats = [], 0.0, None
        if Hr:
            def route_heads(t):
                return ops.slice_axis(t, 0, Hr, axis=1)  # (B, H, T, D) -> (B, Hr, T, D)

            qh, kh, vh = route_heads(q), route_heads(k), route_heads(v)
            if kind == "routing":
                out, loss, stats = routing_attention(qh, kh, vh, means, window_size=window_size,
                                                     shared_qk=shared_qk, self_attend=self_attend, mem_kv=mem_kv,
                                                     impl=impl, key_mask=key_mask, **routing)
            elif kind == "strided":
                out = baselines.strided_attention(qh, kh, vh, stride=stride, self_attend=self_attend,
                                                  key_mask=key_mask)
            elif kind == "lsh":
                out = baselines.lsh_attention(qh, kh, vh, rotations, window_size=window_size, self_attend=self_attend,
                                              norm=routing.get("norm", "ln"),
                                              logits=routing.get("logits", "normalized"), key_mask=key_mask)
            else:
                out = dense_causal_attention(qh, kh, vh, self_attend=self_attend, key_mask=key_mask)
            parts.append(out)
        if Hr < H:
            def local_heads(t):
                return ops.slice_axis(t, Hr, H, axis=1)  # (B, H, T, D) -> (B, H - Hr, T, D)

            parts.append(local_attention(local_heads(q), local_heads(k), local_heads(v), block_size=block_size,
                                         look_back=look_back, self_attend=self_attend, key_mask=key_mask))
        out = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)  # (B, H, T, D)
        y = ops.matmul(ops.merge_heads(out), params["w_o"])  # (B, T, C) @ (C, C) -> (B, T, C)
    return y, loss, stats


def _check_multihead_args(x, params, num_heads, n_route_heads, shared_qk, impl):
    """Every argument check of :func:`multihead_attention`; returns H and the number of routing heads."""
    xv = getval(x)
    if getattr(xv, "ndim", None) != 3:
        raise ValueError(f"x must have shape (B, T, C), got {getattr(xv, 'shape', type(xv).__name__)}")
    C = xv.shape[2]
    H = _checks.integer("num_heads", num_heads, 1)
    if C % H:
        raise ValueError(f"width C={C} is not a multiple of num_heads={H}")
    Hr = _checks.integer("n_route_heads", n_route_heads, 0, H)
    needed = {"w_q", "w_v", "w_o"} | (set() if shared_qk else {"w_k"})
    plain = getval(params)  # a DictBox while autograd traces
    if not isinstance(plain, dict) or needed - set(plain):
        got = sorted(plain) if isinstance(plain, dict) else type(plain).__name__
        raise ValueError(f"params must hold {sorted(needed)}, got {got}")
    for name in needed:
        if tuple(getval(plain[name]).shape) != (C, C):
            raise ValueError(f"params[{name!r}] must have shape {(C, C)}, got {tuple(getval(plain[name]).shape)}")
    if ("mem_k" in plain) != ("mem_v" in plain):
        raise ValueError(f"params must hold both mem_k and mem_v or neither, got {sorted(plain)}")
    if "mem_k" in plain and not Hr:
        raise ValueError("params['mem_k'] and params['mem_v'] belong to routing heads, got n_route_heads=0")
    biases = {name for name in ("b_q_local", "b_k_local", "b_v_local") if name in plain}
    if biases:
        wanted = {"b_q_local", "b_v_local"} | (set() if shared_qk else {"b_k_local"})
        if biases != wanted:
            raise ValueError(f"params must hold the local biases {sorted(wanted)} or none, got {sorted(biases)}")
        for name in sorted(biases):  # one bias per channel of the local heads
            shape = tuple(getval(plain[name]).shape)
            if shape != ((H - Hr) * (C // H),):
                raise ValueError(f"params[{name!r}] must have shape {((H - Hr) * (C // H),)} "
                                 f"((num_heads - n_route_heads) * D), got {shape}")
    _checks.choice("impl", impl, backend.IMPLS)
    return H, Hr


# ------------------------------------------------------------ fused (Numba / CuPy) cluster attention
def _gpu_kernels(x):
    """:mod:`rt_numpy.kernels.cupy_routing` when ``x`` is a CuPy array, else None (Numba runs)."""
    if backend.get_array_module(x) is np:
        return None
    from rt_numpy.kernels import cupy_routing

    return cupy_routing


@primitive
def cluster_attention_fused(q, k, v, query_windows, key_windows, scale, last_resort, combine_eps):
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
        return gpu.forward(q, k, v, query_windows, key_windows, float(scale), bool(last_resort), float(combine_eps))
    from rt_numpy.kernels import numba_routing

    return numba_routing.forward(np.ascontiguousarray(q), _contiguous(k), np.ascontiguousarray(v),
                                 np.ascontiguousarray(query_windows, dtype=np.int64),
                                 _contiguous(key_windows, np.int64), float(scale), bool(last_resort),
                                 float(combine_eps))


def _contiguous(x, dtype=None):
    """``np.ascontiguousarray(x, dtype)``, and None for None (a shared-QK key argument)."""
    return None if x is None else np.ascontiguousarray(x, dtype=dtype)


def _cluster_attention_fused_vjp(argnums, ans, args, kwargs):
    """One backward kernel call gives the gradients of q, k and v together."""
    from rt_numpy.kernels import numba_routing

    q, k, v, query_windows, key_windows, scale, last_resort, combine_eps = args
    gpu = _gpu_kernels(q)

    def vjp(g):
        if gpu is not None:
            shared = k is None
            dq, dk, dv = gpu.backward(g.astype(ans.dtype, copy=False), q, q if shared else k, v, query_windows,
                                      query_windows if shared else key_windows, float(scale), bool(last_resort),
                                      float(combine_eps))
            if shared:
                dq, dk = dq + dk, None  # the keys are the queries: both gradients reach q
            return tuple((dq, dk, dv)[i] for i in argnums)
        # g can arrive in float64 for a float32 output (a loss mixing in float64 constants).
        # With shared QK (k None) dq already holds the keys' gradient too, and dk is None.
        dq, dk, dv = numba_routing.backward(
            np.ascontiguousarray(g, dtype=ans.dtype), np.ascontiguousarray(q), _contiguous(k),
            np.ascontiguousarray(v), np.ascontiguousarray(query_windows, dtype=np.int64),
            _contiguous(key_windows, np.int64), float(scale), bool(last_resort), float(combine_eps))
        return tuple((dq, dk, dv)[i] for i in argnums)

    return vjp


defvjp_argnums(cluster_attention_fused, _cluster_attention_fused_vjp)


@primitive
def nearest_attention_fused(q, k, v, query_assignments, key_assignments, num_clusters, scale, last_resort,
                            combine_eps):
    """:func:`_nearest_attention` (no ``mem_kv``) as one fused Numba kernel, O(T) memory instead of O(T^2).

    ``query_assignments`` and ``key_assignments`` (B, H, T) are the two streams'
    clusters (``stats["assignments"]``), -1 at padding; ``last_resort`` is
    ``self_attend == "last_resort"``.  ``k=None`` with ``key_assignments=None``
    means shared QK: the keys are the queries and dq carries both gradients.
    Nothing of size (T, T) is made or kept: the backward kernel recomputes each
    row's probabilities.  First-order gradients only; NumPy arrays only (on
    CuPy arrays the reference runs).  :mod:`rt_numpy.kernels.numba_nearest`.
    """
    from rt_numpy.kernels import numba_nearest

    return numba_nearest.forward(np.ascontiguousarray(q), _contiguous(k), np.ascontiguousarray(v),
                                 np.ascontiguousarray(query_assignments, dtype=np.int64),
                                 _contiguous(key_assignments, np.int64), int(num_clusters), float(scale),
                                 bool(last_resort), float(combine_eps))


def _nearest_attention_fused_vjp(argnums, ans, args, kwargs):
    """One backward kernel call gives the gradients of q, k and v together (dk None with shared QK)."""
    from rt_numpy.kernels import numba_nearest

    q, k, v, query_assignments, key_assignments, num_clusters, scale, last_resort, combine_eps = args

    def vjp(g):
        dq, dk, dv = numba_nearest.backward(
            np.ascontiguousarray(g, dtype=ans.dtype), np.ascontiguousarray(q), _contiguous(k),
            np.ascontiguousarray(v), np.ascontiguousarray(query_assignments, dtype=np.int64),
            _contiguous(key_assignments, np.int64), int(num_clusters), float(scale), bool(last_resort),
            float(combine_eps))
        return tuple((dq, dk, dv)[i] for i in argnums)

    return vjp


defvjp_argnums(nearest_attention_fused, _nearest_attention_fused_vjp)
