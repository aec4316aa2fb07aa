"""Task arithmetic (Ilharco et al., arXiv 2212.04089; mergekit ``task_arithmetic``): ``base + lambda * sum_i w_i d_i``."""

from __future__ import annotations

from evomerge.merge.methods.task_vectors import task_vector_method

__all__ = ["task_arithmetic"]

task_arithmetic = task_vector_method(
    "task_arithmetic", sparsification=None, consensus=None, normalize=False, rescale=False, fused=True,
    doc="Task arithmetic: add the weighted sum of the task vectors to the base (normalize: divide by the weight sum).",
)
