"""What the final phase re-scores on the held-out test split: every baseline and the searched Pareto front."""

from __future__ import annotations

from collections.abc import Sequence

from evomerge.archive.pareto import pareto_front
from evomerge.driver.records import Handled
from evomerge.evaluation import Candidate
from evomerge.recipe import Recipe


def rescoring_candidates(history: Sequence[Handled], tasks: Sequence[str]) -> list[tuple[Candidate, Recipe]]:
    """The candidates to score on the test split, each recipe once: the baselines scored in full on calibration,
    then the Pareto front of the searched candidates scored in full (by calibration task scores)."""
    full = [h for h in history if h.result.ok and h.split == "calibration" and h.job.subset is None
            and h.result.fidelity == "full"]  # an early-stopped candidate has partial scores only
    searched = [h for h in full if h.candidate.id >= 0]
    front = pareto_front(searched, list(tasks)) if searched else []
    seen: set[str] = set()
    out: list[tuple[Candidate, Recipe]] = []
    for h in [*(h for h in full if h.candidate.id < 0), *front]:
        if h.job.recipe.hash in seen:
            continue
        seen.add(h.job.recipe.hash)
        meta = {k: v for k, v in h.candidate.meta.items() if k in ("baseline", "kind")}
        out.append((Candidate(h.candidate.id, h.candidate.genome, meta), h.job.recipe))
    return out
