"""Each optimizer's options, typed: the ``optimizer:`` block of a run config is one of these, chosen by ``name``.

The union is part of the run config's schema (``evomerge config schema`` lists every optimizer's options
with their defaults and bounds), and a bad option is refused while the config loads, with the YAML path
(``optimizer.options.sigma0: Input should be greater than 0``). The optimizers (:mod:`evomerge.optim`)
validate the same models when built directly.

Options an optimizer can take from the run itself (the number of parallel evaluations, the evaluation
budget) default to ``None``, meaning "the run's": :meth:`OptimizerOptions.for_run` fills them from
``resources.workers`` and ``budget.evaluations``, so a run folder's resolved config says what was asked,
not what the run then chose.

Adding an optimizer: subclass :class:`OptimizerOptions`, add a ``*Config`` model below and list it in
:data:`OptimizerConfig`, then register the optimizer in :mod:`evomerge.optim`
(``tests/test_optim_contract.py`` checks that the two lists agree).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, JsonValue, field_validator, model_validator

__all__ = [
    "CmaEsOptions",
    "M2N2Options",
    "NevergradOptions",
    "OPTIMIZER_CONFIGS",
    "OptimizerConfig",
    "BoConfig",
    "BoOptions",
    "OptimizerOptions",
    "OptunaOptions",
    "OPTUNA_SAMPLERS",
    "RandomOptions",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class OptimizerOptions(BaseModel):
    """Options every optimizer accepts; subclasses add their own fields."""

    model_config = _FROZEN

    scalarize: str | dict[str, float] = Field(
        "mean", description="how per-task scores become one number (single-objective search and the recommended "
                            "candidate): mean, worst (the lowest task score), or a weight per task")

    def for_run(self, *, workers: int, evaluations: int | None) -> Self:
        """These options with the ones left to the run filled in (none here)."""
        return self


class CmaEsOptions(OptimizerOptions):
    sigma0: float = Field(0.2, gt=0, description="initial step size, in genome units (the box is [0, 1]^d)")
    popsize: int | None = Field(None, ge=2, description="generation size; unset: cma's 4 + floor(3 ln d)")
    x0_first: bool = Field(
        False, description="make the space's start point the first member of the first generation, so a search "
                           "warm-started from a tuned hand-set merge evaluates that merge and never reports worse")


class NevergradOptions(OptimizerOptions):
    optimizer: str = Field("TwoPointsDE", description="a name in nevergrad.optimizers.registry")
    budget: int | None = Field(
        None, ge=1, description="planned number of evaluations (NGOpt and its relatives pick an algorithm from it); "
                                "unset: the run's budget.evaluations")
    num_workers: int | None = Field(
        None, ge=1, description="evaluations run in parallel (NGOpt's choice depends on it); unset: the run's "
                                "resources.workers, 1 outside a run")
    multiobjective: bool = Field(False, description="tell nevergrad the vector of task losses instead of the "
                                                    "scalarized score")

    def for_run(self, *, workers: int, evaluations: int | None) -> Self:
        update: dict[str, int] = {}
        if self.num_workers is None:
            update["num_workers"] = workers
        if self.budget is None and evaluations:
            update["budget"] = evaluations
        return self.model_copy(update=update) if update else self


class M2N2Options(OptimizerOptions):
    archive_size: int = Field(20, ge=2, description="slots of the archive of members")
    alpha: float = Field(1.0, ge=0, description="fitness-sharing exponent (0: a plain GA)")
    use_crossover: bool = Field(True, description="children are the SLERP of two parents (otherwise: the first "
                                                  "parent, mutated)")
    use_splitpoint: bool = Field(True, description="crossover draws a split point (otherwise one t everywhere)")
    use_matchmaker: bool = Field(True, description="draw the second parent by attraction (otherwise by fitness)")
    mutation: float = Field(0.0, ge=0, description="standard deviation of Gaussian noise added to each child")
    init_random: int | None = Field(
        None, ge=0, description="random initial members; unset: archive_size - 1 without segments, 0 with them")
    include_x0: bool = Field(False, description="with segments, also start from the space's start point (it is "
                                                "always the first member without segments)")
    init_children: int | None = Field(
        None, ge=0, description="with segments, initial task-arithmetic children of the seeds; unset: enough to "
                                "fill the archive")
    child_weights: tuple[float, float] = Field(
        (0.0, 1.0), description="range of the task-vector weights drawn for each initial task-arithmetic child")

    @field_validator("child_weights")
    @classmethod
    def _weight_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not (math.isfinite(v[0]) and math.isfinite(v[1]) and v[0] <= v[1]):
            raise ValueError(f"needs finite low <= high, got [{v[0]}, {v[1]}]")
        return v


class RandomOptions(OptimizerOptions):
    x0_first: bool = Field(True, description="hand out the space's start point (the hand-set merge) first")


#: The Optuna samplers whose state round trips exactly (evomerge.optim.optuna checks each one's internals).
OPTUNA_SAMPLERS = (
    "TPESampler", "GPSampler", "CmaEsSampler", "NSGAIISampler", "NSGAIIISampler", "QMCSampler", "RandomSampler",
)


class OptunaOptions(OptimizerOptions):
    sampler: str = Field("TPESampler", description="an Optuna sampler: " + ", ".join(OPTUNA_SAMPLERS))
    sampler_options: dict[str, JsonValue] = Field(
        default_factory=dict, description="keyword arguments of the sampler (e.g. {n_startup_trials: 10}); the "
                                          "seed comes from the run's seed")
    multiobjective: bool = Field(False, description="tell Optuna the vector of task scores instead of the "
                                                    "scalarized score (NSGAIISampler, TPESampler, GPSampler, … then "
                                                    "search the Pareto front)")
    x0_first: bool = Field(True, description="make the space's start point (the hand-set merge) the first trial")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        if v not in OPTUNA_SAMPLERS:
            raise ValueError(f"unknown or unsupported Optuna sampler {v!r}; supported: {', '.join(OPTUNA_SAMPLERS)}")
        return v

    @field_validator("sampler_options")
    @classmethod
    def _no_seed(cls, v: dict[str, JsonValue]) -> dict[str, JsonValue]:
        if "seed" in v:
            raise ValueError("'seed' is not a sampler option here: samplers are seeded from the run's seed")
        return v


class CmaEsConfig(BaseModel):
    """CMA-ES (the ``cma`` package): a full generation per update; single objective."""

    model_config = _FROZEN
    name: Literal["cma_es"] = "cma_es"
    options: CmaEsOptions = CmaEsOptions()


class NevergradConfig(BaseModel):
    """Any optimizer of nevergrad's registry; asynchronous; multi-objective on request."""

    model_config = _FROZEN
    name: Literal["nevergrad"]
    options: NevergradOptions = NevergradOptions()


