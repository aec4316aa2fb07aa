"""The archive: every evaluation a run ever made, in one append-only SQLite file.

Layout (``schema_version`` 1):

* ``meta(key, value)``: ``format`` = ``evomerge.archive``, ``schema_version``, ``created``, ``evomerge``.
* ``evaluations``: one row per evaluation, ``seq`` = 0, 1, 2 … in order of append; candidate id,
  recipe hash + YAML, genome (JSON list of floats), status, error, fidelity, split, timings (JSON),
  worker, created time, meta (JSON) and ``n_tasks`` (how many ``task_scores`` rows belong to it).
* ``example_sets(id, digest, example_ids)``: each distinct list of example ids, stored once (JSON).
* ``task_scores``: one row per (evaluation, task): metric, mean, the example set, and the per-example
  scores as a little-endian float64 blob. A blob round-trips bit for bit (NaN included), takes 8 bytes
  per example instead of ~20 for JSON text, and the example ids, which repeat in every evaluation of
  a task at a fidelity, are not repeated.

Durability: the database runs in WAL mode with ``synchronous=FULL``. Each :meth:`Archive.append` is one
transaction, so a process killed mid-write leaves only complete evaluations. ``FULL`` syncs the WAL at
every commit; that costs about a millisecond per evaluation (which takes seconds to minutes) and
guarantees that an evaluation counted by a later checkpoint's cursor survives even a power loss,
which ``NORMAL`` does not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from evomerge import __version__
from evomerge.errors import CheckpointError
from evomerge.recipe import Recipe
from evomerge.types import Candidate, EvalResult, TaskScores

logger = logging.getLogger(__name__)

FORMAT = "evomerge.archive"
SCHEMA_VERSION = 1
SPLITS = ("calibration", "test")

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE evaluations (
    seq INTEGER PRIMARY KEY,
    candidate_id INTEGER NOT NULL,
    recipe_hash TEXT NOT NULL,
    recipe_yaml TEXT NOT NULL,
    genome TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    error TEXT,
    fidelity TEXT NOT NULL,
    split TEXT NOT NULL,
    timings TEXT NOT NULL,
    worker TEXT,
    created REAL NOT NULL,
    meta TEXT NOT NULL,
    n_tasks INTEGER NOT NULL
);
CREATE INDEX evaluations_cache ON evaluations (recipe_hash, fidelity, split);
CREATE TABLE example_sets (
    id INTEGER PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    example_ids TEXT NOT NULL
);
CREATE TABLE task_scores (
    seq INTEGER NOT NULL REFERENCES evaluations (seq),
    pos INTEGER NOT NULL,
    task TEXT NOT NULL,
    metric TEXT NOT NULL,
    mean REAL,
    example_set INTEGER NOT NULL REFERENCES example_sets (id),
    scores BLOB NOT NULL,
    PRIMARY KEY (seq, pos)
);
"""

_EVAL_COLUMNS = (
    "seq, candidate_id, recipe_hash, recipe_yaml, genome, status, error, fidelity, split, "
    "timings, worker, created, meta, n_tasks"
)


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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=_json_default, separators=(",", ":"))


def mean_of_tasks(means: Mapping[str, float]) -> float:
    """The default scalarization: the unweighted mean of the per-task means (NaN if there are none)."""
    return float(np.mean(list(means.values()))) if means else float("nan")


class _TaskRow(NamedTuple):
    task: str
    metric: str
    mean: float | None
    ids: str
    digest: str
    blob: bytes


def _encode_task(name: str, ts: TaskScores) -> _TaskRow:
    scores = np.asarray(ts.scores)
    if scores.ndim != 1:
        raise ValueError(f"task {name!r}: scores must be 1-D, got shape {scores.shape}")
    if len(ts.example_ids) != len(scores):
        raise ValueError(f"task {name!r}: {len(ts.example_ids)} example ids for {len(scores)} scores")
    ids = _dumps([str(i) for i in ts.example_ids])
    mean = ts.mean
    return _TaskRow(
        task=name,
        metric=ts.metric,
        mean=mean if math.isfinite(mean) else None,
        ids=ids,
        digest=hashlib.sha256(ids.encode()).hexdigest(),
        blob=np.ascontiguousarray(scores, dtype="<f8").tobytes(),
    )


