"""DELLA (Deep et al., arXiv 2406.11617; mergekit ``della`` / ``della_linear``).

Magnitude-ranked random pruning (MAGPRUNE): within each row, an entry is kept with a probability that
rises linearly with its magnitude rank from ``density - epsilon`` to ``density + epsilon``; kept entries
are rescaled to the task vector's L1 norm (``rescale``, default on, as mergekit does); then TIES sign
election (``della``) or the weighted sum (``della_linear``).
"""

from __future__ import annotations

from evomerge.merge.methods.task_vectors import task_vector_method
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["della", "della_linear"]

della = task_vector_method(
    "della", sparsification="della_magprune", consensus=mix_agreeing, normalize=True, rescale=True,
    doc="DELLA: magnitude-ranked random pruning with L1 rescale, then sign election.",
)
della_linear = task_vector_method(
    "della_linear", sparsification="della_magprune", consensus=None, normalize=False, rescale=True,
    doc="DELLA + task arithmetic: magnitude-ranked random pruning with L1 rescale, then the weighted sum.",
)
