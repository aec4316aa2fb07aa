"""Task arithmetic (Ilharco et al., arXiv 2212.04089; mergekit ``task_arithmetic``): ``base + lambda * sum_i w_i d_i``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merge.methods.arguments import resolve
from evomerge.merge.methods.base import merge_method
from evomerge.merge.methods.task_vectors import merge_task_vectors, task_vector_params

__all__ = ["task_arithmetic"]


@merge_method(
    "task_arithmetic",
    params=task_vector_params(sparsification=None, normalize=False, rescale=False),
    min_models=1,
)
def task_arithmetic(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Task arithmetic: add the weighted sum of the task vectors to the base (normalize: divide by the weight sum)."""
    args = resolve("task_arithmetic", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors("task_arithmetic", base, deltas, args, sparsification=None, consensus=None)
