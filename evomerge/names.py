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

#: The projections inside a layer's attention and MLP (see :func:`evomerge.io.arch.tensor_role`): a finer
#: vocabulary than the kinds, for per-projection parameters (``{"q": 0.2, "attn": 0.3, "default": 0.5}``; a
#: projection override wins over its kind's). Fused tensors (``qkv_proj``, ``gate_up_proj``, GPT-2's
#: ``c_attn``) have no projection: they take their kind's value.
Projection = Literal["q", "k", "v", "o", "gate", "up", "down"]
PROJECTIONS: tuple[Projection, ...] = ("q", "k", "v", "o", "gate", "up", "down")
#: The kind each projection belongs to.
PROJECTION_KIND: dict[str, ModuleKind] = {
    "q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp",
}
#: Every key a parameter override map may use besides ``default``: the kinds, then the projections.
PARAM_KEYS: tuple[str, ...] = MODULE_KINDS + PROJECTIONS

#: The splits of a task's data: the search scores on ``calibration``; ``test`` is held out.
Split = Literal["calibration", "test"]
SPLITS: tuple[Split, ...] = ("calibration", "test")

#: The floating-point dtypes a merged model may be written in.
DType = Literal["float32", "float16", "bfloat16"]
DTYPES: tuple[DType, ...] = ("float32", "float16", "bfloat16")

__all__ = [
    "DTYPES", "MODULE_KINDS", "PARAM_KEYS", "PROJECTIONS", "PROJECTION_KIND", "SPLITS", "DType", "ModuleKind",
    "Projection", "Split",
]
