"""Training loop, held-out evaluation and checkpoints for the language model.

One training step (:func:`train_step`): a batch of random windows from the
training split, the loss and its gradient by autograd (cross-entropy plus the
routing layers' commitment losses), global-norm clipping, AdamW with warm-up and
cosine decay, then the k-means update of every routing layer from the statistics
of that same forward pass (docs/algorithm.md#16-centroid-update: centroids as they were
at the start of the step, updated after it).

A checkpoint is one file, ``NAME.npz``, committed by one rename
(:func:`save_checkpoint`): every array, and the model and training configs, the
step and the random generator's state as JSON inside it (loaded with
``allow_pickle=False``).  ``NAME.json`` beside it is a copy of that JSON for
people to read.  :func:`load_checkpoint` checks every array against the config.
Resuming gives bitwise the same parameters as a run that was never interrupted,
also after Ctrl-C (:class:`Interrupted`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
import zipfile

import autograd
import numpy as np
from autograd.tracer import getval

from rt_numpy import _checks, backend, data, model, ops, optim

CHECKPOINT_VERSION = 2  # 2: the metadata inside the .npz; 1 (still read): in the .json


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training options.  Validated on construction."""

    steps: int = 1000
    batch_size: int = 8
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 200  # evaluate on the validation split every N steps (0: only at the end)
    eval_batches: int = 8  # batches of the held-out split per evaluation
    corpus: str = "python"
    seed: int = 0
    time_limit: float = 0.0  # seconds; stop early when exceeded (0: no limit)

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_batches"):
            _checks.integer(name, getattr(self, name), 1)
        for name in ("warmup_steps", "eval_every", "seed"):
            _checks.integer(name, getattr(self, name), 0)
        for name in ("lr", "min_lr", "weight_decay", "grad_clip", "time_limit"):
            _checks.real(name, getattr(self, name), low=0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr must be <= lr={self.lr}, got {self.min_lr}")

    def to_dict(self):
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- one step
def train_step(params, opt_state, kmeans_states, x, y, cfg, tcfg, step, rng, impl="auto", mask=None, key_mask=None):
    """One optimisation step; returns ``(params, opt_state, kmeans_states, metrics)``.

    ``x``, ``y`` (B, T) int arrays: inputs and next-byte targets, copied to the
    device of the parameters if needed.  ``rng`` drives dropout.  ``mask`` (B, T)
    bool, optional: the cross-entropy counts only these targets (the answers of a
    recall task).  ``key_mask`` (B, T) bool, optional: True at real tokens of a
    padded batch (docs/algorithm.md#8-padding); padding is hidden from attention,
    from the k-means update and from the loss (:func:`rt_numpy.model.loss`).
    ``metrics`` holds ``loss``, ``cross_entropy``, ``commitment``, ``grad_norm``
    and ``lr`` as Python floats.
    """
    captured = {}
    xp = backend.get_array_module(params["wte"])
    x, y = xp.asarray(x), xp.asarray(y)  # the batch goes where the parameters are
    dropout_rng = rng if cfg.dropout > 0 else None

    def objective(p):
        total, aux = model.loss(p, x, y, cfg, kmeans_states, rng=dropout_rng, impl=impl, mask=mask,
                                key_mask=key_mask)
        captured.update(aux)
        return total

    with backend.use_impl(impl, xp):  # the optimiser and the centroid update follow impl too
        loss_value, grads = autograd.value_and_grad(objective)(params)
        grads, grad_norm = optim.clip_by_global_norm(grads, tcfg.grad_clip if tcfg.grad_clip > 0 else None)
        warmup = min(tcfg.warmup_steps, tcfg.steps)  # a short run (e.g. --steps 20) shortens the warm-up too
        lr = optim.lr_schedule(step, max_lr=tcfg.lr, warmup_steps=warmup, total_steps=tcfg.steps,
                               min_lr=tcfg.min_lr)
        params, opt_state = optim.adamw_update(params, grads, opt_state, lr=lr, weight_decay=tcfg.weight_decay)
        kmeans_states = model.update_kmeans(cfg, kmeans_states, captured["stats"])
    metrics = {"loss": float(getval(loss_value)), "cross_entropy": float(getval(captured["cross_entropy"])),
               "commitment": float(getval(captured["commitment"])), "grad_norm": float(grad_norm), "lr": float(lr)}
    return params, opt_state, kmeans_states, metrics


def evaluate(params, kmeans_states, cfg, split, *, batch_size, max_batches=None, impl="auto"):
    """Mean cross-entropy (nats per byte) and bits per byte on a held-out split.

    Non-overlapping windows of ``cfg.seq_len`` bytes from the start of the split,
    in order (:func:`rt_numpy.data.eval_batches`), at most ``max_batches``
    (None: all of them).
    """
    _checks.integer("batch_size", batch_size, 1)
    if max_batches is not None:
        _checks.integer("max_batches", max_batches, 1)
    total, count = 0.0, 0
    xp = backend.get_array_module(params["wte"])
    for i, (x, y) in enumerate(data.eval_batches(split, batch_size, cfg.seq_len)):
        if max_batches is not None and i >= max_batches:
            break
        x, y = xp.asarray(x), xp.asarray(y)
        logits, _ = model.forward(params, x, cfg, kmeans_states, impl=impl)
        total += float(getval(ops.cross_entropy(logits, y))) * y.size
        count += y.size
    if count == 0:
        raise ValueError(f"the split ({len(split)} bytes) is too short for one window of seq_len={cfg.seq_len}")
    nats = total / count
    return {"cross_entropy": nats, "bits_per_byte": data.bits_per_byte(nats)}


def evaluate_documents(params, kmeans_states, cfg, docs, *, batch_size, impl="auto"):
    """Bits per byte of every document, each read on its own (padded batches, docs/algorithm.md#8-padding).

    Parameters
    ----------
    params, kmeans_states, cfg
        The model.
    docs : list of int arrays
        From :func:`rt_numpy.data.documents`.  A document of n bytes is scored on its n - 1 targets, in windows
        of ``cfg.seq_len`` that never see another document (:func:`rt_numpy.data.document_batches`).
    batch_size : int
    impl : {"auto", "ref", "numba", "cupy"}

    Returns
    -------
    dict
        ``bytes`` (n_docs,) int64, the targets scored per document; ``bits_per_byte`` (n_docs,) float64,
        NaN for a document with no target; ``mean_bits_per_byte``, over all scored bytes.
    """
    nats = np.zeros(len(docs))
    counts = np.zeros(len(docs), np.int64)
    xp = backend.get_array_module(params["wte"])
    for x, y, key_mask, doc in data.document_batches(docs, batch_size, cfg.seq_len):
        logits, _ = model.forward(params, xp.asarray(x), cfg, kmeans_states, impl=impl, key_mask=xp.asarray(key_mask))
        logits = backend.to_numpy(getval(logits)).astype(np.float64)  # (b, T, V)
        top = logits.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]  # (b, T)
        nll = log_z - np.take_along_axis(logits, y[..., None], axis=-1)[..., 0]  # (b, T), nats
        np.add.at(nats, doc, (nll * key_mask).sum(axis=1))
        np.add.at(counts, doc, key_mask.sum(axis=1))
    if not counts.any():
        raise ValueError(f"docs ({len(docs)} documents) hold no target: every document has fewer than 2 bytes")
    with np.errstate(invalid="ignore", divide="ignore"):
        per_doc = data.bits_per_byte(nats / counts)  # NaN where a document has no target
    return {"bytes": counts, "bits_per_byte": per_doc,
            "mean_bits_per_byte": data.bits_per_byte(nats.sum() / counts.sum())}


