"""Tests for rt_numpy.data: tokeniser, corpora, splits, batching, the recall task."""
import bz2
import hashlib
import importlib.util
import math
import sys

import numpy as np
import pytest

from rt_numpy import data


# --------------------------------------------------------------------------- tokeniser
@pytest.mark.parametrize("text", ["", "hello, world\n", "naïve café — Grüße, 日本語, 🙂"])
def test_encode_decode_round_trip(text):
    ids = data.encode(text)
    assert ids.dtype == np.uint8 and ids.ndim == 1
    assert ids.tobytes() == text.encode("utf-8")
    assert len(ids) >= len(text)
    assert data.decode(ids) == text
    assert data.decode(ids.astype(np.int64)) == text


def test_decode_replaces_broken_utf8_and_rejects_bad_ids():
    ids = data.encode("é")[:1]  # half of a two-byte character
    assert data.decode(ids) == "\ufffd"
    with pytest.raises(ValueError, match="ids"):
        data.decode([65, 256])
    with pytest.raises(TypeError, match="text"):
        data.encode(b"bytes")
    assert data.VOCAB_SIZE == 256


# --------------------------------------------------------------------------- corpora
def test_python_corpus_is_deterministic_and_capped():
    raw, digest = data.python_corpus.__wrapped__()  # bypass the in-memory cache
    raw2, digest2 = data.python_corpus.__wrapped__()
    assert digest == digest2 == hashlib.sha256(raw).hexdigest()
    assert raw == raw2
    assert 1_000_000 < len(raw) <= data.DEFAULT_MAX_BYTES
    raw.decode("utf-8")  # valid UTF-8 throughout
    # pydoc prose first, then stdlib sources
    assert raw.startswith(b"assert\n")
    assert b"Assert statements are a convenient way" in raw
    assert raw.index(b"# file: ") > raw.index(b"Assert statements")
    headers = [line for line in raw.split(b"\n") if line.startswith(b"# file: ")]
    assert len(headers) > 100 and headers == sorted(headers)
    assert not any(part in h.split(b"/") for h in headers
                   for part in (b"site-packages", b"test", b"tests", b"idle_test", b"pydoc_data"))


def test_python_corpus_max_bytes_and_prefix():
    small, digest = data.python_corpus(200_000)
    big, _ = data.python_corpus()
    assert 0 < len(small) <= 200_000
    assert big.startswith(small)  # records are appended whole, in a fixed order
    assert hashlib.sha256(small).hexdigest() == digest
    with pytest.raises(ValueError, match="max_bytes"):
        data.python_corpus(0)


def test_load_corpus():
    arr, digest = data.load_corpus("python", max_bytes=300_000)
    assert arr.dtype == np.uint8 and arr.ndim == 1 and len(arr) <= 300_000
    assert digest == data.python_corpus(300_000)[1]
    with pytest.raises(ValueError, match="'wiki'"):
        data.load_corpus("wiki")


def test_enwik_corpus_from_a_gensim_like_package(tmp_path, monkeypatch):
    text = b"<mediawiki><page><title>Anarchism</title></page></mediawiki>\n"
    test_data = tmp_path / "gensim" / "test" / "test_data"
    test_data.mkdir(parents=True)
    (tmp_path / "gensim" / "__init__.py").write_text("")
    (test_data / data.ENWIK_FILE).write_bytes(bz2.compress(text))
    monkeypatch.delitem(sys.modules, "gensim", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    raw, digest = data.enwik_corpus()
    assert raw == text and digest == hashlib.sha256(text).hexdigest()
    arr, digest2 = data.load_corpus("enwik")
    assert arr.tobytes() == text and digest2 == digest
    assert data.enwik_corpus(test_data / data.ENWIK_FILE, max_bytes=11)[0] == text[:11]


@pytest.mark.skipif(importlib.util.find_spec("gensim") is not None, reason="gensim is installed")
def test_enwik_corpus_without_gensim_says_how_to_install():
    with pytest.raises(ImportError, match="pip install gensim"):
        data.enwik_corpus()


# --------------------------------------------------------------------------- splits, batches
def test_split_sizes_and_contiguity():
    arr = np.arange(1000) % 256
    parts = data.split(arr)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [900, 50, 50]
    np.testing.assert_array_equal(np.concatenate([parts["train"], parts["val"], parts["test"]]), arr)
    parts = data.split(arr[:101], fractions=(0.5, 0.25, 0.25))
    assert [len(parts[k]) for k in ("train", "val", "test")] == [50, 25, 26]


@pytest.mark.parametrize("fractions", [(0.9, 0.1), (0.9, 0.1, 0.1), (0.0, 0.5, 0.5), (1.1, -0.05, -0.05)])
def test_split_rejects_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        data.split(np.arange(100), fractions)


def test_random_batches():
    arr = data.encode("the quick brown fox jumps over the lazy dog " * 20)
    x, y = data.random_batches(arr, 8, 16, np.random.default_rng(0))
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    # every row is a window of the data: find its start and compare
    for row_x, row_y in zip(x, y):
        starts = [s for s in range(len(arr) - 16) if np.array_equal(arr[s:s + 16], row_x)]
        assert any(arr[s + 16] == row_y[-1] for s in starts)
    x2, y2 = data.random_batches(arr, 8, 16, np.random.default_rng(0))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    # windows can reach the very end, and only windows that fit are drawn
    arr = np.arange(17, dtype=np.uint8)
    x, y = data.random_batches(arr, 4, 16, np.random.default_rng(1))
    np.testing.assert_array_equal(x, np.tile(arr[:16], (4, 1)))
    np.testing.assert_array_equal(y, np.tile(arr[1:], (4, 1)))


@pytest.mark.parametrize("seq_len", [100, 150])
def test_batching_rejects_seq_len_too_long(seq_len):
    arr = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ValueError, match=f"seq_len={seq_len}"):
        data.random_batches(arr, 2, seq_len, np.random.default_rng(0))
    with pytest.raises(ValueError, match="seq_len"):
        next(data.eval_batches(arr, 2, seq_len))


