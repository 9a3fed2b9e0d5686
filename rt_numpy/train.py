"""Training loop, held-out evaluation and checkpoints for the language model.

One training step (:func:`train_step`): a batch of random windows from the
training split, the loss and its gradient by autograd (cross-entropy plus the
routing layers' commitment losses), global-norm clipping, AdamW with warm-up and
cosine decay, then the k-means update of every routing layer from the statistics
of that same forward pass (docs/algorithm.md#16-centroid-update: centroids as they were
at the start of the step, updated after it).

Checkpoints are two files written atomically (a temporary file, then a rename):
``NAME.npz`` with every array (loaded with ``allow_pickle=False``) and
``NAME.json`` with the model and training configs, the step, the random
generator's state and the sha256 of the ``.npz``.  Resuming gives bitwise the
same parameters as a run that was never interrupted.
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

CHECKPOINT_VERSION = 1


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
    in order (:func:`rt_numpy.data.eval_batches`), at most ``max_batches``.
    """
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
def _flatten(params, opt_state, kmeans_states):
    """Every array by its checkpoint name, as a host (NumPy) array: GPU arrays are copied back."""
    params, opt_state, kmeans_states = backend.to_numpy((params, opt_state, kmeans_states))
    arrays = {f"params/{k}": v for k, v in params.items()}
    arrays.update({f"opt/m/{k}": v for k, v in opt_state["m"].items()})
    arrays.update({f"opt/v/{k}": v for k, v in opt_state["v"].items()})
    for layer, state in kmeans_states.items():
        arrays.update({f"kmeans/{layer}/{k}": v for k, v in state.items()})
    return arrays


