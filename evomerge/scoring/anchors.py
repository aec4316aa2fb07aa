"""The calibration subset of a multi-fidelity run and its estimator of the full-set score.

A candidate scored on a subset of each task's calibration examples is judged by an *estimate* of its full-set
task score with a standard error, not by the subset mean alone. Two designs (``fidelity.subset_method``):

* ``random``: the scorer's hashed subset (:func:`~evomerge.scoring.suite.subset_examples`); one stratum per task,
  the estimate is the subset mean and its standard error ``s / sqrt(n) * sqrt(1 - n / N)`` (finite population).
* ``anchor``: anchor points (Vivek et al., "Anchor Points: Benchmarking Models with Much Fewer Examples",
  EACL 2024), adapted to the few reference models a merge run has. Examples are clustered by their score vectors
  across the reference models (the base and the sources, scored on the full set before the search), so that an
  example's cluster says how the models it is merged from do on it. The clusters are the strata of a stratified
  sample: every cluster gets at least one example, the rest go where the reference models disagree (Neyman
  allocation, ``n_h ~ N_h S_h``, S_h the spread of the reference scores in the cluster, with a floor because a
  merge may fail where all of its sources agree), chosen inside a cluster by the seeded hash of the example ids.
  The estimate is the cluster-size-weighted mean of the cluster means (the stratified estimator, unbiased under
  the within-cluster sampling) with its standard error ``sqrt(sum W_h^2 (1 - n_h/N_h) s_h^2 / n_h)``; a cluster
  with one chosen example uses the pooled within-cluster variance.

  Anchor points proper takes one medoid per cluster. With two or three reference models and 0/1 scores there are
  at most 2^M distinct score vectors, so there are few clusters and one medoid each would be too few examples;
  a stratified sample uses the clusters the same way, keeps every example of the budget, and gives a design-based
  standard error, which the promotion needs. IRT (difficulty / discrimination per example, as tinyBenchmarks fits
  it on hundreds of models) is not identifiable from three respondents, so it is not offered.

The subset depends only on the reference models' per-example scores, the subset size and the seed: a resumed run
recomputes the same one, and the driver also keeps it in the run folder (``calibration_subset.json``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from evomerge.errors import ConfigError
from evomerge.evaluation import EvalResult

__all__ = ["METHODS", "CalibrationSubset", "Estimate", "StrataPlan", "choose_subset"]

METHODS = ("random", "anchor")

#: Degrees of freedom of the pooled within-cluster variance that each cluster's own variance is shrunk towards.
PRIOR_DOF = 2.0

#: Examples per cluster on average: the subset of ``k`` has at most ``ceil(k / STRATUM_SIZE)`` clusters.
STRATUM_SIZE = 2

#: The spread a cluster is given beyond its reference models' (a share of the task's whole spread): how much a
#: merge may differ from its sources where they agree; it steers the allocation and is each cluster's prior.
FLOOR = 1.0

#: Above this many examples a task's score vectors are clustered by seeded k-means instead of Ward linkage
#: (whose distance matrix grows with the square of the examples).
WARD_MAX_EXAMPLES = 4000


@dataclass(frozen=True)
class Estimate:
    """An estimated full-set task score and its standard error."""

    mean: float
    se: float


@dataclass(frozen=True)
class StrataPlan:
    """One task's strata (all example ids of each) and the ids chosen for the cheap evaluation.

    ``chosen`` is ``None`` for the random design, whose examples the scorer picks by count.
    """

    strata: tuple[tuple[str, ...], ...]
    chosen: tuple[str, ...] | None
    #: Per stratum, the variance a candidate's scores are expected to have there before any is seen (the
    #: reference models' spread with its floor); empty: none (the random design).
    prior: tuple[float, ...] = ()

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.strata)

    def estimate(self, ids: Sequence[str], scores: npt.NDArray[np.float64]) -> Estimate:
        """The stratified estimate of the full-set mean from the scores of examples ``ids``."""
        where = {i: h for h, members in enumerate(self.strata) for i in members}
        groups: dict[int, list[float]] = {}
        for i, s in zip(ids, np.asarray(scores, dtype=np.float64), strict=True):
            groups.setdefault(where.get(i, -1), []).append(float(s))
        if -1 in groups or not self.strata:  # examples outside the strata: no design to use, a plain mean
            allv = np.asarray([v for g in groups.values() for v in g])
            se = float(np.std(allv, ddof=1) / math.sqrt(len(allv))) if len(allv) > 1 else 0.0
            return Estimate(float(np.mean(allv)) if len(allv) else float("nan"), se)
        sampled = {h: np.asarray(v) for h, v in groups.items()}
        total = sum(len(self.strata[h]) for h in sampled)  # strata without a score are left out (reweighted)
        within = [(len(v) - 1, float(np.var(v, ddof=1))) for v in sampled.values() if len(v) > 1]
        if within:
            pooled = sum(d * v for d, v in within) / sum(d for d, _ in within)
        else:
            allv = np.concatenate(list(sampled.values()))
            pooled = float(np.var(allv, ddof=1)) if len(allv) > 1 else 0.0
        mean = var = 0.0
        for h, v in sampled.items():
            big_n, n = len(self.strata[h]), len(v)
            w = big_n / total
            mean += w * float(np.mean(v))
            # the few examples of a cluster often agree by chance: shrink towards the cluster's prior variance
            # (or, in the random design, the pooled one)
            prior = self.prior[h] if self.prior else pooled
            s2 = ((n - 1) * (float(np.var(v, ddof=1)) if n > 1 else 0.0) + PRIOR_DOF * prior) / (n - 1 + PRIOR_DOF)
            var += w * w * max(0.0, 1 - n / big_n) * s2 / n
        return Estimate(mean, math.sqrt(var))

    def to_json(self) -> dict[str, Any]:
        return {"strata": [list(s) for s in self.strata], "chosen": None if self.chosen is None else list(self.chosen),
                "prior": list(self.prior)}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> StrataPlan:
        chosen = doc["chosen"]
        return cls(tuple(tuple(str(i) for i in s) for s in doc["strata"]),
                   None if chosen is None else tuple(str(i) for i in chosen),
                   tuple(float(v) for v in doc.get("prior", ())))


@dataclass(frozen=True)
class CalibrationSubset:
    """The subset of a run: its design, size per task, seed and one :class:`StrataPlan` per task."""

    method: str
    k: int
    seed: int
    tasks: dict[str, StrataPlan]

    def examples(self) -> tuple[tuple[str, tuple[str, ...]], ...] | None:
        """The chosen ids per task, as a scorer's ``subset`` takes them (``None``: the random design, by count)."""
        if self.method == "random":
            return None
        return tuple((t, p.chosen or ()) for t, p in sorted(self.tasks.items()))

    def estimate(self, result: EvalResult) -> dict[str, Estimate]:
        """Per task, the estimated full-set score of a candidate scored on this subset."""
        out = {}
        for t, ts in result.tasks.items():
            plan = self.tasks.get(t)
            out[t] = (plan or StrataPlan((), None)).estimate(ts.example_ids, ts.scores)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"format": "evomerge.calibration_subset", "version": 1, "method": self.method, "k": self.k,
                "seed": self.seed, "tasks": {t: p.to_json() for t, p in sorted(self.tasks.items())}}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, source: str) -> CalibrationSubset:
        try:
            if doc.get("format") != "evomerge.calibration_subset" or doc.get("version") != 1:
                raise ValueError("not a version-1 calibration subset")
            return cls(str(doc["method"]), int(doc["k"]), int(doc["seed"]),
                       {str(t): StrataPlan.from_json(p) for t, p in doc["tasks"].items()})
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: unreadable calibration subset ({type(exc).__name__}: {exc})") from None


