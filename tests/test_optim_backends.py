"""Backend-specific behaviour: CMA-ES generations and its sampler binding; nevergrad algorithm choice; Optuna samplers."""

from __future__ import annotations

import base64
import json
import pickle

import moocore
import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.optim import OPTIMIZERS, Observation, Problem


def sphere(c) -> Observation:
    return Observation(c.id, objectives=[1.0 - float(np.sum((c.genome - 0.3) ** 2))])


def test_cma_hands_out_one_generation_at_a_time():
    opt = OPTIMIZERS.get("cma_es")(Problem.unit_cube(3), seed=0, popsize=6)
    first, second, third = opt.ask(4), opt.ask(4), opt.ask(4)
    assert (len(first), len(second), third) == (4, 2, [])
    gen = first + second
    assert [c.meta["index"] for c in gen] == list(range(6)) and {c.meta["generation"] for c in gen} == {0}
    opt.tell([sphere(c) for c in gen[1:]])
    assert opt.ask(3) == []
    opt.tell(sphere(gen[0]))
    nxt = opt.ask(10)
    assert len(nxt) == 6 and {c.meta["generation"] for c in nxt} == {1}


def test_cma_generation_update_ignores_arrival_order_and_ranks_failures_last():
    runs = []
    for order in (lambda g: g, lambda g: g[::-1]):
        opt = OPTIMIZERS.get("cma_es")(Problem.unit_cube(4), seed=1, popsize=8)
        told: list[list[float]] = []

        def spy(X, f, told=told, real_tell=opt._es.tell):
            told.append(list(f))
            return real_tell(X, f)

        opt._es.tell = spy
        gen = opt.ask(8)
        for c in order(gen):  # one at a time, failures for members 2 and 5
            opt.tell(Observation.failure(c.id) if c.meta["index"] in (2, 5) else sphere(c))
        losses = np.array(told[0])
        assert np.all(np.isfinite(losses)) and min(losses[[2, 5]]) > max(np.delete(losses, [2, 5]))
        runs.append([c.genome for c in opt.ask(8)])
    assert all(np.array_equal(a, b) for a, b in zip(*runs, strict=True))


def test_cma_state_blob_carries_no_generator_and_is_rebound_on_load():
    opt = OPTIMIZERS.get("cma_es")(Problem.unit_cube(3), seed=2)
    opt.tell([sphere(c) for c in opt.ask(100)])
    state = json.loads(json.dumps(opt.state_dict()))
    es = pickle.loads(base64.b64decode(state["blob"]))
    assert es.opts["randn"].rng is None
    fresh = OPTIMIZERS.get("cma_es")(Problem.unit_cube(3), seed=3)
    fresh.load_state_dict(state)
    assert fresh._es.opts["randn"].rng is fresh._rng and fresh._es.sm.randn.rng is fresh._rng
    assert [c.genome.tolist() for c in fresh.ask(100)] == [c.genome.tolist() for c in opt.ask(100)]


def test_cma_stops_on_a_flat_landscape():
    opt = OPTIMIZERS.get("cma_es")(Problem.unit_cube(2), seed=0)
    for _ in range(60):
        if opt.should_stop():
            break
        opt.tell([Observation(c.id, objectives=[0.5]) for c in opt.ask(100)])
    assert opt.should_stop()


def test_nevergrad_refuses_what_it_cannot_run_or_checkpoint():
    problem = Problem.unit_cube(3)
    make = OPTIMIZERS.get("nevergrad")
    with pytest.raises(ConfigError, match="TwoPointsDE"):
        make(problem, seed=0, optimizer="TwoPointDE")
    with pytest.raises(ConfigError, match="budget"):
        make(problem, seed=0, optimizer="NGOpt")
    with pytest.raises(ConfigError, match="background thread"):
        make(problem, seed=0, optimizer="Cobyla")
    with pytest.raises(ConfigError, match="background thread"):
        make(problem, seed=0, optimizer="NGOpt", budget=30)  # NGOpt picks Cobyla for one worker


@pytest.mark.parametrize("algorithm", ["OnePlusOne", "PSO", "CMA", "DE"])
def test_nevergrad_algorithms_round_trip_mid_run(algorithm):
    problem = Problem.unit_cube(4)
    make = OPTIMIZERS.get("nevergrad")
    opt = make(problem, seed=4, optimizer=algorithm, num_workers=3)
    for _ in range(5):
        batch = opt.ask(3)
        opt.tell([sphere(c) for c in batch[1:]])
        opt.tell(sphere(batch[0]))
    held = opt.ask(3)
    state = json.loads(json.dumps(opt.state_dict()))
    fresh = make(problem, seed=0, optimizer=algorithm, num_workers=3)
    fresh.load_state_dict(state)
    for o in (opt, fresh):
        o.tell([sphere(c) for c in held[::-1]])
    a, b = opt.ask(4), fresh.ask(4)
    assert [c.id for c in a] == [c.id for c in b]
    assert all(np.array_equal(x.genome, y.genome) for x, y in zip(a, b, strict=True))


