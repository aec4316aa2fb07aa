"""The worker: re-scoring the merge it already holds does not merge again, and gives the same scores."""

from __future__ import annotations

from pathlib import Path

from evomerge.driver.pool import Job
from evomerge.driver.worker import Worker, WorkerSpec
from evomerge.recipe import Recipe
from evomerge.testing.family import build_family, write_perplexity_suite


def _ta(weight: float) -> Recipe:
    return Recipe(method="task_arithmetic", base_model="base",
                  models=({"model": "m1", "parameters": {"weight": weight}},
                          {"model": "m2", "parameters": {"weight": weight}}))


def test_worker_skips_the_merge_it_already_holds(tmp_path: Path) -> None:
    fam = build_family(tmp_path / "fam", 2)
    suite = write_perplexity_suite(tmp_path / "suite")
    spec = WorkerSpec(sources={k: str(v) for k, v in fam.items()}, reference="base", order=("m1", "m2"),
                      suite=str(suite), threads=1)
    worker = Worker(spec)
    a, b = _ta(0.5), _ta(1.0)
    first = worker.evaluate(Job(0, 0, a, "calibration", None))
    again = worker.evaluate(Job(1, 0, a, "calibration", 2))
    assert first.ok and again.ok and again.timings["merge"] == 0.0
    other = worker.evaluate(Job(2, 1, b, "calibration", None))
    back = worker.evaluate(Job(3, 0, a, "calibration", None))
    assert other.timings["merge"] > 0 and back.timings["merge"] > 0
    for name, ts in first.tasks.items():
        assert ts.scores.tolist() == back.tasks[name].scores.tolist()
        assert ts.scores.tolist() != other.tasks[name].scores.tolist()
        kept = set(again.tasks[name].example_ids)
        assert [s for i, s in zip(ts.example_ids, ts.scores.tolist(), strict=True) if i in kept] == again.tasks[name].scores.tolist()