def _atomic_write(path, payload: bytes):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path, *, params, opt_state, kmeans_states, step, rng, cfg, tcfg, history=None):
    """Write ``path.npz`` and ``path.json`` atomically (``path`` without extension).

    Nothing is overwritten until both files are complete: each is written to a
    temporary name and renamed.  The JSON records the sha256 of the ``.npz``.
    """
    buffer = io.BytesIO()
    np.savez(buffer, **_flatten(params, opt_state, kmeans_states))
    payload = buffer.getvalue()
    meta = {"version": CHECKPOINT_VERSION, "model": cfg.to_dict(), "train": tcfg.to_dict(), "step": int(step),
            "opt_step": int(opt_state["step"]), "rng": rng.bit_generator.state,
            "npz_sha256": hashlib.sha256(payload).hexdigest(), "history": history or []}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _atomic_write(f"{path}.npz", payload)
    _atomic_write(f"{path}.json", json.dumps(meta, indent=1).encode())


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or does not fit the expected model."""


def load_checkpoint(path, *, expect_model=None):
    """Read a checkpoint written by :func:`save_checkpoint`.

    Returns a dict with ``params``, ``opt_state``, ``kmeans_states``, ``step``,
    ``rng`` (a restored ``numpy.random.Generator``), ``cfg``, ``tcfg`` and
    ``history``.  Raises :class:`CheckpointError` naming the file and the problem
    for a missing, truncated, corrupt or mismatched checkpoint.
    """
    path = str(path)
    for suffix in (".npz", ".json"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
    try:
        with open(f"{path}.json", "rb") as f:
            meta = json.loads(f.read().decode())
        with open(f"{path}.npz", "rb") as f:
            payload = f.read()
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {path!r}: missing file {e.filename}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path!r}: {path}.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path!r}: unknown format version {meta.get('version')!r}"
                              if isinstance(meta, dict) else f"checkpoint {path!r}: JSON is not an object")
    digest = hashlib.sha256(payload).hexdigest()
    if digest != meta.get("npz_sha256"):
        raise CheckpointError(f"checkpoint {path!r}: {path}.npz has sha256 {digest[:12]}..., the JSON expects "
                              f"{str(meta.get('npz_sha256'))[:12]}... (truncated, corrupt or from another save)")
    try:
        cfg = model.Config.from_dict(meta["model"])
        tcfg = TrainConfig(**meta["train"])
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path!r}: cannot be read ({type(e).__name__}: {e})") from None
    if expect_model is not None and expect_model != cfg:
        diff = {k: (v, getattr(cfg, k)) for k, v in expect_model.to_dict().items() if getattr(cfg, k) != v}
        raise CheckpointError(f"checkpoint {path!r} holds another model: (expected, found) {diff}")
    params = {k[len("params/"):]: v for k, v in arrays.items() if k.startswith("params/")}
    expected = model.param_shapes(cfg)
    if set(params) != set(expected) or any(params[k].shape != s for k, s in expected.items()):
        raise CheckpointError(f"checkpoint {path!r}: parameters do not match its config")
    opt_state = {"step": int(meta["opt_step"]),
                 "m": {k[len("opt/m/"):]: v for k, v in arrays.items() if k.startswith("opt/m/")},
                 "v": {k[len("opt/v/"):]: v for k, v in arrays.items() if k.startswith("opt/v/")}}
    kmeans_states = {}
    for key, value in arrays.items():
        if key.startswith("kmeans/"):
            _, layer, name = key.split("/")
            kmeans_states.setdefault(layer, {})[name] = value
    rng = np.random.default_rng()
    try:
        rng.bit_generator.state = meta["rng"]
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: bad random generator state ({e})") from None
    return {"params": params, "opt_state": opt_state, "kmeans_states": kmeans_states, "step": int(meta["step"]),
            "rng": rng, "cfg": cfg, "tcfg": tcfg, "history": meta.get("history", [])}


# --------------------------------------------------------------------------- the loop
def train(cfg, tcfg, *, out_dir=None, resume=None, stop_at=None, progress=True, impl="auto", corpus=None,
          log=print, device="cpu"):
    """Train from scratch (or resume) and return the final state and history.

    Parameters
    ----------
    cfg : rt_numpy.model.Config
    tcfg : TrainConfig
    out_dir : str, optional
        Where ``checkpoint.npz/.json`` (written at every evaluation and at the
        end) and ``loss.png`` go; None writes nothing.
    resume : str, optional
        A checkpoint to continue from; its configs must equal ``cfg`` and ``tcfg``.
    stop_at : int, optional
        Stop after this many steps (to test resuming); the schedule still
        assumes ``tcfg.steps``.
    progress : bool
        Show a tqdm progress bar with loss and tokens/s.
    corpus : dict of uint8 arrays, optional
        ``train`` / ``val`` / ``test`` splits; default: ``tcfg.corpus`` loaded
        and split 90/5/5.
    device : {"cpu", "gpu"}
        Where the parameters, optimiser and k-means state live and the steps
        run (``"gpu"``: CuPy arrays, :func:`rt_numpy.backend.to_device`).  The
        same loop either way: batches are drawn on the host and copied over;
        checkpoints always hold host arrays, so a GPU run resumes on a CPU.

    Returns
    -------
    dict
        ``params``, ``opt_state``, ``kmeans_states``, ``step``, ``history``
        (one dict per logged step), ``val`` (the last evaluation), ``sha256``
        of the corpus, ``checkpoint`` (its path or None).
    """
    from tqdm.auto import tqdm

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
    val = None
    start = time.perf_counter()
    bar = tqdm(total=last, initial=step, disable=not progress, desc="train", unit="step")
    tokens = 0
    while step < last:
        x, y = data.random_batches(corpus["train"], tcfg.batch_size, cfg.seq_len, rng)
        params, opt_state, kmeans_states, metrics = train_step(params, opt_state, kmeans_states, x, y, cfg, tcfg,
                                                               step, rng, impl)
        step += 1
        tokens += x.size
        elapsed = time.perf_counter() - start
        metrics.update(step=step, tokens_per_s=tokens / max(elapsed, 1e-9))
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['cross_entropy']:.3f}", tok_s=f"{metrics['tokens_per_s']:,.0f}")
        out_of_time = tcfg.time_limit > 0 and elapsed > tcfg.time_limit
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == last or out_of_time:
            val = evaluate(params, kmeans_states, cfg, corpus["val"], batch_size=tcfg.batch_size,
                           max_batches=tcfg.eval_batches, impl=impl)
            metrics.update(val_bits_per_byte=val["bits_per_byte"], val_cross_entropy=val["cross_entropy"])
            bar.write(f"step {step}: train loss {metrics['cross_entropy']:.3f} nats, "
                      f"val {val['bits_per_byte']:.3f} bits/byte, {metrics['tokens_per_s']:,.0f} tokens/s")
            if checkpoint:
                save_checkpoint(checkpoint, params=params, opt_state=opt_state, kmeans_states=kmeans_states,
                                step=step, rng=rng, cfg=cfg, tcfg=tcfg, history=history + [metrics])
        history.append(metrics)
        if out_of_time:
            log(f"time limit of {tcfg.time_limit:.0f} s reached after {step} steps")
            break
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
PRESETS = {
    # CI-sized: trains in a few seconds.
    "tiny": (model.Config(seq_len=64, width=32, n_layers=2, num_heads=4, n_route_heads=2, n_route_layers=1,
                          num_clusters=2, window_size=32, block_size=32),
             TrainConfig(steps=30, batch_size=4, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0,
                         eval_batches=2)),
    # The README demo: a few minutes on a 2-core laptop.
    "small": (model.Config(seq_len=256, width=128, n_layers=4, num_heads=4, n_route_heads=2, n_route_layers=2,
                           num_clusters=4, window_size=64, block_size=64),
              TrainConfig(steps=1500, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=50, eval_every=250,
                          eval_batches=16, time_limit=540.0)),
}
