"""Optuna samplers (``TPESampler``, ``GPSampler``, ``CmaEsSampler``, ``NSGAIISampler``, …) through Optuna's ask/tell.

Imported lazily by the registry (``OPTIMIZERS.get("optuna")``); Optuna is the ``optuna`` extra.
"""

from __future__ import annotations

import difflib
import logging
import warnings
from typing import Any

import moocore
import numpy as np
import numpy.typing as npt
import optuna
from optuna.distributions import FloatDistribution
from optuna.exceptions import ExperimentalWarning
from optuna.samplers._lazy_random_state import LazyRandomState
from optuna.storages import InMemoryStorage
from optuna.trial import TrialState, create_trial

from evomerge.config.optimizers import OPTUNA_SAMPLERS, OptunaOptions
from evomerge.errors import ConfigError, OptimizerError
from evomerge.evaluation import Candidate
from evomerge.optim.base import BaseOptimizer, Told
from evomerge.optim.state import frozen_array
from evomerge.rng import rng_from_json, rng_to_json

logger = logging.getLogger(__name__)

#: Samplers that search one objective only.
SINGLE_OBJECTIVE = frozenset({"CmaEsSampler"})
#: GPSampler keeps the last fitted kernel parameters as the starting point of the next fit.
_GP_CACHES = ("_gprs_cache_list", "_constraints_gprs_cache_list")


class _KernelParams:
    """What GPSampler reads from its cached regressors: the fitted kernel parameters (restored from JSON)."""

    def __init__(self, inverse_squared_lengthscales: list[float], kernel_scale: float, noise_var: float) -> None:
        import torch

        self.inverse_squared_lengthscales = torch.tensor(inverse_squared_lengthscales, dtype=torch.float64)
        self.kernel_scale = torch.tensor(kernel_scale, dtype=torch.float64)
        self.noise_var = torch.tensor(noise_var, dtype=torch.float64)


def _random_states(sampler: Any) -> dict[str, Any]:
    """Every random generator reachable from ``sampler`` (nested samplers and strategies), by attribute path.

    Shared generators (NSGA-II's strategies draw from the sampler's own) are listed once, at their first path.
    """
    out: dict[str, Any] = {}
    seen: set[int] = set()

    def walk(obj: Any, path: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, (LazyRandomState, np.random.RandomState, np.random.Generator)):
            out[path] = obj
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{path}[{i}]")
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{path}[{k!r}]")
        elif type(obj).__module__.startswith("optuna") and hasattr(obj, "__dict__"):
            for k, v in vars(obj).items():
                walk(v, f"{path}.{k}")

    walk(sampler, "sampler")
    return out


