"""Online mini-batch spherical k-means: the routing module of the Routing Transformer.

Every routing head owns K centroids.  Queries and keys are normalised, each one is
compared with every centroid by a dot product, and the centroids follow the
data with an exponential moving average (docs/algorithm.md#1-one-routing-head; paper section 4.1).

Shapes (docs/algorithm.md#alphabet): points (B, H, T, D), centroids ``means`` (H, K, D).
Everything is batched over heads: head h of the points only meets head h's
centroids.

The k-means state is a plain dict passed in and returned, never changed in place::

    state = {"means":  (H, K, D) centroids,
             "counts": (H, K)    EMA of how many points each cluster received,
             "sums":   (H, K, D) EMA of the sum of those points}

A training step is two calls: :func:`cluster_stats` during the forward pass
(which points went where), then :func:`update_state` after it.  The update is
never differentiated: the centroids receive no gradient.

Hot loops have a Numba fast path (:mod:`rt_numpy.kernels.numba_kmeans`),
chosen with ``impl`` (see :mod:`rt_numpy.backend`); the code in this file is the
reference that the kernels are tested against.
"""
from __future__ import annotations

import numpy as np
from autograd.tracer import getval

from rt_numpy import _checks, backend, ops

NORMS = ("ln", "l2")
INITS = ("normal", "data")
CENTROID_UPDATES = ("ema", "spherical", "paper")
COMMITMENT_QK = ("sum", "mean")
LN_EPS = 1e-6  # inside the square root of the parameter-free layer norm (official code)
L2_EPS = 1e-12  # smallest norm divided by (PyTorch port)


def check_state(state):
    """Validate a k-means state dict; returns ``(H, K, D)``.

    Raises
    ------
    TypeError, ValueError
        Missing keys, wrong shapes or dtypes, non-finite values or negative counts.
    """
    return _checks.kmeans_state(state)


# --------------------------------------------------------------------- normalisation
def normalize(x, norm="ln"):
    """Normalise vectors for routing, over the last axis.

    Parameters
    ----------
    x : array, shape (..., D)
    norm : {"ln", "l2"}
        ``"ln"``: parameter-free layer norm ``(x - mean) / sqrt(var + 1e-6)``
        (population variance), each vector gets norm about sqrt(D); the
        official code.  ``"l2"``: unit vectors ``x / max(|x|, 1e-12)``; the
        PyTorch port.

    Returns
    -------
    array, shape (..., D)

    Notes
    -----
    docs/algorithm.md#11-normalise.  Built from :mod:`rt_numpy.ops` primitives, so it is
    differentiable (the commitment loss sends its gradient through it) and runs
    on CuPy arrays.
    """
    _checks.choice("norm", norm, NORMS)
    if norm == "ln":
        return ops.layer_norm_free(x, LN_EPS)
    return ops.l2_normalize(x, L2_EPS)


# ------------------------------------------------------------------ initialisation
def state_from_means(means):
    """A fresh state around given centroids: zero counts, sums equal to the means.

    The running sums start at the centroids (no bias correction), as in the
    official code and VQ-VAE (docs/algorithm.md#16-centroid-update).
    """
    _checks.means(means)
    xp = backend.get_array_module(means)
    return {"means": means.copy(), "counts": xp.zeros(means.shape[:2], means.dtype), "sums": means.copy()}