def _rank(seed: int, task: str, ex_id: str) -> str:
    return hashlib.sha256(f"anchor\0{seed}\0{task}\0{ex_id}".encode()).hexdigest()


def _clusters(x: npt.NDArray[np.float64], k: int, seed: int) -> npt.NDArray[np.int64]:
    """Cluster labels (0..) of the rows of ``x``: identical score vectors first, then Ward linkage (k-means for
    large tasks) when there are more distinct vectors than ``k``."""
    uniq, inverse = np.unique(x, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if len(uniq) <= k:
        return inverse.astype(np.int64)
    if len(x) <= WARD_MAX_EXAMPLES:
        from scipy.cluster.hierarchy import fcluster, linkage

        labels = fcluster(linkage(x, method="ward"), t=k, criterion="maxclust") - 1
    else:
        from scipy.cluster.vq import kmeans2

        _, labels = kmeans2(x, k, minit="++", seed=np.random.default_rng(seed))
    _, dense = np.unique(labels, return_inverse=True)  # empty k-means clusters leave gaps
    return dense.reshape(-1).astype(np.int64)


def _allocate(sizes: Sequence[int], spread: Sequence[float], k: int) -> list[int]:
    """``k`` picks over strata: one each, the rest greedily where they cut the estimator's variance the most
    (Neyman allocation by the reference models' spread), never more than a stratum holds."""
    n = [1] * len(sizes)
    w = [big_n * s for big_n, s in zip(sizes, spread, strict=True)]
    if not any(w):
        w = [float(big_n) for big_n in sizes]
    for _ in range(k - len(sizes)):
        gains = [w[h] ** 2 / (n[h] * (n[h] + 1)) if n[h] < sizes[h] else -1.0 for h in range(len(sizes))]
        best = int(np.argmax(gains))
        if gains[best] < 0:
            break
        n[best] += 1
    return n


def _anchor_plan(task: str, ids: Sequence[str], x: npt.NDArray[np.float64], k: int, seed: int) -> StrataPlan:
    if k >= len(ids):
        return StrataPlan((tuple(ids),), tuple(ids))
    labels = _clusters(x, max(1, math.ceil(k / STRATUM_SIZE)), seed)
    floor = FLOOR * float(np.std(x))  # a merge can fail (or succeed) where every reference model agrees
    strata, spread = [], []
    for h in range(int(labels.max()) + 1):
        rows = np.flatnonzero(labels == h)
        strata.append(tuple(ids[i] for i in rows))
        spread.append(math.sqrt(float(np.var(x[rows])) + floor**2))
    picks = _allocate([len(s) for s in strata], spread, k)
    chosen = {i for members, n in zip(strata, picks, strict=True)
              for i in sorted(members, key=lambda e: _rank(seed, task, e))[:n]}
    return StrataPlan(tuple(strata), tuple(i for i in ids if i in chosen), tuple(s * s for s in spread))


def choose_subset(method: str, k: int, seed: int,
                  references: Sequence[EvalResult], tasks: Sequence[str]) -> CalibrationSubset:
    """The run's calibration subset from the reference models' full-set results (the base and the sources).

    ``random`` keeps one stratum per task (only its size matters); ``anchor`` clusters the examples by their
    score vectors across ``references`` (see the module docstring). Without a successful reference result a
    task has no strata and its estimate is the plain subset mean.
    """
    if method not in METHODS:
        raise ConfigError(f"fidelity.subset_method: unknown method {method!r}; valid: {', '.join(METHODS)}")
    ok = [r for r in references if r.ok]
    plans: dict[str, StrataPlan] = {}
    for t in tasks:
        rows = [r.tasks[t] for r in ok if t in r.tasks]
        if not rows:
            plans[t] = StrataPlan((), None)
            continue
        ids = list(rows[0].example_ids)
        if method == "random":
            plans[t] = StrataPlan((tuple(ids),), None)
            continue
        x = np.empty((len(ids), len(rows)), dtype=np.float64)
        for j, ts in enumerate(rows):
            pos = dict(zip(ts.example_ids, np.asarray(ts.scores, dtype=np.float64), strict=True))
            if set(pos) != set(ids):
                raise ConfigError(f"task {t!r}: the reference models were scored on different examples; "
                                  "fidelity.subset_method: anchor needs the same full calibration set for each")
            x[:, j] = [pos[i] for i in ids]
        plans[t] = _anchor_plan(t, ids, x, k, seed)
    return CalibrationSubset(method, k, seed, plans)
