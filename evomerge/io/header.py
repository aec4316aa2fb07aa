"""safetensors headers: tensor names, dtypes, shapes and byte ranges, read without any tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
``{"dtype", "shape", "data_offsets"}`` (plus an optional ``__metadata__``), then the tensor data.
:func:`read_header` checks the header against the file size, so a truncated or corrupt file is a
:class:`~evomerge.errors.SourceError` naming the file before any tensor is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import SourceError

__all__ = ["DTYPES", "TensorInfo", "read_header"]

#: A header larger than this is taken as corruption (the safetensors format caps it at 100 MB).
_MAX_HEADER_BYTES = 100_000_000
#: safetensors dtype codes -> torch dtypes (codes a given torch build lacks are skipped).
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr)
    for code, attr in {
        "F64": "float64",
        "F32": "float32",
        "F16": "float16",
        "BF16": "bfloat16",
        "I64": "int64",
        "I32": "int32",
        "I16": "int16",
        "I8": "int8",
        "U64": "uint64",
        "U32": "uint32",
        "U16": "uint16",
        "U8": "uint8",
        "BOOL": "bool",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E8M0": "float8_e8m0fnu",
    }.items()
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's safetensors header entry: where it is, its dtype and shape, its data size in bytes."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse the header of safetensors ``file`` (no tensor data is read).

    Raises :class:`~evomerge.errors.SourceError` naming the file when it is truncated or corrupt.
    """
    try:
        size = file.stat().st_size
        with file.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise SourceError(f"{file}: truncated safetensors file ({size} bytes, no header)")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(size - 8, _MAX_HEADER_BYTES):
                raise SourceError(
                    f"{file}: corrupt or truncated safetensors file (header claims {header_len} bytes, "
                    f"file has {size})"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise SourceError(f"{file}: cannot read safetensors file: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{file}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise SourceError(f"{file}: corrupt safetensors header: not a JSON object")
    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if not all(isinstance(d, int) and d >= 0 for d in shape) or not 0 <= begin <= end:
                raise ValueError("bad shape or offsets")
        except (TypeError, KeyError, ValueError) as exc:
            raise SourceError(f"{file}: corrupt safetensors header entry for tensor {name!r}") from exc
        if code not in DTYPES:
            raise SourceError(f"{file}: tensor {name!r} has dtype {code}, which this torch cannot load")
        if end > data_size:
            raise SourceError(
                f"{file}: truncated safetensors file (tensor {name!r} ends at byte {end} of the data, "
                f"which holds only {data_size} bytes)"
            )
        infos[name] = TensorInfo(name, file, DTYPES[code], shape, begin, end - begin)
    return infos
