"""`experiments/study.py --quick` reproduces a reduced study table (run on the session's test zoo)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_study_produces_the_table(zoo_test, tmp_path):
    out = tmp_path / "study"
    proc = subprocess.run(
        [sys.executable, str(REPO / "experiments" / "study.py"), "--quick", "--zoo", str(zoo_test.root),
         "--evals", "10", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "study-quick.md").read_text()
    for label in ("cma_es", "nevergrad", "random", "m2n2"):
        assert f"evolved: {label}" in table
    for name in ("expert add", "expert rev", "task_arithmetic", "ties", "multitask (upper ref.)"):
        assert name in table
    data = json.loads((out / "study-quick.json").read_text())
    assert len(data["results"]) == 4
    for r in data["results"]:
        assert r["evaluations"] == 10
        assert all(0.0 <= v <= 1.0 for v in r["best_test"].values())
        assert Path(r["run_dir"], "report", "pareto.png").is_file()
