"""Early stopping (``fidelity.early_stop``): a searched candidate's full calibration set is scored in chunks and
scoring ends once even a perfect score on the examples left cannot reach the run's front (``front``) or the best
mean objective scored so far (``mean``).

The driver builds the bound (:func:`bound`) from the results it handled before it submits the job, and the job
carries it to the worker; the worker scores the chunks (:func:`score_in_chunks`) and checks the bound after each.
A stopped candidate comes back with the scores of the examples it was scored on and fidelity ``stopped``: it is
told to the optimizer with those partial means, but it is no full-set score (it enters neither the front, nor the
best, nor the test re-scoring). The bound is a function of the handled results, so a replayed run rebuilds the
same jobs and exact resume holds.

Optimistic objective of a task: ``(sum of scored examples + examples left x best example score) / examples``,
normalized by the run's references; the best example score is 1 for ``generate`` and ``choice`` tasks (exact
match, accuracy) and unbounded for other kinds, which never stop a candidate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.evaluation import TaskScores
from evomerge.scoring.base import ScoreOutput

STOPPED = "stopped"
#: The best score one example can get, per task kind (kinds not listed: no bound).
BEST_EXAMPLE_SCORE = {"generate": 1.0, "choice": 1.0}


@dataclass(frozen=True)
class EarlyStop:
    """What a worker needs to stop a candidate early (picklable: it travels with the job)."""

    tasks: tuple[str, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    chunks: int
    #: Normalized objectives of the full-set front (``front`` mode); empty in ``mean`` mode.
    front: tuple[tuple[float, ...], ...] = ()
    #: Best mean normalized objective scored in full (``mean`` mode).
    best_mean: float | None = None

    def value(self, i: int, raw: float) -> float:
        lo, hi = self.low[i], self.high[i]
        return (raw - lo) / (hi - lo) if hi - lo > 1e-12 else raw - lo

    def cannot_reach(self, optimistic_raw: Sequence[float]) -> bool:
        """Whether a candidate whose task means are at most ``optimistic_raw`` cannot reach the bound."""
        x = np.array([self.value(i, r) for i, r in enumerate(optimistic_raw)], dtype=np.float64)
        if self.best_mean is not None:
            return bool(np.mean(x) < self.best_mean)
        return any(bool(np.all(f >= x) and np.any(f > x)) for f in map(np.asarray, self.front))


def bound(mode: str, chunks: int, tasks: Sequence[str], refs: Any, full_objectives: Sequence[np.ndarray]) -> EarlyStop:
    """The bound for the next job from the normalized objectives of everything scored in full so far."""
    low = tuple(float(refs.low.get(t, 0.0)) for t in tasks)
    high = tuple(float(refs.high.get(t, 1.0)) for t in tasks)
    ok = [np.asarray(o, dtype=np.float64) for o in full_objectives if np.all(np.isfinite(o))]
    if mode == "mean":
        best = max((float(np.mean(o)) for o in ok), default=None)
        return EarlyStop(tuple(tasks), low, high, chunks, best_mean=best)
    front = [o for o in ok if not any(np.all(f >= o) and np.any(f > o) for f in ok)]
    return EarlyStop(tuple(tasks), low, high, chunks, front=tuple(tuple(map(float, f)) for f in front))


def score_in_chunks(score: Any, suite: Any, examples: dict[str, tuple[str, ...]], stop: EarlyStop
                    ) -> tuple[ScoreOutput, bool]:
    """Score ``examples`` (ids per task, in order) in ``stop.chunks`` chunks of every task; ``score(suite,
    subset)`` scores one chunk. Returns the scores so far and whether the candidate was stopped early."""
    parts = {t: np.array_split(np.asarray(ids, dtype=object), stop.chunks) for t, ids in examples.items()}
    best = {t.name: BEST_EXAMPLE_SCORE.get(t.kind) for t in suite.tasks}
    got: dict[str, list[TaskScores]] = {t: [] for t in examples}
    timings: dict[str, float] = {}
    for i in range(stop.chunks):
        chunk = {t: tuple(p[i]) for t, p in parts.items() if len(p[i])}
        if chunk:
            out = score(suite.select(list(chunk)), chunk)
            for t, ts in out.tasks.items():
                got[t].append(ts)
            for k, v in out.timings.items():
                timings[k] = timings.get(k, 0.0) + v
        last = i == stop.chunks - 1
        if last:
            break
        optimistic = []
        for t in stop.tasks:
            n_done = sum(len(ts.scores) for ts in got[t])
            left = len(examples[t]) - n_done
            top = best.get(t)
            if top is None:
                optimistic.append(np.inf)
                continue
            optimistic.append((sum(float(np.sum(ts.scores)) for ts in got[t]) + left * top) / len(examples[t]))
        if stop.cannot_reach(optimistic):
            return _merged(got, timings), True
    return _merged(got, timings), False


def _merged(got: dict[str, list[TaskScores]], timings: dict[str, float]) -> ScoreOutput:
    tasks = {t: TaskScores(tuple(i for ts in parts for i in ts.example_ids),
                           np.concatenate([ts.scores for ts in parts]) if parts else np.zeros(0),
                           parts[0].metric if parts else "score")
             for t, parts in got.items() if parts}
    return ScoreOutput(tasks, timings=timings)
