"""The SQLite archive: round trips, cache lookups, failures, crash safety, Pareto front and hypervolume."""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import signal
import sqlite3
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evomerge.archive import Archive, Record, hypervolume, hypervolume_history, pareto_front
from evomerge.errors import CheckpointError
from evomerge.evaluation import Candidate, EvalResult, TaskScores
from evomerge.recipe import ModelEntry, Recipe

DATA = Path(__file__).parent / "data"


def recipe(w: float, method: str = "linear") -> Recipe:
    return Recipe(
        method=method,
        models=(
            ModelEntry(model="a", parameters={"weight": w}),
            ModelEntry(model="b", parameters={"weight": 1 - w}),
        ),
        sources={"a": "/models/a", "b": "/models/b"},
    )


def ok_result(cid: int, means: dict[str, float], *, fidelity: str = "full", n: int = 4) -> EvalResult:
    """A result whose task ``t`` scores n examples, all equal to ``means[t]``."""
    tasks = {t: TaskScores(tuple(f"{t}-{i}" for i in range(n)), np.full(n, m)) for t, m in means.items()}
    return EvalResult(cid, "ok", tasks, fidelity=fidelity)


def failed_result(
    cid: int, error: str = "ScoreError: non-finite logits", fidelity: str = "full"
) -> EvalResult:
    return EvalResult(cid, "failed", error=error, fidelity=fidelity)


@pytest.fixture
def archive(tmp_path: Path):
    with Archive(tmp_path / "archive.sqlite") as a:
        yield a


# --------------------------------------------------------------------------- round trips
def test_round_trip_is_exact(archive: Archive) -> None:
    genome = np.array([0.1, 1 / 3, 1e-300, -0.0, np.nextafter(1.0, 0.0), 5e-324])
    scores_a = np.array([0.1, 0.2 + 1e-17, np.nan, -np.inf, 1 / 7])
    scores_b = np.array([np.nextafter(0.5, 1.0), 0.0])
    ids_a = tuple(f"q/{i} ünï" for i in range(5))
    rec = Recipe(
        method="ties",
        base_model="base",
        models=(
            ModelEntry(
                model="a", parameters={"weight": 0.3, "density": {"attn": [0.1, 0.9], "default": 0.5}}
            ),
            ModelEntry(model="b", parameters={"weight": 0.7}),
        ),
        parameters={"normalize": False},
        seed=11,
        dtype="bfloat16",
    )
    result = EvalResult(
        candidate_id=7,
        status="ok",
        tasks={
            "zeta": TaskScores(ids_a, scores_a, metric="f1"),
            "alpha": TaskScores(("x", "y"), scores_b, metric="exact_match"),
        },
        timings={"merge": 0.125, "score": 2.5, "total": 2.625},
        worker="node-3/gpu1",
        fidelity="subset:5",
    )
    before = time.time()
    seq = archive.append(
        Candidate(7, genome, meta={"generation": 2, "parents": [np.int64(1), 4]}),
        rec,
        result,
        meta={"sigma": np.float64(0.25)},
    )
    assert seq == 0
    (got,) = archive.records()
    assert isinstance(got, Record)
    assert got.seq == 0 and got.candidate_id == 7 and got.split == "calibration"
    assert before <= got.created <= time.time()
    assert got.recipe == rec and got.recipe_hash == rec.hash == got.recipe.hash
    assert got.genome.dtype == np.float64 and got.genome.tobytes() == genome.tobytes()
    assert got.meta == {"generation": 2, "parents": [1, 4], "sigma": 0.25}
    r = got.result
    assert (r.candidate_id, r.status, r.error, r.worker, r.fidelity) == (
        7,
        "ok",
        None,
        "node-3/gpu1",
        "subset:5",
    )
    assert r.timings == {"merge": 0.125, "score": 2.5, "total": 2.625}
    assert list(r.tasks) == ["zeta", "alpha"]  # insertion order kept
    assert r.tasks["zeta"].example_ids == ids_a and r.tasks["zeta"].metric == "f1"
    assert r.tasks["zeta"].scores.tobytes() == scores_a.tobytes()
    assert r.tasks["alpha"].scores.tobytes() == scores_b.tobytes()
    assert r.tasks["alpha"].example_ids == ("x", "y") and r.tasks["alpha"].metric == "exact_match"


