"""The paper's baselines: strided and LSH attention, and who-sees-whom for every attention.

The paper compares content-based routing with two other ways of cutting the
O(T^2) cost of attention (paper section 5; docs/algorithm.md#7-the-baselines):

* :func:`strided_attention` - content-free: query i sees the earlier keys at
  distance 0, S, 2S, ... (the strided head of the Sparse Transformer, which
  pairs it with a local head).  O(T^2 D / S).
* :func:`lsh_attention` - content-based, but by random hashing instead of
  learned centroids (Reformer): tokens are hashed by a fixed random rotation,
  sorted by bucket, cut into chunks of W, and each chunk attends to itself and
  to the chunk before it.  O(T W D) per hash round.

Both go through :func:`rt_numpy.attention.masked_attention`, the core that
dense, local and routing attention share, and take q, k, v (B, H, T, D) to an
output (B, H, T, D) as the others do.

:func:`visibility` gives the dense form of every attention of the library: the
(B, H, T, T) matrix of how often query i sees key j.  Each attention equals
softmax attention with that mask (tests/test_baselines.py), and the matrix is
what counts the keys each query attends to (:func:`keys_per_query`) and how
much of dense attention's softmax mass a sparse head keeps
(:func:`attention_mass_recall`).
"""
from __future__ import annotations

import numpy as np
from autograd.tracer import getval

from rt_numpy import _checks, attention, backend, kmeans, ops

KINDS = ("dense", "local", "routing", "strided", "lsh")


