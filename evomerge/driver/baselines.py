"""Baselines: the reference recipes scored before the search (each source alone and the usual hand-set merges)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.recipe import Recipe


@dataclass(frozen=True)
class Baseline:
    """A reference recipe scored before the search (a source model or a hand-set merge)."""

    name: str
    recipe: Recipe
    kind: str  # "source" | "base" | "handset"


def baseline_recipes(
    reference: str, sources: list[str], base: str | None, seed: int, *, vocab: dict[str, Any] | None = None,
    every_source: bool = False,
) -> list[Baseline]:
    """Each source model alone, and the usual hand-set merges (TA λ=1, TIES and DARE-TIES at density 0.5).

    Every recipe is expressed relative to the workers' ``reference`` model (their resident task vectors), so a
    source ``m`` is ``reference + 1.0 * (m - reference)``. The hand-set merges need the base model as reference.
    ``vocab``: the recipe fields choosing the vocabulary; ``every_source``: list every source (weight 0 for
    those not merged), for a vocabulary that depends on the models read (``tokenizer_source: union``).
    """
    vocab = vocab or {}

    def ta(models: dict[str, float]) -> Recipe:
        if every_source:
            models = {m: models.get(m, 0.0) for m in sources}
        return Recipe(method="task_arithmetic", base_model=reference, **vocab,
                      models=tuple({"model": m, "parameters": {"weight": w}} for m, w in models.items()))

    out: list[Baseline] = []
    for m in [reference, *sources]:
        recipe = ta({sources[0]: 0.0}) if m == reference else ta({m: 1.0})
        out.append(Baseline(m, recipe, "base" if m == base else "source"))
    experts = [s for s in sources if s != base]
    if base is not None and reference == base and experts:
        out.append(Baseline("task_arithmetic", ta(dict.fromkeys(experts, 1.0)), "handset"))
        for method in ("ties", "dare_ties"):
            out.append(Baseline(method, Recipe(
                method=method, base_model=reference, seed=seed, **vocab,
                models=tuple({"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in experts),
            ), "handset"))
    return out
