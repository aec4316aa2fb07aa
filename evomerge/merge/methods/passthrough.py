"""Passthrough (mergekit ``passthrough``): one model's tensor, optionally multiplied by ``scale``.

The single model is the reference (``base``) and its ``scale`` comes in ``ref_sp``; layer stacking
("frankenmerges") is expressed by the recipe's routing, not by this method.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.arguments import Arguments, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method

__all__ = ["passthrough"]


@merge_method(
    "passthrough",
    params=[ParamSpec("scale", "source", None, (0.0, 2.0), doc="multiplies the model's tensor (unset: 1)")],
    needs_base=False,
    min_models=0,
    max_models=0,
)
def passthrough(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """Passthrough: the one model's tensor times its ``scale`` (when set)."""
    scale = args.ref.get("scale") if args.ref is not None else None
    if scale is None:
        return base.clone()
    return torch.mul(base.to(work_dtype(base.dtype)), float(scale)).to(base.dtype)