def test_example_ids_stored_once_per_distinct_list(archive: Archive) -> None:
    for i in range(6):
        archive.append(
            Candidate(i, np.array([i / 10])),
            recipe(i / 10),
            ok_result(i, {"add": 0.5, "rev": 0.25}, fidelity="subset:4" if i % 2 else "full"),
        )
    db = sqlite3.connect(archive.path)
    try:
        assert db.execute("SELECT COUNT(*) FROM example_sets").fetchone()[0] == 2
        assert db.execute("SELECT COUNT(*) FROM task_scores").fetchone()[0] == 12
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_failed_evaluation_keeps_its_error(archive: Archive) -> None:
    archive.append(Candidate(0, np.array([0.5])), recipe(0.5), failed_result(0, "MaterializeError: NaN in w"))
    archive.append(Candidate(1, np.array([0.6])), recipe(0.6), ok_result(1, {"add": 1.0}))
    (failed,) = archive.records(status="failed")
    assert failed.result.status == "failed" and not failed.ok
    assert failed.result.error == "MaterializeError: NaN in w" and failed.result.tasks == {}
    assert archive.count(status="failed") == 1 and archive.count(status="ok") == 1 and len(archive) == 2


def test_filters_and_split(archive: Archive) -> None:
    archive.append(Candidate(0, np.zeros(1)), recipe(0.1), ok_result(0, {"t": 0.1}, fidelity="subset:2"))
    archive.append(Candidate(1, np.zeros(1)), recipe(0.1), ok_result(1, {"t": 0.2}, fidelity="full"))
    archive.append(Candidate(2, np.zeros(1)), recipe(0.1), ok_result(2, {"t": 0.3}), split="test")
    assert [r.seq for r in archive.records()] == [0, 1]
    assert [r.seq for r in archive.records(fidelity="full")] == [1]
    assert [r.seq for r in archive.records(split="test")] == [2]
    assert [r.seq for r in archive.records(split=None)] == [0, 1, 2]
    assert archive.count(split="test") == 1 and archive.count(fidelity="full") == 2
    assert archive.get(2).split == "test"
    with pytest.raises(KeyError):
        archive.get(3)


def test_lookup_by_hash_fidelity_and_split(archive: Archive) -> None:
    r1, r2 = recipe(0.3), recipe(0.7)
    archive.append(Candidate(0, np.zeros(1)), r1, failed_result(0, fidelity="subset:8"))
    assert archive.lookup(r1.hash, "subset:8").status == "failed"
    assert archive.lookup(r1.hash, "subset:8", include_failed=False) is None
    archive.append(Candidate(1, np.zeros(1)), r1, ok_result(1, {"t": 0.5}, fidelity="subset:8"))
    archive.append(Candidate(2, np.zeros(1)), r1, ok_result(2, {"t": 0.9}, fidelity="full"))
    archive.append(Candidate(3, np.zeros(1)), r1, ok_result(3, {"t": 0.4}, fidelity="full"), split="test")
    hit = archive.lookup(r1.hash, "subset:8")
    assert hit is not None and hit.candidate_id == 1 and hit.task_means() == {"t": 0.5}
    assert archive.lookup(r1.hash, "full").candidate_id == 2
    assert archive.lookup(r1.hash, "full", split="test").candidate_id == 3
    assert archive.lookup(r1.hash, "subset:16") is None
    assert archive.lookup(r2.hash, "full") is None
    # The hash ignores folder bindings: the same recipe with other paths is a cache hit.
    moved = r1.model_copy(update={"sources": {"a": "/elsewhere/a", "b": "/elsewhere/b"}})
    assert archive.lookup(moved.hash, "full").candidate_id == 2


