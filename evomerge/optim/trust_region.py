"""The trust region of ``bo`` (TuRBO-1, Eriksson et al., "Scalable Global Optimization via Local Bayesian
Optimization", NeurIPS 2019): where the next proposals may lie, as pure functions of the told data.

The region is replayed from the told results in told order, so it is a function of an optimizer's state: a
restored optimizer has the same region, and nothing about it is stored.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from evomerge.config.optimizers import BoOptions

__all__ = ["Region", "ard_lengthscales", "box", "replay"]

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Region:
    """``center``: the best successful genome under the scalarization (the first of equals; the start point
    before any); ``length``: the side, as a fraction of each gene's range; TuRBO's counters and restarts."""

    center: Array
    length: float
    successes: int
    failures: int
    restarts: int
    best: float


def replay(told: Iterable[tuple[Array, Array | None]], scalarize: Callable[[Array], float], x0: Array,
           options: BoOptions, dim: int) -> Region:
    """The region after ``told`` ((genome, objectives or None for a failure) in told order).

    TuRBO's rule, per told result as results arrive one by one: an improvement of the best scalarized score by
    more than 1e-3 of its size is a success, anything else a failure (failed candidates count for nothing);
    ``tr_successes`` successes in a row double the length (up to ``tr_length_max``), ``tr_failures`` failures
    in a row (default ``min(max(4, dim / 4), 10)``) halve it, and below ``tr_length_min`` it restarts at
    ``tr_length`` around the same center."""
    o = options
    tol_fail = o.tr_failures if o.tr_failures is not None else min(max(4, dim // 4), 10)
    center, best = x0, -np.inf
    length, succ, fail, restarts = o.tr_length, 0, 0, 0
    for g, y in told:
        if y is None:
            continue
        v = float(scalarize(y))
        if not np.isfinite(best):  # the first success sets the center and counts as neither
            best, center = v, g
            continue
        if v > best + 1e-3 * abs(best):
            succ, fail = succ + 1, 0
        else:
            succ, fail = 0, fail + 1
        if v > best:
            best, center = v, g
        if succ >= o.tr_successes:
            length, succ = min(2.0 * length, o.tr_length_max), 0
        if fail >= tol_fail:
            length, fail = length / 2.0, 0
            if length < o.tr_length_min:
                length, restarts = o.tr_length, restarts + 1
    return Region(center, length, succ, fail, restarts, best)


def box(center: Array, length: float, lengthscale: Array | None, lower: Array, upper: Array) -> tuple[Array, Array]:
    """The box of side ``length`` (per gene: times its lengthscale over their geometric mean, TuRBO's
    weighting) around ``center``, clipped to ``[lower, upper]``."""
    w = np.ones(len(center))
    if lengthscale is not None:
        w = lengthscale / np.exp(np.mean(np.log(lengthscale)))
    half = 0.5 * length * w * (upper - lower)
    return np.maximum(center - half, lower), np.minimum(center + half, upper)


def ard_lengthscales(model: torch.nn.Module, dim: int) -> Array | None:
    """A GP's ARD lengthscales (over a list of GPs or NUTS samples: their median), if it has ``dim`` of them."""
    found = [m.lengthscale.detach().reshape(-1, m.lengthscale.shape[-1])
             for m in model.modules() if getattr(m, "has_lengthscale", False)]
    if not found:
        return None
    ls = torch.cat(found).median(dim=0).values.numpy().astype(np.float64)
    return ls if ls.shape == (dim,) and np.all(np.isfinite(ls)) and np.all(ls > 0) else None
