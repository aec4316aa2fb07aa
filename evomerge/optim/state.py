"""JSON-safe encodings of optimizer state: opaque blobs and candidates.

Blobs are base64 text; candidates are ``{"id", "genome", "meta"}`` with read-only genomes. Generator
states are encoded by :mod:`evomerge.rng`.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from evomerge.errors import OptimizerError
from evomerge.evaluation import Candidate

__all__ = [
    "candidate_from_json",
    "candidate_to_json",
    "decode_blob",
    "encode_blob",
    "frozen_array",
]


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