def test_best(archive: Archive) -> None:
    assert archive.best() is None
    archive.append(Candidate(0, np.zeros(1)), recipe(0.1), ok_result(0, {"a": 0.9, "b": 0.1}))
    archive.append(Candidate(1, np.zeros(1)), recipe(0.2), ok_result(1, {"a": 0.6, "b": 0.6}))
    archive.append(Candidate(2, np.zeros(1)), recipe(0.3), failed_result(2))
    archive.append(Candidate(3, np.zeros(1)), recipe(0.4), ok_result(3, {"a": 0.7, "b": 0.5}))
    archive.append(Candidate(4, np.zeros(1)), recipe(0.5), ok_result(4, {"a": 1.0, "b": 1.0}), split="test")
    assert archive.best().seq == 1  # mean 0.6 beats 0.5 and 0.6 (seq 3 ties: earliest wins)
    assert archive.best(lambda m: m["a"]).seq == 0
    assert archive.best(lambda m: m["b"] - m["a"]).seq == 1
    assert archive.best(split="test").seq == 4
    assert archive.best(lambda m: math.nan) is None


def test_resume_continues_sequence(tmp_path: Path) -> None:
    path = tmp_path / "run" / "archive.sqlite"
    path.parent.mkdir()
    with Archive(path) as a:
        a.append(Candidate(0, np.zeros(2)), recipe(0.1), ok_result(0, {"t": 0.1}))
        a.append(Candidate(1, np.zeros(2)), recipe(0.2), ok_result(1, {"t": 0.2}))
    with Archive(path) as a:
        assert len(a) == 2
        assert a.append(Candidate(2, np.ones(2)), recipe(0.3), ok_result(2, {"t": 0.3})) == 2
        assert [r.candidate_id for r in a.records()] == [0, 1, 2]
    with Archive(path, readonly=True) as ro:
        assert len(ro) == 3
        with pytest.raises(CheckpointError, match="read-only"):
            ro.append(Candidate(3, np.ones(2)), recipe(0.4), ok_result(3, {"t": 0.4}))


def test_reader_sees_appends_of_a_live_writer(archive: Archive) -> None:
    archive.append(Candidate(0, np.zeros(1)), recipe(0.1), ok_result(0, {"t": 0.1}))
    with Archive(archive.path, readonly=True) as reader:
        assert len(reader) == 1
        archive.append(Candidate(1, np.zeros(1)), recipe(0.2), ok_result(1, {"t": 0.2}))
        assert [r.candidate_id for r in reader.records()] == [0, 1]


def test_bad_input_is_rejected_before_writing(archive: Archive) -> None:
    with pytest.raises(ValueError, match="candidate_id"):
        archive.append(Candidate(1, np.zeros(1)), recipe(0.1), ok_result(2, {"t": 0.1}))
    with pytest.raises(ValueError, match="'t'.*3 example ids for 2 scores"):
        archive.append(
            Candidate(0, np.zeros(1)),
            recipe(0.1),
            EvalResult(0, "ok", {"t": TaskScores(("a", "b", "c"), np.zeros(2))}),
        )
    with pytest.raises(ValueError, match="split"):
        archive.append(Candidate(0, np.zeros(1)), recipe(0.1), ok_result(0, {"t": 0.1}), split="train")
    assert len(archive) == 0


