"""Candidates and what evaluating them produced: plain data passed between the optimizer, the driver, the
workers and the archive."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

Status = Literal["ok", "failed"]


@dataclass(frozen=True)
class Candidate:
    """One proposal of an optimizer: its id (unique within a run, increasing) and its genome."""

    id: int
    genome: npt.NDArray[np.float64]
    #: Optimizer bookkeeping that must travel with the candidate (e.g. generation, parents).
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskScores:
    """Per-example scores of one task (higher is better) and the ids of those examples."""

    example_ids: tuple[str, ...]
    scores: npt.NDArray[np.float64]
    metric: str = "score"

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores)) if len(self.scores) else float("nan")


@dataclass(frozen=True)
class EvalResult:
    """What evaluating one candidate produced: per-task per-example scores, or a failure."""

    candidate_id: int
    status: Status
    tasks: dict[str, TaskScores] = field(default_factory=dict)
    error: str | None = None
    #: Seconds spent per phase: "merge", "score", "total" …
    timings: dict[str, float] = field(default_factory=dict)
    worker: str | None = None
    fidelity: str = "full"

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def task_means(self) -> dict[str, float]:
        return {name: ts.mean for name, ts in self.tasks.items()}

    def archived(self) -> EvalResult:
        """This result as the archive gives it back: float64 scores, non-finite scores turned into a failure."""
        if not self.ok:
            return self
        tasks: dict[str, TaskScores] = {}
        for name, ts in self.tasks.items():
            scores = np.asarray(ts.scores, dtype=np.float64)
            if not np.all(np.isfinite(scores)):
                return EvalResult(self.candidate_id, "failed", {}, f"non-finite scores in task {name!r}",
                                  self.timings, self.worker, self.fidelity)
            tasks[name] = TaskScores(tuple(ts.example_ids), scores, ts.metric)
        return EvalResult(self.candidate_id, self.status, tasks, self.error, self.timings, self.worker, self.fidelity)
