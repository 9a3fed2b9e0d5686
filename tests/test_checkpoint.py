"""Checkpoints: one rename commits them, a failed save keeps the last one, every array and field is checked.

Each test builds a small checkpoint without training (fresh parameters, AdamW state and k-means state), then
breaks one thing.  train.save_checkpoint / train.load_checkpoint (rt_numpy/train.py, "checkpoints").
"""
import hashlib
import io
import json
import os

import numpy as np
import pytest

from rt_numpy import model, optim, train

CFG = model.Config(seq_len=32, width=16, n_layers=2, num_heads=2, n_route_heads=1, n_route_layers=1,
                   num_clusters=2, window_size=16, block_size=16)
TCFG = train.TrainConfig(steps=10, batch_size=2, warmup_steps=2, eval_every=0, eval_batches=1)


def save(path, step, seed=0):
    """A valid checkpoint of CFG at ``step``; its parameters depend on ``seed``."""
    rng = np.random.default_rng(seed)
    params = model.init_params(CFG, rng)
    opt_state = optim.adamw_init(params)
    opt_state["v"] = {k: np.full_like(v, 0.5) for k, v in opt_state["v"].items()}
    opt_state["step"] = step
    train.save_checkpoint(path, params=params, opt_state=opt_state, kmeans_states=model.init_kmeans(CFG, rng),
                          step=step, rng=rng, cfg=CFG, tcfg=TCFG, history=[{"step": step}])
    return params


def files(directory):
    return sorted(os.listdir(directory))


