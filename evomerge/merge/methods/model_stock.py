"""Model stock (Jang et al., arXiv 2403.19522; mergekit ``model_stock``).

With task vectors ``d_1..d_N`` (``N >= 2``) and ``cos`` the mean pairwise cosine similarity between
them (each pair's product of norms clamped to at least 1e-6, each cosine clamped to [-1, 1]):
``t = N cos / (1 + (N - 1) cos)`` and the result is ``base + t * mean_i d_i``, i.e. mergekit's
``t * mean_i theta_i + (1 - t) * base``. Where ``|1 + (N - 1) cos| < 1e-6`` there is no finite
estimate and ``t = 0`` keeps the base (as mergekit does). ``t`` is not clamped to [0, 1].

``filter_wise``: one ``t`` per row (last dimension) instead of one for the whole tensor; 1-D
tensors are one row.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.arguments import Arguments, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method
from evomerge.merge.methods.task_vectors import Rows, weighted_sum

__all__ = ["model_stock", "stock_ratio"]


def stock_ratio(deltas: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """Model stock's ``t`` for stacked task vectors ``(N, *S)``: shape ``S[:-1] + (1,)`` or ``()``."""
    n = deltas.shape[0]
    per_row = filter_wise and deltas.dim() >= 3
    o = deltas.reshape(n, -1, deltas.shape[-1]) if per_row else deltas.reshape(n, 1, -1)
    gram = torch.matmul(o.transpose(0, 1), o.permute(1, 2, 0))  # (R, N, N)
    norms = torch.diagonal(gram, dim1=1, dim2=2).clamp(min=0).sqrt()  # (R, N)
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = (norms[:, i] * norms[:, j]).clamp_(min=1e-6)
            cos.append((gram[:, i, j] / denom).clamp_(-1, 1))
    c = torch.stack(cos).mean(0)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), n * c / torch.where(singular, torch.ones_like(den), den))
    return t.reshape(deltas.shape[1:-1] + (1,)) if per_row else t.reshape(())


@merge_method(
    "model_stock",
    params=[ParamSpec("filter_wise", "global", False, doc="one interpolation ratio per row instead of per tensor")],
    needs_base=True,
    min_models=2,
)
def model_stock(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """Model stock: move from the base toward the models' average by a ratio set by their task vectors' angles."""
    cd = work_dtype(base.dtype)
    n = args.n
    d = deltas if deltas.dtype == cd else deltas.to(cd)
    t = stock_ratio(d, filter_wise=args.flag("filter_wise"))
    mixed = weighted_sum(Rows(d, [1.0] * n, cd))
    mixed.div_(n).mul_(t)
    return mixed.add_(base).to(base.dtype)
