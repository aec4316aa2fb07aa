"""The archive: every evaluation a run ever made, in one append-only SQLite file.

The tables and the row encoding are described in :mod:`evomerge.archive.schema`.

Durability: the database runs in WAL mode with ``synchronous=FULL``. Each :meth:`Archive.append` is one
transaction, so a process killed mid-write leaves only complete evaluations. ``FULL`` syncs the WAL at
every commit; that costs about a millisecond per evaluation (which takes seconds to minutes) and
guarantees that an evaluation counted by a later checkpoint's cursor survives even a power loss,
which ``NORMAL`` does not.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from evomerge.archive.schema import (
    EVAL_COLUMNS,
    FORMAT,
    SCHEMA_VERSION,
    check_meta,
    create_tables,
    decode_genome,
    decode_result,
    decode_tasks,
    encode_evaluation,
    encode_task,
    insert_scores,
    where_clause,
)
from evomerge.errors import CheckpointError
from evomerge.evaluation import Candidate, EvalResult
from evomerge.names import SPLITS
from evomerge.recipe import Recipe

logger = logging.getLogger(__name__)

__all__ = ["FORMAT", "SCHEMA_VERSION", "Archive", "Record", "mean_of_tasks"]


@dataclass(frozen=True)
class Record:
    """One stored evaluation, as read back from the archive."""

    seq: int
    candidate_id: int
    recipe_hash: str
    recipe_yaml: str
    genome: npt.NDArray[np.float64]
    result: EvalResult
    split: str
    created: float
    meta: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def recipe(self) -> Recipe:
        """The parsed recipe (parsed on first use: most readers only need the scores)."""
        return Recipe.from_yaml(self.recipe_yaml)

    @property
    def ok(self) -> bool:
        return self.result.ok


def mean_of_tasks(means: Mapping[str, float]) -> float:
    """The default scalarization: the unweighted mean of the per-task means (NaN if there are none)."""
    return float(np.mean(list(means.values()))) if means else float("nan")


class Archive:
    """An append-only SQLite archive of evaluations (see the module docstring).

    ``Archive(path)`` creates the file or continues an existing one (resume). ``readonly=True`` opens
    an existing archive without ever writing to it. An archive from a newer evomerge, or a file that
    is not an evomerge archive, raises :class:`CheckpointError` naming the file.
    """

    def __init__(self, path: str | Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly and not self.path.is_file():
            raise CheckpointError(f"archive {self.path} does not exist")
        try:
            if readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        except sqlite3.Error as e:
            raise CheckpointError(f"archive {self.path}: cannot open ({e})") from e
        try:
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA busy_timeout = 10000")
            self._setup()
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise CheckpointError(f"archive {self.path}: not a readable SQLite database ({e})") from e
        except BaseException:
            self._db.close()
            raise

    # ------------------------------------------------------------------ opening
    def _setup(self) -> None:
        tables = {r[0] for r in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            if self.readonly:
                raise CheckpointError(f"archive {self.path} is empty (not an evomerge archive)")
            self._configure()
            self._create()
            self.schema_version = SCHEMA_VERSION
        else:
            if not self.readonly:
                self._configure()
            self.schema_version = check_meta(self._db, self.path, tables)

    def _configure(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("archive %s: the file system refused WAL mode (journal_mode=%s)", self.path, mode)
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")

    def _create(self) -> None:
        with self._transaction() as db:
            create_tables(db)
        logger.debug("created archive %s", self.path)

    # ------------------------------------------------------------------ writing
    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction, rolled back on any exception."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def append(
        self,
        candidate: Candidate,
        recipe: Recipe,
        result: EvalResult,
        *,
        split: str = "calibration",
        meta: Mapping[str, Any] | None = None,
    ) -> int:
        """Store one evaluation in one transaction and return its sequence number.

        The stored meta is ``candidate.meta`` updated with ``meta``. ``result.candidate_id`` must be
        ``candidate.id`` (a cached result reused for a new candidate is re-labelled by the caller).
        """
        if self.readonly:
            raise CheckpointError(f"archive {self.path} is open read-only")
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        if result.status not in ("ok", "failed"):
            raise ValueError(f"result.status {result.status!r} is not 'ok' or 'failed'")
        if result.candidate_id != candidate.id:
            raise ValueError(
                f"result.candidate_id {result.candidate_id} differs from candidate.id {candidate.id}"
            )
        rows = [encode_task(name, ts) for name, ts in result.tasks.items()]
        row = encode_evaluation(candidate, recipe, result, split, meta, len(rows))
        with self._lock, self._transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM evaluations").fetchone()[0]
            db.execute(
                f"INSERT INTO evaluations ({EVAL_COLUMNS}) VALUES (?, {', '.join('?' * 13)})", (seq, *row)
            )
            for pos, task_row in enumerate(rows):
                self._insert_scores(db, seq, pos, task_row)
        logger.debug(
            "archive %s: appended seq %d (candidate %d, %s)", self.path, seq, candidate.id, result.status
        )
        return int(seq)

    _insert_scores = staticmethod(insert_scores)

    # ------------------------------------------------------------------ reading
    def _decode(self, rows: list[sqlite3.Row]) -> list[Record]:
        return [
            Record(
                seq=row["seq"],
                candidate_id=row["candidate_id"],
                recipe_hash=row["recipe_hash"],
                recipe_yaml=row["recipe_yaml"],
                genome=decode_genome(row),
                result=decode_result(row, tasks),
                split=row["split"],
                created=row["created"],
                meta=json.loads(row["meta"]),
            )
            for row, tasks in zip(rows, decode_tasks(self._db, self.path, rows), strict=True)
        ]

    def _select(self, where: str, args: Sequence[Any], tail: str = "ORDER BY seq") -> list[Record]:
        with self._lock:
            rows = self._db.execute(f"SELECT {EVAL_COLUMNS} FROM evaluations{where} {tail}", args).fetchall()
            return self._decode(rows)

    def records(
        self, status: str | None = None, fidelity: str | None = None, split: str | None = "calibration"
    ) -> list[Record]:
        """Stored evaluations in order of ``seq``, filtered by status / fidelity / split (None: any)."""
        return self._select(*where_clause(status=status, fidelity=fidelity, split=split))

    def get(self, seq: int) -> Record:
        """The evaluation with sequence number ``seq`` (``KeyError`` if there is none)."""
        found = self._select(" WHERE seq = ?", (seq,))
        if not found:
            raise KeyError(f"archive {self.path} has no evaluation {seq}")
        return found[0]

    def lookup(
        self, recipe_hash: str, fidelity: str, split: str = "calibration", *, include_failed: bool = True
    ) -> EvalResult | None:
        """The cached result of a recipe at a fidelity, or None if it was never evaluated there.

        The first successful evaluation wins; without one, the first failed evaluation is returned
        (a deterministic failure is not retried) unless ``include_failed`` is False.
        """
        where = " WHERE recipe_hash = ? AND fidelity = ? AND split = ?"
        if not include_failed:
            where += " AND status = 'ok'"
        found = self._select(
            where, (recipe_hash, fidelity, split), "ORDER BY status = 'ok' DESC, seq LIMIT 1"
        )
        return found[0].result if found else None

    def __len__(self) -> int:
        return self.count()

    def count(
        self, status: str | None = None, *, fidelity: str | None = None, split: str | None = None
    ) -> int:
        """How many evaluations match (None: any). ``len(archive)`` counts all of them."""
        where, args = where_clause(status=status, fidelity=fidelity, split=split)
        with self._lock:
            return int(self._db.execute(f"SELECT COUNT(*) FROM evaluations{where}", args).fetchone()[0])

    def best(
        self,
        scalarize: Callable[[dict[str, float]], float] | None = None,
        *,
        fidelity: str | None = None,
        split: str = "calibration",
    ) -> Record | None:
        """The successful evaluation with the highest ``scalarize(task_means)`` (default: their mean).

        Ties go to the earliest evaluation; evaluations scalarized to NaN are ignored. None if no
        successful evaluation matches.
        """
        score = scalarize or mean_of_tasks
        best: Record | None = None
        best_value = -math.inf
        for record in self.records(status="ok", fidelity=fidelity, split=split):
            value = float(score(record.result.task_means()))
            if not math.isnan(value) and (best is None or value > best_value):
                best, best_value = record, value
        return best

    # ------------------------------------------------------------------ closing
    def close(self) -> None:
        """Close the connection (the last writer's close folds the WAL back into the file)."""
        with self._lock:
            self._db.close()

    def __enter__(self) -> Archive:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Archive({str(self.path)!r}, readonly={self.readonly})"