def init_state(num_heads, num_clusters, dim, *, rng, init="normal", points=None, norm="ln",
               lloyd_iters=10, dtype=None, impl="auto", picks=None):
    """Initial k-means state for ``num_heads`` heads of ``num_clusters`` centroids.

    Parameters
    ----------
    num_heads, num_clusters, dim : int
        H, K and D.
    rng : numpy.random.Generator
        The only source of randomness.
    init : {"normal", "data"}
        ``"normal"`` (official): normalised standard normal draws.  ``"data"``:
        K of the given points, the same token indices for every head, then
        ``lloyd_iters`` Lloyd iterations (assign to the nearest centroid, new
        centroid = normalised sum of its points; an empty cluster keeps its value).
    points : array (B, H, T, D), optional
        Normalised points, required for ``init="data"``; B * T must be >= K.
    norm : {"ln", "l2"}
        Normalisation of the centroids (use the same one as for the points).
    lloyd_iters : int
        Lloyd iterations after picking data points.
    dtype : float32 or float64, optional
        Default: the dtype of ``points`` with ``init="data"``, float32 otherwise.
    impl : {"auto", "ref", "numba", "cupy"}
        Implementation of the Lloyd assignments, and of the normalisation of
        the ``"normal"`` draws (there ``"auto"`` means NumPy).
    picks : int array (K,), optional
        With ``init="data"``: the starting tokens, as indices into the points
        flattened over (B, T), instead of K distinct indices drawn with ``rng``.
        Lets you replay another implementation's draw (the PyTorch port's
        ``torch.randperm``; see :mod:`rt_numpy.crosscheck`).

    Returns
    -------
    dict
        ``{"means": (H, K, D), "counts": (H, K), "sums": (H, K, D)}``.

    Notes
    -----
    docs/algorithm.md#17-initialisation.  Unlike the PyTorch port, the data-based start picks
    and averages *normalised* points, so the centroids live where the points do.
    """
    H = _checks.integer("num_heads", num_heads, 1)
    K = _checks.integer("num_clusters", num_clusters, 1)
    D = _checks.integer("dim", dim, 1)
    _checks.choice("init", init, INITS)
    _checks.choice("norm", norm, NORMS)
    _checks.generator("rng", rng)
    if dtype is None:
        dtype = getval(points).dtype if init == "data" and hasattr(getval(points), "dtype") else np.float32
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {np.dtype(dtype)}")
    if init == "normal":
        if points is not None:
            raise ValueError("points are only used with init='data'; got points with init='normal'")
        # One (H, K, D) float64 array, normalised once: by NumPy under impl="auto", where
        # the Numba kernel would compile a float64 variant (1 s on an empty cache) for it alone.
        with backend.use_impl("ref" if impl == "auto" else impl):
            means = normalize(rng.standard_normal((H, K, D)), norm).astype(dtype)  # (H, K, D)
        return state_from_means(means)

    lloyd_iters = _checks.integer("lloyd_iters", lloyd_iters, 0)
    if points is None:
        raise ValueError("init='data' needs points of shape (B, H, T, D)")
    x = _checks.float_array("points", points, 4)
    if x.shape[1] != H or x.shape[3] != D:
        raise ValueError(f"points of shape {tuple(x.shape)} do not fit num_heads={H}, dim={D}")
    if x.dtype != np.dtype(dtype):
        raise TypeError(f"points have dtype {x.dtype} but dtype={np.dtype(dtype)} was asked for")
    B, _, T, _ = x.shape
    if K > B * T:
        raise ValueError(f"num_clusters={K} is larger than the number of points B*T={B * T}")
    flat = x.transpose(1, 0, 2, 3).reshape(H, B * T, D)  # (B, H, T, D) -> (H, B*T, D)
    if picks is None:
        picks = rng.choice(B * T, size=K, replace=False)  # the same tokens for every head
    else:
        picks = np.asarray(picks)
        if picks.shape != (K,) or picks.dtype.kind not in "iu" or not bool(((picks >= 0) & (picks < B * T)).all()):
            raise ValueError(f"picks must be {K} integer indices in [0, B*T={B * T}), got {picks!r}")
    xp = backend.get_array_module(x)
    means = flat[:, xp.asarray(picks)].copy()  # (H, K, D)
    for _ in range(lloyd_iters):
        stats = cluster_stats(x, means, impl=impl)
        sums, counts = stats["sums"][0], stats["counts"][0]  # (H, K, D), (H, K)
        with backend.use_impl(impl, xp):
            means = xp.where(counts[..., None] > 0, normalize(sums, norm), means).astype(dtype)
    return state_from_means(means)


