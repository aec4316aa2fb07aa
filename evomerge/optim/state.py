"""JSON-safe encodings of optimizer state: numpy generators, opaque blobs and candidates.

Generator states write integers wider than 53 bits as hex strings (JSON readers may hold numbers as
doubles); blobs are base64 text; candidates are ``{"id", "genome", "meta"}`` with read-only genomes.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from evomerge.errors import OptimizerError
from evomerge.types import Candidate

logger = logging.getLogger(__name__)

__all__ = [
    "candidate_from_json",
    "candidate_to_json",
    "decode_blob",
    "encode_blob",
    "frozen_array",
    "rng_from_json",
    "rng_state_to_json",
]


def rng_state_to_json(rng: np.random.Generator) -> dict[str, Any]:
    """The generator's bit-generator state with integers wider than 53 bits written as hex strings."""
    return _ints_to_hex(rng.bit_generator.state)


def rng_from_json(state: Mapping[str, Any]) -> np.random.Generator:
    """A generator continuing where the one given to :func:`rng_state_to_json` stood."""
    decoded = _hex_to_ints(dict(state))
    name = decoded.get("bit_generator")
    bitgen_cls = getattr(np.random, str(name), None)
    if bitgen_cls is None:
        raise OptimizerError(f"state: unknown bit generator {name!r}")
    bitgen = bitgen_cls()
    bitgen.state = decoded
    return np.random.Generator(bitgen)


def _ints_to_hex(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _ints_to_hex(v) for k, v in obj.items()}
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, bool) and abs(int(obj)) >= 2**53:
        return hex(int(obj))
    return obj


def _hex_to_ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _hex_to_ints(v) for k, v in obj.items()}
    if isinstance(obj, str) and obj.startswith(("0x", "-0x")):
        return int(obj, 16)
    return obj


def encode_blob(data: bytes) -> str:
    """Opaque bytes (a third-party pickle) as base64 text."""
    return base64.b64encode(data).decode("ascii")


def decode_blob(text: str) -> bytes:
    """The bytes of :func:`encode_blob`; :class:`OptimizerError` if ``text`` is not base64."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise OptimizerError("state: field 'blob' is not valid base64") from exc


def frozen_array(values: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """A read-only float64 copy (candidate genomes cannot be changed after they are handed out)."""
    arr = np.array(values, dtype=np.float64)
    arr.setflags(write=False)
    return arr


def candidate_to_json(c: Candidate) -> dict[str, Any]:
    """A pending or best candidate as JSON-safe values (see :func:`candidate_from_json`)."""
    return {"id": c.id, "genome": c.genome.tolist(), "meta": c.meta}


def candidate_from_json(d: Mapping[str, Any]) -> Candidate:
    """The candidate written by :func:`candidate_to_json`, with a read-only genome."""
    return Candidate(id=int(d["id"]), genome=frozen_array(d["genome"]), meta=dict(d.get("meta", {})))