def _rng_to_json(obj: Any) -> Any:
    if isinstance(obj, LazyRandomState):
        if obj._rng is None:
            return {"lazy": None}
        return {"lazy": _rng_to_json(obj._rng)}
    if isinstance(obj, np.random.RandomState):
        name, keys, pos, has_gauss, cached = obj.get_state(legacy=True)
        return {"random_state": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
    return {"generator": rng_to_json(obj)}


def _rng_from_json(obj: Any, data: dict[str, Any]) -> None:
    if isinstance(obj, LazyRandomState):
        if "lazy" not in data:
            raise OptimizerError("optuna: state holds a generator where the sampler has a LazyRandomState")
        if data["lazy"] is None:
            obj._rng = None
        else:
            _rng_from_json(obj.rng, data["lazy"])
    elif isinstance(obj, np.random.RandomState):
        name, keys, pos, has_gauss, cached = data["random_state"]
        obj.set_state((name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    else:
        obj.bit_generator.state = rng_from_json(data["generator"]).bit_generator.state


class OptunaOptimizer(BaseOptimizer):
    """An Optuna sampler over one ``FloatDistribution(lower, upper)`` per gene (``g0`` … ``g{d-1}``), asynchronous.

    Each ``ask`` is one ``study.ask`` on an in-memory study (evomerge's archive is the storage); ``tell`` passes
    back ``scalarize(objectives)`` to a maximizing study, or the vector of task scores to a study with one
    maximized direction per task when ``multiobjective`` (multi-objective samplers such as ``NSGAIISampler``
    then search the Pareto front; ``recommend`` is the member of the front of told candidates that is best
    under ``scalarize``). A failure is told as ``TrialState.FAIL``: Optuna's samplers leave failed trials out
    of their models, so no penalty is needed. With ``x0_first`` the space's start point is enqueued as the
    first trial. The sampler is seeded from the optimizer's generator; the global numpy and torch generators
    are not used.

    Supported samplers are those whose whole state is known to be the study's trials (params, values, system
    attributes), the study's system attributes, the sampler's random generators and, for ``GPSampler``, its
    cached kernel parameters: ``TPESampler`` (default), ``GPSampler``, ``CmaEsSampler`` (single objective),
    ``NSGAIISampler``, ``NSGAIIISampler``, ``QMCSampler`` and ``RandomSampler``. Others (``GridSampler``,
    ``BruteForceSampler``, ``PartialFixedSampler``, …) are refused with a :class:`~evomerge.errors.ConfigError`.

    State: JSON only. The trials in order (state, params, values, system attributes), the study's system
    attributes, the sampler's seed and the states of its generators; loading rebuilds the study by
    ``add_trial`` (pending trials as ``RUNNING``), so the next asks are exactly those of the saved optimizer.
    """

    name = "optuna"
    Options = OptunaOptions
    options: OptunaOptions

    def _setup(self) -> None:
        o, p = self.options, self.problem
        if o.sampler not in OPTUNA_SAMPLERS:  # the options model refuses these; kept for direct construction
            close = difflib.get_close_matches(o.sampler, OPTUNA_SAMPLERS, n=3)
            raise ConfigError(f"optimizer 'optuna': option sampler: unsupported sampler {o.sampler!r}"
                              + (f"; close matches: {', '.join(close)}" if close else ""))
        if o.multiobjective and o.sampler in SINGLE_OBJECTIVE and len(p.task_names) > 1:
            raise ConfigError(
                f"optimizer 'optuna': option sampler: {o.sampler} searches one objective; use multiobjective: false "
                "or a multi-objective sampler (NSGAIISampler, NSGAIIISampler, TPESampler, GPSampler)"
            )
        self._names = [f"g{i}" for i in range(p.dim)]
        self._dists = {
            n: FloatDistribution(float(lo), float(hi)) for n, lo, hi in zip(self._names, p.lower, p.upper, strict=True)
        }
        self._sampler_seed = int(self._rng.integers(2**31 - 1))
        self._study = self._new_study(self._sampler_seed)
        self._trial_of: dict[int, int] = {}  # pending candidate id -> trial number
        self._x0_given = not o.x0_first
        self._front: list[Candidate] = []

    @property
    def study(self) -> optuna.Study:
        """The in-memory study (read it; asking or telling on it directly desynchronizes the optimizer)."""
        return self._study

    def _new_study(self, seed: int) -> optuna.Study:
        o = self.options
        cls = getattr(optuna.samplers, o.sampler)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                sampler = cls(seed=seed, **o.sampler_options)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"optimizer 'optuna': option sampler_options: {o.sampler}: {exc}") from exc
        k = len(self.problem.task_names) if o.multiobjective else 1
        storage = InMemoryStorage()
        quiet = logging.getLogger(type(storage).__module__)  # says "A new study created in memory" at INFO
        level = quiet.level
        quiet.setLevel(max(level, logging.WARNING))
        try:
            return optuna.create_study(storage=storage, sampler=sampler, directions=["maximize"] * k)
        finally:
            quiet.setLevel(level)

    def _propose(self, n: int) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
        out: list[tuple[npt.NDArray[np.float64], dict[str, Any]]] = []
        for _ in range(n):
            meta: dict[str, Any] = {}
            try:
                if not self._x0_given:
                    self._study.enqueue_trial(dict(zip(self._names, self.problem.x0.tolist(), strict=True)))
                    meta["origin"] = "x0"
                trial = self._study.ask(self._dists)
            except Exception as exc:
                raise self._library_error("ask", exc) from exc
            self._x0_given = True
            self._trial_of[self._next_id + len(out)] = trial.number
            genome = np.clip(
                np.array([trial.params[n] for n in self._names], dtype=np.float64),
                self.problem.lower, self.problem.upper,
            )
            out.append((genome, {"trial": trial.number, **meta}))
        return out

    def _observe(self, told: list[Told]) -> None:
        for t in told:
            number = self._trial_of.pop(t.candidate.id)
            try:
                if not t.ok:
                    self._study.tell(number, state=TrialState.FAIL)
                elif self.options.multiobjective:
                    self._study.tell(number, t.objectives.tolist())  # type: ignore[union-attr]
                else:
                    self._study.tell(number, self.scalarizer(t.objectives))
            except Exception as exc:
                raise self._library_error("tell", exc) from exc
            if self.options.multiobjective and t.ok:
                self._update_front(t)

    def _library_error(self, step: str, exc: Exception) -> OptimizerError:
        return OptimizerError(f"optuna {self.options.sampler} failed in {step}: {exc!r}")

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

    # ------------------------------------------------------------------ state
    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        trials = []
        for t in self._study.get_trials(deepcopy=False):
            if t.state not in (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING):
                raise OptimizerError(f"optuna: trial {t.number} is {t.state.name}, which the state cannot hold")
            trials.append({
                "state": t.state.name,
                "params": dict(t.params),
                "values": None if t.values is None else [float(v) for v in t.values],
                "system_attrs": dict(t.system_attrs),
                "user_attrs": dict(t.user_attrs),
            })
        sampler = self._study.sampler
        impl: dict[str, Any] = {
            "sampler_seed": self._sampler_seed,
            "trials": trials,
            "study_system_attrs": dict(self._study._storage.get_study_system_attrs(self._study._study_id)),
            "trial_of": {str(c): n for c, n in sorted(self._trial_of.items())},
            "x0_given": self._x0_given,
            "random_states": {path: _rng_to_json(r) for path, r in _random_states(sampler).items()},
            "gp_caches": {a: self._dump_gp_cache(getattr(sampler, a)) for a in _GP_CACHES if hasattr(sampler, a)},
            "front": [
                {"id": c.id, "genome": c.genome.tolist(), "objectives": c.meta["objectives"]} for c in self._front
            ],
        }
        return impl, None

    @staticmethod
    def _dump_gp_cache(cache: list[Any] | None) -> list[dict[str, Any]] | None:
        if cache is None:
            return None
        return [
            {
                "inverse_squared_lengthscales": g.inverse_squared_lengthscales.detach().cpu().double().tolist(),
                "kernel_scale": float(g.kernel_scale.detach().cpu().double()),
                "noise_var": float(g.noise_var.detach().cpu().double()),
            }
            for g in cache
        ]

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        seed = int(impl["sampler_seed"])
        study = self._new_study(seed)
        storage, sid = study._storage, study._study_id
        for i, rec in enumerate(impl["trials"]):
            state = TrialState[rec["state"]]
            params = {k: float(v) for k, v in rec["params"].items()}
            unknown = sorted(set(params) - set(self._dists))
            if unknown:
                raise OptimizerError(f"optuna: trial {i} of the state has unknown params {unknown}")
            study.add_trial(create_trial(
                state=state,
                params=params,
                distributions={k: self._dists[k] for k in params},
                values=rec["values"] if state == TrialState.COMPLETE else None,
                system_attrs=dict(rec["system_attrs"]),
                user_attrs=dict(rec["user_attrs"]),
            ))
        for key, value in impl["study_system_attrs"].items():
            storage.set_study_system_attr(sid, key, value)
        sampler = study.sampler
        mine = _random_states(sampler)
        saved = impl["random_states"]
        if sorted(mine) != sorted(saved):
            raise OptimizerError(
                f"optuna: the state's sampler generators {sorted(saved)} are not this {self.options.sampler}'s "
                f"{sorted(mine)} (another Optuna version?)"
            )
        for path, r in mine.items():
            _rng_from_json(r, saved[path])
        for attr, cache in impl["gp_caches"].items():
            if not hasattr(sampler, attr):
                raise OptimizerError(f"optuna: the state has {attr}, which {self.options.sampler} has not")
            setattr(sampler, attr, None if cache is None else [_KernelParams(**c) for c in cache])
        trial_of = {int(c): int(n) for c, n in impl["trial_of"].items()}
        running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        if set(trial_of.values()) != running:
            raise OptimizerError("optuna: the state's pending candidates and its running trials disagree")
        front = [
            Candidate(id=int(f["id"]), genome=frozen_array(f["genome"]), meta={"objectives": list(f["objectives"])})
            for f in impl["front"]
        ]
        self._study, self._sampler_seed, self._trial_of = study, seed, trial_of
        self._x0_given, self._front = bool(impl["x0_given"]), front
