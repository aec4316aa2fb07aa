"""Multi-fidelity promotion: a candidate scored on the calibration subset goes on to the full set when its
subset score is in the top ``quantile`` of the subset scores seen so far (itself included)."""

from __future__ import annotations

import numpy as np


class Promotion:
    """Decides, result by result, which subset-scored candidates are re-scored on the full calibration set.

    The decision depends only on the sequence of subset scores told so far, so a run replayed from its archive
    promotes exactly the same candidates.
    """

    def __init__(self, quantile: float) -> None:
        self.quantile = quantile
        self.scores: list[float] = []
        self.promoted: set[int] = set()

    def decide(self, candidate_id: int, score: float) -> bool:
        """Record ``score`` and say whether ``candidate_id`` is promoted (at most once)."""
        self.scores.append(score)
        cut = float(np.quantile(self.scores, 1 - self.quantile))
        if score >= cut and candidate_id not in self.promoted:
            self.promoted.add(candidate_id)
            return True
        return False
