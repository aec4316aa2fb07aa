"""M2N2: fitness sharing, attraction, replacement and coefficient-space SLERP against hand computations."""

from __future__ import annotations

import numpy as np
import pytest

from evomerge.errors import ConfigError, OptimizerError
from evomerge.optim import OPTIMIZERS, SEGMENTS, Observation, Problem, SegmentStructure
from evomerge.optim.m2n2 import attraction, replacement_slot, shared_fitness, slerp_coefficients

SEGMENT_USERS = OPTIMIZERS.names(having={SEGMENTS})
SIZES = np.array([5, 3, 7, 2])


def weight_slerp(p: np.ndarray, q: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Element-wise t, one angle between the whole vectors p and q (the reference algorithm)."""
    omega = np.arccos(np.clip(p @ q / (np.linalg.norm(p) * np.linalg.norm(q)), -1, 1))
    return np.sin((1 - t) * omega) / np.sin(omega) * p + np.sin(t * omega) / np.sin(omega) * q


def seed_vectors(n_seeds: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Per segment, a [n_seeds, size] matrix of flattened seed parameters."""
    return [rng.normal(size=(n_seeds, int(s))) for s in SIZES]


def materialize(coef: np.ndarray, seeds: list[np.ndarray]) -> np.ndarray:
    c = coef.reshape(len(seeds), -1)
    return np.concatenate([c[s] @ seeds[s] for s in range(len(seeds))])


def segment_problem(n_seeds: int, seeds: list[np.ndarray], lower: float = 0.0, upper: float = 1.0) -> Problem:
    gram = np.stack([v @ v.T for v in seeds])
    seg = SegmentStructure(n_seeds=n_seeds, n_segments=len(SIZES), gram=gram, sizes=SIZES)
    dim = n_seeds * len(SIZES)
    return Problem(
        dim, np.full(dim, lower), np.full(dim, upper), np.full(dim, 1.0 / n_seeds), ("score",), seg
    )


def test_shared_fitness_matches_hand_computation():
    scores = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=float)
    # column sums 2, 1, 2 -> F = S / z
    shared, fitness = shared_fitness(scores, alpha=1.0)
    np.testing.assert_allclose(shared, [[0.5, 0, 0.5], [0.5, 1, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(fitness, [1.0, 1.5, 0.5])
    _, plain = shared_fitness(scores, alpha=0.0)  # alpha = 0: no sharing, the plain GA
    np.testing.assert_allclose(plain, [2, 2, 1])
    _, half = shared_fitness(scores, alpha=0.5)
    np.testing.assert_allclose(half, [1 / np.sqrt(2) * 2, 1 / np.sqrt(2) + 1, 1 / np.sqrt(2)])
    # an example nobody solves has z = 0, replaced by 1 (no division by zero)
    shared, fitness = shared_fitness(np.array([[0, 1.0], [0, 1.0]]), alpha=1.0)
    np.testing.assert_allclose(shared, [[0, 0.5], [0, 0.5]])


def test_attraction_matches_hand_computation():
    shared = np.array([[0.5, 0, 0.5], [0.5, 1, 0], [0, 0, 0.5]])
    np.testing.assert_allclose(attraction(shared, 0), [0, 1, 0])
    np.testing.assert_allclose(attraction(shared, 1), [0.5, 0, 0.5])
    np.testing.assert_allclose(attraction(shared, 2), [0.5, 1.5, 0])


def test_replacement_slot_matches_hand_computation():
    archive = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 1]], dtype=float)
    # with child [1,1,1]: z = 3,2,3; fitness 2/3, 5/6, 1/3, 7/6 -> row 2 goes
    assert replacement_slot(archive, np.ones(3), alpha=1.0) == 2
    assert replacement_slot(archive, np.zeros(3), alpha=1.0) is None  # a child solving nothing is dropped
    # an empty slot (zero row) has fitness 0 and is filled first, even by a weak child
    with_empty = np.array([[1, 1, 1], [0, 0, 0]], dtype=float)
    assert replacement_slot(with_empty, np.array([0, 0, 0.1]), alpha=1.0) == 1


