"""Bayesian optimization on BoTorch: a GP surrogate and a noisy expected-improvement acquisition, for budgets of
tens of evaluations (each one minutes of GPU time)."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import moocore
import numpy as np
import numpy.typing as npt
import torch
from botorch.acquisition.logei import qLogNoisyExpectedImprovement
from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
from botorch.exceptions.errors import BotorchError, ModelFittingError
from botorch.fit import fit_gpytorch_mll
from botorch.models import ModelListGP, SingleTaskGP
from botorch.models.fully_bayesian import SaasFullyBayesianSingleTaskGP
from botorch.models.transforms import Normalize, Standardize
from botorch.optim import optimize_acqf
from botorch.sampling import SobolQMCNormalSampler
from botorch.utils.multi_objective.hypervolume import infer_reference_point
from botorch.utils.multi_objective.pareto import is_non_dominated
from gpytorch.mlls import ExactMarginalLogLikelihood, SumMarginalLogLikelihood
from linear_operator.utils.errors import NanError, NotPSDError

from evomerge.config.optimizers import BoOptions
from evomerge.errors import ConfigError, OptimizerError
from evomerge.evaluation import Candidate
from evomerge.optim import trust_region
from evomerge.optim.base import BaseOptimizer, Told
from evomerge.optim.state import frozen_array

logger = logging.getLogger(__name__)

DTYPE = torch.float64
_SEED_MAX = 2**31 - 1
#: What a failed model step raises; the ask then falls back to the next Sobol point (logged).
_MODEL_ERRORS = (BotorchError, ModelFittingError, NotPSDError, NanError)


def _derive(*words: int) -> int:
    """A seed for torch / JAX from integers drawn from the optimizer's generator (and counters)."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1)[0]) & _SEED_MAX


