"""The run's event log: one JSON object per line (JSONL), e.g. ``{"t": 1732440000.1, "event": "eval", ...}``.

Each line is written and flushed on its own, so a crash loses at most the line being written. Reading
back drops an unfinished last line; reopening a log to continue it first cuts such a line off (or ends
a complete one that lost only its newline), so the next event starts on a line of its own. Values are plain JSON: numpy scalars and arrays become
numbers and lists, tuples become lists, and non-finite floats (NaN, ±inf) become ``null`` so that
any JSON reader accepts the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

import numpy as np

from evomerge.errors import CheckpointError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} cannot be written to the event log")


def _repair_tail(path: Path) -> None:
    """Make ``path`` end with a newline: end a complete last line, or cut off an unfinished one."""
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return
        keep, pos = 0, end
        while pos > 0:
            start = max(0, pos - _CHUNK)
            f.seek(start)
            nl = f.read(pos - start).rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        f.seek(keep)
        tail = f.read()
        try:
            complete = isinstance(json.loads(tail), dict)
        except (UnicodeDecodeError, json.JSONDecodeError):
            complete = False
        if complete:
            f.write(b"\n")
        else:
            logger.warning("event log %s: dropping an unfinished last line (%d bytes)", path, end - keep)
            f.truncate(keep)


class EventLog:
    """An append-only JSONL event log at ``path`` (created, or continued if it exists)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.exists():
            _repair_tail(self.path)
        self._lock = threading.Lock()
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append ``{"t": now, "event": event, **fields}`` as one flushed line and return what was written."""
        record: dict[str, Any] = _plain({"t": time.time(), "event": event, **fields})
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            if self._file is None:
                raise ValueError(f"event log {self.path} is closed")
            self._file.write(line)
            self._file.flush()
        return record

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """Every event of the log at ``path``, in order.

    The last line is dropped if a crash left it unfinished (it is not valid JSON). Any other line
    that is not a JSON object raises :class:`CheckpointError` naming the file and line.
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise CheckpointError(f"event log {p}: cannot read ({e})") from e
    lines = [(n, line) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    events: list[dict[str, Any]] = []
    for i, (number, line) in enumerate(lines):
        try:
            event = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logger.warning("event log %s: ignoring the unfinished last line %d", p, number)
                continue
            raise CheckpointError(f"event log {p}, line {number}: not JSON ({e})") from e
        if not isinstance(event, dict):
            raise CheckpointError(f"event log {p}, line {number}: not a JSON object")
        events.append(event)
    return events