def read(path):
    """The arrays and the metadata of a checkpoint, as stored."""
    with np.load(f"{path}.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    return arrays, json.loads(arrays.pop(train.META_NAME).tobytes().decode())


def write(path, arrays, meta):
    """Store ``arrays`` and ``meta`` as a checkpoint, bypassing every check of save_checkpoint."""
    raw = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(f"{path}.npz", **arrays, **{train.META_NAME: raw})


@pytest.fixture()
def ckpt(tmp_path):
    save(tmp_path / "ckpt", step=4)
    return tmp_path / "ckpt"


def test_round_trip_and_the_readable_copy(tmp_path):
    params = save(tmp_path / "ckpt", step=4)
    loaded = train.load_checkpoint(tmp_path / "ckpt.npz")
    assert loaded["step"] == 4 and loaded["opt_state"]["step"] == 4 and loaded["history"] == [{"step": 4}]
    assert loaded["cfg"] == CFG and loaded["tcfg"] == TCFG
    assert all(np.array_equal(loaded["params"][k], params[k]) for k in params)
    assert files(tmp_path) == ["ckpt.json", "ckpt.npz"]  # no temporary file
    copy = json.loads((tmp_path / "ckpt.json").read_text())
    _, meta = read(tmp_path / "ckpt")
    assert copy.pop("npz_sha256") == hashlib.sha256((tmp_path / "ckpt.npz").read_bytes()).hexdigest()
    assert copy == meta and meta["version"] == train.CHECKPOINT_VERSION == 2


@pytest.mark.parametrize("fail_call", [1, 2])
def test_a_failed_rename_keeps_a_whole_checkpoint(ckpt, monkeypatch, fail_call):
    """Call 1 is the .npz's rename (the commit): the old checkpoint stays.  Call 2 is the .json copy's: the new
    checkpoint is already committed and loads, beside a stale .json."""
    before = {s: open(f"{ckpt}{s}", "rb").read() for s in (".npz", ".json")}
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == fail_call:
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(train.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save(ckpt, step=9, seed=1)
    monkeypatch.undo()
    assert files(ckpt.parent) == ["ckpt.json", "ckpt.npz"]  # the temporary file is gone
    assert train.load_checkpoint(ckpt)["step"] == (4 if fail_call == 1 else 9)
    assert open(f"{ckpt}.json", "rb").read() == before[".json"]  # stale in both cases
    assert (open(f"{ckpt}.npz", "rb").read() == before[".npz"]) == (fail_call == 1)


def test_a_failed_write_removes_its_temporary_file(ckpt, monkeypatch):
    def fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(train.os, "fsync", fsync)  # the bytes are written, the flush to disk fails
    with pytest.raises(OSError, match="I/O error"):
        save(ckpt, step=9, seed=1)
    monkeypatch.undo()
    assert files(ckpt.parent) == ["ckpt.json", "ckpt.npz"]
    assert train.load_checkpoint(ckpt)["step"] == 4


def test_the_json_copy_is_not_needed(ckpt):
    stale = open(f"{ckpt}.json", "rb").read()
    save(ckpt, step=7, seed=1)
    open(f"{ckpt}.json", "wb").write(stale)  # the copy of step 4 beside the .npz of step 7
    assert train.load_checkpoint(ckpt)["step"] == 7
    open(f"{ckpt}.json", "w").write("{not json")
    assert train.load_checkpoint(ckpt)["step"] == 7
    os.remove(f"{ckpt}.json")
    assert train.load_checkpoint(f"{ckpt}.json")["step"] == 7


def test_format_1_still_loads(ckpt):
    """Format 1: the arrays alone in the .npz, the metadata (with the .npz's sha256) in the .json; written before
    the port's options existed, so the model has none of their keys."""
    arrays, meta = read(ckpt)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    open(f"{ckpt}.npz", "wb").write(buffer.getvalue())
    meta["version"] = 1
    meta["npz_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    for key in ("mem_kv", "rotary_values", "local_qkv_bias"):
        del meta["model"][key]
    open(f"{ckpt}.json", "w").write(json.dumps(meta))
    loaded = train.load_checkpoint(ckpt, expect_model=CFG)
    assert loaded["step"] == 4 and loaded["cfg"] == CFG
    assert np.array_equal(loaded["params"]["wte"], arrays["params/wte"])
    meta["npz_sha256"] = "0" * 64
    open(f"{ckpt}.json", "w").write(json.dumps(meta))
    with pytest.raises(train.CheckpointError, match="sha256"):
        train.load_checkpoint(ckpt)
    os.remove(f"{ckpt}.json")
    with pytest.raises(train.CheckpointError, match=r"ckpt.json is missing"):
        train.load_checkpoint(ckpt)


def test_missing_or_truncated_npz_is_refused(ckpt):
    payload = open(f"{ckpt}.npz", "rb").read()
    open(f"{ckpt}.npz", "wb").write(payload[: len(payload) // 2])
    with pytest.raises(train.CheckpointError, match=r"ckpt.npz is truncated or corrupt"):
        train.load_checkpoint(ckpt)
    os.remove(f"{ckpt}.npz")
    with pytest.raises(train.CheckpointError, match=r"missing file .*ckpt.npz"):
        train.load_checkpoint(ckpt)


def _set(d, key, value):
    d[key] = value


# (what is broken, how, the message expected)
ARRAY_CASES = [
    ("missing array", lambda a: a.pop("params/wte"), r"missing \['params/wte'\]"),
    ("unknown array", lambda a: _set(a, "params/extra", np.zeros(3, np.float32)), r"unknown \['params/extra'\]"),
    ("missing moment", lambda a: a.pop("opt/m/wte"), r"missing \['opt/m/wte'\]"),
    ("missing k-means", lambda a: a.pop("kmeans/h1/sums"), r"missing \['kmeans/h1/sums'\]"),
    ("param shape", lambda a: _set(a, "params/wte", a["params/wte"][:, :3]), r"params/wte has shape \(256, 3\)"),
    ("m shape", lambda a: _set(a, "opt/m/wpe", a["opt/m/wpe"][:5]), r"opt/m/wpe has shape \(5, 16\)"),
    ("v shape", lambda a: _set(a, "opt/v/wpe", a["opt/v/wpe"][None]), r"opt/v/wpe has shape \(1, 32, 16\)"),
    ("centroid shape", lambda a: _set(a, "kmeans/h1/means", np.zeros((1, 3, 8), np.float32)),
     r"kmeans/h1/means has shape \(1, 3, 8\), its config \(n_route_heads=1, num_clusters=2, head_dim=8\)"),
    ("counts shape", lambda a: _set(a, "kmeans/h1/counts", np.zeros((2, 2), np.float32)),
     r"kmeans/h1/counts has shape \(2, 2\)"),
    ("param dtype", lambda a: _set(a, "params/wte", a["params/wte"].astype(np.float64)),
     r"params/wte has dtype float64, its config has dtype='float32'"),
    ("int array", lambda a: _set(a, "opt/v/wte", a["opt/v/wte"].astype(np.int64)), r"opt/v/wte has dtype int64"),
    ("k-means dtype", lambda a: _set(a, "kmeans/h1/counts", a["kmeans/h1/counts"].astype(np.float64)),
     r"kmeans/h1/counts has dtype float64"),
    ("NaN param", lambda a: a["params/h0.ln1.g"].__setitem__(0, np.nan), r"params/h0.ln1.g contains NaN"),
    ("inf moment", lambda a: a["opt/m/wte"].__setitem__((0, 0), np.inf), r"opt/m/wte contains NaN or infinity"),
    ("NaN centroid", lambda a: a["kmeans/h1/means"].__setitem__((0, 0, 0), np.nan), r"kmeans/h1/means contains"),
    ("negative v", lambda a: a["opt/v/wte"].__setitem__((0, 0), -1.0), r"opt/v/wte must not be negative"),
    ("negative count", lambda a: a["kmeans/h1/counts"].__setitem__((0, 1), -2.0),
     r"kmeans/h1/counts must not be negative, got minimum -2"),
]


@pytest.mark.parametrize("what, corrupt, message", ARRAY_CASES, ids=[c[0] for c in ARRAY_CASES])
def test_every_array_is_checked(ckpt, what, corrupt, message):
    arrays, meta = read(ckpt)
    arrays = {k: v.copy() for k, v in arrays.items()}
    corrupt(arrays)
    write(ckpt, arrays, meta)
    with pytest.raises(train.CheckpointError, match=message) as info:
        train.load_checkpoint(ckpt)
    assert "ckpt" in str(info.value)  # the file is named


META_CASES = [
    ("step too large", lambda m: _set(m, "step", 11), r"step must be in \[0, 10\] \(its train.steps=10\), got 11"),
    ("step negative", lambda m: _set(m, "step", -1), r"step must be in \[0, 10\]"),
    ("step not int", lambda m: _set(m, "step", "4"), r"step must be an integer"),
    ("opt_step too large", lambda m: _set(m, "opt_step", 12), r"opt_step must be in \[0, 10\]"),
    ("opt_step float", lambda m: _set(m, "opt_step", 1.5), r"opt_step must be an integer"),
    ("num_clusters", lambda m: m["model"].update(num_clusters=3),
     r"kmeans/h1/means has shape \(1, 2, 8\), its config \(n_route_heads=1, num_clusters=3"),
    ("dtype", lambda m: m["model"].update(dtype="float64"), r"has dtype float32, its config has dtype='float64'"),
    ("width", lambda m: m["model"].update(width=32), r"params/wte has shape \(256, 16\), its config expects"),
    ("unknown model key", lambda m: m["model"].update(colour="red"), r"field 'model': unknown config keys"),
    ("bad model value", lambda m: m["model"].update(num_heads=0), r"field 'model': num_heads must be >= 1"),
    ("model not a dict", lambda m: _set(m, "model", [1]), r"field 'model' must be a JSON object"),
    ("bad train value", lambda m: m["train"].update(steps=0), r"field 'train': steps must be >= 1"),
    ("unknown train key", lambda m: m["train"].update(colour="red"), r"field 'train'.*colour"),
    ("missing rng", lambda m: m.pop("rng"), r"no field 'rng'"),
    ("missing step", lambda m: m.pop("step"), r"no field 'step'"),
    ("bad rng", lambda m: _set(m, "rng", {"bit_generator": "nonsense"}), r"field 'rng'"),
    ("history", lambda m: _set(m, "history", 3), r"field 'history' must be a list"),
    ("version", lambda m: _set(m, "version", 3), r"unknown format version 3"),
]


@pytest.mark.parametrize("what, corrupt, message", META_CASES, ids=[c[0] for c in META_CASES])
def test_every_field_is_checked(ckpt, what, corrupt, message):
    arrays, meta = read(ckpt)
    corrupt(meta)
    write(ckpt, arrays, meta)
    with pytest.raises(train.CheckpointError, match=message):
        train.load_checkpoint(ckpt)


def test_unreadable_metadata_is_refused(ckpt):
    arrays, _ = read(ckpt)
    np.savez(f"{ckpt}.npz", **arrays, **{train.META_NAME: np.frombuffer(b"{not json", np.uint8)})
    with pytest.raises(train.CheckpointError, match=r"ckpt.npz\[meta.json\] is not valid JSON"):
        train.load_checkpoint(ckpt)
    np.savez(f"{ckpt}.npz", **arrays, **{train.META_NAME: np.zeros(3, np.float32)})
    with pytest.raises(train.CheckpointError, match=r"meta.json must be a uint8 array"):
        train.load_checkpoint(ckpt)
    np.savez(f"{ckpt}.npz", **arrays, **{train.META_NAME: np.frombuffer(b"[1, 2]", np.uint8)})
    with pytest.raises(train.CheckpointError, match=r"is not a JSON object"):
        train.load_checkpoint(ckpt)
