"""Evaluation pools: one interface for an in-process worker and for Ray actors.

The backends are registered by name in :data:`evomerge.pools.POOLS` (``local_pool``, ``ray_pool`` below).

Results are handed back in completion order, never through an ordered ``map``: a slow candidate does not
hold up the others. Only this module and ``worker.py`` know about Ray, and Ray is imported lazily.

On a Ray cluster (``resources.address``) the worker actors are spread over the nodes that have the resources
one needs (``cpus_per_worker``, ``gpus_per_worker``, ``custom_resources_per_worker``), so that losing a node
loses as few workers as possible. A job whose worker died (its process, or its whole node) is run again on a
fresh worker; each result is reported once. Which node each worker goes to, and the source check of every node
(at preflight, and for nodes that join during the run), is :mod:`evomerge.driver.nodes`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from evomerge.errors import BackendUnavailableError
from evomerge.evaluation import EvalResult
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

#: A job whose worker died is resubmitted at most this many times.
MAX_RETRIES = 2
#: Seconds the pool gives the nodes present at its start to pass their source check.
NODE_START_CHECK_S = 120.0
#: Seconds jobs may wait with no worker placed before the run stops, naming why.
UNPLACED_LIMIT_S = 600.0
#: Seconds between two looks for room while no worker is placed.
STARVED_POLL_S = 0.5


@dataclass(frozen=True)
class Job:
    """One evaluation to run: a recipe at a fidelity on a split."""

    key: int
    candidate_id: int
    recipe: Recipe
    split: str = "calibration"
    subset: int | None = None
    attempt: int = 0
    #: The example ids per task of an ``anchor`` calibration subset (``subset`` is then its size per task);
    #: ``None``: the scorer's hashed subset of ``subset`` examples.
    examples: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    #: ``fidelity.early_stop``: the bound a worker stops the candidate at (:mod:`evomerge.driver.early_stop`).
    early_stop: Any = None

    def answers(self, fidelity: str) -> bool:
        """Whether a result of ``fidelity`` answers this job (an early-stopped one answers a job with a bound)."""
        return fidelity == self.fidelity or (self.early_stop is not None and fidelity == "stopped")

    @property
    def fidelity(self) -> str:
        if self.subset is None:
            return "full"
        return f"subset:{self.subset}" if self.examples is None else f"anchor:{self.subset}"

    @property
    def scored_subset(self) -> int | dict[str, tuple[str, ...]] | None:
        """What the scorer's ``subset`` is for this job: a count, the ids per task, or ``None`` (every example)."""
        if self.subset is None or self.examples is None:
            return self.subset
        return dict(self.examples)


class Evaluator(Protocol):
    def evaluate(self, job: Job) -> EvalResult: ...


class Pool(Protocol):
    """Where jobs run. ``wait`` returns finished ``(job, result)`` pairs in completion order."""

    size: int

    def free(self) -> int: ...
    def submit(self, job: Job) -> None: ...
    def wait(self, timeout: float | None = None) -> list[tuple[Job, EvalResult]]: ...
    def close(self) -> None: ...


class LocalPool:
    """One in-process worker; a submitted job runs when ``wait`` is called (deterministic order)."""

    def __init__(self, evaluator: Evaluator) -> None:
        self.size = 1
        self.evaluator = evaluator
        self.queue: deque[Job] = deque()

    def free(self) -> int:
        return self.size - len(self.queue)

    def submit(self, job: Job) -> None:
        self.queue.append(job)

    def in_flight(self) -> list[Job]:
        return list(self.queue)

    def wait(self, timeout: float | None = None) -> list[tuple[Job, EvalResult]]:
        if not self.queue:
            return []
        job = self.queue.popleft()
        return [(job, self.evaluator.evaluate(job))]

    def close(self) -> None:
        self.queue.clear()


def init_ray(*, address: str | None, num_cpus: int | None, num_gpus: int | None, temp_dir: str | None) -> Any:
    """Start (or join) Ray with the dashboard off, auth tokens off, and nothing written to the home folder."""
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailableError("the ray backend needs Ray: pip install 'evomerge[ray]'") from exc
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return ray
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kw)
    else:
        if temp_dir:
            kw["_temp_dir"] = temp_dir
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, object_store_memory=300_000_000, **kw)
    return ray


