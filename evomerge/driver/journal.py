"""The driver's journal: the archive as the record of every result, the replay on resume, the clock and stops.

While a run is *live*, each result the driver handles is appended to the archive (one transaction) before the
optimizer hears of it. A resumed run starts *replaying*: :meth:`Journal.restore` loads the archived results in
order, jobs the loop dispatches are held back, and :meth:`Journal.next_result` answers each wait with the next
archived result, which must belong to one of the jobs in flight (else the archive is not this run's and the
resume stops with an error naming the row). When the journal is exhausted, the jobs still in flight go to the
pool in the order they were dispatched and the run is live again.

The checkpoint (``checkpoint.json``) is written after each live result. Resume reads only the wall time used and,
if a time budget ran out, after how many results; the rest of it (optimizer state, references, counters) shows
the state to ``evomerge status`` and to anyone who compares runs.

Stops: the first Ctrl-C asks for a graceful stop (no new candidates; what is in flight finishes), a second one
or a SIGTERM abandons what is in flight (it is evaluated again after resume). A signal arriving during an archive
or checkpoint write, or inside the optimizer's code (:meth:`Journal.deferring_stops`), takes effect right after
it. Either way the checkpoint is saved and :class:`~evomerge.errors.RunStopped` says how to resume.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from evomerge.archive import Archive
from evomerge.archive.store import Record
from evomerge.checkpoint import check_cursor, read_checkpoint, save_checkpoint
from evomerge.driver.pool import Job, Pool
from evomerge.errors import CheckpointError, RunFolderError, RunStopped
from evomerge.evaluation import Candidate, EvalResult

log = logging.getLogger(__name__)

STATE_VERSION = 2
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Stop(BaseException):  # noqa: N818 - control flow, like KeyboardInterrupt (never caught as an Exception)
    """Unwinds the loop on a stop request; the driver saves and turns it into :class:`RunStopped`."""

    def __init__(self, signum: int, graceful: bool) -> None:
        super().__init__(signum)
        self.signum, self.graceful = signum, graceful

    def error(self, run_dir: Any) -> RunStopped:
        name = signal.Signals(self.signum).name
        how = "after the evaluations in flight finished" if self.graceful else "abandoning the evaluations in flight"
        return RunStopped(f"stopped by {name} {how}; nothing computed is lost: continue with "
                          f"`evomerge resume {run_dir}`", _SIGNAL_EXIT.get(self.signum, 1))


class Journal:
    """See the module docstring."""

    def __init__(self, run_dir: str | Path, archive: Archive, pool: Pool) -> None:
        self.run_dir, self.archive, self.pool = Path(run_dir), archive, pool
        self.rows: deque[Record] = deque()
        self.live = True
        self._ready: deque[tuple[Job, EvalResult]] = deque()
        self._replayed = False  # the result being handled came from the journal
        self._elapsed0 = 0.0
        self._t0 = time.monotonic()
        self.time_up_at: int | None = None
        self._state: dict[str, Any] = {}
        self._stop: Stop | None = None  # a graceful stop requested
        self._critical = 0
        self._abandon: Stop | None = None  # an abandon that arrived during a write

    # ------------------------------------------------------------------ resume
    def restore(self) -> None:
        ckpt = read_checkpoint(self.run_dir)
        n = len(self.archive)
        if ckpt is not None:
            check_cursor(ckpt, n)
            version = ckpt.state.get("state_version")
            if version not in (1, STATE_VERSION):
                raise CheckpointError(f"{ckpt.path}: checkpoint state_version {version} unsupported")
            self._elapsed0 = float(ckpt.state.get("elapsed", 0.0))
            self.time_up_at = ckpt.state.get("time_up_at")
        self.rows = deque(self.archive.records(split=None))
        self.live = not self.rows
        log.info("resuming %s: replaying %d archived results", self.run_dir, n)

    def _go_live(self, inflight: dict[int, tuple[Job, Candidate]]) -> None:
        self.live = True
        self._t0 = time.monotonic()
        for key in sorted(inflight):
            self.pool.submit(inflight[key][0])
        log.info("replay done: %d jobs in flight go to the pool", len(inflight))

    # ------------------------------------------------------------------ jobs and results
    def submit(self, job: Job) -> None:
        if self.live:
            self.pool.submit(job)

    def next_result(self, inflight: dict[int, tuple[Job, Candidate]]) -> tuple[Job, EvalResult]:
        """The next result of a job in flight: the next archived one while replaying, else the pool's."""
        if self.rows:
            row = self.rows.popleft()
            for job, _ in inflight.values():
                if (job.candidate_id, job.split) == (row.candidate_id, row.split) and job.answers(row.result.fidelity):
                    self._match(row, job)
                    self._replayed = True
                    return job, row.result
            self._diverged(row, "no job in flight is that evaluation")
        while not self._ready:
            self._ready.extend(self.pool.wait())
        return self._ready.popleft()

    def inline(self, job: Job, res: EvalResult) -> EvalResult:
        """A result the driver made without the pool (a recipe already scored): the archived copy while replaying."""
        if not self.rows:
            return res
        row = self.rows.popleft()
        if (row.candidate_id, row.result.fidelity, row.split) != (job.candidate_id, job.fidelity, job.split):
            self._diverged(row, f"expected the cached result of candidate {job.candidate_id}")
        self._match(row, job)
        self._replayed = True
        return row.result

    def _match(self, row: Record, job: Job) -> None:
        if row.recipe_hash != job.recipe.hash:
            self._diverged(row, f"its recipe {row.recipe_hash[:12]} differs from the replayed {job.recipe.hash[:12]}")

    def _diverged(self, row: Record, why: str) -> None:
        raise CheckpointError(
            f"{self.archive.path}: evaluation {row.seq} (candidate {row.candidate_id}, {row.result.fidelity}, "
            f"{row.split}) is not what this run evaluates at that point ({why}): the archive was written with "
            "another config, seed or evomerge version")

    def settle(self, inflight: dict[int, tuple[Job, Candidate]]) -> None:
        """After a result is handled: once the last archived result is replayed, the run is live again and the
        jobs still in flight go to the pool, in the order they were dispatched."""
        if not self.live and not self.rows:
            self._go_live(inflight)

    def record(self, cand: Candidate, job: Job, res: EvalResult, meta: dict[str, Any]) -> None:
        """Append a live result to the archive (a replayed one is there already)."""
        if self._replayed:
            self._replayed = False
            return
        with self._writing("archive.sqlite"):
            self.archive.append(cand, job.recipe, res, split=job.split, meta=meta)

    # ------------------------------------------------------------------ checkpoint and clock
    def elapsed(self) -> float:
        return self._elapsed0 + (time.monotonic() - self._t0 if self.live else 0.0)

    def time_up(self, budget_seconds: float | None, n_handled: int) -> bool:
        """Whether the time budget has run out; decided once, live, and kept in the checkpoint for replays."""
        if self.time_up_at is not None:
            return n_handled >= self.time_up_at
        if budget_seconds is None or not self.live or self.elapsed() <= budget_seconds:
            return False
        self.time_up_at = n_handled
        log.info("time budget of %.0f s used up", budget_seconds)
        self.checkpoint(self._state)
        return True

    def checkpoint(self, state: dict[str, Any]) -> None:
        """Save the checkpoint (live only: while replaying the one on disk stays the newest)."""
        self._state = state
        if not self.live:
            return
        full = {"state_version": STATE_VERSION, **state, "elapsed": self.elapsed(), "time_up_at": self.time_up_at}
        with self._writing("checkpoint.json"):
            save_checkpoint(self.run_dir, full, cursor=len(self.archive))

    def save(self, state: dict[str, Any]) -> None:
        """The checkpoint at the end of a run or at a stop (a failing write is logged, not raised)."""
        try:
            self.checkpoint(state)
        except RunFolderError as exc:
            log.error("%s", exc)

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        with self.deferring_stops():
            try:
                yield
            except (OSError, sqlite3.Error) as exc:
                raise RunFolderError(
                    f"run folder {self.run_dir}: cannot write {what} ({exc}); nothing stored before is lost: make "
                    f"room or fix permissions, then `evomerge resume {self.run_dir}`") from exc

    @contextlib.contextmanager
    def deferring_stops(self) -> Iterator[None]:
        """A stop that abandons the run (a second Ctrl-C, SIGTERM) and arrives inside this block takes effect
        right after it. The loop runs the optimizer's ask, tell and state inside one: libraries catch broadly
        (``cma`` pickles its state under a bare ``except:``), and an exception raised by the signal handler in
        their code would come out as some other error, or be swallowed."""
        self._critical += 1
        try:
            yield
        finally:
            self._critical -= 1
        if self._abandon is not None and not self._critical:
            stop, self._abandon = self._abandon, None
            raise stop

    # ------------------------------------------------------------------ stops
    @property
    def stopping(self) -> bool:
        """A graceful stop is in effect (only once live: a replay must ask what the original run asked)."""
        return self._stop is not None and self.live

    def stop_now_if_requested(self) -> None:
        if self.stopping:
            assert self._stop is not None
            raise self._stop

    def request_stop(self, signum: int = signal.SIGINT, _frame: Any = None) -> None:
        if signum == signal.SIGINT and self._stop is None:
            log.warning("stop requested: finishing the evaluations in flight (Ctrl-C again abandons them)")
            self._stop = Stop(signum, graceful=True)
            return
        stop = Stop(signum, graceful=False)
        if self._critical:
            self._abandon = stop
        else:
            raise stop

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Route SIGINT and SIGTERM to :meth:`request_stop` (main thread only)."""
        previous: dict[int, Any] = {}
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self.request_stop)
        except ValueError:  # not the main thread
            pass
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
