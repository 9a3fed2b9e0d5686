"""Generation with a key/value cache: each new token costs one position, not a whole window.

* :func:`inexact_reason` - why a cache cannot reproduce the full recompute for a
  configuration (None when it can).
* :func:`prefill` - run the model over a window and keep every layer's keys and
  values: the logits after the window's last token and the cache.
* :func:`step` - append one token: its logits, computed from the cache alone.
* :func:`decode_logits` - the logits at every position of a window, each one
  computed as a decoder computes it (for bits/byte under a decode rule).

When a cache is exact (docs/algorithm.md#9-generation-and-the-keyvalue-cache)
-----------------------------------------------------------------------------
The model is strictly causal when its routing heads use ``membership="nearest"``
(or it has no routing heads): the keys and values of position j, in every layer,
depend on tokens 0..j only, so appending a token never changes them.  A cache
that keeps them and computes only the new position's query, key and value gives
the logits of :func:`rt_numpy.model.forward` on the whole window, to rounding.

Per layer the cache keeps, for the window's positions so far:

* the local heads' keys and values; a local head attends to the keys of its own
  block of L positions and of the ``look_back`` blocks before it (block
  boundaries at multiples of L from the window's start, as in ``forward``);
* the routing heads' keys (the vectors the logits are made of, see
  :func:`rt_numpy.attention.logit_vectors`) and values, and every key's scores
  against the K centroids (B, Hr, K, T), from which each key's centroid id is read;
  a routing head attends to the cached keys of its own cluster.

Balanced membership and the prefix rule
---------------------------------------
With ``membership="balanced"`` each cluster takes its W best tokens of the whole
window, so appending a token can push an earlier token out of a cluster and
change the output at that earlier position, and with it every later layer's keys
and values there: no cache is exact.  :func:`step` then offers the decode-time
rule of the official code (future positions hidden) as an *approximation*,
``rule="prefix"``: when a position is the
newest, each cluster's members are chosen among the positions so far (the prefix),
the position's keys and values in every layer are computed from them and then
kept, never revised.  In the first routing layer this is what the full recompute
computes; above it the kept states differ from the recomputed ones.  The gap in
bits/byte is measured by ``bench/decode_gap.py``.

Everything here is evaluation only: no dropout, no autograd, no k-means update
(the centroids are read).  Plain array code, on NumPy (or CuPy) arrays.  The functions call the same :mod:`rt_numpy.ops`
primitives as :mod:`rt_numpy.model`, so a float64 run agrees with ``forward`` to
about 1e-13.
"""
from __future__ import annotations

import math

import numpy as np

from rt_numpy import _checks, attention, backend, kmeans, model, ops

RULES = ("exact", "prefix")


# --------------------------------------------------------------------------- when the cache is exact
def inexact_reason(cfg):
    """Why a key/value cache cannot reproduce the full recompute for ``cfg``; None when it can.

    The cache covers local heads and routing heads.  It is exact unless some
    routing layer uses ``membership="balanced"`` (appending a token can evict an
    earlier cluster member; :func:`step` then has only the approximate
    ``rule="prefix"``).  Baseline heads (``attention`` other than "routing") are
    not covered: the message says so.
    """
    sparse = [i for i in range(cfg.n_layers) if cfg.is_sparse_layer(i)]
    if sparse and cfg.attention != "routing":
        return (f"the cache covers local and routing heads only, and layers {sparse} have "
                f"attention={cfg.attention!r} heads")
    if sparse and cfg.membership == "balanced":
        return (f"the routing heads of layers {sparse} use membership='balanced': each cluster takes its "
                f"W best tokens of the whole window, so a new token can evict an earlier member and change "
                f"earlier positions' outputs (docs/algorithm.md#9-generation-and-the-keyvalue-cache); "
                f"membership='nearest' or local heads only are exact")
    return None


def check_rule(cfg, rule):
    """``rule`` is allowed for ``cfg``: "exact" needs an exact cache, "prefix" needs routing heads' kind "routing"."""
    _checks.choice("rule", rule, RULES)
    reason = inexact_reason(cfg)
    if reason is not None and (rule == "exact" or cfg.attention != "routing"):
        raise ValueError(f"rule={rule!r}: a key/value cache is not exact for this model: {reason}")


