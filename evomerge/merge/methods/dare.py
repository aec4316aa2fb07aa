"""DARE (Yu et al., arXiv 2311.03099; mergekit ``dare_linear`` / ``dare_ties``).

Each task vector keeps every entry with probability ``density`` (random mask drawn from the tensor's
generator) and, with ``rescale`` (default), is rescaled to its original L1 norm as mergekit does (not by
``1 / density``); then the task vectors are summed (``dare_linear``) or merged by TIES sign election
(``dare_ties``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merge.methods.arguments import require_generator, resolve
from evomerge.merge.methods.base import merge_method
from evomerge.merge.methods.task_vectors import merge_task_vectors, task_vector_params
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["dare_linear", "dare_ties"]


@merge_method(
    "dare_linear",
    params=task_vector_params(sparsification="random", normalize=False, rescale=True),
    min_models=1,
    randomized=True,
)
def dare_linear(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE + task arithmetic: random drop with L1 rescale, then the weighted sum."""
    args = resolve("dare_linear", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors(
        "dare_linear", base, deltas, args, sparsification="random", consensus=None,
        generator=require_generator("dare_linear", generator),
    )


@merge_method(
    "dare_ties",
    params=task_vector_params(sparsification="random", normalize=False, rescale=True),
    min_models=1,
    randomized=True,
)
def dare_ties(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE + TIES: random drop with L1 rescale, then sign election over the weighted task vectors."""
    args = resolve("dare_ties", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors(
        "dare_ties", base, deltas, args, sparsification="random", consensus=mix_agreeing,
        generator=require_generator("dare_ties", generator),
    )
