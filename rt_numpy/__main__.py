"""Command line: ``python -m rt_numpy <command>`` (console script ``rt-numpy``); the commands:

* ``demo`` - the main job: train the ``small`` preset on the default corpus
  (text that ships with Python), report held-out bits per byte, print a sample
  continuing a held-out prompt and say where the loss plot is.
* ``train`` - train a preset (``tiny``, ``small``), optionally resuming.
* ``sample`` - generate text from a checkpoint.
* ``eval`` - held-out bits per byte of a checkpoint.
* ``kmeans-demo`` - online k-means alone, on vectors around hidden directions.
* ``certify`` - the causality certificate of a checkpoint (:mod:`rt_numpy.causality`).
* ``compare`` - the paper's comparison in miniature: the same model with routing,
  local, strided, LSH or dense attention, on text, recall and images (docs/results.md).

Model options
-------------
``--set NAME=VALUE`` (repeatable) changes one field of :class:`rt_numpy.model.Config`;
the value is read as the field's type (int, float, bool as ``true``/``false``,
str).  ``train`` and ``demo`` apply it to the preset.  ``eval`` and ``sample``
apply it to the checkpoint's config, to run the trained weights under another
attention (docs/algorithm.md#1-one-routing-head); a change is refused when the
weights no longer fit it (:func:`rt_numpy.model.param_shapes`, the k-means
state).  ``train --resume`` continues with the checkpoint's configs, whatever the
preset and flags say, and lists what it ignored.

Exit status
-----------
0 done; 1 ``certify`` found a leak or ``compare`` found unequal budgets; 2 bad
input (an option, a file, a missing optional package): one line
``rt_numpy <command>: error: <message>`` on stderr, no traceback (set
``RT_NUMPY_TRACEBACK=1`` to see one); 130 interrupted (Ctrl-C).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import os
import re
import sys
import textwrap
import time
import typing

import numpy as np

from rt_numpy import backend, data, kmeans, model, runtime, sample, train
from rt_numpy import cache as cache_lib

BAD_INPUT = (ValueError, TypeError, OSError, ImportError)
"""What the library raises for bad input (train.CheckpointError is a ValueError): reported in one line."""

PROMPT_LINES = 4  # the default prompt: the first lines of a held-out document
PROMPT_MAX_BYTES = 400
LONG_WHITESPACE = 24  # longer runs of spaces and newlines are shown as a count


# --------------------------------------------------------------------------- option types
# Each is an argparse ``type=``: a bad value stops the command before anything is loaded or trained,
# with argparse's message ``argument --NAME: ...`` and exit status 2.
def _integer(text, low):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
    return value


def positive_int(text):
    """An integer >= 1."""
    return _integer(text, 1)


def non_negative_int(text):
    """An integer >= 0."""
    return _integer(text, 0)


def _number(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def non_negative_float(text):
    """A finite number >= 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def top_p_value(text):
    """A number in (0, 1]: the nucleus of top-p sampling."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def decay_value(text):
    """A number in [0, 1): an EMA decay."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def non_empty_text(text):
    """A string of at least one character (a prompt: there is no start token)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (the model needs at least one byte to continue)")
    return text


def _field_types(config):
    """The Python type of each field of the dataclass ``config``, ``(type, None allowed)`` by name."""
    types = {}
    for name, hint in typing.get_type_hints(config).items():
        options = typing.get_args(hint) or (hint,)  # (int, NoneType) for ``int | None``
        types[name] = (next(t for t in options if t is not type(None)), type(None) in options)
    return types


def assignment(text, config=model.Config):
    """``NAME=VALUE`` of ``--set``: a field of ``config`` and its value read as the field's type.

    Returns ``(name, value)``.  ``none`` is None where the field's type allows it (``int | None``).
    """
    name, equals, raw = text.partition("=")
    name = name.strip()
    types = _field_types(config)
    if not equals:
        raise argparse.ArgumentTypeError(f"must be NAME=VALUE, got {text!r}")
    if name not in types:
        close = difflib.get_close_matches(name, types, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise argparse.ArgumentTypeError(f"unknown model option {name!r}{hint}; the options are "
                                         f"{', '.join(types)}")
    kind, allows_none = types[name]
    if allows_none and raw.lower() == "none":
        return name, None
    if kind is bool:
        if raw.lower() not in ("true", "false"):
            raise argparse.ArgumentTypeError(f"{name} must be true or false, got {raw!r}")
        return name, raw.lower() == "true"
    try:
        return name, kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must be {'an' if kind is int else 'a'} {kind.__name__}, "
                                         f"got {raw!r}") from None


# --------------------------------------------------------------------------- configs
TRAIN_FLAGS = ("steps", "batch_size", "lr", "min_lr", "seed", "corpus", "time_limit")


def _model_changes(args):
    """The ``--set`` assignments as a dict ``{field: value}``; a field set twice is an error."""
    changes = {}
    for name, value in getattr(args, "set", None) or []:
        if name in changes and changes[name] != value:
            raise ValueError(f"--set {name} is given twice: as {changes[name]!r} and as {value!r}")
        changes[name] = value
    return changes


def _asked_configs(args, cfg, tcfg):
    """``cfg`` and ``tcfg`` with ``--set`` and the training flags applied; both validated here."""
    changes = _model_changes(args)
    try:
        cfg = dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--set: {e}") from None
    flags = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    return cfg, dataclasses.replace(tcfg, **flags)


def _ignored_on_resume(asked, found):
    """The fields where the configs ``asked`` for differ from the checkpoint's ``found``: 'name=asked (found)'."""
    ignored = []
    for want, have in zip(asked, found):
        for name, value in want.to_dict().items():
            if getattr(have, name) != value:
                ignored.append(f"{name}={value!r} (checkpoint: {getattr(have, name)!r})")
    return ignored