# --------------------------------------------------------------------------- the cache itself
def _empty_cache(cfg, B, xp, dtype):
    """Room for ``seq_len`` positions in every layer; ``length`` says how many are filled.

    The arrays are filled in place, one position per :func:`step` (a copy of the
    whole cache per token would cost what the cache saves).
    """
    T, D, K = cfg.seq_len, cfg.head_dim, cfg.num_clusters
    layers = {}
    for i in range(cfg.n_layers):
        Hr = cfg.num_heads - cfg.n_local_heads(i)
        Hl = cfg.n_local_heads(i)
        layer = {"local": {"k": xp.zeros((B, Hl, T, D), dtype), "v": xp.zeros((B, Hl, T, D), dtype)}}
        if Hr:
            layer["route"] = {"k": xp.zeros((B, Hr, T, D), dtype), "v": xp.zeros((B, Hr, T, D), dtype),
                              "scores": xp.zeros((B, Hr, K, T), dtype),  # each key's similarity to each centroid
                              "query_scores": xp.zeros((B, Hr, K, T), dtype)}  # the same for the queries
        layers[f"h{i}"] = layer
    return {"length": 0, "layers": layers}


def _store_routing(route_cache, t, q, k, v, means, cfg):
    """Normalise the routing heads' new q and k (B, Hr, Tn, D) at positions t.., keep keys, values, scores.

    Returns the logit vector of the queries and the logit factor (:func:`attention.logit_vectors`).
    """
    Tn = q.shape[2]
    qn = kmeans.normalize(q, cfg.norm)  # (B, Hr, Tn, D)
    kn = qn if cfg.shared_qk else kmeans.normalize(k, cfg.norm)
    q_logit, k_logit, scale = attention.logit_vectors(q, k, qn, kn, cfg.logits, cfg.shared_qk)
    route_cache["k"][:, :, t:t + Tn] = k_logit
    route_cache["v"][:, :, t:t + Tn] = v
    route_cache["scores"][..., t:t + Tn] = kmeans.cluster_scores(kn, means)  # (B, Hr, K, Tn)
    route_cache["query_scores"][..., t:t + Tn] = kmeans.cluster_scores(qn, means)
    return q_logit, scale


def _project(h, params, p, cfg, Hr):
    """Per-head q, k, v (B, H, Tn, D) of the layer input h (B, Tn, C), with the local heads' biases if any.

    The same projections as :func:`rt_numpy.attention.multihead_attention`.
    """
    xp = backend.get_array_module(h)
    D = cfg.head_dim

    def one(name):
        y = ops.matmul(h, params[p + "attn.w_" + name])  # (B, Tn, C) @ (C, C) -> (B, Tn, C)
        if p + f"attn.b_{name}_local" in params:  # routing heads project without a bias
            bias = xp.concatenate([xp.zeros(Hr * D, y.dtype), params[p + f"attn.b_{name}_local"]])  # (C,)
            y = ops.add(y, bias)
        return ops.split_heads(y, cfg.num_heads)  # (B, Tn, C) -> (B, H, Tn, D)

    q = one("q")
    k = q if cfg.shared_qk else one("k")
    return q, k, one("v")


def _rotate(q, k, v, rotary, cfg, Hr):
    """The rotary embedding of :func:`multihead_attention`, rows (cos, sin) of the new positions."""
    if rotary is None:
        return q, k, v
    q = attention.apply_rotary(q, *rotary)
    k = q if cfg.shared_qk else attention.apply_rotary(k, *rotary)
    if cfg.rotary_values and Hr:  # the port rotates its routing heads' values; its local heads' stay
        v = ops.concatenate([attention.apply_rotary(v[:, :Hr], *rotary), v[:, Hr:]], axis=1)
    return q, k, v


