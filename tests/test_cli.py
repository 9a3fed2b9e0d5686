"""The command line (rt_numpy/__main__.py), run in this process through ``main(argv)``.

Options checked before anything is loaded or trained, ``--set`` for every model
field (train, eval, sample), ``train --resume`` keeping the checkpoint's configs,
library errors as one line with exit status 2, Ctrl-C as exit status 130, and the
demo's sample of a held-out prompt.  The trainings are the tiny preset for 2 steps, on the
reference path (``--impl ref``: fast also when CI turns Numba's JIT off).
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil

import pytest

from rt_numpy import __main__ as cli
from rt_numpy import data, model, sample, train


def run(argv, capsys):
    """``main(argv)``: its return value (or SystemExit code), stdout and stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def no_work(monkeypatch):
    """Loading a checkpoint or training fails the test: the command must stop before."""
    def fail(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded or a training started")

    monkeypatch.setattr(train, "train", fail)
    monkeypatch.setattr(train, "load_checkpoint", fail)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 2-step tiny run with --set window_size=16; the path of its checkpoint."""
    out = tmp_path_factory.mktemp("tiny")
    assert cli.main(["train", "--steps", "2", "--out", str(out), "--no-progress", "--impl", "ref",
                     "--set", "window_size=16"]) == 0
    return str(out / "checkpoint")


def copy_of(checkpoint, tmp_path):
    for suffix in (".npz", ".json"):
        shutil.copy(checkpoint + suffix, tmp_path / ("checkpoint" + suffix))
    return str(tmp_path / "checkpoint")


# --------------------------------------------------------------------------- options
@pytest.mark.parametrize("argv, names", [
    (["eval", "ckpt", "--max-batches", "0"], ["--max-batches", "0"]),
    (["eval", "ckpt", "--per-document", "-2"], ["--per-document", "-2"]),
    (["sample", "ckpt", "--seed", "-1"], ["--seed", "-1"]),
    (["sample", "ckpt", "--top-p", "0"], ["--top-p", "0"]),
    (["sample", "ckpt", "--temperature", "nan"], ["--temperature", "nan"]),
    (["sample", "ckpt", "--prompt", ""], ["--prompt", "empty"]),
    (["kmeans-demo", "--num-heads", "-1"], ["--num-heads", "-1"]),
    (["kmeans-demo", "--heads", "-1"], ["--heads", "-1"]),
    (["kmeans-demo", "--ema-decay", "1"], ["--ema-decay", "1"]),
    (["demo", "--n-new", "-1"], ["--n-new", "-1"]),
    (["demo", "--prompt", ""], ["--prompt", "empty"]),
    (["train", "--steps", "0"], ["--steps", "0"]),
    (["train", "--batch-size", "two"], ["--batch-size", "two"]),
    (["certify", "ckpt", "--windows", "0"], ["--windows", "0"]),
    (["train", "--set", "widht=64"], ["widht", "did you mean 'width'", "membership"]),
    (["train", "--set", "width=3.5"], ["width", "3.5"]),
    (["train", "--set", "shared_qk=yes"], ["shared_qk", "yes"]),
    (["train", "--set", "width"], ["NAME=VALUE", "width"]),
])
def test_a_bad_option_stops_the_command_before_anything_runs(argv, names, capsys, no_work):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.splitlines()[-1].startswith(f"rt_numpy {argv[0]}: error: argument ")
    for name in names:
        assert name in err.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "width=30"], "--set: width must be a multiple of num_heads=4, got 30"),
    (["train", "--set", "width=64", "--set", "width=32"], "--set width is given twice: as 64 and as 32"),
    (["train", "--lr", "1e-5"], "min_lr must be <= lr=1e-05"),
    (["demo", "--preset", "tiny", "--set", "window_size=128"], "--set: window_size must be <= seq_len=64"),
])
def test_a_bad_config_is_one_line_with_status_2_before_training(argv, message, capsys, no_work):
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"rt_numpy {argv[0]}: error: {message}")
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_library_errors_are_one_line_and_real_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    code, _, err = run(["eval", str(tmp_path / "missing")], capsys)  # train.CheckpointError
    assert code == 2 and err.startswith("rt_numpy eval: error: checkpoint ") and "missing file" in err
    (tmp_path / "file").write_text("")
    code, _, err = run(["train", "--out", str(tmp_path / "file"), "--no-progress"], capsys)  # before training
    assert code == 2 and err.startswith("rt_numpy train: error: ") and "not a directory" in err

    def bug(*args, **kwargs):
        raise IndexError("a real bug")

    monkeypatch.setattr(train, "train", bug)
    with pytest.raises(IndexError, match="a real bug"):
        cli.main(["train", "--out", "", "--no-progress"])
    monkeypatch.setenv("RT_NUMPY_TRACEBACK", "1")  # library errors raise too
    with pytest.raises(train.CheckpointError):
        cli.main(["eval", str(tmp_path / "missing")])


def test_set_reads_every_config_field_by_its_type():
    for field in dataclasses.fields(model.Config):
        text = str(field.default).lower() if isinstance(field.default, bool) else str(field.default)
        name, value = cli.assignment(f"{field.name}={text}")
        assert (name, value) == (field.name, field.default) and type(value) is type(field.default)
    assert cli.assignment("dropout=0.25") == ("dropout", 0.25)
    assert cli.assignment("mem_kv=True") == ("mem_kv", True)
    assert cli.assignment("membership=nearest") == ("membership", "nearest")

    @dataclasses.dataclass
    class Options:
        limit: int | None = None

    assert cli.assignment("limit=none", Options) == ("limit", None)
    assert cli.assignment("limit=3", Options) == ("limit", 3)
    with pytest.raises(argparse.ArgumentTypeError, match="must be true or false"):
        cli.assignment("shared_qk=None")  # a bool field does not take None


def test_help_documents_set_with_an_example(capsys):
    for argv, example in ((["train", "--help"], "train --preset tiny --set membership=nearest"),
                          (["eval", "--help"], "eval runs/tiny/checkpoint --set membership=nearest"),
                          (["sample", "--help"], "sample runs/tiny/checkpoint --set membership=nearest")):
        code, out, _ = run(argv, capsys)
        assert code == 0 and "--set NAME=VALUE" in out and example in out and "window_size" in out


# --------------------------------------------------------------------------- --set on a trained model
def test_train_set_reaches_the_checkpoint(checkpoint):
    state = train.load_checkpoint(checkpoint)
    assert state["cfg"] == dataclasses.replace(train.PRESETS["tiny"][0], window_size=16) and state["step"] == 2


def test_eval_and_sample_run_the_weights_under_another_attention(checkpoint, capsys, monkeypatch):
    seen = []
    evaluate, generate = train.evaluate, sample.generate
    monkeypatch.setattr(train, "evaluate", lambda params, states, cfg, *a, **k: seen.append(cfg) or
                        evaluate(params, states, cfg, *a, **k))
    monkeypatch.setattr(sample, "generate", lambda params, cfg, *a, **k: seen.append(cfg) or
                        generate(params, cfg, *a, **k))
    code, out, err = run(["eval", checkpoint, "--max-batches", "1", "--impl", "ref", "--set", "membership=nearest",
                          "--set", "window_size=32"], capsys)
    assert code == 0, err
    assert "membership 'balanced' -> 'nearest', window_size 16 -> 32" in out and "val: " in out and "test: " in out
    assert [(c.membership, c.window_size) for c in seen] == [("nearest", 32)] * 2
    code, out, err = run(["eval", checkpoint, "--max-batches", "1", "--impl", "ref", "--set", "attention=dense"],
                         capsys)
    assert code == 0, err  # no routing layer left: the k-means state is not needed
    assert seen[-1].attention == "dense"
    code, out, err = run(["sample", checkpoint, "--n-new", "5", "--impl", "ref", "--set", "look_back=0", "--raw",
                          "--prompt", "ab"], capsys)
    assert code == 0, err
    assert "look_back 1 -> 0" in out and out.split("\n", 1)[1].startswith("ab") and seen[-1].look_back == 0


@pytest.mark.parametrize("changes, named, reason", [
    (["seq_len=128"], "seq_len=128", "wpe"),
    (["membership=nearest", "num_clusters=4"], "num_clusters=4", "kmeans_states"),
    (["shared_qk=false"], "shared_qk=False", "w_k"),
    (["dtype=float64"], "dtype='float64'", "float64"),
])
def test_eval_refuses_a_change_the_weights_do_not_fit(checkpoint, changes, named, reason, capsys):
    argv = ["eval", checkpoint, "--max-batches", "1"]
    for change in changes:
        argv += ["--set", change]
    code, out, err = run(argv, capsys)
    assert code == 2 and "val:" not in out
    assert err.startswith(f"rt_numpy eval: error: --set {named} does not fit the checkpoint's weights (")
    assert reason in err and "membership=" not in err  # only the change to blame is named


# --------------------------------------------------------------------------- resume
def test_resume_keeps_the_checkpoints_configs_and_lists_what_it_ignores(tmp_path, capsys):
    cfg, tcfg = train.PRESETS["tiny"]
    tcfg = dataclasses.replace(tcfg, steps=2)
    train.train(cfg, tcfg, out_dir=str(tmp_path), stop_at=1, progress=False, log=lambda *a: None, impl="ref")
    path = str(tmp_path / "checkpoint")
    code, out, err = run(["train", "--resume", path, "--preset", "small", "--steps", "5", "--set",
                          "membership=nearest", "--no-progress", "--impl", "ref"], capsys)
    assert code == 0, err
    ignored = err.split("ignored: ")[1]
    for item in ("steps=5 (checkpoint: 2)", "membership='nearest' (checkpoint: 'balanced')",
                 "width=128 (checkpoint: 32)"):  # the flags, --set and the preset
        assert item in ignored
    assert f"resuming {path} at step 1 of 2" in out and "after 2 steps" in out
    assert train.load_checkpoint(path)["step"] == 2 and train.load_checkpoint(path)["cfg"] == cfg
    # a finished run: evaluated, nothing trained
    code, out, err = run(["train", "--resume", path, "--steps", "2", "--no-progress", "--impl", "ref"], capsys)
    assert code == 0, err
    assert err == "" and "at step 2 of 2" in out and "held-out (validation)" in out


# --------------------------------------------------------------------------- Ctrl-C
class FakeInterrupted(KeyboardInterrupt):
    """What train.train raises on Ctrl-C: the step and the checkpoint it saved."""

    def __init__(self, step, checkpoint):
        super().__init__()
        self.step, self.checkpoint = step, checkpoint


@pytest.mark.parametrize("error, line", [
    (FakeInterrupted(7, "/runs/x/checkpoint"), "rt_numpy train: interrupted at step 7; checkpoint saved: "
                                               "/runs/x/checkpoint"),
    (FakeInterrupted(3, None), "rt_numpy train: interrupted at step 3; no checkpoint saved"),
    (KeyboardInterrupt(), "rt_numpy train: interrupted; no checkpoint saved"),
])
def test_ctrl_c_prints_one_line_and_exits_130(error, line, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "train", interrupted)
    code, _, err = run(["train", "--out", "", "--no-progress"], capsys)
    assert code == 130 and err == line + "\n"


def test_ctrl_c_during_training_names_the_saved_checkpoint(tmp_path, capsys, monkeypatch):
    """The real loop: train.train saves the last completed step and raises train.Interrupted."""
    real_step, calls = train.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second step
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", step)
    code, _, err = run(["train", "--steps", "3", "--out", str(tmp_path), "--impl", "ref", "--no-progress"], capsys)
    assert code == 130
    assert err == f"rt_numpy train: interrupted at step 1; checkpoint saved: {tmp_path / 'checkpoint'}\n"
    assert train.load_checkpoint(tmp_path / "checkpoint")["step"] == 1


# --------------------------------------------------------------------------- the demo's sample
def test_held_out_prompt_is_fixed_and_from_the_test_split():
    text, where = cli.held_out_prompt("python")
    assert cli.held_out_prompt("python") == (text, where) and "held-out" in where
    assert text.startswith("# file: ") and text.endswith("\n") and text.count("\n") == cli.PROMPT_LINES
    raw, _ = data.load_corpus("python")
    test = bytes(data.split(raw)["test"])
    assert test.find(text.encode()) > 0 and bytes(data.split(raw)["train"]).find(text.encode()) < 0


def test_readable_counts_long_whitespace_and_escapes_control_characters():
    code = "def f():\n        return 1\n\tx = 2\n"
    assert cli.readable(code) == (code, 0)  # indentation stays
    shown, n = cli.readable("stand s." + " " * 300 + "x" + "\n" * 30 + "y\x1b[0m")
    assert n == 2 and shown == "stand s.[... 300 spaces ...]x[... 30 newlines ...]\ny\\x1b[0m"
    assert cli.readable(" \n" * 20) == ("[... 20 spaces, 20 newlines ...]\n", 1)


def test_demo_prints_the_held_out_prompt_and_its_continuation_apart(tmp_path, capsys):
    code, out, err = run(["demo", "--preset", "tiny", "--steps", "2", "--n-new", "8", "--out", str(tmp_path),
                          "--no-progress", "--impl", "ref"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    prompt, _ = cli.held_out_prompt("python")
    start = lines.index(next(line for line in lines if line.startswith("---- prompt: the first 4 lines")))
    assert lines[start - 1] == "sample: 8 bytes, temperature 0.8, top-k None, top-p 0.95, seed 0"
    assert lines[start + 1:start + 5] == prompt.splitlines()
    assert lines[start + 5].startswith("---- continuation ---")
    assert "held-out (test split)" in out and "checkpoint: " in out


def test_sample_prints_a_given_prompt_apart_from_its_continuation(checkpoint, capsys):
    code, out, err = run(["sample", checkpoint, "--n-new", "3", "--prompt", "def ", "--seed", "1", "--impl", "ref"],
                         capsys)
    assert code == 0, err
    assert out.startswith("sample: 3 bytes, temperature 0.8, top-k None, top-p 0.95, seed 1\n---- prompt: --prompt ---")
    assert "\ndef \n---- continuation (continues the prompt's last line) ---" in out


def test_sample_cache_follows_the_model_and_refuses_where_it_is_not_exact(checkpoint, capsys, monkeypatch):
    used = []
    real = sample.generate

    def spy(*args, **kwargs):
        used.append(kwargs["cache"])
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "generate", spy)
    base = ["sample", checkpoint, "--n-new", "3", "--prompt", "def ", "--impl", "ref"]
    code, _, err = run(base, capsys)  # balanced routing: full recompute, and stderr says why
    assert code == 0 and used == ["auto"] and "no exact key/value cache" in err and "balanced" in err
    code, _, err = run(base + ["--cache"], capsys)
    assert code == 2 and err.startswith("rt_numpy sample: error: ") and "cache" in err and "evict" in err
    code, _, err = run(base + ["--set", "membership=nearest"], capsys)  # exact: the cache, silently
    assert code == 0 and used[-1] == "auto" and "no exact key/value cache" not in err
    code, _, err = run(base + ["--no-cache"], capsys)
    assert code == 0 and used[-1] is False
