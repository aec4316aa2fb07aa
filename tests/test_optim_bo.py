"""Bayesian optimization (``bo``): initial design, fantasized pending points, failures, multi-objective mode and
exact resume in the model-based phase. The registry-wide contract is in ``test_optim_contract.py``."""

from __future__ import annotations

import json

import moocore
import numpy as np
import pytest

pytest.importorskip("botorch")

import torch  # noqa: E402

from evomerge.errors import ConfigError  # noqa: E402
from evomerge.optim import OPTIMIZERS, Observation, Problem  # noqa: E402

CHEAP = {"raw_samples": 16, "num_restarts": 1, "acqf_maxiter": 15, "mc_samples": 16}
CENTER = np.array([0.3, 0.7, 0.45, 0.6])


def bo(problem: Problem, seed: int = 0, **options):
    return OPTIMIZERS.get("bo")(problem, seed=seed, **{**CHEAP, **options})


def score(x: np.ndarray) -> list[float]:
    return [float(1 - np.mean((x - CENTER[: x.size]) ** 2))]


def tell_all(opt, cands) -> None:
    opt.tell([Observation(c.id, objectives=score(c.genome)) for c in cands])


def test_initial_design_is_x0_then_sobol_then_the_model():
    problem = Problem.unit_cube(4, x0=[0.9, 0.1, 0.2, 0.8])
    opt = bo(problem, n_init=5)
    first = opt.ask(3)
    np.testing.assert_array_equal(first[0].genome, problem.x0)
    assert [c.meta for c in first] == [{"phase": "init", "design": "x0"}] + [{"phase": "init", "design": "sobol"}] * 2
    # nothing told yet: the rest of the design, then more Sobol points (no model without data; nobody waits)
    more = opt.ask(4)
    assert [c.meta["phase"] for c in more] == ["init", "init", "sobol", "sobol"]
    genomes = np.stack([c.genome for c in first + more])
    assert len(np.unique(genomes.round(12), axis=0)) == 7
    tell_all(opt, first + more)
    assert [c.meta["phase"] for c in opt.ask(2)] == ["model", "model"]
    # the default design size follows the dimension
    assert bo(Problem.unit_cube(2)).n_init == 4 and bo(Problem.unit_cube(30)).n_init == 10


def test_pending_candidates_are_fantasized_so_asks_without_tells_differ():
    opt = bo(Problem.unit_cube(4), seed=1, n_init=6)
    tell_all(opt, opt.ask(6))
    a, b = opt.ask(1), opt.ask(1)
    joint = opt.ask(3)
    cands = a + b + joint
    assert all(c.meta["phase"] == "model" for c in cands)
    gs = np.stack([c.genome for c in cands])
    dists = np.linalg.norm(gs[:, None] - gs[None], axis=-1)[np.triu_indices(len(gs), 1)]
    assert dists.min() > 1e-3, dists
    assert np.all((gs >= 0) & (gs <= 1))


def test_failures_never_reach_the_gp_and_are_not_proposed_again():
    opt = bo(Problem.unit_cube(3), seed=2, n_init=5)
    tell_all(opt, opt.ask(5))
    failed = []
    for _ in range(3):
        (c,) = opt.ask(1)
        assert c.meta["phase"] == "model"
        opt.tell(Observation.failure(c.id))
        failed.append(c.genome)
    X, Y = opt._training_data()
    assert X.shape == (5, 3) and torch.isfinite(Y).all()
    (c,) = opt.ask(1)
    assert min(np.linalg.norm(c.genome - f) for f in failed) > 1e-3
    opt.tell(Observation(c.id, objectives=[float("inf")]))  # a non-finite score is a failure too
    assert opt.n_failed == 4 and opt._training_data()[0].shape == (5, 3)
    assert opt.ask(1)[0].meta["phase"] == "model"


