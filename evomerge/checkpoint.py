"""Checkpoints: the run state (optimizer, RNG, driver counters) saved atomically in the run folder.

A checkpoint is one JSON document, ``<run_dir>/checkpoint.json``::

    {"format": "evomerge.checkpoint", "schema_version": 1, "checksum": "sha256:<hex>",
     "payload": {"created": <unix time>, "cursor": <evaluations in the archive>,
                 "state": {...}, "blobs": {}}}

``checksum`` is the SHA-256 of the payload serialized canonically (sorted keys, no spaces), so a
truncated, edited or damaged file is detected. ``state`` must be JSON-safe (dicts with string keys,
lists, str, int, float, bool, None; NaN and infinities are allowed) so that it reads back exactly;
opaque third-party objects (a pickled CMA-ES) are base64 text inside it (see :mod:`evomerge.optim.state`).
``blobs`` is always written empty and never read: it keeps the document readable by versions that
required it.

Saving writes a temporary file in the same folder, fsyncs it, moves the current checkpoint to
``checkpoint.prev.json`` and the new file into place with ``os.replace``. A crash at any step leaves
either the new checkpoint, or the old one (as ``checkpoint.json`` or, between the two renames, as
``checkpoint.prev.json``, which loading then uses).

``cursor`` is the number of evaluations the archive held when the state was taken. On resume the
archive must hold at least that many; it may hold more (evaluations finished after the checkpoint are
found again by the archive's cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "evomerge.checkpoint"
SCHEMA_VERSION = 1
CHECKPOINT_FILE = "checkpoint.json"
PREVIOUS_FILE = "checkpoint.prev.json"
_TMP_PREFIX = ".checkpoint."
_TMP_SUFFIX = ".tmp"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint as read back: the state, the archive cursor and where it came from."""

    state: dict[str, Any]
    cursor: int
    created: float
    path: Path
    schema_version: int


# ---------------------------------------------------------------------- JSON safety
def check_json_safe(value: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the path of the first value that would not read back identically."""
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if type(value) is not int:
            raise TypeError(f"{where}: {type(value).__name__} is not JSON-safe; convert it with int()")
        return
    if isinstance(value, float):
        if type(value) is not float:
            raise TypeError(f"{where}: {type(value).__name__} is not JSON-safe; convert it with float()")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_json_safe(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string (it would read back as {str(key)!r})")
            check_json_safe(item, f"{where}[{key!r}]")
        return
    hint = "; use a list" if isinstance(value, tuple) else ""
    raise TypeError(f"{where}: {type(value).__name__} is not JSON-safe{hint}")


def _canonical(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


# ---------------------------------------------------------------------- saving
def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | Path,
    state: Mapping[str, Any],
    *,
    cursor: int,
) -> Path:
    """Write ``state`` atomically as ``run_dir/checkpoint.json``; return its path.

    ``cursor`` is the number of evaluations in the archive that this state accounts for. The
    previous checkpoint is kept as ``checkpoint.prev.json``. ``TypeError`` if ``state`` is not
    JSON-safe (the message names the offending path).
    """
    folder = Path(run_dir)
    state = dict(state)
    check_json_safe(state)
    if isinstance(cursor, bool) or not isinstance(cursor, (int, np.integer)) or cursor < 0:
        raise ValueError(f"cursor must be a non-negative int, got {cursor!r}")
    payload = {"created": time.time(), "cursor": int(cursor), "state": state, "blobs": {}}
    body = _canonical(payload)
    document = {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "checksum": "sha256:" + hashlib.sha256(body).hexdigest(),
        "payload": payload,
    }
    data = json.dumps(document, sort_keys=True, indent=1, allow_nan=True).encode() + b"\n"

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{_TMP_PREFIX}*{_TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    current, previous = folder / CHECKPOINT_FILE, folder / PREVIOUS_FILE
    tmp = folder / f"{_TMP_PREFIX}{os.getpid()}.{secrets.token_hex(4)}{_TMP_SUFFIX}"
    try:
        _write_file(tmp, data)
        if current.exists():
            os.replace(current, previous)
        os.replace(tmp, current)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    logger.debug("checkpoint %s: cursor %d, %d bytes", current, cursor, len(data))
    return current


# ---------------------------------------------------------------------- loading
def _parse(path: Path) -> Checkpoint:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"checkpoint {path}: cannot read ({e})") from e
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or not JSON ({e})") from e
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an evomerge checkpoint (no format {FORMAT!r})")
    version = document.get("schema_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"checkpoint {path}: unknown schema_version {version!r}")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has schema_version {version}, newer than this evomerge reads "
            f"({SCHEMA_VERSION}); upgrade evomerge"
        )
    payload = document.get("payload")
    if not isinstance(payload, dict):
        raise CheckpointError(f"checkpoint {path}: missing payload")
    digest = "sha256:" + hashlib.sha256(_canonical(payload)).hexdigest()
    if document.get("checksum") != digest:
        raise CheckpointError(f"checkpoint {path} is corrupt: checksum mismatch")
    try:
        cursor, state, created = payload["cursor"], payload["state"], float(payload["created"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: malformed payload ({e})") from e
    if not isinstance(cursor, int) or cursor < 0 or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: malformed payload (cursor {cursor!r})")
    if not math.isfinite(created):
        raise CheckpointError(f"checkpoint {path}: malformed payload (created {created!r})")
    return Checkpoint(state, cursor, created, path, version)


def read_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    """The latest checkpoint of ``run_dir``, or None if it has none.

    When ``checkpoint.json`` is missing but ``checkpoint.prev.json`` exists (a crash between the two
    renames of a save), the previous one is returned. A corrupt, truncated or foreign file raises
    :class:`CheckpointError` naming it; it is never skipped silently.
    """
    folder = Path(run_dir)
    current, previous = folder / CHECKPOINT_FILE, folder / PREVIOUS_FILE
    if current.exists():
        try:
            return _parse(current)
        except CheckpointError as e:
            if previous.exists():
                raise CheckpointError(
                    f"{e}; the previous checkpoint {previous} may be used by moving it over {current}"
                ) from e
            raise
    if previous.exists():
        logger.warning("checkpoint %s is missing; resuming from %s", current, previous)
        return _parse(previous)
    return None


def check_cursor(ckpt: Checkpoint, archive_len: int) -> None:
    """Raise :class:`CheckpointError` unless the archive holds at least ``ckpt.cursor`` evaluations."""
    if archive_len < ckpt.cursor:
        raise CheckpointError(
            f"checkpoint {ckpt.path} accounts for {ckpt.cursor} evaluations but the archive holds only "
            f"{archive_len}: the archive is not the one this checkpoint was taken with"
        )
    if archive_len > ckpt.cursor:
        logger.info(
            "archive holds %d evaluations after checkpoint %s (cursor %d); they will be reused from the cache",
            archive_len - ckpt.cursor,
            ckpt.path,
            ckpt.cursor,
        )
