"""Per-task references of a run: the base's score (0) and the best source's score (1).

One type used by the driver (the objectives it tells the optimizer), :class:`~evomerge.results.RunResults`,
the report and the model card. References are taken per split from the base and source models scored on the
full example set of that split.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from evomerge.evaluation import EvalResult

#: Below this reference range a task is only shifted (``value - low``), not scaled.
MIN_RANGE = 1e-9


class Scored(Protocol):
    """What references are computed from: a scored baseline (an archive record or a driver result)."""

    @property
    def meta(self) -> Mapping[str, Any]: ...

    @property
    def result(self) -> EvalResult: ...


@dataclass(frozen=True)
class References:
    """``low`` (base) and ``high`` (best source) per task; ``normalize`` maps base to 0 and best source to 1."""

    low: dict[str, float] = field(default_factory=dict)
    high: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_scored(cls, scored: Iterable[Scored], tasks: Iterable[str],
                    declared: Mapping[str, tuple[float, float]] | None = None) -> References:
        """References from the successful base (``meta.kind == 'base'``) and source (``'source'``) rows; a task
        without a base row gets low 0, without a source row high 1. ``declared``: (low, high) per task, as a
        task suite's ``reference:`` sets them (e.g. chance level and a perfect score), which take precedence."""
        rows = [s for s in scored if s.result.ok]
        base = [s.result for s in rows if s.meta.get("kind") == "base"]
        sources = [s.result for s in rows if s.meta.get("kind") == "source"]
        low = {t: (base[0].tasks[t].mean if base else 0.0) for t in tasks}
        high = {t: (max(r.tasks[t].mean for r in sources) if sources else 1.0) for t in low}
        for t, (lo, hi) in (declared or {}).items():
            if t in low:
                low[t], high[t] = float(lo), float(hi)
        return cls(low, high)

    def value(self, task: str, raw: float) -> float:
        lo, hi = self.low.get(task, 0.0), self.high.get(task, 1.0)
        return (raw - lo) / (hi - lo) if hi - lo > MIN_RANGE else raw - lo

    def normalize(self, means: Mapping[str, float]) -> dict[str, float]:
        return {t: self.value(t, v) for t, v in means.items()}

    def objectives(self, result: EvalResult, tasks: Iterable[str]) -> npt.NDArray[np.float64]:
        means = result.task_means()
        return np.array([self.value(t, means[t]) for t in tasks], dtype=np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"low": dict(self.low), "high": dict(self.high)}
