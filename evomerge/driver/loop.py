"""The search loop: ask -> decode -> dispatch -> (archive, tell, checkpoint), in completion order.

Phases: ``baselines`` (each source and the base, scored to normalize task scores: base = 0, best
source = 1), ``search`` (until the budget is spent), ``final`` (the Pareto set re-scored on the held-out
test split beside the baselines), ``done``.

Resume: the archive is appended *before* the optimizer is told and the checkpoint is written, so after
a crash the archive may hold results the checkpoint has not seen yet. Resuming restores the checkpoint,
re-handles those results in archive order (told, not re-evaluated), resubmits the jobs that were in
flight, and continues: with the same seed and an in-order pool it proposes exactly what an uninterrupted
run would have.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from evomerge.archive import Archive
from evomerge.checkpoint import check_cursor, read_checkpoint, save_checkpoint
from evomerge.driver.pool import Job, Pool
from evomerge.errors import CheckpointError
from evomerge.events import EventLog
from evomerge.optim.base import Observation
from evomerge.recipe import Recipe
from evomerge.types import Candidate, EvalResult

if TYPE_CHECKING:
    from evomerge.driver.warm import WarmStart

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class Normalizer:
    """Per-task linear normalization: ``(raw - low) / (high - low)`` (base = 0, best source = 1)."""

    low: dict[str, float] = field(default_factory=dict)
    high: dict[str, float] = field(default_factory=dict)

    def __call__(self, task: str, value: float) -> float:
        lo, hi = self.low.get(task, 0.0), self.high.get(task, 1.0)
        return (value - lo) / (hi - lo) if hi - lo > 1e-9 else value - lo

    def objectives(self, result: EvalResult, tasks: list[str]) -> np.ndarray:
        means = result.task_means()
        return np.array([self(t, means[t]) for t in tasks], dtype=np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high}


@dataclass
class Baseline:
    """A reference recipe scored before the search (a source model or a hand-set merge)."""

    name: str
    recipe: Recipe
    kind: str  # "source" | "base" | "handset"


class Driver:
    """Runs one search in ``run_dir`` (see the module docstring)."""

    def __init__(
        self,
        *,
        run_dir: Any,
        space: Any,
        optimizer: Any,
        pool: Pool,
        archive: Archive,
        events: EventLog,
        tasks: list[str],
        baselines: list[Baseline],
        budget_evals: int | None,
        budget_seconds: float | None,
        subset: int | None,
        promote_quantile: float,
        rescore_test: bool,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
        warm_start: WarmStart | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.space = space
        self.opt = optimizer
        self.pool = pool
        self.archive = archive
        self.events = events
        self.tasks = tasks
        self.baselines = baselines
        self.budget_evals = budget_evals
        self.budget_seconds = budget_seconds
        self.subset = subset
        self.promote_quantile = promote_quantile
        self.rescore_test = rescore_test
        self.on_progress = on_progress
        self.warm_start = warm_start  # space.warm_start: the grid and weight -> optimizer started there
        # state (checkpointed)
        self.warm: dict[str, Any] | None = None  # {"weight": chosen or None} once the warm start was decided
        self.phase = "baselines"
        self.next_key = 0
        self.told = 0
        self.failures = 0
        self.best: float | None = None
        self.elapsed = 0.0
        self.norm = Normalizer()
        self.inflight: dict[int, tuple[Job, Candidate]] = {}
        self.subset_scores: list[float] = []
        self.promoted: set[int] = set()
        self._stop = False
        self._t0 = time.monotonic()
        self._replay: dict[tuple[int, str, str], EvalResult] = {}
        self._resubmit: list[tuple[Job, Candidate]] = []

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "state_version": STATE_VERSION,
            "phase": self.phase,
            "next_key": self.next_key,
            "told": self.told,
            "failures": self.failures,
            "best": self.best,
            "elapsed": self.elapsed + (time.monotonic() - self._t0),
            "norm": self.norm.state_dict(),
            "subset_scores": self.subset_scores,
            "promoted": sorted(self.promoted),
            "inflight": [
                {
                    "key": j.key, "candidate_id": j.candidate_id, "split": j.split, "subset": j.subset,
                    "attempt": j.attempt, "genome": c.genome.tolist(), "meta": c.meta, "recipe": j.recipe.model_dump(mode="json"),
                }
                for j, c in self.inflight.values()
            ],
            "warm": self.warm,
            "optimizer": self.opt.state_dict(),
            "archive_len": len(self.archive),
        }

    def save(self) -> None:
        state = self.state_dict()
        save_checkpoint(self.run_dir, state, cursor=state.pop("archive_len"))

    def restore(self) -> None:
        """Load the checkpoint and replay archive rows appended after it (see the module docstring)."""
        ckpt = read_checkpoint(self.run_dir)
        if ckpt is None:
            return
        check_cursor(ckpt, len(self.archive))
        state = ckpt.state
        if state.get("state_version") != STATE_VERSION:
            raise CheckpointError(f"{self.run_dir}: checkpoint state_version {state.get('state_version')} unsupported")
        self.phase = state["phase"]
        self.next_key = state["next_key"]
        self.told = state["told"]
        self.failures = state["failures"]
        self.best = state.get("best")
        self.elapsed = state["elapsed"]
        self.norm = Normalizer(**state["norm"])
        self.subset_scores = list(state["subset_scores"])
        self.promoted = set(state["promoted"])
        self.warm = state.get("warm")
        if self.warm is not None and self.warm.get("weight") is not None and self.warm_start is not None:
            self.opt = self.warm_start.make_optimizer(self.warm["weight"])  # the optimizer the run searched with
        self.opt.load_state_dict(state["optimizer"])
        for d in state["inflight"]:
            cand = Candidate(d["candidate_id"], np.asarray(d["genome"], dtype=np.float64), d["meta"])
            job = Job(d["key"], d["candidate_id"], Recipe.model_validate(d["recipe"]), d["split"], d["subset"], d["attempt"])
            self.inflight[job.key] = (job, cand)
        cursor = ckpt.cursor
        replay = self.archive.records(split=None)[cursor:]
        self._replay = {(r.candidate_id, r.result.fidelity, r.split): r.result for r in replay}
        pending = sorted(self.inflight.values(), key=lambda jc: jc[0].key)
        self.inflight = {}
        self._resubmit = pending
        log.info("resumed %s: phase %s, %d told, %d results to replay, %d jobs in flight",
                 self.run_dir, self.phase, self.told, len(replay), len(pending))

    # ------------------------------------------------------------------ loop
    def _submit(self, cand: Candidate, recipe: Recipe, *, split: str = "calibration", subset: int | None = None) -> None:
        job = Job(self.next_key, cand.id, recipe, split, subset)
        self.next_key += 1
        self._dispatch(job, cand)

    def _dispatch(self, job: Job, cand: Candidate) -> None:
        """Send a job to the pool, unless the archive already holds its result from before a crash."""
        replayed = self._replay.pop((cand.id, job.fidelity, job.split), None)
        if replayed is not None:
            self._handle(job, cand, replayed, append=False)
            return
        self.inflight[job.key] = (job, cand)
        self.pool.submit(job)

    def _budget_left(self) -> int:
        asked = self.opt.n_told + self.opt.n_pending
        left = math.inf if self.budget_evals is None else self.budget_evals - asked
        if self.budget_seconds is not None and self.elapsed + time.monotonic() - self._t0 > self.budget_seconds:
            left = 0
        return int(max(0, min(left, 1 << 30)))

    def request_stop(self, *_: Any) -> None:
        if not self._stop:
            log.warning("stop requested: finishing in-flight evaluations, then saving")
        self._stop = True

    def run(self) -> None:
        prev = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, self.request_stop)
        except ValueError:  # not the main thread
            prev = None
        try:
            resubmit, self._resubmit = self._resubmit, []
            for job, cand in resubmit:
                self._dispatch(job, cand)
            self._run_phases()
        finally:
            if prev is not None:
                signal.signal(signal.SIGINT, prev)
            self.save()

    def _run_phases(self) -> None:
        if self.phase == "baselines":
            if not self.inflight:
                for i, b in enumerate(self.baselines):
                    for subset in sorted({self.subset, None}, key=lambda s: (s is None, s or 0)):
                        self._submit(Candidate(-1 - i, np.zeros(0), {"baseline": b.name, "kind": b.kind}),
                                     b.recipe, subset=subset)
                self.save()
            self._drain()
            if self._stop:
                return
            self._set_references()
            if self.warm_start is not None and self.warm is None:
                self._apply_warm_start()
            self.phase = "search"
            self.save()
        if self.phase == "search":
            self._search()
            if self._stop:
                return
            self.phase = "final"
            self.save()
        if self.phase == "final":
            if self.rescore_test and not self.inflight :
                self._submit_test_rescoring()
                self.save()
            self._drain()
            if self._stop:
                return
            self.phase = "done"
            self.events.emit("done", told=self.told, failures=self.failures)

    def _drain(self) -> None:
        while self.inflight and not self._stop:
            for job, res in self.pool.wait():
                job0, cand = self.inflight.pop(job.key)
                self._handle(job, cand, res)
        # after a stop request, finish what is in flight so nothing computed is lost
        while self._stop and self.inflight:
            for job, res in self.pool.wait():
                job0, cand = self.inflight.pop(job.key)
                self._handle(job, cand, res)

    def _search(self) -> None:
        fidelity = "full" if self.subset is None else f"subset:{self.subset}"
        while not self._stop:
            left = self._budget_left()
            free = self.pool.free()
            if left > 0 and free > 0 and not self.opt.should_stop():
                for cand in self.opt.ask(min(free, left)):
                    recipe = self.space.decode(cand.genome)
                    cached = self.archive.lookup(recipe.hash, fidelity, include_failed=False)
                    if cached is not None and (cand.id, fidelity, "calibration") not in self._replay:
                        res = EvalResult(cand.id, cached.status, dict(cached.tasks), cached.error,
                                         {"cached": 1.0}, cached.worker, fidelity)
                        job = Job(self.next_key, cand.id, recipe, "calibration", self.subset)
                        self.next_key += 1
                        self._handle(job, cand, res, meta={"cached": True})
                    else:
                        self._submit(cand, recipe, subset=self.subset)
            if not self.inflight:
                if left == 0 or self.opt.should_stop():
                    break
                continue
            for job, res in self.pool.wait():
                job0, cand = self.inflight.pop(job.key)
                self._handle(job, cand, res)
        while self.inflight:  # finish (or, after Ctrl-C, abandon nothing) what is in flight
            for job, res in self.pool.wait():
                job0, cand = self.inflight.pop(job.key)
                self._handle(job, cand, res)

    # ------------------------------------------------------------------ results
    def _handle(
        self, job: Job, cand: Candidate, res: EvalResult, *, append: bool = True, meta: dict[str, Any] | None = None
    ) -> None:
        res = _check_finite(res)
        if append:
            self.archive.append(cand, job.recipe, res, split=job.split, meta={"fidelity": job.fidelity, **(meta or {})})
        self.events.emit(
            "eval", candidate=cand.id, hash=job.recipe.hash, status=res.status, fidelity=job.fidelity,
            split=job.split, scores=res.task_means() if res.ok else None, error=res.error, timings=res.timings,
        )
        if cand.id < 0 or job.split != "calibration" or (job.subset is None and self.subset is not None):
            # baselines, test re-scoring and promotions of already told candidates are not told
            self.save()
            return
        obs = (
            Observation(
                candidate_id=cand.id,
                objectives=self.norm.objectives(res, self.tasks),
                per_example=np.concatenate([res.tasks[t].scores for t in self.tasks]),
            )
            if res.ok
            else Observation.failure(cand.id)
        )
        self.opt.tell([obs])
        self.told += 1
        if not res.ok:
            self.failures += 1
            log.info("eval %d (candidate %d): failed: %s", self.told, cand.id, res.error)
        else:
            score = float(np.mean(obs.objectives))
            self.best = score if self.best is None else max(self.best, score)
            log.info(
                "eval %d (candidate %d, %s): %s | mean %.3f | best %.3f | failures %d",
                self.told, cand.id, job.fidelity,
                " ".join(f"{t} {v:.3f}" for t, v in zip(self.tasks, obs.objectives, strict=True)), score, self.best, self.failures,
            )
        if self.subset is not None and res.ok:
            score = float(np.mean(obs.objectives))
            self.subset_scores.append(score)
            cut = float(np.quantile(self.subset_scores, 1 - self.promote_quantile))
            if score >= cut and cand.id not in self.promoted:
                self.promoted.add(cand.id)
                self._submit(cand, job.recipe, subset=None)
        self.save()
        if self.on_progress:
            self.on_progress(self.progress())

    def progress(self) -> dict[str, Any]:
        return {"told": self.told, "failures": self.failures, "budget": self.budget_evals, "phase": self.phase,
                "best": self.best}

    def _set_references(self) -> None:
        """Normalization: base = 0, best non-base source = 1, per task, on the full calibration set."""
        recs = [r for r in self.archive.records() if r.candidate_id < 0 and r.ok and r.result.fidelity == "full"
                and r.split == "calibration"]
        low: dict[str, float] = {}
        high: dict[str, float] = {}
        for t in self.tasks:
            base = [r.result.tasks[t].mean for r in recs if r.meta.get("kind") == "base"]
            srcs = [r.result.tasks[t].mean for r in recs if r.meta.get("kind") == "source"]
            low[t] = base[0] if base else 0.0
            high[t] = max(srcs) if srcs else 1.0
        self.norm = Normalizer(low, high)
        self.events.emit("references", low=low, high=high)

    def _apply_warm_start(self) -> None:
        """Start the search at the grid weight whose task-arithmetic merge scored best on calibration, by the
        optimizer's own scalarization of the normalized task scores (ties: the first weight of the grid)."""
        from evomerge.driver.warm import choose

        assert self.warm_start is not None
        scored = [(r.meta.get("baseline"), float(self.opt.scalarizer(self.norm.objectives(r.result, self.tasks))))
                  for r in self.archive.records()
                  if r.candidate_id < 0 and r.ok and r.result.fidelity == "full" and r.split == "calibration"]
        best, scores = choose(scored, self.warm_start.weights)
        self.warm = {"weight": best, "scores": {f"{w:g}": v for w, v in scores.items()}}
        if best is None:
            log.warning("warm start: no task-arithmetic merge of the grid was scored; starting at the template's x0")
            return
        self.opt = self.warm_start.make_optimizer(best)
        self.events.emit("warm_start", weight=best, scores=self.warm["scores"])
        log.info("warm start: task arithmetic at weight %g (%s)", best,
                 ", ".join(f"{w:g}: {v:.3f}" for w, v in scores.items()))

    def _submit_test_rescoring(self) -> None:
        from evomerge.archive.pareto import pareto_front

        recs = [r for r in self.archive.records() if r.ok and r.split == "calibration" and r.result.fidelity == "full"]
        searched = [r for r in recs if r.candidate_id >= 0]
        front = pareto_front(searched, self.tasks) if searched else []
        seen = {r.recipe_hash for r in self.archive.records(split="test")}
        for r in [*(r for r in recs if r.candidate_id < 0), *front]:
            if r.recipe_hash in seen:
                continue
            seen.add(r.recipe_hash)
            cand = Candidate(r.candidate_id, r.genome, {k: v for k, v in r.meta.items() if k in ("baseline", "kind")})
            self._submit(cand, r.recipe, split="test")


def _check_finite(res: EvalResult) -> EvalResult:
    if not res.ok:
        return res
    for name, ts in res.tasks.items():
        if not np.all(np.isfinite(ts.scores)):
            return EvalResult(res.candidate_id, "failed", {}, f"non-finite scores in task {name!r}",
                              res.timings, res.worker, res.fidelity)
    return res
