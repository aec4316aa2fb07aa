"""Scalarization: one higher-is-better number from a vector of per-task scores.

Single-objective optimizers (CMA-ES, nevergrad in its default mode) and every optimizer's
``recommend`` rank candidates by a scalarization chosen with the option ``scalarize``:

* ``"mean"`` — the mean of the task scores (default);
* ``"worst"`` — the lowest task score (max-min fairness across tasks);
* a mapping ``{task: weight}`` — the weighted mean ``sum(w_k s_k) / sum(w_k)``; weights are
  non-negative, tasks left out weigh 0, at least one weight must be positive.

All three are monotone in every task score, so the best candidate under a scalarization is never
strictly dominated by another candidate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from evomerge.errors import ConfigError

#: What the ``scalarize`` option accepts.
ScalarizeSpec = str | Mapping[str, float]

SCALARIZATIONS = ("mean", "worst")


class Scalarizer:
    """Maps a per-task score vector (ordered like ``task_names``) to one higher-is-better float."""

    def __init__(self, spec: ScalarizeSpec, task_names: Sequence[str]) -> None:
        self.task_names = tuple(task_names)
        if not self.task_names:
            raise ConfigError("scalarize: the problem has no task names")
        self.kind: str
        self.weights: npt.NDArray[np.float64] | None = None
        if isinstance(spec, str):
            if spec not in SCALARIZATIONS:
                raise ConfigError(
                    f"option scalarize: unknown scalarization {spec!r}; valid: "
                    f"{', '.join(SCALARIZATIONS)} or a mapping task -> weight"
                )
            self.kind = spec
        elif isinstance(spec, Mapping):
            self.kind = "weights"
            self.weights = _weights(spec, self.task_names)
        else:
            raise ConfigError(
                f"option scalarize: expected 'mean', 'worst' or a mapping task -> weight, got {type(spec).__name__}"
            )

    def __call__(self, objectives: npt.ArrayLike) -> float:
        """The scalar score of one per-task score vector (higher is better)."""
        values = np.asarray(objectives, dtype=np.float64)
        if values.shape != (len(self.task_names),):
            raise ValueError(
                f"expected {len(self.task_names)} task scores ({', '.join(self.task_names)}), got shape {values.shape}"
            )
        if self.kind == "mean":
            return float(np.mean(values))
        if self.kind == "worst":
            return float(np.min(values))
        assert self.weights is not None
        return float(np.dot(self.weights, values))

    def describe(self) -> str:
        if self.kind != "weights":
            return self.kind
        assert self.weights is not None
        parts = (f"{t}={w:g}" for t, w in zip(self.task_names, self.weights, strict=True) if w > 0)
        return "weights(" + ", ".join(parts) + ")"


def _weights(spec: Mapping[str, float], task_names: tuple[str, ...]) -> npt.NDArray[np.float64]:
    unknown = sorted(set(spec) - set(task_names))
    if unknown:
        raise ConfigError(
            f"option scalarize: unknown task {unknown[0]!r}; tasks of this problem: {', '.join(task_names)}"
        )
    weights = np.zeros(len(task_names), dtype=np.float64)
    for i, task in enumerate(task_names):
        if task not in spec:
            continue
        try:
            w = float(spec[task])
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"option scalarize.{task}: weight must be a number, got {spec[task]!r}"
            ) from exc
        if not np.isfinite(w) or w < 0:
            raise ConfigError(f"option scalarize.{task}: weight must be finite and >= 0, got {w}")
        weights[i] = w
    total = weights.sum()
    if total <= 0:
        raise ConfigError("option scalarize: at least one task weight must be positive")
    return weights / total