# --------------------------------------------------------------------------- one new position
def _local_step(q, local_cache, t, cfg):
    """Local heads at position t: q (B, Hl, 1, D) against the cached keys of its block and look-back blocks."""
    start = max(0, (t // cfg.block_size - cfg.look_back) * cfg.block_size)  # first key the block sees
    k = local_cache["k"][:, :, start:t + 1]  # (B, Hl, n, D), n = t + 1 - start
    v = local_cache["v"][:, :, start:t + 1]
    n, xp = t + 1 - start, backend.get_array_module(q)
    visible = xp.ones((1, n), bool)  # every key from start to t is seen
    self_mask = (xp.arange(n) == n - 1)[None] if cfg.self_attend == "last_resort" else None  # (1, n)
    return attention.masked_attention(q, k, v, visible, scale=1.0 / math.sqrt(cfg.head_dim), self_mask=self_mask)


def _members(route_cache, t, cfg):
    """Cluster membership at position t: keys (B, Hr, K, n) and the new query (B, Hr, K), n = t + 1.

    ``nearest``: every key is in its nearest centroid's cluster, the query in its own.
    ``balanced`` (the prefix rule): each cluster takes the min(W, n) best keys, and
    the best queries, among positions 0..t (ties to the lower position, as in training).
    """
    n, K = t + 1, cfg.num_clusters
    xp = backend.get_array_module(route_cache["scores"])
    clusters = xp.arange(K)[:, None]  # (K, 1)
    scores, query_scores = route_cache["scores"][..., :n], route_cache["query_scores"][..., :n]  # (B, Hr, K, n)
    if cfg.membership == "nearest":
        keys = scores.argmax(axis=2)[:, :, None, :] == clusters  # (B, Hr, n) -> (B, Hr, K, n)
        query = query_scores[..., t].argmax(axis=2)[..., None] == clusters[:, 0]  # (B, Hr) -> (B, Hr, K)
        return keys, query

    W = min(cfg.window_size, n)  # as model.block does for a short window

    def top_w(s):  # (B, Hr, K, n) -> (B, Hr, K, n) bool: is each position among its cluster's W best
        windows = kmeans.top_w_reference(s, W)  # (B, Hr, K, W) positions
        return (windows[..., :, None] == xp.arange(n)).any(axis=-2)  # (B, Hr, K, W, n) -> (B, Hr, K, n)

    keys = top_w(scores)
    query = keys[..., t] if cfg.shared_qk else top_w(query_scores)[..., t]  # (B, Hr, K)
    return keys, query


def _routing_step(q_logit, scale, route_cache, t, mem_kv, cfg):
    """Routing heads at position t: attention inside each cluster the query is in, then the scatter-mean.

    q_logit (B, Hr, 1, D) -> (B, Hr, 1, D).  A cluster's keys are the cached keys in it
    (:func:`_members`), with its memory key first under ``mem_kv``.  As in
    :func:`rt_numpy.attention.cluster_attention_reference`, the output is the sum
    over the query's clusters divided by (their number + combine_eps).
    """
    n, xp = t + 1, backend.get_array_module(q_logit)
    keys, values = route_cache["k"][:, :, :n], route_cache["v"][:, :, :n]  # (B, Hr, n, D)
    in_cluster, query_in = _members(route_cache, t, cfg)  # (B, Hr, K, n), (B, Hr, K)
    self_mask = (xp.arange(n) == t)[None] if cfg.self_attend == "last_resort" else None  # (1, n)
    logits = attention.masked_logits(q_logit, keys, scale=scale, self_mask=self_mask)  # (B, Hr, 1, n)
    logits = xp.broadcast_to(logits, in_cluster.shape)  # (B, Hr, K, n): one row per cluster
    visible = in_cluster
    if mem_kv is not None:  # each cluster's memory key goes first, always visible
        memory = ops.scale(ops.matmul(q_logit, ops.transpose(mem_kv[0], (0, 2, 1))), scale)  # (B, Hr, 1, K)
        logits = xp.concatenate([memory[:, :, 0, :, None], logits], axis=-1)  # (B, Hr, K, 1 + n)
        visible = xp.concatenate([xp.ones(memory[:, :, 0, :, None].shape, bool), visible], axis=-1)
    probs = ops.softmax(logits, mask=visible)  # (B, Hr, K, [1 +] n)
    if mem_kv is not None:
        out = probs[..., :1] * mem_kv[1][None] + ops.matmul(probs[..., 1:], values)  # (B, Hr, K, D)
    else:
        out = ops.matmul(probs, values)  # (B, Hr, K, n) @ (B, Hr, n, D) -> (B, Hr, K, D)
    weight = query_in / (query_in.sum(axis=-1, keepdims=True) + cfg.combine_eps)  # (B, Hr, K)
    return (weight[..., None].astype(out.dtype) * out).sum(axis=2)[:, :, None]  # (B, Hr, K, D) -> (B, Hr, 1, D)


def _block_step(x, params, i, cfg, means, layer_cache, t, rotary):
    """Block i of :func:`rt_numpy.model.block` at the single position t: x (B, 1, C) -> (B, 1, C)."""
    p = f"h{i}."
    Hr = cfg.num_heads - cfg.n_local_heads(i)
    h = ops.layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])
    q, k, v = _rotate(*_project(h, params, p, cfg, Hr), rotary, cfg, Hr)  # (B, H, 1, D) each
    parts = []
    if Hr:
        q_logit, scale = _store_routing(layer_cache["route"], t, q[:, :Hr], k[:, :Hr], v[:, :Hr], means, cfg)
        mem_kv = (params[p + "attn.mem_k"], params[p + "attn.mem_v"]) if cfg.mem_kv else None
        parts.append(_routing_step(q_logit, scale, layer_cache["route"], t, mem_kv, cfg))
    if Hr < cfg.num_heads:
        layer_cache["local"]["k"][:, :, t:t + 1] = k[:, Hr:]
        layer_cache["local"]["v"][:, :, t:t + 1] = v[:, Hr:]
        parts.append(_local_step(q[:, Hr:], layer_cache["local"], t, cfg))
    out = parts[0] if len(parts) == 1 else ops.concatenate(parts, axis=1)  # (B, H, 1, D)
    x = ops.add(x, ops.matmul(ops.merge_heads(out), params[p + "attn.w_o"]))  # (B, 1, C) @ (C, C)
    h = ops.layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
    h = ops.gelu(ops.add(ops.matmul(h, params[p + "mlp.w_in"]), params[p + "mlp.b_in"]))  # (B, 1, C) -> (B, 1, F)
    h = ops.add(ops.matmul(h, params[p + "mlp.w_out"]), params[p + "mlp.b_out"])  # (B, 1, F) -> (B, 1, C)
    return ops.add(x, h)


