"""Driver benchmark: worker utilization with simulated workers, and driver overhead per evaluation.

Runs the real :class:`~evomerge.driver.loop.Driver` (real optimizer, search space, SQLite archive,
checkpoint after every tell, event log) against a simulated pool of N workers whose evaluation times are
lognormal, on a virtual clock. Evaluations cost no real time, so:

* utilization = busy worker-time / (N x makespan), on the virtual clock;
* throughput = evaluations per virtual second; compared between steady-state (asynchronous optimizers:
  a new candidate the moment a worker frees up) and a generation barrier (CMA-ES with popsize = N);
* driver overhead = real wall time per evaluation spent in the driver (ask, decode, archive append,
  tell, checkpoint), reported beside the demo's measured evaluation time.

    python experiments/bench_driver.py [--workers 8] [--evals 400] [--sigma 0.5]
"""

from __future__ import annotations

import argparse
import heapq
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np

from evomerge.archive import Archive
from evomerge.driver.loop import Driver
from evomerge.driver.pool import Job
from evomerge.driver.records import Settings
from evomerge.evaluation import EvalResult, TaskScores
from evomerge.events import EventLog
from evomerge.optim import OPTIMIZERS
from evomerge.optim.base import Problem
from evomerge.spaces.base import SpaceModels, build_space
from evomerge.spaces.template import load_template

TASKS = ["t1", "t2"]


class SimulatedPool:
    """N workers on a virtual clock; evaluation times ~ lognormal(0, sigma) (median 1 s)."""

    def __init__(self, size: int, sigma: float, space, seed: int = 0) -> None:
        self.size = size
        self.sigma = sigma
        self.space = space
        self.rng = np.random.default_rng(seed)
        self.clock = 0.0
        self.running: list[tuple[float, int, Job, float]] = []
        self.queue: deque[Job] = deque()
        self.busy = 0.0
        self.done = 0
        self.genomes: dict[str, np.ndarray] = {}

    def free(self) -> int:
        return self.size - len(self.running) - len(self.queue)

    def _start(self, job: Job) -> None:
        dur = float(self.rng.lognormal(0.0, self.sigma))
        heapq.heappush(self.running, (self.clock + dur, job.key, job, dur))

    def submit(self, job: Job) -> None:
        if len(self.running) < self.size:
            self._start(job)
        else:
            self.queue.append(job)

    def wait(self, timeout=None):
        if not self.running:
            return []
        end, _, job, dur = heapq.heappop(self.running)
        self.clock = end
        self.busy += dur
        self.done += 1
        if self.queue:
            self._start(self.queue.popleft())
        g = self.genomes.get(job.recipe.hash)
        g = np.zeros(self.space.dim) if g is None else g
        a, b = np.full_like(g, 0.3), np.full_like(g, 0.7)
        scores = {"t1": 1 - np.mean((g - a) ** 2), "t2": 1 - np.mean((g - b) ** 2)}
        tasks = {t: TaskScores(tuple(f"{t}-{i}" for i in range(8)), np.full(8, s)) for t, s in scores.items()}
        return [(job, EvalResult(job.candidate_id, "ok", tasks, timings={"total": dur}))]

    def close(self) -> None:
        pass


class RecordingSpace:
    """Wraps a space so the simulated pool can score a recipe by its genome."""

    def __init__(self, space, pool_ref: dict) -> None:
        self.space = space
        self.pool_ref = pool_ref

    def __getattr__(self, name):
        return getattr(self.space, name)

    def decode(self, genome):
        r = self.space.decode(genome)
        self.pool_ref["pool"].genomes[r.hash] = np.asarray(genome)
        return r


