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
         "--evals", "4", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "study-quick.md").read_text()
    labels = ("cma_es", "nevergrad", "random", "m2n2", "cma_es-warm", "cma_es-warm-worst", "random-warm",
              "cma_es-warm-long")
    for label in labels:
        assert f"evolved: {label}** (" in table
    for name in ("expert add", "expert rev", "task_arithmetic", "ties", "multitask (upper ref.)"):
        assert name in table
    data = json.loads((out / "study-quick.json").read_text())
    assert [r["search"] for r in data["results"]] == list(labels)
    assert "Seeds whose picked merge holds >= 0.97 of every expert on test: cma_es " in table
    assert "Random search over the warm space (12 evaluations, x0 first): reached 0.95" in table
    for r in data["results"]:
        assert r["evaluations"] == r["budget"] == (12 if r["search"] in ("random-warm", "cma_es-warm-long") else 4)
        assert all(0.0 <= v <= 1.0 for v in r["best_test"].values())
        assert Path(r["run_dir"], "report", "pareto.png").is_file()
    assert (out / "study-quick-pareto.png").is_file()
    # warm starts evaluate their start point first: task arithmetic at the best lambda of the grid
    from evomerge.results import RunResults

    ta_best = next(v for v in data["extras"]["2 experts (add, rev)"].values() if v.get("ta_best"))
    for r in data["results"]:
        if r["search"].startswith(("cma_es-warm", "random-warm")):
            first = RunResults(r["run_dir"]).by_candidate(0)
            assert first.result.task_means() == pytest.approx(ta_best["calibration"], abs=1e-9)
            assert r["pick"] == ("worst" if r["search"].endswith("worst") else "mean")


def test_speedup_over_random_counts_misses_as_the_budget():
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        from study_report import speedup_vs_random
    finally:
        sys.path.pop(0)
    assert speedup_vs_random([50, 70], [180, 240], 450) == (3.5, False)
    ratio, lower = speedup_vs_random([60, 60], [None, 300], 450)  # one random seed never got there
    assert ratio == pytest.approx(375 / 60) and lower
    ratio, _ = speedup_vs_random([60, None], [100, 100], 450)  # the search itself missed on a seed: no ratio
    assert ratio != ratio
