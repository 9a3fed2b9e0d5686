"""Cross-checking another implementation of routing attention against rt_numpy.

Give :func:`reference` the inputs of one routing-attention call - q, k, v
(B, H, T, D), the centroids (H, K, D), the options and an upstream gradient -
and it returns, as a flat dict of NumPy arrays with the names of :data:`NAMES`,
everything a framework author wants to compare: the output, the cluster
windows, the nearest-centroid assignments, the commitment loss, the centroids
after one k-means update and the gradients.  :func:`save` and :func:`load`
keep such a dict in an ``.npz`` file (no pickles), and :func:`compare` /
:func:`assert_close` put your numbers beside ours, one line per array.

Conventions (docs/algorithm.md#1-one-routing-head): the defaults are the official code's;
:func:`port_conventions` gives the options under which rt_numpy reproduces the
PyTorch port (``routing-transformer`` 1.6.1).  docs/conventions.md lists every
difference and the test that shows it; tutorials/04_crosscheck.py is the walk
through.

A whole language model: :func:`port_lm_config` gives the rt_numpy
:class:`~rt_numpy.model.Config` of a port ``RoutingTransformerLM`` (causal,
separate QK), and :func:`params_from_port` turns its ``state_dict`` into
rt_numpy's parameters and k-means states (:func:`grads_from_port` maps its
gradients).  Neither needs torch: they take NumPy arrays.

A typical check of your own implementation::

    ref = crosscheck.reference(q, k, v, means, window_size=W, upstream=g,
                               **crosscheck.port_conventions(shared_qk=True))
    crosscheck.save("case.npz", ref)          # hand it to your framework's test
    ...
    mine = {"out": my_out, "commitment": my_loss, "grad_q": my_dq, ...}
    crosscheck.assert_close(crosscheck.load("case.npz"), mine, rtol=1e-5)
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile

import numpy as np
from autograd import grad

from rt_numpy import _checks, attention, backend, kmeans, model, ops

FORMAT = "rt_numpy.crosscheck/1"  # stored in the options, so that a reader knows what it holds

#: Every array :func:`reference` can return, with its shape and meaning.  S is the
#: number of streams: 1 with shared QK (queries), 2 without (queries, then keys).
NAMES = {
    # inputs
    "q": "(B, H, T, D) queries (also the keys with shared QK)",
    "k": "(B, H, T, D) keys; separate QK only",
    "v": "(B, H, T, D) values",
    "means": "(H, K, D) centroids at the start of the step",
    "state_counts": "(H, K) k-means EMA counts before the update (zeros for a fresh state)",
    "state_sums": "(H, K, D) k-means EMA sums before the update (the means for a fresh state)",
    "upstream": "(B, H, T, D) upstream gradient dL/d(out)",
    "mem_k": "(H, K, D) memory key per head and cluster; only with mem_kv",
    "mem_v": "(H, K, D) memory value per head and cluster; only with mem_kv",
    # routing decisions (int64)
    "assignments": "(S, B, H, T) nearest centroid of each normalised query (and key)",
    "query_windows": "(B, H, K, W) positions of each cluster's queries, ascending; balanced membership only",
    "key_windows": "(B, H, K, W) positions of each cluster's keys, ascending; balanced membership, separate QK",
    "cluster_counts": "(S, H, K) how many points each cluster received, per stream",
    "cluster_sums": "(S, H, K, D) sum of the normalised points each cluster received, per stream",
    # forward
    "out": "(B, H, T, D) routing attention output",
    "commitment": "() commitment loss (already multiplied by beta)",
    # k-means update
    "new_means": "(H, K, D) centroids after one update from this step's statistics",
    "new_counts": "(H, K) EMA counts after the update",
    "new_sums": "(H, K, D) EMA sums after the update",
    # backward
    "grad_q": "(B, H, T, D) d sum(upstream * out) / dq (with shared QK: through queries and keys)",
    "grad_k": "(B, H, T, D) d sum(upstream * out) / dk; separate QK only",
    "grad_v": "(B, H, T, D) d sum(upstream * out) / dv",
    "grad_mem_k": "(H, K, D) d sum(upstream * out) / d mem_k; only with mem_kv",
    "grad_mem_v": "(H, K, D) d sum(upstream * out) / d mem_v; only with mem_kv",
    "commitment_grad_q": "(B, H, T, D) d commitment / dq",
    "commitment_grad_k": "(B, H, T, D) d commitment / dk; separate QK only",
    # metadata
    "options": "() str: JSON of the options (and the format name)",
}
_ALWAYS = ("q", "v", "means", "state_counts", "state_sums", "upstream", "assignments", "cluster_counts",
           "cluster_sums", "out", "commitment", "new_means", "new_counts", "new_sums", "grad_q", "grad_v",
           "commitment_grad_q", "options")
_WINDOWS = ("query_windows", "key_windows")  # compared as sets: the order inside a window is a convention


def official_conventions():
    """The options of the official TensorFlow code, rt_numpy's defaults (docs/algorithm.md#1-one-routing-head).

    Returns a dict of keyword arguments for :func:`reference`.
    """
    return {"norm": "ln", "logits": "normalized", "self_attend": "allow", "combine_eps": 1e-2, "commitment": 1e-4,
            "commitment_qk": "sum", "centroid_update": "ema", "ema_decay": 0.999, "laplace_eps": 1e-5}


def port_conventions(shared_qk=True):
    """The options under which rt_numpy reproduces the PyTorch port's ``KmeansAttention``.

    Parameters
    ----------
    shared_qk : bool
        The port's self-token rule exists only with shared QK.

    Returns
    -------
    dict
        Keyword arguments for :func:`reference` (and, but for
        ``centroid_update``, ``ema_decay`` and ``laplace_eps``, for :func:`rt_numpy.attention.routing_attention`).  With
        separate QK and a causal port module, also pass its memory key/value
        as ``mem_kv=(mem_key[:, :, 0], mem_value[:, :, 0])``.

    Notes
    -----
    docs/algorithm.md#1-one-routing-head: L2 normalisation, raw queries against L2-normalised
    (shared QK) or raw keys divided by sqrt(D), the -5e4 self logit with
    shared QK, scatter-mean eps 1e-5, one mean over queries and keys in the
    commitment loss, the spherical centroid update.
    """
    return {"norm": "l2", "logits": "scaled", "self_attend": "last_resort" if shared_qk else "allow",
            "combine_eps": 1e-5, "commitment": 1e-4, "commitment_qk": "mean", "centroid_update": "spherical",
            "ema_decay": 0.999, "laplace_eps": 1e-5}


# --------------------------------------------------------------------------- the reference
def reference(q, k, v, means, *, window_size=None, upstream, shared_qk=True, norm="ln", logits="normalized",
              membership="balanced", self_attend="allow", combine_eps=1e-2, commitment=1e-4, commitment_qk="sum",
              mem_kv=None, centroid_update="ema", ema_decay=0.999, laplace_eps=1e-5, state=None):
    """Everything one routing-attention step computes, on rt_numpy's reference path.

    Parameters
    ----------
    q, k, v : float array (B, H, T, D)
        With ``shared_qk=True`` the keys are the queries: pass ``k=None`` (or q).
    means : float array (H, K, D)
        Centroids, same dtype as q.
    window_size : int
        W (``membership="balanced"``).
    upstream : float array (B, H, T, D)
        The gradient arriving at the output; the gradients returned are those
        of ``sum(upstream * out)``, and separately of the commitment loss.
    shared_qk, norm, logits, membership, self_attend, combine_eps, commitment, commitment_qk, mem_kv
        As in :func:`rt_numpy.attention.routing_attention`.
    centroid_update, ema_decay, laplace_eps
        The k-means update (as in :func:`rt_numpy.kmeans.update_state`), applied
        once to this step's statistics.
    state : dict, optional
        k-means state before the update; default: a fresh state around
        ``means`` (:func:`rt_numpy.kmeans.state_from_means`).

    Returns
    -------
    dict
        NumPy arrays named as in :data:`NAMES` (only those that apply: no
        ``k`` with shared QK, no windows with nearest membership, ...).
        ``options`` holds the options as a JSON string.

    Notes
    -----
    docs/algorithm.md#11-normalise, docs/algorithm.md#12-similarities, docs/algorithm.md#13-membership,
    docs/algorithm.md#14-attention-inside-a-cluster, docs/algorithm.md#15-combine,
    docs/algorithm.md#16-centroid-update, docs/algorithm.md#18-commitment-loss.  Runs with ``impl="ref"``: the plain
    array code, not the Numba kernels.  Routing decisions come from the
    normalised queries (and keys) against ``means``, exactly as inside
    :func:`rt_numpy.attention.routing_attention`.
    """
    if shared_qk:
        k = q
    B, H, T, D = _checks.qkv(q, k, v)
    upstream = _check_like("upstream", upstream, q)
    options = {"window_size": window_size, "shared_qk": bool(shared_qk), "norm": norm, "logits": logits,
               "membership": membership, "self_attend": self_attend, "combine_eps": combine_eps,
               "commitment": commitment, "commitment_qk": commitment_qk}
    _checks.choice("centroid_update", centroid_update, kmeans.CENTROID_UPDATES)
    state = kmeans.state_from_means(means) if state is None else state
    kmeans.check_state(state)
    if state["means"].shape != means.shape or not np.array_equal(state["means"], means):
        raise ValueError("state['means'] must equal means (the centroids the step routes with)")

    mem = tuple(mem_kv) if mem_kv is not None else ()

    def run(q_, k_, v_, *mem_):
        return attention.routing_attention(q_, k_, v_, means, mem_kv=mem_ or None, impl="ref", **options)

    out, loss, stats = run(q, k, v, *mem)  # validates every option
    xp_out = np.asarray(out)

    def objective(*args):
        o, _, _ = run(*args)
        return ops.sum(ops.multiply(o, upstream))

    def commitment_only(*args):
        return run(*args)[1]

    argnums = (0, 2) + (() if shared_qk else (1,)) + tuple(range(3, 3 + len(mem)))
    grads = grad(objective, argnums)(q, k, v, *mem)
    commitment_grads = grad(commitment_only, (0,) if shared_qk else (0, 1))(q, k, v, *mem)
    new_state = kmeans.update_state(state, stats, centroid_update=centroid_update, ema_decay=ema_decay,
                                    laplace_eps=laplace_eps, norm=norm)

    result = {"q": q, "v": v, "means": means, "state_counts": state["counts"], "state_sums": state["sums"],
              "upstream": upstream, "assignments": stats["assignments"], "cluster_counts": stats["counts"],
              "cluster_sums": stats["sums"], "out": xp_out, "commitment": np.asarray(loss, dtype=q.dtype),
              "new_means": new_state["means"], "new_counts": new_state["counts"], "new_sums": new_state["sums"],
              "grad_q": grads[0], "grad_v": grads[1], "commitment_grad_q": commitment_grads[0]}
    if not shared_qk:
        result.update(k=k, grad_k=grads[2], commitment_grad_k=commitment_grads[1])
    if mem:
        result.update(mem_k=mem[0], mem_v=mem[1], grad_mem_k=grads[-2], grad_mem_v=grads[-1])
    if membership == "balanced":
        with backend.use_impl("ref"):
            qn = kmeans.normalize(q, norm)  # (B, H, T, D)
            kn = None if shared_qk else kmeans.normalize(k, norm)
        result["query_windows"] = kmeans.balanced_membership(qn, means, window_size, impl="ref")  # (B, H, K, W)
        if not shared_qk:
            result["key_windows"] = kmeans.balanced_membership(kn, means, window_size, impl="ref")
    options.update(centroid_update=centroid_update, ema_decay=ema_decay, laplace_eps=laplace_eps, mem_kv=bool(mem),
                   format=FORMAT)
    result["options"] = np.array(json.dumps(options, sort_keys=True))
    return {name: np.array(value) for name, value in result.items()}


def _check_like(name, x, like):
    """A finite float array of the same shape and dtype as ``like``."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array, got {type(x).__name__}")
    if x.shape != like.shape or x.dtype != like.dtype:
        raise ValueError(f"{name} must have shape {tuple(like.shape)} and dtype {like.dtype}, "
                         f"got {tuple(x.shape)} {x.dtype}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return x


# --------------------------------------------------------------------------- files
def save(path, result):
    """Write a :func:`reference` result to ``path`` (.npz), atomically.

    The options are stored as a JSON string, so ``np.load(path,
    allow_pickle=False)`` reads the file; :func:`load` also checks it.

    Raises
    ------
    ValueError
        A name not in :data:`NAMES`, a required name missing, or an array
        that would need a pickle (object dtype).
    """
    _check_names(result, str(path))
    for name, value in result.items():
        if np.asarray(value).dtype.kind == "O":
            raise ValueError(f"result[{name!r}] has dtype object, which .npz cannot hold without a pickle")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **result)
        os.replace(tmp, path)  # readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load(path):
    """Read a file written by :func:`save`; returns the dict of arrays.

    ``result["options"]`` stays a 0-d string array; :func:`options` decodes it.

    Raises
    ------
    ValueError
        The file is not a readable .npz, or names are missing or unknown.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            result = {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path} is not a readable crosscheck .npz file: {err}") from err
    _check_names(result, str(path))
    options(result)  # the options must decode
    return result


def options(result):
    """The options of a :func:`reference` result (or a loaded file), as a dict."""
    raw = result.get("options")
    try:
        decoded = json.loads(str(raw[()]))
    except (TypeError, ValueError, IndexError) as err:
        raise ValueError(f"options must be a JSON string array, got {raw!r}") from err
    if not isinstance(decoded, dict) or decoded.get("format") != FORMAT:
        raise ValueError(f"options do not come from rt_numpy.crosscheck ({FORMAT}), got {decoded!r}")
    return decoded


def _check_names(result, where):
    if not isinstance(result, dict):
        raise TypeError(f"a crosscheck result must be a dict of arrays, got {type(result).__name__}")
    unknown = sorted(set(result) - set(NAMES))
    if unknown:
        raise ValueError(f"{where}: unknown names {unknown}; known names are listed in rt_numpy.crosscheck.NAMES")
    missing = [name for name in _ALWAYS if name not in result]
    if "options" not in missing:
        opts = options(result)
        if not opts["shared_qk"]:
            missing += [n for n in ("k", "grad_k", "commitment_grad_k") if n not in result]
        if opts["membership"] == "balanced":
            missing += [n for n in _WINDOWS[:1 if opts["shared_qk"] else 2] if n not in result]
        if opts["mem_kv"]:
            missing += [n for n in ("mem_k", "mem_v", "grad_mem_k", "grad_mem_v") if n not in result]
    if missing:
        raise ValueError(f"{where}: missing names {missing}")


# --------------------------------------------------------------------------- comparing
def compare(expected, actual):
    """Errors of ``actual`` against ``expected``, for every name the two share.

    Parameters
    ----------
    expected : dict
        A :func:`reference` result (or a loaded file).
    actual : dict
        Your implementation's arrays under the same names (NumPy arrays, or
        anything ``np.asarray`` takes); names you do not provide are skipped.

    Returns
    -------
    dict name -> float
        For float arrays, ``max |actual - expected| / max |expected|`` (an error
        relative to the array's scale, so elements near zero do not blow it up);
        for integer arrays, the fraction of entries that differ.  Windows are
        compared as sets of positions (each window sorted first): the order
        inside a window is a convention (the port keeps decreasing similarity).
        A shape mismatch is an error of ``inf``, and so is a NaN or an infinity
        in either array, unless both hold exactly the same values.
    """
    errors = {}
    for name in sorted(set(expected) & set(actual) - {"options"}):
        e, a = np.asarray(expected[name]), np.asarray(actual[name])
        if name in _WINDOWS:
            e, a = np.sort(e, axis=-1), np.sort(a.reshape(e.shape) if a.size == e.size else a, axis=-1)
        if e.shape != a.shape:
            errors[name] = float("inf")
        elif e.dtype.kind in "iub":
            errors[name] = float(np.mean(e != a)) if e.size else 0.0
        elif not (np.isfinite(a).all() and np.isfinite(e).all()):  # nan > rtol is False: never let NaN pass
            errors[name] = 0.0 if np.array_equal(a, e, equal_nan=True) else float("inf")
        else:
            a = a.astype(np.float64)
            scale = float(np.max(np.abs(e))) if e.size else 0.0
            diff = float(np.max(np.abs(a - e))) if e.size else 0.0
            errors[name] = diff / scale if scale > 0 else diff
    return errors


def assert_close(expected, actual, *, rtol, names=None):
    """Raise AssertionError listing every array whose :func:`compare` error exceeds ``rtol``.

    ``names``: the names that must be present in ``actual`` (default: those it has).
    Integer arrays (windows, assignments) must match exactly.  ``rtol`` is a finite number >= 0.
    Returns the errors.
    """
    rtol = _checks.real("rtol", rtol, 0.0)
    for side, arrays in (("actual", actual), ("expected", expected)):
        missing = [n for n in (names or ()) if n not in arrays]
        if missing:
            raise AssertionError(f"{side} has no {missing}")
    errors = compare(expected, actual)
    if names is not None:
        errors = {n: errors[n] for n in names}
    bad = {n: e for n, e in errors.items()
           if e > (0 if np.asarray(expected[n]).dtype.kind in "iub" else rtol)}
    if bad:
        lines = "\n".join(f"  {n}: {e:.3g}" for n, e in sorted(bad.items()))
        raise AssertionError(f"{len(bad)} of {len(errors)} arrays differ beyond rtol={rtol}:\n{lines}")
    return errors


# --------------------------------------------------------------------------- the port's language model
def port_lm_config(*, num_tokens, dim, depth, max_seq_len, heads=8, dim_head=64, window_size=64,
                   local_attn_window_size=None, local_attn_radius_blocks=1, n_local_attn_heads=0, causal=False,
                   shared_qk=None, tie_embedding=False, rel_pos_emb=True, kmeans_ema_decay=0.999,
                   dtype="float32"):
    """The rt_numpy Config of the PyTorch port's ``RoutingTransformerLM`` built with these arguments.

    Parameters
    ----------
    num_tokens, dim, depth, max_seq_len, heads, dim_head, window_size, local_attn_window_size,
    local_attn_radius_blocks, n_local_attn_heads, causal, shared_qk, tie_embedding, rel_pos_emb, kmeans_ema_decay
        The port's constructor arguments, with its defaults (``routing-transformer`` 1.6.1).
        rt_numpy reproduces the causal LM with separate QK and tied embeddings: pass
        ``causal=True, shared_qk=False, tie_embedding=True`` and ``dim_head=dim // heads``.
        ``n_local_attn_heads`` (an int, or one per layer) must be ``heads`` in the first
        layers and one smaller number in the last ones: rt_numpy routes in its last
        ``n_route_layers`` layers, with ``n_route_heads`` heads each.
    dtype : {"float32", "float64"}
        rt_numpy's dtype (not a port argument).

    Returns
    -------
    rt_numpy.model.Config
        ``width=dim``, ``num_heads=heads``, ``num_clusters=max_seq_len // window_size``,
        ``block_size=local_attn_window_size``, ``look_back=local_attn_radius_blocks``,
        ``ff_mult=4`` (the port's LM never passes its ``ff_mult`` on), rotary positions, the
        options of :func:`port_conventions` (``shared_qk=False``, ``ema_decay=kmeans_ema_decay``)
        and ``mem_kv``, ``rotary_values`` and ``local_qkv_bias`` on.

    Raises
    ------
    ValueError
        An argument whose port behaviour rt_numpy does not have, named with its value.

    Notes
    -----
    docs/conventions.md#the-language-model-around-it.  Build the port itself with
    ``ff_activation=routing_transformer.routing_transformer.GELU_`` (rt_numpy's tanh GELU;
    the port's default is the exact one) and dropouts 0 to compare numbers.
    """
    needed = {"causal": (causal, True, "the non-causal port has no memory key/value"),
              "shared_qk": (shared_qk, False, "the port's shared-QK LM gives its local heads separate keys, "
                                              "which rt_numpy's shared_qk=True cannot hold"),
              "tie_embedding": (tie_embedding, True, "the port's untied output layer has a bias rt_numpy lacks"),
              "rel_pos_emb": (rel_pos_emb, True, "without it the port's local heads have no positions at all")}
    for name, (value, wanted, why) in needed.items():
        if value is not wanted:
            raise ValueError(f"port_lm_config reproduces {name}={wanted} ({why}), got {name}={value!r}")
    _checks.integer("heads", heads, 1)
    _checks.integer("depth", depth, 1)
    if dim % heads or dim_head != dim // heads:
        raise ValueError(f"dim_head must be dim // heads (rt_numpy's head dim is width / num_heads), got "
                         f"dim_head={dim_head!r} with dim={dim!r}, heads={heads!r}")
    local = tuple(n_local_attn_heads) if isinstance(n_local_attn_heads, (tuple, list)) else \
        (n_local_attn_heads,) * depth
    routing = [heads - n for n in local]  # routing heads per layer
    n_route_layers = sum(r > 0 for r in routing)
    n_route_heads = max(routing)
    if len(local) != depth or routing != [0] * (depth - n_route_layers) + [n_route_heads] * n_route_layers:
        raise ValueError(f"n_local_attn_heads must be heads={heads} in the first layers and one smaller number in "
                         f"the last ones ({depth} layers), got {n_local_attn_heads!r}")
    window = _checks.integer("window_size", window_size, 1)
    if max_seq_len % window:
        raise ValueError(f"max_seq_len must be a multiple of window_size={window}, got {max_seq_len!r}")
    conventions = port_conventions(shared_qk=False)
    return model.Config(
        vocab_size=num_tokens, seq_len=max_seq_len, width=dim, n_layers=depth, num_heads=heads,
        n_route_heads=n_route_heads, n_route_layers=n_route_layers, num_clusters=max_seq_len // window,
        window_size=window, block_size=window if local_attn_window_size is None else local_attn_window_size,
        look_back=local_attn_radius_blocks, ff_mult=4, shared_qk=False, pos_encoding="rotary", tie_embeddings=True,
        mem_kv=True, rotary_values=True, local_qkv_bias=True, ema_decay=kmeans_ema_decay, dtype=dtype,
        **{k: conventions[k] for k in ("norm", "logits", "self_attend", "combine_eps", "commitment",
                                       "commitment_qk", "centroid_update")})


#: The port's buffers that :func:`params_from_port` reads nothing from (rebuilt or implied by rt_numpy).
PORT_BUFFERS = ("sinu_pos_emb.emb", ".rel_pos.inv_freq", ".kmeans.initted", "out.tensor")


def _interleaved_to_halves(D):
    """rt head dim d <- port head dim ``P[d]``: the port's rotary pairs (2i, 2i+1) become rt's (i, i + D/2)."""
    return np.concatenate([np.arange(0, D, 2), np.arange(1, D, 2)])  # (D,)


def _check_port_cfg(cfg):
    if not isinstance(cfg, model.Config):
        raise TypeError(f"cfg must be an rt_numpy.model.Config, got {type(cfg).__name__}")
    wanted = {"shared_qk": False, "pos_encoding": "rotary", "tie_embeddings": True, "attention": "routing",
              "mem_kv": True, "rotary_values": True, "local_qkv_bias": True, "ff_mult": 4}
    wrong = {name: getattr(cfg, name) for name, value in wanted.items() if getattr(cfg, name) != value}
    if wrong:
        raise ValueError(f"cfg is not a port LM's config (port_lm_config gives one): it needs {wanted}, got {wrong}")


def _port_arrays(arrays, cfg):
    """The port's parameter tensors (``arrays``: name -> array) as rt_numpy parameters; checks every name."""
    _check_port_cfg(cfg)
    if not isinstance(arrays, dict):
        raise TypeError(f"the port's tensors must be a dict name -> NumPy array, got {type(arrays).__name__}")
    C, H, D, K, V = cfg.width, cfg.num_heads, cfg.head_dim, cfg.num_clusters, cfg.vocab_size
    P = _interleaved_to_halves(D)
    used = set()

    def get(name, shape):
        if name not in arrays:
            raise ValueError(f"the port's tensors have no {name!r} (the port LM of this cfg has it, shape {shape})")
        value = np.asarray(arrays[name])
        if value.shape != shape:
            raise ValueError(f"the port's {name!r} has shape {value.shape}, expected {shape} for this cfg")
        used.add(name)
        return value

    params = {"wte": get("token_emb.weight", (V, C))}
    for i in range(cfg.n_layers):
        port, rt = f"routing_transformer.layers.layers.{i}.", f"h{i}."
        Hr = H - cfg.n_local_heads(i)
        Hl = H - Hr
        # Port heads are [local..., routing...]; rt's are [routing..., local...].  A routing head's dims are
        # permuted by P (its rotary pairs), a local head's are not (the port's local rotary already pairs halves).
        routed = (np.arange(Hr)[:, None] * D + P[None, :]).reshape(-1)  # (Hr D,) port rows of rt's routing dims
        w = {n: get(f"{port}0.fn.to_{n}.weight", (Hr * D, C))[routed].T for n in "qkv"}  # (C, Hr D) each
        to_out = get(f"{port}0.fn.to_out.weight", (C, C))  # (C, H D) in the port's head order
        w_o = [to_out[:, Hl * D + routed].T]  # (Hr D, C)
        if Hl:
            qkv = np.split(get(f"{port}0.fn.local_to_qkv.weight", (3 * Hl * D, C)), 3)  # 3 x (Hl D, C)
            bias = np.split(get(f"{port}0.fn.local_to_qkv.bias", (3 * Hl * D,)), 3)  # 3 x (Hl D,)
            for n, weight, b in zip("qkv", qkv, bias):
                w[n] = np.concatenate([w[n], weight.T], axis=1)  # (C, Hr D) + (C, Hl D) -> (C, C)
                params[f"{rt}attn.b_{n}_local"] = b
            w_o.append(to_out[:, :Hl * D].T)  # (Hl D, C)
        params.update({f"{rt}ln1.g": get(f"{port}0.norm.weight", (C,)), f"{rt}ln1.b": get(f"{port}0.norm.bias", (C,)),
                       f"{rt}attn.w_q": w["q"], f"{rt}attn.w_k": w["k"], f"{rt}attn.w_v": w["v"],
                       f"{rt}attn.w_o": np.concatenate(w_o, axis=0)})  # (Hr D + Hl D, C) = (C, C)
        if Hr:
            for n, port_name in (("mem_k", "mem_key"), ("mem_v", "mem_value")):
                memory = get(f"{port}0.fn.global_attn.{port_name}", (Hr, K, 1, D))
                params[f"{rt}attn.{n}"] = memory[:, :, 0][..., P]  # (Hr, K, 1, D) -> (Hr, K, D)
        F = 4 * C
        params.update({f"{rt}ln2.g": get(f"{port}1.norm.weight", (C,)), f"{rt}ln2.b": get(f"{port}1.norm.bias", (C,)),
                       f"{rt}mlp.w_in": get(f"{port}1.fn.fn.w1.weight", (F, C)).T,  # (F, C) -> (C, F)
                       f"{rt}mlp.b_in": get(f"{port}1.fn.fn.w1.bias", (F,)),
                       f"{rt}mlp.w_out": get(f"{port}1.fn.fn.w2.weight", (C, F)).T,  # (C, F) -> (F, C)
                       f"{rt}mlp.b_out": get(f"{port}1.fn.fn.w2.bias", (C,))})
    params["ln_f.g"], params["ln_f.b"] = get("norm.weight", (C,)), get("norm.bias", (C,))
    params = {name: np.ascontiguousarray(params[name], dtype=cfg.dtype) for name in model.param_shapes(cfg)}
    return params, get, used


def _check_all_read(arrays, used):
    left = sorted(n for n in set(arrays) - used if not any(n.endswith(b) for b in PORT_BUFFERS))
    if left:
        raise ValueError(f"the port's tensors hold {left}, which this cfg has no place for "
                         f"(another port option, or a cfg that does not fit the port model)")


def params_from_port(state_dict, cfg):
    """rt_numpy's parameters and k-means states from a port ``RoutingTransformerLM``'s ``state_dict``.

    Parameters
    ----------
    state_dict : dict name -> NumPy array
        ``{k: v.detach().numpy() for k, v in lm.state_dict().items()}`` of the port model built
        with the arguments ``cfg`` came from (:func:`port_lm_config`).
    cfg : rt_numpy.model.Config
        From :func:`port_lm_config`.

    Returns
    -------
    params : dict
        Named as :func:`rt_numpy.model.param_shapes`, of ``cfg.dtype``.
    kmeans_states : dict
        ``{"h{i}": state}`` around the port's centroids (:func:`rt_numpy.kmeans.state_from_means`).

    Raises
    ------
    ValueError
        A port tensor missing or of the wrong shape (named), or a tensor this cfg has no place for.

    Notes
    -----
    docs/conventions.md#the-language-model-around-it.  Layer ``i`` is the port's
    ``routing_transformer.layers.layers.{i}`` (written ``L{i}`` here); ``P`` permutes each routing
    head's dims from the port's interleaved rotary pairs (2j, 2j+1) to rt_numpy's (j, j + D/2);
    the port's heads are local first, rt_numpy's routing first:

    ==================================  ==========================================================
    rt_numpy                            the port
    ==================================  ==========================================================
    ``wte``                             ``token_emb.weight``
    ``h{i}.ln1.g`` / ``.b``             ``L{i}.0.norm.weight`` / ``.bias``
    ``h{i}.attn.w_q`` routing columns   ``L{i}.0.fn.to_q.weight`` rows, P per head, transposed
    ``h{i}.attn.w_q`` local columns     first third of ``L{i}.0.fn.local_to_qkv.weight``, transposed
    ``h{i}.attn.w_k`` / ``w_v``         likewise: ``to_k`` / ``to_v``, second / last third
    ``h{i}.attn.b_q_local`` / k / v     the thirds of ``L{i}.0.fn.local_to_qkv.bias``
    ``h{i}.attn.w_o``                   ``L{i}.0.fn.to_out.weight`` transposed, rows in rt's head order
    ``h{i}.attn.mem_k`` / ``mem_v``     ``L{i}.0.fn.global_attn.mem_key`` / ``mem_value`` [:, :, 0], P
    ``h{i}.ln2.g`` / ``.b``             ``L{i}.1.norm.weight`` / ``.bias``
    ``h{i}.mlp.w_in`` / ``b_in``        ``L{i}.1.fn.fn.w1.weight`` transposed / ``.bias``
    ``h{i}.mlp.w_out`` / ``b_out``      ``L{i}.1.fn.fn.w2.weight`` transposed / ``.bias``
    ``ln_f.g`` / ``.b``                 ``norm.weight`` / ``.bias``
    k-means ``h{i}`` means              ``L{i}.0.fn.global_attn.kmeans.means``, P (a buffer)
    ==================================  ==========================================================

    The buffers of :data:`PORT_BUFFERS` are not read: rt_numpy rebuilds the position tables
    (in ``cfg.dtype``; the port's are float32 even in a float64 model) and ties ``out`` to ``wte``.
    Set the port's ``kmeans.initted`` to True before comparing, or its first forward replaces the centroids.
    """
    params, get, used = _port_arrays(state_dict, cfg)
    P = _interleaved_to_halves(cfg.head_dim)
    states = {}
    for i in range(cfg.n_layers):
        if cfg.is_routing_layer(i):
            shape = (cfg.n_route_heads, cfg.num_clusters, cfg.head_dim)
            means = get(f"routing_transformer.layers.layers.{i}.0.fn.global_attn.kmeans.means", shape)
            states[f"h{i}"] = kmeans.state_from_means(np.ascontiguousarray(means[..., P], dtype=cfg.dtype))
    _check_all_read(state_dict, used)
    return params, states


def grads_from_port(grads, cfg):
    """The port's parameter gradients under rt_numpy's names: the map of :func:`params_from_port`.

    Parameters
    ----------
    grads : dict name -> NumPy array
        ``{k: p.grad.numpy() for k, p in lm.named_parameters()}`` (a zero array where ``p.grad``
        is None).  The map is linear and permutes entries only, so gradients go through it as
        the weights do.
    cfg : rt_numpy.model.Config
        From :func:`port_lm_config`.

    Returns
    -------
    dict
        Named as :func:`rt_numpy.model.param_shapes`.
    """
    params, _, used = _port_arrays(grads, cfg)
    _check_all_read(grads, used)
    return params