def test_coefficient_slerp_equals_weight_space_slerp():
    rng = np.random.default_rng(0)
    n_seeds = 3
    seeds = seed_vectors(n_seeds, rng)
    gram = np.stack([v @ v.T for v in seeds])
    cp, cq = rng.uniform(size=(len(SIZES), n_seeds)), rng.uniform(size=(len(SIZES), n_seeds))
    t = rng.uniform(size=len(SIZES))
    child = slerp_coefficients(cp, cq, gram, t)
    expected = weight_slerp(materialize(cp, seeds), materialize(cq, seeds), np.repeat(t, SIZES))
    np.testing.assert_allclose(materialize(child, seeds), expected, rtol=1e-10, atol=1e-12)
    # parallel parents (angle 0): linear interpolation, segment by segment
    np.testing.assert_allclose(
        slerp_coefficients(cp, 2 * cp, gram, t), (1 - t)[:, None] * cp + t[:, None] * 2 * cp
    )


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_children_are_slerps_of_their_parents_materialized_weights(name):
    rng = np.random.default_rng(1)
    n_seeds = 3
    seeds = seed_vectors(n_seeds, rng)
    problem = segment_problem(n_seeds, seeds, lower=-1.0, upper=2.0)
    target = materialize(np.array([[0.7, 0.2, 0.4]] * len(SIZES)), seeds)
    bounds = np.concatenate([[0], np.cumsum(SIZES)])
    opt = OPTIMIZERS.get(name)(problem, seed=3)
    genomes: dict[int, np.ndarray] = {}
    checked = 0
    for _ in range(15):
        batch = opt.ask(4)
        for c in batch:
            genomes[c.id] = c.genome
            if c.meta.get("origin") == "child":
                w, split = c.meta["w"], c.meta["split"]
                assert split is None or 0 <= split < len(SIZES)
                t = np.array([w if split is None or s < split else 1 - w for s in range(len(SIZES))])
                p, q = (materialize(genomes[i], seeds) for i in c.meta["parents"])
                if p @ q / (np.linalg.norm(p) * np.linalg.norm(q)) < 1 - 1e-9 and np.all(
                    (c.genome > -1) & (c.genome < 2)
                ):
                    np.testing.assert_allclose(
                        materialize(c.genome, seeds), weight_slerp(p, q, np.repeat(t, SIZES)), rtol=1e-8
                    )
                    checked += 1
        obs = []
        for c in batch:
            w = materialize(c.genome, seeds)
            per_segment = [
                np.exp(-np.mean((w[a:b] - target[a:b]) ** 2))
                for a, b in zip(bounds[:-1], bounds[1:], strict=True)
            ]
            obs.append(Observation(c.id, objectives=[np.mean(per_segment)], per_example=per_segment))
        opt.tell(obs)
    assert checked >= 10


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_initial_members_segments_and_vectors(name):
    rng = np.random.default_rng(2)
    problem = segment_problem(3, seed_vectors(3, rng))
    opt = OPTIMIZERS.get(name)(problem, seed=0, include_x0=True, init_random=2, init_children=0)
    first = opt.ask(10)
    assert len(first) == 6  # 3 seeds + x0 + 2 random mixtures; children wait for two archive members
    for m, c in enumerate(first[:3]):
        expected = np.zeros((len(SIZES), 3))
        expected[:, m] = 1
        np.testing.assert_array_equal(c.genome.reshape(len(SIZES), 3), expected)
    np.testing.assert_array_equal(first[3].genome, problem.x0)
    for c in first[4:]:
        np.testing.assert_allclose(c.genome.reshape(len(SIZES), 3).sum(axis=1), 1.0)
    with pytest.raises(ConfigError, match="seed models"):
        OPTIMIZERS.get(name)(segment_problem(3, seed_vectors(3, rng), upper=0.5), seed=0)

    vec = OPTIMIZERS.get(name)(Problem.unit_cube(4), seed=0, archive_size=5)
    first = vec.ask(10)
    assert len(first) == 5 and all(c.meta["origin"] != "child" for c in first)
    np.testing.assert_array_equal(first[0].genome, vec.problem.x0)


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_initial_task_arithmetic_children_fill_the_archive(name):
    rng = np.random.default_rng(4)
    problem = segment_problem(3, seed_vectors(3, rng), lower=-1.0, upper=2.0)
    opt = OPTIMIZERS.get(name)(problem, seed=0, archive_size=9, child_weights=(0.2, 0.9))
    first = opt.ask(20)
    assert len(first) == 9  # 3 seeds + 6 children fill the archive; crossover waits for results
    assert [c.meta["origin"] for c in first] == ["seed"] * 3 + ["task_arithmetic"] * 6
    for c in first[3:]:
        coef = c.genome.reshape(len(SIZES), 3)
        lam = np.asarray(c.meta["weights"])
        assert np.all((lam >= 0.2) & (lam <= 0.9))
        # the same merge in every segment: seed_0 + sum_m lam_m (seed_m - seed_0)
        np.testing.assert_allclose(coef, np.tile([1 - lam.sum(), *lam], (len(SIZES), 1)), atol=1e-12)
    spread = np.array([c.meta["weights"] for c in first[3:]])
    assert spread.std(axis=0).min() > 0.05  # drawn, not one fixed point

    # weights that would leave the bounds are scaled down together until the anchor's coefficient fits
    tight = segment_problem(3, seed_vectors(3, rng), lower=-0.5, upper=2.0)
    opt = OPTIMIZERS.get(name)(tight, seed=1, init_children=20, child_weights=(0.9, 1.0))
    children = [c for c in opt.ask(23) if c.meta["origin"] == "task_arithmetic"]
    assert len(children) == 20
    for c in children:
        coef = c.genome.reshape(len(SIZES), 3)
        lam = np.asarray(c.meta["weights"])
        assert coef[0, 0] == pytest.approx(-0.5) and lam.sum() == pytest.approx(1.5)
        np.testing.assert_allclose(coef.sum(axis=1), 1.0)
        assert lam[0] / lam[1] > 0.9 * 0.9 / 1.0 - 1e-12  # one common factor: ratios are those drawn
    with pytest.raises(ConfigError, match="child_weights"):
        OPTIMIZERS.get(name)(tight, seed=0, child_weights=(1.0, 0.5))


