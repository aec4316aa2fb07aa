"""Model breadcrumbs (Davari & Belilovsky, arXiv 2312.06795; mergekit ``breadcrumbs`` / ``breadcrumbs_ties``).

Each task vector drops its ``gamma`` share of largest magnitudes (outliers) and then its smallest
magnitudes down to ``density``; then the task vectors are summed (``breadcrumbs``) or merged by TIES
sign election (``breadcrumbs_ties``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merge.methods.arguments import resolve
from evomerge.merge.methods.base import merge_method
from evomerge.merge.methods.task_vectors import merge_task_vectors, task_vector_params
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["breadcrumbs", "breadcrumbs_ties"]


@merge_method(
    "breadcrumbs",
    params=task_vector_params(sparsification="magnitude_outliers", normalize=False, rescale=False),
    min_models=1,
)
def breadcrumbs(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Breadcrumbs: drop outliers (gamma) and small entries (density), then the weighted sum."""
    args = resolve("breadcrumbs", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors(
        "breadcrumbs", base, deltas, args, sparsification="magnitude_outliers", consensus=None
    )


@merge_method(
    "breadcrumbs_ties",
    params=task_vector_params(sparsification="magnitude_outliers", normalize=False, rescale=False),
    min_models=1,
)
def breadcrumbs_ties(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Breadcrumbs + TIES: drop outliers and small entries, then sign election."""
    args = resolve("breadcrumbs_ties", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors(
        "breadcrumbs_ties", base, deltas, args, sparsification="magnitude_outliers", consensus=mix_agreeing
    )