@contextlib.contextmanager
def _isolated(seed: int) -> Iterator[None]:
    """Torch's global CPU RNG seeded with ``seed`` inside, restored after; BoTorch's warnings logged, not raised."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(seed)
        yield
    for w in caught:
        logger.debug("bo: %s: %s", w.category.__name__, w.message)


class BoOptimizer(BaseOptimizer):
    """Bayesian optimization (BoTorch), asynchronous by candidate.

    **Design.** The first ``n_init`` candidates (default ``max(4, min(10, d + 1))``) are ``problem.x0`` (the
    hand-set merge the space starts at) and then the points of a scrambled Sobol sequence over the bounds,
    scrambled with a seed drawn from the optimizer's generator. After that every ask is model-based once two
    candidates have succeeded (until then it hands out further Sobol points, so workers never wait).

    **Model.** Scalar mode: one ``SingleTaskGP`` on the scalarized score (``self.scalarizer``), inputs mapped to
    the unit cube from the problem's bounds (``Normalize``), outcomes standardized; acquisition
    ``qLogNoisyExpectedImprovement``. ``multiobjective: true`` (with two or more tasks; one task falls back to
    scalar mode): a ``ModelListGP`` with one such GP per task and ``qLogNoisyExpectedHypervolumeImprovement``
    with the reference point from BoTorch's ``infer_reference_point`` on the Pareto front of the successful
    results: the front's nadir minus 10 % of its range per task. It moves with the data, so it always lies
    below every front member and never needs a scale the user cannot know in advance (task scores are
    normalized by the run's references, but a merge may fall below the base). ``recommend`` is the front's
    member that is best under ``scalarize``.

    The GP is BoTorch's default: RBF kernel with the dimension-scaled log-normal lengthscale prior of Hvarfner
    et al. (2024) (``get_covar_module_with_dim_scaled_prior``, BoTorch >= 0.12), which keeps vanilla BO usable
    at 24-80 genes. ``model: saas`` uses ``SaasFullyBayesianSingleTaskGP`` (sparse axis-aligned lengthscales)
    fitted by NUTS (``nuts_warmup``, ``nuts_samples``, ``nuts_thinning``; BoTorch 0.18 runs NUTS in NumPyro, so
    ``numpyro`` must be installed; older BoTorch used Pyro). The GP's hyperparameters are fitted by L-BFGS
    (``fit_gpytorch_mll``) starting from the previous fit's values; ``refit_every`` > 1 refits them only when
    that many new successes arrived and conditions on the new data with the last values in between.

    **Trust region** (``trust_region: true``, TuRBO-1 of Eriksson et al. 2019, for small budgets in many genes
    with a good start point): the initial design's Sobol points lie in a box of side ``tr_length`` around
    ``problem.x0`` instead of the whole space, and the acquisition is optimized in a box around the best
    candidate so far, its sides weighted by the GP's lengthscales; the box grows on improvements and shrinks on
    their absence (``region()``). A global GP over 24-80 genes spends tens of evaluations learning where the
    warm start already points; the region keeps those evaluations near it.

    **Asynchronous asks.** ``ask(n)`` optimizes ``q = n`` candidates jointly (``sequential: true``: greedily,
    each with the earlier ones pending); candidates still pending are ``X_pending`` and the acquisition
    integrates over their unknown results (the Monte-Carlo fantasies), so two asks without a tell in between
    give distinct candidates.

    **Failures** (and non-finite scores) never reach the GP as numbers: a penalty would be an outlier that
    distorts the standardization and the lengthscales. Their genomes stay in ``X_pending`` for good, so the
    acquisition counts them as taken and does not propose the same merge again.

    **Randomness and exact resume.** Every random draw is seeded from the optimizer's generator: the Sobol
    scrambling and the fitting seeds (drawn once at setup), the Monte-Carlo base samples
    (``SobolQMCNormalSampler(seed=)``), ``optimize_acqf``'s raw samples and restarts and NUMPyro's NUTS
    (seeds drawn per ask or derived from the number of successes). Torch's global RNG is forked around every
    model step and restored, and JAX's is explicit. State (JSON, no blob): the told data in told order, the
    fitted hyperparameters as exact floats and the seeds; the model is rebuilt (the SAAS model refitted with
    the same seed) on restore, so a restored optimizer proposes bit for bit what the original would.

    **Cost per ask** with the default options at 30 told points, on 2 shared CPU cores (load ~4, one torch
    thread; an idle core is ~3-5x faster): ``gp`` 3-5 s at d = 8 and 6-9 s at d = 48 (the first fit from the
    default start costs the most); ``saas`` 47-86 s at d = 8 and 29-60 s at d = 48 (NUTS and JAX's compilation dominate). Next to minutes of
    GPU per evaluation both are small; ``refit_every``, ``raw_samples``, ``num_restarts``, ``acqf_maxiter`` and
    ``mc_samples`` buy speed where asks must be cheap.

    **Warm start.** The driver tells an optimizer nothing about the baselines it scored (they are recipes, not
    genomes of the space); ``space.warm_start`` moves ``problem.x0``, which this optimizer evaluates first.
    """

    name = "bo"
    Options = BoOptions
    options: BoOptions

    def _setup(self) -> None:
        o, p = self.options, self.problem
        if o.model == "saas":
            try:
                import numpyro  # noqa: F401  # BoTorch's NUTS backend
            except ImportError as exc:
                raise ConfigError(
                    "optimizer 'bo': model 'saas' fits with NUTS, which BoTorch runs in numpyro: pip install numpyro"
                ) from exc
        self.n_init = o.n_init if o.n_init is not None else max(4, min(10, p.dim + 1))
        self.multiobjective = bool(o.multiobjective) and len(p.task_names) > 1
        self._sobol_seed = int(self._rng.integers(_SEED_MAX))
        self._fit_seed = int(self._rng.integers(_SEED_MAX))
        self._n_sobol = 0  # Sobol points handed out
        self._n_design = 0  # points of the initial design handed out (x0 first)
        # told data in told order: (id, genome, objectives or None for a failure)
        self._data: list[tuple[int, npt.NDArray[np.float64], npt.NDArray[np.float64] | None]] = []
        self._hyper: dict[str, list[Any]] | None = None  # last fitted GP hyperparameters
        self._fitted_on = 0  # number of successes they were fitted on
        self._saas_cache: tuple[int, Any] | None = None
        self._bounds = torch.tensor(np.stack([p.lower, p.upper]), dtype=DTYPE)

    # ------------------------------------------------------------------ proposals
    def _propose(self, n: int) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
        out: list[tuple[npt.NDArray[np.float64], dict[str, Any]]] = []
        while len(out) < n and self._n_design < self.n_init:
            if self._n_design == 0:
                out.append((self.problem.x0.copy(), {"phase": "init", "design": "x0"}))
            elif self.options.trust_region:  # around the start point: the warm start is the point of a region
                lo, hi = self._box(self.problem.x0, self.options.tr_length, None)
                out.append((self._sobol(1, lo, hi)[0], {"phase": "init", "design": "sobol-region"}))
            else:
                out.append((self._sobol(1)[0], {"phase": "init", "design": "sobol"}))
            self._n_design += 1
        q = n - len(out)
        if q == 0:
            return out
        if self._n_ok() < 2:
            return out + [(x, {"phase": "sobol"}) for x in self._sobol(q)]
        seed = int(self._rng.integers(_SEED_MAX))
        pending = [c.genome for c in self._pending.values()] + [g for g, _ in out]
        try:
            xs = self._model_step(q, seed, pending)
        except _MODEL_ERRORS as exc:
            logger.warning("bo: model step failed (%r); handing out Sobol points instead", exc)
            return out + [(x, {"phase": "sobol", "fallback": type(exc).__name__}) for x in self._sobol(q)]
        return out + [(x, {"phase": "model"}) for x in xs]

    def _sobol(self, k: int, lo: npt.NDArray[np.float64] | None = None,
               hi: npt.NDArray[np.float64] | None = None) -> list[npt.NDArray[np.float64]]:
        """The next ``k`` points of the run's scrambled Sobol sequence, over the bounds or the box [lo, hi]."""
        p = self.problem
        lo = p.lower if lo is None else lo
        hi = p.upper if hi is None else hi
        with _isolated(self._sobol_seed):
            engine = torch.quasirandom.SobolEngine(p.dim, scramble=True, seed=self._sobol_seed)
            if self._n_sobol:
                engine.fast_forward(self._n_sobol)
            u = engine.draw(k, dtype=DTYPE).numpy()
        self._n_sobol += k
        return [np.clip(lo + row * (hi - lo), p.lower, p.upper) for row in u]

    # ------------------------------------------------------------------ trust region
    def region(self) -> trust_region.Region:
        """The trust region after the told data (:func:`evomerge.optim.trust_region.replay`)."""
        return trust_region.replay(((g, y) for _, g, y in self._data), self.scalarizer, self.problem.x0,
                                   self.options, self.problem.dim)

    def _box(self, center: npt.NDArray[np.float64], length: float,
             lengthscale: npt.NDArray[np.float64] | None) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        return trust_region.box(center, length, lengthscale, self.problem.lower, self.problem.upper)

    def _lengthscales(self, model: Any) -> npt.NDArray[np.float64] | None:
        return trust_region.ard_lengthscales(model, self.problem.dim)

    def _n_ok(self) -> int:
        return sum(y is not None for _, _, y in self._data)

    def _training_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        ok = [(g, y) for _, g, y in self._data if y is not None]
        X = torch.tensor(np.stack([g for g, _ in ok]), dtype=DTYPE)
        if self.multiobjective:
            Y = torch.tensor(np.stack([y for _, y in ok]), dtype=DTYPE)
        else:
            Y = torch.tensor([[self.scalarizer(y)] for _, y in ok], dtype=DTYPE)
        return X, Y

    def _model_step(self, q: int, seed: int, pending: list[npt.NDArray[np.float64]]) -> list[npt.NDArray[np.float64]]:
        o, p = self.options, self.problem
        X, Y = self._training_data()
        failed = [g for _, g, y in self._data if y is None]
        X_pending = torch.tensor(np.stack(pending + failed), dtype=DTYPE) if pending or failed else None
        model = self._model(X, Y)
        with _isolated(_derive(seed, 1)):
            sampler = SobolQMCNormalSampler(torch.Size([o.mc_samples]), seed=_derive(seed, 2))
            if self.multiobjective:
                ref = infer_reference_point(Y[is_non_dominated(Y)])
                acqf: Any = qLogNoisyExpectedHypervolumeImprovement(
                    model, ref_point=ref.tolist(), X_baseline=X, sampler=sampler, prune_baseline=True,
                    X_pending=X_pending,
                )
            else:
                acqf = qLogNoisyExpectedImprovement(
                    model, X_baseline=X, sampler=sampler, prune_baseline=True, X_pending=X_pending,
                )
            bounds = self._bounds
            if o.trust_region:
                tr = self.region()
                lo, hi = self._box(tr.center, tr.length, self._lengthscales(model))
                bounds = torch.tensor(np.stack([lo, hi]), dtype=DTYPE)
            cand, _ = optimize_acqf(
                acqf, bounds=bounds, q=q, num_restarts=o.num_restarts, raw_samples=o.raw_samples,
                options={"seed": _derive(seed, 3), "maxiter": o.acqf_maxiter}, sequential=o.sequential,
            )
        xs = cand.detach().numpy().astype(np.float64)
        if not np.all(np.isfinite(xs)):
            raise BotorchError("the acquisition optimizer returned non-finite candidates")
        return [np.clip(x, p.lower, p.upper) for x in xs]

    # ------------------------------------------------------------------ models
    def _gp(self, X: torch.Tensor, Y: torch.Tensor) -> Any:
        d = self.problem.dim
        if self.options.model == "saas":
            return SaasFullyBayesianSingleTaskGP(
                X, Y, input_transform=Normalize(d, bounds=self._bounds), outcome_transform=Standardize(1)
            )
        return SingleTaskGP(X, Y, input_transform=Normalize(d, bounds=self._bounds), outcome_transform=Standardize(1))

    def _model(self, X: torch.Tensor, Y: torch.Tensor) -> Any:
        """The fitted surrogate for the current data: rebuilt for every ask (a pure function of the state)."""
        n_ok = X.shape[0]
        if self.options.model == "saas":
            if self._saas_cache is not None and self._saas_cache[0] == n_ok:
                return self._saas_cache[1]
            with _isolated(_derive(self._fit_seed, n_ok)):
                models = [self._gp(X, Y[:, i : i + 1]) for i in range(Y.shape[1])]
                for j, m in enumerate(models):
                    fit_fully_bayesian_model_nuts(
                        m, warmup_steps=self.options.nuts_warmup, num_samples=self.options.nuts_samples,
                        thinning=self.options.nuts_thinning, disable_progbar=True,
                        seed=_derive(self._fit_seed, n_ok, j),
                    )
            model = ModelListGP(*models) if self.multiobjective else models[0]
            self._saas_cache = (n_ok, model)
            return model
        with _isolated(_derive(self._fit_seed, n_ok)):
            models = [self._gp(X, Y[:, i : i + 1]) for i in range(Y.shape[1])]
            model = ModelListGP(*models) if self.multiobjective else models[0]
            if self._hyper is not None:
                self._load_hyper(model, self._hyper)
            refit = self._hyper is None or n_ok - self._fitted_on >= self.options.refit_every
            if refit:
                mll = (SumMarginalLogLikelihood(model.likelihood, model) if self.multiobjective
                       else ExactMarginalLogLikelihood(model.likelihood, model))
                try:
                    fit_gpytorch_mll(mll)
                except ModelFittingError as exc:
                    logger.warning("bo: GP fit failed (%r); keeping the previous hyperparameters", exc)
                    if self._hyper is None:
                        raise
                    self._load_hyper(model, self._hyper)
                else:
                    self._hyper = {k: v.detach().tolist() for k, v in model.named_parameters()}
                self._fitted_on = n_ok
            model.eval()
        return model

    @staticmethod
    def _load_hyper(model: Any, hyper: dict[str, list[Any]]) -> None:
        params = dict(model.named_parameters())
        if set(params) != set(hyper):
            raise OptimizerError(f"bo: stored hyperparameters {sorted(hyper)} do not fit the model {sorted(params)}")
        with torch.no_grad():
            for k, v in hyper.items():
                params[k].copy_(torch.tensor(v, dtype=DTYPE).reshape(params[k].shape))

    # ------------------------------------------------------------------ results
    def _observe(self, told: list[Told]) -> None:
        for t in told:
            y = t.objectives.copy() if t.ok and t.objectives is not None else None
            self._data.append((t.candidate.id, np.array(t.candidate.genome, dtype=np.float64), y))

    def pareto_front(self) -> list[Candidate]:
        """Successful told candidates that no other one dominates, in told order."""
        ok = [(i, g, y) for i, g, y in self._data if y is not None]
        if not ok:
            return []
        keep = moocore.is_nondominated(np.stack([y for _, _, y in ok]), maximise=True, keep_weakly=False)
        return [
            Candidate(id=i, genome=frozen_array(g), meta={"objectives": y.tolist()})
            for (i, g, y), k in zip(ok, keep, strict=True) if k
        ]

    def _recommend(self) -> Candidate | None:
        if not self.multiobjective:
            return self._best
        front = self.pareto_front()
        if not front:
            return None
        scores = [self.scalarizer(np.asarray(c.meta["objectives"])) for c in front]
        best = front[int(np.argmax(scores))]
        return Candidate(id=best.id, genome=best.genome, meta={**best.meta, "score": max(scores)})

    # ------------------------------------------------------------------ state
    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        impl = {
            "sobol_seed": self._sobol_seed,
            "fit_seed": self._fit_seed,
            "n_sobol": self._n_sobol,
            "n_design": self._n_design,
            "data": [
                {"id": i, "genome": g.tolist(), "objectives": None if y is None else y.tolist()}
                for i, g, y in self._data
            ],
            "hyper": self._hyper,
            "fitted_on": self._fitted_on,
        }
        return impl, None

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        data = [
            (int(r["id"]), np.asarray(r["genome"], dtype=np.float64),
             None if r["objectives"] is None else np.asarray(r["objectives"], dtype=np.float64))
            for r in impl["data"]
        ]
        k = len(self.problem.task_names)
        if any(g.shape != (self.problem.dim,) or (y is not None and y.shape != (k,)) for _, g, y in data):
            raise OptimizerError("bo: state holds told data of the wrong shape")
        hyper = impl["hyper"]
        self._sobol_seed, self._fit_seed = int(impl["sobol_seed"]), int(impl["fit_seed"])
        self._n_sobol, self._n_design = int(impl["n_sobol"]), int(impl["n_design"])
        self._data = data
        self._hyper = None if hyper is None else {str(n): v for n, v in hyper.items()}
        self._fitted_on = int(impl["fitted_on"])
        self._saas_cache = None


def fit_fully_bayesian_model_nuts(model: Any, **kwargs: Any) -> None:
    """BoTorch's NUTS fit (imported on first use: it pulls in JAX)."""
    from botorch.fit import fit_fully_bayesian_model_nuts as fit

    fit(model, **kwargs)
