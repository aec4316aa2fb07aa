"""The Pareto front over calibration tasks and its hypervolume, derived from archive records.

Every objective is a per-task mean score, **higher is better**. Dominance and hypervolume come from
``moocore`` (``is_nondominated``, ``hypervolume``), called with ``maximise=True``; nothing here is stored.

Reference point of the hypervolume: ``ref`` is the worst acceptable score per task, and only the region
that a point improves on in *every* task counts. The default ``ref = 0`` suits scores in [0, 1]
(accuracy, exact match): the hypervolume is then the share of the unit box dominated by the front,
between 0 and 1. For other metrics, or to measure gain over a baseline, pass that baseline's scores
(for example the base model's per-task means) as ``ref``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import moocore
import numpy as np
import numpy.typing as npt

from evomerge.archive.store import Record


def objectives(records: Sequence[Record], tasks: Sequence[str]) -> npt.NDArray[np.float64]:
    """The (n_records, n_tasks) matrix of per-task means, NaN where a record lacks a finite score."""
    out = np.full((len(records), len(tasks)), np.nan)
    for i, record in enumerate(records):
        if not record.ok:
            continue
        means = record.result.task_means()
        for j, task in enumerate(tasks):
            value = means.get(task, math.nan)
            out[i, j] = value if math.isfinite(value) else math.nan
    return out


def _ref_vector(ref: float | Sequence[float] | npt.ArrayLike, m: int) -> npt.NDArray[np.float64]:
    vec = np.asarray(ref, dtype=np.float64)
    if vec.ndim == 0:
        vec = np.full(m, float(vec))
    if vec.shape != (m,):
        raise ValueError(f"reference point has {vec.size} values for {m} objectives")
    if not np.all(np.isfinite(vec)):
        raise ValueError(f"reference point {vec.tolist()} is not finite")
    return vec


def _eligible(points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    return np.asarray(np.all(np.isfinite(points), axis=1), dtype=np.bool_)


def pareto_front(
    records: Sequence[Record], tasks: Sequence[str], *, keep_duplicates: bool = False
) -> list[Record]:
    """The successful records that no other record beats on every task (higher is better).

    Records that failed or lack a finite mean for one of ``tasks`` take no part. Among records with
    identical scores only the first (lowest ``seq`` order as given) is kept unless ``keep_duplicates``.
    Order follows ``records``. Pass records of one fidelity and split: scores of different example
    subsets are not comparable.
    """
    if not tasks:
        raise ValueError("pareto_front needs at least one task")
    points = objectives(records, tasks)
    idx = np.flatnonzero(_eligible(points))
    if idx.size == 0:
        return []
    keep = moocore.is_nondominated(points[idx], maximise=True, keep_weakly=keep_duplicates)
    return [records[i] for i in idx[np.asarray(keep, dtype=bool)]]


def hypervolume(points: npt.ArrayLike, ref: float | Sequence[float] | npt.ArrayLike = 0.0) -> float:
    """Hypervolume dominated by ``points`` (rows = solutions, columns = scores to maximize) above ``ref``.

    Rows with a non-finite value are ignored; an empty set has hypervolume 0. See the module
    docstring for the choice of ``ref``.
    """
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"points must be a 2-D array (solutions x objectives), got shape {arr.shape}")
    vec = _ref_vector(ref, arr.shape[1])
    arr = arr[_eligible(arr)]
    if arr.shape[0] == 0:
        return 0.0
    return float(moocore.hypervolume(arr, ref=vec, maximise=True))


def hypervolume_history(
    records: Sequence[Record], tasks: Sequence[str], ref: float | Sequence[float] | npt.ArrayLike = 0.0
) -> list[float]:
    """The hypervolume of the front of ``records[:k+1]`` for every k: one value per record, in order.

    A failed record, or one whose scores the current front dominates, repeats the previous value.
    """
    if not tasks:
        raise ValueError("hypervolume_history needs at least one task")
    points = objectives(records, tasks)
    vec = _ref_vector(ref, len(tasks))
    front = np.empty((0, len(tasks)))
    current = 0.0
    history: list[float] = []
    for point in points:
        if np.all(np.isfinite(point)):
            dominated = bool(front.shape[0]) and bool(np.any(np.all(front >= point, axis=1)))
            if not dominated:
                candidates = np.vstack([front, point])
                front = candidates[np.asarray(moocore.is_nondominated(candidates, maximise=True), dtype=bool)]
                current = float(moocore.hypervolume(front, ref=vec, maximise=True))
        history.append(current)
    return history