# --------------------------------------------------------------------------- checkpoints
META_NAME = "meta.json"  # the .npz member that holds the metadata (format version 2)


def _flatten(params, opt_state, kmeans_states):
    """Every array by its checkpoint name, as a host (NumPy) array: GPU arrays are copied back."""
    params, opt_state, kmeans_states = backend.to_numpy((params, opt_state, kmeans_states))
    arrays = {f"params/{k}": v for k, v in params.items()}
    arrays.update({f"opt/m/{k}": v for k, v in opt_state["m"].items()})
    arrays.update({f"opt/v/{k}": v for k, v in opt_state["v"].items()})
    for layer, state in kmeans_states.items():
        arrays.update({f"kmeans/{layer}/{k}": v for k, v in state.items()})
    return arrays


def _fsync_directory(directory):
    """Flush a directory's entries (a rename done in it) to disk.  Only POSIX can open a directory for this."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path, payload: bytes):
    """Replace ``path`` by ``payload`` with one rename: the old file or the new one, never a mix.

    The bytes go to a temporary file in the same directory, are flushed to disk,
    then renamed over ``path``; the directory is flushed after the rename.  On any
    failure the temporary file is removed and the error raised.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    _fsync_directory(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(path, *, params, opt_state, kmeans_states, step, rng, cfg, tcfg, history=None):
    """Write the checkpoint ``path.npz`` and a readable copy of its metadata, ``path.json``.

    Parameters
    ----------
    path : str or path-like
        Without extension; its directory is created if needed.
    params, opt_state, kmeans_states
        The model state (NumPy or CuPy arrays; the file always holds NumPy arrays).
    step : int
        Completed training steps.
    rng : numpy.random.Generator
        The generator of the run, saved so that a resumed run draws what the uninterrupted one would.
    cfg, tcfg : rt_numpy.model.Config, TrainConfig
    history : list of dict, optional

    Notes
    -----
    The ``.npz`` alone is the checkpoint: every array, and the metadata (format
    version, both configs, the step, the generator's state, the history) as JSON
    text in a uint8 array named ``meta.json``.  It is written to a temporary file
    and renamed over the old one, and that one rename is the commit: a crash or a
    full disk at any moment leaves the old checkpoint or the new one, and no
    temporary file.  The ``.json`` is written afterwards, the same way, for people
    to read (with the sha256 of the ``.npz``); :func:`load_checkpoint` does not
    need it, so a stale or missing ``.json`` loses nothing.
    """
    meta = {"version": CHECKPOINT_VERSION, "model": cfg.to_dict(), "train": tcfg.to_dict(), "step": int(step),
            "opt_step": int(opt_state["step"]), "rng": rng.bit_generator.state, "history": history or []}
    text = json.dumps(meta, indent=1).encode()
    arrays = _flatten(params, opt_state, kmeans_states)
    arrays[META_NAME] = np.frombuffer(text, dtype=np.uint8)  # (n_bytes,)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _atomic_write(f"{path}.npz", payload)  # the commit
    readable = dict(meta, npz_sha256=hashlib.sha256(payload).hexdigest())
    _atomic_write(f"{path}.json", json.dumps(readable, indent=1).encode())


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the expected model."""


def _read_npz(path):
    """The arrays of ``path.npz`` by name, and its raw bytes."""
    try:
        with open(f"{path}.npz", "rb") as f:
            payload = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r}: missing file {path}.npz") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot read {path}.npz ({e})") from None
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {path}.npz is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from None
    return arrays, payload


def _parse_meta(path, where, raw: bytes):
    """The metadata dict from the JSON bytes ``raw`` read from ``where``."""
    try:
        meta = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {where} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path!r}: {where} is not a JSON object")
    return meta


def _version_1_meta(path, payload):
    """The metadata of a format-1 checkpoint: in ``path.json``, which holds the sha256 of the ``.npz``."""
    try:
        with open(f"{path}.json", "rb") as f:
            meta = _parse_meta(path, f"{path}.json", f.read())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path!r}: {path}.npz has no {META_NAME} (format 1) and "
                              f"its metadata file {path}.json is missing") from None
    if meta.get("version") != 1:
        raise CheckpointError(f"checkpoint {path!r}: {path}.npz has no {META_NAME}, so {path}.json must be "
                              f"format version 1, got version {meta.get('version')!r}")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != meta.get("npz_sha256"):
        raise CheckpointError(f"checkpoint {path!r}: {path}.npz has sha256 {digest[:12]}..., the JSON expects "
                              f"{str(meta.get('npz_sha256'))[:12]}... (truncated, corrupt or from another save)")
    return meta


def _expected_arrays(cfg):
    """Every array name of a checkpoint of model ``cfg`` and its shape."""
    shapes = {}
    for prefix in ("params/", "opt/m/", "opt/v/"):  # AdamW's moments have the shapes of the parameters
        shapes.update({prefix + name: tuple(shape) for name, shape in model.param_shapes(cfg).items()})
    for layer, state in model.init_kmeans(cfg, np.random.default_rng(0)).items():  # only the structure is used
        shapes.update({f"kmeans/{layer}/{name}": value.shape for name, value in state.items()})
    return shapes


def _check_arrays(path, arrays, cfg):
    """Every array must be one ``cfg`` expects: name, shape, dtype, finite; AdamW's v and k-means counts >= 0."""
    expected = _expected_arrays(cfg)
    missing, unknown = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    if missing or unknown:
        raise CheckpointError(f"checkpoint {path!r}: its arrays do not match its config: missing {missing}, "
                              f"unknown {unknown}")
    for name, shape in expected.items():
        value = arrays[name]
        if value.shape != shape:
            sizes = (f" (n_route_heads={cfg.n_route_heads}, num_clusters={cfg.num_clusters}, "
                     f"head_dim={cfg.head_dim})" if name.startswith("kmeans/") else "")
            raise CheckpointError(f"checkpoint {path!r}: {name} has shape {value.shape}, its config{sizes} "
                                  f"expects {shape}")
        if value.dtype != np.dtype(cfg.dtype):
            raise CheckpointError(f"checkpoint {path!r}: {name} has dtype {value.dtype}, its config has "
                                  f"dtype={cfg.dtype!r}")
        if not np.isfinite(value).all():
            raise CheckpointError(f"checkpoint {path!r}: {name} contains NaN or infinity")
        if (name.startswith("opt/v/") or name.endswith("/counts")) and (value < 0).any():
            raise CheckpointError(f"checkpoint {path!r}: {name} must not be negative, got minimum {value.min()}")


def _restore(path, meta, arrays, expect_model):
    """The state of :func:`load_checkpoint` from checked metadata and arrays."""
    missing = [k for k in ("model", "train", "step", "opt_step", "rng") if k not in meta]
    if missing:
        raise CheckpointError(f"checkpoint {path!r}: its metadata has no field {missing[0]!r}")
    for field, build in (("model", model.Config.from_dict), ("train", lambda d: TrainConfig(**d))):
        if not isinstance(meta[field], dict):
            raise CheckpointError(f"checkpoint {path!r}: field {field!r} must be a JSON object, "
                                  f"got {type(meta[field]).__name__}")
        try:
            meta[field] = build(meta[field])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r}: field {field!r}: {e}") from None
    cfg, tcfg = meta["model"], meta["train"]
    if expect_model is not None and expect_model != cfg:
        diff = {k: (v, getattr(cfg, k)) for k, v in expect_model.to_dict().items() if getattr(cfg, k) != v}
        raise CheckpointError(f"checkpoint {path!r} holds another model: (expected, found) {diff}")
    for field in ("step", "opt_step"):
        try:
            _checks.integer(field, meta[field], 0, tcfg.steps, what=f" (its train.steps={tcfg.steps})")
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {path!r}: field {e}") from None
    history = meta.get("history", [])
    if not isinstance(history, list):
        raise CheckpointError(f"checkpoint {path!r}: field 'history' must be a list, got {type(history).__name__}")
    _check_arrays(path, arrays, cfg)
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = meta["rng"]
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: field 'rng' is not a random generator state ({e})") from None

    def group(prefix):
        return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}

    opt_state = {"step": meta["opt_step"], "m": group("opt/m/"), "v": group("opt/v/")}
    kmeans_states = {}
    for key, value in group("kmeans/").items():
        layer, name = key.split("/")
        kmeans_states.setdefault(layer, {})[name] = value
    return {"params": group("params/"), "opt_state": opt_state, "kmeans_states": kmeans_states,
            "step": meta["step"], "rng": rng, "cfg": cfg, "tcfg": tcfg, "history": history}


