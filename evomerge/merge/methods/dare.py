"""DARE (Yu et al., arXiv 2311.03099; mergekit ``dare_linear`` / ``dare_ties``).

Each task vector keeps every entry with probability ``density`` (random mask drawn from the tensor's
generator) and, with ``rescale`` (default), is rescaled to its original L1 norm as mergekit does (not by
``1 / density``); then the task vectors are summed (``dare_linear``) or merged by TIES sign election
(``dare_ties``).
"""

from __future__ import annotations

from evomerge.merge.methods.task_vectors import task_vector_method
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["dare_linear", "dare_ties"]

dare_linear = task_vector_method(
    "dare_linear", sparsification="random", consensus=None, normalize=False, rescale=True,
    doc="DARE + task arithmetic: random drop with L1 rescale, then the weighted sum.",
)
dare_ties = task_vector_method(
    "dare_ties", sparsification="random", consensus=mix_agreeing, normalize=False, rescale=True,
    doc="DARE + TIES: random drop with L1 rescale, then sign election over the weighted task vectors.",
)
