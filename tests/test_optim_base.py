"""Problem, Observation, scalarization, failure penalties and state bookkeeping of the optimizer base."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.errors import ConfigError, OptimizerError
from evomerge.optim import OPTIMIZERS, Observation, Problem, Scalarizer, SegmentStructure


def test_problem_validation():
    p = Problem.unit_cube(3, ("a", "b"))
    np.testing.assert_array_equal(p.x0, [0.5, 0.5, 0.5])
    assert p.task_names == ("a", "b") and not p.x0.flags.writeable
    with pytest.raises(ConfigError, match="lower < upper"):
        Problem(2, np.zeros(2), np.array([1.0, 0.0]))
    with pytest.raises(ConfigError, match="x0"):
        Problem.unit_cube(2, x0=[0.5, 1.5])
    with pytest.raises(ConfigError, match="task_names"):
        Problem.unit_cube(2, ("a", "a"))
    seg = SegmentStructure(n_seeds=2, n_segments=3, gram=np.stack([np.eye(2)] * 3))
    np.testing.assert_array_equal(seg.sizes, [1, 1, 1])
    with pytest.raises(ConfigError, match="segments"):
        Problem.unit_cube(5, segments=seg)
    with pytest.raises(ConfigError, match="gram"):
        SegmentStructure(n_seeds=2, n_segments=3, gram=np.zeros((3, 2, 3)))
    with pytest.raises(ConfigError, match="symmetric"):
        SegmentStructure(n_seeds=2, n_segments=1, gram=np.array([[[1.0, 0.5], [0.0, 1.0]]]))
    with pytest.raises(ConfigError, match="sizes"):
        SegmentStructure(n_seeds=2, n_segments=1, gram=np.stack([np.eye(2)]), sizes=[0])


def test_scalarizations():
    tasks = ("a", "b", "c")
    v = np.array([0.2, 0.8, 0.5])
    assert Scalarizer("mean", tasks)(v) == pytest.approx(0.5)
    assert Scalarizer("worst", tasks)(v) == pytest.approx(0.2)
    assert Scalarizer({"a": 1.0, "b": 3.0}, tasks)(v) == pytest.approx((0.2 + 3 * 0.8) / 4)
    with pytest.raises(ConfigError, match="'median'"):
        Scalarizer("median", tasks)
    with pytest.raises(ConfigError, match="unknown task 'd'"):
        Scalarizer({"d": 1.0}, tasks)
    with pytest.raises(ConfigError, match="scalarize.a"):
        Scalarizer({"a": -1.0}, tasks)
    with pytest.raises(ConfigError, match="positive"):
        Scalarizer({"a": 0.0}, tasks)


def test_failure_penalty_is_below_every_score_seen():
    opt = OPTIMIZERS.get("random")(Problem.unit_cube(2, ("a", "b")), seed=0)
    np.testing.assert_allclose(opt.penalty(), [-1, -1])
    c = opt.ask(3)
    opt.tell([Observation(c[0].id, objectives=[0.2, 0.9]), Observation(c[1].id, objectives=[0.5, 0.4])])
    # lo - max(1, hi - lo) per task
    np.testing.assert_allclose(opt.penalty(), [0.2 - 1, 0.4 - 1])
    opt.tell(Observation(c[2].id, objectives=[-3.0, 0.5], per_example=[np.inf]))  # non-finite -> failure
    assert opt.n_failed == 1
    np.testing.assert_allclose(opt.penalty(), [0.2 - 1, 0.4 - 1])
    d = opt.ask(1)[0]
    opt.tell(Observation(d.id, objectives=[-3.0, 0.5]))
    np.testing.assert_allclose(opt.penalty(), [-3.0 - 3.5, 0.4 - 1])


def test_ask_tell_bookkeeping_and_state_checks():
    opt = OPTIMIZERS.get("random")(Problem.unit_cube(2), seed=0, x0_first=False)
    assert opt.recommend() is None and opt.ask(0) == []
    with pytest.raises(OptimizerError, match="non-negative"):
        opt.ask(-1)
    a, b = opt.ask(2)
    assert (a.id, b.id) == (0, 1) and not a.genome.flags.writeable
    assert not np.array_equal(a.genome, opt.problem.x0)
    opt.tell(Observation(b.id, objectives=[0.3]))
    assert opt.recommend().id == b.id and opt.pending_ids == [a.id]
    state = json.loads(json.dumps(opt.state_dict()))
    for key, value, match in [("schema_version", 99, "schema_version"), ("pending", "x", "malformed")]:
        broken = dict(state, **{key: value})
        with pytest.raises(OptimizerError, match=match):
            OPTIMIZERS.get("random")(Problem.unit_cube(2), seed=0, x0_first=False).load_state_dict(broken)
    with pytest.raises(ConfigError, match="seed"):
        OPTIMIZERS.get("random")(Problem.unit_cube(2), seed=-1)
    with pytest.raises(ConfigError, match="x0_first"):
        OPTIMIZERS.get("random")(Problem.unit_cube(2), seed=0, x0_first="maybe")
