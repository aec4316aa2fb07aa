"""Optimizers: ask/tell search over genomes with exact state round trips.

``OPTIMIZERS.get(name)(problem, seed=0, **options)`` builds one; entries are imported lazily and
declare capabilities (``OPTIMIZERS.names(having={"async_tell"})``):

========== =============================================================================
cma_es     CMA-ES (``cma`` package), full generation per update; single objective
nevergrad  any optimizer of nevergrad's registry; async; multi-objective on request
m2n2       natural niches (competition over per-example scores, attraction, SLERP)
optuna     an Optuna sampler (TPE, GP, CMA-ES, NSGA-II/III, QMC, random); async; multi-objective on
           request; exact state as JSON (``optuna`` extra)
random     uniform sampling in the bounds (baseline)
bo         Bayesian optimization (BoTorch GP, qLogNEI / qLogNEHVI); async; for tens of evaluations
========== =============================================================================
"""

from __future__ import annotations

from evomerge.optim.base import (
    ASYNC_TELL,
    BASELINE,
    BUDGET,
    MULTIOBJECTIVE,
    OPTIMIZERS,
    PER_EXAMPLE,
    SEGMENTS,
    BaseOptimizer,
    Observation,
    Optimizer,
    OptimizerOptions,
    Problem,
    SegmentStructure,
    Told,
)
from evomerge.optim.scalarize import Scalarizer

__all__ = [
    "ASYNC_TELL",
    "BASELINE",
    "BUDGET",
    "MULTIOBJECTIVE",
    "OPTIMIZERS",
    "PER_EXAMPLE",
    "SEGMENTS",
    "BaseOptimizer",
    "Observation",
    "Optimizer",
    "OptimizerOptions",
    "Problem",
    "Scalarizer",
    "SegmentStructure",
    "Told",
]

OPTIMIZERS.register_lazy("cma_es", "evomerge.optim.cma_es:CmaEsOptimizer", capabilities=())
OPTIMIZERS.register_lazy(
    "nevergrad",
    "evomerge.optim.nevergrad:NevergradOptimizer",
    capabilities=(ASYNC_TELL, MULTIOBJECTIVE, BUDGET),
)
OPTIMIZERS.register_lazy(
    "m2n2", "evomerge.optim.m2n2:M2N2Optimizer", capabilities=(ASYNC_TELL, PER_EXAMPLE, SEGMENTS)
)
OPTIMIZERS.register_lazy(
    "optuna", "evomerge.optim.optuna:OptunaOptimizer", capabilities=(ASYNC_TELL, MULTIOBJECTIVE)
)
OPTIMIZERS.register_lazy(
    "random", "evomerge.optim.random:RandomOptimizer", capabilities=(ASYNC_TELL, BASELINE)
)
OPTIMIZERS.register_lazy(
    "bo", "evomerge.optim.bo:BoOptimizer", capabilities=(ASYNC_TELL, MULTIOBJECTIVE)
)
