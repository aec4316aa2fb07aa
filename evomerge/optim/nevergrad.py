"""Any optimizer of nevergrad's registry (``NGOpt``, ``TwoPointsDE``, ``PSO``, ``DE``, ``OnePlusOne``, …)."""

from __future__ import annotations

import difflib
import logging
import pickle
from typing import Any

import moocore
import nevergrad as ng
import numpy as np
import numpy.typing as npt
from nevergrad.optimization.optimizerlib import NGOptBase
from nevergrad.optimization.recaster import RecastOptimizer

from evomerge.config.optimizers import NevergradOptions
from evomerge.errors import ConfigError, OptimizerError
from evomerge.evaluation import Candidate
from evomerge.optim.base import BaseOptimizer, Told
from evomerge.optim.state import frozen_array

logger = logging.getLogger(__name__)



def _resolve(opt: Any) -> Any:
    """The algorithm NGOpt-like selectors delegate to (they choose from budget, dimension and workers)."""
    while isinstance(opt, NGOptBase):
        opt = opt.optim
    return opt


def _recast_member(opt: Any) -> Any | None:
    """The first thread-based wrapper of a sequential library in ``opt`` (or its chain / portfolio)."""
    stack = [opt]
    while stack:
        o = stack.pop()
        if isinstance(o, RecastOptimizer):
            return o
        for attr in ("optimizers", "optims"):
            stack.extend(_resolve(x) for x in getattr(o, attr, None) or [])
    return None