def _used_states(cfg, kmeans_states):
    """The k-means states that ``cfg`` reads: those of its routing layers (none under another attention)."""
    return {name: kmeans_states[name] for name in model.routing_layers(cfg) if name in kmeans_states}


def _misfit(cfg, state):
    """Why the checkpoint's weights cannot run as ``cfg`` (the library's message), or None when they can."""
    try:
        model.check_params(state["params"], cfg)
        model.check_kmeans_states(_used_states(cfg, state["kmeans_states"]), cfg)
    except (TypeError, ValueError) as e:
        return str(e)
    return None


def _config_for_weights(state, changes):
    """The checkpoint's config with ``changes``, refused (naming the fields) when its weights do not fit."""
    try:
        cfg = dataclasses.replace(state["cfg"], **changes)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--set: {e}") from None
    reason = _misfit(cfg, state)
    if reason is None:
        return cfg
    culprits = []
    for name, value in changes.items():  # which changes are to blame on their own
        try:
            if _misfit(dataclasses.replace(state["cfg"], **{name: value}), state):
                culprits.append(name)
        except (TypeError, ValueError):
            pass  # invalid alone; valid only with the other changes
    named = ", ".join(f"{n}={changes[n]!r}" for n in culprits or changes)
    raise ValueError(f"--set {named} does not fit the checkpoint's weights ({reason}); only fields that keep "
                     f"every parameter's shape can change here (e.g. membership, window_size, look_back, "
                     f"self_attend, attention)")


def _load_for_inference(args):
    """The checkpoint of ``eval`` / ``sample``, with ``--set`` applied; returns ``(state, cfg, params, states)``."""
    state = train.load_checkpoint(args.checkpoint)
    changes = _model_changes(args)
    cfg = _config_for_weights(state, changes)
    if changes:
        described = ", ".join(f"{n} {getattr(state['cfg'], n)!r} -> {v!r}" if getattr(state["cfg"], n) != v
                              else f"{n} {v!r} (unchanged)" for n, v in changes.items())
        print(f"model: the checkpoint's weights with {described}")
    params, kmeans_states = backend.to_device((state["params"], _used_states(cfg, state["kmeans_states"])),
                                              args.device)
    return state, cfg, params, kmeans_states


