"""Multi-fidelity promotion: the top quantile by estimate, bounded by the scored front; ties share a quota."""

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


def test_ten_tied_subset_scores_with_their_error_do_not_all_go_to_the_full_set():
    """The real-model case: a 32-example subset gave 0.969 to each of the first 10 candidates. Each estimate has
    a standard error, so each tied candidate could reach the cut; the quota promotes the earliest ones only, and
    once the first promoted one is scored in full, a tied candidate whose upper bound cannot beat it is not sent."""
    se = np.sqrt(0.969 * 0.031 / 32) * np.sqrt(1 - 32 / 200)
    p = Promotion(0.34, confidence=0.9)
    promoted = [i for i in range(10) if p.decide(i, np.array([0.969, 0.969]), np.array([se, se]))]
    assert promoted == [0, 2, 5, 8]  # ceil(0.34 n) = 1, 1, 2, 2, 2, 3, 3, 3, 4, 4 slots, taken in arrival order
    q = Promotion(0.34, confidence=0.9)
    assert q.decide(0, np.array([0.969, 0.969]), np.array([se, se]))
    q.observe_full(np.array([1.02, 1.02]))  # its full-set score: above any tied bound (0.969 + 1.28 se = 1.005)
    assert not any(q.decide(i, np.array([0.969, 0.969]), np.array([se, se])) for i in range(1, 10))


def test_an_upper_bound_dominated_by_the_scored_front_is_not_promoted_even_above_the_cut():
    p = Promotion(0.5, confidence=0.9)
    p.observe_full(np.array([0.8, 0.8]))
    p.observe_full(np.array([0.7, 0.7]))  # dominated: dropped from the front
    assert len(p.front) == 1
    for i in range(4):
        p.decide(i, np.array([0.1, 0.1]), np.array([0.01, 0.01]))
    assert not p.decide(10, np.array([0.6, 0.6]), np.array([0.05, 0.05]))  # bound 0.66 < 0.8 on both tasks
    assert p.decide(11, np.array([0.6, 0.9]), np.array([0.05, 0.05]))  # can beat the front on one task


def test_a_wide_error_bar_reaches_the_cut_only_at_a_high_confidence():
    def second(confidence: float) -> bool:
        p = Promotion(0.25, confidence=confidence)
        for i in range(7):
            p.decide(i, np.array([0.56 - 0.01 * i]), np.array([0.0]))  # only the first is promoted
        return p.decide(7, np.array([0.45]), np.array([0.1]))  # below the cut (0.5425); bound 0.45 + z * 0.1

    assert second(0.9) and not second(0.5)
