"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023,
arXiv 2212.09849); no mergekit equivalent.

For a linear layer ``y = x W^T`` (``W`` of shape ``(out, in)``) with each model's inputs ``X_i`` on the
calibration examples, RegMean is the least-squares merge ``argmin_W sum_i w_i ||X_i W^T - X_i W_i^T||^2``:

    W = (sum_i W_i G~_i) (sum_i G~_i)^-1,   G~_i = w_i (alpha G_i + (1 - alpha) diag(G_i))

with ``G_i = X_i^T X_i`` (``stats["gram"]``, from the statistics pass of :mod:`evomerge.merge.stats` on model
``i``) and ``alpha`` the paper's scaling of the off-diagonal terms (``alpha = 1``: the exact least-squares
solution; ``alpha = 0``: a per-input-channel weighted average). ``w_i`` (default 1) weighs each model's data.

``scale`` ``s_i`` (default 1: the paper's merge) multiplies model ``i``'s task vector before the least squares,
``W = base + (sum_i s_i d_i G~_i)(sum_i G~_i)^-1``: the paper averages full models, so each task vector enters at
about ``1/n`` of its size (equal Gram matrices give exactly ``base + sum_i w_i d_i / sum_i w_i``), while merges of
task vectors need them near full size (task arithmetic's ``lambda``). With equal Gram matrices the scaled merge
is task arithmetic with weights ``s_i w_i / sum_j w_j``; otherwise each task vector is weighed by its own
inputs. The tensors merged by the fallback get the same scaled task vectors.
Computed in task-vector form ``W = base + (sum_i d_i G~_i)(sum_i G~_i + r I)^-1`` in float64, ``r`` =
``ridge`` times the mean diagonal of ``sum_i G~_i`` (default 1e-8: only keeps a singular sum solvable; an input
channel no example uses then stays at the base). Only 2-D linear weights have Gram matrices; every other tensor
(embeddings, norms, biases, linear layers past the pass's ``max_gram_features``) is merged by the recipe's
``data.fallback`` method, as the paper merges non-linear weights by simple averaging.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from evomerge.merge.methods.arguments import Arguments, check_range
from evomerge.merge.methods.base import ParamSpec, merge_method

__all__ = ["regmean"]


@merge_method(
    "regmean",
    params=[
        ParamSpec("weight", "source", 1.0, (0.0, 1.0), doc="weight of this model's inputs in the least squares"),
        ParamSpec("scale", "source", 1.0, (0.0, 3.0), doc="coefficient of this model's task vector (1: the paper's)"),
        ParamSpec("alpha", "global", 0.9, (0.0, 1.0), doc="scale of the Gram matrices' off-diagonal terms"),
        ParamSpec("ridge", "global", 1e-8, (0.0, 1e-2), doc="ridge, relative to the mean diagonal"),
    ],
    min_models=1,
    mergekit_name=None,
    stats=("gram",),
)
def regmean(base: torch.Tensor, deltas: torch.Tensor, args: Arguments, *,
            stats: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """RegMean: the least-squares merge of a linear layer on the models' calibration inputs."""
    weights = args.floats("weight")
    check_range("regmean", "weight", weights, 0.0, float("inf"))
    scales = args.floats("scale")
    alpha, ridge = args.num("alpha"), args.num("ridge")
    check_range("regmean", "alpha", [alpha], 0.0, 1.0)
    check_range("regmean", "ridge", [ridge], 0.0, float("inf"))
    g = stats["gram"].to(device=base.device, dtype=torch.float64)
    if base.dim() != 2 or g.shape != (args.n, base.shape[1], base.shape[1]):
        raise ValueError(f"regmean: Gram matrices of shape {tuple(g.shape)} for a weight of shape "
                         f"{tuple(base.shape)} and {args.n} models")
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    g = alpha * g + (1 - alpha) * g * eye
    g.mul_(torch.tensor(weights, dtype=g.dtype, device=g.device).reshape(-1, 1, 1))
    total = g.sum(0)
    scale = float(torch.diagonal(total).mean())
    if ridge > 0 and scale > 0:
        total.add_(eye, alpha=ridge * scale)
    # (sum_i d_i G_i) S^-1, as S^-1 (sum_i G_i d_i^T) transposed (S and every G_i symmetric)
    d = deltas.to(torch.float64) * torch.tensor(scales, dtype=torch.float64, device=g.device).reshape(-1, 1, 1)
    rhs = torch.einsum("nij,noj->io", g, d)
    merged = torch.linalg.solve(total, rhs).T
    return merged.add_(base.to(torch.float64)).to(base.dtype)