# --------------------------------------------------------------------------- prompts and samples
def held_out_prompt(corpus):
    """The default prompt: the first ``PROMPT_LINES`` lines of the first whole document of the test split.

    A fixed choice, the same on every run, of text the model never trained on
    (:func:`rt_numpy.data.split`, :func:`rt_numpy.data.documents`).  Returns ``(text, description)``.
    """
    raw, _ = data.load_corpus(corpus)
    marker = data.DOCUMENT_MARKERS[corpus]
    docs = data.documents(data.split(raw)["test"], marker)
    whole = [d for d in docs if bytes(d[:len(marker)]) == marker] or docs  # docs[0] is the tail of a cut one
    lines = bytes(whole[0][:PROMPT_MAX_BYTES]).split(b"\n")[:PROMPT_LINES]
    text = data.decode(np.frombuffer(b"\n".join(lines) + b"\n", np.uint8))
    return text, f"the first {len(lines)} lines of a held-out document (test split)"


def readable(text):
    """``text`` for a terminal; returns ``(shown, n_collapsed)``.

    Control characters other than newline and tab are escaped (``\\x1b``), and a
    run of more than ``LONG_WHITESPACE`` spaces and newlines (an untrained model
    can sample hundreds) becomes ``[... 287 spaces, 2 newlines ...]``.
    """
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", lambda m: f"\\x{ord(m.group()):02x}", text)

    def count(match):
        run = match.group()
        parts = [f"{run.count(c)} {what}" for c, what in ((" ", "spaces"), ("\n", "newlines"), ("\t", "tabs"))
                 if c in run]
        return f"[... {', '.join(parts)} ...]" + ("\n" if "\n" in run else "")

    return re.subn(rf"[ \t\n]{{{LONG_WHITESPACE + 1},}}", count, text)


def _generate(args, seed, params, cfg, kmeans_states, prompt):
    """The new text after ``prompt``, drawn with the sampling options of ``args`` from ``seed``."""
    ids = data.encode(prompt)[None].astype(np.int64)  # (1, n0)
    cache = "auto" if args.cache is None else args.cache
    if cache == "auto" and not sample.cache_is_exact(cfg):
        print(f"sampling by full recompute: no exact key/value cache, because {cache_lib.inexact_reason(cfg)}",
              file=sys.stderr)
    out = sample.generate(params, cfg, kmeans_states, ids, args.n_new, rng=np.random.default_rng(seed),
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, impl=args.impl,
                          cache=cache)
    return data.decode(out[0, ids.shape[1]:])  # (n_new,) bytes -> text


def _print_sample(args, seed, prompt, where, continuation):
    """The prompt and its continuation, each under its own rule, with whitespace made readable."""
    shown_prompt, n_prompt = readable(prompt)
    shown, n_new = readable(continuation)
    print(f"sample: {args.n_new} bytes, temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}, "
          f"seed {seed}")
    print(f"---- prompt: {where} ".ljust(72, "-"))
    print(shown_prompt, end="" if shown_prompt.endswith("\n") else "\n")
    tail = "" if prompt.endswith("\n") else " (continues the prompt's last line)"
    print(f"---- continuation{tail} ".ljust(72, "-"))
    print(shown)
    print("-" * 72)
    if n_prompt + n_new:
        print(f"({n_prompt + n_new} runs of more than {LONG_WHITESPACE} spaces/newlines are shown as "
              f"[... N spaces ...])")