def run_one(optimizer: str, options: dict, workers: int, evals: int, sigma: float, seed: int = 0) -> dict:
    models = SpaceModels(("base", "a", "b"), num_layers=8, base="base",
                         module_kinds=frozenset({"embed", "attn", "mlp", "norm", "lm_head"}))
    inner = build_space(load_template("builtin:ties-per-layer"), models)
    ref: dict = {}
    space = RecordingSpace(inner, ref)
    problem = Problem(inner.dim, inner.lower, inner.upper, inner.x0, tuple(TASKS))
    opt = OPTIMIZERS.get(optimizer)(problem, seed=seed, **options)
    pool = SimulatedPool(workers, sigma, inner, seed)
    ref["pool"] = pool
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        settings = Settings(tasks=TASKS, baselines=[], budget_evals=evals, budget_seconds=None, subset=None,
                            promote_quantile=1.0, rescore_test=False)
        drv = Driver(run_dir=run_dir, space=space, start=lambda scored, refs: (opt, None), pool=pool,
                     archive=Archive(run_dir / "archive.sqlite"), events=EventLog(run_dir / "events.jsonl"),
                     settings=settings)
        t0 = time.perf_counter()
        drv.run()
        wall = time.perf_counter() - t0
        drv.archive.close()
    return {
        "optimizer": optimizer, "options": options, "workers": workers, "evals": pool.done,
        "utilization": pool.busy / (workers * pool.clock), "throughput": pool.done / pool.clock,
        "overhead_ms": 1000 * wall / pool.done,
    }


def demo_overhead(run_dir: Path) -> dict:
    """Driver overhead of a real run: search-phase wall time not spent inside worker evaluations.

    The search phase runs from the first to the last searched evaluation event (events.jsonl timestamps);
    evaluation time is the sum of the workers' measured ``total`` per evaluation (merge + scoring).
    """
    from evomerge.events import read_events

    evs = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "eval" and e["candidate"] >= 0
           and e["split"] == "calibration"]
    if len(evs) < 3:
        raise SystemExit(f"{run_dir}: too few evaluations")
    # the window starts when the first searched evaluation *started*
    start = evs[0]["t"] - evs[0]["timings"]["total"]
    wall = evs[-1]["t"] - start
    busy = sum(e["timings"]["total"] for e in evs)
    merge = sum(e["timings"].get("merge", 0.0) for e in evs)
    return {"evals": len(evs), "wall_s": wall, "eval_s": busy, "merge_s": merge,
            "overhead": 1 - busy / wall, "per_eval_s": busy / len(evs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--evals", type=int, default=400)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--demo-eval-s", type=float, default=None,
                    help="measured seconds per evaluation in the demo, to express overhead as a share")
    ap.add_argument("--run", type=Path, default=None,
                    help="a finished run folder (e.g. runs/tiny-demo): report its measured driver overhead")
    args = ap.parse_args()
    if args.run is not None:
        d = demo_overhead(args.run)
        print(f"run {args.run}: {d['evals']} searched evaluations, search phase {d['wall_s']:.1f} s, inside "
              f"workers {d['eval_s']:.1f} s ({d['per_eval_s']:.3f} s per evaluation, merge {d['merge_s']:.1f} s); "
              f"driver overhead {100 * d['overhead']:.2f}% of the search phase")
        return
    w = args.workers
    rows = [
        run_one("cma_es", {"popsize": w}, w, args.evals, args.sigma),
        run_one("cma_es", {"popsize": 2 * w}, w, args.evals, args.sigma),
        run_one("cma_es", {"popsize": 4 * w}, w, args.evals, args.sigma),
        run_one("nevergrad", {"optimizer": "TwoPointsDE"}, w, args.evals, args.sigma),
        run_one("random", {}, w, args.evals, args.sigma),
    ]
    barrier = rows[0]["throughput"]
    print(f"{w} simulated workers, lognormal(0, {args.sigma}) evaluation times, {args.evals} evaluations\n")
    print("| optimizer | options | utilization | throughput (evals/virtual s) | vs generation barrier | driver ms/eval |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['options']} | {r['utilization']:.3f} | {r['throughput']:.3f} | "
              f"{r['throughput'] / barrier:.2f}x | {r['overhead_ms']:.1f} |")
    if args.demo_eval_s:
        ms = np.mean([r["overhead_ms"] for r in rows])
        print(f"\ndriver overhead per evaluation {ms:.1f} ms = {100 * ms / 1000 / args.demo_eval_s:.2f}% of a "
              f"{args.demo_eval_s:.2f} s demo evaluation")


if __name__ == "__main__":
    main()