class NevergradOptimizer(BaseOptimizer):
    """A nevergrad optimizer over a bounded ``ng.p.Array`` starting at ``x0``, asynchronous by candidate.

    Each ``ask`` maps one nevergrad candidate to one evomerge candidate and ``tell`` passes back the
    loss ``-scalarize(objectives)`` (or ``-objectives`` when ``multiobjective``), in the order told.
    Failures are told as :meth:`~BaseOptimizer.penalty` at the time of the tell. The parametrization's
    ``random_state`` is a ``RandomState`` seeded from the optimizer's generator before anything draws
    from it, so the global numpy RNG is not used at run time (importing nevergrad draws from it once,
    when the registry entry is first loaded). In multi-objective mode ``recommend`` returns the member
    of the Pareto front of told candidates that is best under ``scalarize``.

    The default algorithm is ``TwoPointsDE`` (parallel, picklable, no budget needed). Refused with a
    :class:`~evomerge.errors.ConfigError`: nevergrad's *recast* algorithms (``Cobyla``, ``Powell``,
    ``SQP``, … and chains containing them), which run a sequential library in a background thread that
    takes one ask per tell, cannot be pickled, and keeps the interpreter from exiting while alive;
    ``NGOpt`` picks them for one worker and small budgets, so give ``num_workers`` > 1 or another
    algorithm. ``NGOpt`` needs ``budget``; with nevergrad 1.0.12 and numpy >= 2.4 the MetaModel
    algorithms it picks for some budgets fail inside nevergrad. Errors raised by nevergrad surface as
    :class:`~evomerge.errors.OptimizerError` naming the algorithm; the optimizer must then be discarded.

    State: JSON counters plus ``blob``, an opaque pickle of the nevergrad optimizer together with its
    pending candidates (valid only with the same nevergrad version).
    """

    name = "nevergrad"
    Options = NevergradOptions
    options: NevergradOptions

    def _setup(self) -> None:
        o, p = self.options, self.problem
        if o.optimizer not in ng.optimizers.registry:
            close = difflib.get_close_matches(o.optimizer, list(ng.optimizers.registry), n=5)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise ConfigError(
                f"optimizer 'nevergrad': option optimizer: unknown nevergrad optimizer {o.optimizer!r}{hint}"
            )
        # Seed before bounds/sigma exist and again after, so that no sub-parameter ever seeds itself
        # from the global RNG (nevergrad does that lazily for parameters without a random state).
        param = ng.p.Array(init=p.x0.copy())
        param.set_mutation(sigma=(p.upper - p.lower) / 6)  # what Array(lower=, upper=) would choose
        param.random_state = np.random.RandomState(int(self._rng.integers(2**32)))
        param.set_bounds(p.lower.copy(), p.upper.copy())
        param.random_state = param.random_state
        try:
            self._ng = ng.optimizers.registry[o.optimizer](
                parametrization=param, budget=o.budget, num_workers=o.num_workers or 1
            )
            algorithm = _resolve(self._ng)
        except AssertionError as exc:
            if o.budget is not None:
                raise
            raise ConfigError(
                f"optimizer 'nevergrad': {o.optimizer} needs option budget (the planned number of evaluations)"
            ) from exc
        except ValueError as exc:  # e.g. a sequential algorithm given several workers
            raise ConfigError(f"optimizer 'nevergrad': {o.optimizer}: {exc}") from exc
        recast = _recast_member(algorithm)
        if recast is not None:
            raise ConfigError(
                f"optimizer 'nevergrad': {o.optimizer} runs {type(recast).__name__}, a sequential library in a "
                "background thread that cannot be checkpointed; use num_workers > 1 or another algorithm "
                "(e.g. TwoPointsDE, CMA, OnePlusOne, PSO)"
            )
        logger.debug("nevergrad %s runs %s", o.optimizer, type(algorithm).__name__)
        self._ng_pending: dict[int, Any] = {}
        self._front: list[Candidate] = []

    def _propose(self, n: int) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
        out: list[tuple[npt.NDArray[np.float64], dict[str, Any]]] = []
        for _ in range(n):
            try:
                cand = self._ng.ask()
            except Exception as exc:
                raise self._library_error("ask", exc) from exc
            self._ng_pending[self._next_id + len(out)] = cand
            genome = np.clip(np.asarray(cand.value, dtype=np.float64), self.problem.lower, self.problem.upper)
            out.append((genome, {}))
        return out

    def _observe(self, told: list[Told]) -> None:
        for t in told:
            values = self.values_of(t)
            loss: float | list[float] = (
                (-values).tolist() if self.options.multiobjective else -self.scalarizer(values)
            )
            try:
                self._ng.tell(self._ng_pending.pop(t.candidate.id), loss)
            except Exception as exc:
                raise self._library_error("tell", exc) from exc
            if self.options.multiobjective and t.ok:
                self._update_front(t)

    def _library_error(self, step: str, exc: Exception) -> OptimizerError:
        algorithm = type(_resolve(self._ng)).__name__
        return OptimizerError(f"nevergrad {self.options.optimizer} ({algorithm}) failed in {step}: {exc!r}")

    def _update_front(self, t: Told) -> None:
        assert t.objectives is not None
        entry = Candidate(
            id=t.candidate.id, genome=t.candidate.genome, meta={"objectives": t.objectives.tolist()}
        )
        front = [*self._front, entry]
        points = np.array([c.meta["objectives"] for c in front], dtype=np.float64)
        keep = moocore.is_nondominated(points, maximise=True, keep_weakly=False)
        self._front = [c for c, k in zip(front, keep, strict=True) if k]

    def pareto_front(self) -> list[Candidate]:
        """Told candidates that no other told candidate dominates (multi-objective mode), in told order."""
        return list(self._front)

    def _recommend(self) -> Candidate | None:
        if not self.options.multiobjective:
            return self._best
        if not self._front:
            return None
        scores = [self.scalarizer(np.asarray(c.meta["objectives"])) for c in self._front]
        best = self._front[int(np.argmax(scores))]
        return Candidate(id=best.id, genome=best.genome, meta={**best.meta, "score": max(scores)})

    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        impl = {
            "ng_pending": sorted(self._ng_pending),
            "front": [
                {"id": c.id, "genome": c.genome.tolist(), "objectives": c.meta["objectives"]}
                for c in self._front
            ],
        }
        try:
            blob = pickle.dumps((self._ng, self._ng_pending), protocol=pickle.HIGHEST_PROTOCOL)
        except (TypeError, ValueError, AttributeError, pickle.PicklingError) as exc:
            raise OptimizerError(
                f"nevergrad {self.options.optimizer} cannot be checkpointed: {exc!r}"
            ) from exc
        return impl, blob

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        if blob is None:
            raise OptimizerError("nevergrad: state has no 'blob' (the pickled nevergrad optimizer)")
        front = [
            Candidate(
                id=int(f["id"]), genome=frozen_array(f["genome"]), meta={"objectives": list(f["objectives"])}
            )
            for f in impl["front"]
        ]
        opt, pending = pickle.loads(blob)  # noqa: S301 - the optimizer's own checkpoint
        if type(_resolve(opt)).__name__ != type(_resolve(self._ng)).__name__:
            raise OptimizerError(
                f"nevergrad: state blob holds {type(opt).__name__}, not {self.options.optimizer}"
            )
        if sorted(pending) != [int(i) for i in impl["ng_pending"]]:
            raise OptimizerError("nevergrad: state blob and JSON disagree on the pending candidates")
        self._ng, self._ng_pending, self._front = opt, dict(pending), front