def test_error_mid_append_rolls_back(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    archive.append(Candidate(0, np.zeros(1)), recipe(0.1), ok_result(0, {"a": 0.1, "b": 0.2}))
    real = Archive._insert_scores
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(Archive, "_insert_scores", staticmethod(failing))
    with pytest.raises(OSError, match="disk full"):
        archive.append(Candidate(1, np.zeros(1)), recipe(0.2), ok_result(1, {"a": 0.3, "b": 0.4}))
    monkeypatch.undo()
    assert len(archive) == 1
    db = sqlite3.connect(archive.path)
    try:
        assert db.execute("SELECT COUNT(*) FROM task_scores").fetchone()[0] == 2
    finally:
        db.close()
    assert archive.append(Candidate(1, np.zeros(1)), recipe(0.2), ok_result(1, {"a": 0.3, "b": 0.4})) == 1


# --------------------------------------------------------------------------- refused files
def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "archive.sqlite"
    Archive(path).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    db.close()
    with pytest.raises(CheckpointError, match=r"archive\.sqlite.*schema_version 99"):
        Archive(path)


def test_foreign_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(CheckpointError, match="junk.sqlite"):
        Archive(junk)
    other = tmp_path / "other.sqlite"
    db = sqlite3.connect(other)
    with db:
        db.execute("CREATE TABLE users (name TEXT)")
    db.close()
    with pytest.raises(CheckpointError, match="other.sqlite.*not an evomerge archive"):
        Archive(other)
    with pytest.raises(CheckpointError, match="missing.sqlite"):
        Archive(tmp_path / "missing.sqlite", readonly=True)


# --------------------------------------------------------------------------- crash safety
N_TASKS = 6


def _writer(path: str, counter) -> None:  # runs in a child process until killed
    archive = Archive(path)
    i = 0
    while True:
        means = {f"task{j}": ((i * 7 + j) % 11) / 10 for j in range(N_TASKS)}
        archive.append(Candidate(i, np.array([i, i / 3])), recipe(i / 1000), ok_result(i, means, n=64))
        i += 1
        counter.value = i


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_killed_writer_leaves_only_complete_evaluations(tmp_path: Path) -> None:
    path = tmp_path / "archive.sqlite"
    Archive(path).close()
    ctx = multiprocessing.get_context("fork")
    counter = ctx.Value("i", 0, lock=False)
    proc = ctx.Process(target=_writer, args=(str(path), counter), daemon=True)
    proc.start()
    deadline = time.monotonic() + 60
    while counter.value < 25 and time.monotonic() < deadline and proc.is_alive():
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    acknowledged = counter.value
    assert acknowledged >= 25

    with Archive(path) as archive:
        records = archive.records()
        assert acknowledged <= len(records) <= acknowledged + 1
        for i, rec in enumerate(records):
            assert rec.seq == i and rec.candidate_id == i
            assert rec.genome.tolist() == [i, i / 3]
            assert rec.recipe == recipe(i / 1000)
            assert list(rec.result.tasks) == [f"task{j}" for j in range(N_TASKS)]
            for j, ts in enumerate(rec.result.tasks.values()):
                assert ts.scores.tolist() == [((i * 7 + j) % 11) / 10] * 64
        db = sqlite3.connect(path)
        try:
            assert db.execute("SELECT COUNT(*) FROM task_scores").fetchone()[0] == N_TASKS * len(records)
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            db.close()
        assert archive.append(
            Candidate(len(records), np.zeros(2)), recipe(0.5), ok_result(len(records), {"t": 1.0})
        ) == len(records)


# --------------------------------------------------------------------------- golden file
def test_golden_archive_v1_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "archive_v1.sqlite"
    shutil.copyfile(DATA / "archive_v1.sqlite", path)
    with Archive(path) as archive:
        assert len(archive) == 4 and archive.count(status="failed") == 1
        r0, r1, r2 = archive.records()
        assert r0.recipe.method == "linear" and r0.recipe.models[0].parameters == {"weight": 0.25}
        assert r0.recipe.sources == {"math": "zoo/math", "code": "zoo/code"}
        assert r0.genome.tolist() == [0.25, 0.75] and r0.meta == {"generation": 0}
        add, rev = r0.result.tasks["add"], r0.result.tasks["rev"]
        assert add.example_ids == ("add-0", "add-1", "add-2", "add-3") and add.metric == "exact_match"
        assert add.scores.tolist() == [1.0, 0.0, 1.0, 1.0] and rev.scores.tolist() == [0.5, 0.25]
        assert r0.result.timings == {"merge": 0.5, "score": 1.25, "total": 1.75}
        assert (r0.result.worker, r0.result.fidelity) == ("w0", "subset:4")
        assert r1.result.status == "failed" and "model.layers.0.mlp.up_proj.weight" in r1.result.error
        assert r2.recipe.method == "ties" and r2.recipe.seed == 7 and r2.recipe.base_model == "base"
        assert r2.recipe.models[0].parameters["density"] == {"attn": 0.3, "default": [0.2, 0.8]}
        assert list(r2.result.tasks) == ["rev", "add"] and r2.meta == {"generation": 1, "parents": [0, 1]}
        for rec in (r0, r1, r2):
            assert rec.recipe_hash == rec.recipe.hash  # recipe hashing must stay stable across versions
        (test_rec,) = archive.records(split="test")
        assert test_rec.result.tasks["add"].scores[0] == 1.0 and math.isnan(
            test_rec.result.tasks["add"].scores[1]
        )
        assert archive.lookup(r2.recipe.hash, "full").candidate_id == 2
        assert archive.best().seq == 2
        assert archive.append(Candidate(4, np.zeros(1)), recipe(0.5), ok_result(4, {"add": 1.0})) == 4


# --------------------------------------------------------------------------- Pareto front / HV
def _records(archive: Archive, points: list[tuple[float, float] | None]) -> list[Record]:
    for i, p in enumerate(points):
        res = failed_result(i) if p is None else ok_result(i, {"a": p[0], "b": p[1]})
        archive.append(Candidate(i, np.zeros(1)), recipe(i / 100), res)
    return archive.records()


def test_pareto_front_matches_hand_computed(archive: Archive) -> None:
    pts = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), None, (0.1, 0.9), (0.5, 0.5), (0.5, 0.45), (0.05, 0.9)]
    recs = _records(archive, pts)
    assert [r.seq for r in pareto_front(recs, ["a", "b"])] == [0, 1, 4]
    assert [r.seq for r in pareto_front(recs, ["a", "b"], keep_duplicates=True)] == [0, 1, 4, 5]
    assert [r.seq for r in pareto_front(recs, ["a"])] == [0]
    assert [r.seq for r in pareto_front(recs, ["b"])] == [4]
    assert pareto_front(recs, ["missing"]) == []