def local_pool(make_evaluator: Callable[[], Evaluator], resources: Any,
               sources: dict[str, str] | None = None) -> LocalPool:
    """The ``local`` backend: one worker in this process."""
    return LocalPool(make_evaluator())


def ray_pool(make_evaluator: Callable[[], Evaluator], resources: Any,
             sources: dict[str, str] | None = None) -> RayPool:
    """The ``ray`` backend: ``resources.workers`` actors, on a local Ray or the cluster at ``resources.address``.

    With ``sources`` (name -> folder), a node is given workers only once it has shown it can open every source
    folder (:class:`~evomerge.driver.nodes.NodePlacer`).
    """
    res = resources
    init_ray(address=res.address, num_cpus=None if res.address else max(2, int(res.workers * res.cpus_per_worker)),
             num_gpus=None, temp_dir=None)
    return RayPool(make_evaluator, res.workers, num_cpus=res.cpus_per_worker, num_gpus=res.gpus_per_worker,
                   resources=dict(res.custom_resources_per_worker), timeout_s=res.eval_timeout_s, sources=sources)


class RayPool:
    """``size`` Ray actors, each holding its sources resident; jobs go to free actors.

    A job whose actor dies (its process, or the node it ran on) is resubmitted to a fresh actor (at most
    ``MAX_RETRIES`` times) and the actor is replaced; a job running past ``timeout_s`` is reported failed and
    its actor replaced. Each actor is pinned to the node a :class:`~evomerge.driver.nodes.NodePlacer` chooses
    (spread over the nodes that can hold one and, given ``sources``, have shown they can read them) and needs
    ``resources`` (custom Ray resources) besides its CPUs and GPUs. An actor no node has room for waits, unplaced,
    and is placed as soon as a node has room (a node that joins, or a lost one's place); when none is placed for
    :data:`UNPLACED_LIMIT_S` seconds while jobs wait, :meth:`wait` raises :class:`EvomergeError` saying why.
    """

    def __init__(
        self,
        make_evaluator: Callable[[], Evaluator],
        size: int,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        resources: dict[str, float] | None = None,
        timeout_s: float | None = None,
        sources: dict[str, str] | None = None,
    ) -> None:
        import ray

        from evomerge.driver.nodes import NodePlacer

        self.ray = ray
        self.size = size
        self.timeout_s = timeout_s
        self._actor_cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or None,
                                     max_restarts=0)(_ActorWorker)
        self._make = make_evaluator
        self.placer = NodePlacer(ray, cpus=num_cpus, gpus=num_gpus, custom=dict(resources or {}), sources=sources)
        self.placer.refresh(force=True, timeout=NODE_START_CHECK_S)
        self.node_of: dict[Any, str] = {}  # actor -> the node it is pinned to
        self.idle: list[Any] = []
        self.running: dict[Any, tuple[Any, Job, float]] = {}
        self.pending: deque[Job] = deque()
        self.unplaced = size
        self._next_actor = 0
        self._starved_since: float | None = None
        self._place()

    def _place(self) -> None:
        """Start the unplaced actors on the nodes that have room."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        while self.unplaced:
            node = self.placer.choose()
            if node is None:
                return
            strategy = NodeAffinitySchedulingStrategy(node, soft=False)
            actor = self._actor_cls.options(scheduling_strategy=strategy).remote(self._make,
                                                                                  f"worker-{self._next_actor}")
            self._next_actor += 1
            self.unplaced -= 1
            self.node_of[actor] = node
            self.idle.append(actor)

    def free(self) -> int:
        return max(0, len(self.idle) - len(self.pending))

    def submit(self, job: Job) -> None:
        self.pending.append(job)
        self._dispatch()

    def in_flight(self) -> list[Job]:
        return [j for _, j, _ in self.running.values()] + list(self.pending)

    def _dispatch(self) -> None:
        while self.idle and self.pending:
            actor = self.idle.pop()
            job = self.pending.popleft()
            ref = actor.evaluate.remote(job)
            self.running[ref] = (actor, job, time.monotonic())

    def _replace(self, actor: Any) -> None:
        with contextlib.suppress(Exception):  # already dead
            self.ray.kill(actor, no_restart=True)
        self.placer.release(self.node_of.pop(actor, None))
        self.unplaced += 1
        self.placer.refresh(force=True)  # a lost node is no longer alive: its place is not reused
        self._place()

    def _starving(self) -> None:
        """No actor holds a job and jobs wait: look for room (nodes that joined), and give up after a while."""
        self.placer.refresh()
        self._place()
        self._dispatch()
        if self.running or not self.pending:
            self._starved_since = None
            return
        now = time.monotonic()
        if self._starved_since is None:
            self._starved_since = now
            log.warning("%d job(s) wait for a worker: no node that can hold one has room yet", len(self.pending))
        elif now - self._starved_since > UNPLACED_LIMIT_S:
            from evomerge.driver.nodes import node_label
            from evomerge.errors import EvomergeError

            bad = "; ".join(f"node {node_label(self.placer.nodes.get(n, {'NodeID': n}))}: {why}"
                            for n, why in self.placer.bad.items())
            raise EvomergeError(f"resources: no worker could be placed for {UNPLACED_LIMIT_S:.0f} s; no node of the "
                                f"cluster that sees the sources has the resources of one worker"
                                + (f" ({bad})" if bad else ""))
        time.sleep(STARVED_POLL_S)

    def wait(self, timeout: float | None = None) -> list[tuple[Job, EvalResult]]:
        from ray.exceptions import (
            GetTimeoutError,
            NodeDiedError,
            ObjectLostError,
            RayActorError,
            WorkerCrashedError,
        )

        if not self.running:
            if self.pending:
                self._starving()
            return []
        if self.unplaced:
            self.placer.refresh()
            self._place()
            self._dispatch()
        step = 1.0 if self.timeout_s or self.unplaced else timeout
        done, _ = self.ray.wait(list(self.running), num_returns=1, timeout=step)
        out: list[tuple[Job, EvalResult]] = []
        for ref in done:
            actor, job, _ = self.running.pop(ref)
            try:
                result = self.ray.get(ref)
                self.idle.append(actor)
                out.append((job, result))
            except (RayActorError, WorkerCrashedError, NodeDiedError, ObjectLostError, GetTimeoutError) as exc:
                self._replace(actor)
                if job.attempt < MAX_RETRIES:
                    log.warning("worker died on candidate %d (%s); resubmitting", job.candidate_id, type(exc).__name__)
                    self.pending.appendleft(replace(job, attempt=job.attempt + 1))
                else:
                    out.append((job, _failed(job, f"worker died {job.attempt + 1} times: {exc}")))
        if self.timeout_s:
            now = time.monotonic()
            for ref, (actor, job, start) in list(self.running.items()):
                if now - start > self.timeout_s:
                    del self.running[ref]
                    self._replace(actor)
                    out.append((job, _failed(job, f"timed out after {self.timeout_s:.0f} s")))
        self._dispatch()
        return out

    def close(self) -> None:
        for actor in self.idle + [a for a, _, _ in self.running.values()]:
            with contextlib.suppress(Exception):
                self.ray.kill(actor, no_restart=True)
            self.placer.release(self.node_of.pop(actor, None))
        self.idle, self.running, self.unplaced = [], {}, 0


def _failed(job: Job, error: str) -> EvalResult:
    return EvalResult(candidate_id=job.candidate_id, status="failed", error=error, fidelity=job.fidelity)


class _ActorWorker:
    """Ray actor body: builds its evaluator once (sources resident), then evaluates jobs."""

    def __init__(self, make_evaluator: Callable[[], Evaluator], name: str) -> None:
        import ray

        # the node in the name: an archived result says where it was computed (``worker-3@1a2b3c4d``)
        self.name = f"{name}@{ray.get_runtime_context().get_node_id()[:8]}"
        self.evaluator = make_evaluator()

    def evaluate(self, job: Job) -> EvalResult:
        res = self.evaluator.evaluate(job)
        return replace(res, worker=self.name)
