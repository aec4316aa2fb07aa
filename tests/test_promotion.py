"""Multi-fidelity promotion: the top quantile goes on to the full set; ties at the cut share a quota."""

from __future__ import annotations

import numpy as np

from evomerge.driver.promotion import Promotion


def test_equal_subset_scores_promote_the_quantile_not_everyone():
    p = Promotion(0.34)
    promoted = [p.decide(i, 0.969) for i in range(30)]  # a plateau, as coarse real-model subsets give
    assert sum(promoted) == 11  # ceil(0.34 * 30) = 11: about a third, not all 30
    assert promoted[0]  # the first one is promoted: nothing is known yet


def test_a_score_above_the_cut_is_always_promoted_and_each_candidate_once():
    p = Promotion(0.25)
    for i in range(8):
        p.decide(i, 0.5)
    assert p.decide(100, 0.9)  # better than everything seen
    assert not p.decide(100, 0.95)  # already promoted
    assert not p.decide(101, 0.1)


def test_distinct_scores_promote_about_the_quantile_and_the_decisions_are_a_function_of_the_scores():
    scores = np.random.default_rng(0).random(200)
    runs = []
    for _ in range(2):
        p = Promotion(0.3)
        runs.append([p.decide(i, float(s)) for i, s in enumerate(scores)])
    assert runs[0] == runs[1]
    assert 0.25 < np.mean(runs[0]) < 0.45  # early candidates are judged against few scores
