"""Checkpoints (atomic save, corruption, cursor, RNG state) and the JSONL event log."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

import evomerge.checkpoint as ckpt_mod
from evomerge.checkpoint import (
    CHECKPOINT_FILE,
    PREVIOUS_FILE,
    check_cursor,
    read_checkpoint,
    save_checkpoint,
)
from evomerge.errors import CheckpointError
from evomerge.events import EventLog, read_events
from evomerge.rng import rng_from_json, rng_to_json

DATA = Path(__file__).parent / "data"


def test_round_trip(tmp_path: Path) -> None:
    state = {
        "optimizer": {"name": "cma_es", "mean": [0.1, 1 / 3, 5e-324], "sigma": 0.3},
        "best": -math.inf,
        "undefined": math.nan,
        "big": 2**127 + 1,
        "flags": [True, False, None],
        "text": 'niche ✓ \n "quoted"',
    }
    path = save_checkpoint(tmp_path, state, cursor=12)
    assert path == tmp_path / CHECKPOINT_FILE
    loaded = read_checkpoint(tmp_path)
    assert loaded is not None
    got_state = loaded.state
    assert math.isnan(got_state.pop("undefined"))
    assert got_state == {k: v for k, v in state.items() if k != "undefined"}
    assert got_state["optimizer"]["mean"][2] == 5e-324
    ck = read_checkpoint(tmp_path)
    assert ck.cursor == 12 and ck.schema_version == 1 and ck.path == path
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]


def test_missing_checkpoint_is_none(tmp_path: Path) -> None:
    assert read_checkpoint(tmp_path) is None
    assert read_checkpoint(tmp_path / "nope") is None


def test_previous_checkpoint_is_kept(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"generation": 1}, cursor=4)
    save_checkpoint(tmp_path, {"generation": 2}, cursor=8)
    assert read_checkpoint(tmp_path).state == {"generation": 2}
    prev = json.loads((tmp_path / PREVIOUS_FILE).read_text())
    assert prev["payload"]["state"] == {"generation": 1} and prev["payload"]["cursor"] == 4


def test_crash_while_writing_keeps_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, {"generation": 1}, cursor=4)

    def torn_write(path: Path, data: bytes) -> None:
        with open(path, "xb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("killed mid-write")

    monkeypatch.setattr(ckpt_mod, "_write_file", torn_write)
    with pytest.raises(OSError, match="mid-write"):
        save_checkpoint(tmp_path, {"generation": 2}, cursor=8)
    assert read_checkpoint(tmp_path).state == {"generation": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE]


def test_crash_between_renames_falls_back_to_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(tmp_path, {"generation": 1}, cursor=4)
    real_replace = os.replace
    calls: list[tuple[str, str]] = []

    def crash_on_second(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between the two renames
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"generation": 2}, cursor=8)
    monkeypatch.undo()
    assert not (tmp_path / CHECKPOINT_FILE).exists()
    ck = read_checkpoint(tmp_path)
    assert ck.state == {"generation": 1} and ck.path.name == PREVIOUS_FILE
    (tmp_path / ".checkpoint.999.beef.tmp").write_bytes(b"{}")  # what a SIGKILL would leave behind
    save_checkpoint(tmp_path, {"generation": 2}, cursor=8)
    assert read_checkpoint(tmp_path).state == {"generation": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_FILE, PREVIOUS_FILE]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda text: text[: len(text) // 2], "truncated or not JSON"),
        (lambda text: text.replace('"generation": 3', '"generation": 4'), "checksum mismatch"),
        (lambda text: json.dumps({"hello": "world"}), "not an evomerge checkpoint"),
        (lambda text: text.replace('"schema_version": 1', '"schema_version": 2'), "schema_version 2, newer"),
        (lambda text: "\x00\xff garbage", "truncated or not JSON"),
    ],
)
def test_damaged_checkpoint_names_the_file(tmp_path: Path, damage, message: str) -> None:
    save_checkpoint(tmp_path, {"generation": 3}, cursor=1)
    path = tmp_path / CHECKPOINT_FILE
    path.write_text(damage(path.read_text()))
    with pytest.raises(CheckpointError, match=message) as err:
        read_checkpoint(tmp_path)
    assert str(path) in str(err.value)


def test_damaged_checkpoint_points_at_previous(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"generation": 1}, cursor=1)
    save_checkpoint(tmp_path, {"generation": 2}, cursor=2)
    (tmp_path / CHECKPOINT_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=PREVIOUS_FILE.replace(".", r"\.")):
        read_checkpoint(tmp_path)


def test_cursor_must_not_exceed_archive(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, {"g": 1}, cursor=10)
    ck = read_checkpoint(tmp_path)
    check_cursor(ck, 10)
    check_cursor(ck, 13)
    with pytest.raises(CheckpointError, match="10 evaluations but the archive holds only 9"):
        check_cursor(ck, 9)
    with pytest.raises(ValueError, match="cursor"):
        save_checkpoint(tmp_path, {}, cursor=-1)


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"bounds": (0.0, 1.0)}, r"state\['bounds'\]: tuple.*use a list"),
        ({"niches": {0: [1]}}, r"state\['niches'\]: key 0"),
        ({"x": [1, np.float64(0.5)]}, r"state\['x'\]\[1\]: float64"),
        ({"n": np.int64(3)}, r"state\['n'\]: int64"),
        ({"a": np.zeros(2)}, r"state\['a'\]: ndarray"),
    ],
)
def test_state_must_be_json_safe(tmp_path: Path, state: dict, where: str) -> None:
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path, state, cursor=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("bit_generator", ["PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"])
def test_rng_state_round_trip(tmp_path: Path, bit_generator: str) -> None:
    gen = np.random.Generator(getattr(np.random, bit_generator)(2024))
    gen.random(7)
    gen.integers(0, 10, size=3)  # leaves a buffered uint32 behind in some generators
    save_checkpoint(tmp_path, {"rng": rng_to_json(gen)}, cursor=0)
    restored = rng_from_json(read_checkpoint(tmp_path).state["rng"])
    assert type(restored.bit_generator).__name__ == bit_generator
    assert restored.random(5).tolist() == gen.random(5).tolist()
    assert restored.integers(0, 1000, size=5).tolist() == gen.integers(0, 1000, size=5).tolist()


def test_rng_state_has_no_integer_a_double_would_round() -> None:
    state = rng_to_json(np.random.default_rng(7))
    assert isinstance(state["state"]["state"], str) and state["state"]["state"].startswith("0x")
    with pytest.raises(ValueError, match="unknown bit generator 'Nope'"):
        rng_from_json({**state, "bit_generator": "Nope"})


def test_golden_checkpoint_v1_still_reads() -> None:
    ck = read_checkpoint(DATA / "checkpoint_v1")
    assert ck is not None and ck.cursor == 4 and ck.schema_version == 1
    state = ck.state
    assert state["optimizer"] == {"name": "cma_es", "generation": 3, "sigma": 0.3, "mean": [0.25, 0.75]}
    assert state["next_candidate_id"] == 4 and state["best_fitness"] == -math.inf
    assert state["note"] == "résumé ✓"
    expected = np.random.default_rng(1234)
    expected.random(5)
    assert rng_from_json(state["rng"]).random(4).tolist() == expected.random(4).tolist()


# --------------------------------------------------------------------------- event log
def test_event_log_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.emit("start", run="demo", dims=np.int64(12))
        log.emit("eval", seq=0, means={"add": np.float64(0.5)}, genome=np.array([0.25, 0.5]), hv=math.nan)
        # Flushed per line: another reader sees both events before the log is closed.
        assert [e["event"] for e in read_events(path)] == ["start", "eval"]
    events = read_events(path)
    assert events[0]["run"] == "demo" and events[0]["dims"] == 12 and isinstance(events[0]["t"], float)
    assert events[1] == {**events[1], "seq": 0, "means": {"add": 0.5}, "genome": [0.25, 0.5], "hv": None}
    assert events[0]["t"] <= events[1]["t"]


def test_event_log_tolerates_truncated_last_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    with EventLog(path) as log:
        log.emit("eval", seq=0)
        log.emit("eval", seq=1)
    with open(path, "a") as f:
        f.write('{"t": 1.0, "event": "ev')  # a crash mid-line
    assert [e["seq"] for e in read_events(path)] == [0, 1]
    with EventLog(path) as log:  # continuing the log drops the unfinished line
        log.emit("eval", seq=2)
    assert [e["seq"] for e in read_events(path)] == [0, 1, 2]
    assert path.read_text().endswith("\n")


def test_event_log_keeps_complete_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"t": 1.0, "event": "eval", "seq": 0}\n{"t": 2.0, "event": "eval", "seq": 1}')
    assert [e["seq"] for e in read_events(path)] == [0, 1]
    with EventLog(path) as log:
        log.emit("eval", seq=2)
    assert [e["seq"] for e in read_events(path)] == [0, 1, 2]


def test_event_log_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "a"}\nnot json\n{"event": "b"}\n')
    with pytest.raises(CheckpointError, match="events.jsonl, line 2"):
        read_events(path)
    with pytest.raises(CheckpointError, match="missing.jsonl"):
        read_events(tmp_path / "missing.jsonl")
