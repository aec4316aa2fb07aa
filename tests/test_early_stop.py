"""fidelity.early_stop: chunked full-set scoring that stops a candidate once it cannot reach the front / best."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from evomerge.driver.early_stop import bound, score_in_chunks
from evomerge.evaluation import TaskScores
from evomerge.references import References
from evomerge.scoring.base import ScoreOutput


@dataclass(frozen=True)
class _Task:
    name: str
    kind: str = "generate"


@dataclass(frozen=True)
class _Suite:
    tasks: tuple[_Task, ...]

    def select(self, names):
        return _Suite(tuple(t for t in self.tasks if t.name in names))


def _scorer(truth: dict[str, dict[str, float]], calls: list[int]):
    """Scores each example by a fixed table and counts the examples it was asked to score."""
    def score(suite, chunk):
        calls.append(sum(len(ids) for ids in chunk.values()))
        return ScoreOutput({t: TaskScores(ids, np.array([truth[t][i] for i in ids])) for t, ids in chunk.items()},
                           timings={"total": 1.0})
    return score


def _problem(per_task: float, n: int = 40):
    ids = {t: tuple(f"{t}{i}" for i in range(n)) for t in ("a", "b")}
    rng = np.random.default_rng(0)
    truth = {t: {i: float(rng.random() < per_task) for i in ids[t]} for t in ids}
    return _Suite((_Task("a"), _Task("b"))), ids, truth


REFS = References(low={"a": 0.0, "b": 0.0}, high={"a": 1.0, "b": 1.0})


def test_a_candidate_that_cannot_reach_the_best_mean_stops_after_the_first_chunk():
    suite, ids, truth = _problem(0.0)  # scores 0 everywhere
    stop = bound("mean", 4, ["a", "b"], REFS, [np.array([0.8, 0.9])])
    calls: list[int] = []
    out, stopped = score_in_chunks(_scorer(truth, calls), suite, ids, stop)
    # after 10 of 40 examples per task a perfect rest gives 0.75 < 0.85
    assert stopped and calls == [20]
    assert {t: len(ts.scores) for t, ts in out.tasks.items()} == {"a": 10, "b": 10}
    assert out.tasks["a"].example_ids == ids["a"][:10]


def test_a_candidate_that_can_reach_is_scored_in_full_in_order():
    suite, ids, truth = _problem(0.9)
    stop = bound("front", 4, ["a", "b"], REFS, [np.array([0.8, 0.9]), np.array([0.7, 0.95]), np.array([0.6, 0.8])])
    assert len(stop.front) == 2  # the dominated objective vector is not part of the front
    calls: list[int] = []
    out, stopped = score_in_chunks(_scorer(truth, calls), suite, ids, stop)
    assert not stopped and sum(calls) == 80 and len(calls) == 4
    for t in ("a", "b"):
        assert out.tasks[t].example_ids == ids[t]
        assert out.tasks[t].scores.tolist() == [truth[t][i] for i in ids[t]]
    assert out.timings["total"] == 4.0


def test_the_front_bound_stops_only_a_dominated_optimistic_vector():
    # a bad task a but perfect on b can never be dominated by a front that is below 1 on b
    suite, ids, truth = _problem(0.0)
    truth["b"] = {i: 1.0 for i in ids["b"]}
    stop = bound("front", 4, ["a", "b"], REFS, [np.array([0.9, 0.9])])
    out, stopped = score_in_chunks(_scorer(truth, []), suite, ids, stop)
    assert not stopped and len(out.tasks["a"].scores) == 40
    # with a front member at 1 on b it is stopped once a's bound falls below 0.9 (after 2 chunks: 0.5)
    stop = bound("front", 4, ["a", "b"], REFS, [np.array([0.9, 1.0])])
    calls: list[int] = []
    out, stopped = score_in_chunks(_scorer(truth, calls), suite, ids, stop)
    assert stopped and calls == [20]  # after one chunk: a <= 0.75 < 0.9, b <= 1.0 = 1.0


def test_a_task_without_a_best_example_score_never_stops_a_candidate():
    suite, ids, truth = _problem(0.0)
    suite = _Suite((_Task("a", "perplexity"), _Task("b")))
    stop = bound("mean", 4, ["a", "b"], REFS, [np.array([0.8, 0.9])])
    calls: list[int] = []
    _, stopped = score_in_chunks(_scorer(truth, calls), suite, ids, stop)
    assert not stopped and sum(calls) == 80


def test_savings_measured_over_a_population():
    """The examples saved when most candidates are far below the best (the measured count, not a constant)."""
    stop = bound("mean", 8, ["a", "b"], REFS, [np.array([0.85, 0.85])])
    scored = 0
    for p in (0.1, 0.3, 0.5, 0.9, 0.95):
        suite, ids, truth = _problem(p)
        out, _ = score_in_chunks(_scorer(truth, []), suite, ids, stop)
        scored += sum(len(ts.scores) for ts in out.tasks.values())
    assert 0 < scored < 5 * 80
    assert scored >= 2 * 80  # the two that can reach are scored in full


def test_early_stop_with_a_subset_is_refused():
    from evomerge.config.models import FidelityConfig

    with pytest.raises(ValueError, match="fidelity.early_stop"):
        FidelityConfig(subset=8, early_stop="front")
    assert FidelityConfig(early_stop="mean", early_stop_chunks=3).early_stop_chunks == 3


def test_early_stop_with_an_optimizer_that_needs_every_example_is_refused():
    from evomerge.config.models import RunConfig
    from evomerge.driver.checks import check_early_stop
    from evomerge.errors import ConfigError

    base = {"name": "x", "sources": {"a": "/a", "b": "/b"}, "fitness": {"suite": "builtin:zoo"},
            "fidelity": {"early_stop": "front"}}
    m2n2 = RunConfig.model_validate({**base, "optimizer": {"name": "m2n2"}, "space": {"template": "builtin:segments"}})
    with pytest.raises(ConfigError, match="fidelity.early_stop: optimizer m2n2"):
        check_early_stop(m2n2)
    ok = RunConfig.model_validate({**base, "optimizer": {"name": "cma_es"}, "space": {"template": "builtin:ties-per-layer"}})
    check_early_stop(ok)
    assert ok.fidelity.early_stop == "front"
