"""The bench scripts run (tiny sizes) and write well-formed records.  No timings are asserted."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
IMPLS = {"rt_numpy-ref", "rt_numpy-numba", "rt_numpy-cupy", "sklearn", "routing_transformer", "torch-sdpa", "numpy"}


@pytest.mark.parametrize("script", ["kmeans.py", "recall.py", "arms.py", "nearest.py", "generate.py", "decode_gap.py",
                                    "cold_start.py"])
def test_bench_quick_writes_records(script, tmp_path):
    out = tmp_path / "records.json"
    result = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| case" in result.stdout  # the table was printed
    records = json.loads(out.read_text())
    assert isinstance(records, list) and records
    for r in records:
        assert set(r) == {"impl", "case", "metric", "value", "unit"}
        assert r["impl"] in IMPLS
        assert isinstance(r["case"], dict) and r["case"]
        assert isinstance(r["value"], float) and r["value"] >= 0 and r["value"] < float("inf")
    assert {r["impl"] for r in records} & {"rt_numpy-ref", "rt_numpy-numba"}


def test_cold_start_reports_the_warm_step(tmp_path):
    """The warm-cache run times its extra steps; they are not counted in the seconds to the first step."""
    out = tmp_path / "records.json"
    result = subprocess.run([sys.executable, str(BENCH / "cold_start.py"), "--quick", "--steps", "2",
                             "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    steps = [r for r in records if r["metric"] == "warm_step_median"]
    assert [r["case"] for r in steps] == [{"task": "tiny", "pass": "warm", "arm": "two processes"}]
    first = {r["case"]["pass"]: r["value"] for r in records if r["metric"] == "seconds_to_first_step"}
    ends = {r["case"]["pass"]: r["value"] for r in records if r["metric"] == "first_step_ends_at"}
    assert first["warm"] >= ends["warm"]  # the child's own first-step mark fits inside the parent's wall
