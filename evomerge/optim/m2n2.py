"""M2N2 (Model Merging with Natural Niches): competition for per-example resources, attraction-based
mate choice and split-point SLERP crossover, as in "Competition and Attraction Improve Model Fusion"
(Abrantes et al., GECCO 2025) and its reference code (``natural_niches_fn.py``, ``helper_fn.py``).

The algorithm, steady state (one child per evaluation, no generations):

* **Archive** of ``archive_size`` slots. Its per-example score matrix ``S`` (rows: members, empty slots
  are zero rows) drives everything.
* **Fitness sharing** (competition): ``z_j = (sum_i S_ij) ** alpha`` with ``z_j = 1`` where it is 0,
  ``F_ij = S_ij / z_j`` and ``f_i = sum_j F_ij``. ``alpha = 0`` is a plain GA.
* **Parents**: the first ∝ ``f``; the second (``use_matchmaker``) ∝ attraction
  ``g_k = sum_j max(0, F_kj - F_p1,j)`` on the normalized ``F``, else ∝ ``f`` again. When the weights
  are all zero the draw falls back to ∝ ``f``, then to uniform over the members.
* **Crossover** (``use_crossover``): ``w ~ U(0, 1)``; with ``use_splitpoint`` a split position is drawn
  uniformly over the parameters and moved to the start of the segment it falls in; units before it use
  ``t = w``, the others ``t = 1 - w`` (without split: ``t = w`` everywhere). The child is the SLERP of
  the parents with **one global angle** ``Ω`` (``sin((1-t)Ω)/sinΩ · p + sin(tΩ)/sinΩ · q``; linear
  interpolation when ``sin Ω <= 1e-6``). Without crossover the child is the first parent.
  ``mutation > 0`` adds Gaussian noise of that standard deviation (off by default, as for pre-trained
  seeds in the paper). Children are clipped to the problem bounds.
* **Replacement**: the child's scores join the archive's, fitness sharing is recomputed over the
  ``archive_size + 1`` rows and the lowest-fitness row (first on ties) is dropped; if it is the child's,
  the child is discarded. Empty slots have fitness 0 and so are filled first.
* **Failures** have no scores to compete with: they are discarded and never enter the archive.

Search space. With ``problem.segments`` (M seeds, S segments) an individual is a coefficient matrix
``C [S, M]`` (genome ``C.ravel()``); SLERP angles come from the Gram matrices,
``<p, q> = sum_s c_p,s^T G_s c_q,s``, so the child's coefficients are exactly the SLERP of the parents'
materialized weights; split points fall on segment boundaries, drawn ∝ ``sizes``.

Initial members with segments: the seed models themselves (``C[:, m] = 1``), then ``x0`` if
``include_x0``, then ``init_random`` random convex mixtures (each segment's row drawn from a flat
Dirichlet, default 0), then ``init_children`` **task-arithmetic children** of the seeds (default: as many
as fill the archive). A task-arithmetic child takes the first seed as its anchor (the base model when the
segments space includes it, which it lists first) and draws one weight ``λ_m ~ U(child_weights)`` per other
seed: ``C[:, 0] = 1 - sum_m λ_m``, ``C[:, m] = λ_m`` in every segment, i.e. the merge
``seed_0 + sum_m λ_m (seed_m - seed_0)``. When that leaves the bounds, all ``λ`` are scaled down by the
largest common factor that keeps every coefficient inside. Why: SLERP crossover never leaves the span
between its parents, so an archive that starts from the bare seeds only reaches their interpolations
(with k experts, at most ``λ = 1/k`` on every task vector at once), while merges of fine-tuned experts
often work best with every ``λ`` well above that (0.7-0.9 on the demo zoo); starting from merged children puts such points in the archive, the archive
being larger than the seed count lets the children survive next to the specialist seeds, and crossover
then recombines them segment by segment. The reference code starts from its two seed models only and
runs thousands of children; with a budget of a few hundred evaluations that start keeps one seed.
Without segments the genome vector itself is the individual (Euclidean angle, split on any coordinate)
and the initial members are ``x0`` plus ``init_random`` uniform points (default ``archive_size - 1``).

Initial members are handed out first. Children are proposed once the archive holds two members (or one,
when no initial member is still out); until then ``ask`` may return fewer than ``n``. Scores must be
non-negative (accuracies, exact matches); ``per_example`` defaults to the task scores when absent.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import numpy.typing as npt

from evomerge.config.optimizers import M2N2Options
from evomerge.errors import ConfigError, OptimizerError
from evomerge.evaluation import Candidate
from evomerge.optim.base import BaseOptimizer, Told

logger = logging.getLogger(__name__)

Array = npt.NDArray[np.float64]
_SIN_EPS = 1e-6



def shared_fitness(scores: npt.ArrayLike, alpha: float) -> tuple[Array, Array]:
    """Fitness sharing: ``(F, f)`` with ``F_ij = S_ij / z_j``, ``z_j = (sum_i S_ij)**alpha`` (1 where 0)."""
    s = np.asarray(scores, dtype=np.float64)
    z = s.sum(axis=0) ** alpha
    z = np.where(z != 0, z, 1.0)
    shared = s / z[None, :]
    return shared, shared.sum(axis=1)


def attraction(shared: npt.ArrayLike, parent: int) -> Array:
    """``g_k = sum_j max(0, F_kj - F_parent,j)``: how much member k adds where ``parent`` is weak."""
    f = np.asarray(shared, dtype=np.float64)
    return np.maximum(0.0, f - f[parent][None, :]).sum(axis=1)


def replacement_slot(archive_scores: npt.ArrayLike, child_scores: npt.ArrayLike, alpha: float) -> int | None:
    """The archive row the child replaces (lowest shared fitness over archive + child), or None."""
    archive = np.asarray(archive_scores, dtype=np.float64)
    ext = np.vstack([archive, np.asarray(child_scores, dtype=np.float64)[None, :]])
    _, fitness = shared_fitness(ext, alpha)
    worst = int(np.argmin(fitness))
    return worst if worst < archive.shape[0] else None


def slerp_coefficients(cp: npt.ArrayLike, cq: npt.ArrayLike, gram: npt.ArrayLike, t: npt.ArrayLike) -> Array:
    """SLERP of two individuals ``[S, M]`` with per-segment ``t [S]`` and one global angle from ``gram``.

    Equals the element-wise SLERP ``sin((1-t)Ω)/sinΩ p + sin(tΩ)/sinΩ q`` of the materialized weight
    vectors ``p = concat_s(sum_m cp[s, m] seed_m[s])`` (likewise ``q``) when ``gram[s]`` is the seeds'
    Gram matrix in segment ``s``; linear interpolation when ``sin Ω <= 1e-6`` or a parent is zero.
    """
    p, q = np.asarray(cp, dtype=np.float64), np.asarray(cq, dtype=np.float64)
    g, tt = np.asarray(gram, dtype=np.float64), np.asarray(t, dtype=np.float64)
    pq = float(np.einsum("sm,smn,sn->", p, g, q))
    pp = float(np.einsum("sm,smn,sn->", p, g, p))
    qq = float(np.einsum("sm,smn,sn->", q, g, q))
    a, b = 1.0 - tt, tt
    if pp > 0 and qq > 0:
        omega = float(np.arccos(np.clip(pq / np.sqrt(pp * qq), -1.0, 1.0)))
        sin_omega = np.sin(omega)
        if sin_omega > _SIN_EPS:
            a, b = np.sin((1.0 - tt) * omega) / sin_omega, np.sin(tt * omega) / sin_omega
    return a[:, None] * p + b[:, None] * q


def _proportional(weights: Array, members: npt.NDArray[np.bool_]) -> Array | None:
    w = np.where(members, weights, 0.0)
    total = w.sum()
    return None if total <= 0 else w / total


class M2N2Optimizer(BaseOptimizer):
    """Natural-niches model merging (see the module docstring for the exact algorithm)."""

    name = "m2n2"
    Options = M2N2Options
    options: M2N2Options

    def _setup(self) -> None:
        p, o = self.problem, self.options
        if p.segments is not None:
            seg = p.segments
            self._n_units, self._n_seeds = seg.n_segments, seg.n_seeds
            self._gram, self._sizes = seg.gram, seg.sizes.astype(np.float64)
        else:
            self._n_units, self._n_seeds = p.dim, 1
            self._gram, self._sizes = np.ones((p.dim, 1, 1)), np.ones(p.dim)
        self._queue: list[tuple[Array, dict[str, Any]]] = self._initial_members()
        size = o.archive_size
        self._genomes = np.zeros((size, p.dim))
        self._ids = np.full(size, -1, dtype=np.int64)
        self._objectives = np.zeros((size, len(p.task_names)))
        self._scores: Array | None = None

    def _initial_members(self) -> list[tuple[Array, dict[str, Any]]]:
        p, o = self.problem, self.options
        members: list[tuple[Array, dict[str, Any]]] = []
        s, m = self._n_units, self._n_seeds
        if p.segments is not None:
            for seed in range(m):
                c = np.zeros((s, m))
                c[:, seed] = 1.0
                genome = c.ravel()
                if np.any(genome < p.lower) or np.any(genome > p.upper):
                    raise ConfigError(
                        "optimizer 'm2n2': the seed models (coefficient 1) lie outside the problem bounds"
                    )
                members.append((genome, {"origin": "seed", "seed": seed}))
            if o.include_x0:
                members.append((p.x0.copy(), {"origin": "x0"}))
            for _ in range(o.init_random or 0):
                mix = self._rng.dirichlet(np.ones(m), size=s).ravel()
                members.append((np.clip(mix, p.lower, p.upper), {"origin": "random"}))
            n_children = o.init_children
            if n_children is None:
                n_children = max(0, o.archive_size - len(members))
            for _ in range(n_children):
                members.append(self._task_arithmetic_child())
        else:
            members.append((p.x0.copy(), {"origin": "x0"}))
            n_random = o.archive_size - 1 if o.init_random is None else o.init_random
            for _ in range(n_random):
                members.append((self._rng.uniform(p.lower, p.upper), {"origin": "random"}))
        return members

    def _task_arithmetic_child(self) -> tuple[Array, dict[str, Any]]:
        """``seed_0 + sum_m λ_m (seed_m - seed_0)`` with ``λ ~ U(child_weights)``, shrunk into the bounds."""
        p = self.problem
        s, m = self._n_units, self._n_seeds
        lo, hi = self.options.child_weights
        lam = self._rng.uniform(lo, hi, size=m - 1)
        anchor = np.zeros((s, m))
        anchor[:, 0] = 1.0
        step = np.zeros((s, m))
        step[:, 0] = -lam.sum()
        step[:, 1:] = lam
        a, d = anchor.ravel(), step.ravel()
        with np.errstate(divide="ignore", invalid="ignore"):
            room = np.where(d > 0, (p.upper - a) / d, np.where(d < 0, (p.lower - a) / d, np.inf))
        scale = float(min(1.0, room.min(initial=np.inf)))
        genome = np.clip(a + scale * d, p.lower, p.upper)
        return genome, {"origin": "task_arithmetic", "weights": (scale * lam).tolist()}

    # ------------------------------------------------------------------ ask
    def _propose(self, n: int) -> list[tuple[Array, dict[str, Any]]]:
        out = self._queue[:n]
        del self._queue[:n]
        n_members = int(np.sum(self._ids >= 0))
        initial_out = bool(out) or any(c.meta.get("origin") != "child" for c in self._pending.values())
        if n_members == 0 and not initial_out:
            raise OptimizerError("m2n2: every initial member failed; the archive is empty")
        if n_members >= 2 or (n_members == 1 and not initial_out):
            out.extend(self._child() for _ in range(n - len(out)))
        return out

    def _child(self) -> tuple[Array, dict[str, Any]]:
        o, p = self.options, self.problem
        assert self._scores is not None
        members = self._ids >= 0
        shared, fitness = shared_fitness(self._scores, o.alpha)
        base = _proportional(fitness, members)
        if base is None:
            base = members / members.sum()
        first = int(self._rng.choice(len(base), p=base))
        second_p = base
        if o.use_matchmaker:
            second_p = _proportional(attraction(shared, first), members)
            second_p = base if second_p is None else second_p
        second = int(self._rng.choice(len(base), p=second_p))
        meta: dict[str, Any] = {"origin": "child", "parents": [int(self._ids[first]), int(self._ids[second])]}
        shape = (self._n_units, self._n_seeds)
        cp, cq = self._genomes[first].reshape(shape), self._genomes[second].reshape(shape)
        if o.use_crossover:
            split = None
            if o.use_splitpoint:
                position = self._rng.integers(0, int(self._sizes.sum()))
                split = int(np.searchsorted(np.cumsum(self._sizes), position, side="right"))
            w = float(self._rng.uniform())
            t = (
                np.full(self._n_units, w)
                if split is None
                else np.where(np.arange(self._n_units) < split, w, 1 - w)
            )
            child = slerp_coefficients(cp, cq, self._gram, t).ravel()
            meta.update(w=w, split=split)
        else:
            child = cp.ravel().copy()
        if o.mutation > 0:
            child = child + self._rng.normal(0.0, o.mutation, size=child.shape)
        return np.clip(child, p.lower, p.upper), meta

    # ------------------------------------------------------------------ tell
    def _example_scores(self, t: Told) -> Array:
        assert t.objectives is not None
        return t.objectives if t.per_example is None else t.per_example

    def _validate(self, told: list[Told]) -> None:
        n = None if self._scores is None else self._scores.shape[1]
        for t in told:
            if not t.ok:
                continue
            s = self._example_scores(t)
            if np.any(s < 0):
                raise OptimizerError(
                    f"m2n2: candidate {t.candidate.id} has negative per-example scores (min {s.min():g}); "
                    "fitness sharing needs non-negative scores such as accuracies"
                )
            if n is not None and s.shape[0] != n:
                raise OptimizerError(
                    f"m2n2: candidate {t.candidate.id} has {s.shape[0]} per-example scores, expected {n}"
                )
            n = s.shape[0]

    def _observe(self, told: list[Told]) -> None:
        for t in told:
            if not t.ok:
                logger.debug("m2n2: candidate %d failed; discarded", t.candidate.id)
                continue
            scores = self._example_scores(t)
            if self._scores is None:
                self._scores = np.zeros((self.options.archive_size, scores.shape[0]))
            slot = replacement_slot(self._scores, scores, self.options.alpha)
            if slot is None:
                continue
            self._scores[slot] = scores
            self._genomes[slot] = t.candidate.genome
            self._ids[slot] = t.candidate.id
            self._objectives[slot] = t.objectives  # type: ignore[assignment]

    def archive(self) -> list[Candidate]:
        """The current archive members (``meta``: ``objectives`` and shared ``fitness``), by slot."""
        if self._scores is None:
            return []
        _, fitness = shared_fitness(self._scores, self.options.alpha)
        return [
            Candidate(
                id=int(self._ids[i]),
                genome=self._genomes[i].copy(),
                meta={"objectives": self._objectives[i].tolist(), "fitness": float(fitness[i])},
            )
            for i in np.flatnonzero(self._ids >= 0)
        ]

    # ------------------------------------------------------------------ state
    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        impl = {
            "queue": [{"genome": g.tolist(), "meta": m} for g, m in self._queue],
            "genomes": self._genomes.tolist(),
            "ids": self._ids.tolist(),
            "objectives": self._objectives.tolist(),
            "scores": None if self._scores is None else self._scores.tolist(),
        }
        return impl, None

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        size, dim, k = self.options.archive_size, self.problem.dim, len(self.problem.task_names)
        queue = [(np.asarray(q["genome"], dtype=np.float64), dict(q["meta"])) for q in impl["queue"]]
        genomes = np.asarray(impl["genomes"], dtype=np.float64).reshape(size, dim)
        ids = np.asarray(impl["ids"], dtype=np.int64).reshape(size)
        objectives = np.asarray(impl["objectives"], dtype=np.float64).reshape(size, k)
        scores = None if impl["scores"] is None else np.asarray(impl["scores"], dtype=np.float64)
        if scores is not None and (scores.ndim != 2 or scores.shape[0] != size):
            raise OptimizerError(f"m2n2: state scores have shape {scores.shape}, expected ({size}, N)")
        self._queue, self._genomes, self._ids, self._objectives, self._scores = (
            queue,
            genomes,
            ids,
            objectives,
            scores,
        )
