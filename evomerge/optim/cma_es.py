"""CMA-ES on the ``cma`` package, driven by ask/tell with the generator owned by the optimizer."""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from typing import Any

import cma
import numpy as np
import numpy.typing as npt

from evomerge.config.optimizers import CmaEsOptions
from evomerge.errors import OptimizerError
from evomerge.optim.base import BaseOptimizer, Told

logger = logging.getLogger(__name__)



class _Randn:
    """The ``randn(*shape)`` callable cma samples with, backed by the optimizer's generator.

    It pickles without its generator (the optimizer's JSON state carries that), so a state blob never
    holds a second, stale copy; :meth:`CmaEsOptimizer._restore_state` re-binds it.
    """

    def __init__(self, rng: np.random.Generator | None) -> None:
        self.rng = rng

    def __call__(self, *shape: int) -> npt.NDArray[np.float64]:
        if self.rng is None:
            raise OptimizerError("cma_es: sampler is not bound to a generator (state restored incompletely)")
        return self.rng.standard_normal(shape)

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.rng = None


class CmaEsOptimizer(BaseOptimizer):
    """CMA-ES (minimizing the negated scalarized score), one full generation per update.

    ``ask(n)`` hands out the members of the current generation that are not yet out, at most ``n``;
    when all of them are out but some results are missing it returns fewer than ``n`` — possibly none —
    and the driver keeps its remaining workers idle until a result arrives. Results are buffered in any
    order; when the last member of a generation is told, the whole generation goes to ``es.tell`` in
    generation order (so arrival order never changes the search), and the next ``ask`` samples the next
    generation. A failure gets :meth:`~BaseOptimizer.penalty` taken when its generation completes, i.e.
    below every score seen up to and including that generation. Nothing is written to disk
    (``verbose=-9``, ``verb_log=0``) and cma samples through ``randn`` bound to the optimizer's generator
    (``seed=nan``), so the global numpy RNG is untouched.
    """

    name = "cma_es"
    Options = CmaEsOptions
    options: CmaEsOptions

    def _setup(self) -> None:
        p = self.problem
        opts: dict[str, Any] = {
            "bounds": [p.lower.tolist(), p.upper.tolist()],
            "randn": _Randn(self._rng),
            "seed": np.nan,
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "verb_filenameprefix": os.path.join(tempfile.gettempdir(), "evomerge-cma-unused-"),
        }
        if self.options.popsize is not None:
            opts["popsize"] = self.options.popsize
        self._es = cma.CMAEvolutionStrategy(p.x0.tolist(), self.options.sigma0, opts)
        if self.options.x0_first:
            # cma samples in its genotype space; the inverse of its boundary transform maps x0 there.
            self._es.inject([self._es.boundary_handler.inverse(p.x0.copy())], force=True)
        self._generation = -1
        self._gen_x: list[npt.NDArray[np.float64]] = []
        self._handed = 0
        self._results: dict[int, list[float] | None] = {}

    @property
    def popsize(self) -> int:
        return int(self._es.popsize)

    def _propose(self, n: int) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
        if self._handed >= len(self._gen_x):
            if self._gen_x:
                return []  # every member is out; wait for the missing results
            self._gen_x = [np.asarray(x, dtype=np.float64) for x in self._es.ask()]
            self._generation += 1
            self._handed = 0
            self._results = {}
        start = self._handed
        stop = min(len(self._gen_x), start + n)
        self._handed = stop
        return [
            (self._gen_x[i].copy(), {"generation": self._generation, "index": i}) for i in range(start, stop)
        ]

    def _validate(self, told: list[Told]) -> None:
        for t in told:
            if t.candidate.meta.get("generation") != self._generation:
                raise OptimizerError(f"cma_es: candidate {t.candidate.id} is not of the current generation")

    def _observe(self, told: list[Told]) -> None:
        for t in told:
            self._results[int(t.candidate.meta["index"])] = t.objectives.tolist() if t.ok else None  # type: ignore[union-attr]
        if len(self._results) < len(self._gen_x):
            return
        penalty = self.penalty()
        losses = [
            -self.scalarizer(penalty if self._results[i] is None else np.asarray(self._results[i]))
            for i in range(len(self._gen_x))
        ]
        self._es.tell(self._gen_x, losses)
        n_failed = sum(r is None for r in self._results.values())
        logger.debug(
            "cma_es generation %d: best %.6g, sigma %.3g, %d failed",
            self._generation,
            -min(losses),
            self._es.sigma,
            n_failed,
        )
        self._gen_x, self._handed, self._results = [], 0, {}

    def _should_stop(self) -> bool:
        return bool(self._es.stop())

    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        impl = {
            "generation": self._generation,
            "gen_x": [x.tolist() for x in self._gen_x],
            "handed": self._handed,
            "results": {str(i): r for i, r in sorted(self._results.items())},
        }
        return impl, self._es.pickle_dumps()

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        if blob is None:
            raise OptimizerError("cma_es: state has no 'blob' (the pickled CMAEvolutionStrategy)")
        es = pickle.loads(blob)  # noqa: S301 - the optimizer's own checkpoint
        if not isinstance(es, cma.CMAEvolutionStrategy):
            raise OptimizerError(
                f"cma_es: state blob holds a {type(es).__name__}, not a CMAEvolutionStrategy"
            )
        gen_x = [np.asarray(x, dtype=np.float64) for x in impl["gen_x"]]
        results = {int(k): (None if v is None else [float(a) for a in v]) for k, v in impl["results"].items()}
        generation, handed = int(impl["generation"]), int(impl["handed"])
        samplers = [es.opts.get("randn"), getattr(es.sm, "randn", None)]
        if not any(isinstance(s, _Randn) for s in samplers):
            raise OptimizerError("cma_es: state blob was not written by this optimizer (foreign randn)")
        for s in samplers:
            if isinstance(s, _Randn):
                s.rng = self._rng
        self._es, self._gen_x, self._results = es, gen_x, results
        self._generation, self._handed = generation, handed
