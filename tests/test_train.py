"""Training loop, checkpoints, resume and the command line (tiny sizes)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from rt_numpy import data, model, optim, train

CFG = model.Config(seq_len=32, width=16, n_layers=2, num_heads=2, n_route_heads=1, n_route_layers=1,
                   num_clusters=2, window_size=16, block_size=16)
TCFG = train.TrainConfig(steps=8, batch_size=2, lr=3e-3, min_lr=3e-4, warmup_steps=2, eval_every=4,
                         eval_batches=2, seed=3)


@pytest.fixture(scope="module")
def corpus():
    text = ("def add(a, b):\n    return a + b\n\n" * 40 + "class Point:\n    x: int\n    y: int\n\n" * 40)
    return data.split(data.encode(text))


def same_arrays(a, b):
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], dict):
            same_arrays(a[k], b[k])
        else:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def run(corpus, tmp_path=None, **kwargs):
    return train.train(CFG, kwargs.pop("tcfg", TCFG), out_dir=str(tmp_path) if tmp_path else None,
                       progress=False, corpus=corpus, **kwargs)


def test_seeded_run_is_bitwise_reproducible(corpus):
    a, b = run(corpus), run(corpus)
    same_arrays(a["params"], b["params"])
    same_arrays(a["kmeans_states"], b["kmeans_states"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_other_seed_differs(corpus):
    a = run(corpus)
    b = run(corpus, tcfg=dataclasses.replace(TCFG, seed=4))
    assert not np.array_equal(a["params"]["wte"], b["params"]["wte"])


def test_training_lowers_the_loss(corpus):
    tcfg = dataclasses.replace(TCFG, steps=40, eval_every=0, lr=1e-2, min_lr=1e-3)
    result = run(corpus, tcfg=tcfg)
    losses = [h["cross_entropy"] for h in result["history"]]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.0
    # the routing layer's centroids moved (k-means update after every step)
    init = model.init_kmeans(CFG, np.random.default_rng(0))
    assert set(result["kmeans_states"]) == set(init) == {"h1"}
    assert result["kmeans_states"]["h1"]["counts"].sum() > 0


def test_resume_equals_uninterrupted_run(corpus, tmp_path):
    full = run(corpus)
    first = run(corpus, tmp_path, stop_at=4)  # writes a checkpoint at step 4 (eval_every=4)
    assert first["step"] == 4
    resumed = run(corpus, tmp_path / "again", resume=str(tmp_path / "checkpoint"))
    assert resumed["step"] == TCFG.steps
    same_arrays(full["params"], resumed["params"])
    same_arrays(full["opt_state"]["m"], resumed["opt_state"]["m"])
    same_arrays(full["kmeans_states"], resumed["kmeans_states"])


def test_checkpoint_round_trip(corpus, tmp_path):
    result = run(corpus, tmp_path)
    loaded = train.load_checkpoint(tmp_path / "checkpoint")
    same_arrays(result["params"], loaded["params"])
    same_arrays(result["kmeans_states"], loaded["kmeans_states"])
    assert loaded["cfg"] == CFG and loaded["tcfg"] == TCFG and loaded["step"] == TCFG.steps
    assert loaded["opt_state"]["step"] == result["opt_state"]["step"]
    assert loaded["rng"].bit_generator.state == result["rng"].bit_generator.state
    assert os.path.exists(tmp_path / "loss.png")
    # no temporary files left behind
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


@pytest.fixture()
def saved(corpus, tmp_path):
    run(corpus, tmp_path)
    return tmp_path / "checkpoint"


def test_truncated_npz_is_refused(saved):
    payload = open(f"{saved}.npz", "rb").read()
    open(f"{saved}.npz", "wb").write(payload[: len(payload) // 2])
    with pytest.raises(train.CheckpointError, match="sha256"):
        train.load_checkpoint(saved)


def test_corrupt_json_is_refused(saved):
    open(f"{saved}.json", "w").write("{not json")
    with pytest.raises(train.CheckpointError, match="not valid JSON"):
        train.load_checkpoint(saved)


def test_missing_file_is_refused(saved):
    os.remove(f"{saved}.npz")
    with pytest.raises(train.CheckpointError, match="missing file"):
        train.load_checkpoint(saved)


def test_tampered_arrays_with_matching_hash_are_refused(saved):
    """A checkpoint whose arrays do not match its own config (e.g. edited by hand)."""
    import hashlib
    import io

    with np.load(f"{saved}.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["params/wte"] = arrays["params/wte"][:, :3]
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    open(f"{saved}.npz", "wb").write(buffer.getvalue())
    meta = json.load(open(f"{saved}.json"))
    meta["npz_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    json.dump(meta, open(f"{saved}.json", "w"))
    with pytest.raises(train.CheckpointError, match="do not match its config"):
        train.load_checkpoint(saved)


def test_mismatched_model_is_refused(saved, corpus, tmp_path):
    other = dataclasses.replace(CFG, width=8)
    with pytest.raises(train.CheckpointError, match="another model"):
        train.load_checkpoint(saved, expect_model=other)
    with pytest.raises(train.CheckpointError):
        train.train(other, TCFG, resume=str(saved), progress=False, corpus=corpus)
    with pytest.raises(train.CheckpointError, match="trained with"):
        train.train(CFG, dataclasses.replace(TCFG, lr=1e-3), resume=str(saved), progress=False, corpus=corpus)


def test_failed_save_leaves_the_old_checkpoint(saved, monkeypatch):
    before = {s: open(f"{saved}{s}", "rb").read() for s in (".npz", ".json")}
    loaded = train.load_checkpoint(saved)

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(train.json, "dumps", explode)  # fails after the arrays were serialised
    with pytest.raises(OSError, match="disk full"):
        train.save_checkpoint(saved, params=loaded["params"], opt_state=loaded["opt_state"],
                              kmeans_states=loaded["kmeans_states"], step=99, rng=loaded["rng"],
                              cfg=loaded["cfg"], tcfg=loaded["tcfg"])
    after = {s: open(f"{saved}{s}", "rb").read() for s in (".npz", ".json")}
    assert after == before
    train.load_checkpoint(saved)  # still valid


def test_evaluate_reports_bits_per_byte(corpus):
    params = model.init_params(CFG, np.random.default_rng(0))
    states = model.init_kmeans(CFG, np.random.default_rng(0))
    result = train.evaluate(params, states, CFG, corpus["val"], batch_size=2, max_batches=1)
    assert result["bits_per_byte"] == pytest.approx(result["cross_entropy"] / np.log(2))
    assert 7.0 < result["bits_per_byte"] < 9.0  # an untrained model is close to uniform: 8 bits
    with pytest.raises(ValueError, match="seq_len"):
        train.evaluate(params, states, CFG, corpus["val"][:10], batch_size=2)


@pytest.mark.parametrize("field, value, error", [
    ("steps", 0, ValueError), ("batch_size", -1, ValueError), ("lr", -1.0, ValueError),
    ("lr", float("nan"), ValueError), ("warmup_steps", 1.5, TypeError), ("grad_clip", float("inf"), ValueError),
    ("seed", True, TypeError)])
def test_train_config_validation(field, value, error):
    with pytest.raises(error, match=field):
        train.TrainConfig(**{field: value})


def test_optimizer_state_advances(corpus):
    result = run(corpus)
    assert result["opt_state"]["step"] == TCFG.steps
    assert set(result["opt_state"]["m"]) == set(optim.adamw_init(result["params"])["m"])


@pytest.mark.slow
def test_cli_tiny_preset_end_to_end(tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    out = subprocess.run([sys.executable, "-m", "rt_numpy", "train", "--preset", "tiny", "--out", str(tmp_path),
                          "--no-progress"], capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    assert "bits/byte" in out.stdout and "loss plot" in out.stdout
    assert os.path.exists(tmp_path / "checkpoint.npz") and os.path.exists(tmp_path / "loss.png")
    sampled = subprocess.run([sys.executable, "-m", "rt_numpy", "sample", str(tmp_path / "checkpoint"),
                              "--n-new", "20", "--prompt", "def "], capture_output=True, text=True,
                             timeout=600, env=env)
    assert sampled.returncode == 0, sampled.stderr
    assert "def " in sampled.stdout
    evaluated = subprocess.run([sys.executable, "-m", "rt_numpy", "eval", str(tmp_path / "checkpoint"),
                                "--max-batches", "1"], capture_output=True, text=True, timeout=600, env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "val:" in evaluated.stdout and "test:" in evaluated.stdout