def test_nevergrad_multiobjective_front():
    problem = Problem.unit_cube(2, ("left", "right"))
    opt = OPTIMIZERS.get("nevergrad")(problem, seed=0, optimizer="DE", multiobjective=True)
    for _ in range(10):
        batch = opt.ask(4)
        opt.tell(
            [Observation(c.id, objectives=[-abs(c.genome[0] - 0.2), -abs(c.genome[0] - 0.8)]) for c in batch]
        )
    front = opt.pareto_front()
    points = np.array([c.meta["objectives"] for c in front])
    assert len(front) >= 2 and moocore.is_nondominated(points, maximise=True).all()
    assert opt.recommend().id in {c.id for c in front}


def test_optuna_refuses_unknown_samplers_bad_sampler_options_and_single_objective_pareto_search():
    problem = Problem.unit_cube(3, ("left", "right"))
    make = OPTIMIZERS.get("optuna")
    with pytest.raises(ConfigError, match=r"optimizer 'optuna': option sampler: .*'TPESamplr'.*TPESampler"):
        make(problem, seed=0, sampler="TPESamplr")
    with pytest.raises(ConfigError, match=r"optimizer 'optuna': option sampler: .*GridSampler"):
        make(problem, seed=0, sampler="GridSampler")  # needs a grid; its state is not round-tripped
    with pytest.raises(ConfigError, match=r"optimizer 'optuna': option sampler_options: TPESampler.*n_startup"):
        make(problem, seed=0, sampler_options={"n_startup": 3})
    with pytest.raises(ConfigError, match=r"optimizer 'optuna': option sampler_options: .*seed"):
        make(problem, seed=0, sampler_options={"seed": 3})
    with pytest.raises(ConfigError, match=r"option sampler: CmaEsSampler searches one objective"):
        make(problem, seed=0, sampler="CmaEsSampler", multiobjective=True)


def test_optuna_options_reach_the_study():
    from optuna.trial import TrialState

    problem = Problem(3, [0.0, -1.0, 0.0], [1.0, 1.0, 2.0], x0=[0.25, -0.5, 1.5], task_names=("left", "right"))
    make = OPTIMIZERS.get("optuna")
    opt = make(problem, seed=0, sampler="NSGAIISampler", sampler_options={"population_size": 7}, multiobjective=True)
    study = opt.study
    assert type(study.sampler).__name__ == "NSGAIISampler" and study.sampler._population_size == 7
    assert len(study.directions) == 2 and all(d.name == "MAXIMIZE" for d in study.directions)
    first, second = opt.ask(2)
    assert first.genome.tolist() == [0.25, -0.5, 1.5] and first.meta["origin"] == "x0"  # x0_first
    assert "origin" not in second.meta
    lows, highs = np.array([0.0, -1.0, 0.0]), np.array([1.0, 1.0, 2.0])
    for c in opt.ask(20):
        assert np.all((c.genome >= lows) & (c.genome <= highs))
    opt.tell([Observation.failure(first.id), Observation(second.id, objectives=[0.3, 0.6])])
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].values is None
    assert study.trials[1].values == [0.3, 0.6] and study.trials[1].params == {
        f"g{i}": v for i, v in enumerate(second.genome.tolist())
    }
    single = make(Problem.unit_cube(2, ("a", "b")), seed=0, x0_first=False, scalarize={"a": 3.0, "b": 1.0})
    (c,) = single.ask(1)
    assert "origin" not in c.meta and not np.array_equal(c.genome, [0.5, 0.5])
    single.tell(Observation(c.id, objectives=[0.2, 0.6]))
    assert len(single.study.directions) == 1 and single.study.trials[0].values == [pytest.approx(0.3)]


def test_optuna_state_is_json_and_a_foreign_sampler_state_is_refused():
    from evomerge.errors import OptimizerError

    problem = Problem.unit_cube(3)
    make = OPTIMIZERS.get("optuna")
    opt = make(problem, seed=1, sampler="CmaEsSampler", sampler_options={"popsize": 4})
    for _ in range(4):
        opt.tell([sphere(c) for c in opt.ask(3)])
    held = opt.ask(2)
    state = json.loads(json.dumps(opt.state_dict()))
    assert state["blob"] is None  # no pickle: trials, study attributes and generator states as JSON
    trials = state["impl"]["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 12 + ["RUNNING"] * 2
    assert any(k.startswith("cma:") for t in trials for k in t["system_attrs"])  # CMA-ES keeps its state there
    fresh = make(problem, seed=5, sampler="CmaEsSampler", sampler_options={"popsize": 4})
    fresh.load_state_dict(state)
    for o in (opt, fresh):
        o.tell([sphere(c) for c in held[::-1]])
    assert [c.genome.tolist() for c in opt.ask(6)] == [c.genome.tolist() for c in fresh.ask(6)]
    broken = json.loads(json.dumps(state))
    broken["impl"]["random_states"] = {"sampler._other": broken["impl"]["random_states"]["sampler._cma_rng"]}
    with pytest.raises(OptimizerError, match="generators"):
        make(problem, seed=5, sampler="CmaEsSampler", sampler_options={"popsize": 4}).load_state_dict(broken)
