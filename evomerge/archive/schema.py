"""The archive's on-disk format: SQL schema, meta checks and row encoding / decoding.

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

Everything here is a pure function of rows and values; :class:`evomerge.archive.store.Archive` owns the
connection, the transactions and the lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from evomerge import __version__
from evomerge.errors import CheckpointError
from evomerge.evaluation import Candidate, EvalResult, TaskScores
from evomerge.recipe import Recipe

FORMAT = "evomerge.archive"
SCHEMA_VERSION = 1

SCHEMA = """
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

EVAL_COLUMNS = (
    "seq, candidate_id, recipe_hash, recipe_yaml, genome, status, error, fidelity, split, "
    "timings, worker, created, meta, n_tasks"
)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def dumps(obj: Any) -> str:
    """Compact JSON text of ``obj`` (numpy arrays and scalars, tuples and sets become JSON values)."""
    return json.dumps(obj, default=_json_default, separators=(",", ":"))


# --------------------------------------------------------------------------- creating / checking
def create_tables(db: sqlite3.Connection) -> None:
    """Create the tables and write the ``meta`` rows (inside the caller's transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)
    db.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?)",
        [
            ("format", FORMAT),
            ("schema_version", str(SCHEMA_VERSION)),
            ("created", repr(time.time())),
            ("evomerge", __version__),
        ],
    )


def check_meta(db: sqlite3.Connection, path: Path, tables: set[str]) -> int:
    """The ``schema_version`` of an existing archive; :class:`CheckpointError` naming ``path`` if unreadable."""
    if "meta" not in tables:
        raise CheckpointError(f"archive {path} is a SQLite file but not an evomerge archive")
    meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"archive {path} is a SQLite file but not an evomerge archive")
    try:
        version = int(meta.get("schema_version", ""))
    except ValueError:
        raise CheckpointError(
            f"archive {path}: unreadable schema_version {meta.get('schema_version')!r}"
        ) from None
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"archive {path} has schema_version {version}, newer than this evomerge "
            f"({__version__}) reads ({SCHEMA_VERSION}); upgrade evomerge"
        )
    if version < 1:
        raise CheckpointError(f"archive {path}: unknown schema_version {version}")
    return version


# --------------------------------------------------------------------------- encoding
class TaskRow(NamedTuple):
    """One task's scores, encoded for the ``task_scores`` and ``example_sets`` tables."""

    task: str
    metric: str
    mean: float | None
    ids: str
    digest: str
    blob: bytes


def encode_task(name: str, ts: TaskScores) -> TaskRow:
    """Encode one task's scores (``ValueError`` naming the task if they are not 1-D or ids mismatch)."""
    scores = np.asarray(ts.scores)
    if scores.ndim != 1:
        raise ValueError(f"task {name!r}: scores must be 1-D, got shape {scores.shape}")
    if len(ts.example_ids) != len(scores):
        raise ValueError(f"task {name!r}: {len(ts.example_ids)} example ids for {len(scores)} scores")
    ids = dumps([str(i) for i in ts.example_ids])
    mean = ts.mean
    return TaskRow(
        task=name,
        metric=ts.metric,
        mean=mean if math.isfinite(mean) else None,
        ids=ids,
        digest=hashlib.sha256(ids.encode()).hexdigest(),
        blob=np.ascontiguousarray(scores, dtype="<f8").tobytes(),
    )


def encode_evaluation(
    candidate: Candidate,
    recipe: Recipe,
    result: EvalResult,
    split: str,
    meta: Mapping[str, Any] | None,
    n_tasks: int,
) -> tuple[Any, ...]:
    """The ``evaluations`` row of one evaluation, every column of :data:`EVAL_COLUMNS` but ``seq``."""
    genome = np.asarray(candidate.genome, dtype=np.float64)
    return (
        int(candidate.id),
        recipe.hash,
        recipe.to_yaml(),
        dumps(genome.tolist()),
        result.status,
        result.error,
        result.fidelity,
        split,
        dumps({k: float(v) for k, v in result.timings.items()}),
        result.worker,
        time.time(),
        dumps({**candidate.meta, **(meta or {})}),
        n_tasks,
    )


def insert_scores(db: sqlite3.Connection, seq: int, pos: int, row: TaskRow) -> None:
    """Insert one task row of evaluation ``seq``, storing its example-id set once."""
    db.execute(
        "INSERT OR IGNORE INTO example_sets (digest, example_ids) VALUES (?, ?)", (row.digest, row.ids)
    )
    (set_id,) = db.execute("SELECT id FROM example_sets WHERE digest = ?", (row.digest,)).fetchone()
    db.execute(
        "INSERT INTO task_scores (seq, pos, task, metric, mean, example_set, scores) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (seq, pos, row.task, row.metric, row.mean, set_id, row.blob),
    )


# --------------------------------------------------------------------------- decoding
def where_clause(*, status: str | None, fidelity: str | None, split: str | None) -> tuple[str, list[Any]]:
    """A `` WHERE …`` clause (empty when nothing is filtered) and its arguments."""
    clauses, args = [], []
    for column, value in (("status", status), ("fidelity", fidelity), ("split", split)):
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def decode_tasks(
    db: sqlite3.Connection, path: Path, rows: Sequence[sqlite3.Row]
) -> list[dict[str, TaskScores]]:
    """The per-task scores of each ``evaluations`` row in ``rows`` (ordered by ``seq``).

    Raises :class:`CheckpointError` naming ``path`` when an evaluation lacks some of its task rows.
    """
    if not rows:
        return []
    task_rows: dict[int, list[sqlite3.Row]] = {}
    for t in db.execute(
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
                f"archive {path}: evaluation {row['seq']} has {len(mine)} of its {row['n_tasks']} task rows"
            )
        tasks: dict[str, TaskScores] = {}
        for t in mine:
            if t["example_set"] not in id_sets:
                (ids,) = db.execute(
                    "SELECT example_ids FROM example_sets WHERE id = ?", (t["example_set"],)
                ).fetchone()
                id_sets[t["example_set"]] = tuple(json.loads(ids))
            scores = np.frombuffer(t["scores"], dtype="<f8").astype(np.float64)
            tasks[t["task"]] = TaskScores(id_sets[t["example_set"]], scores, metric=t["metric"])
        out.append(tasks)
    return out


def decode_result(row: sqlite3.Row, tasks: dict[str, TaskScores]) -> EvalResult:
    """The :class:`EvalResult` stored in an ``evaluations`` row, with its decoded task scores."""
    return EvalResult(
        candidate_id=row["candidate_id"],
        status=row["status"],
        tasks=tasks,
        error=row["error"],
        timings=json.loads(row["timings"]),
        worker=row["worker"],
        fidelity=row["fidelity"],
    )


def decode_genome(row: sqlite3.Row) -> npt.NDArray[np.float64]:
    """The genome stored in an ``evaluations`` row."""
    return np.asarray(json.loads(row["genome"]), dtype=np.float64)
