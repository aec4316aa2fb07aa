"""Warm starts: CMA-ES hands out ``problem.x0`` first with ``x0_first``, and a resumed run proposes the same."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.optim import OPTIMIZERS, Observation, Problem


def _sphere(x: np.ndarray) -> list[float]:
    return [float(-np.sum((x - 0.3) ** 2))]


@pytest.mark.parametrize("x0", [[0.6, 0.95, 0.2, 0.5], [0.6, 0.95, 0.2, 0.0], [1.0, 0.0, 0.5, 0.25]])
def test_cma_es_x0_first_evaluates_the_start_point(x0):
    problem = Problem(4, np.zeros(4), np.ones(4), np.array(x0), ("score",))
    opt = OPTIMIZERS.get("cma_es")(problem, seed=0, popsize=6, sigma0=0.1, x0_first=True)
    first = opt.ask(6)
    np.testing.assert_allclose(first[0].genome, x0, rtol=0, atol=1e-12)
    assert not any(np.allclose(c.genome, x0) for c in first[1:])
    plain = OPTIMIZERS.get("cma_es")(problem, seed=0, popsize=6, sigma0=0.1).ask(6)
    assert not any(np.allclose(c.genome, x0) for c in plain)
    opt.tell([Observation(c.id, objectives=_sphere(c.genome)) for c in first])
    assert opt.recommend() is not None
    assert len(opt.ask(6)) == 6  # later generations are sampled as usual


def test_cma_es_x0_first_state_round_trip_before_the_first_ask():
    problem = Problem(3, np.zeros(3), np.ones(3), np.array([0.7, 0.1, 0.4]), ("score",))
    a = OPTIMIZERS.get("cma_es")(problem, seed=5, popsize=4, x0_first=True)
    b = OPTIMIZERS.get("cma_es")(problem, seed=99, popsize=4, x0_first=True)
    b.load_state_dict(a.state_dict())
    ga, gb = a.ask(4), b.ask(4)
    for ca, cb in zip(ga, gb, strict=True):
        np.testing.assert_array_equal(ca.genome, cb.genome)
    np.testing.assert_allclose(ga[0].genome, problem.x0, atol=1e-12)
