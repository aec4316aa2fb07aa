"""The optimizer contract: the ask/tell protocol (:class:`Optimizer`), the registry, the options
model and the base class that does the bookkeeping. What is searched (:class:`Problem`) and what is
told (:class:`Observation`) live in :mod:`evomerge.optim.problem` and are re-exported here; the JSON
encodings of state live in :mod:`evomerge.optim.state`.

Conventions shared by every optimizer:

* Scores are **higher-is-better**, one per task (``Problem.task_names``). Whatever a library minimizes
  internally stays inside the subclass.
* ``ask(n)`` hands out candidates whose ``id`` comes from the optimizer's own counter (0, 1, 2, …);
  ``tell`` accepts their results in any order, in batches of any size, and refuses unknown ids and ids
  told twice (:class:`~evomerge.errors.OptimizerError`).
* A **failure** (``ok=False``, or an ``ok`` observation with a non-finite value) is never turned into
  NaN. Optimizers that need a number for it use :meth:`BaseOptimizer.penalty`: for each task,
  ``lo - max(1, hi - lo)`` where ``lo``/``hi`` are the lowest/highest finite scores of that task told so
  far (``lo = hi = 0`` before any), i.e. strictly below every score seen when the penalty is taken.
* Each optimizer owns a ``numpy.random.Generator`` seeded from ``seed``; global numpy/torch RNGs are
  neither read nor written.
* ``state_dict()`` is JSON-safe (``json.dumps`` works): counters, pending candidates, generator state and
  the subclass's own state, plus an optional base64 ``"blob"`` holding an opaque third-party pickle.
  Loading it into a fresh optimizer built with the same problem and options reproduces the next ``ask``
  exactly, including candidates still pending when the state was taken. Blobs are pickles: load only
  states you wrote yourself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from evomerge.config.optimizers import OptimizerOptions
from evomerge.errors import ConfigError, OptimizerError
from evomerge.evaluation import Candidate
from evomerge.optim.problem import Observation, Problem, SegmentStructure, Told
from evomerge.optim.scalarize import Scalarizer
from evomerge.optim.state import (
    candidate_from_json,
    candidate_to_json,
    decode_blob,
    encode_blob,
    frozen_array,
)
from evomerge.registry import Registry
from evomerge.rng import rng_from_json, rng_to_json

logger = logging.getLogger(__name__)

__all__ = [
    "BaseOptimizer",
    "Observation",
    "OPTIMIZERS",
    "Optimizer",
    "OptimizerOptions",
    "Problem",
    "SegmentStructure",
    "Told",
    "parse_options",
]

SCHEMA_VERSION = 1

#: Capability flags declared by registry entries (tests and callers select by these, never by name).
ASYNC_TELL = "async_tell"  # new candidates while others are pending: no generation barrier
MULTIOBJECTIVE = "multiobjective"  # accepts the option ``multiobjective=True``
PER_EXAMPLE = "per_example"  # uses Observation.per_example
SEGMENTS = "segments"  # uses Problem.segments when given
BUDGET = "budget"  # accepts the option ``budget`` (planned number of evaluations)
BASELINE = "baseline"  # a reference point, not expected to beat random search


@runtime_checkable
class Optimizer(Protocol):
    """The ask/tell protocol every registered optimizer implements."""

    problem: Problem

    def ask(self, n: int = 1) -> list[Candidate]: ...

    def tell(self, observations: Observation | Iterable[Observation]) -> None: ...

    def should_stop(self) -> bool: ...

    def recommend(self) -> Candidate | None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


OptimizerFactory = Callable[..., Optimizer]

#: ``OPTIMIZERS.get(name)(problem, seed=0, **options)``; entries are registered in ``evomerge.optim``.
OPTIMIZERS: Registry[OptimizerFactory] = Registry("optimizer")

OptionsT = TypeVar("OptionsT", bound=OptimizerOptions)


def parse_options(model: type[OptionsT], options: Mapping[str, Any], optimizer: str) -> OptionsT:
    """Validate ``options`` against ``model``; errors name the optimizer and the option."""
    valid = sorted(model.model_fields)
    for key in options:
        if key not in model.model_fields:
            raise ConfigError(
                f"optimizer {optimizer!r}: unknown option {key!r}; valid options: {', '.join(valid)}"
            )
    try:
        return model.model_validate(dict(options))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"]) or "options"
        raise ConfigError(f"optimizer {optimizer!r}: option {loc}: {err['msg']}") from exc


class BaseOptimizer:
    """Bookkeeping shared by all optimizers (nevergrad style: public methods here, private hooks below).

    Subclasses set ``name`` and ``Options`` and override ``_setup`` (build library objects, may draw
    from ``self._rng``), ``_propose(n)`` (return up to ``n`` ``(genome, meta)`` pairs), ``_observe(told)``
    and, when they hold state, ``_dump_state``/``_restore_state``. Optional: ``_validate``,
    ``_should_stop``, ``_recommend``.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions

    def __init__(self, problem: Problem, *, seed: int, **options: Any) -> None:
        if not isinstance(problem, Problem):
            raise ConfigError(f"optimizer {self.name!r}: expected a Problem, got {type(problem).__name__}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"optimizer {self.name!r}: seed must be a non-negative integer, got {seed!r}")
        self.problem = problem
        self.seed = int(seed)
        self.options = parse_options(self.Options, options, self.name)
        self.scalarizer = Scalarizer(self.options.scalarize, problem.task_names)
        self._rng = np.random.default_rng(self.seed)
        self._next_id = 0
        self._pending: dict[int, Candidate] = {}
        self._n_told = 0
        self._n_failed = 0
        self._lo: npt.NDArray[np.float64] | None = None
        self._hi: npt.NDArray[np.float64] | None = None
        self._best: Candidate | None = None
        self._setup()

    # ------------------------------------------------------------------ public protocol
    def ask(self, n: int = 1) -> list[Candidate]:
        """Up to ``n`` new candidates (fewer when the optimizer must wait for results, see subclasses)."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise OptimizerError(f"ask: n must be a non-negative integer, got {n!r}")
        if n == 0:
            return []
        out: list[Candidate] = []
        for genome, meta in self._propose(int(n)):
            cand = Candidate(id=self._next_id, genome=frozen_array(genome), meta=dict(meta))
            if cand.genome.shape != (self.problem.dim,):
                raise OptimizerError(f"{self.name}: proposed genome of shape {cand.genome.shape}")
            self._next_id += 1
            self._pending[cand.id] = cand
            out.append(cand)
        return out

    def tell(self, observations: Observation | Iterable[Observation]) -> None:
        """Record results, in any order; failures and non-finite scores are told as failures."""
        batch = [observations] if isinstance(observations, Observation) else list(observations)
        seen: set[int] = set()
        told: list[Told] = []
        for obs in batch:
            if not isinstance(obs, Observation):
                raise OptimizerError(f"tell: expected Observation, got {type(obs).__name__}")
            cid = int(obs.candidate_id)
            if cid in seen or (0 <= cid < self._next_id and cid not in self._pending):
                raise OptimizerError(f"tell: candidate {cid} was already told")
            if cid not in self._pending:
                raise OptimizerError(
                    f"tell: unknown candidate id {cid} (asked ids are 0..{self._next_id - 1})"
                )
            seen.add(cid)
            told.append(self._normalize(obs))
        self._validate(told)
        for t in told:
            del self._pending[t.candidate.id]
            self._n_told += 1
            if t.ok:
                self._record_ok(t)
            else:
                self._n_failed += 1
        self._observe(told)

    def should_stop(self) -> bool:
        """True when the optimizer itself has converged (the driver owns budgets and deadlines)."""
        return self._should_stop()

    def recommend(self) -> Candidate | None:
        """The best evaluated candidate (``meta`` gains ``objectives`` and ``score``), or None before any."""
        return self._recommend()

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    @property
    def pending_ids(self) -> list[int]:
        return sorted(self._pending)

    @property
    def n_told(self) -> int:
        return self._n_told

    @property
    def n_failed(self) -> int:
        return self._n_failed

    def penalty(self) -> npt.NDArray[np.float64]:
        """Per-task score given to failures: ``lo - max(1, hi - lo)`` over the finite scores told so far."""
        k = len(self.problem.task_names)
        if self._lo is None or self._hi is None:
            return np.full(k, -1.0)
        return self._lo - np.maximum(1.0, self._hi - self._lo)

    def values_of(self, told: Told) -> npt.NDArray[np.float64]:
        """The told objectives, or the current penalty for a failure."""
        return told.objectives if told.ok and told.objectives is not None else self.penalty()

    def state_dict(self) -> dict[str, Any]:
        impl, blob = self._dump_state()
        state: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "optimizer": self.name,
            "seed": self.seed,
            "options": self.options.model_dump(mode="json"),
            "problem": {"dim": self.problem.dim, "task_names": list(self.problem.task_names)},
            "next_id": self._next_id,
            "pending": [candidate_to_json(self._pending[i]) for i in sorted(self._pending)],
            "n_told": self._n_told,
            "n_failed": self._n_failed,
            "lo": None if self._lo is None else self._lo.tolist(),
            "hi": None if self._hi is None else self._hi.tolist(),
            "best": None if self._best is None else candidate_to_json(self._best),
            "rng": rng_to_json(self._rng),
            "impl": impl,
            "blob": None if blob is None else encode_blob(blob),
        }
        json.dumps(state)  # fail here, not in the checkpoint writer, if a subclass put a non-JSON value in
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state written by ``state_dict`` of an optimizer of the same kind, problem and options."""
        try:
            self._check_state(state)
            pending = {c.id: c for c in map(candidate_from_json, state["pending"])}
            rng = rng_from_json(state["rng"])
            lo = None if state["lo"] is None else np.asarray(state["lo"], dtype=np.float64)
            hi = None if state["hi"] is None else np.asarray(state["hi"], dtype=np.float64)
            best = None if state["best"] is None else candidate_from_json(state["best"])
            blob = None if state.get("blob") is None else decode_blob(state["blob"])
            next_id, n_told, n_failed = int(state["next_id"]), int(state["n_told"]), int(state["n_failed"])
            old_rng, self._rng = self._rng, rng
            try:
                self._restore_state(dict(state["impl"]), blob)
            except BaseException:
                self._rng = old_rng
                raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise OptimizerError(f"state of optimizer {self.name!r} is malformed: {exc!r}") from exc
        self._pending, self._lo, self._hi, self._best = pending, lo, hi, best
        self._next_id, self._n_told, self._n_failed = next_id, n_told, n_failed

    # ------------------------------------------------------------------ hooks
    def _setup(self) -> None:
        """Build the subclass's own objects (after options, scalarizer and RNG exist)."""

    def _propose(self, n: int) -> list[tuple[npt.NDArray[np.float64], dict[str, Any]]]:
        """Up to ``n`` ``(genome, meta)``; they get ids ``self._next_id, self._next_id + 1, …`` in order."""
        raise NotImplementedError

    def _validate(self, told: list[Told]) -> None:
        """Refuse a batch before anything is recorded (raise OptimizerError)."""

    def _observe(self, told: list[Told]) -> None:
        raise NotImplementedError

    def _should_stop(self) -> bool:
        return False

    def _recommend(self) -> Candidate | None:
        return self._best

    def _dump_state(self) -> tuple[dict[str, Any], bytes | None]:
        return {}, None

    def _restore_state(self, impl: dict[str, Any], blob: bytes | None) -> None:
        """Restore the subclass state; ``self._rng`` is already the restored generator."""

    # ------------------------------------------------------------------ internals
    def _normalize(self, obs: Observation) -> Told:
        cand = self._pending[int(obs.candidate_id)]
        if not obs.ok:
            return Told(candidate=cand, ok=False)
        k = len(self.problem.task_names)
        if obs.objectives is None or obs.objectives.shape != (k,):
            shape = None if obs.objectives is None else obs.objectives.shape
            raise OptimizerError(
                f"tell: candidate {cand.id}: expected {k} objectives ({', '.join(self.problem.task_names)}), got {shape}"
            )
        per_example = obs.per_example
        if per_example is not None and per_example.ndim != 1:
            raise OptimizerError(
                f"tell: candidate {cand.id}: per_example must be 1-D, got {per_example.shape}"
            )
        finite = np.all(np.isfinite(obs.objectives)) and (
            per_example is None or np.all(np.isfinite(per_example))
        )
        if not finite:
            logger.warning("candidate %d: non-finite score told; treated as a failure", cand.id)
            return Told(candidate=cand, ok=False, error="non-finite score")
        return Told(candidate=cand, ok=True, objectives=obs.objectives.copy(), per_example=per_example)

    def _record_ok(self, t: Told) -> None:
        assert t.objectives is not None
        self._lo = t.objectives.copy() if self._lo is None else np.minimum(self._lo, t.objectives)
        self._hi = t.objectives.copy() if self._hi is None else np.maximum(self._hi, t.objectives)
        score = self.scalarizer(t.objectives)
        if self._best is None or score > float(self._best.meta["score"]):
            meta = {**t.candidate.meta, "objectives": t.objectives.tolist(), "score": score}
            self._best = Candidate(id=t.candidate.id, genome=t.candidate.genome, meta=meta)

    def _check_state(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise OptimizerError(
                f"state of optimizer {self.name!r} must be a mapping, got {type(state).__name__}"
            )
        version = state.get("schema_version")
        if version != SCHEMA_VERSION:
            raise OptimizerError(
                f"state schema_version {version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        if state.get("optimizer") != self.name:
            raise OptimizerError(f"state is of optimizer {state.get('optimizer')!r}, not {self.name!r}")
        mine = self.options.model_dump(mode="json")
        if state.get("options") != mine:
            raise OptimizerError(
                f"state of optimizer {self.name!r} was written with options {state.get('options')}, "
                f"this optimizer has {mine}"
            )
        prob = state.get("problem", {})
        if prob.get("dim") != self.problem.dim or list(prob.get("task_names", [])) != list(
            self.problem.task_names
        ):
            raise OptimizerError(
                f"state of optimizer {self.name!r} is for dim={prob.get('dim')} tasks={prob.get('task_names')}, "
                f"the problem has dim={self.problem.dim} tasks={list(self.problem.task_names)}"
            )
