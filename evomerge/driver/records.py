"""What the loop works with: the run config's loop settings, one handled result, the start policy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from evomerge.driver.baselines import Baseline
from evomerge.driver.pool import Job
from evomerge.evaluation import Candidate, EvalResult
from evomerge.references import References

#: Builds the search's optimizer from the scored baselines and the references: (optimizer, warm-start info).
StartPolicy = Callable[[list["Handled"], References], tuple[Any, "dict[str, Any] | None"]]


@dataclass(frozen=True)
class Handled:
    """One result the driver has handled (and the archive holds), in handling order."""

    job: Job
    candidate: Candidate
    result: EvalResult
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def split(self) -> str:
        return self.job.split

    @property
    def ok(self) -> bool:
        return self.result.ok


@dataclass
class Settings:
    """What the run config says about the loop."""

    tasks: list[str]
    baselines: list[Baseline]
    budget_evals: int | None
    budget_seconds: float | None
    subset: int | None
    promote_quantile: float
    rescore_test: bool
    subset_method: str = "random"
    promote_confidence: float = 0.5
    #: The run's seed (the anchor subset's choice inside each cluster).
    seed: int = 0
    #: (low, high) per task from the suite's ``reference:`` fields; other tasks use the base and best source.
    declared: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: ``fidelity.early_stop`` (off, front, mean) and ``fidelity.early_stop_chunks``.
    early_stop: str = "off"
    early_stop_chunks: int = 4