# --------------------------------------------------------------------------- commands
def cmd_train(args, demo=False):
    preset = args.preset or args.default_preset
    if args.resume:  # the checkpoint's configs win over the preset and the flags
        state = train.load_checkpoint(args.resume)
        base = train.PRESETS[args.preset] if args.preset else (state["cfg"], state["tcfg"])
        asked = _asked_configs(args, *base)
        cfg, tcfg = state["cfg"], state["tcfg"]
        ignored = _ignored_on_resume(asked, (cfg, tcfg))
        if ignored:
            print(f"rt_numpy {args.command}: resuming {args.resume} with its own configs; ignored: "
                  f"{', '.join(ignored)}", file=sys.stderr)
        print(f"resuming {args.resume} at step {state['step']} of {tcfg.steps}")
    else:
        cfg, tcfg = _asked_configs(args, *train.PRESETS[preset])
    out = args.out
    if out is None:  # next to the resumed checkpoint, or runs/PRESET
        out = os.path.dirname(os.path.abspath(args.resume)) if args.resume else f"runs/{preset}"
    train.check_out_dir(out or None)  # an unwritable --out fails now, not at the first checkpoint
    if demo:
        prompt, where = (args.prompt, "--prompt") if args.prompt is not None else held_out_prompt(tcfg.corpus)
    print(f"model: {cfg}")
    print(f"training: {tcfg}")
    result = train.train(cfg, tcfg, out_dir=out or None, resume=args.resume, impl=args.impl,
                         progress=not args.no_progress, device=args.device, compile_ahead=True)
    if result["sha256"]:
        print(f"corpus {tcfg.corpus!r}: sha256 {result['sha256']}")
    if result["val"] is not None:
        print(f"held-out (validation) after {result['step']} steps: {result['val']['bits_per_byte']:.3f} bits/byte")
    else:
        print(f"held-out (validation): not measured, no step was run (rt_numpy eval {args.resume} measures it)")
    if demo:
        raw, _ = data.load_corpus(tcfg.corpus)
        test = train.evaluate(result["params"], result["kmeans_states"], cfg, data.split(raw)["test"],
                              batch_size=tcfg.batch_size, max_batches=tcfg.eval_batches, impl=args.impl)
        print(f"held-out (test split): {test['bits_per_byte']:.3f} bits/byte")
        continuation = _generate(args, tcfg.seed, result["params"], cfg, result["kmeans_states"], prompt)
        _print_sample(args, tcfg.seed, prompt, where, continuation)
    if result["plot"]:
        print(f"loss plot: {os.path.abspath(result['plot'])}")
    if result["checkpoint"]:
        print(f"checkpoint: {os.path.abspath(result['checkpoint'])}.npz / .json")
    return 0


def cmd_sample(args):
    state, cfg, params, kmeans_states = _load_for_inference(args)
    if args.prompt is not None:
        prompt, where = args.prompt, "--prompt"
    else:
        prompt, where = held_out_prompt(state["tcfg"].corpus)
    continuation = _generate(args, args.seed, params, cfg, kmeans_states, prompt)
    if args.raw:
        print(prompt + continuation)
    else:
        _print_sample(args, args.seed, prompt, where, continuation)
    return 0


def cmd_eval(args):
    state, cfg, params, kmeans_states = _load_for_inference(args)
    tcfg = state["tcfg"]
    raw, sha = data.load_corpus(tcfg.corpus)
    splits = data.split(raw)
    for name in ("val", "test"):
        result = train.evaluate(params, kmeans_states, cfg, splits[name],
                                batch_size=tcfg.batch_size, max_batches=args.max_batches, impl=args.impl)
        print(f"{name}: {result['bits_per_byte']:.4f} bits/byte ({result['cross_entropy']:.4f} nats)")
    if args.per_document is not None:
        _print_documents(params, kmeans_states, cfg, splits["test"], tcfg, args.per_document, args.impl)
    print(f"corpus {tcfg.corpus!r} sha256 {sha}; checkpoint step {state['step']}")
    return 0