def _rotary_rows(cfg, start, stop, xp):
    """Rows start..stop-1 of the rotary tables (cos, sin), or None with learned positions."""
    if cfg.pos_encoding != "rotary":
        return None
    cos, sin = model.rotary_tables(stop, cfg.head_dim, xp, np.dtype(cfg.dtype))  # (stop, D) each
    return cos[start:stop], sin[start:stop]


def _head(x, params, cfg):
    """Final layer norm and output projection: (B, Tn, C) -> logits (B, Tn, V)."""
    x = ops.layer_norm(x, params["ln_f.g"], params["ln_f.b"])
    head = ops.transpose(params["wte"], (1, 0)) if cfg.tie_embeddings else params["lm_head"]  # (C, V)
    return ops.matmul(x, head)  # (B, Tn, C) @ (C, V) -> (B, Tn, V)


def step(params, cfg, kmeans_states, cache, tokens, *, impl="auto"):
    """Append one token to every sequence of the cache; the logits of the token after it.

    Parameters
    ----------
    params, cfg, kmeans_states
        As in :func:`rt_numpy.model.forward`.
    cache : dict
        From :func:`prefill` (or an earlier :func:`step`), with fewer than
        ``seq_len`` positions.  Filled in place at the next position.
    tokens : int array (B,)
        The new token of each sequence.
    impl : {"auto", "ref", "numba", "cupy"}
        For the primitives, as in ``forward``.

    Returns
    -------
    logits : array (B, V)
    cache : dict
        The same dict, one position longer.

    Notes
    -----
    docs/algorithm.md#9-generation-and-the-keyvalue-cache.  With balanced
    routing this is the approximate prefix rule (module docstring).
    """
    t = cache["length"]
    if t >= cfg.seq_len:
        raise ValueError(f"cache is full: it holds seq_len={cfg.seq_len} positions; start a new window "
                         f"with prefill")
    xp = backend.get_array_module(params["wte"])
    with backend.use_impl(impl, xp):
        x = params["wte"][xp.asarray(tokens)][:, None]  # (B,) -> (B, 1, C)
        if cfg.pos_encoding == "learned":
            x = ops.add(x, params["wpe"][t:t + 1])  # (B, 1, C) + (1, C)
        rotary = _rotary_rows(cfg, t, t + 1, xp)
        for i in range(cfg.n_layers):
            means = kmeans_states[f"h{i}"]["means"] if cfg.is_routing_layer(i) else None
            x = _block_step(x, params, i, cfg, means, cache["layers"][f"h{i}"], t, rotary)
        logits = _head(x, params, cfg)[:, 0]  # (B, V)
    cache["length"] = t + 1
    return logits, cache