# --------------------------------------------------------------------------- strided
def strided_attention(q, k, v, *, stride, scale=None, self_attend="allow", key_mask=None):
    """Causal attention to every ``stride``-th earlier key: query i sees j <= i with (i - j) % S == 0.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        Any T.
    stride : int
        S >= 1.  Positions with the same residue mod S form a class of
        ceil(T / S) tokens; each class attends causally within itself.
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
    docs/algorithm.md#71-strided-attention.  Query i sees ``i // S + 1`` keys;
    over T = N S positions that is ``(N + 1) / 2`` on average, routing's
    ``(W + 1) / 2`` when S = T / W.  Strictly causal.
    """
    B, H, T, D = _checks.qkv(q, k, v)
    S = _checks.integer("stride", stride, 1)
    _checks.choice("self_attend", self_attend, attention.SELF_ATTEND)
    xp = backend.get_array_module(getval(q))
    real = attention._real_keys(key_mask, B, T, xp)  # (B, T) or None
    N = -(-T // S)  # members of a class (the last row of classes may be short)
    pad = N * S - T

    def classes(x):
        x = ops.pad_axis(x, 0, pad, axis=2) if pad else x  # (B, H, N*S, D)
        x = ops.reshape(x, (B, H, N, S, D))  # row n, column c is position n*S + c
        return ops.transpose(x, (0, 1, 3, 2, 4))  # (B, H, S, N, D): class c holds c, c + S, c + 2S, ...

    pos = xp.arange(S)[:, None] + xp.arange(N)[None, :] * S  # (S, N) positions of each class
    query_pos, key_pos = pos[:, :, None], pos[:, None, :]  # (S, N, 1), (S, 1, N)
    visible = (key_pos <= query_pos) & (key_pos < T)  # (S, N, N): causal, the classes' filler hidden
    if real is not None:
        real = xp.concatenate([real, xp.zeros((B, pad), bool)], axis=1)[:, pos]  # (B, S, N): real keys by class
        visible = visible & real[:, None, :, None, :]  # (B, 1, S, N, N): padding is never seen
    out = attention.masked_attention(classes(q), classes(k), classes(v), visible,
                                     scale=attention._default_scale(scale, D),
                                     self_mask=attention._self_mask(query_pos, key_pos, self_attend))
    out = ops.reshape(ops.transpose(out, (0, 1, 3, 2, 4)), (B, H, N * S, D))  # back to positions
    return ops.slice_axis(out, 0, T, axis=2) if pad else out  # (B, H, T, D)


# --------------------------------------------------------------------------- LSH
def lsh_rotations(num_heads, head_dim, num_buckets, *, n_hashes=1, seed=0, dtype=np.float32):
    """The fixed random rotations of LSH attention: (H, n_hashes, D, num_buckets / 2), N(0, 1) draws.

    Seeded and never trained (Reformer draws them anew at each step; the
    official code's hashing baseline keeps them fixed, as here).
    """
    H = _checks.integer("num_heads", num_heads, 1)
    D = _checks.integer("head_dim", head_dim, 1)
    n_buckets = _checks.integer("num_buckets", num_buckets, 2)
    if n_buckets % 2:
        raise ValueError(f"num_buckets must be even (buckets are argmax over [xR, -xR]), got {n_buckets}")
    R = _checks.integer("n_hashes", n_hashes, 1)
    rng = np.random.default_rng(_checks.integer("seed", seed, 0))
    return rng.standard_normal((H, R, D, n_buckets // 2)).astype(dtype)


def lsh_buckets(x, rotations):
    """Bucket of every token in every hash round: ``argmax([x R, -x R])``.

    x (B, H, T, D), rotations (H, n_hashes, D, n/2) -> int array (B, H, n_hashes, T) in [0, n).
    """
    xp = backend.get_array_module(x)
    proj = xp.einsum("bhtd,hrdn->bhrtn", x, xp.asarray(rotations, dtype=x.dtype))  # (B, H, R, T, n/2)
    return xp.argmax(xp.concatenate([proj, -proj], axis=-1), axis=-1)  # (B, H, R, T)


def lsh_chunks(buckets, chunk_size):
    """Positions sorted by (bucket, position) and cut into chunks of ``chunk_size``.

    buckets (B, H, R, T) -> int array (B, H, R, N, W), N = ceil(T / W).  When W
    does not divide T the last chunk is filled with the position T, which
    stands for "no token".
    """
    xp = backend.get_array_module(buckets)
    *lead, T = buckets.shape
    W = chunk_size
    N = -(-T // W)
    order = xp.argsort(buckets * T + xp.arange(T), axis=-1)  # (B, H, R, T): by bucket, then by position
    filler = xp.full(tuple(lead) + (N * W - T,), T, dtype=order.dtype)
    return xp.concatenate([order, filler], axis=-1).reshape(tuple(lead) + (N, W))  # (B, H, R, N, W)


def lsh_attention(q, k, v, rotations, *, window_size, norm="ln", logits="normalized", self_attend="last_resort",
                  key_mask=None):
    """LSH attention (Reformer, and the official code's hashing baseline), shared QK.

    Parameters
    ----------
    q, k, v : array (B, H, T, D)
        The keys are the queries: ``k`` is ignored (pass ``q`` or None).
    rotations : array (H, n_hashes, D, n_buckets / 2)
        From :func:`lsh_rotations`; a constant.
    window_size : int
        W, the chunk length, 1 <= W <= T.  Each chunk's queries see the keys
        of their chunk and of the chunk before, up to 2W keys.
    norm : {"ln", "l2"}
        How q is normalised before hashing (as routing normalises before routing).
    logits : {"normalized", "scaled"}
        As in :func:`rt_numpy.attention.routing_attention`.
    self_attend : {"last_resort", "allow"}
        ``"last_resort"`` (Reformer's shared-QK rule, the default): a token sees
        itself only when it sees nothing else.
    key_mask : bool array (B, T), optional
        True at real tokens.  Padding is hashed to a bucket after all others,
        so it is sorted last and leaves the chunks of the real tokens as they
        are without it; no query sees it, but a padded query sees itself, so
        that every row sees a key (docs/algorithm.md#8-padding).

    Returns
    -------
    array (B, H, T, D)

    Notes
    -----
    docs/algorithm.md#72-lsh-attention.  Causal by original position: a later
    key is never visible.  But not strictly causal: a later token's bucket
    moves the chunk boundaries of the sorted order, so it changes *which*
    earlier keys a query sees (the leak of balanced routing,
    docs/algorithm.md#3-the-causal-leak).  With more than one hash
    round, each round's output is weighted by the softmax of the rounds'
    log-sum-exps; the result is dense attention in which key j counts as many
    times as the rounds in which query i sees it (:func:`visibility`).
    """
    B, H, T, D = _checks.qkv(q, q, v)
    W = _checks.integer("window_size", window_size, 1, T, what=f" (T={T})")
    _checks.choice("norm", norm, kmeans.NORMS)
    _checks.choice("logits", logits, attention.LOGITS)
    _checks.choice("self_attend", self_attend, attention.SELF_ATTEND)
    rot = _checks.float_array("rotations", rotations, 4)
    if rot.shape[0] != H or rot.shape[2] != D:
        raise ValueError(f"rotations must have shape ({H}, n_hashes, {D}, n_buckets/2), got {tuple(rot.shape)}")
    xp = backend.get_array_module(getval(q))
    real = attention._real_keys(key_mask, B, T, xp)  # (B, T) or None

    # 1. Normalise and hash: a bucket per token and round, then chunks of W in bucket order.
    qn = kmeans.normalize(q, norm)  # (B, H, T, D)
    buckets = lsh_buckets(getval(qn), rot)  # (B, H, R, T)
    if real is not None:
        buckets = xp.where(real[:, None, None, :], buckets, 2 * rot.shape[-1])  # padding: a bucket after all
    chunks = lsh_chunks(buckets, W)  # (B, H, R, N, W), integers: constants
    R, N = chunks.shape[2], chunks.shape[3]

    # 2. The logit vectors, with one zero row at position T for the filler of the last chunk.
    q_logit, k_logit, scale = attention.logit_vectors(q, q, qn, qn, logits, True)
    shared = k_logit is q_logit  # normalized logits: the keys are the very same vectors
    q_logit, v = ops.pad_axis(q_logit, 0, 1, axis=2), ops.pad_axis(v, 0, 1, axis=2)  # (B, H, T+1, D)
    k_logit = q_logit if shared else ops.pad_axis(k_logit, 0, 1, axis=2)

    # 3. Each chunk attends to itself and the chunk before it, causally by original position.
    def with_previous(x):  # (B, H, N, W, ...) -> (B, H, N, 2W, ...): chunk n - 1 (none before 0), then chunk n
        earlier = ops.slice_axis(ops.pad_axis(x, 1, 0, axis=2), 0, N, axis=2)
        return ops.concatenate([earlier, x], axis=3)

    outs, lses = [], []
    for r in range(R):
        query_windows = chunks[:, :, r]  # (B, H, N, W)
        earlier = xp.concatenate([xp.full((B, H, 1, W), T, chunks.dtype), query_windows[:, :, :-1]], axis=2)
        key_windows = xp.concatenate([earlier, query_windows], axis=3)  # (B, H, N, 2W): positions, T for none
        query_pos, key_pos = query_windows[..., :, None], key_windows[..., None, :]  # (.., W, 1), (.., 1, 2W)
        visible = (key_pos <= query_pos) & (key_pos < T)  # (B, H, N, W, 2W)
        if real is not None:
            seen = xp.concatenate([real, xp.zeros((B, 1), bool)], axis=1)  # (B, T+1): the filler T is no token
            seen = seen[xp.arange(B)[:, None, None, None], key_windows]  # (B, H, N, 2W)
            visible = (key_pos <= query_pos) & (seen[..., None, :] | (key_pos == query_pos))  # (B, H, N, W, 2W)
            # Padding and the filler see themselves, so that no row is empty for the rounds' log-sum-exps.
        self_mask = attention._self_mask(query_pos, key_pos, self_attend)
        qw = attention.gather_windows(q_logit, query_windows)  # (B, H, N, W, D)
        kw = qw if k_logit is q_logit else attention.gather_windows(k_logit, query_windows)  # each row gathered once
        vw = attention.gather_windows(v, query_windows)
        out = attention.masked_attention(qw, with_previous(kw), with_previous(vw), visible, scale=scale,
                                         self_mask=self_mask)
        unsort = xp.argsort(query_windows.reshape(B, H, N * W), axis=-1)[..., :T]  # (B, H, T): undo the sort
        outs.append(ops.gather_rows(ops.reshape(out, (B, H, N * W, D)), unsort))  # (B, H, T, D)
        if R > 1:
            lse = _masked_logsumexp(qw, with_previous(kw), visible, scale, self_mask)  # (B, H, N, W)
            lses.append(ops.gather_rows(ops.reshape(lse, (B, H, N * W, 1)), unsort))  # (B, H, T, 1)
    if R == 1:
        return outs[0]

    # 4. Rounds combine by their share of the total softmax mass.
    weights = ops.softmax(ops.concatenate(lses, axis=-1))  # (B, H, T, R)
    total = 0.0
    for r in range(R):
        total = ops.add(total, ops.multiply(outs[r], ops.slice_axis(weights, r, r + 1)))  # (B, H, T, D)
    return total


def _masked_logsumexp(qw, kw, visible, scale, self_mask):
    """``log sum_j exp(logit_ij)`` over the visible keys of each query (a row sees at least itself)."""
    logits = attention.masked_logits(qw, kw, scale=scale, self_mask=self_mask)  # (..., W, 2W)
    xp = backend.get_array_module(getval(logits))
    top = xp.max(xp.where(visible, getval(logits), -xp.inf), axis=-1, keepdims=True)  # a constant shift
    shifted = ops.masked_fill(ops.subtract(logits, top), ~visible, -np.inf)
    return ops.add(ops.log(ops.sum(ops.exp(shifted), axis=-1)), top[..., 0])  # (..., W)


# --------------------------------------------------------------------------- who sees whom
def visibility(kind, T, *, block_size=None, look_back=1, stride=None, windows=None, assignments=None,
               chunks=None):
    """How often each query sees each key, for every attention of the library.

    Parameters
    ----------
    kind : {"dense", "local", "routing", "strided", "lsh"}
    T : int
    block_size, look_back : int
        ``kind="local"``.
    stride : int
        ``kind="strided"``.
    windows : int array (B, H, K, W) or pair of them
        ``kind="routing"``, balanced membership: the query windows and the key
        windows (one array for shared QK).
    assignments : int array (B, H, T) or pair of them
        ``kind="routing"``, nearest membership: the query and key clusters.
    chunks : int array (B, H, R, N, W)
        ``kind="lsh"``: from :func:`lsh_chunks`.

    Returns
    -------
    int array (T, T) or (B, H, T, T)
        ``counts[..., i, j]``: in how many clusters, hash rounds or patterns
        query i sees key j (0 or 1, except for routing and LSH, where a pair
        can meet more than once).  Dense, local, strided and nearest routing
        equal softmax attention over the pairs with count > 0, LSH the softmax
        in which each pair counts ``count`` times; balanced routing averages
        one softmax per cluster (docs/algorithm.md#15-combine).

    Notes
    -----
    Written from the definitions in docs/algorithm.md, independently of the
    attentions themselves, so that tests can hold each against it.
    """
    _checks.choice("kind", kind, KINDS)
    T = _checks.integer("T", T, 1)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    causal = j <= i
    if kind == "dense":
        return causal.astype(np.int64)
    if kind == "local":
        L = _checks.integer("block_size", block_size, 1)
        return (causal & (i // L - j // L <= look_back)).astype(np.int64)
    if kind == "strided":
        S = _checks.integer("stride", stride, 1)
        return (causal & ((i - j) % S == 0)).astype(np.int64)
    if kind == "lsh":
        ranks = np.argsort(np.asarray(chunks).reshape(chunks.shape[:3] + (-1,)), axis=-1)[..., :T]  # (B,H,R,T)
        chunk_of = ranks // chunks.shape[-1]  # (B, H, R, T): the chunk that holds each position
        gap = chunk_of[..., :, None] - chunk_of[..., None, :]  # (B, H, R, T, T)
        return ((gap == 0) | (gap == 1)).sum(axis=2) * causal  # (B, H, T, T)
    if assignments is not None:
        aq, ak = (assignments, assignments) if not isinstance(assignments, (tuple, list)) else assignments
        return ((np.asarray(aq)[..., :, None] == np.asarray(ak)[..., None, :]) & causal).astype(np.int64)
    wq, wk = (windows, windows) if not isinstance(windows, (tuple, list)) else windows
    member_q = _members(np.asarray(wq), T)  # (B, H, K, T)
    member_k = _members(np.asarray(wk), T)
    return np.einsum("bhki,bhkj->bhij", member_q, member_k) * causal  # (B, H, T, T)


def _members(windows, T):
    """(B, H, K, W) windows -> (B, H, K, T) 0/1: is position t in cluster k's window."""
    B, H, K, _ = windows.shape
    member = np.zeros((B, H, K, T), np.int64)
    np.put_along_axis(member, windows, 1, axis=-1)
    return member


def keys_per_query(counts):
    """Mean number of distinct keys a query sees: ``(counts > 0)`` summed over keys, averaged."""
    return float((np.asarray(counts) > 0).sum(axis=-1).mean())


def attention_mass_recall(q, k, counts, *, scale):
    """The share of each query's dense causal softmax mass that the visible keys cover.

    Parameters
    ----------
    q, k : ndarray (B, H, T, D)
        Queries and keys of a head (for example a trained dense model's).
    counts : ndarray (T, T) or (B, H, T, T)
        A sparse attention's visibility (:func:`visibility`).
    scale : float
        Logit factor of the dense attention.

    Returns
    -------
    ndarray (B, H, T)
        ``sum_{j visible} p_ij`` with ``p`` the dense causal softmax; 1 for
        dense attention itself.
    """
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    T = q.shape[2]
    causal = np.tril(np.ones((T, T), bool))
    logits = np.where(causal, scale * q @ np.swapaxes(k, -1, -2), -np.inf)  # (B, H, T, T)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return (p * (np.asarray(counts) > 0)).sum(axis=-1)
