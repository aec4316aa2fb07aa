"""Linear merge (model soups, arXiv 2203.05482; mergekit ``linear``): a weighted average of full weights.

``sum_i w_i theta_i / sum_i w_i`` (without ``normalize``: the plain weighted sum). With no
``base_model`` the first listed model is the reference: ``base`` is its tensor and ``ref_sp`` its
parameters, so it contributes with its own weight; with ``ref_sp=None`` the base only anchors the
task vectors and does not contribute. Computed as ``base + sum_i w_i d_i / W`` (``W base + sum_i w_i d_i``
without ``normalize``), which equals mergekit's formula up to rounding. Weights that sum to 0 with
``normalize`` raise :class:`~evomerge.errors.ConfigError` (mergekit would divide by zero).
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.arguments import Arguments, work_dtype
from evomerge.merge.methods.base import FusedPlan, ParamSpec, merge_method
from evomerge.merge.methods.task_vectors import Rows, weighted_sum

__all__ = ["linear", "weight_total"]


def weight_total(args: Arguments, dtype: torch.dtype) -> float:
    """Sum of the contributing weights (the reference's own, when it contributes, and each source's) in ``dtype``.

    Raises :class:`ConfigError` when no model contributes, or when the sum is 0 and ``normalize`` is set.
    """
    contributing = ([float(args.ref["weight"])] if args.ref is not None else []) + args.floats("weight")  # type: ignore[arg-type]
    if not contributing:
        raise ConfigError("linear: no model to merge")
    total = float(torch.tensor(contributing, dtype=dtype).sum())
    if args.flag("normalize") and total == 0:
        raise ConfigError(f"linear: the weights {contributing} sum to 0, cannot normalize")
    return total


def _fused_plan(args: Arguments, cd: torch.dtype) -> FusedPlan:
    weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
    total = weight_total(args, cd)
    if args.flag("normalize"):
        return FusedPlan(weights, None, 1.0, total, 1.0)
    return FusedPlan(weights, None, total, 1.0, 1.0)


@merge_method(
    "linear",
    params=[
        ParamSpec("weight", "source", None, (0.0, 1.0), required=True, doc="weight of this model in the average"),
        ParamSpec("normalize", "global", True, doc="divide by the sum of the weights"),
    ],
    needs_base=False,
    min_models=0,
    fused=_fused_plan,
)
def linear(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """Linear: weighted average of the models' tensors."""
    cd = work_dtype(base.dtype)
    weights = args.floats("weight")
    total = weight_total(args, cd)
    normalize = args.flag("normalize")
    mixed = weighted_sum(Rows(deltas, torch.tensor(weights, dtype=cd).tolist(), cd))
    if normalize:
        mixed.div_(total).add_(base)
    else:
        mixed.add_(torch.mul(base.to(cd), total))
    return mixed.to(base.dtype)
