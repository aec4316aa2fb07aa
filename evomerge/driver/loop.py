"""The search loop: ask -> dispatch -> collect -> tell -> checkpoint, one result at a time in completion order.

Phases: ``baselines`` (each source and the base, scored to set the references: base = 0, best source = 1, and
the warm-start grid), ``search`` (until the budget is spent), ``final`` (the Pareto set and the baselines
re-scored on the held-out test split), ``done``.

Exact resume by construction. Every result is appended to the archive before anything acts on it, and the
driver's state (optimizer, references, promotions, phase, counters) is a pure function of the config, the seed
and the sequence of results it handled: the loop asks for new candidates after each single result, with as
many free slots as the pool has workers without a job, so how the pool batches its answers does not matter.
Resuming runs the same loop from the start with the archive as its journal: a dispatched job is answered by the
next archived result instead of the pool, and only when the journal is exhausted do the jobs still in flight
go to the pool. Nothing archived is evaluated again and the optimizer sees what the uninterrupted run showed it,
in the same order. The checkpoint only adds what the archive cannot know: the wall time used and when a time
budget ran out (see :mod:`evomerge.driver.journal`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from evomerge.archive import Archive
from evomerge.driver import early_stop
from evomerge.driver.journal import Journal, Stop
from evomerge.driver.pool import Job, Pool
from evomerge.driver.promotion import Promotion
from evomerge.driver.records import Handled, Settings, StartPolicy
from evomerge.driver.rescoring import rescoring_candidates
from evomerge.driver.subset import calibration_subset
from evomerge.evaluation import Candidate, EvalResult
from evomerge.events import EventLog
from evomerge.optim.base import Observation
from evomerge.recipe import Recipe
from evomerge.references import References
from evomerge.scoring.anchors import CalibrationSubset

log = logging.getLogger(__name__)

class Driver:
    """Runs one search in ``run_dir`` (see the module docstring)."""

    def __init__(self, *, run_dir: Any, space: Any, start: StartPolicy, pool: Pool, archive: Archive,
                 events: EventLog, settings: Settings,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.run_dir, self.space, self.start, self.pool = run_dir, space, start, pool
        self.events, self.cfg, self.on_progress = events, settings, on_progress
        self.tasks = settings.tasks
        self.archive = archive
        self.journal = Journal(run_dir, archive, pool)
        self.opt: Any = None
        self.warm: dict[str, Any] | None = None
        self.refs = References()
        self.promotion = Promotion(settings.promote_quantile, settings.promote_confidence)
        #: The calibration subset and its estimator (multi-fidelity runs), chosen after the baselines.
        self.subset: CalibrationSubset | None = None
        self.phase = "baselines"
        self.next_key = 0
        self.told = self.failures = self.stopped = 0
        self.optimizer_s = 0.0  # this process's time in the optimizer's ask and tell (the done event)
        self.best: float | None = None
        self.inflight: dict[int, tuple[Job, Candidate]] = {}
        self.history: list[Handled] = []
        self.seen: dict[tuple[str, str, str], EvalResult] = {}  # (recipe hash, fidelity, split) -> first ok

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint shows of the run (resume rebuilds all of it but the clock from the archive)."""
        with self.journal.deferring_stops():  # the optimizer's code must not see a stop's exception
            optimizer = None if self.opt is None else self.opt.state_dict()
        return {
            "phase": self.phase, "told": self.told, "failures": self.failures, "best": self.best,
            "references": self.refs.state_dict(), "warm": self.warm,
            "promoted": sorted(self.promotion.promoted),
            "optimizer": optimizer,
        }

    def restore(self) -> None:
        """Resume: replay the archive through the loop (see the module docstring)."""
        self.journal.restore()

    def request_stop(self, *_: Any) -> None:
        self.journal.request_stop()

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        """Run to the end, or raise :class:`~evomerge.errors.RunStopped` after Ctrl-C / SIGTERM (checkpointed)."""
        with self.journal.signals():
            try:
                self._phases()
            except Stop as stop:
                self._save()
                raise stop.error(self.run_dir) from None
            self._save()

    def _save(self) -> None:
        """The checkpoint at the end or at a stop; a further stop meanwhile takes effect after it, as this one."""
        with contextlib.suppress(Stop), self.journal.deferring_stops():
            self.journal.save(self.state_dict())

    def _phases(self) -> None:
        # an anchor subset is chosen from the baselines' full-set scores, so they are scored in full only
        fidelities = {None} if self.cfg.subset_method == "anchor" else {self.cfg.subset, None}
        for i, b in enumerate(self.cfg.baselines):
            for subset in sorted(fidelities, key=lambda s: (s is None, s or 0)):
                self._submit(Candidate(-1 - i, np.zeros(0), {"baseline": b.name, "kind": b.kind}), b.recipe,
                             subset=subset)
        self._drain()
        self.journal.stop_now_if_requested()
        full = [h for h in self.history if h.candidate.id < 0 and h.job.subset is None]
        self.refs = References.from_scored(full, self.tasks, self.cfg.declared)
        if self.cfg.subset is not None:
            refs = [h.result for h in full if h.meta.get("kind") in ("base", "source")]
            self.subset = calibration_subset(self.run_dir, self.cfg.subset_method, self.cfg.subset, self.cfg.seed,
                                             refs, self.tasks)
            for h in full:
                if h.ok:
                    self.promotion.observe_full(self.refs.objectives(h.result, self.tasks))
        with self.journal.deferring_stops():
            self.opt, self.warm = self.start(full, self.refs)
        self._emit("references", low=self.refs.low, high=self.refs.high)
        if self.warm is not None:
            self._emit("warm_start", **self.warm)
        self._phase("search")
        self._search()
        self.journal.stop_now_if_requested()
        self._phase("final")
        if self.cfg.rescore_test:
            self._submit_test_rescoring()
        self._drain()
        self._phase("done")
        self._emit("done", told=self.told, failures=self.failures, stopped_early=self.stopped,
                   optimizer_s=round(self.optimizer_s, 3))

    def _phase(self, phase: str) -> None:
        self.phase = phase
        self.journal.checkpoint(self.state_dict())

    def _emit(self, event: str, **fields: Any) -> None:
        if self.journal.live:  # a replay does not repeat the events of the run it replays
            self.events.emit(event, **fields)

    def _submit(self, cand: Candidate, recipe: Recipe, *, split: str = "calibration", subset: int | None = None) -> None:
        job = self._job(cand, recipe, split, subset)
        self.next_key += 1
        self.inflight[job.key] = (job, cand)
        self.journal.submit(job)

    def _job(self, cand: Candidate, recipe: Recipe, split: str, subset: int | None) -> Job:
        examples = None if subset is None or self.subset is None else self.subset.examples()
        stop = None
        if self.cfg.early_stop != "off" and cand.id >= 0 and split == "calibration" and subset is None:
            full = [self.refs.objectives(h.result, self.tasks) for h in self.history
                    if h.ok and h.split == "calibration" and h.result.fidelity == "full"]
            stop = early_stop.bound(self.cfg.early_stop, self.cfg.early_stop_chunks, self.tasks, self.refs, full)
        return Job(self.next_key, cand.id, recipe, split, subset, examples=examples, early_stop=stop)

    def _drain(self) -> None:
        while self.inflight:
            self._collect_one()

    def _collect_one(self) -> None:
        job, res = self.journal.next_result(self.inflight)
        _, cand = self.inflight.pop(job.key)
        self._handle(job, cand, res)

    def _budget_left(self) -> int:
        if self.journal.stopping or self.journal.time_up(self.cfg.budget_seconds, len(self.history)):
            return 0
        asked = self.opt.n_told + self.opt.n_pending
        left = math.inf if self.cfg.budget_evals is None else self.cfg.budget_evals - asked
        return int(max(0, min(left, 1 << 30)))

    def _search(self) -> None:
        while True:
            free = self.pool.size - len(self.inflight)
            left = self._budget_left()
            served = False  # a candidate answered from an earlier identical recipe's result: ask again
            if left > 0 and free > 0 and not self.opt.should_stop():
                t0 = time.perf_counter()
                with self.journal.deferring_stops():
                    asked = self.opt.ask(min(free, left))
                self.optimizer_s += time.perf_counter() - t0
                for cand in asked:
                    recipe = self.space.decode(cand.genome)
                    job = self._job(cand, recipe, "calibration", self.cfg.subset)
                    cached = self.seen.get((recipe.hash, job.fidelity, "calibration"))
                    if cached is None:
                        self._submit(cand, recipe, subset=self.cfg.subset)
                        continue
                    self.next_key += 1
                    res = EvalResult(cand.id, cached.status, dict(cached.tasks), cached.error, {"cached": 1.0},
                                     cached.worker, job.fidelity)
                    self._handle(job, cand, self.journal.inline(job, res), meta={"cached": True})
                    served = True
            if not self.inflight:
                if served:
                    continue  # the budget counts served candidates, so this ends
                return  # budget spent, optimizer stopped, or nothing more to ask until a result arrives
            self._collect_one()

    # ------------------------------------------------------------------ results
    def _handle(self, job: Job, cand: Candidate, res: EvalResult, *, meta: dict[str, Any] | None = None) -> None:
        res = res.archived()
        meta = {"fidelity": job.fidelity, **(meta or {})}
        if res.ok and job.subset is not None and job.split == "calibration" and self.subset is not None:
            est = self.subset.estimate(res)  # archived with the result: the estimator's error can be read back
            meta["estimate"] = {t: [e.mean, e.se] for t, e in sorted(est.items())}
        self.journal.record(cand, job, res, meta)
        self.history.append(Handled(job, cand, res, {**cand.meta, **meta}))  # the archive record's meta
        if res.ok and res.fidelity == job.fidelity:  # an early-stopped result is no score at the job's fidelity
            self.seen.setdefault((job.recipe.hash, job.fidelity, job.split), res)
        self._emit("eval", candidate=cand.id, hash=job.recipe.hash, status=res.status, fidelity=job.fidelity,
                   split=job.split, scores=res.task_means() if res.ok else None, error=res.error, timings=res.timings)
        if cand.id >= 0 and job.split == "calibration" and (job.subset is not None or self.cfg.subset is None):
            self._tell(job, cand, res)  # baselines, test re-scoring and promotions of told candidates are not told
        elif cand.id >= 0 and job.split == "calibration" and res.ok:  # a promotion's full-set score
            self.promotion.observe_full(self.refs.objectives(res, self.tasks))
        self.journal.settle(self.inflight)
        self.journal.checkpoint(self.state_dict())
        if self.on_progress and self.journal.live and cand.id >= 0:
            self.on_progress(self.progress())

    def _tell(self, job: Job, cand: Candidate, res: EvalResult) -> None:
        se = None
        if res.ok:
            objectives = self.refs.objectives(res, self.tasks)
            if job.subset is not None and self.subset is not None:  # the estimated full-set objectives
                objectives, se = self._estimated(res)
            stopped = res.fidelity == early_stop.STOPPED  # partial means; no score for every example
            obs = Observation(candidate_id=cand.id, objectives=objectives, per_example=None if stopped else
                              np.concatenate([res.tasks[t].scores for t in self.tasks]))
        else:
            obs = Observation.failure(cand.id)
        t0 = time.perf_counter()
        with self.journal.deferring_stops():
            self.opt.tell([obs])
        self.optimizer_s += time.perf_counter() - t0
        self.told += 1
        if not res.ok:
            self.failures += 1
            log.info("eval %d (candidate %d): failed: %s", self.told, cand.id, res.error)
            return
        assert obs.objectives is not None
        score = float(np.mean(obs.objectives))
        if res.fidelity == early_stop.STOPPED:  # told its partial means; no full-set score, so not the best
            self.stopped += 1
            if self.journal.live:
                log.info("eval %d (candidate %d): stopped early after %d examples (partial mean %.3f)", self.told,
                         cand.id, sum(len(ts.scores) for ts in res.tasks.values()), score)
            return
        self.best = score if self.best is None else max(self.best, score)
        if self.journal.live:
            log.info("eval %d (candidate %d, %s): %s | mean %.3f | best %.3f | failures %d", self.told, cand.id,
                     job.fidelity, " ".join(f"{t} {v:.3f}" for t, v in zip(self.tasks, obs.objectives, strict=True)),
                     score, self.best, self.failures)
        if self.cfg.subset is not None and self.promotion.decide(cand.id, obs.objectives, se):
            self._submit(cand, job.recipe, subset=None)

    def _estimated(self, res: EvalResult) -> tuple[np.ndarray, np.ndarray]:
        """A subset result's estimated full-set objectives and their standard errors (normalization is affine)."""
        assert self.subset is not None
        est = self.subset.estimate(res)
        mean = np.array([self.refs.value(t, est[t].mean) for t in self.tasks], dtype=np.float64)
        up = np.array([self.refs.value(t, est[t].mean + est[t].se) for t in self.tasks], dtype=np.float64)
        return mean, np.abs(up - mean)

    def progress(self) -> dict[str, Any]:
        return {"told": self.told, "failures": self.failures, "budget": self.cfg.budget_evals, "phase": self.phase,
                "best": self.best}

    def _submit_test_rescoring(self) -> None:
        for cand, recipe in rescoring_candidates(self.history, self.tasks):
            self._submit(cand, recipe, split="test")
