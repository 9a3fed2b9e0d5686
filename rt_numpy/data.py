"""Data for a byte-level language model: tokeniser, corpora, batching, a recall task.

The tokeniser is the identity on UTF-8 bytes, so the vocabulary is the 256 byte
values (``VOCAB_SIZE``) and no file or download is needed to tokenise.  Two corpora:

- ``"python"`` (the default, always available): text that ships with Python itself,
  the pydoc documentation topics followed by the standard library's ``.py`` sources,
  read in a fixed order so that its sha256 is reproducible on a given Python version.
- ``"enwik"`` (optional): the shortened English Wikipedia XML dump that the gensim
  wheel ships as test data (``pip install gensim``).

Batching follows nanoGPT: training windows are sampled uniformly at random with an
explicit ``np.random.Generator``; evaluation walks the held-out split in
non-overlapping windows.  ``recall_task`` builds synthetic associative-recall
sequences whose answers lie further back than a local attention window, the setting
in which content-based routing should beat local attention.

Every public function checks its arguments first (:mod:`rt_numpy._checks`):
token arrays must be 1-D integer arrays, sizes positive integers, and a
request whose arrays would not fit in the machine's memory is refused before
anything is allocated.

Notes
-----
Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers",
TACL 2021, Section 5 (language modelling benchmarks, reported in bits per byte/dim
for byte-level data).
"""
from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import math
import numbers
import os
import sysconfig
from pathlib import Path
from typing import Iterator

import numpy as np

from rt_numpy import _checks

VOCAB_SIZE = 256
"""Number of distinct tokens: one per byte value."""

DEFAULT_MAX_BYTES = 8_000_000
"""Default cap on the size of the ``"python"`` corpus (bytes)."""

CORPORA = ("python", "enwik")
DOCUMENT_MARKERS = {"python": b"# file: ", "enwik": b"<page>"}
"""The bytes each document of a corpus starts with (a source file, a Wikipedia page)."""

# Directories skipped while walking the standard library: installed third-party
# packages, test suites (their data files are machine-generated noise), bytecode, and
# pydoc_data, whose topics.py holds the same prose that the corpus already starts with.
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                            "__pycache__", "pydoc_data", "encodings"})

ENWIK_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
"""Name of the Wikipedia dump inside ``gensim/test/test_data`` (checked in gensim 4.4.0)."""


# --------------------------------------------------------------------------- checks
def _tokens(name, data):
    """A 1-D integer array of token ids (a list of ints is taken as one); returned as an ndarray."""
    if not hasattr(data, "dtype"):
        if not isinstance(data, (list, tuple, bytes)):
            raise TypeError(f"{name} must be a 1-D integer array of token ids, got {type(data).__name__}")
        data = np.frombuffer(data, np.uint8) if isinstance(data, bytes) else np.asarray(data)
    data = np.asarray(data)
    if data.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of token ids, got dtype {data.dtype}")
    if data.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {data.shape}")
    return data


def _byte_range(name, data):
    """Every id of ``data`` is a byte, in [0, 256): what a cast to uint8 keeps unchanged."""
    if data.size and (int(data.min()) < 0 or int(data.max()) >= VOCAB_SIZE):
        raise ValueError(f"{name} must hold byte values in [0, {VOCAB_SIZE}), got values in "
                         f"[{int(data.min())}, {int(data.max())}]")


def _sizes(**sizes):
    """Positive integer sizes (batch_size=..., seq_len=...), returned as ints in the given order."""
    return tuple(_checks.integer(name, value, 1) for name, value in sizes.items())


# --------------------------------------------------------------------------- tokeniser
def encode(text: str) -> np.ndarray:
    """Encode text as its UTF-8 bytes.

    Parameters
    ----------
    text : str

    Returns
    -------
    ids : ndarray of uint8, shape (N,)
        N is the number of UTF-8 bytes, which exceeds ``len(text)`` for non-ASCII text.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()  # (N,)


def decode(ids) -> str:
    """Decode byte ids back to text; invalid UTF-8 becomes U+FFFD.

    Parameters
    ----------
    ids : array_like of int, shape (N,)
        Values in ``[0, 256)``.  A model's samples may cut a multi-byte character
        in half, hence ``errors="replace"`` rather than an exception.

    Returns
    -------
    text : str
    """
    ids = _tokens("ids", ids)
    _byte_range("ids", ids)
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- corpora
def _stdlib_sources(root: Path) -> list[str]:
    """Relative POSIX paths of the standard library's ``.py`` files, sorted."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):  # followlinks=False: no cycles
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                paths.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(paths)


