"""Random search: independent uniform samples in the bounds, the baseline every optimizer must beat."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from evomerge.config.optimizers import RandomOptions
from evomerge.optim.base import BaseOptimizer, Told


class RandomOptimizer(BaseOptimizer):
    """Uniform sampling in ``[lower, upper]``; fully asynchronous, never stops by itself.

    Failures change nothing (every proposal is independent); ``recommend`` is the best scalarized
    candidate told so far.
    """

    name = "random"
    Options = RandomOptions
    options: RandomOptions

    def _setup(self) -> None:
        self._x0_given = not self.options.x0_first

    def _propose(self, n: int) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
        out: list[tuple[npt.NDArray[np.float64], dict[str, Any]]] = []
        if not self._x0_given:
            self._x0_given = True
            out.append((self.problem.x0.copy(), {"origin": "x0"}))
        for _ in range(n - len(out)):
            out.append((self._rng.uniform(self.problem.lower, self.problem.upper), {"origin": "uniform"}))
        return out

    def _observe(self, told: list[Told]) -> None:
        return None

    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        return {"x0_given": self._x0_given}, None

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        self._x0_given = bool(impl["x0_given"])
