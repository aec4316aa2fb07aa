"""One run folder, one driver: ``RUN/driver.lock`` is held (``flock``) while a driver runs there.

The lock is the kernel's, so a driver killed by SIGKILL or a crashed node frees it with its process; the
file's content (pid, host, start time) names the holder in the refusal of a second driver, and a non-empty file
found free is the stale lock of a driver that died, which is taken over (and said so).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from evomerge.errors import RunFolderError

log = logging.getLogger(__name__)

LOCK_FILE = "driver.lock"


class RunLock:
    """Context manager holding ``run_dir/driver.lock`` (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunFolderError(f"run folder {self.path.parent}: cannot create {LOCK_FILE} ({exc})") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunFolderError(f"run folder {self.path.parent} is in use by a live driver ({holder}); "
                                 "wait for it to finish or stop it first") from None
        previous = _read(fd)
        if previous:
            log.warning("taking over the lock of a driver that is gone (%s)", _describe(previous))
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)  # an empty file left behind: released cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _read(fd: int) -> dict[str, object]:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, object]) -> str:
    since = info.get("since")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')}{when}"


def holder(run_dir: str | Path) -> dict[str, object] | None:
    """Who holds (or, killed, last held) ``run_dir``'s lock: pid, host, since and, on this host, whether that
    process is alive; None when no driver holds it. Reads the file only: never takes the lock."""
    path = Path(run_dir) / LOCK_FILE
    try:
        text = path.read_text()
        info = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        try:
            os.kill(info["pid"], 0)
            info["alive"] = True
        except ProcessLookupError:
            info["alive"] = False
        except PermissionError:
            info["alive"] = True
    return info
