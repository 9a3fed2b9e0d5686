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
        if self.num_clusters > self.seq_len:  # more clusters than tokens: clusters that can never fill
            raise ValueError(f"num_clusters must be <= seq_len={self.seq_len}, got {self.num_clusters}")
        if self.look_back > self.seq_len // self.block_size:  # more blocks than the context holds
            raise ValueError(f"look_back must be <= seq_len / block_size = {self.seq_len // self.block_size}, "
                             f"got {self.look_back}")
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
        if not isinstance(values, dict):
            raise TypeError(f"values must be a dict of config fields, got {type(values).__name__}")
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
    shapes = param_shapes(cfg)
    count = sum(math.prod(shape) for shape in shapes.values())
    _checks.allocation(f"init_params: {count:,} parameters (width={cfg.width}, n_layers={cfg.n_layers}, "
                       f"vocab_size={cfg.vocab_size}, seq_len={cfg.seq_len})", 8 * count)  # float64 draws
    params = {}
    for name, shape in shapes.items():
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


# --------------------------------------------------------------------------- entry checks
def routing_layers(cfg):
    """Names of the layers that keep a k-means state: ``["h{i}", ...]``."""
    return [f"h{i}" for i in range(cfg.n_layers) if cfg.is_routing_layer(i)]


def _array_of(label, value, shape, dtype):
    """``value`` (unboxed) is an array of ``shape`` and ``dtype``; returns it."""
    value = getval(value)
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        raise TypeError(f"{label} must be an array, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{label} must have shape {shape} for this config, got {tuple(value.shape)}")
    if value.dtype != dtype:
        raise TypeError(f"{label} must have dtype {dtype} (cfg.dtype), got {value.dtype}")
    return value


def _one_array_module(what, arrays):
    """Every array of ``arrays`` (label -> array) lives on one device: NumPy or CuPy, not both."""
    modules = {label: backend.get_array_module(a).__name__ for label, a in arrays.items()}
    if len(set(modules.values())) > 1:
        raise TypeError(f"{what} mix array modules: {modules}")


def check_params(params, cfg):
    """``params`` is a parameter dict of ``cfg``: every name of :func:`param_shapes` and no
    other, each a finite array of its shape and of ``cfg.dtype``, all on one device.

    Raises a TypeError or ValueError naming the parameter, e.g.
    ``params['wte'] contains NaN``.  Looks through autograd boxes and works on
    CuPy arrays; the finiteness check is one sum per array
    (:func:`rt_numpy._checks.finite_arrays`), cheap next to a forward pass
    (docs/design.md#entry-checks).
    """
    params = getval(params)  # a dict, also when autograd differentiates the whole dict
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict name -> array from init_params(cfg, rng), "
                        f"got {type(params).__name__}")
    shapes = param_shapes(cfg)
    missing = [name for name in shapes if name not in params]
    unknown = [name for name in params if name not in shapes]
    if missing or unknown:
        raise ValueError(f"params do not fit this config: missing {missing}, not in the config {unknown} "
                         f"(the names are model.param_shapes(cfg))")
    arrays = {f"params[{name!r}]": _array_of(f"params[{name!r}]", params[name], shape, np.dtype(cfg.dtype))
              for name, shape in shapes.items()}
    _one_array_module("params", arrays)
    _checks.finite_arrays(arrays)


def check_kmeans_states(kmeans_states, cfg):
    """``kmeans_states`` holds a state for each routing layer of ``cfg`` and for no other layer,
    with finite centroids ``means`` (n_route_heads, K, D) of ``cfg.dtype``.

    Only the centroids are checked: they are all that :func:`forward` reads
    (:func:`rt_numpy._checks.kmeans_state` checks a whole state before an update).
    """
    layers = routing_layers(cfg)
    if not isinstance(kmeans_states, dict):
        raise TypeError(f"kmeans_states must be a dict from init_kmeans(cfg, rng), got {type(kmeans_states).__name__}")
    missing = [name for name in layers if name not in kmeans_states]
    if missing:
        raise ValueError(f"kmeans_states has no state for routing layers {missing} (got keys {sorted(kmeans_states)}): "
                         f"create it with init_kmeans(cfg, rng)")
    unknown = [name for name in kmeans_states if name not in layers]
    if unknown:
        raise ValueError(f"kmeans_states has states for {unknown}, which are not routing layers of this config "
                         f"(routing layers: {layers})")
    shape = (cfg.n_route_heads, cfg.num_clusters, cfg.head_dim)
    arrays = {}
    for name in layers:
        state = kmeans_states[name]
        if not isinstance(state, dict) or "means" not in state:
            raise ValueError(f"kmeans_states[{name!r}] must be a k-means state dict with 'means', "
                             f"got {type(state).__name__}")
        label = f"kmeans_states[{name!r}]['means']"
        arrays[label] = _array_of(label, state["means"], shape, np.dtype(cfg.dtype))
    _one_array_module("kmeans_states", arrays)
    _checks.finite_arrays(arrays)


