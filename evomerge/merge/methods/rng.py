"""Seeded random generators for randomized merge methods (DARE, DELLA).

Every tensor gets its own CPU ``torch.Generator`` seeded from ``(recipe seed, tensor name)`` through a
stable hash (blake2b), so a tensor's random mask does not depend on which other tensors were merged
before it, on the process, on ``PYTHONHASHSEED`` or on the device the merge runs on (methods draw on
the CPU and move the draws to the tensor's device). :func:`tensor_seed` itself needs only the standard
library.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["tensor_generator", "tensor_seed"]


def tensor_seed(seed: int, tensor_name: str) -> int:
    """A 64-bit seed derived from the recipe seed and the tensor name (stable across runs and machines)."""
    blob = f"{int(seed)}\x00{tensor_name}".encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "little")


def tensor_generator(seed: int, tensor_name: str) -> torch.Generator:
    """A fresh CPU generator for one tensor of one recipe (see :func:`tensor_seed`)."""
    import torch

    gen = torch.Generator(device="cpu")
    gen.manual_seed(tensor_seed(seed, tensor_name))
    return gen