def load_checkpoint(path, *, expect_model=None):
    """Read and check a checkpoint written by :func:`save_checkpoint`.

    Parameters
    ----------
    path : str or path-like
        With or without the ``.npz`` / ``.json`` extension.
    expect_model : rt_numpy.model.Config, optional
        The checkpoint must hold this model.

    Returns
    -------
    dict
        ``params``, ``opt_state``, ``kmeans_states``, ``step``, ``rng`` (a restored
        ``numpy.random.Generator``), ``cfg``, ``tcfg`` and ``history``.

    Raises
    ------
    CheckpointError
        Naming the file and the field, for a missing, truncated or corrupt file
        and for any array or field that does not fit the checkpoint's own config:
        an array missing, unknown, of another shape or dtype, NaN or infinite,
        a negative AdamW ``v`` or k-means count, a step outside ``[0, train.steps]``.

    Notes
    -----
    Only the ``.npz`` is read (format version 2, :func:`save_checkpoint`).  A
    format-1 checkpoint (metadata in the ``.json``, which records the sha256 of
    the ``.npz``) is read from both files.
    """
    path = str(path)
    for suffix in (".npz", ".json"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    arrays, payload = _read_npz(path)
    if META_NAME in arrays:
        raw = arrays.pop(META_NAME)
        if raw.dtype != np.uint8 or raw.ndim != 1:
            raise CheckpointError(f"checkpoint {path!r}: {META_NAME} must be a uint8 array (n_bytes,), got "
                                  f"dtype {raw.dtype} shape {raw.shape}")
        meta = _parse_meta(path, f"{path}.npz[{META_NAME}]", raw.tobytes())
        if meta.get("version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"checkpoint {path!r}: unknown format version {meta.get('version')!r} "
                                  f"(this rt_numpy reads {CHECKPOINT_VERSION} and 1)")
    else:
        meta = _version_1_meta(path, payload)
    return _restore(path, meta, arrays, expect_model)


def check_out_dir(out_dir):
    """``out_dir`` must be a directory that exists and is writable, or one that can be created.

    Called before any training, so that a bad ``--out`` fails at once rather
    than at the first checkpoint.  None (write nothing) passes.
    """
    if out_dir is None:
        return
    if not isinstance(out_dir, (str, os.PathLike)):
        raise TypeError(f"out_dir must be a path or None, got {out_dir!r} of type {type(out_dir).__name__}")
    existing = os.path.abspath(out_dir)
    while not os.path.exists(existing):  # the nearest folder that exists is where the new ones are created
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        why = "is a file" if existing == os.path.abspath(out_dir) else f"cannot be created: {existing} is a file"
        raise ValueError(f"out_dir {str(out_dir)!r} {why}, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"out_dir {str(out_dir)!r} is not writable ({existing} does not allow writing)")


# --------------------------------------------------------------------------- the loop
class Interrupted(KeyboardInterrupt):
    """Ctrl-C during :func:`train`, after the state of the last completed step was saved.

    Attributes
    ----------
    step : int
        The last completed step.
    checkpoint : str or None
        The checkpoint of that step (without extension), None when ``out_dir`` was None.
    """

    def __init__(self, step, checkpoint):
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"training interrupted after step {step}{where}")
        self.step, self.checkpoint = step, checkpoint


SLOW_FIRST_STEP_S = 5.0  # a first step slower than this is reported (it compiled the kernels)


def train(cfg, tcfg, *, out_dir=None, resume=None, stop_at=None, progress=True, impl="auto", corpus=None,
          log=print, device="cpu", compile_ahead=False):
    """Train from scratch (or resume) and return the final state and history.

    Parameters
    ----------
    cfg : rt_numpy.model.Config
    tcfg : TrainConfig
    out_dir : str, optional
        Where ``checkpoint.npz/.json`` (written at every evaluation and at the
        end) and ``loss.png`` go; None writes nothing.  Checked before anything
        else (:func:`check_out_dir`).
    resume : str, optional
        A checkpoint to continue from; its configs must equal ``cfg`` and ``tcfg``.
        A finished run (its step is ``tcfg.steps``) is evaluated once and returned.
    stop_at : int, optional
        Stop after this many steps (to test resuming); the schedule still
        assumes ``tcfg.steps``.
    progress : bool
        Show a tqdm progress bar with loss and tokens/s.  The bar starts after
        the first step, whose time (the kernels compile on a first run) would
        make its rate and time left meaningless; a slow first step is logged.
    corpus : dict of uint8 arrays, optional
        ``train`` / ``val`` / ``test`` splits; default: ``tcfg.corpus`` loaded
        and split 90/5/5.
    log : callable
        Receives the one-line messages (a slow first step, a finished run, a time limit).
    device : {"cpu", "gpu"}
        Where the parameters, optimiser and k-means state live and the steps
        run (``"gpu"``: CuPy arrays, :func:`rt_numpy.backend.to_device`).  The
        same loop either way: batches are drawn on the host and copied over;
        checkpoints always hold host arrays, so a GPU run resumes on a CPU.
    compile_ahead : bool
        Before the first step, compile its Numba kernels in two processes at
        once (:func:`rt_numpy.compile_ahead.first_step`: this process is
        forked).  For a process rt_numpy owns: the command line turns it on.
        The results are the same either way.

    Returns
    -------
    dict
        ``params``, ``opt_state``, ``kmeans_states``, ``step``, ``history``
        (one dict per logged step), ``val`` (the last evaluation), ``sha256``
        of the corpus, ``checkpoint`` (its path or None), ``plot``, ``rng``.

    Raises
    ------
    Interrupted
        On Ctrl-C (KeyboardInterrupt), after saving the last completed step to
        ``out_dir`` (atomically, as every checkpoint); resuming from it gives
        bitwise what the uninterrupted run gives.
    """
    from tqdm.auto import tqdm

    check_out_dir(out_dir)
    sha = None
    if corpus is None:
        raw, sha = data.load_corpus(tcfg.corpus)
        corpus = data.split(raw)
    if resume is not None:
        state = load_checkpoint(resume, expect_model=cfg)
        if state["tcfg"] != tcfg:
            raise CheckpointError(f"checkpoint {resume!r} was trained with {state['tcfg']}, not {tcfg}")
        params, opt_state, kmeans_states = state["params"], state["opt_state"], state["kmeans_states"]
        step, rng, history = state["step"], state["rng"], state["history"]
    else:
        rng = np.random.default_rng(tcfg.seed)
        params = model.init_params(cfg, rng)
        kmeans_states = model.init_kmeans(cfg, rng)
        opt_state = optim.adamw_init(params)
        step, history = 0, []
    params, opt_state, kmeans_states = backend.to_device((params, opt_state, kmeans_states), device)
    last = min(tcfg.steps, stop_at) if stop_at is not None else tcfg.steps
    checkpoint = os.path.join(out_dir, "checkpoint") if out_dir else None

    def evaluate_val(params, kmeans_states):
        return evaluate(params, kmeans_states, cfg, corpus["val"], batch_size=tcfg.batch_size,
                        max_batches=tcfg.eval_batches, impl=impl)

    def save(params, opt_state, kmeans_states, step, rng_state, n_logged):
        """Checkpoint the state after ``step``: the generator's state then, the first ``n_logged`` history rows."""
        rng_then = np.random.default_rng()
        rng_then.bit_generator.state = rng_state
        save_checkpoint(checkpoint, params=params, opt_state=opt_state, kmeans_states=kmeans_states, step=step,
                        rng=rng_then, cfg=cfg, tcfg=tcfg, history=history[:n_logged])

    val = None
    if step >= last:
        log(f"the run is already finished (step {step} of {last}): evaluating it only")
        val = evaluate_val(params, kmeans_states)
        if checkpoint:
            save(params, opt_state, kmeans_states, step, rng.bit_generator.state, len(history))
    # What save() needs after the last completed step, replaced as a whole at the end of each step, so that
    # Ctrl-C at any line saves a consistent state (the generator as it was before the unfinished step's batch).
    done = (params, opt_state, kmeans_states, step, rng.bit_generator.state, len(history))
    bar = None
    start = time.perf_counter()
    tokens = 0
    try:
        if compile_ahead and step < last:
            from rt_numpy.compile_ahead import first_step as compile_first_step

            compile_first_step(params, kmeans_states, cfg, tcfg.batch_size, impl)
        while step < last:
            x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)
            params, opt_state, kmeans_states, metrics = train_step(params, opt_state, kmeans_states, x, y, cfg,
                                                                   tcfg, step, rng, impl)
            step += 1
            tokens += x.size
            elapsed = time.perf_counter() - start
            metrics.update(step=step, tokens_per_s=tokens / max(elapsed, 1e-9), elapsed_s=elapsed)
            if bar is None:  # the first step of this call: compiling kernels is not the rate of training
                if elapsed > SLOW_FIRST_STEP_S:
                    log(f"first step took {elapsed:.1f} s (includes compiling kernels on a first run)")
                bar = tqdm(total=last, initial=step, disable=not progress, desc="train", unit="step")
            else:
                bar.update(1)
            bar.set_postfix(loss=f"{metrics['cross_entropy']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
            out_of_time = tcfg.time_limit > 0 and elapsed > tcfg.time_limit
            evaluate_now = (tcfg.eval_every and step % tcfg.eval_every == 0) or step == last or out_of_time
            if evaluate_now:
                val = evaluate_val(params, kmeans_states)
                metrics.update(val_bits_per_byte=val["bits_per_byte"], val_cross_entropy=val["cross_entropy"])
                bar.write(f"step {step}: train loss {metrics['cross_entropy']:.3f} nats, "
                          f"val {val['bits_per_byte']:.3f} bits/byte, {metrics['tokens_per_s']:,.0f} tokens/s")
            history.append(metrics)
            if evaluate_now and checkpoint:
                save(params, opt_state, kmeans_states, step, rng.bit_generator.state, len(history))
            done = (params, opt_state, kmeans_states, step, rng.bit_generator.state, len(history))
            if out_of_time:
                log(f"time limit of {tcfg.time_limit:.0f} s reached after {step} steps")
                break
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
        if checkpoint:
            save(*done)
        raise Interrupted(done[3], checkpoint) from None  # its message says the step and the checkpoint
    if bar is not None:
        bar.close()
    plot = plot_history(history, os.path.join(out_dir, "loss.png")) if out_dir and history else None
    return {"params": params, "opt_state": opt_state, "kmeans_states": kmeans_states, "step": step,
            "history": history, "val": val, "sha256": sha, "checkpoint": checkpoint, "plot": plot, "rng": rng}


def plot_history(history, path):
    """Save the training loss (and held-out bits/byte) curve to ``path``; returns the path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [data.bits_per_byte(h["cross_entropy"]) for h in history], lw=1, label="train (batch)")
    val = [(h["step"], h["val_bits_per_byte"]) for h in history if "val_bits_per_byte" in h]
    if val:
        ax.plot(*zip(*val), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- presets
SMALL = model.Config(seq_len=256, width=128, n_layers=4, num_heads=4, n_route_heads=2, n_route_layers=2,
                     num_clusters=4, window_size=64, block_size=64)
# A fixed number of steps and no time limit, so that the result does not depend on the machine's speed.
# A run of 1500 steps (same model, seed and corpus; 2026-12-03) reached held-out 2.67 bits/byte at step 500,
# 2.14 at 1000 and 1.99 at 1300; earlier ones ran at 14k-18k tokens/s on an idle 2-core machine
# (CHANGELOG.md, 2026-11-28).  1000 steps, whose schedule decays fully by step 1000, stay well under 2.5.
SMALL_TRAIN = TrainConfig(steps=1000, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50, eval_every=250,
                          eval_batches=16)

PRESETS = {
    # CI-sized: trains in a few seconds.
    "tiny": (model.Config(seq_len=64, width=32, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                          num_clusters=2, window_size=32, block_size=32),
             TrainConfig(steps=30, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0,
                         eval_batches=2)),
    # The README demo: minutes on a 2-core laptop.
    "small": (SMALL, SMALL_TRAIN),
    # The same model with local attention only (no routing layer, no k-means): what routing adds.
    "local": (dataclasses.replace(SMALL, n_route_layers=0), SMALL_TRAIN),
    # The same model with each token routed to its nearest centroid instead of balanced top-W clusters
    # (docs/algorithm.md#13-membership).
    "nearest": (dataclasses.replace(SMALL, membership="nearest"), SMALL_TRAIN),
}