@functools.lru_cache(maxsize=4)
def python_corpus(max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[bytes, str]:
    """The default corpus: documentation and source code that ship with Python.

    The text is built from records, concatenated in this fixed order:

    1. every pydoc documentation topic (``pydoc_data.topics.topics``, the prose of the
       Python Language Reference), sorted by key, each as ``"{key}\\n{text}\\n\\n"``;
    2. every ``.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by relative
       POSIX path, each as ``"# file: {path}\\n{source}\\n"``.  Directories named
       ``site-packages``, ``dist-packages``, ``test``, ``tests``, ``idle_test``,
       ``__pycache__``, ``pydoc_data`` and ``encodings`` (1.4 MB of generated
       character-map tables, not text to learn) are skipped, and so is any file that is not
       valid UTF-8.

    Records are appended whole until the next one would exceed ``max_bytes``; the
    corpus stops there.  Prose comes first so that a small ``max_bytes`` still gives
    mostly English, and so that the contiguous train split holds all of it.

    Parameters
    ----------
    max_bytes : int, optional
        Upper bound on the corpus length in bytes (default 8 MB).

    Returns
    -------
    data : bytes
        UTF-8 text, ``len(data) <= max_bytes``.
    sha256 : str
        Hex digest of ``data``: identical across runs on the same Python version.

    Notes
    -----
    Nothing is written to disk; results are kept in memory (``functools.lru_cache``).
    """
    _checks.integer("max_bytes", max_bytes, 1)
    from pydoc_data.topics import topics

    def records():
        for key in sorted(topics):
            yield f"{key}\n{topics[key]}\n\n".encode("utf-8")
        root = Path(sysconfig.get_paths()["stdlib"])
        for rel in _stdlib_sources(root):
            source = (root / rel).read_bytes()
            try:
                source.decode("utf-8")
            except UnicodeDecodeError:
                continue
            yield f"# file: {rel}\n".encode("utf-8") + source + b"\n"

    parts, total = [], 0
    for record in records():
        if total + len(record) > max_bytes:
            break
        parts.append(record)
        total += len(record)
    data = b"".join(parts)
    return data, hashlib.sha256(data).hexdigest()


def _gensim_test_data() -> Path:
    """Directory ``gensim/test/test_data`` of the installed gensim, found without importing it."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise ImportError("the 'enwik' corpus is the Wikipedia dump shipped with gensim's test data; "
                          "install it with: pip install gensim")
    return Path(spec.origin).parent / "test" / "test_data"


def enwik_corpus(path: str | os.PathLike | None = None, max_bytes: int | None = None) -> tuple[bytes, str]:
    """English Wikipedia XML (about 6.1 MB) from the test data of the gensim wheel.

    The file is ``gensim/test/test_data/`` + ``ENWIK_FILE``, a bz2-compressed,
    shortened dump of the first English Wikipedia articles (MediaWiki XML: markup and
    English prose, like enwik8).  If that exact name is missing (another gensim
    version), the first ``enwiki-latest-pages-articles*.bz2`` in sorted order is used.
    gensim is located with ``importlib.util.find_spec`` and never imported.

    Parameters
    ----------
    path : path-like, optional
        Read this ``.bz2`` file instead of looking inside gensim.
    max_bytes : int, optional
        Keep only the first ``max_bytes`` bytes of the decompressed text.

    Returns
    -------
    data : bytes
    sha256 : str
        Hex digest of ``data`` (gensim 4.4.0, whole file: ``34c1c630...20fa4``,
        6,089,746 bytes).

    Raises
    ------
    ImportError
        If gensim is not installed and no ``path`` is given.
    """
    if max_bytes is not None:
        _checks.integer("max_bytes", max_bytes, 1)
    if path is not None and not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or a path, got {type(path).__name__}")
    if path is None:
        test_data = _gensim_test_data()
        path = test_data / ENWIK_FILE
        if not path.exists():
            found = sorted(test_data.glob("enwiki-latest-pages-articles*.bz2"))
            if not found:
                raise FileNotFoundError(f"no enwiki-latest-pages-articles*.bz2 in {test_data}")
            path = found[0]
    if not Path(path).is_file():
        raise FileNotFoundError(f"path: no such file {str(path)!r}")
    data = bz2.decompress(Path(path).read_bytes())
    if max_bytes is not None:
        data = data[:max_bytes]
    return data, hashlib.sha256(data).hexdigest()


def load_corpus(name: str = "python", max_bytes: int | None = None) -> tuple[np.ndarray, str]:
    """Load a named corpus as byte ids.

    Parameters
    ----------
    name : {"python", "enwik"}
    max_bytes : int, optional
        Size cap; ``None`` means the corpus default (8 MB for "python", all of "enwik").

    Returns
    -------
    data : ndarray of uint8, shape (N,)
        Read-only view of the corpus bytes.
    sha256 : str
        Hex digest of the bytes, to record next to results.
    """
    if name == "python":
        raw, digest = python_corpus(DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
    elif name == "enwik":
        raw, digest = enwik_corpus(max_bytes=max_bytes)
    else:
        raise ValueError(f"name must be one of {CORPORA}, got {name!r}")
    return np.frombuffer(raw, dtype=np.uint8), digest  # (N,)


# --------------------------------------------------------------------------- batching
def split(data: np.ndarray, fractions=(0.9, 0.05, 0.05)) -> dict[str, np.ndarray]:
    """Cut a token array into contiguous train / val / test pieces, in that order.

    No shuffling: a random split of a byte stream would put the neighbours of every
    held-out byte into the training set, so held-out text would not be unseen.

    Parameters
    ----------
    data : ndarray, shape (N,)
    fractions : sequence of 3 floats
        Non-negative, summing to 1, train fraction positive.

    Returns
    -------
    splits : dict
        ``{"train": data[:a], "val": data[a:b], "test": data[b:]}`` (views) with
        ``a = floor(N * f_train)`` and ``b = floor(N * (f_train + f_val))``.
    """
    data = _tokens("data", data)
    if not isinstance(fractions, (tuple, list)):
        raise TypeError(f"fractions must be a sequence of 3 numbers, got {fractions!r}")
    if not len(data):
        raise ValueError("data must not be empty: there is nothing to split")
    f = tuple(_checks.real(f"fractions[{i}]", v) for i, v in enumerate(fractions))
    if len(f) != 3 or min(f) < 0 or f[0] <= 0 or not math.isclose(sum(f), 1.0, abs_tol=1e-9):
        raise ValueError(f"fractions must be 3 non-negative numbers summing to 1 with a positive "
                         f"train fraction, got {tuple(fractions)!r}")
    n = len(data)
    a = int(n * f[0])
    b = min(n, int(n * (f[0] + f[1])))
    return {"train": data[:a], "val": data[a:b], "test": data[b:]}


def _check_windows(data, batch_size, seq_len):
    """Token data and window sizes; returns ``data, batch_size, seq_len`` checked."""
    data = _tokens("data", data)
    batch_size, seq_len = _sizes(batch_size=batch_size, seq_len=seq_len)
    if len(data) <= seq_len:
        raise ValueError(f"seq_len must be less than len(data) (a window needs seq_len + 1 bytes), "
                         f"got seq_len={seq_len} with len(data)={len(data)}")
    return data, batch_size, seq_len


def _window_memory(what, rows, batch_size, seq_len):
    """Refuse ``rows`` windows that do not fit in memory: each costs two int64 arrays of
    ``seq_len + 1`` (the indices and the ids)."""
    _checks.allocation(f"{what}(batch_size={batch_size}, seq_len={seq_len})", 16 * rows * (seq_len + 1))


def random_batches(data: np.ndarray, batch_size: int, seq_len: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One training batch of windows drawn uniformly from ``data``.

    Parameters
    ----------
    data : ndarray of int, shape (N,)
    batch_size, seq_len : int
        B and T; requires ``N > T``.
    rng : np.random.Generator
        Source of the window starts, uniform over ``[0, N - T - 1]``.

    Returns
    -------
    x : ndarray of int64, shape (B, T)
        Inputs ``data[s : s + T]``.
    y : ndarray of int64, shape (B, T)
        Next-byte targets ``data[s + 1 : s + T + 1]``, so ``y[:, :-1] == x[:, 1:]``.
    """
    data, batch_size, seq_len = _check_windows(data, batch_size, seq_len)
    _checks.generator("rng", rng)
    _window_memory("random_batches", batch_size, batch_size, seq_len)
    starts = rng.integers(0, len(data) - seq_len, size=batch_size)  # (B,)
    idx = starts[:, None] + np.arange(seq_len + 1)  # (B, 1) + (T+1,) -> (B, T+1)
    windows = np.asarray(data)[idx].astype(np.int64)  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]  # (B, T), (B, T)


