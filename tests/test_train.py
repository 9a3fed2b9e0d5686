"""Training loop, checkpoints, resume and the command line (tiny sizes)."""
import dataclasses
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


@pytest.fixture(scope="module")
def full(corpus, tmp_path_factory):
    """The uninterrupted run of TCFG, for comparisons; its checkpoint is in ``full["checkpoint"]``."""
    return run(corpus, tmp_path_factory.mktemp("full"))


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


def test_resume_equals_uninterrupted_run(corpus, tmp_path, full):
    first = run(corpus, tmp_path, stop_at=4)  # writes a checkpoint at step 4 (eval_every=4)
    assert first["step"] == 4
    resumed = run(corpus, tmp_path / "again", resume=str(tmp_path / "checkpoint"))
    assert resumed["step"] == TCFG.steps
    same_arrays(full["params"], resumed["params"])
    same_arrays(full["opt_state"]["m"], resumed["opt_state"]["m"])
    same_arrays(full["kmeans_states"], resumed["kmeans_states"])


def test_checkpoint_round_trip(full):
    result, directory = full, os.path.dirname(full["checkpoint"])
    loaded = train.load_checkpoint(full["checkpoint"])
    same_arrays(result["params"], loaded["params"])
    same_arrays(result["kmeans_states"], loaded["kmeans_states"])
    assert loaded["cfg"] == CFG and loaded["tcfg"] == TCFG and loaded["step"] == TCFG.steps
    assert loaded["opt_state"]["step"] == result["opt_state"]["step"]
    assert loaded["rng"].bit_generator.state == result["rng"].bit_generator.state
    assert sorted(os.listdir(directory)) == ["checkpoint.json", "checkpoint.npz", "loss.png"]  # no temporary file


def test_mismatched_model_is_refused(full, corpus):
    saved = full["checkpoint"]
    other = dataclasses.replace(CFG, width=8)
    with pytest.raises(train.CheckpointError, match="another model"):
        train.load_checkpoint(saved, expect_model=other)
    with pytest.raises(train.CheckpointError):
        train.train(other, TCFG, resume=str(saved), progress=False, corpus=corpus)
    with pytest.raises(train.CheckpointError, match="trained with"):
        train.train(CFG, dataclasses.replace(TCFG, lr=1e-3), resume=str(saved), progress=False, corpus=corpus)


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


def test_evaluate_checks_its_sizes(corpus):
    params = model.init_params(CFG, np.random.default_rng(0))
    states = model.init_kmeans(CFG, np.random.default_rng(0))
    with pytest.raises(ValueError, match="max_batches must be >= 1, got 0"):
        train.evaluate(params, states, CFG, corpus["val"], batch_size=2, max_batches=0)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        train.evaluate(params, states, CFG, corpus["val"], batch_size=0)
    with pytest.raises(TypeError, match="max_batches must be an integer"):
        train.evaluate(params, states, CFG, corpus["val"], batch_size=2, max_batches=1.5)


def test_ctrl_c_saves_the_last_completed_step(corpus, tmp_path, monkeypatch, full):
    real_step, messages = train.train_step, []

    def step_or_interrupt(*args):
        if args[7] == 3:  # the step index: three steps are complete
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(train, "train_step", step_or_interrupt)
    with pytest.raises(train.Interrupted) as info:
        run(corpus, tmp_path, log=messages.append)
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.step == 3 and info.value.checkpoint == str(tmp_path / "checkpoint")
    assert messages == []  # the exception says it: the command line prints it once
    assert str(info.value) == f"training interrupted after step 3; checkpoint {tmp_path / 'checkpoint'}"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.json", "checkpoint.npz"]  # no temporary file
    saved = train.load_checkpoint(tmp_path / "checkpoint")
    assert saved["step"] == saved["opt_state"]["step"] == 3 and [h["step"] for h in saved["history"]] == [1, 2, 3]
    with pytest.raises(train.Interrupted) as info:
        run(corpus)  # nothing to save
    assert info.value.step == 3 and info.value.checkpoint is None
    monkeypatch.undo()
    resumed = run(corpus, resume=str(tmp_path / "checkpoint"))
    same_arrays(full["params"], resumed["params"])
    same_arrays(full["kmeans_states"], resumed["kmeans_states"])


def test_resuming_a_finished_run_evaluates_it(corpus, tmp_path, full):
    messages = []
    again = run(corpus, tmp_path / "again", resume=full["checkpoint"], log=messages.append)
    assert messages == [f"the run is already finished (step {TCFG.steps} of {TCFG.steps}): evaluating it only"]
    assert again["step"] == TCFG.steps and again["val"] == full["val"] and again["val"] is not None
    assert [h["step"] for h in again["history"]] == list(range(1, TCFG.steps + 1))
    assert train.load_checkpoint(again["checkpoint"])["step"] == TCFG.steps
    assert os.path.exists(again["plot"])


def test_bad_out_dir_fails_before_training(corpus, tmp_path, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")

    def no_training(*args):
        raise AssertionError("trained before checking out_dir")

    monkeypatch.setattr(train, "train_step", no_training)
    with pytest.raises(ValueError, match=r"out_dir '.*a_file' is a file, not a directory"):
        run(corpus, a_file)
    with pytest.raises(ValueError, match=r"out_dir '.*a_file/run' cannot be created: .*a_file is a file"):
        run(corpus, a_file / "run")
    with pytest.raises(TypeError, match="out_dir must be a path or None, got 3"):
        train.check_out_dir(3)
    train.check_out_dir(tmp_path / "new" / "deeper")  # can be created
    train.check_out_dir(None)


def test_progress_bar_starts_after_the_first_step(corpus, monkeypatch):
    import tqdm.auto

    bars, messages = [], []

    class Bar:
        def __init__(self, **kwargs):
            bars.append(kwargs)
            self.updates = 0

        def update(self, n):
            self.updates += n
            bars[-1]["updates"] = self.updates

        def set_postfix(self, **kwargs):
            pass

        def write(self, line):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(train, "SLOW_FIRST_STEP_S", -1.0)  # every first step counts as slow
    result = run(corpus, log=messages.append)
    assert len(bars) == 1 and bars[0]["initial"] == 1 and bars[0]["updates"] == TCFG.steps - 1
    assert len(messages) == 1 and messages[0].startswith("first step took ")
    assert messages[0].endswith(" s (includes compiling kernels on a first run)")
    assert result["history"][0]["elapsed_s"] <= result["history"][-1]["elapsed_s"]
    monkeypatch.setattr(train, "SLOW_FIRST_STEP_S", 1e9)
    messages.clear()
    run(corpus, log=messages.append, stop_at=1)
    assert messages == [] and len(bars) == 2 and bars[1]["initial"] == 1 and "updates" not in bars[1]


def test_presets():
    for name, (cfg, tcfg) in train.PRESETS.items():
        assert tcfg.time_limit == 0, name  # a fixed number of steps: the result does not depend on the machine
    small, small_train = train.PRESETS["small"]
    local, local_train = train.PRESETS["local"]
    nearest, nearest_train = train.PRESETS["nearest"]
    assert local_train == nearest_train == small_train
    assert model.init_kmeans(local, np.random.default_rng(0)) == {}  # no routing layer
    assert not any(local.is_sparse_layer(i) for i in range(local.n_layers))
    assert dataclasses.replace(local, n_route_layers=small.n_route_layers) == small
    assert nearest.membership == "nearest" and dataclasses.replace(nearest, membership=small.membership) == small
    assert model.param_shapes(local) == model.param_shapes(small)  # the same parameters, another attention


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
