"""A small decoder-only Routing Transformer language model, as pure functions.

* :class:`Config` - every size and option, validated on construction.
* :func:`init_params` - the parameters, a flat dict ``name -> array`` with
  stable names (listed in :func:`param_shapes`), one-to-one with the names of
  other frameworks' parameters for cross-checking.
* :func:`init_kmeans` - the k-means state of every routing layer, kept beside
  the parameters and updated after each training step (never differentiated).
* :func:`forward` / :func:`loss` - built only from :mod:`rt_numpy.ops`
  primitives, so autograd differentiates them and they run on CuPy arrays.

Architecture (docs/algorithm.md#4-layers-and-heads; paper section 4.2): token embedding plus
learned absolute position embedding (or rotary), ``n_layers`` pre-LN residual
blocks (attention, then a GELU feed-forward), a final layer norm and the output
projection, tied to the token embedding by default.  The attention of the last
``n_route_layers`` layers mixes ``n_route_heads`` routing heads with local
heads; earlier layers are local only.

Three options (off by default) make the model the PyTorch port's causal
``RoutingTransformerLM`` with separate QK (docs/conventions.md#the-language-model-around-it):
``mem_kv`` (a learned memory key/value per routing head and cluster),
``rotary_values`` (the routing heads' values rotated too) and
``local_qkv_bias`` (biases on the local heads' projections).
:func:`rt_numpy.crosscheck.port_lm_config` and
:func:`rt_numpy.crosscheck.params_from_port` map such a port model onto these.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from autograd.tracer import getval

from rt_numpy import _checks, attention, backend, baselines, kmeans, ops

POS_ENCODINGS = ("learned", "rotary")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and options of the language model.  Validated on construction.

    Letters: V vocab_size, T seq_len, C width, H num_heads, K num_clusters,
    W window_size, L block_size (docs/algorithm.md#alphabet).

    The options ``mem_kv``, ``rotary_values`` and ``local_qkv_bias`` are the
    PyTorch port's LM (docs/conventions.md#the-language-model-around-it); each
    defaults to False, the official model, so that older checkpoints load unchanged:

    * ``mem_kv``: every routing layer's routing heads get parameters
      ``h{i}.attn.mem_k`` and ``h{i}.attn.mem_v`` (n_route_heads, K, D), a key and
      a value prepended to every cluster's keys and always visible
      (``mem_kv`` of :func:`rt_numpy.attention.routing_attention`).  The port has
      them with separate QK only: needs ``shared_qk=False`` and ``attention="routing"``.
    * ``rotary_values``: the routing heads' values are rotated by the rotary
      embedding as their queries and keys are.  Needs ``pos_encoding="rotary"``.
    * ``local_qkv_bias``: every layer with local heads gets parameters
      ``h{i}.attn.b_q_local``, ``b_v_local`` (and ``b_k_local`` with separate QK),
      ((H - Hr) D,) for the layer's Hr routing heads: biases of the local heads'
      query, key and value channels.  The routing heads and the output projection keep none.
    """

    vocab_size: int = 256
    seq_len: int = 256  # T, the training context
    width: int = 128  # C
    n_layers: int = 2
    num_heads: int = 4  # H; head dim D = C / H
    n_route_heads: int = 2  # routing heads in each routing layer; the rest are local
    n_route_layers: int = 1  # routing only in the last n_route_layers layers
    attention: str = "routing"  # what those heads compute: routing, or a baseline: strided, lsh, dense
    n_hashes: int = 1  # hash rounds of attention="lsh" (buckets: num_clusters, chunks: window_size)
    lsh_seed: int = 0  # seed of the fixed LSH rotations (layer i draws from lsh_seed + i)
    num_clusters: int = 4  # K
    window_size: int = 64  # W, tokens per cluster
    block_size: int = 64  # L, local attention block
    look_back: int = 1  # previous blocks a local block sees
    ff_mult: int = 4  # feed-forward width = ff_mult * C
    shared_qk: bool = True
    pos_encoding: str = "learned"  # or "rotary"
    tie_embeddings: bool = True
    dropout: float = 0.0
    # routing options (docs/algorithm.md#1-one-routing-head), official defaults
    norm: str = "ln"
    logits: str = "normalized"
    membership: str = "balanced"
    self_attend: str = "allow"
    combine_eps: float = 1e-2
    commitment: float = 1e-4
    commitment_qk: str = "sum"
    ema_decay: float = 0.999
    centroid_update: str = "ema"
    # the PyTorch port's LM (docs/conventions.md#the-language-model-around-it); off = the official model
    mem_kv: bool = False  # routing heads: one learned memory key/value per cluster (needs separate QK)
    rotary_values: bool = False  # routing heads: rotary on the values too (needs pos_encoding="rotary")
    local_qkv_bias: bool = False  # local heads: q, k, v projections with a bias
    dtype: str = "float32"

    def __post_init__(self):
        for name in ("vocab_size", "seq_len", "width", "n_layers", "num_heads", "num_clusters", "window_size",
                     "block_size", "ff_mult"):
            _checks.integer(name, getattr(self, name), 1)
        _checks.integer("look_back", self.look_back, 0)
        _checks.integer("n_route_heads", self.n_route_heads, 0)
        _checks.integer("n_route_layers", self.n_route_layers, 0)
        _checks.integer("n_hashes", self.n_hashes, 1)
        _checks.integer("lsh_seed", self.lsh_seed, 0)
        if self.width % self.num_heads:
            raise ValueError(f"width must be a multiple of num_heads={self.num_heads}, got {self.width}")
        if self.n_route_heads > self.num_heads:
            raise ValueError(f"n_route_heads must be <= num_heads={self.num_heads}, got {self.n_route_heads}")
        if self.n_route_layers > self.n_layers:
            raise ValueError(f"n_route_layers must be <= n_layers={self.n_layers}, got {self.n_route_layers}")
        if self.seq_len % self.block_size:
            raise ValueError(f"seq_len must be a multiple of block_size={self.block_size}, got {self.seq_len}")
        if self.window_size > self.seq_len:
            raise ValueError(f"window_size must be <= seq_len={self.seq_len}, got {self.window_size}")
        choices = {"pos_encoding": POS_ENCODINGS, "norm": kmeans.NORMS, "logits": attention.LOGITS,
                   "membership": attention.MEMBERSHIP, "self_attend": attention.SELF_ATTEND,
                   "commitment_qk": kmeans.COMMITMENT_QK, "centroid_update": kmeans.CENTROID_UPDATES,
                   "dtype": ("float32", "float64"), "attention": attention.HEAD_KINDS}
        for name, options in choices.items():
            _checks.choice(name, getattr(self, name), options)
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise ValueError(f"pos_encoding='rotary' needs an even head dim, got width/num_heads = "
                             f"{self.width}/{self.num_heads} = {self.head_dim}")
        if self.attention == "lsh" and (not self.shared_qk or self.num_clusters % 2 or self.num_clusters < 2):
            raise ValueError(f"attention='lsh' needs shared_qk=True and an even num_clusters >= 2 (its buckets), "
                             f"got shared_qk={self.shared_qk}, num_clusters={self.num_clusters}")
        for name in ("shared_qk", "tie_embeddings", "mem_kv", "rotary_values", "local_qkv_bias"):
            _checks.boolean(name, getattr(self, name))
        if self.mem_kv and (self.shared_qk or self.attention != "routing"):
            raise ValueError(f"mem_kv=True is the memory of the port's separate-QK routing heads: it needs "
                             f"shared_qk=False and attention='routing', got shared_qk={self.shared_qk}, "
                             f"attention={self.attention!r}")
        if self.rotary_values and self.pos_encoding != "rotary":
            raise ValueError(f"rotary_values=True rotates the values by the rotary embedding: it needs "
                             f"pos_encoding='rotary', got pos_encoding={self.pos_encoding!r}")
        _checks.real("dropout", self.dropout, 0.0, 1.0, high_open=True)
        _checks.real("ema_decay", self.ema_decay, 0.0, 1.0, high_open=True)
        _checks.real("commitment", self.commitment, 0.0)
        _checks.real("combine_eps", self.combine_eps, 0.0, low_open=True)

    @property
    def head_dim(self):
        return self.width // self.num_heads

    @property
    def stride(self):
        """S of ``attention="strided"``: T / W, so that a class has W tokens, as a routing cluster."""
        return max(1, self.seq_len // self.window_size)

    def is_sparse_layer(self, layer):
        """Only the last ``n_route_layers`` layers have ``n_route_heads`` routing (or baseline) heads
        (docs/algorithm.md#4-layers-and-heads)."""
        return self.n_route_heads > 0 and layer >= self.n_layers - self.n_route_layers

    def is_routing_layer(self, layer):
        """Layers with routing heads, which keep a k-means state."""
        return self.attention == "routing" and self.is_sparse_layer(layer)

    def n_local_heads(self, layer):
        """The local heads of layer ``layer``: all H in a local-only layer, H - n_route_heads otherwise."""
        return self.num_heads - (self.n_route_heads if self.is_sparse_layer(layer) else 0)

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A Config from a dict (e.g. read from a checkpoint's JSON); unknown keys are an error."""
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown config keys {sorted(unknown)}")
        return cls(**values)


# --------------------------------------------------------------------------- parameters
def param_shapes(cfg):
    """Every parameter name and its shape, in a fixed order.

    ``wte`` (V, C) token embedding; ``wpe`` (T, C) learned positions;
    per layer ``h{i}.ln1.g``/``.b`` (C,), ``h{i}.attn.w_q``/``w_k``/``w_v``/``w_o``
    (C, C) (no ``w_k`` with shared QK), ``h{i}.ln2.g``/``.b``, ``h{i}.mlp.w_in``
    (C, F), ``h{i}.mlp.b_in`` (F,), ``h{i}.mlp.w_out`` (F, C), ``h{i}.mlp.b_out``
    (C,); ``ln_f.g``/``.b``; ``lm_head`` (C, V) when embeddings are not tied.

    With the port's options (:class:`Config`): ``h{i}.attn.mem_k``/``mem_v``
    (n_route_heads, K, D) in routing layers (``mem_kv``), and
    ``h{i}.attn.b_q_local``/``b_k_local``/``b_v_local`` ((H - Hr) D,) in layers
    with local heads (``local_qkv_bias``; no ``b_k_local`` with shared QK).
    """
    V, T, C, F = cfg.vocab_size, cfg.seq_len, cfg.width, cfg.ff_mult * cfg.width
    Hr, K, D = cfg.n_route_heads, cfg.num_clusters, cfg.head_dim
    shapes = {"wte": (V, C)}
    if cfg.pos_encoding == "learned":
        shapes["wpe"] = (T, C)
    for i in range(cfg.n_layers):
        shapes[f"h{i}.ln1.g"] = shapes[f"h{i}.ln1.b"] = (C,)
        for w in ("w_q", "w_v", "w_o") if cfg.shared_qk else ("w_q", "w_k", "w_v", "w_o"):
            shapes[f"h{i}.attn.{w}"] = (C, C)
        if cfg.mem_kv and cfg.is_routing_layer(i):
            shapes[f"h{i}.attn.mem_k"] = shapes[f"h{i}.attn.mem_v"] = (Hr, K, D)
        if cfg.local_qkv_bias and cfg.n_local_heads(i):
            for b in ("b_q_local", "b_v_local") if cfg.shared_qk else ("b_q_local", "b_k_local", "b_v_local"):
                shapes[f"h{i}.attn.{b}"] = (cfg.n_local_heads(i) * D,)
        shapes[f"h{i}.ln2.g"] = shapes[f"h{i}.ln2.b"] = (C,)
        shapes.update({f"h{i}.mlp.w_in": (C, F), f"h{i}.mlp.b_in": (F,), f"h{i}.mlp.w_out": (F, C),
                       f"h{i}.mlp.b_out": (C,)})
    shapes["ln_f.g"] = shapes["ln_f.b"] = (C,)
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (C, V)
    return shapes


def init_params(cfg, rng):
    """Parameters drawn as in GPT-2: N(0, 0.02^2) weights, the residual output projections
    scaled by 1/sqrt(2 n_layers), zero biases, unit layer-norm gains.  The memory
    keys and values (``mem_kv``) are N(0, 1), as the port draws them.

    Returns a dict ``name -> array`` of ``cfg.dtype`` (names: :func:`param_shapes`).
    """
    _checks.generator("rng", rng)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".g"):
            value = np.ones(shape)
        elif name.endswith((".b", ".b_in", ".b_out", "_local")):
            value = np.zeros(shape)
        elif name.endswith((".mem_k", ".mem_v")):
            value = rng.standard_normal(shape)
        else:
            std = 0.02 / math.sqrt(2 * cfg.n_layers) if name.endswith(("w_o", "w_out")) else 0.02
            value = std * rng.standard_normal(shape)
        params[name] = value.astype(cfg.dtype)
    return params


def init_kmeans(cfg, rng):
    """k-means state of every routing layer: ``{"h{i}": state}`` with centroids (n_route_heads, K, D).

    Centroids are initialised here, never lazily: a model can sample before training.
    """
    return {f"h{i}": kmeans.init_state(cfg.n_route_heads, cfg.num_clusters, cfg.head_dim, rng=rng,
                                       norm=cfg.norm, dtype=np.dtype(cfg.dtype))
            for i in range(cfg.n_layers) if cfg.is_routing_layer(i)}


def update_kmeans(cfg, states, stats):
    """Apply each routing layer's centroid update after a training step; returns new states."""
    return {name: kmeans.update_state(state, stats[name], centroid_update=cfg.centroid_update,
                                      ema_decay=cfg.ema_decay, norm=cfg.norm)
            for name, state in states.items()}


# --------------------------------------------------------------------------- forward
def rotary_tables(T, D, xp=np, dtype=np.float32):
    """cos and sin tables (T, D) of rotary position embeddings (Su et al., arXiv:2104.09864).

    Pair (d, d + D/2) of a head vector is rotated by the angle ``t * 10000^(-2d/D)``.
    """
    inv_freq = 10000.0 ** (-np.arange(D // 2) * 2.0 / D)  # (D/2,)
    angles = np.arange(T)[:, None] * inv_freq[None, :]  # (T, D/2)
    angles = np.concatenate([angles, angles], axis=1)  # (T, D)
    return xp.asarray(np.cos(angles).astype(dtype)), xp.asarray(np.sin(angles).astype(dtype))


def _dropout(x, rate, rng):
    if rng is None or rate == 0.0:
        return x
    xp = backend.get_array_module(getval(x))
    keep = xp.asarray(rng.random(getval(x).shape) >= rate).astype(getval(x).dtype)  # a constant mask
    return ops.multiply(x, ops.scale(keep, 1.0 / (1.0 - rate)))


def forward(params, ids, cfg, kmeans_states, *, rng=None, impl="auto", trace=None, key_mask=None):
    """Logits of the next byte at every position.

    Parameters
    ----------
    params : dict
        From :func:`init_params`.
    ids : int array (B, T')
        Token ids, T' <= cfg.seq_len.
    cfg : Config
    kmeans_states : dict
        From :func:`init_kmeans`; only the centroids are read.
    rng : numpy.random.Generator, optional
        Dropout randomness; None = evaluation (no dropout).
    impl : {"auto", "ref", "numba", "cupy"}
        Runs for the whole call, forward and backward (docs/design.md#choosing-an-implementation).
    trace : dict, optional
        Receives ``{"h{i}": {"q": ..., "k": ..., "v": ...}}``, every layer's
        per-head queries, keys and values (B, H, T', D), as plain arrays.
    key_mask : bool array (B, T'), optional
        True at real tokens, False at padding (docs/algorithm.md#8-padding).
        No attention head sees a padded token, padding joins no cluster and
        enters no k-means statistic or commitment loss.  The logits at padded
        positions are computed but mean nothing: leave them out of the loss
        (:func:`loss` does).  Pad on the right, so that positions stay those
        of the unpadded rows.

    Returns
    -------
    logits : array (B, T', V)
    aux : dict
        ``commitment`` (scalar, summed over routing layers) and ``stats``
        (``{"h{i}": cluster statistics}``) for :func:`update_kmeans`.
    """
    ids_v = getval(ids)
    if getattr(ids_v, "ndim", None) != 2 or getattr(ids_v, "dtype", np.float64).kind not in "iu":
        raise TypeError(f"ids must be an integer array (B, T), got {getattr(ids_v, 'dtype', type(ids_v))} "
                        f"of shape {getattr(ids_v, 'shape', None)}")
    B, T = ids_v.shape
    if not 1 <= T <= cfg.seq_len:
        raise ValueError(f"ids must have 1 <= T <= seq_len={cfg.seq_len}, got T={T}")
    if ids_v.size and (int(ids_v.min()) < 0 or int(ids_v.max()) >= cfg.vocab_size):
        raise ValueError(f"ids must lie in [0, vocab_size={cfg.vocab_size}), got values in "
                         f"[{int(ids_v.min())}, {int(ids_v.max())}]")
    key_mask = _checks.key_mask(key_mask, B, T)
    missing = [f"h{i}" for i in range(cfg.n_layers) if cfg.is_routing_layer(i)
               and not (isinstance(kmeans_states, dict) and f"h{i}" in kmeans_states)]
    if missing:
        raise ValueError(f"kmeans_states has no state for routing layers {missing}: "
                         f"create it with init_kmeans(cfg, rng)")
    C, D = cfg.width, cfg.head_dim
    xp = backend.get_array_module(getval(params["wte"]))
    with backend.use_impl(impl, xp):  # every primitive below, forward and backward
        x = ops.reshape(ops.gather_rows(params["wte"], xp.reshape(xp.asarray(ids_v), (-1,))), (B, T, C))  # (B, T, C)
        rotary = None
        if cfg.pos_encoding == "learned":
            x = ops.add(x, ops.slice_axis(params["wpe"], 0, T, axis=0))  # (B, T, C) + (T, C)
        else:
            rotary = rotary_tables(T, D, xp, np.dtype(cfg.dtype))
        x = _dropout(x, cfg.dropout, rng)
        commitment, stats = 0.0, {}
        for i in range(cfg.n_layers):
            means = kmeans_states[f"h{i}"]["means"] if cfg.is_routing_layer(i) else None
            layer_trace = None if trace is None else trace.setdefault(f"h{i}", {})
            x, layer_loss, layer_stats = block(x, params, i, cfg, means, rotary=rotary, rng=rng, trace=layer_trace,
                                               key_mask=key_mask)
            if layer_stats is not None:
                commitment = ops.add(commitment, layer_loss)
                stats[f"h{i}"] = layer_stats
        x = ops.layer_norm(x, params["ln_f.g"], params["ln_f.b"])
        head = ops.transpose(params["wte"], (1, 0)) if cfg.tie_embeddings else params["lm_head"]  # (C, V)
        logits = ops.matmul(x, head)  # (B, T, C) @ (C, V) -> (B, T, V)
    return logits, {"commitment": commitment, "stats": stats}


def lsh_rotations(cfg, i):
    """The fixed rotations of layer ``i``'s LSH heads (None unless ``cfg.attention == "lsh"``)."""
    if cfg.attention != "lsh" or not cfg.is_sparse_layer(i):
        return None
    return baselines.lsh_rotations(cfg.n_route_heads, cfg.head_dim, cfg.num_clusters, n_hashes=cfg.n_hashes,
                                   seed=cfg.lsh_seed + i, dtype=np.dtype(cfg.dtype))


def block(x, params, i, cfg, means, *, rotary=None, rng=None, trace=None, key_mask=None):
    """Transformer block ``i``, pre-LN: ``x + attention(LN(x))``, then ``x + MLP(LN(x))``.

    Parameters
    ----------
    x : array (B, T, C)
    params : dict
        All parameters; the block reads those named ``h{i}.*``.
    i : int
        The layer index.
    cfg : Config
    means : array (n_route_heads, K, D) or None
        The layer's centroids; None in a local-only layer.
    rotary : tuple (cos, sin) of arrays (T, D), optional
    rng : numpy.random.Generator, optional
        Dropout randomness; None = no dropout.
    trace : dict, optional
        Receives the layer's queries and keys (:func:`rt_numpy.attention.multihead_attention`).
    key_mask : bool array (B, T), optional
        True at real tokens (:func:`forward`).

    Returns
    -------
    x : array (B, T, C)
    loss : scalar
        The layer's commitment loss (0.0 in a local-only layer).
    stats : dict or None
        The layer's k-means statistics (None in a local-only layer).

    Notes
    -----
    docs/algorithm.md#4-layers-and-heads.  The MLP is ``GELU(h W_in + b_in) W_out + b_out``
    with hidden width ``ff_mult * C``.  The port's options (``mem_kv``,
    ``rotary_values``, ``local_qkv_bias``; docs/conventions.md#the-language-model-around-it)
    act inside :func:`rt_numpy.attention.multihead_attention`.
    """
    p = f"h{i}."
    T = getval(x).shape[1]
    h = ops.layer_norm(x, params[p + "ln1.g"], params[p + "ln1.b"])
    names = ("w_q", "w_k", "w_v", "w_o", "mem_k", "mem_v", "b_q_local", "b_k_local", "b_v_local")
    weights = {w: params[p + "attn." + w] for w in names if p + "attn." + w in params}
    y, loss, stats = attention.multihead_attention(
        h, weights, means, num_heads=cfg.num_heads, n_route_heads=cfg.n_route_heads if cfg.is_sparse_layer(i) else 0,
        window_size=min(cfg.window_size, T), block_size=cfg.block_size, look_back=cfg.look_back,
        shared_qk=cfg.shared_qk, self_attend=cfg.self_attend, rotary=rotary,
        rotary_values=cfg.rotary_values, kind=cfg.attention,
        stride=cfg.stride, rotations=lsh_rotations(cfg, i), norm=cfg.norm, logits=cfg.logits,
        membership=cfg.membership, combine_eps=cfg.combine_eps, commitment=cfg.commitment,
        commitment_qk=cfg.commitment_qk, trace=trace, key_mask=key_mask)
    x = ops.add(x, _dropout(y, cfg.dropout, rng))
    h = ops.layer_norm(x, params[p + "ln2.g"], params[p + "ln2.b"])
    h = ops.gelu(ops.add(ops.matmul(h, params[p + "mlp.w_in"]), params[p + "mlp.b_in"]))  # (B, T, C) -> (B, T, F)
    h = ops.add(ops.matmul(h, params[p + "mlp.w_out"]), params[p + "mlp.b_out"])  # (B, T, F) -> (B, T, C)
    return ops.add(x, _dropout(h, cfg.dropout, rng)), loss, stats


def loss(params, ids, targets, cfg, kmeans_states, *, rng=None, impl="auto", key_mask=None, mask=None):
    """Mean next-byte cross-entropy (nats) over the counted targets, plus the commitment losses.

    Parameters
    ----------
    params, ids, cfg, kmeans_states, rng, impl, key_mask
        As in :func:`forward`.
    targets : int array (B, T')
        The next byte at every position.
    mask : bool array (B, T'), optional
        The targets that count (a recall task's answers, say).  By default
        those at real tokens (``key_mask``), or every target without padding;
        with both, the targets where both are True.

    Returns
    -------
    total : scalar
    aux : dict
        :func:`forward`'s aux, plus ``cross_entropy``.
    """
    logits, aux = forward(params, ids, cfg, kmeans_states, rng=rng, impl=impl, key_mask=key_mask)
    B, T, V = getval(logits).shape
    masks = [backend.to_numpy(_checks.key_mask(m, B, T, name))
             for name, m in (("key_mask", key_mask), ("mask", mask)) if m is not None]
    xp = backend.get_array_module(getval(logits))
    with backend.use_impl(impl, xp):
        if not masks:
            ce = ops.cross_entropy(logits, targets)
        else:
            counted = np.logical_and.reduce(masks).reshape(-1)  # (B*T',): the targets that count
            if not counted.any():
                raise ValueError("mask and key_mask leave no target to count")
            rows = xp.asarray(np.flatnonzero(counted))  # (N,) flat indices of the counted targets
            picked = ops.gather_rows(ops.reshape(logits, (-1, V)), rows)  # (B*T', V) -> (N, V)
            ce = ops.cross_entropy(picked, xp.reshape(xp.asarray(targets), (-1,))[rows])
    aux["cross_entropy"] = ce
    return ops.add(ce, aux["commitment"]), aux
