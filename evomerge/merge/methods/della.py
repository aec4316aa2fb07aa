"""DELLA (Deep et al., arXiv 2406.11617; mergekit ``della`` / ``della_linear``).

Magnitude-ranked random pruning (MAGPRUNE): within each row, an entry is kept with a probability that
rises linearly with its magnitude rank from ``density - epsilon`` to ``density + epsilon``; kept entries
are rescaled to the task vector's L1 norm (``rescale``, default on, as mergekit does); then TIES sign
election (``della``) or the weighted sum (``della_linear``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.merge.methods.arguments import require_generator, resolve
from evomerge.merge.methods.base import merge_method
from evomerge.merge.methods.task_vectors import merge_task_vectors, task_vector_params
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["della", "della_linear"]


@merge_method(
    "della",
    params=task_vector_params(sparsification="della_magprune", normalize=True, rescale=True),
    min_models=1,
    randomized=True,
)
def della(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA: magnitude-ranked random pruning with L1 rescale, then sign election."""
    args = resolve("della", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors(
        "della", base, deltas, args, sparsification="della_magprune", consensus=mix_agreeing,
        generator=require_generator("della", generator),
    )


@merge_method(
    "della_linear",
    params=task_vector_params(sparsification="della_magprune", normalize=False, rescale=True),
    min_models=1,
    randomized=True,
)
def della_linear(
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DELLA + task arithmetic: magnitude-ranked random pruning with L1 rescale, then the weighted sum."""
    args = resolve("della_linear", base, deltas, sp, gp, ref_sp)
    return merge_task_vectors(
        "della_linear", base, deltas, args, sparsification="della_magprune", consensus=None,
        generator=require_generator("della_linear", generator),
    )