def test_multiobjective_uses_one_gp_per_task_and_recommends_from_the_front():
    problem = Problem.unit_cube(2, task_names=("left", "right"))

    def evaluate(c):
        x = c.genome
        return Observation(c.id, objectives=[1 - np.sum((x - 0.2) ** 2), 1 - np.sum((x - 0.8) ** 2)])

    # a cheap acquisition optimization: the property is where the proposals come from, not their quality
    opt = bo(problem, seed=3, n_init=5, multiobjective=True, raw_samples=16, num_restarts=1, acqf_maxiter=15,
             mc_samples=16)
    told = opt.ask(5)
    opt.tell([evaluate(c) for c in told])
    for _ in range(4):
        (c,) = opt.ask(1)
        assert c.meta["phase"] == "model"
        opt.tell(evaluate(c))
        told.append(c)
    assert opt._training_data()[1].shape == (9, 2)
    points = np.array([evaluate(c).objectives for c in told])
    on_front = moocore.is_nondominated(points, maximise=True, keep_weakly=False)
    assert sorted(c.id for c in opt.pareto_front()) == sorted(c.id for c, k in zip(told, on_front, strict=True) if k)
    rec = opt.recommend()
    assert rec.id in {c.id for c in opt.pareto_front()}
    assert rec.meta["score"] == pytest.approx(np.mean(evaluate(rec).objectives))
    # one task: multi-objective mode falls back to the scalar GP
    assert not bo(Problem.unit_cube(2), multiobjective=True).multiobjective


@pytest.mark.parametrize("refit_every", [1, 3])
def test_state_round_trip_in_the_model_phase_is_exact_and_torch_rng_is_untouched(refit_every):
    problem = Problem.unit_cube(4)
    torch_before = torch.random.get_rng_state().clone()
    a, twin = bo(problem, seed=7, n_init=5, refit_every=refit_every), bo(problem, seed=7, n_init=5, refit_every=refit_every)
    for opt in (a, twin):
        tell_all(opt, opt.ask(5))
        for _ in range(3):
            tell_all(opt, opt.ask(1))
        pending = opt.ask(2)  # left pending across the round trip
    state = json.loads(json.dumps(a.state_dict()))
    assert state["impl"]["hyper"] is not None and state["blob"] is None
    fresh = bo(problem, seed=123, n_init=5, refit_every=refit_every)
    fresh.load_state_dict(state)
    runs = []
    for opt in (a, fresh, twin):
        got = []
        opt.tell(Observation(pending[1].id, objectives=score(pending[1].genome)))
        for _ in range(3):
            (c,) = opt.ask(1)
            got.append(c)
            tell_all(opt, [c])
        opt.tell(Observation.failure(pending[0].id))
        got += opt.ask(2)
        runs.append(got)
    for other in runs[1:]:
        assert [c.id for c in other] == [c.id for c in runs[0]]
        for x, y in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(x.genome, y.genome)  # bit for bit
            assert x.meta == y.meta == {"phase": "model"}
    sa, sf = a.state_dict(), fresh.state_dict()
    assert sa["impl"] == sf["impl"] and sa["rng"] == sf["rng"] and sa["pending"] == sf["pending"]
    assert torch.equal(torch.random.get_rng_state(), torch_before)


def test_options_change_the_search_and_are_validated():
    problem = Problem.unit_cube(3)

    def proposals(**options):
        opt = bo(problem, seed=4, n_init=5, **options)
        tell_all(opt, opt.ask(5))
        return np.stack([c.genome for c in opt.ask(3)])

    base = proposals()
    for options in ({"sequential": True}, {"mc_samples": 8}, {"raw_samples": 32}, {"acqf_maxiter": 1}):
        assert not np.array_equal(proposals(**options), base), options
    with pytest.raises(ConfigError, match="model"):
        bo(problem, model="tree")
    with pytest.raises(ConfigError, match="n_init"):
        bo(problem, n_init=0)


def test_saas_model_proposes_and_resumes_exactly():
    pytest.importorskip("numpyro")
    problem = Problem.unit_cube(3)
    nuts = {"model": "saas", "nuts_warmup": 16, "nuts_samples": 16, "nuts_thinning": 4, "n_init": 4}
    opt = bo(problem, seed=5, **nuts)
    tell_all(opt, opt.ask(4))
    state = json.loads(json.dumps(opt.state_dict()))
    fresh = bo(problem, seed=0, **nuts)
    fresh.load_state_dict(state)
    a, b = opt.ask(2), fresh.ask(2)  # the restored one refits NUTS with the same seed
    assert [c.meta["phase"] for c in a] == ["model", "model"]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.genome, y.genome)


