"""Folders that appear whole or not at all: write into a hidden sibling, then swap it into place."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from evomerge.errors import ConfigError


@contextlib.contextmanager
def atomic_folder(target: str | Path, *, overwrite: bool, what: str = "folder") -> Iterator[Path]:
    """Yield an empty hidden sibling of ``target`` to write into; on success it replaces ``target``.

    A crash or an error while writing leaves ``target`` as it was (the sibling is removed on errors, and a
    sibling left by a killed process is removed by the next call). ``target`` existing without ``overwrite`` is
    a :class:`~evomerge.errors.ConfigError`.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        raise ConfigError(f"{what} {target} already exists (overwrite it explicitly)")
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.parent / f".{target.name}.tmp-{os.getpid()}-old"
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
