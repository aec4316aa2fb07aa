"""Resolve built-in templates (``builtin:NAME``) from the installed package or the source tree."""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import ConfigError

_KINDS = ("search_spaces", "fitness", "configs")


def builtin_dir(kind: str) -> Path:
    """The folder holding built-in ``kind`` files: package data in a wheel, the repo folder in a checkout."""
    if kind not in _KINDS:
        raise ValueError(f"unknown builtin kind {kind!r}")
    pkg = Path(__file__).resolve().parent
    for candidate in (pkg / "_builtin" / kind, pkg.parent / kind):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"built-in folder {kind!r} not found next to the evomerge package")


def resolve(ref: str | Path, kind: str, *, base_dir: Path | None = None) -> Path:
    """Turn ``builtin:NAME`` or a path (relative to ``base_dir``) into an existing file path."""
    text = str(ref)
    if text.startswith("builtin:"):
        name = text.removeprefix("builtin:")
        folder = builtin_dir(kind)
        for cand in (folder / name, folder / f"{name}.yaml", folder / f"{name}.yml"):
            if cand.is_file():
                return cand
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ConfigError(f"no built-in {kind} named {name!r}; available: {', '.join(names) or '(none)'}")
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ConfigError(f"{kind} file not found: {path}")
    return path


def read_text(path: Path, *, error: type[ConfigError] = ConfigError) -> str:
    """The text of a UTF-8 file (a leading byte-order mark is dropped); anything else raises ``error``
    naming the file, the line and the byte offset of the first undecodable byte."""
    data = path.read_bytes()
    start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise error(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset {offset}); "
            "save the file as UTF-8"
        ) from None
