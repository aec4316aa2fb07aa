"""Multi-fidelity promotion: a candidate scored on the calibration subset goes on to the full set when its
subset score is in the top ``quantile`` of the subset scores seen so far (itself included).

Scores strictly above the quantile's cut are always promoted. Scores *at* the cut share a quota: coarse
subsets (a 32-example subset moves in steps of 1/32) and plateaus give many equal scores, and promoting every
one of them would re-score nearly every candidate on the full set, costing more than no subset at all. A tied
score is promoted only while fewer than ``ceil(quantile x scores seen)`` candidates have been promoted.
"""

from __future__ import annotations

import math

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
        if candidate_id in self.promoted:
            return False
        cut = float(np.quantile(self.scores, 1 - self.quantile))
        quota = math.ceil(self.quantile * len(self.scores))
        if score > cut or (score == cut and len(self.promoted) < quota):
            self.promoted.add(candidate_id)
            return True
        return False
