"""What a model really computes: the full attention matrix of any head, and the routes of each layer.

* :func:`attention_matrix` - the (B, T, T) matrix ``A`` of one head of one
  layer, such that the head's output is exactly ``A @ v``.  For a balanced
  routing head, ``A[i]`` is the average of the softmaxes of the clusters that
  hold i, divided as the scatter-mean divides (docs/algorithm.md#15-combine),
  so its rows need not sum to 1.
* :func:`routes` - the windows and assignments of every routing layer.

Both run one traced forward pass (``model.forward(..., trace=...)``) and
rebuild the head from its queries, keys and values with plain NumPy, following
the definitions of docs/algorithm.md rather than the code they check.
"""
from __future__ import annotations

import numpy as np

from rt_numpy import _checks, attention, baselines, kmeans, model


def _trace(params, ids, cfg, kmeans_states):
    trace = {}
    model.forward(params, ids, cfg, kmeans_states, trace=trace)
    return trace


def head_kind(cfg, layer, head):
    """What head ``head`` of layer ``layer`` computes: "local", or ``cfg.attention`` for the first
    ``n_route_heads`` heads of the last ``n_route_layers`` layers ("routing", "strided", "lsh", "dense")."""
    _checks.integer("layer", layer, 0, cfg.n_layers - 1)
    _checks.integer("head", head, 0, cfg.num_heads - 1)
    return cfg.attention if cfg.is_sparse_layer(layer) and head < cfg.n_route_heads else "local"


def routes(params, ids, cfg, kmeans_states):
    """The routing decisions of every routing layer for ``ids`` (B, T).

    Returns
    -------
    dict
        ``{"h{i}": {"assignments": int (B, n_route_heads, T), "windows": int (B, n_route_heads, K, W) or
        None}}``: each token's nearest centroid (what the k-means update uses) and, with balanced
        membership, each cluster's members, ascending (docs/algorithm.md#13-membership).  Shared QK:
        the keys are routed as the queries.
    """
    trace = _trace(params, ids, cfg, kmeans_states)
    out = {}
    for i in range(cfg.n_layers):
        if not cfg.is_routing_layer(i):
            continue
        means = kmeans_states[f"h{i}"]["means"]
        qn = kmeans.normalize(trace[f"h{i}"]["q"][:, :cfg.n_route_heads], cfg.norm)  # (B, Hr, T, D)
        W = min(cfg.window_size, qn.shape[2])
        out[f"h{i}"] = {"assignments": kmeans.nearest(qn, means),
                        "windows": kmeans.balanced_membership(qn, means, W) if cfg.membership == "balanced" else None}
    return out


def attention_matrix(params, ids, cfg, kmeans_states, *, layer, head):
    """The attention matrix of one head: ``A`` (B, T, T) with the head's output ``A @ v``.

    Parameters
    ----------
    params, ids, cfg, kmeans_states
        As in :func:`rt_numpy.model.forward` (shared QK).
    layer, head : int
        Which head.

    Returns
    -------
    ndarray (B, T, T), float64
        Zero above the diagonal.  Rows sum to 1 for dense, local, strided
        and LSH heads, to ``1 / (1 + combine_eps)`` for nearest routing, and to
        ``n_i / (n_i + combine_eps)`` for a token in ``n_i`` balanced windows
        (0 for a token in none).
    """
    kind = head_kind(cfg, layer, head)
    if not cfg.shared_qk:
        raise ValueError("attention_matrix supports shared_qk=True models, got shared_qk=False")
    lay = _trace(params, ids, cfg, kmeans_states)[f"h{layer}"]
    q = np.asarray(lay["q"][:, head], np.float64)  # (B, T, D)
    B, T, D = q.shape
    pos = np.arange(T)
    if kind == "local":
        counts = baselines.visibility("local", T, block_size=cfg.block_size, look_back=cfg.look_back)
        return _softmax_rows(q @ q.swapaxes(1, 2) / np.sqrt(D), counts, cfg.self_attend)
    if kind == "dense":
        return _softmax_rows(q @ q.swapaxes(1, 2) / np.sqrt(D), baselines.visibility("dense", T), cfg.self_attend)
    if kind == "strided":
        counts = baselines.visibility("strided", T, stride=cfg.stride)
        return _softmax_rows(q @ q.swapaxes(1, 2) / np.sqrt(D), counts, cfg.self_attend)
    qn = kmeans.normalize(lay["q"][:, head:head + 1], cfg.norm).astype(np.float64)  # (B, 1, T, D)
    if cfg.logits == "normalized":
        logits = (qn @ qn.swapaxes(-1, -2))[:, 0]  # (B, T, T)
    else:
        unit = q / np.linalg.norm(q, axis=-1, keepdims=True)
        logits = q @ unit.swapaxes(1, 2) / np.sqrt(D)
    if kind == "lsh":
        rot = model.lsh_rotations(cfg, layer)[head:head + 1]
        chunks = baselines.lsh_chunks(baselines.lsh_buckets(qn, rot.astype(np.float64)), min(cfg.window_size, T))
        return _softmax_rows(logits, baselines.visibility("lsh", T, chunks=chunks)[:, 0], cfg.self_attend)
    means = np.asarray(kmeans_states[f"h{layer}"]["means"][head:head + 1], np.float64)
    if cfg.membership == "nearest":
        counts = baselines.visibility("routing", T, assignments=kmeans.nearest(qn, means))[:, 0]
        return _softmax_rows(logits, counts, cfg.self_attend) / (1 + cfg.combine_eps)
    windows = kmeans.balanced_membership(qn, means, min(cfg.window_size, T))[:, 0]  # (B, K, W)
    A = np.zeros((B, T, T))
    for b in range(B):
        for members in windows[b]:  # each cluster: a softmax over its earlier members
            inside = np.zeros((T, T))
            inside[np.ix_(members, members)] = 1
            A[b] += _softmax_rows(logits[b:b + 1], inside * (pos[None, :] <= pos[:, None]), cfg.self_attend)[0]
    n = np.stack([np.bincount(w.reshape(-1), minlength=T) for w in windows])  # (B, T) windows holding each token
    return A / (n + cfg.combine_eps)[..., None]


def _softmax_rows(logits, counts, self_attend):
    """Softmax of each row over the keys with count > 0 (weighted by the count); 0 for an empty row."""
    logits = np.array(logits, np.float64)
    T = logits.shape[-1]
    if self_attend == "last_resort":
        logits[..., np.arange(T), np.arange(T)] = attention.SELF_LOGIT
    counts = np.broadcast_to(counts, logits.shape)
    shown = np.where(counts > 0, logits, -np.inf)
    top = np.maximum(shown.max(axis=-1, keepdims=True), -1e300)  # a finite shift, also for an empty row
    weights = counts * np.exp(shown - top)  # exp(-inf) = 0 where hidden
    total = weights.sum(axis=-1, keepdims=True)
    return np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