# -------------------------------------------------------------- assignment, membership
def similarities(points, means):
    """Dot products of every point with every centroid of its head.

    points (B, H, T, D), means (H, K, D) -> (B, H, T, K).  Larger is closer.
    docs/algorithm.md#12-similarities.
    """
    return points @ means.swapaxes(-1, -2)[None]  # (B, H, T, D) @ (1, H, D, K) -> (B, H, T, K)


def nearest(points, means):
    """Index of the nearest centroid of every point (argmax of the dot product).

    points (B, H, T, D), means (H, K, D) -> (B, H, T) int64.  Ties go to the
    lower cluster index.  docs/algorithm.md#16-centroid-update.
    """
    means = _checks.means(means)
    (x,) = _checks.points(points, means)
    return backend.get_array_module(x).argmax(similarities(x, means), axis=-1)  # (B, H, T, K) -> (B, H, T)


def _padding(key_mask, x, xp):
    """The checked padding mask (B, T) of points ``x`` (B, H, T, D), on ``x``'s device; None stays None."""
    B, _, T, _ = x.shape
    key_mask = _checks.key_mask(key_mask, B, T)
    return None if key_mask is None else xp.asarray(key_mask)


def cluster_stats(points, means, *, impl="auto", key_mask=None):
    """Where each point goes, and the per-cluster statistics of one forward pass.

    Parameters
    ----------
    points : array (B, H, T, D), or a list of them (one per stream: queries, keys)
        Normalised points.
    means : array (H, K, D)
        Centroids as they are at the start of the step.
    impl : {"auto", "ref", "numba", "cupy"}
    key_mask : bool array (B, T), optional
        True at real tokens.  Padding joins no cluster: its assignment is -1
        and it enters no sum and no count (docs/algorithm.md#8-padding).

    Returns
    -------
    dict
        ``assignments`` (S, B, H, T) int64, the nearest centroid of each point;
        ``sums`` (S, H, K, D), the sum of the points assigned to each cluster
        (over batch and positions); ``counts`` (S, H, K) int64, how many.
        S is the number of streams.

    Notes
    -----
    docs/algorithm.md#16-centroid-update.  The reference builds the (B, H, T, K) similarity
    matrix; the Numba path never does (it works a tile of points at a time).
    """
    means = _checks.means(means)
    streams = [getval(x) for x in _checks.points(points, means)]
    xp = backend.get_array_module(means, *streams)
    impl = backend.resolve_impl(impl, xp)
    key_mask = _padding(key_mask, streams[0], xp)
    # On a GPU ("cupy") the reference itself is the fast path: one matrix product, an argmax,
    # and the sums by the deterministic scatter-add of ops.scatter_add_rows.
    with backend.use_impl(impl, xp):  # the scatter-add of the sums follows impl too
        results = [_stats_numba(x, means) if impl == "numba" and key_mask is None
                   else _stats_reference(x, means, key_mask) for x in streams]
    return {
        "assignments": xp.stack([r[0] for r in results]),  # S x (B, H, T) -> (S, B, H, T)
        "sums": xp.stack([r[1] for r in results]),  # S x (H, K, D) -> (S, H, K, D)
        "counts": xp.stack([r[2] for r in results]),  # S x (H, K) -> (S, H, K)
    }


def _stats_reference(x, means, key_mask=None):
    assignments = nearest(x, means)  # (B, H, T)
    if key_mask is not None:
        assignments = backend.get_array_module(x).where(key_mask[:, None, :], assignments, -1)  # padding: -1
    return (assignments, *_sums_and_counts(x, assignments, means.shape[1]))


