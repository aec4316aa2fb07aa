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
    labels = ("cma_es", "nevergrad", "random", "m2n2", "cma_es-warm", "cma_es-warm-worst")
    for label in labels:
        assert f"evolved: {label}** (" in table
    for name in ("expert add", "expert rev", "task_arithmetic", "ties", "multitask (upper ref.)"):
        assert name in table
    data = json.loads((out / "study-quick.json").read_text())
    assert [r["search"] for r in data["results"]] == list(labels)
    for r in data["results"]:
        assert r["evaluations"] == 10
        assert all(0.0 <= v <= 1.0 for v in r["best_test"].values())
        assert Path(r["run_dir"], "report", "pareto.png").is_file()
    assert (out / "study-quick-pareto.png").is_file()
    # warm starts evaluate their start point first: task arithmetic at the best lambda of the grid
    from evomerge.results import RunResults

    ta_best = next(v for v in data["extras"]["2 experts (add, rev)"].values() if v.get("ta_best"))
    for r in data["results"]:
        if r["search"].startswith("cma_es-warm"):
            first = RunResults(r["run_dir"]).by_candidate(0)
            assert first.result.task_means() == pytest.approx(ta_best["calibration"], abs=1e-9)
            assert r["pick"] == ("worst" if r["search"].endswith("worst") else "mean")
