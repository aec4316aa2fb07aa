"""M2N2 over recipes, on the zoo: a child's coefficient-space SLERP equals crossing the parents' materialized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.io import ModelFolder, tensor_role
from evomerge.merge.materialize import materialize_state_dict
from evomerge.optim import OPTIMIZERS
from evomerge.optim.base import Observation, Problem
from evomerge.optim.m2n2 import slerp_coefficients
from evomerge.spaces.base import SpaceModels, build_space
from evomerge.spaces.segments import SegmentSpace, segment_of
from evomerge.spaces.template import parse_template


@pytest.fixture(scope="module")
def setup(zoo_test):
    fam = {"base": zoo_test.base, "m1": zoo_test.expert("add"), "m2": zoo_test.expert("rev")}
    folders = {k: ModelFolder.open(v) for k, v in fam.items()}
    space = build_space(parse_template({"kind": "segments"}), SpaceModels.from_folders(folders, base="base"))
    assert isinstance(space, SegmentSpace)
    space.attach_gram(folders)
    return fam, folders, space


def _flat(sd, names):
    return torch.cat([sd[n].double().reshape(-1) for n in names])


def test_seed_identity_rows_reproduce_each_seed(setup):
    fam, folders, space = setup
    S, M = len(space.segments), len(space.seeds)
    for m, seed in enumerate(space.seeds):
        C = np.zeros((S, M))
        C[:, m] = 1.0
        sd = materialize_state_dict(space.decode(C.ravel()), {k: str(v) for k, v in fam.items()})
        ref = folders[seed]
        for name in ref.tensor_names:
            torch.testing.assert_close(sd[name], ref.get(name), rtol=0, atol=1e-6)


def test_gram_matches_materialized_inner_products(setup):
    fam, folders, space = setup
    rng = np.random.default_rng(0)
    cp, cq = rng.uniform(-0.5, 1.5, (2, len(space.segments), len(space.seeds)))
    paths = {k: str(v) for k, v in fam.items()}
    p = materialize_state_dict(space.decode(cp.ravel()), paths)
    q = materialize_state_dict(space.decode(cq.ravel()), paths)
    names = list(p)
    direct = float(_flat(p, names) @ _flat(q, names))
    via_gram = float(np.einsum("sm,smn,sn->", cp, space.gram, cq))
    assert via_gram == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("split", [1, 4, 9])
def test_child_recipe_equals_weight_space_crossover(setup, split):
    fam, folders, space = setup
    rng = np.random.default_rng(split)
    S, M = len(space.segments), len(space.seeds)
    cp, cq = rng.uniform(0.0, 1.0, (2, S, M))
    w = 0.3
    t = np.where(np.arange(S) < split, w, 1 - w)
    child = slerp_coefficients(cp, cq, space.gram, t)
    paths = {k: str(v) for k, v in fam.items()}
    got = materialize_state_dict(space.decode(child.ravel()), paths)
    # weight space: SLERP of the parents' materialized weights with one global angle, t per segment
    p = materialize_state_dict(space.decode(cp.ravel()), paths)
    q = materialize_state_dict(space.decode(cq.ravel()), paths)
    names = list(p)
    fp, fq = _flat(p, names), _flat(q, names)
    omega = torch.arccos(torch.clamp(fp @ fq / (fp.norm() * fq.norm()), -1, 1))
    ref = folders["base"]
    index = {s: i for i, s in enumerate(space.segments)}
    for name in names:
        role = tensor_role(name, ref.model_type)
        ts = float(t[index[segment_of(role.layer, role.kind)]])
        a = torch.sin((1 - ts) * omega) / torch.sin(omega)
        b = torch.sin(ts * omega) / torch.sin(omega)
        expected = (a * p[name].double() + b * q[name].double()).float()
        torch.testing.assert_close(got[name], expected, rtol=1e-4, atol=1e-5)


def test_m2n2_runs_on_the_segment_structure(setup):
    fam, folders, space = setup
    structure = space.segment_structure()
    problem = Problem(space.dim, space.lower, space.upper, space.x0, ("a", "b"), structure)
    opt = OPTIMIZERS.get("m2n2")(problem, seed=0, archive_size=4)
    rng = np.random.default_rng(0)
    for _ in range(10):
        (cand,) = opt.ask(1)
        recipe = space.decode(cand.genome)
        assert recipe.method == "linear"
        scores = rng.uniform(size=6)
        opt.tell([Observation(cand.id, objectives=np.array([scores[:3].mean(), scores[3:].mean()]),
                              per_example=scores)])
    assert opt.n_told == 10


def test_m2n2_on_the_zoo_finds_a_merge_better_than_every_seed(zoo_test, tmp_path):
    """A short M2N2 run over the segments space: its best candidate beats each seed model on the mean of
    the normalized task scores (base = 0, best seed = 1 per task), the run's own ranking."""
    import yaml

    from evomerge.driver.run import start_run
    from evomerge.results import RunResults

    cfg = {
        "name": "m2n2-zoo", "seed": 0, "output_dir": str(tmp_path / "runs"),
        "sources": {"base": str(zoo_test.base), "add": str(zoo_test.expert("add")), "rev": str(zoo_test.expert("rev"))},
        "base_model": "base", "space": {"template": "builtin:segments"},
        "fitness": {"suite": "builtin:zoo-2", "scorer": "hf", "batch_size": 200},
        "optimizer": {"name": "m2n2", "options": {"archive_size": 10}}, "budget": {"evaluations": 32},
        "resources": {"threads_per_worker": 1},
    }
    path = tmp_path / "m2n2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    res = RunResults(start_run(path))
    searched = res.searched
    assert len(searched) == 32
    seeds = [r for r in searched if r.meta.get("origin") == "seed"]
    assert len(seeds) == 3  # base, add, rev: C[:, m] = 1
    best = res.best()
    assert best.meta.get("origin") != "seed"
    assert res.scalar(best) > max(res.scalar(r) for r in seeds) + 0.03
    assert min(res.normalize(best.result.task_means()).values()) > 0.2  # both skills, not one seed's
