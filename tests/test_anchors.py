"""The calibration subset and its estimator: anchor strata from the reference models' per-example scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.driver.subset import SUBSET_FILE, calibration_subset
from evomerge.errors import CheckpointError, ConfigError
from evomerge.evaluation import EvalResult, TaskScores
from evomerge.scoring.anchors import CalibrationSubset, choose_subset
from evomerge.scoring.data import Example
from evomerge.scoring.suite import pick_examples

N, K = 200, 50  # a zoo task's calibration split and a quarter of it


def _result(ids, scores, tasks=("t",)):
    return EvalResult(0, "ok", {t: TaskScores(tuple(ids), np.asarray(scores, dtype=np.float64)) for t in tasks})


def _world(seed=0):
    """0/1 scores of a base and two experts on N examples, and candidates that mostly follow them: where the
    three agree a candidate agrees 95% of the time; where they disagree it solves each with its own rate."""
    rng = np.random.default_rng(seed)
    skill = rng.integers(0, 3, N)  # which expert's skill an example tests (0: general)
    base = rng.random(N) < np.where(skill == 0, 0.8, 0.2)
    experts = [rng.random(N) < np.where(skill == s, 0.95, np.where(skill == 0, 0.7, 0.15)) for s in (1, 2)]
    refs = np.stack([base, *experts], 1).astype(float)
    agree = refs.min(1) == refs.max(1)
    cands = []
    for _ in range(40):
        rate = rng.uniform(0.2, 0.9, 3)
        solve = np.where(agree, np.where(rng.random(N) < 0.95, refs[:, 0], 1 - refs[:, 0]),
                         rng.random(N) < rate[skill])
        cands.append(solve.astype(float))
    return refs, cands


def test_the_anchor_estimate_is_closer_than_a_random_subsets_and_its_error_bar_covers_it():
    refs, cands = _world()
    ids = [f"e{i}" for i in range(N)]
    results = [_result(ids, refs[:, j]) for j in range(3)]
    errors: dict[str, list[float]] = {"random": [], "anchor": []}
    covered = 0
    for seed in range(5):
        anchor = choose_subset("anchor", K, seed, results, ["t"])
        chosen = set(anchor.tasks["t"].chosen)
        assert len(chosen) == K and all(set(s) & chosen for s in anchor.tasks["t"].strata)  # each stratum sampled
        rand = choose_subset("random", K, seed, results, ["t"])
        picked = sorted(np.random.default_rng(seed).choice(N, K, replace=False))
        for c in cands:
            a_idx = [i for i in range(N) if ids[i] in chosen]
            est = anchor.estimate(_result([ids[i] for i in a_idx], c[a_idx]))["t"]
            r_est = rand.estimate(_result([ids[i] for i in picked], c[picked]))["t"]
            errors["anchor"].append(est.mean - c.mean())
            errors["random"].append(r_est.mean - c.mean())
            covered += abs(est.mean - c.mean()) <= 2 * est.se
    rmse = {m: float(np.sqrt(np.mean(np.square(e)))) for m, e in errors.items()}
    assert rmse["anchor"] < 0.9 * rmse["random"], rmse  # measured: 0.055 against 0.067
    assert covered / len(errors["anchor"]) > 0.85  # the standard error is an honest error bar


def test_a_full_set_result_is_estimated_exactly_and_the_choice_is_deterministic():
    refs, cands = _world(1)
    ids = [f"e{i}" for i in range(N)]
    results = [_result(ids, refs[:, j]) for j in range(3)]
    sub = choose_subset("anchor", K, 3, results, ["t"])
    assert sub == choose_subset("anchor", K, 3, results, ["t"])
    assert sub.tasks["t"].chosen != choose_subset("anchor", K, 4, results, ["t"]).tasks["t"].chosen
    est = sub.estimate(_result(ids, cands[0]))["t"]
    assert est.mean == pytest.approx(cands[0].mean()) and est.se == 0.0
    assert CalibrationSubset.from_json(json.loads(json.dumps(sub.to_json())), source="x") == sub
    # continuous scores (a perplexity task): more distinct score vectors than strata, clustered by Ward linkage
    x = np.random.default_rng(2).normal(size=(N, 3))
    cont = choose_subset("anchor", 8, 0, [_result(ids, x[:, j]) for j in range(3)], ["t"])
    assert len(cont.tasks["t"].strata) == 4 and len(cont.tasks["t"].chosen) == 8


def test_the_subset_is_kept_in_the_run_folder_and_a_damaged_or_foreign_file_is_refused(tmp_path):
    ids = [f"e{i}" for i in range(N)]
    refs, _ = _world(2)
    results = [_result(ids, refs[:, j], ("a", "b")) for j in range(3)]
    first = calibration_subset(tmp_path, "anchor", K, 0, results, ["a", "b"])
    assert (tmp_path / SUBSET_FILE).exists()
    # read back, not chosen again: other reference scores do not change a stored subset
    assert calibration_subset(tmp_path, "anchor", K, 0, results[:1], ["a", "b"]) == first
    with pytest.raises(CheckpointError, match="subset_method random, subset 50"):
        calibration_subset(tmp_path, "random", K, 0, results, ["a", "b"])
    (tmp_path / SUBSET_FILE).write_text('{"format": "evomerge.calibration_subset", "version": 1}')
    with pytest.raises(CheckpointError, match=f"{SUBSET_FILE}: cannot read"):
        calibration_subset(tmp_path, "anchor", K, 0, results, ["a", "b"])


def test_a_scorer_subset_of_ids_picks_those_examples_and_names_an_unknown_one():
    examples = tuple(Example(f"e{i}", prompt="p", answer="a") for i in range(6))
    assert [e.id for e in pick_examples(examples, {"t": ["e4", "e1"]}, task="t")] == ["e1", "e4"]
    assert pick_examples(examples, {"other": ["e1"]}, task="t") == examples  # a task not named: whole
    with pytest.raises(ConfigError, match="task 't': the subset names example id 'x9'"):
        pick_examples(examples, {"t": ["e1", "x9"]}, task="t")