def _sums_and_counts(x, assignments, K):
    """Per-cluster sums (H, K, D) and counts (H, K) of points x (B, H, T, D) sent to ``assignments`` (B, H, T).

    An assignment of -1 (padding) counts in no cluster: it goes to an extra cluster K, dropped at the end.
    """
    xp = backend.get_array_module(x)
    B, H, T, D = x.shape
    padded = bool((assignments < 0).any())
    if padded:
        assignments, K = xp.where(assignments < 0, K, assignments), K + 1
    per_head = assignments.transpose(1, 0, 2).reshape(H, B * T)  # (H, B*T), in (b, t) order
    # sums[h, a[b, h, t]] += x[b, h, t], in (b, t) order: a scatter-add of rows, head by head.
    sums = ops.scatter_add_rows(x.transpose(1, 0, 2, 3).reshape(H, B * T, D), per_head, K)  # (H, K, D)
    heads = xp.arange(H)[:, None] * K  # (H, 1): each head's clusters get their own counters
    counts = xp.bincount((per_head + heads).reshape(-1), minlength=H * K).reshape(H, K).astype(xp.int64)
    return (sums[:, :-1], counts[:, :-1]) if padded else (sums, counts)


def _stats_numba(x, means):
    from rt_numpy.kernels import numba_kmeans

    return numba_kmeans.assign_and_stats(np.ascontiguousarray(x), np.ascontiguousarray(means))


def cluster_scores(points, means):
    """Similarities laid out one row per cluster: (B, H, T, D), (H, K, D) -> (B, H, K, T).

    The same numbers as :func:`similarities`, transposed; row ``c`` holds every
    position's score for centroid ``c``, which is what balanced membership ranks.
    """
    return means[None] @ points.swapaxes(-1, -2)  # (1, H, K, D) @ (B, H, D, T) -> (B, H, K, T)


def _scores_of_one_stream(points, means, window_size, impl, caller):
    """Checked inputs of :func:`balanced_membership` and :func:`route`, and the scores.

    Returns ``(x, means, W, impl, scores)``: the points (autograd boxes looked
    through), the checked centroids, the window size, the resolved ``impl``
    and :func:`cluster_scores` (B, H, K, T).
    """
    means = _checks.means(means)
    if isinstance(points, (list, tuple)):
        raise TypeError(f"points must be one array (B, H, T, D), got a {type(points).__name__}: "
                        f"call {caller} once per stream")
    (x,) = _checks.points(points, means)
    x = getval(x)
    W = _checks.integer("window_size", window_size, 1, x.shape[2], what=f" (T={x.shape[2]})")
    impl = backend.resolve_impl(impl, backend.get_array_module(means, x))
    return x, means, W, impl, cluster_scores(x, means)  # scores (B, H, K, T)


def balanced_membership(points, means, window_size, *, impl="auto"):
    """The ``window_size`` points most similar to each centroid, sorted by position.

    Parameters
    ----------
    points : array (B, H, T, D)
        Normalised queries (or keys).
    means : array (H, K, D)
    window_size : int
        W, members per cluster, 1 <= W <= T.
    impl : {"auto", "ref", "numba", "cupy"}

    Returns
    -------
    array (B, H, K, W) int64
        Positions, increasing along the last axis.  Every cluster has exactly W
        members; a position may be in several clusters or in none.  Ties in
        similarity go to the lower position.

    Notes
    -----
    docs/algorithm.md#13-membership (``membership="balanced"``).  Taken over the whole
    sequence, so it is not causal: see docs/algorithm.md#3-the-causal-leak.
    """
    _, _, W, impl, scores = _scores_of_one_stream(points, means, window_size, impl, "balanced_membership")
    return _top_w(scores, W, impl)


def _top_w(scores, W, impl):
    """Balanced top-W of the scores (B, H, K, T) -> (B, H, K, W) on the path ``impl`` asks for."""
    if impl == "ref":
        return top_w_reference(scores, W)
    if impl == "numba":
        from rt_numpy.kernels import numba_kmeans

        return numba_kmeans.top_w_positions(scores, W)
    from rt_numpy.kernels import cupy_kmeans

    return cupy_kmeans.top_w_positions(scores, W)


