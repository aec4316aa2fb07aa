"""Model breadcrumbs (Davari & Belilovsky, arXiv 2312.06795; mergekit ``breadcrumbs`` / ``breadcrumbs_ties``).

Each task vector drops its ``gamma`` share of largest magnitudes (outliers) and then its smallest
magnitudes down to ``density``; then the task vectors are summed (``breadcrumbs``) or merged by TIES
sign election (``breadcrumbs_ties``).
"""

from __future__ import annotations

from evomerge.merge.methods.task_vectors import task_vector_method
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["breadcrumbs", "breadcrumbs_ties"]

breadcrumbs = task_vector_method(
    "breadcrumbs", sparsification="magnitude_outliers", consensus=None, normalize=False, rescale=False,
    doc="Breadcrumbs: drop outliers (gamma) and small entries (density), then the weighted sum.",
)
breadcrumbs_ties = task_vector_method(
    "breadcrumbs_ties", sparsification="magnitude_outliers", consensus=mix_agreeing, normalize=False, rescale=False,
    doc="Breadcrumbs + TIES: drop outliers and small entries, then sign election.",
)