def _print_documents(params, kmeans_states, cfg, split, tcfg, n_shown, impl):
    """Bits per byte of every test document on its own (docs/algorithm.md#8-padding): a summary and the extremes."""
    docs = data.documents(split, data.DOCUMENT_MARKERS[tcfg.corpus])
    result = train.evaluate_documents(params, kmeans_states, cfg, docs, batch_size=tcfg.batch_size, impl=impl)
    scored = np.flatnonzero(result["bytes"] > 0)
    bits = result["bits_per_byte"][scored]
    print(f"test documents: {len(scored)} scored, {result['bytes'].sum()} bytes; "
          f"{result['mean_bits_per_byte']:.4f} bits/byte over all bytes, median document {np.median(bits):.4f}, "
          f"quartiles {np.quantile(bits, 0.25):.4f} .. {np.quantile(bits, 0.75):.4f}")
    order = scored[np.argsort(bits, kind="stable")]
    for label, picked in (("lowest", order[:n_shown]), ("highest", order[::-1][:n_shown])):
        for d in picked:
            title = data.decode(docs[d][:60]).split("\n")[0]
            print(f"  {label:7s} {result['bits_per_byte'][d]:7.4f} bits/byte  {result['bytes'][d]:7d} bytes  {title}")


def cmd_certify(args):
    from rt_numpy import causality

    state = train.load_checkpoint(args.checkpoint)
    cfg, tcfg = state["cfg"], state["tcfg"]
    raw, _ = data.load_corpus(tcfg.corpus)
    x, _ = next(data.eval_batches(data.split(raw)["val"], args.windows, cfg.seq_len))  # held-out windows

    def logits(ids):
        return np.asarray(model.forward(state["params"], ids, cfg, state["kmeans_states"], impl=args.impl)[0])

    cert = causality.certify(logits, x, rng=np.random.default_rng(args.seed), vocab_size=cfg.vocab_size,
                             n_positions=args.positions)
    print(f"checkpoint {args.checkpoint} (step {state['step']}), {len(x)} held-out windows of {cfg.seq_len} bytes")
    print(cert)
    return 0 if cert.passed else 1


def _clustered_points(rng, batch, heads, length, dim, centers):
    """Vectors scattered around ``centers`` (H, K, D): returns (B, H, T, D)."""
    H, K, D = centers.shape
    labels = rng.integers(0, K, size=(batch, heads, length))  # (B, H, T)
    heads_idx = np.arange(H)[None, :, None]
    return centers[heads_idx, labels] + 0.35 * rng.standard_normal((batch, heads, length, dim))  # (B, H, T, D)