def prefill(params, cfg, kmeans_states, ids, *, rule="exact", impl="auto"):
    """A new cache holding the window ``ids`` (B, n), n <= seq_len; the logits after its last token.

    ``rule="exact"`` (a strictly causal model) runs :func:`rt_numpy.model.forward`
    once on the window and keeps every layer's keys and values from its trace.
    ``rule="prefix"`` (balanced routing, approximate) feeds the window one token at
    a time through :func:`step`, so that every position is computed as a decoder
    computes it.  Positions start at 0 at the window's first token.

    Returns ``(logits (B, V), cache)``.
    """
    check_rule(cfg, rule)
    B, n = ids.shape
    if not 1 <= n <= cfg.seq_len:
        raise ValueError(f"ids must have 1 <= n <= seq_len={cfg.seq_len} tokens, got n={n}")
    xp = backend.get_array_module(params["wte"])
    cache = _empty_cache(cfg, B, xp, np.dtype(cfg.dtype))
    if rule == "prefix":
        for t in range(n):
            logits, cache = step(params, cfg, kmeans_states, cache, ids[:, t], impl=impl)
        return logits, cache
    trace = {}
    logits, _ = model.forward(params, ids, cfg, kmeans_states, impl=impl, trace=trace)  # (B, n, V)
    with backend.use_impl(impl, xp):
        for i in range(cfg.n_layers):
            layer, Hr = cache["layers"][f"h{i}"], cfg.num_heads - cfg.n_local_heads(i)
            q, k, v = (trace[f"h{i}"][name] for name in ("q", "k", "v"))  # (B, H, n, D), after rotary
            layer["local"]["k"][:, :, :n], layer["local"]["v"][:, :, :n] = k[:, Hr:], v[:, Hr:]
            if Hr:
                _store_routing(layer["route"], 0, q[:, :Hr], k[:, :Hr], v[:, :Hr],
                               kmeans_states[f"h{i}"]["means"], cfg)
    cache["length"] = n
    return logits[:, -1], cache


def decode_logits(params, cfg, kmeans_states, ids, *, rule="exact", impl="auto"):
    """The logits (B, n, V) at every position of the window ``ids`` (B, n), each computed by :func:`step`.

    Position t's logits come from tokens 0..t only, as when decoding.  With
    ``rule="exact"`` they equal ``forward(ids)`` to rounding; with
    ``rule="prefix"`` on a balanced model they are the prefix rule's, whose
    held-out bits/byte ``bench/decode_gap.py`` compares with the full recompute.
    """
    check_rule(cfg, rule)
    B, n = ids.shape
    xp = backend.get_array_module(params["wte"])
    cache = _empty_cache(cfg, B, xp, np.dtype(cfg.dtype))
    rows = []
    for t in range(n):
        logits, cache = step(params, cfg, kmeans_states, cache, ids[:, t], impl=impl)
        rows.append(logits)
    return xp.stack(rows, axis=1)  # n x (B, V) -> (B, n, V)
