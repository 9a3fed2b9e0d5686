"""``python -m rt_numpy compare``: the quick run of every task and arm, and the pieces it is made of.

The quick run makes no claim about which attention is better (3 steps); it checks that the records
are well formed, every arm of every task is there, the parameter counts are equal, and the
keys-per-query budgets by the formulas agree within 10%.
"""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rt_numpy import baselines, compare, data, model, optim, train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    result = subprocess.run([sys.executable, "-m", "rt_numpy", "compare", "--quick", "--json", str(out / "r.json"),
                             "--out", str(out / "plots")], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads((out / "r.json").read_text()), out / "plots"


def test_quick_run_records_are_well_formed(quick_run):
    _, records, _ = quick_run
    assert records
    for r in records:
        assert set(r) == {"impl", "case", "metric", "value", "unit"}
        assert r["impl"] == "rt_numpy-numba"
        assert {"task", "arm", "T", "H", "D", "K", "W", "N", "seed"} <= set(r["case"])
        assert isinstance(r["value"], float) and np.isfinite(r["value"])


def test_quick_run_has_every_task_and_arm_with_equal_parameters(quick_run):
    stdout, records, _ = quick_run
    for task in compare.TASKS:
        rows = [r for r in records if r["case"]["task"] == task]
        assert {r["case"]["arm"] for r in rows} == set(compare.ARMS)
        params = {r["value"] for r in rows if r["metric"] == "params"}
        assert len(params) == 1, params
        metric = {"text": "bits_per_byte", "recall": "accuracy", "images": "bits_per_dim"}[task]
        per_arm_seed = {(r["case"]["arm"], r["case"]["seed"]) for r in rows if r["metric"] == metric}
        assert {(a, s) for a in compare.ARMS for s in (0, 1)} <= per_arm_seed
        assert any(r["metric"] == "attention_mass_recall" for r in rows)
        assert {r["case"]["data_sha256"] for r in rows} != {None} or task == "recall"
    assert "budget by the formulas" not in stdout  # the formulas agree within 10% (dense excepted)
    assert stdout.count("| arm ") == 3  # one table per task


def test_quick_run_draws_the_plots(quick_run):
    _, _, plots = quick_run
    names = {p.name for p in plots.glob("*.png")}
    for task in compare.TASKS:
        assert f"{task}_curves.png" in names and f"{task}_mass_recall.png" in names
    assert {"recall_distance.png", "text_clusters.png", "images_clusters.png"} <= names


def test_bench_compare_writes_the_same_records(tmp_path):
    out = tmp_path / "r.json"
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--quick", "--tasks", "recall",
                             "--arms", "local,lsh", "--seeds", "1", "--json", str(out), "--out", ""],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {r["case"]["arm"] for r in records} == {"local", "lsh"}


@pytest.mark.parametrize("argv,pattern", [
    (["--arms", "local,ring"], "--arms must name some of"),
    (["--seeds", "0"], "seeds must be at least 1, got 0"),
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--window", "0"], "window_size must be >= 1, got 0"),
    (["--tasks", "images", "--seq-len", "100"], "images need seq_len a multiple of 128, got 100"),
    (["--tasks", "text", "--seq-len", "50"], "seq_len must be a multiple of block_size=8, got 50"),
])
def test_bad_options_are_refused_before_any_training(argv, pattern):
    with pytest.raises(SystemExit, match=pattern):
        compare.main(["--quick", "--out", ""] + argv)


# ------------------------------------------------------------------------------ the pieces
def test_arms_differ_only_in_their_attention():
    s = compare.Settings()
    configs = {arm: s.config("text", arm) for arm in compare.ARMS}
    fields = {f.name for f in dataclasses.fields(model.Config)}
    allowed = {"n_route_heads", "n_route_layers", "attention", "membership", "window_size"}
    for arm, cfg in configs.items():
        changed = {f for f in fields if getattr(cfg, f) != getattr(configs["routing"], f)}
        assert changed <= allowed, (arm, changed)
    shapes = {arm: model.param_shapes(cfg) for arm, cfg in configs.items()}
    assert all(sh == shapes["routing"] for sh in shapes.values())


@pytest.mark.parametrize("arm", ["local", "strided", "dense"])
def test_nominal_keys_match_the_visibility(arm):
    cfg = compare.Settings().config("text", arm)
    T = cfg.seq_len
    counts = {"local": baselines.visibility("local", T, block_size=cfg.block_size, look_back=cfg.look_back),
              "strided": baselines.visibility("strided", T, stride=cfg.stride),
              "dense": baselines.visibility("dense", T)}[arm]
    assert baselines.keys_per_query(counts) == pytest.approx(compare.nominal_keys(cfg), rel=0.01)