def _vector_opt(name, scores_of_initial, **options):
    opt = OPTIMIZERS.get(name)(
        Problem.unit_cube(2), seed=0, init_random=len(scores_of_initial) - 1, **options
    )
    members = opt.ask(len(scores_of_initial))
    opt.tell(
        [
            Observation(c.id, objectives=[np.mean(s)], per_example=s)
            for c, s in zip(members, scores_of_initial, strict=True)
        ]
    )
    return opt, members


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_replacement_and_failures_in_the_archive(name):
    opt, (a, b) = _vector_opt(name, [[1.0, 0.0], [0.0, 1.0]], archive_size=2)
    assert sorted(m.id for m in opt.archive()) == [a.id, b.id]
    child, weak, failed = opt.ask(3)
    opt.tell(Observation(child.id, objectives=[1.0], per_example=[1.0, 1.0]))
    # fitness over [a, b, child]: 0.5, 0.5, 1.0 -> a (first lowest) is replaced
    assert sorted(m.id for m in opt.archive()) == [b.id, child.id]
    opt.tell([Observation(weak.id, objectives=[0.0], per_example=[0.0, 0.0]), Observation.failure(failed.id)])
    assert sorted(m.id for m in opt.archive()) == [b.id, child.id]


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_mate_choice_follows_attraction(name):
    # F: A [.5, 1, 0], B [.5, 0, 0], C [0, 0, 1]; given A, only C has positive attraction
    opt, (a, b, c) = _vector_opt(name, [[1, 1, 0], [1, 0, 0], [0, 0, 1]], archive_size=3)
    children = opt.ask(300)
    pairs = [tuple(ch.meta["parents"]) for ch in children]
    assert {p2 for p1, p2 in pairs if p1 == a.id} == {c.id}
    firsts = np.array([p1 for p1, _ in pairs])
    # first parent proportional to fitness 1.5 : 0.5 : 1
    np.testing.assert_allclose([np.mean(firsts == m.id) for m in (a, b, c)], [0.5, 1 / 6, 1 / 3], atol=0.08)
    no_match, (a, b, c) = _vector_opt(
        name, [[1, 1, 0], [1, 0, 0], [0, 0, 1]], archive_size=3, use_matchmaker=False
    )
    assert b.id in {p2 for p1, p2 in (tuple(ch.meta["parents"]) for ch in no_match.ask(300)) if p1 == a.id}


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_ablations(name):
    opt, members = _vector_opt(name, [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]], use_crossover=False)
    genomes = [m.genome for m in members]
    for child in opt.ask(20):
        assert any(np.array_equal(child.genome, g) for g in genomes)
    opt, _ = _vector_opt(name, [[1.0, 0.0], [0.0, 1.0]], use_splitpoint=False)
    assert all(ch.meta["split"] is None for ch in opt.ask(10))
    opt, _ = _vector_opt(name, [[1.0, 0.0], [0.0, 1.0]], mutation=0.05)
    assert len(opt.ask(5)) == 5


@pytest.mark.parametrize("name", SEGMENT_USERS)
def test_refuses_scores_it_cannot_share(name):
    opt = OPTIMIZERS.get(name)(Problem.unit_cube(2), seed=0)
    a, b = opt.ask(2)
    with pytest.raises(OptimizerError, match="non-negative"):
        opt.tell(Observation(a.id, objectives=[0.5], per_example=[0.5, -0.1]))
    opt.tell(Observation(a.id, objectives=[0.5], per_example=[0.5, 0.1]))
    with pytest.raises(OptimizerError, match="expected 2"):
        opt.tell(Observation(b.id, objectives=[0.5], per_example=[0.5, 0.1, 0.2]))

    doomed = OPTIMIZERS.get(name)(Problem.unit_cube(2), seed=0, init_random=1)
    doomed.tell([Observation.failure(c.id) for c in doomed.ask(5)])
    with pytest.raises(OptimizerError, match="every initial member failed"):
        doomed.ask(1)
