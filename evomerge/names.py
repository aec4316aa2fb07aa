"""The names shared across the package: module kinds, data splits and weight dtypes.

Each vocabulary is spelled here once; configs, recipes, search spaces, the archive and the scorers
import it. The module imports nothing from evomerge, so any layer may use it.
"""

from __future__ import annotations

from typing import Literal

#: What a tensor is inside a model (see :func:`evomerge.io.arch.tensor_role`); recipe parameters
#: may be overridden per kind (``{"attn": 0.3, "default": 0.5}``).
ModuleKind = Literal["embed", "attn", "mlp", "norm", "lm_head", "other"]
MODULE_KINDS: tuple[ModuleKind, ...] = ("embed", "attn", "mlp", "norm", "lm_head", "other")

#: The splits of a task's data: the search scores on ``calibration``; ``test`` is held out.
Split = Literal["calibration", "test"]
SPLITS: tuple[Split, ...] = ("calibration", "test")

#: The floating-point dtypes a merged model may be written in.
DType = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[DType, ...] = ("float32", "float16", "bfloat16")

__all__ = ["DTYPES", "MODULE_KINDS", "SPLITS", "DType", "ModuleKind", "Split"]