def test_the_budgets_of_the_default_settings_agree():
    s = compare.Settings()
    for task in compare.TASKS:
        local = compare.nominal_keys(s.config(task, "local"))
        for arm in ("routing", "strided", "lsh", "nearest"):
            assert compare.nominal_keys(s.config(task, arm)) == pytest.approx(local, rel=0.10), (task, arm)


@pytest.mark.parametrize("pairs,distance", [(4, 32), (16, 128), (4, 500)])
def test_recall_rows_put_the_records_distance_bytes_back(pairs, distance, rng):
    T = 576
    x, y, mask = compare.recall_rows(3, T, n_pairs=pairs, distance=distance, rng=rng)
    assert x.shape == y.shape == mask.shape == (3, T)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert mask.sum(axis=1).tolist() == [pairs] * 3
    for b in range(3):
        for i in np.flatnonzero(mask[b]):
            key = x[b, i]  # the query's key byte, just before its value
            earlier = [j for j in range(i - 1) if x[b, j] == key and mask[b, j] == 0]
            assert earlier, "the record of every query is earlier in the row"
            gap = i - earlier[-1]
            assert distance <= gap <= distance + 4 * pairs
            assert y[b, i] == x[b, earlier[-1] + 1]  # the answer is the byte after the earlier key


def test_digit_images_keep_held_out_digits_apart():
    rng = np.random.default_rng(0)
    train_px, sha = data.digit_images(3, split="train", rng=rng, tiles=(3, 6))
    held_px, sha2 = data.digit_images(3, split="held_out", rng=rng, tiles=(3, 6))
    assert train_px.shape == held_px.shape == (3, 1152) and sha == sha2 and len(sha) == 64
    assert 0 <= train_px.min() and train_px.max() < data.IMAGE_LEVELS
    from sklearn.datasets import load_digits

    digits = load_digits().images.astype(np.int64)
    tile = held_px[0].reshape(24, 48)[:8, :8]  # the top-left digit of a held-out image
    matches = [i for i in range(len(digits)) if np.array_equal(digits[i], tile)]
    assert matches and all(i >= 1500 for i in matches)
    x, y = data.image_batch(train_px)
    assert (x[:, 0] == data.IMAGE_START).all()
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(n_images=0, split="train"), "n_images must be a positive integer, got 0"),
    (dict(n_images=2, split="test"), "split must be 'train' or 'held_out', got 'test'"),
    (dict(n_images=2, split="train", tiles=4), r"tiles must be a pair \(rows, cols\)"),
    (dict(n_images=2, split="train", n_train_digits=1797), r"n_train_digits must be in \[1, 1796\]"),
])
def test_digit_images_reject_bad_input(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        data.digit_images(rng=np.random.default_rng(0), **kwargs)


def test_train_step_with_a_mask_trains_on_the_masked_targets_only(rng):
    cfg = model.Config(seq_len=32, width=16, num_heads=2, n_route_heads=1, window_size=8, block_size=8,
                       num_clusters=4, dtype="float64")
    tcfg = train.TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=1)
    params = model.init_params(cfg, np.random.default_rng(1))
    states = model.init_kmeans(cfg, np.random.default_rng(1))
    x, y = rng.integers(0, 256, (2, 32)), rng.integers(0, 256, (2, 32))
    mask = np.zeros((2, 32), bool)
    mask[:, -3:] = True
    *_, metrics = train.train_step(params, optim.adamw_init(params), states, x, y, cfg, tcfg, 0, None, mask=mask)
    logits, _ = model.forward(params, x, cfg, states)
    z = logits[mask]
    want = np.mean(np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1) - z[np.arange(6), y[mask]])
    assert metrics["cross_entropy"] == pytest.approx(want, rel=1e-12)
    y2 = y.copy()
    y2[:, 0] = (y2[:, 0] + 1) % 256  # an unmasked target does not count
    *_, metrics2 = train.train_step(params, optim.adamw_init(params), states, x, y2, cfg, tcfg, 0, None, mask=mask)
    assert metrics2["cross_entropy"] == metrics["cross_entropy"]


def test_forward_trace_holds_every_layers_queries(rng):
    cfg = model.Config(seq_len=32, width=16, num_heads=2, n_route_heads=1, window_size=8, block_size=8,
                       num_clusters=4, n_layers=2)
    params, states = model.init_params(cfg, rng), model.init_kmeans(cfg, rng)
    trace = {}
    logits, _ = model.forward(params, rng.integers(0, 256, (2, 32)), cfg, states, trace=trace)
    assert set(trace) == {"h0", "h1"}
    for layer in trace.values():
        assert layer["q"].shape == layer["k"].shape == (2, 2, 32, 8)
        assert layer["q"] is layer["k"]  # shared QK