def eval_batches(data: np.ndarray, batch_size: int,
                 seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Walk ``data`` in non-overlapping windows, for held-out evaluation.

    Window ``i`` has inputs ``data[i*T : (i+1)*T]`` and targets shifted by one, for
    ``i < n = (N - 1) // T``; so every target ``data[1 : n*T + 1]`` is scored exactly
    once and the last ``(N - 1) % T`` (< T) targets are left out.  Windows are
    grouped in order into batches of ``batch_size``; the last batch may be smaller.

    Parameters
    ----------
    data : ndarray of int, shape (N,)
    batch_size, seq_len : int
        B and T; requires ``N > T``.

    Yields
    ------
    x, y : ndarray of int64, shape (b, T), ``b <= B``
    """
    data, batch_size, seq_len = _check_windows(data, batch_size, seq_len)
    n_windows = (len(data) - 1) // seq_len
    _window_memory("eval_batches", min(batch_size, n_windows), batch_size, seq_len)
    offsets = np.arange(seq_len + 1)  # (T+1,)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * seq_len  # (b,)
        windows = np.asarray(data)[starts[:, None] + offsets].astype(np.int64)  # (b, T+1)
        yield windows[:, :-1], windows[:, 1:]


# --------------------------------------------------------------------------- documents and padding
def documents(data: np.ndarray, marker: bytes) -> list[np.ndarray]:
    """Cut a token array into documents, each starting at an occurrence of ``marker``.

    Parameters
    ----------
    data : ndarray of int, shape (N,)
    marker : bytes
        What a document starts with, e.g. ``DOCUMENT_MARKERS["python"]``.

    Returns
    -------
    list of ndarray
        Views of ``data``, in order, that concatenate back to it.  The bytes
        before the first marker (the tail of a document that a split cut) are
        the first piece, when there are any.
    """
    data = _tokens("data", data)
    _byte_range("data", data)
    if not isinstance(marker, bytes) or not marker:
        raise ValueError(f"marker must be non-empty bytes, got {marker!r}")
    raw = data.astype(np.uint8).tobytes()
    starts, at = [], raw.find(marker)
    while at >= 0:
        starts.append(at)
        at = raw.find(marker, at + len(marker))
    cuts = sorted({0, *starts, len(raw)})
    return [data[a:b] for a, b in zip(cuts[:-1], cuts[1:])]


def document_batches(docs: list[np.ndarray], batch_size: int,
                     seq_len: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Walk documents in windows that never cross a document boundary, right-padded to ``seq_len``.

    A document of n bytes has n - 1 targets (its first byte has no context).
    Window ``j`` of a document has inputs ``doc[j*T : j*T + T]`` and targets
    shifted by one, so that every target is scored once; its last window is
    short and padded on the right (docs/algorithm.md#8-padding).  Windows are
    batched in document order; the last batch may be smaller.

    Parameters
    ----------
    docs : list of ndarray of int, shape (n_d,)
    batch_size, seq_len : int
        B and T.

    Yields
    ------
    x, y : ndarray of int64, shape (b, T)
        Inputs and targets, 0 at padding.
    key_mask : ndarray of bool, shape (b, T)
        True at real positions (those with a target).
    doc : ndarray of int64, shape (b,)
        The index in ``docs`` of each window's document.
    """
    batch_size, seq_len = _sizes(batch_size=batch_size, seq_len=seq_len)
    if not isinstance(docs, (list, tuple)):
        raise TypeError(f"docs must be a list of 1-D token arrays, got {type(docs).__name__}")
    docs = [_tokens(f"docs[{d}]", text) for d, text in enumerate(docs)]
    windows = [(d, start) for d, text in enumerate(docs) for start in range(0, len(text) - 1, seq_len)]
    _checks.allocation(f"document_batches(batch_size={batch_size}, seq_len={seq_len})",
                       17 * min(batch_size, len(windows)) * seq_len)  # x, y int64 and the bool mask
    for first in range(0, len(windows), batch_size):
        group = windows[first:first + batch_size]
        x = np.zeros((len(group), seq_len), np.int64)  # (b, T)
        y = np.zeros((len(group), seq_len), np.int64)
        key_mask = np.zeros((len(group), seq_len), bool)
        for row, (d, start) in enumerate(group):
            piece = np.asarray(docs[d][start:start + seq_len + 1], np.int64)  # (n + 1,), n <= T targets
            n = len(piece) - 1
            x[row, :n], y[row, :n], key_mask[row, :n] = piece[:-1], piece[1:], True
        yield x, y, key_mask, np.array([d for d, _ in group], np.int64)


def bits_per_byte(mean_nll_nats):
    """Convert a mean negative log-likelihood per byte from nats to bits: ``nats / ln 2``.

    ``mean_nll_nats`` is a number or a float array (one value per document, say).
    """
    if not (isinstance(mean_nll_nats, numbers.Real) and not isinstance(mean_nll_nats, bool)) and \
            getattr(mean_nll_nats, "dtype", np.dtype(object)).kind != "f":
        raise TypeError(f"mean_nll_nats must be a number or a float array, got {type(mean_nll_nats).__name__}")
    return mean_nll_nats / math.log(2)


# --------------------------------------------------------------------------- recall task
KEY_ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
VALUE_ALPHABET = b"0123456789"
FILLER_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def recall_task(batch_size: int, seq_len: int, *, rng: np.random.Generator, n_pairs: int = 4,
                key_len: int = 2, value_len: int = 1,
                distance: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Associative recall: look a key up in pairs seen ``distance`` or more bytes ago.

    Each row is a byte string ``s`` of length ``T + 1`` (``x = s[:-1]``, ``y = s[1:]``)
    with three parts; a record is a key (``key_len`` bytes from ``KEY_ALPHABET``,
    lower-case letters) followed by its value (``value_len`` bytes from
    ``VALUE_ALPHABET``, digits), ``R = key_len + value_len`` bytes::

        s = [pair_1 ... pair_P] [filler ...] [query_1 ... query_P]

    - ``s[0 : P*R]``: the ``P = n_pairs`` records, with distinct keys and random values;
    - filler: random bytes from ``FILLER_ALPHABET`` (upper-case letters, disjoint from
      keys and values) up to position ``Q = T + 1 - P*R``;
    - ``s[Q : T+1]``: the same ``P`` records again in a random order, the queries.

    A query record starts at least ``distance`` positions after the earlier record with
    the same key, and since both records have the same layout, each value byte of a
    query lies the same number of positions after its earlier copy.  Predicting the
    value bytes of a query (the positions where ``mask`` is True) needs the earlier
    record; everything else is either random or copies known structure.

    Parameters
    ----------
    batch_size, seq_len : int
        B and T.
    rng : np.random.Generator
    n_pairs, key_len, value_len : int
        P, key length and value length; needs ``26 ** key_len >= n_pairs``.
    distance : int
        Minimum offset from a record to its query.  Requires
        ``seq_len >= distance + (2 * n_pairs - 1) * R - 1``, the case of the last pair
        queried first.

    Returns
    -------
    x, y : ndarray of int64, shape (B, T)
        Inputs and next-byte targets.
    mask : ndarray of bool, shape (B, T)
        True exactly where ``y`` is a value byte of a query: ``P * value_len`` per row.

    Notes
    -----
    With ``distance`` several times the local attention window, local heads can't see
    the answer while routing heads, which cluster the query key with its earlier
    occurrence (Roy et al. 2021, Section 4), can.
    """
    batch_size, seq_len, n_pairs, key_len, value_len, distance = _sizes(
        batch_size=batch_size, seq_len=seq_len, n_pairs=n_pairs, key_len=key_len, value_len=value_len,
        distance=distance)
    _checks.generator("rng", rng)
    n_keys = len(KEY_ALPHABET) ** key_len
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs must be at most 26 ** key_len = {n_keys} (keys are distinct), "
                         f"got n_pairs={n_pairs}")
    R = key_len + value_len
    P = n_pairs
    min_len = distance + (2 * P - 1) * R - 1
    if seq_len < min_len:
        raise ValueError(f"distance={distance} is too large for seq_len={seq_len}: with n_pairs={P} "
                         f"and records of {R} bytes, seq_len must be at least {min_len}")
    _checks.allocation(f"recall_task(batch_size={batch_size}, seq_len={seq_len})",
                       25 * batch_size * (seq_len + 1))  # the draws and s (int64), the mask (bool)
    keys_ab = np.frombuffer(KEY_ALPHABET, np.uint8)
    values_ab = np.frombuffer(VALUE_ALPHABET, np.uint8)
    filler_ab = np.frombuffer(FILLER_ALPHABET, np.uint8)
    Q = seq_len + 1 - P * R  # first position of the queries

    s = filler_ab[rng.integers(0, len(filler_ab), size=(batch_size, seq_len + 1))]  # (B, T+1)
    mask = np.zeros((batch_size, seq_len + 1), dtype=bool)  # over s, shifted to y at the end
    place = 26 ** np.arange(key_len - 1, -1, -1)  # (key_len,) base-26 digit weights
    for b in range(batch_size):
        key_ids = rng.choice(n_keys, size=P, replace=False)  # (P,) distinct keys
        keys = keys_ab[(key_ids[:, None] // place) % 26]  # (P, key_len)
        values = values_ab[rng.integers(0, len(values_ab), size=(P, value_len))]  # (P, value_len)
        records = np.concatenate([keys, values], axis=1)  # (P, R)
        s[b, :P * R] = records.reshape(-1)
        order = rng.permutation(P)  # which pair each query slot asks for
        s[b, Q:] = records[order].reshape(-1)
        for slot in range(P):
            start = Q + slot * R + key_len
            mask[b, start:start + value_len] = True
    s = s.astype(np.int64)
    return s[:, :-1], s[:, 1:], mask[:, 1:]  # (B, T) each


def recall_accuracy(logits_or_pred: np.ndarray, y: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of masked positions where the prediction equals the target.

    Parameters
    ----------
    logits_or_pred : ndarray, shape (B, T, V) or (B, T)
        Logits (argmax over the last axis is taken) or predicted byte ids.
    y : ndarray of int, shape (B, T)
    mask : ndarray of bool, shape (B, T)
        Positions to score, as returned by ``recall_task``.

    Returns
    -------
    accuracy : float in [0, 1]
    """
    if not hasattr(logits_or_pred, "shape"):
        raise TypeError(f"logits_or_pred must be an array, got {type(logits_or_pred).__name__}")
    if getattr(getattr(mask, "dtype", None), "kind", None) != "b":
        raise TypeError(f"mask must be a bool array, got {getattr(mask, 'dtype', type(mask).__name__)}")
    pred = np.asarray(logits_or_pred)
    if pred.ndim == 3:
        pred = pred.argmax(axis=-1)  # (B, T, V) -> (B, T)
    y, mask = np.asarray(y), np.asarray(mask, dtype=bool)
    if pred.shape != y.shape or mask.shape != y.shape:
        raise ValueError(f"logits_or_pred must have shape (B, T, V) or (B, T) matching y and mask, got "
                         f"{np.shape(logits_or_pred)} with y {y.shape} and mask {mask.shape}")
    if not mask.any():
        raise ValueError("mask must mark at least one position, got an all-False mask")
    return float((pred[mask] == y[mask]).mean())


# --------------------------------------------------------------------------- images
IMAGE_LEVELS = 17
"""Intensity levels of :func:`digit_images`: the 0..16 of scikit-learn's digits."""

IMAGE_START = IMAGE_LEVELS
"""The token before an image's first pixel (an id no pixel has)."""


def digit_images(n_images: int, *, split: str, rng: np.random.Generator, tiles=(4, 4),
                 n_train_digits: int = 1500) -> tuple[np.ndarray, str]:
    """Images of a grid of handwritten digits, raster-scanned, for a bits/dim task.

    The 1797 8x8 digits of scikit-learn (``sklearn.datasets.load_digits``, shipped in
    its wheel: the UCI "optical recognition of handwritten digits" test set, 17 grey
    levels) are cut in two by index: the first ``n_train_digits`` for ``split="train"``,
    the rest for ``split="held_out"``, so that no held-out image shares a digit with a
    training image.  Each image is ``rows x cols`` digits drawn with ``rng``, placed on
    a grid of (8 rows) x (8 cols) pixels and read row by row.

    Parameters
    ----------
    n_images : int
    split : {"train", "held_out"}
    rng : np.random.Generator
        Which digits fill each image.
    tiles : tuple (rows, cols)
        Digits down and across: (4, 4) gives 32 x 32 = 1024 pixels, (3, 6) 24 x 48 = 1152.
    n_train_digits : int
        Where the digits are cut, 1 <= n_train_digits < 1797.

    Returns
    -------
    pixels : ndarray of int64, shape (n_images, 64 rows cols)
        Intensities in ``[0, IMAGE_LEVELS)``.
    sha256 : str
        Hex digest of the whole digits array (uint8, 1797 x 64), the data's provenance.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "held_out"):
        raise ValueError(f"split must be 'train' or 'held_out', got {split!r}")
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    if (not isinstance(tiles, tuple) or len(tiles) != 2
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 1 for t in tiles)):
        raise ValueError(f"tiles must be a pair (rows, cols) of positive integers, got {tiles!r}")
    rows, cols = tiles
    _checks.generator("rng", rng)
    _checks.integer("n_train_digits", n_train_digits, 1)
    _checks.allocation(f"digit_images(n_images={n_images}, tiles={tiles})",
                       n_images * rows * cols * (8 + 10 * 64))  # digit picks (int64), pixels (uint8, int64 twice)
    digits = load_digits().images.astype(np.uint8)  # (1797, 8, 8), values 0..16
    if not 1 <= n_train_digits < len(digits):
        raise ValueError(f"n_train_digits must be in [1, {len(digits) - 1}], got {n_train_digits}")
    sha = hashlib.sha256(digits.tobytes()).hexdigest()
    pool = digits[:n_train_digits] if split == "train" else digits[n_train_digits:]
    picks = pool[rng.integers(0, len(pool), size=(n_images, rows, cols))]  # (N, rows, cols, 8, 8)
    grid = picks.transpose(0, 1, 3, 2, 4).reshape(n_images, 64 * rows * cols)  # (N, 8 rows, 8 cols) read by rows
    return grid.astype(np.int64), sha


def image_batch(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and targets of next-pixel prediction: x = [start, p_0 .. p_{T-2}], y = [p_0 .. p_{T-1}].

    pixels (B, T) -> x, y (B, T); every pixel is a target once, the first one after ``IMAGE_START``.
    """
    if getattr(pixels, "dtype", np.dtype(object)).kind not in "iu":
        raise TypeError(f"pixels must be an integer array (B, T), "
                        f"got {getattr(pixels, 'dtype', type(pixels).__name__)}")
    if pixels.ndim != 2 or 0 in pixels.shape:
        raise ValueError(f"pixels must have shape (B, T) with no empty axis, got {pixels.shape}")
    if int(pixels.min()) < 0 or int(pixels.max()) >= IMAGE_LEVELS:
        raise ValueError(f"pixels must lie in [0, IMAGE_LEVELS={IMAGE_LEVELS}), got values in "
                         f"[{int(pixels.min())}, {int(pixels.max())}]")
    pixels = np.asarray(pixels, dtype=np.int64)
    start = np.full((pixels.shape[0], 1), IMAGE_START, dtype=np.int64)
    return np.concatenate([start, pixels[:, :-1]], axis=1), pixels