def _to_record(row: sqlite3.Row, tasks: dict[str, TaskScores]) -> Record:
    result = EvalResult(
        candidate_id=row["candidate_id"],
        status=row["status"],
        tasks=tasks,
        error=row["error"],
        timings=json.loads(row["timings"]),
        worker=row["worker"],
        fidelity=row["fidelity"],
    )
    return Record(
        seq=row["seq"],
        candidate_id=row["candidate_id"],
        recipe_hash=row["recipe_hash"],
        recipe_yaml=row["recipe_yaml"],
        genome=np.asarray(json.loads(row["genome"]), dtype=np.float64),
        result=result,
        split=row["split"],
        created=row["created"],
        meta=json.loads(row["meta"]),
    )


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
            self.schema_version = self._check_meta(tables)

    def _configure(self) -> None:
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("archive %s: the file system refused WAL mode (journal_mode=%s)", self.path, mode)
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")

    def _create(self) -> None:
        with self._transaction():
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [
                    ("format", FORMAT),
                    ("schema_version", str(SCHEMA_VERSION)),
                    ("created", repr(time.time())),
                    ("evomerge", __version__),
                ],
            )
        logger.debug("created archive %s", self.path)

    def _check_meta(self, tables: set[str]) -> int:
        if "meta" not in tables:
            raise CheckpointError(f"archive {self.path} is a SQLite file but not an evomerge archive")
        meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"archive {self.path} is a SQLite file but not an evomerge archive")
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            raise CheckpointError(
                f"archive {self.path}: unreadable schema_version {meta.get('schema_version')!r}"
            ) from None
        if version > SCHEMA_VERSION:
            raise CheckpointError(
                f"archive {self.path} has schema_version {version}, newer than this evomerge "
                f"({__version__}) reads ({SCHEMA_VERSION}); upgrade evomerge"
            )
        if version < 1:
            raise CheckpointError(f"archive {self.path}: unknown schema_version {version}")
        return version

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
        genome = np.asarray(candidate.genome, dtype=np.float64)
        rows = [_encode_task(name, ts) for name, ts in result.tasks.items()]
        row = (
            int(candidate.id),
            recipe.hash,
            recipe.to_yaml(),
            _dumps(genome.tolist()),
            result.status,
            result.error,
            result.fidelity,
            split,
            _dumps({k: float(v) for k, v in result.timings.items()}),
            result.worker,
            time.time(),
            _dumps({**candidate.meta, **(meta or {})}),
            len(rows),
        )
        with self._lock, self._transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq) + 1, 0) FROM evaluations").fetchone()[0]
            db.execute(
                f"INSERT INTO evaluations ({_EVAL_COLUMNS}) VALUES (?, {', '.join('?' * 13)})", (seq, *row)
            )
            for pos, task_row in enumerate(rows):
                self._insert_scores(db, seq, pos, task_row)
        logger.debug(
            "archive %s: appended seq %d (candidate %d, %s)", self.path, seq, candidate.id, result.status
        )
        return int(seq)

    @staticmethod
    def _insert_scores(db: sqlite3.Connection, seq: int, pos: int, row: _TaskRow) -> None:
        db.execute(
            "INSERT OR IGNORE INTO example_sets (digest, example_ids) VALUES (?, ?)", (row.digest, row.ids)
        )
        (set_id,) = db.execute("SELECT id FROM example_sets WHERE digest = ?", (row.digest,)).fetchone()
        db.execute(
            "INSERT INTO task_scores (seq, pos, task, metric, mean, example_set, scores) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, pos, row.task, row.metric, row.mean, set_id, row.blob),
        )

    # ------------------------------------------------------------------ reading
    def _where(self, *, status: str | None, fidelity: str | None, split: str | None) -> tuple[str, list[Any]]:
        clauses, args = [], []
        for column, value in (("status", status), ("fidelity", fidelity), ("split", split)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args

    def _decode(self, rows: list[sqlite3.Row]) -> list[Record]:
        if not rows:
            return []
        task_rows: dict[int, list[sqlite3.Row]] = {}
        for t in self._db.execute(
            "SELECT seq, task, metric, example_set, scores FROM task_scores WHERE seq BETWEEN ? AND ? "
            "ORDER BY seq, pos",
            (rows[0]["seq"], rows[-1]["seq"]),
        ):
            task_rows.setdefault(t["seq"], []).append(t)
        id_sets: dict[int, tuple[str, ...]] = {}
        out = []
        for row in rows:
            mine = task_rows.get(row["seq"], [])
            if len(mine) != row["n_tasks"]:
                raise CheckpointError(
                    f"archive {self.path}: evaluation {row['seq']} has {len(mine)} of its {row['n_tasks']} task rows"
                )
            tasks: dict[str, TaskScores] = {}
            for t in mine:
                if t["example_set"] not in id_sets:
                    (ids,) = self._db.execute(
                        "SELECT example_ids FROM example_sets WHERE id = ?", (t["example_set"],)
                    ).fetchone()
                    id_sets[t["example_set"]] = tuple(json.loads(ids))
                scores = np.frombuffer(t["scores"], dtype="<f8").astype(np.float64)
                tasks[t["task"]] = TaskScores(id_sets[t["example_set"]], scores, metric=t["metric"])
            out.append(_to_record(row, tasks))
        return out

    def _select(self, where: str, args: Sequence[Any], tail: str = "ORDER BY seq") -> list[Record]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_EVAL_COLUMNS} FROM evaluations{where} {tail}", args).fetchall()
            return self._decode(rows)

    def records(
        self, status: str | None = None, fidelity: str | None = None, split: str | None = "calibration"
    ) -> list[Record]:
        """Stored evaluations in order of ``seq``, filtered by status / fidelity / split (None: any)."""
        return self._select(*self._where(status=status, fidelity=fidelity, split=split))

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
        where, args = self._where(status=status, fidelity=fidelity, split=split)
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