def route(points, means, window_size, *, impl="auto", key_mask=None):
    """Both routing decisions of one stream from one score matrix: nearest centroid and top-W.

    :func:`cluster_stats` and :func:`balanced_membership` each compare every
    point with every centroid; routing attention needs both, so here the
    (B, H, K, T) scores of :func:`cluster_scores` are computed once and both
    decisions are read from them: a point's nearest centroid is the cluster
    whose row holds its largest score (the first such, on a tie), and each
    cluster's members are the W largest entries of its row.

    Parameters
    ----------
    points : array (B, H, T, D)
        Normalised points of one stream.
    means : array (H, K, D)
    window_size : int
        W, members per cluster, 1 <= W <= T.
    impl : {"auto", "ref", "numba", "cupy"}
    key_mask : bool array (B, T), optional
        True at real tokens.  Padding ranks below every real token in every
        cluster (its score counts as -inf), so a window holds padding only
        when its row has fewer than W real tokens; padding's assignment is -1
        and it enters no statistic (docs/algorithm.md#8-padding).

    Returns
    -------
    dict
        ``assignments`` (B, H, T) int64, ``sums`` (H, K, D), ``counts`` (H, K)
        int64, as one stream of :func:`cluster_stats`; ``windows`` (B, H, K, W)
        int64, as :func:`balanced_membership`.

    Notes
    -----
    docs/algorithm.md#13-membership, docs/algorithm.md#16-centroid-update.  The scores are the numbers of
    :func:`similarities`, transposed, but come from another matrix product, so
    on an exact tie in rounding a point could go to another cluster here than
    in :func:`cluster_stats`; the Numba path and the reference of this
    function read the same scores and agree exactly.
    """
    x, means, W, impl, scores = _scores_of_one_stream(points, means, window_size, impl, "route")
    xp = backend.get_array_module(scores)
    key_mask = _padding(key_mask, x, xp)
    if key_mask is not None:
        real = key_mask[:, None, None, :]  # (B, 1, 1, T)
        scores = xp.where(real, scores, -xp.inf)  # (B, H, K, T): padding ranks last in every cluster
    if impl == "numba" and key_mask is None:  # one pass over the scores for both decisions
        from rt_numpy.kernels import numba_kmeans

        assignments, sums, counts, windows = numba_kmeans.route_from_scores(scores, np.ascontiguousarray(x), W)
        return {"assignments": assignments, "sums": sums, "counts": counts, "windows": windows}
    assignments = xp.argmax(scores, axis=-2)  # (B, H, K, T) -> (B, H, T): the first maximum wins
    if key_mask is not None:
        assignments = xp.where(real[:, :, 0], assignments, -1)  # padding joins no cluster
    with backend.use_impl(impl, xp):  # the scatter-add of the sums follows impl too
        sums, counts = _sums_and_counts(x, assignments, means.shape[1])
    return {"assignments": assignments, "sums": sums, "counts": counts, "windows": _top_w(scores, W, impl)}


def top_w_reference(scores, window_size):
    """Reference top-W: scores (B, H, K, T) -> positions (B, H, K, W), ascending.

    A stable sort of the negated scores puts equal scores in position order, so
    ties go to the lower position.
    """
    xp = backend.get_array_module(scores)
    # CuPy's sorts are always stable (and take no kind=): equal scores keep their position order.
    order = xp.argsort(-scores, axis=-1, kind="stable") if xp is np else xp.argsort(-scores, axis=-1)  # best first
    return xp.sort(order[..., :window_size], axis=-1)  # (B, H, K, W), by position