def cmd_kmeans_demo(args):
    """Online k-means on a stream of batches; prints the loss and how many hidden directions were found."""
    rng = np.random.default_rng(args.seed)
    H, K, D, B, T = args.num_heads, args.num_clusters, args.dim, args.batch, args.length
    centers = kmeans.normalize(rng.standard_normal((H, K, D)), "l2")  # hidden directions (H, K, D)
    state = kmeans.init_state(H, K, D, rng=rng, norm=args.norm, dtype=np.float32)
    impl = backend.resolve_impl(args.impl)
    print(f"online k-means demo: H={H} K={K} D={D}, batches of B={B} x T={T}, norm={args.norm}, "
          f"ema_decay={args.ema_decay}, impl={impl}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        points = kmeans.normalize(_clustered_points(rng, B, H, T, D, centers).astype(np.float32), args.norm)
        loss = kmeans.commitment_loss(points, state["means"], commitment=1.0)
        state, stats = kmeans.kmeans_step(state, points, ema_decay=args.ema_decay, norm=args.norm, impl=impl)
        if step == 1 or step % max(1, args.steps // 10) == 0 or step == args.steps:
            used = int((stats["counts"][0] > 0).sum())
            print(f"step {step:5d}  mean squared distance to nearest centroid {float(loss):.4f}  "
                  f"clusters in use {used}/{H * K}")
    elapsed = time.perf_counter() - start
    found = kmeans.normalize(state["means"].astype(np.float64), "l2")  # (H, K, D)
    cos = np.einsum("hkd,hjd->hkj", centers, found).max(axis=-1)  # (H, K): best centroid per direction
    print(f"hidden directions recovered (cosine > 0.9): {int((cos > 0.9).sum())}/{H * K}; "
          f"median cosine {np.median(cos):.3f}")
    print(f"{args.steps} steps in {elapsed:.2f} s ({args.steps * B * T * H / elapsed:,.0f} points/s)")
    return 0


# --------------------------------------------------------------------------- the parser
def _field_list():
    return textwrap.fill(", ".join(f.name for f in dataclasses.fields(model.Config)), 78,
                         initial_indent="  ", subsequent_indent="  ")


TRAIN_EPILOG = """\
model options: --set NAME=VALUE (repeatable) changes a field of rt_numpy.model.Config
after the preset; VALUE is read as the field's type (int, float, true/false, str):
  python -m rt_numpy train --preset tiny --set membership=nearest --set num_clusters=4
With --resume the checkpoint's configs win: --preset, --set and the training flags
are ignored (a message lists what differs); --out defaults to the checkpoint's directory.
fields:
"""

INFERENCE_EPILOG = """\
model options: --set NAME=VALUE (repeatable) runs the checkpoint's weights under another
config; only fields that keep every parameter's shape and the k-means state can change
(membership, window_size, look_back, self_attend, attention, ...):
  python -m rt_numpy {name} runs/tiny/checkpoint --set membership=nearest --set window_size=16
fields:
"""


def training_arguments(p, preset):
    """The options of ``train`` and ``demo``: a preset, changes to it, and where the run goes."""
    p.add_argument("--preset", choices=sorted(train.PRESETS), help=f"default: {preset}")
    p.set_defaults(default_preset=preset)
    model_arguments(p)
    p.add_argument("--steps", type=positive_int, help="override the preset's number of steps")
    p.add_argument("--batch-size", dest="batch_size", type=positive_int)
    p.add_argument("--lr", type=non_negative_float, help="peak learning rate (must be >= the minimum, --min-lr)")
    p.add_argument("--min-lr", dest="min_lr", type=non_negative_float, help="learning rate at the end")
    p.add_argument("--seed", type=non_negative_int, help="of the initialisation, the batches and the sample")
    p.add_argument("--corpus", choices=data.CORPORA)
    p.add_argument("--time-limit", dest="time_limit", type=non_negative_float, help="seconds (0: none)")
    p.add_argument("--out", help="checkpoint and loss-plot directory (default: runs/PRESET, or the "
                                 "directory of --resume; '': write nothing)")
    p.add_argument("--resume", help="checkpoint to continue from (its configs win)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    device_arguments(p)


def model_arguments(p):
    p.add_argument("--set", action="append", type=assignment, metavar="NAME=VALUE",
                   help="change a model.Config field (repeatable; see below)")


def device_arguments(p):
    p.add_argument("--impl", choices=backend.IMPLS, default="auto")
    p.add_argument("--device", choices=backend.DEVICES, default="cpu",
                   help="gpu: CuPy arrays on an NVIDIA GPU (pip install 'rt_numpy[gpu]')")


def sampling_arguments(p, seed=True):
    """The options of ``sample`` (and of the demo's sample, which takes its seed from training)."""
    p.add_argument("--prompt", type=non_empty_text,
                   help=f"text to continue (default: the first {PROMPT_LINES} lines of a held-out document)")
    p.add_argument("--n-new", dest="n_new", type=non_negative_int, default=300,
                   help="bytes to generate (default 300)")
    p.add_argument("--temperature", type=non_negative_float, default=0.8, help="default 0.8; 0: greedy")
    p.add_argument("--top-k", dest="top_k", type=positive_int)
    p.add_argument("--top-p", dest="top_p", type=top_p_value, default=0.95,
                   help="in (0, 1] (default 0.95; 1: no nucleus filter)")
    if seed:
        p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                   help="the key/value cache (docs/algorithm.md#9-generation-and-the-keyvalue-cache); default: on "
                        "where it is exact (nearest membership or local heads only), off otherwise; --cache on a "
                        "model where it is not exact is an error that says why")


def build_parser():
    """Every command and its options."""
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="rt_numpy", description="rt_numpy: the Routing Transformer in NumPy",
                                     epilog="exit status: 0 done, 1 certify/compare found a problem, 2 bad input, "
                                            "130 interrupted", formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="the main job: train the small preset, report bits/byte, print a sample",
                       epilog=TRAIN_EPILOG + _field_list(), formatter_class=formatter)
    training_arguments(p, "small")
    sampling_arguments(p, seed=False)
    p.set_defaults(func=lambda a: cmd_train(a, demo=True))

    p = sub.add_parser("train", help="train a preset", epilog=TRAIN_EPILOG + _field_list(), formatter_class=formatter)
    training_arguments(p, "tiny")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (("sample", cmd_sample, "generate text from a checkpoint"),
                                 ("eval", cmd_eval, "held-out bits per byte of a checkpoint")):
        p = sub.add_parser(name, help=helptext, epilog=INFERENCE_EPILOG.format(name=name) + _field_list(),
                           formatter_class=formatter)
        p.add_argument("checkpoint", help="path of checkpoint (with or without .npz/.json)")
        model_arguments(p)
        device_arguments(p)
        if name == "sample":
            sampling_arguments(p)
            p.add_argument("--raw", action="store_true", help="print prompt and continuation as they are")
        else:
            p.add_argument("--max-batches", dest="max_batches", type=positive_int, default=None)
            p.add_argument("--per-document", dest="per_document", type=non_negative_int, nargs="?", const=5,
                           default=None, metavar="N", help="also score every test document on its own (padded "
                                                           "batches) and show the N lowest and highest (default 5)")
        p.set_defaults(func=func)

    p = sub.add_parser("certify", help="does a checkpoint's output at i depend on bytes after i? (exit 1 if so)")
    p.add_argument("checkpoint", help="path of checkpoint (with or without .npz/.json)")
    p.add_argument("--windows", type=positive_int, default=4, help="held-out windows to test")
    p.add_argument("--positions", type=positive_int, default=32, help="positions i tested in each window")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--impl", choices=backend.IMPLS, default="auto")
    p.set_defaults(func=cmd_certify)

    p = sub.add_parser("kmeans-demo", help="online k-means on clustered vectors")
    p.add_argument("--steps", type=positive_int, default=300)
    p.add_argument("--num-heads", "--heads", dest="num_heads", type=positive_int, default=4)
    p.add_argument("--num-clusters", "--clusters", dest="num_clusters", type=positive_int, default=16)
    p.add_argument("--dim", type=positive_int, default=64)
    p.add_argument("--batch", type=positive_int, default=4)
    p.add_argument("--length", type=positive_int, default=1024)
    p.add_argument("--ema-decay", dest="ema_decay", type=decay_value, default=0.99)
    p.add_argument("--norm", choices=kmeans.NORMS, default="ln")
    p.add_argument("--impl", choices=backend.IMPLS, default="auto")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=cmd_kmeans_demo)

    from rt_numpy import compare

    p = sub.add_parser("compare", help="routing against local, strided, LSH and dense attention (docs/results.md)")
    compare.add_arguments(p)
    p.set_defaults(func=compare.run_from_args)
    return parser


def _interrupted(prog, error):
    """The line printed on Ctrl-C; ``train.Interrupted`` carries the step and the checkpoint it saved."""
    step, checkpoint = getattr(error, "step", None), getattr(error, "checkpoint", None)
    where = f" at step {step}" if step is not None else ""
    saved = f"checkpoint saved: {os.path.abspath(checkpoint)}" if checkpoint else "no checkpoint saved"
    return f"{prog}: interrupted{where}; {saved}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # a malformed option exits here with status 2
    if getattr(args, "device", "cpu") == "gpu":
        try:
            backend.require_gpu()
        except RuntimeError as e:
            parser.error(str(e))  # exit status 2, with the reason
    runtime.configure_process()  # this process is ours (docs/design.md#process-wide-settings)
    prog = f"rt_numpy {args.command}"
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        print(_interrupted(prog, e), file=sys.stderr)
        return 130
    except BAD_INPUT as e:
        if os.environ.get("RT_NUMPY_TRACEBACK"):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
