"""Fisher-weighted averaging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
arXiv 2111.09832); no mergekit equivalent.

Each model's entries are weighted by its diagonal Fisher ``F_i`` (``stats["fisher"]``, from the statistics
pass of :mod:`evomerge.merge.stats` on that model) and by its per-model weight ``w_i`` (the paper's
``lambda_i``, a gene of the search):

    merged = sum_i w_i F'_i theta_i / sum_i w_i F'_i,   F'_i = F_i + floor * mean(F)

with ``theta_i = base + d_i`` (computed as ``base + sum_i w_i F'_i d_i / sum_i w_i F'_i``) and ``mean(F)``
the mean of every model's Fisher over this tensor. The floor (the paper's ``fisher_floor``, here relative to
the tensor's mean Fisher so it does not depend on the loss's scale) keeps entries no model's Fisher sees at the
``w``-weighted task-vector average instead of 0/0. Equal Fishers give exactly the weighted average
``base + sum_i w_i d_i / sum_i w_i``; the result is unchanged when every ``w_i`` is scaled alike. As in the
paper the base model itself is not averaged in (the sources are the fine-tuned models).

``scale`` ``s_i`` (default 1: the paper's merge) multiplies model ``i``'s task vector before the average,
``base + sum_i w_i F'_i s_i d_i / sum_i w_i F'_i``: the paper's average gives each task vector about ``1/n`` of
its size, where merges of task vectors need them near full size (task arithmetic's ``lambda``). With equal
Fishers the scaled merge is task arithmetic with weights ``s_i w_i / sum_j w_j``. The tensors merged by the
fallback get the same scaled task vectors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.arguments import Arguments, check_range, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method

__all__ = ["fisher"]


@merge_method(
    "fisher",
    params=[
        ParamSpec("weight", "source", 1.0, (0.0, 1.0), doc="this model's coefficient lambda_i (scale-free)"),
        ParamSpec("scale", "source", 1.0, (0.0, 3.0), doc="coefficient of this model's task vector (1: the paper's)"),
        ParamSpec("floor", "global", 1e-6, (0.0, 1e-2),
                  doc="Fisher floor, relative to the tensor's mean Fisher (the paper's fisher_floor)"),
    ],
    min_models=1,
    mergekit_name=None,
    stats=("fisher",),
)
def fisher(base: torch.Tensor, deltas: torch.Tensor, args: Arguments, *,
           stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Fisher-weighted averaging: each entry averaged with the models' Fishers as weights."""
    weights = args.floats("weight")
    check_range("fisher", "weight", weights, 0.0, float("inf"))
    if sum(weights) <= 0:
        raise ConfigError(f"fisher: the weights {weights} sum to 0")
    scales = args.floats("scale")
    floor = args.num("floor")
    check_range("fisher", "floor", [floor], 0.0, float("inf"))
    cd = work_dtype(base.dtype)
    f = stats["fisher"].to(device=base.device, dtype=cd)
    if f.shape != deltas.shape:
        raise ValueError(f"fisher: statistics of shape {tuple(f.shape)} for deltas of shape {tuple(deltas.shape)}")
    w = torch.tensor(weights, dtype=cd, device=base.device).reshape(-1, *([1] * base.dim()))
    mean = f.mean()
    if floor > 0 and mean > 0:
        f = f + floor * mean
    elif not bool((f.sum(0) > 0).all()):  # no floor to lean on: entries no Fisher sees take the plain average
        f = f + torch.finfo(cd).tiny
    wf = f.mul_(w)
    s = torch.tensor(scales, dtype=cd, device=base.device).reshape(-1, *([1] * base.dim()))
    merged = (wf * deltas.to(cd) * s).sum(0).div_(wf.sum(0))
    return merged.add_(base.to(cd)).to(base.dtype)