# ------------------------------------------------------------------------- updates
def update_state(state, stats, *, centroid_update="ema", ema_decay=0.999, laplace_eps=1e-5, norm="ln"):
    """Move the centroids towards the points they received; returns a new state.

    Parameters
    ----------
    state : dict
        ``means`` (H, K, D), ``counts`` (H, K), ``sums`` (H, K, D); not modified.
    stats : dict
        From :func:`cluster_stats`: ``sums`` (S, H, K, D), ``counts`` (S, H, K).
    centroid_update : {"ema", "spherical", "paper"}
        ``"ema"`` (default, official, VQ-VAE style): per stream, in order
        (queries first, then keys),
        ``n <- ema_decay n + (1 - ema_decay) N``,
        ``s <- ema_decay s + (1 - ema_decay) S``;
        then ``mean = s / n~`` with the Laplace-smoothed count
        ``n~_c = (n_c + laplace_eps) / (sum(n) + K laplace_eps) * sum(n)``.  The stored counts
        stay unsmoothed.  ``"spherical"`` (PyTorch port): streams pooled, target
        ``normalize(sum)``, ``mean <- ema_decay mean + (1 - ema_decay) target``, empty
        clusters keep their mean.  ``"paper"``: the paper's mean-free formula
        ``mean <- ema_decay mean + (1 - ema_decay) / S * sum over streams of S``.
        ``"spherical"`` and ``"paper"`` leave ``counts`` and ``sums`` as they are.
    ema_decay : float
        lambda, the EMA decay, in [0, 1).
    laplace_eps : float
        Laplace smoothing of the counts (``"ema"`` only), > 0.
    norm : {"ln", "l2"}
        Normalisation of the ``"spherical"`` target.

    Returns
    -------
    dict
        The new state (new arrays; the input state is left unchanged).

    Notes
    -----
    docs/algorithm.md#16-centroid-update; paper section 4.1 (the mean-free form).
    Under ``"ema"`` a cluster that has never received a point has a smoothed
    count near ``laplace_eps``, so its mean ``s / n~`` becomes very large: this is the
    official behaviour, and it is what pulls points into empty clusters.
    """
    _checks.choice("centroid_update", centroid_update, CENTROID_UPDATES)
    _checks.choice("norm", norm, NORMS)
    H, K, D = check_state(state)
    ema_decay = _checks.real("ema_decay", ema_decay, low=0.0, high=1.0, high_open=True)
    laplace_eps = _checks.real("laplace_eps", laplace_eps, low=0.0, low_open=True)  # finite: inf makes means NaN
    if not isinstance(stats, dict) or "sums" not in stats or "counts" not in stats:
        raise ValueError("stats must be the dict returned by cluster_stats (keys sums, counts)")
    sums, counts = stats["sums"], stats["counts"]
    if not hasattr(sums, "shape") or not hasattr(counts, "shape"):
        raise TypeError(f"stats['sums'] and stats['counts'] must be arrays, got "
                        f"{type(sums).__name__} and {type(counts).__name__}")
    if sums.ndim != 4 or sums.shape[1:] != (H, K, D) or counts.shape != sums.shape[:3]:
        raise ValueError(f"stats of shapes sums {tuple(sums.shape)}, counts {tuple(counts.shape)} "
                         f"do not fit a state with (H, K, D) = {(H, K, D)}")
    xp = backend.get_array_module(sums)
    if not bool(xp.isfinite(sums).all()):
        raise ValueError("stats['sums'] contains NaN or infinity")
    if bool((counts < 0).any()):
        raise ValueError(f"stats['counts'] must not be negative, got minimum {counts.min()}")
    means = state["means"]
    dt = means.dtype
    if centroid_update == "ema":
        n, s = state["counts"], state["sums"]
        for stream in range(sums.shape[0]):  # queries, then keys
            n = ema_decay * n + (1 - ema_decay) * counts[stream].astype(dt)  # (H, K)
            s = ema_decay * s + (1 - ema_decay) * sums[stream].astype(dt)  # (H, K, D)
        total = n.sum(axis=-1, keepdims=True)  # (H, 1)
        smoothed = (n + laplace_eps) / (total + K * laplace_eps) * total  # (H, K), only to divide by
        seen = total[..., None] > 0  # (H, 1, 1): a head that has received no point at all keeps its means
        new_means = xp.where(seen, s / xp.where(seen, smoothed[..., None], 1), means)  # (H, K, D)
        return {"means": new_means.astype(dt), "counts": n.astype(dt), "sums": s.astype(dt)}
    if centroid_update == "spherical":
        pooled = sums.sum(axis=0)  # (S, H, K, D) -> (H, K, D)
        received = counts.sum(axis=0)[..., None] > 0  # (H, K, 1)
        target = normalize(pooled, norm)
        new_means = xp.where(received, ema_decay * means + (1 - ema_decay) * target, means)
    else:  # "paper"
        new_means = ema_decay * means + (1 - ema_decay) / sums.shape[0] * sums.sum(axis=0)
    return {"means": new_means.astype(dt), "counts": state["counts"].copy(), "sums": state["sums"].copy()}