def check_ids(ids, cfg, name="ids"):
    """Token ids: an integer array (B, T) with B >= 1, 1 <= T <= seq_len and values in [0, vocab_size).

    Returns the unboxed array.
    """
    ids = getval(ids)
    if not hasattr(ids, "dtype") or not hasattr(ids, "shape") or ids.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array (B, T), got {getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.ndim != 2 or ids.shape[0] < 1:
        raise ValueError(f"{name} must have shape (B, T) with B >= 1, got {tuple(ids.shape)}")
    if not 1 <= ids.shape[1] <= cfg.seq_len:
        raise ValueError(f"{name} must have 1 <= T <= seq_len={cfg.seq_len}, got T={ids.shape[1]}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"{name} must lie in [0, vocab_size={cfg.vocab_size}), got values in [{low}, {high}]")
    return ids


def forward_bytes(cfg, B, T):
    """A lower bound on the bytes that one :func:`forward` of ``B`` rows of ``T`` tokens keeps for its backward pass.

    Per layer: the residual stream and the block's inner arrays, about
    ``8 C + 3 F`` values per token; the local heads' logits
    (B, H_local, T, (look_back + 1) L); the routing heads' distances
    (B, Hr, T, K) and logits inside clusters (B, Hr, K, W, W); a baseline's
    logits (dense (B, Hr, T, T), strided and LSH at least (B, Hr, n_hashes T, W)).
    Then the output logits (B, T, V), twice (the softmax of the loss).  The
    forward pass refuses a request whose bound exceeds the machine's memory.
    """
    C, F, V, K = cfg.width, cfg.ff_mult * cfg.width, cfg.vocab_size, cfg.num_clusters
    W, L = min(cfg.window_size, T), min(cfg.block_size, T)
    values = 2 * B * T * V
    for i in range(cfg.n_layers):
        Hr = cfg.num_heads - cfg.n_local_heads(i)
        values += B * T * (8 * C + 3 * F) + B * cfg.n_local_heads(i) * T * (cfg.look_back + 1) * L
        if cfg.is_routing_layer(i):
            values += B * Hr * (T * K + K * W * W)
        elif cfg.attention == "dense":
            values += B * Hr * T * T
        else:
            values += B * Hr * cfg.n_hashes * T * W
    return values * np.dtype(cfg.dtype).itemsize


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
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a model.Config, got {type(cfg).__name__}")
    ids_v = check_ids(ids, cfg)
    B, T = ids_v.shape
    key_mask = _checks.key_mask(key_mask, B, T)
    if rng is not None:
        _checks.generator("rng", rng)
    if trace is not None and not isinstance(trace, dict):
        raise TypeError(f"trace must be a dict or None, got {type(trace).__name__}")
    check_params(params, cfg)
    check_kmeans_states(kmeans_states, cfg)
    _checks.allocation(f"forward of ids {(B, T)} (num_clusters={cfg.num_clusters}, window_size={cfg.window_size}, "
                       f"vocab_size={cfg.vocab_size})", forward_bytes(cfg, B, T))
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
    if not isinstance(cfg, Config):
        raise TypeError(f"cfg must be a model.Config, got {type(cfg).__name__}")
    shape = check_ids(ids, cfg).shape
    if check_ids(targets, cfg, "targets").shape != shape:
        raise ValueError(f"targets must have the shape of ids {tuple(shape)}, got {tuple(getval(targets).shape)}")
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