class M2N2Config(BaseModel):
    """Natural niches: competition over per-example scores, attraction, SLERP crossover."""

    model_config = _FROZEN
    name: Literal["m2n2"]
    options: M2N2Options = M2N2Options()


class OptunaConfig(BaseModel):
    """Any of several Optuna samplers (TPE, GP, CMA-ES, NSGA-II/III, QMC) by ask/tell; async; multi-objective on
    request."""

    model_config = _FROZEN
    name: Literal["optuna"]
    options: OptunaOptions = OptunaOptions()


class RandomConfig(BaseModel):
    """Uniform sampling in the bounds (the baseline every optimizer must beat)."""

    model_config = _FROZEN
    name: Literal["random"]
    options: RandomOptions = RandomOptions()


class BoOptions(OptimizerOptions):
    n_init: int | None = Field(
        None, ge=1, description="initial design: the space's start point, then scrambled Sobol points, this many in "
                                "all before the GP proposes; unset: max(4, min(10, dim + 1))")
    multiobjective: bool = Field(False, description="one GP per task and expected hypervolume improvement instead of "
                                                    "one GP on the scalarized score (needs two or more tasks)")
    model: Literal["gp", "saas"] = Field(
        "gp", description="gp: SingleTaskGP with BoTorch's dimension-scaled lengthscale prior; saas: "
                          "SaasFullyBayesianSingleTaskGP fitted by NUTS (for many genes; needs numpyro, slower)")
    raw_samples: int = Field(256, ge=1, description="Sobol points the acquisition is evaluated at to pick restarts")
    num_restarts: int = Field(8, ge=1, description="L-BFGS restarts of the acquisition optimization")
    acqf_maxiter: int = Field(200, ge=1, description="L-BFGS iterations per restart of the acquisition optimization")
    mc_samples: int = Field(128, ge=1, description="quasi-Monte-Carlo samples of the acquisition function")
    sequential: bool = Field(False, description="ask(n): pick the n candidates one after the other, each with the "
                                                "earlier ones pending (otherwise jointly, q = n)")
    refit_every: int = Field(1, ge=1, description="gp: refit the hyperparameters once this many new successes "
                                                  "arrived (in between the GP keeps the last ones)")
    trust_region: bool = Field(
        False, description="TuRBO-style local search: the initial design and every acquisition lie in a box around "
                           "the best candidate so far (at first the space's start point), its sides scaled by the "
                           "GP's lengthscales; it doubles after tr_successes improvements in a row and halves after "
                           "tr_failures non-improvements in a row")
    tr_length: float = Field(0.4, gt=0, le=1, description="trust_region: initial side length of the box, as a "
                                                          "fraction of each gene's range")
    tr_length_min: float = Field(0.0125, gt=0, le=1, description="trust_region: below this side length the box "
                                                                 "restarts at tr_length around the best candidate")
    tr_length_max: float = Field(1.0, gt=0, le=2, description="trust_region: the box never grows past this")
    tr_successes: int = Field(3, ge=1, description="trust_region: improvements in a row that double the box")
    tr_failures: int | None = Field(
        None, ge=1, description="trust_region: non-improvements in a row that halve the box; unset: "
                                "min(max(4, dim // 4), 10)")
    nuts_warmup: int = Field(128, ge=1, description="saas: NUTS warm-up steps")
    nuts_samples: int = Field(64, ge=1, description="saas: NUTS samples drawn after warm-up")
    nuts_thinning: int = Field(16, ge=1, description="saas: keep every this-many-th NUTS sample")

    @model_validator(mode="after")
    def _modes(self) -> Self:
        # an option of a mode the run does not use would be parsed and ignored: refuse it (by value, not by
        # presence, so that a dump of every option parses again)
        inactive = {
            "model: saas": ("nuts_warmup", "nuts_samples", "nuts_thinning") if self.model != "saas" else (),
            "model: gp": ("refit_every",) if self.model != "gp" else (),
            "trust_region: true": () if self.trust_region else (
                "tr_length", "tr_length_min", "tr_length_max", "tr_successes", "tr_failures"),
        }
        for need, names in inactive.items():
            for name in names:
                if getattr(self, name) != type(self).model_fields[name].default:
                    raise ValueError(f"{name} applies only with {need}")
        if self.trust_region and not self.tr_length_min <= self.tr_length <= self.tr_length_max:
            raise ValueError(f"tr_length {self.tr_length} must lie in [tr_length_min, tr_length_max] = "
                             f"[{self.tr_length_min}, {self.tr_length_max}]")
        return self


class BoConfig(BaseModel):
    """Bayesian optimization (BoTorch): GP and noisy expected (hypervolume) improvement; asynchronous."""

    model_config = _FROZEN
    name: Literal["bo"]
    options: BoOptions = BoOptions()


#: The ``optimizer:`` block: one optimizer's name and its typed options.
OptimizerConfig = Annotated[
    CmaEsConfig | NevergradConfig | M2N2Config | OptunaConfig | BoConfig | RandomConfig, Field(discriminator="name")
]

#: Optimizer name -> its options model.
OPTIMIZER_CONFIGS: dict[str, type[OptimizerOptions]] = {
    "cma_es": CmaEsOptions, "nevergrad": NevergradOptions, "m2n2": M2N2Options, "optuna": OptunaOptions,
    "bo": BoOptions, "random": RandomOptions,
}