@pytest.mark.parametrize("n, batch_size, seq_len", [(101, 3, 10), (100, 4, 7), (8, 5, 7)])
def test_eval_batches_cover_without_overlap(n, batch_size, seq_len):
    arr = np.arange(n)
    batches = list(data.eval_batches(arr, batch_size, seq_len))
    xs = np.concatenate([x for x, _ in batches])  # (n_windows, T)
    ys = np.concatenate([y for _, y in batches])
    n_windows = (n - 1) // seq_len
    assert xs.shape == ys.shape == (n_windows, seq_len) and xs.dtype == np.int64
    assert all(len(x) <= batch_size for x, _ in batches)
    np.testing.assert_array_equal(xs.reshape(-1), arr[:n_windows * seq_len])
    np.testing.assert_array_equal(ys.reshape(-1), arr[1:n_windows * seq_len + 1])
    assert n - 1 - n_windows * seq_len < seq_len  # what is left out is less than a window


def test_bits_per_byte():
    assert data.bits_per_byte(math.log(2)) == pytest.approx(1.0)
    assert data.bits_per_byte(math.log(256)) == pytest.approx(8.0)


# --------------------------------------------------------------------------- recall task
RECALL = dict(n_pairs=5, key_len=2, value_len=2, distance=64)


def test_recall_task_format():
    B, T, P, K, V = 16, 100, RECALL["n_pairs"], RECALL["key_len"], RECALL["value_len"]
    R = K + V
    x, y, mask = data.recall_task(B, T, rng=np.random.default_rng(0), **RECALL)
    assert x.shape == y.shape == mask.shape == (B, T)
    assert x.dtype == y.dtype == np.int64 and mask.dtype == bool
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    s = np.concatenate([x, y[:, -1:]], axis=1).astype(np.uint8)  # (B, T+1): the whole row
    keys_ab, values_ab, filler_ab = (set(a) for a in (data.KEY_ALPHABET, data.VALUE_ALPHABET,
                                                      data.FILLER_ALPHABET))
    assert not (keys_ab & values_ab or keys_ab & filler_ab or values_ab & filler_ab)
    Q = T + 1 - P * R
    for b in range(B):
        pairs = {bytes(s[b, i * R:i * R + K]): (i * R, bytes(s[b, i * R + K:(i + 1) * R])) for i in range(P)}
        assert len(pairs) == P  # distinct keys
        assert set(s[b, P * R:Q]) <= filler_ab
        expected_mask = np.zeros(T + 1, dtype=bool)
        queried = set()
        for slot in range(P):
            q = Q + slot * R
            key, value = bytes(s[b, q:q + K]), bytes(s[b, q + K:q + R])
            assert set(key) <= keys_ab and set(value) <= values_ab
            start, paired_value = pairs[key]
            assert value == paired_value
            assert q - start >= RECALL["distance"]
            queried.add(key)
            expected_mask[q + K:q + R] = True
        assert queried == set(pairs)
        np.testing.assert_array_equal(mask[b], expected_mask[1:])
    assert mask.sum() == B * P * V


def test_recall_task_is_deterministic_and_distance_is_tight():
    T = RECALL["distance"] + (2 * RECALL["n_pairs"] - 1) * 4 - 1  # the smallest valid seq_len
    a = data.recall_task(4, T, rng=np.random.default_rng(7), **RECALL)
    b = data.recall_task(4, T, rng=np.random.default_rng(7), **RECALL)
    c = data.recall_task(4, T, rng=np.random.default_rng(8), **RECALL)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a[0], c[0])
    with pytest.raises(ValueError, match="distance=64 is too large for seq_len"):
        data.recall_task(4, T - 1, rng=np.random.default_rng(7), **RECALL)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_pairs=27, key_len=1), "n_pairs"),
    (dict(distance=0), "distance"),
    (dict(value_len=0), "value_len"),
])
def test_recall_task_rejects_bad_arguments(kwargs, match):
    args = {**RECALL, **kwargs}
    with pytest.raises(ValueError, match=match):
        data.recall_task(2, 400, rng=np.random.default_rng(0), **args)


def test_recall_accuracy():
    x, y, mask = data.recall_task(4, 100, rng=np.random.default_rng(1), **RECALL)
    assert data.recall_accuracy(y, y, mask) == 1.0
    logits = np.zeros(y.shape + (data.VOCAB_SIZE,))  # (B, T, V)
    np.put_along_axis(logits, y[..., None], 1.0, axis=-1)
    assert data.recall_accuracy(logits, y, mask) == 1.0
    wrong = y.copy()
    wrong[mask] = 0
    wrong[0][mask[0]] = y[0][mask[0]]  # only row 0 right
    assert data.recall_accuracy(wrong, y, mask) == pytest.approx(1 / 4)
    # unmasked positions do not count
    noisy = y.copy()
    noisy[~mask] = 0
    assert data.recall_accuracy(noisy, y, mask) == 1.0
    with pytest.raises(ValueError, match="logits_or_pred"):
        data.recall_accuracy(y[:, :-1], y, mask)
    with pytest.raises(ValueError, match="mask"):
        data.recall_accuracy(y, y, np.zeros_like(mask))