def test_trust_region_design_and_proposals_lie_in_the_box_around_the_best():
    problem = Problem.unit_cube(4, x0=[0.5, 0.2, 0.05, 0.5])
    opt = bo(problem, seed=8, n_init=6, trust_region=True, tr_length=0.2)
    design = opt.ask(6)
    assert [c.meta.get("design") for c in design] == ["x0"] + ["sobol-region"] * 5
    gs = np.stack([c.genome for c in design[1:]])
    # the design's box: side 0.2 around x0, clipped to the bounds (the gene at 0.05 reaches down to 0)
    assert np.all(np.abs(gs - problem.x0) <= 0.1 + 1e-12) and gs[:, 2].min() >= 0
    assert len(np.unique(gs.round(12), axis=0)) == 5
    tell_all(opt, design)
    tr = opt.region()
    best = max(design, key=lambda c: score(c.genome)[0])
    np.testing.assert_array_equal(tr.center, best.genome)
    for _ in range(3):
        (c,) = opt.ask(1)
        assert c.meta["phase"] == "model"
        lo, hi = opt._box(tr.center, tr.length, opt._lengthscales(opt._model(*opt._training_data())))
        assert np.all(c.genome >= lo - 1e-9) and np.all(c.genome <= hi + 1e-9)
        assert np.all(hi - lo < 1.0)  # a box, not the whole space
        tell_all(opt, [c])
        tr = opt.region()
    # without the region the same seed's design covers the whole cube
    wide = np.stack([c.genome for c in bo(problem, seed=8, n_init=6).ask(6)[1:]])
    assert np.abs(wide - problem.x0).max() > 0.1


def test_trust_region_grows_on_successes_halves_on_failures_and_restarts():
    problem = Problem.unit_cube(2, x0=[0.0, 0.0])
    values = [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3, 0.5]
    opt = bo(problem, seed=0, n_init=len(values), trust_region=True, tr_length=0.4, tr_successes=2,
             tr_failures=2, tr_length_min=0.15)
    lengths = []
    for c, v in zip(opt.ask(len(values)), values, strict=True):
        opt.tell(Observation(c.id, objectives=[v]))
        lengths.append(opt.region().length)
    # 0.1 sets the center; 0.2, 0.3: two successes double it; then two failures halve it each time, and
    # below tr_length_min (0.1 < 0.15) it restarts at tr_length
    assert lengths == [0.4, 0.4, 0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.4, 0.4]
    tr = opt.region()
    assert tr.restarts == 1 and tr.best == 0.5 and tr.successes == 1 and tr.failures == 0


@pytest.mark.parametrize("options", [{"tr_length": 0.3}, {"tr_failures": 3}, {"nuts_warmup": 8},
                                     {"model": "saas", "refit_every": 2}])
def test_an_option_of_a_mode_the_run_does_not_use_is_refused(options):
    with pytest.raises(ConfigError, match=next(iter(k for k in options if k != "model"))):
        bo(Problem.unit_cube(2), **options)
    with pytest.raises(ConfigError, match="tr_length"):
        bo(Problem.unit_cube(2), trust_region=True, tr_length=0.01, tr_length_min=0.05)


def test_trust_region_state_round_trip_is_exact():
    problem = Problem.unit_cube(4, x0=[0.4] * 4)
    a = bo(problem, seed=9, n_init=4, trust_region=True, tr_failures=1)
    tell_all(a, a.ask(4))
    tell_all(a, a.ask(2))
    fresh = bo(problem, seed=1, n_init=4, trust_region=True, tr_failures=1)
    fresh.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for k in ("length", "successes", "failures", "restarts", "best"):
        assert getattr(a.region(), k) == getattr(fresh.region(), k)
    for x, y in zip(a.ask(2), fresh.ask(2), strict=True):
        np.testing.assert_array_equal(x.genome, y.genome)
