"""The JSON form of a numpy Generator's state, so that a resumed run draws what the first one would have.

Any bit generator reads back exactly. Integers of 2**53 or more are written as hex strings (JSON readers
may hold numbers as doubles), numpy arrays as ``{"__ndarray__": [...], "dtype": "<u8"}`` and numpy
scalars as plain numbers. Reading accepts states written with plain large integers too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["rng_from_json", "rng_to_json"]


def rng_to_json(gen: np.random.Generator) -> dict[str, Any]:
    """The JSON-safe state of ``gen``; :func:`rng_from_json` continues from it."""
    state: dict[str, Any] = _encode(gen.bit_generator.state)
    return state


def rng_from_json(state: Mapping[str, Any]) -> np.random.Generator:
    """A new Generator continuing exactly where the one given to :func:`rng_to_json` stood.

    Raises ValueError when ``state`` names no numpy bit generator.
    """
    decoded = _decode(dict(state))
    name = decoded.get("bit_generator")
    cls = getattr(np.random, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, np.random.BitGenerator)):
        raise ValueError(f"RNG state names an unknown bit generator {name!r}")
    bit_gen = cls()
    bit_gen.state = decoded
    return np.random.Generator(bit_gen)


def _encode(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _encode(value.tolist()), "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return _encode(value.item())
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**53:
        return hex(value)
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(_decode(value["__ndarray__"]), dtype=np.dtype(value["dtype"]))
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, str) and value.startswith(("0x", "-0x")):
        return int(value, 16)
    return value