def test_hypervolume_hand_computed() -> None:
    pts = np.array([[0.9, 0.1], [0.5, 0.5], [0.1, 0.9], [0.4, 0.4]])
    # Union of the boxes [0, x] x [0, y]: 0.9*0.1 + 0.5*(0.5-0.1) + 0.1*(0.9-0.5).
    assert hypervolume(pts) == pytest.approx(0.33)
    # With ref (0.2, 0.2) only (0.5, 0.5) and (0.4, 0.4) improve on both: 0.3 * 0.3.
    assert hypervolume(pts, [0.2, 0.2]) == pytest.approx(0.09)
    # 3-D: boxes 1*1*0.5 and 0.5*0.5*1 overlap in 0.5*0.5*0.5.
    assert hypervolume([[1.0, 1.0, 0.5], [0.5, 0.5, 1.0]]) == pytest.approx(0.625)
    assert hypervolume(np.empty((0, 2))) == 0.0
    assert hypervolume([[0.5, np.nan], [0.5, 0.5]]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="3 values for 2 objectives"):
        hypervolume(pts, [0, 0, 0])


def test_hypervolume_history(archive: Archive) -> None:
    recs = _records(archive, [(0.9, 0.1), None, (0.5, 0.5), (0.4, 0.4), (0.1, 0.9)])
    history = hypervolume_history(recs, ["a", "b"])
    assert history == pytest.approx([0.09, 0.09, 0.29, 0.29, 0.33])
    assert hypervolume_history(recs, ["a", "b"], ref=0.2) == pytest.approx([0.0, 0.0, 0.09, 0.09, 0.09])
