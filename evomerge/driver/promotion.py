"""Multi-fidelity promotion: which candidates scored on the calibration subset are re-scored on the full set.

A candidate comes with an *estimate* of its full-set objectives and their standard errors
(:mod:`evomerge.scoring.anchors`). Its upper confidence bound is ``estimate + z * se`` (``z`` from
``fidelity.promote_confidence``), per task and for the mean over tasks. It is promoted when all three hold:

1. *Cut*: the bound on the mean reaches the ``1 - quantile`` quantile of the estimated means seen so far (itself
   included), so what is promoted is the top share by estimate and what might be in it given its error.
2. *Front*: the bound per task is not dominated by the full-set objectives of any candidate scored in full so far
   (the baselines and earlier promotions): a candidate that cannot reach the front, even at its upper bound, is
   not worth a full pass.
3. *Quota*, unless the estimate itself is above the cut: fewer than ``ceil(quantile x candidates seen)`` have
   been promoted. A coarse subset (32 examples move in steps of 1/32) or a plateau gives many equal estimates,
   and a quantile over few scores puts its cut at the common value; without the quota every candidate tied at
   the cut, or reaching it only through its error bar, would be re-scored, costing more than no subset at all.

Ties are broken by arrival: among equal estimates the earlier result takes a free quota slot. Every decision
depends only on the sequence of estimates and full-set scores told so far, so a run replayed from its archive
promotes exactly the same candidates.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import numpy.typing as npt


class Promotion:
    """Decides, result by result, which subset-scored candidates are re-scored on the full calibration set."""

    def __init__(self, quantile: float, confidence: float = 0.5) -> None:
        self.quantile = quantile
        self.z = NormalDist().inv_cdf(confidence)
        self.scores: list[float] = []  # estimated mean objective of each candidate decided on
        self.front: list[npt.NDArray[np.float64]] = []  # full-set objectives (pruned to the non-dominated)
        self.promoted: set[int] = set()

    def observe_full(self, objectives: npt.NDArray[np.float64]) -> None:
        """A candidate's (or a baseline's) objectives on the full calibration set."""
        x = np.asarray(objectives, dtype=np.float64)
        if not np.all(np.isfinite(x)) or any(_dominates(f, x) or np.array_equal(f, x) for f in self.front):
            return
        self.front = [f for f in self.front if not _dominates(x, f)] + [x]

    def decide(self, candidate_id: int, objectives: npt.NDArray[np.float64],
               se: npt.NDArray[np.float64] | None = None) -> bool:
        """Record a candidate's estimated objectives (and their standard errors) and say whether it is promoted
        (at most once)."""
        est = np.atleast_1d(np.asarray(objectives, dtype=np.float64))
        err = np.zeros_like(est) if se is None else np.atleast_1d(np.asarray(se, dtype=np.float64))
        score = float(np.mean(est))
        self.scores.append(score)
        if candidate_id in self.promoted:
            return False
        cut = float(np.quantile(self.scores, 1 - self.quantile))
        mean_se = float(np.sqrt(np.sum(err**2)) / max(1, len(err)))
        if score + self.z * mean_se < cut:
            return False
        bound = est + self.z * err
        if any(_dominates(f, bound) for f in self.front):
            return False
        if score <= cut and len(self.promoted) >= math.ceil(self.quantile * len(self.scores)):
            return False
        self.promoted.add(candidate_id)
        return True


def _dominates(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> bool:
    """``a`` is at least ``b`` on every objective and better on one (maximization)."""
    return bool(np.all(a >= b) and np.any(a > b))
