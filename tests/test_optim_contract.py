"""Contract tests run over every registered optimizer, selected by declared capabilities."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable

import moocore
import numpy as np
import pytest

from evomerge.errors import ConfigError, OptimizerError
from evomerge.evaluation import Candidate
from evomerge.optim import BASELINE, BUDGET, MULTIOBJECTIVE, OPTIMIZERS, Observation, Problem

ALL = OPTIMIZERS.names()
SEARCHERS = [n for n in ALL if BASELINE not in OPTIMIZERS.capabilities(n)]
DIM = 6
CENTER = np.array([0.31, 0.72, 0.44, 0.63, 0.27, 0.58])
# Bayesian optimization is meant for tens of evaluations and costs ~0.1-1 s of CPU per ask: here it runs with a
# cheap acquisition optimization and hyperparameters refitted every 8 successes, and races random search over
# 30 evaluations instead of 120 (the contract under test is the protocol, not the acquisition's fine print).
TEST_OPTIONS = {"bo": {"raw_samples": 16, "num_restarts": 1, "acqf_maxiter": 15, "mc_samples": 16, "refit_every": 8}}
RACE_BUDGET = {"bo": 30}
#: Seeds of the race, and tells of the other contract runs, for optimizers whose every ask fits a model (a GP):
#: fewer, still past the initial design, so each property is checked in the model-based phase too.
RACE_SEEDS = {"bo": 2}
SHORT_RUN = {"bo": 20}


def make(name: str, problem: Problem, seed: int, budget: int = 100, **options) -> object:
    if BUDGET in OPTIMIZERS.capabilities(name):
        options.setdefault("budget", budget)
    for key, value in TEST_OPTIONS.get(name, {}).items():
        options.setdefault(key, value)
    return OPTIMIZERS.get(name)(problem, seed=seed, **options)


def sphere_scores(x: np.ndarray) -> np.ndarray:
    """Per-coordinate accuracies in [0, 1], best (all ones) at CENTER."""
    return 1.0 - (x - CENTER) ** 2


def rastrigin_scores(x: np.ndarray) -> np.ndarray:
    """Per-coordinate Rastrigin terms mapped to (0, 1], many local optima, best at CENTER."""
    z = 5.12 * (x - CENTER)
    return 1.0 / (1.0 + z**2 - 10.0 * np.cos(2 * np.pi * z) + 10.0)


def evaluator(
    scores: Callable[[np.ndarray], np.ndarray], fail: Callable[[Candidate], bool] = lambda c: False
):
    def evaluate(c: Candidate) -> Observation:
        if fail(c):
            return Observation.failure(c.id)
        s = scores(c.genome)
        return Observation(c.id, objectives=np.array([s.mean()]), per_example=s)

    return evaluate


class Loop:
    """A tiny asynchronous driver: keeps ``workers`` candidates out and tells one at random each step."""

    def __init__(self, opt, evaluate, *, workers: int = 4, seed: int = 0) -> None:
        self.opt, self.evaluate, self.workers = opt, evaluate, workers
        self.rng = np.random.default_rng(seed)
        self.pending: list[Candidate] = []
        self.asked: list[Candidate] = []
        self.told = 0

    def fork(self, opt) -> Loop:
        other = Loop(opt, self.evaluate, workers=self.workers)
        other.rng, other.pending = copy.deepcopy(self.rng), list(self.pending)
        return other

    def run(self, n_tells: int) -> Loop:
        for _ in range(n_tells):
            free = self.workers - len(self.pending)
            if free > 0:
                new = self.opt.ask(free)
                self.pending += new
                self.asked += new
            assert self.pending, "the optimizer proposes nothing while nothing is pending"
            cand = self.pending.pop(int(self.rng.integers(len(self.pending))))
            self.opt.tell(self.evaluate(cand))
            self.told += 1
        return self


def best_score(opt) -> float:
    rec = opt.recommend()
    assert rec is not None
    return float(rec.meta["score"])


@pytest.mark.parametrize("scores", [sphere_scores, rastrigin_scores], ids=["sphere", "rastrigin"])
@pytest.mark.parametrize("name", SEARCHERS)
def test_beats_random_search_at_equal_budget(name, scores):
    problem, budget = Problem.unit_cube(DIM), RACE_BUDGET.get(name, 120)
    mine, rand = [], []
    for seed in range(RACE_SEEDS.get(name, 5)):
        mine.append(
            best_score(Loop(make(name, problem, seed, budget), evaluator(scores), seed=seed).run(budget).opt)
        )
        rand.append(
            best_score(Loop(make("random", problem, seed), evaluator(scores), seed=seed).run(budget).opt)
        )
    assert np.mean(mine) > np.mean(rand), (mine, rand)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_proposals_and_global_rng_untouched(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problem = Problem.unit_cube(DIM)
    OPTIMIZERS.get(name)  # importing nevergrad itself draws from the global RNG; running must not
    before = np.random.get_state()
    runs = [
        Loop(make(name, problem, seed), evaluator(sphere_scores), seed=7).run(SHORT_RUN.get(name, 40)).asked
        for seed in (3, 3, 4)
    ]
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    assert [c.id for c in runs[0]] == list(range(len(runs[0])))
    assert [c.id for c in runs[0]] == [c.id for c in runs[1]]
    assert all(np.array_equal(a.genome, b.genome) for a, b in zip(runs[0], runs[1], strict=True))
    assert not all(np.array_equal(a.genome, b.genome) for a, b in zip(runs[0], runs[2], strict=False))
    assert os.listdir(tmp_path) == []  # nothing written to the working directory (cma's outcmaes/)


def assert_round_trip(name: str, *, before: int = 23, after: int = 30, evaluate=None, **options) -> None:
    """Run ``before`` tells, load the JSON state into a fresh optimizer (another seed) with candidates still
    pending, and check that both then propose and recommend the same for ``after`` more tells."""
    problem = Problem.unit_cube(DIM)
    fail = lambda c: c.id % 7 == 5  # noqa: E731
    evaluate = evaluate or evaluator(sphere_scores, fail)
    loop = Loop(make(name, problem, seed=11, **options), evaluate, seed=2).run(before)
    assert loop.pending, "the round trip must happen with candidates still pending"
    state = json.loads(json.dumps(loop.opt.state_dict()))
    fresh = make(name, problem, seed=999, **options)
    fresh.load_state_dict(state)
    assert fresh.pending_ids == loop.opt.pending_ids
    twin = loop.fork(fresh)
    n_before = len(loop.asked)
    loop.run(after)
    twin.run(after)
    after = loop.asked[n_before:]
    assert twin.asked and [c.id for c in after] == [c.id for c in twin.asked]
    assert all(
        np.array_equal(a.genome, b.genome) and a.meta == b.meta
        for a, b in zip(after, twin.asked, strict=True)
    )
    assert loop.opt.state_dict()["rng"] == twin.opt.state_dict()["rng"]
    assert loop.opt.recommend().id == twin.opt.recommend().id


@pytest.mark.parametrize("name", ALL)
def test_state_round_trip_into_fresh_optimizer_reproduces_the_run(name):
    if name in SHORT_RUN:
        assert_round_trip(name, before=SHORT_RUN[name] // 2 + 3, after=SHORT_RUN[name] // 2)
    else:
        assert_round_trip(name)


@pytest.mark.parametrize("name", ALL)
def test_out_of_order_failures_and_non_finite_scores(name):
    problem = Problem.unit_cube(DIM)
    opt = make(name, problem, seed=5)
    told, n_failed = 0, 0
    while told < 60:
        batch = opt.ask(5)
        assert batch
        obs = []
        for c in reversed(batch):
            s = sphere_scores(c.genome)
            if c.id % 5 == 1:
                obs.append(Observation.failure(c.id))
                n_failed += 1
            elif c.id % 5 == 3 and c.id > 10:
                obs.append(Observation(c.id, objectives=[float("nan")], per_example=s))
                n_failed += 1
            else:
                obs.append(Observation(c.id, objectives=[s.mean()], per_example=s))
        opt.tell(obs)
        told += len(batch)
    assert opt.n_failed == n_failed and opt.n_told == told and opt.n_pending == 0
    rec = opt.recommend()
    assert rec is not None and rec.id % 5 != 1 and np.isfinite(rec.meta["score"])
    np.testing.assert_allclose(rec.meta["score"], sphere_scores(rec.genome).mean())
    assert len(opt.ask(3)) > 0


@pytest.mark.parametrize("name", ALL)
def test_unknown_and_repeated_ids_are_refused(name):
    opt = make(name, Problem.unit_cube(3), seed=0)
    (c,) = opt.ask(1)
    with pytest.raises(OptimizerError, match="unknown candidate"):
        opt.tell(Observation(c.id + 100, objectives=[0.5]))
    with pytest.raises(OptimizerError, match="already told"):
        opt.tell([Observation(c.id, objectives=[0.5]), Observation(c.id, objectives=[0.5])])
    assert opt.n_pending == 1  # a refused batch records nothing
    opt.tell(Observation(c.id, objectives=[0.5]))
    with pytest.raises(OptimizerError, match="already told"):
        opt.tell(Observation(c.id, objectives=[0.5]))
    with pytest.raises(OptimizerError, match="objectives"):
        opt.tell(Observation(opt.ask(1)[0].id, objectives=[0.5, 0.1]))


@pytest.mark.parametrize("name", ALL)
def test_options_are_validated_and_state_checks_its_origin(name):
    problem = Problem.unit_cube(3)
    with pytest.raises(ConfigError, match=r"unknown option 'no_such_option'.*valid options: .*scalarize"):
        make(name, problem, 0, no_such_option=1)
    with pytest.raises(ConfigError, match="scalarize"):
        make(name, problem, 0, scalarize={"missing_task": 1.0})
    opt = make(name, problem, 0)
    state = opt.state_dict()
    other = make(name, problem, 0, scalarize="worst")
    with pytest.raises(OptimizerError, match="options"):
        other.load_state_dict(state)
    with pytest.raises(OptimizerError, match="dim"):
        make(name, Problem.unit_cube(4), 0).load_state_dict(state)
    foreign = next(n for n in ALL if n != name)
    with pytest.raises(OptimizerError, match="state is of optimizer"):
        make(foreign, problem, 0).load_state_dict(state)


def test_every_registered_optimizer_has_typed_config_options():
    from evomerge.config.optimizers import OPTIMIZER_CONFIGS

    assert set(OPTIMIZER_CONFIGS) == set(ALL)
    for name in ALL:
        assert OPTIMIZERS.get(name).Options is OPTIMIZER_CONFIGS[name], name


@pytest.mark.parametrize("name", OPTIMIZERS.names(having={MULTIOBJECTIVE}))
def test_multiobjective_recommend_is_on_the_pareto_front(name):
    problem = Problem.unit_cube(3, task_names=("left", "right"))

    def evaluate(c: Candidate) -> Observation:
        x = c.genome
        return Observation(c.id, objectives=[1 - np.sum((x - 0.2) ** 2) / 3, 1 - np.sum((x - 0.8) ** 2) / 3])

    # bo: 12 tells (8 past its initial design of 4), each ask a qLogNEHVI fit over two GPs
    loop = Loop(make(name, problem, seed=1, multiobjective=True), evaluate, seed=1).run({"bo": 12}.get(name, 50))
    points = np.array([evaluate(c).objectives for c in loop.asked if c.id not in loop.opt.pending_ids])
    rec = loop.opt.recommend()
    rec_point = np.asarray(rec.meta["objectives"])
    np.testing.assert_allclose(rec_point, evaluate(rec).objectives)
    dominated = np.all(points >= rec_point, axis=1) & np.any(points > rec_point, axis=1)
    assert not dominated.any()
    front = moocore.is_nondominated(points, maximise=True)
    assert any(np.array_equal(p, rec_point) for p in points[front])


# ---------------------------------------------------------------------- Optuna samplers beyond the default
# The registry entry ``optuna`` runs TPESampler in the tests above; these run the other samplers it supports
# through the same checks (small budgets: GPSampler fits a Gaussian process per ask).

OPTUNA_CASES = {
    "GPSampler": ({"sampler": "GPSampler", "sampler_options": {"n_startup_trials": 4}}, 7, 4),
    "CmaEsSampler": ({"sampler": "CmaEsSampler", "sampler_options": {"popsize": 5}}, 23, 30),
    "NSGAIISampler": ({"sampler": "NSGAIISampler", "sampler_options": {"population_size": 6}}, 23, 30),
    "NSGAIIISampler": ({"sampler": "NSGAIIISampler", "sampler_options": {"population_size": 6}}, 23, 30),
    "QMCSampler": ({"sampler": "QMCSampler"}, 23, 30),
    "RandomSampler": ({"sampler": "RandomSampler"}, 23, 30),
}


@pytest.mark.parametrize("case", list(OPTUNA_CASES))
def test_optuna_samplers_round_trip_exactly(case):
    options, before, after = OPTUNA_CASES[case]
    assert_round_trip("optuna", before=before, after=after, **options)


@pytest.mark.parametrize("case", ["NSGAIISampler", "NSGAIIISampler"])
def test_optuna_multiobjective_samplers_round_trip_exactly(case):
    options, before, after = OPTUNA_CASES[case]

    def evaluate(c: Candidate) -> Observation:
        if c.id % 7 == 5:
            return Observation.failure(c.id)
        x = c.genome
        return Observation(c.id, objectives=[1 - np.mean((x - 0.2) ** 2), 1 - np.mean((x - 0.8) ** 2)])

    problem = Problem.unit_cube(DIM, task_names=("left", "right"))
    loop = Loop(make("optuna", problem, seed=3, multiobjective=True, **options), evaluate, seed=2).run(before)
    fresh = make("optuna", problem, seed=4, multiobjective=True, **options)
    fresh.load_state_dict(json.loads(json.dumps(loop.opt.state_dict())))
    twin = loop.fork(fresh)
    n_before = len(loop.asked)
    loop.run(after)
    twin.run(after)
    assert [c.genome.tolist() for c in loop.asked[n_before:]] == [c.genome.tolist() for c in twin.asked]
    assert [c.id for c in loop.opt.pareto_front()] == [c.id for c in twin.opt.pareto_front()]


@pytest.mark.parametrize(
    ("case", "budget", "seeds", "workers"),
    [("CmaEsSampler", 120, 5, 4), ("GPSampler", 20, 2, 1)],  # GP: sequential Bayesian optimization
    ids=["cma", "gp"],
)
def test_optuna_samplers_beat_random_search(case, budget, seeds, workers):
    import torch

    options = OPTUNA_CASES[case][0]
    problem = Problem.unit_cube(DIM)
    mine, rand = [], []
    before = np.random.get_state()[1].copy(), torch.get_rng_state()
    for seed in range(seeds):
        opt = make("optuna", problem, seed, x0_first=False, **options)
        mine.append(best_score(Loop(opt, evaluator(sphere_scores), workers=workers, seed=seed).run(budget).opt))
        opt = make("random", problem, seed, x0_first=False)
        rand.append(best_score(Loop(opt, evaluator(sphere_scores), workers=workers, seed=seed).run(budget).opt))
    assert np.mean(mine) > np.mean(rand), (mine, rand)
    # GPSampler fits with torch and samples with scipy and torch QMC engines: the global generators stay as they were
    assert np.array_equal(before[0], np.random.get_state()[1]) and torch.equal(before[1], torch.get_rng_state())


def test_optuna_nsga2_searches_the_pareto_front_better_than_random_sampling():
    """NSGA-II told both task scores spreads along the front of two conflicting tasks: its told points cover
    a larger hypervolume than Optuna's RandomSampler's at the same budget, and it recommends a front member."""
    problem = Problem.unit_cube(3, task_names=("left", "right"))

    def evaluate(c: Candidate) -> Observation:
        x = c.genome
        return Observation(c.id, objectives=[1 - np.sum((x - 0.2) ** 2) / 3, 1 - np.sum((x - 0.8) ** 2) / 3])

    volumes = {}
    for sampler, extra in (("NSGAIISampler", {"population_size": 10}), ("RandomSampler", {})):
        runs = []
        for seed in range(3):
            opt = make("optuna", problem, seed, multiobjective=True, x0_first=False, sampler=sampler,
                       sampler_options=extra)
            loop = Loop(opt, evaluate, seed=seed).run(120)
            points = np.array([c.meta["objectives"] for c in opt.pareto_front()])
            rec = opt.recommend()
            assert rec.id in {c.id for c in opt.pareto_front()}
            assert moocore.is_nondominated(points, maximise=True).all()
            assert len(opt.study.directions) == 2 and len(loop.asked) >= 120
            runs.append(moocore.hypervolume(points, ref=[0.0, 0.0], maximise=True))
        volumes[sampler] = float(np.mean(runs))
    assert volumes["NSGAIISampler"] > volumes["RandomSampler"], volumes


def test_optuna_qmc_covers_the_box_more_evenly_than_random_sampling():
    """QMCSampler's scrambled Sobol points have a lower discrepancy than independent uniform samples."""
    from scipy.stats import qmc

    problem = Problem.unit_cube(4)
    disc = {}
    for sampler in ("QMCSampler", "RandomSampler"):
        values = []
        for seed in range(3):
            opt = make("optuna", problem, seed, sampler=sampler, x0_first=False)
            genomes = [c.genome for c in opt.ask(64)]
            values.append(qmc.discrepancy(np.array(genomes)))
        disc[sampler] = float(np.mean(values))
    assert disc["QMCSampler"] < 0.5 * disc["RandomSampler"], disc