def kmeans_step(state, points, *, centroid_update="ema", ema_decay=0.999, laplace_eps=1e-5, norm="ln",
                impl="auto"):
    """One online k-means step: statistics of ``points``, then :func:`update_state`.

    ``points`` are normalised, one array (B, H, T, D) or a list of streams.
    Returns ``(new_state, stats)``.
    """
    check_state(state)
    stats = cluster_stats(points, state["means"], impl=impl)
    new_state = update_state(state, stats, centroid_update=centroid_update, ema_decay=ema_decay,
                             laplace_eps=laplace_eps, norm=norm)
    return new_state, stats


# ------------------------------------------------------------------ commitment loss
def commitment_loss(points, means, *, commitment=1e-4, commitment_qk="sum", assignments=None, key_mask=None):
    """beta times the mean squared distance of each point to its nearest centroid.

    Parameters
    ----------
    points : array (B, H, T, D), or a list of them (streams: queries, keys)
        Normalised points; may be autograd boxes (the gradient flows into them).
    means : array (H, K, D)
        Centroids; used through a stop-gradient, so they get no gradient.
    commitment : float
        beta, 1e-4 by default.
    commitment_qk : {"sum", "mean"}
        How streams add up.  ``"sum"`` (official): ``e_q + e_k``; with shared QK
        the official code passes the queries twice, i.e. ``2 e_q``.
        ``"mean"`` (PyTorch port): one mean over all streams, ``(e_q + e_k) / 2``.
    assignments : int array (S, B, H, T), optional
        Each stream's nearest centroids, when the caller has them already (routing
        attention reads them from the routing scores); computed with
        :func:`nearest` otherwise.
    key_mask : bool array (B, T), optional
        True at real tokens: the mean is over real tokens only
        (docs/algorithm.md#8-padding); 0 when there are none.

    Returns
    -------
    scalar
        ``commitment * combine_s(mean over elements of (x_s - mu_{a(x_s)})^2)``.

    Notes
    -----
    docs/algorithm.md#18-commitment-loss: the mean is over N * D numbers, not a
    mean of squared norms (which would be D times larger).  A stream that is the
    same array as the one before it (shared QK passed twice) reuses its error.
    """
    _checks.choice("commitment_qk", commitment_qk, COMMITMENT_QK)
    commitment = _checks.real("commitment", commitment, low=0.0)
    mu = _checks.means(getval(means))  # stop-gradient: no gradient reaches the centroids
    streams = _checks.points(points, mu)
    if assignments is None:
        assignments = [nearest(getval(x), mu) for x in streams]  # S x (B, H, T)
    xp = backend.get_array_module(mu)
    heads = xp.arange(mu.shape[0])[None, :, None]  # (1, H, 1)
    key_mask = _padding(key_mask, getval(streams[0]), xp)
    if key_mask is not None:
        real = key_mask[:, None, :, None].astype(mu.dtype)  # (B, 1, T, 1)
        B, H, T, D = getval(streams[0]).shape
        elements = max(1, int(key_mask.sum())) * H * D  # the real tokens' numbers
    errors = []
    for i, (x, a) in enumerate(zip(streams, assignments)):
        if i and x is streams[i - 1]:
            errors.append(errors[-1])
            continue
        target = mu[heads, a]  # (H, K, D) gathered -> (B, H, T, D), a constant
        squared = ops.square(ops.subtract(x, target))  # (B, H, T, D)
        if key_mask is None:
            errors.append(ops.mean(squared))
        else:
            errors.append(ops.scale(ops.sum(ops.multiply(squared, real)), 1.0 / elements))
    total = errors[0]
    for e in errors[1:]:
        total = ops.add(total, e)
    return ops.scale(total, commitment / (len(errors) if commitment_qk == "mean" else 1))
