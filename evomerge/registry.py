"""One generic registry for every pluggable backend (merge methods, scorers, optimizers, spaces).

Entries register by name; a name collision is an error, an unknown name lists the valid ones, heavy
backends can be registered lazily as ``"module:attr"`` strings and imported on first use, and every
entry declares capabilities so tests and callers select by flag rather than by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from evomerge.errors import ConfigError

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    name: str
    obj: T | None
    target: str | None
    capabilities: frozenset[str] = field(default_factory=frozenset)


class Registry(Generic[T]):
    """A name -> object map with collision checks, lazy imports and capability flags."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, _Entry[T]] = {}

    def _add(self, entry: _Entry[T]) -> None:
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is already registered")
        self._entries[entry.name] = entry

    def register(
        self, name: str, *, capabilities: Iterable[str] = ()
    ) -> Callable[[T], T]:
        """Decorator: register ``obj`` under ``name``."""

        def deco(obj: T) -> T:
            self._add(_Entry(name, obj, None, frozenset(capabilities)))
            return obj

        return deco

    def add(self, name: str, obj: T, *, capabilities: Iterable[str] = ()) -> None:
        self._add(_Entry(name, obj, None, frozenset(capabilities)))

    def register_lazy(
        self, name: str, target: str, *, capabilities: Iterable[str] = ()
    ) -> None:
        """Register ``"package.module:attr"``, imported the first time ``get(name)`` is called."""
        self._add(_Entry(name, None, target, frozenset(capabilities)))

    def get(self, name: str) -> T:
        entry = self._entries.get(name)
        if entry is None:
            valid = ", ".join(sorted(self._entries)) or "(none)"
            raise ConfigError(f"unknown {self.kind} {name!r}; valid names: {valid}")
        if entry.obj is None:
            assert entry.target is not None
            module, _, attr = entry.target.partition(":")
            entry.obj = getattr(importlib.import_module(module), attr)
        return entry.obj  # type: ignore[return-value]

    def capabilities(self, name: str) -> frozenset[str]:
        self.get(name)
        return self._entries[name].capabilities

    def names(self, *, having: Iterable[str] = ()) -> list[str]:
        """Registered names, optionally only those declaring every capability in ``having``."""
        need = frozenset(having)
        return sorted(n for n, e in self._entries.items() if need <= e.capabilities)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
