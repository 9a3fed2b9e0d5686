"""Every tutorial executes as a notebook (jupytext source -> nbclient), and every solution script runs,
with the fast knob on.

The tutorials assert their own from-scratch results against the library, so a
tutorial that runs to the end has also checked those equalities.  The solution
scripts run each exercise's check on the model answer (tutorials/checks/).
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIAL_DIR = Path(__file__).resolve().parent.parent / "tutorials"
SOLUTIONS = sorted((TUTORIAL_DIR / "solutions").glob("[0-9][0-9]_*.py"))

jupytext = pytest.importorskip("jupytext")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = sorted(TUTORIAL_DIR.glob("[0-9][0-9]_*.py"))


def test_there_are_tutorials():
    assert TUTORIALS, "no tutorials/NN_*.py found"


@pytest.mark.slow
@pytest.mark.parametrize("path", TUTORIALS, ids=[p.stem for p in TUTORIALS])
def test_tutorial_executes(path, monkeypatch, tmp_path):
    monkeypatch.setenv("RT_NUMPY_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TUTORIAL_DIR), os.environ.get("PYTHONPATH", "")]))
    notebook = jupytext.read(path)
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails
    errors = [o for cell in notebook.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_every_tutorial_with_exercises_has_solutions():
    with_exercises = {p.stem for p in TUTORIALS if "from checks import" in p.read_text()}
    missing = with_exercises - {p.stem for p in SOLUTIONS}
    assert not missing, f"tutorials with exercises need tutorials/solutions/<stem>.py: {sorted(missing)}"


@pytest.mark.slow
@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_solution_passes_its_checks(path, tmp_path):
    env = dict(os.environ, RT_NUMPY_FAST="1", MPLBACKEND="Agg", RT_NUMPY_FIG_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=900, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith("Exercise ")]
    assert len(verdicts) >= 3 and all(line.endswith(": correct") for line in verdicts), done.stdout[-3000:]
