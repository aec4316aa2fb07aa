"""LEWIS (arXiv 2503.03874): per-layer task-vector densities from activation-based layer importance.

LEWIS keeps more of a task vector in the layers the fine-tuning changed most on calibration data. Here a
layer's importance for source ``i`` is the relative change of its linear layers' input activations (the
``act`` statistics of :mod:`evomerge.merge.stats`, mean ``|x|`` per input channel) from the base model to
model ``i``:

    imp_{i,l} = mean over the linear weights t of layer l of ||act_i[t] - act_base[t]||_2 / ||act_base[t]||_2

and the density of layer ``l`` is ``density * (1 - spread + spread * imp_{i,l} / mean_l imp_{i,l})``,
clipped to ``[low, high]``: the mean density stays ``density`` (up to the clipping), ``spread = 0`` gives the
uniform density, ``spread = 1`` densities proportional to importance. What the paper leaves to the
implementation, decided here: importance from input activations of the linear layers (what the statistics
pass keeps), averaged over the layer's linear weights; the proportional rule with ``spread``. The result is an
ordinary recipe (``ties``, ``dare_ties``, ``della`` … with one ``density`` per layer and model), so it needs
no statistics at merge time and serves as a fixed recipe or as the start of a per-layer search.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.io.arch import tensor_role
from evomerge.merge.methods.base import METHODS
from evomerge.merge.stats import MergeStats
from evomerge.merge.tensor_params import delta_models
from evomerge.recipe import ModelEntry, Recipe

__all__ = ["layer_importance", "lewis_densities", "lewis_recipe"]


def layer_importance(stats: MergeStats, base: str, model: str, num_layers: int,
                     model_type: str | None = None) -> list[float]:
    """``imp_{model, l}`` for every layer (module docstring); 0 for a layer without activation statistics."""
    acts_b = stats.models.get(base, {}).get("act", {})
    acts_m = stats.models.get(model, {}).get("act", {})
    if not acts_b or not acts_m:
        raise ConfigError(f"lewis: no activation statistics for {base!r} and {model!r}")
    sums, counts = [0.0] * num_layers, [0] * num_layers
    for name, a in acts_m.items():
        layer = tensor_role(name, model_type).layer
        b = acts_b.get(name)
        if layer is None or b is None or layer >= num_layers:
            continue
        b64, a64 = b.double(), a.double()
        denom = float(torch.linalg.vector_norm(b64))
        sums[layer] += float(torch.linalg.vector_norm(a64 - b64)) / denom if denom > 0 else 0.0
        counts[layer] += 1
    return [s / c if c else 0.0 for s, c in zip(sums, counts, strict=True)]


def lewis_densities(importance: Sequence[float], density: float, *, spread: float = 1.0,
                    low: float = 0.05, high: float = 1.0) -> list[float]:
    """Per-layer densities from importances (module docstring)."""
    if not 0 < density <= 1 or not 0 <= spread <= 1 or not 0 < low <= high <= 1:
        raise ConfigError(f"lewis: need 0 < density <= 1, 0 <= spread <= 1, 0 < low <= high <= 1; got "
                          f"density={density}, spread={spread}, low={low}, high={high}")
    mean = sum(importance) / len(importance)
    rel = [v / mean if mean > 0 else 1.0 for v in importance]
    return [min(high, max(low, density * (1 - spread + spread * r))) for r in rel]


def lewis_recipe(recipe: Recipe, stats: MergeStats, num_layers: int, *, density: float, spread: float = 1.0,
                 low: float = 0.05, high: float = 1.0, model_type: str | None = None) -> Recipe:
    """``recipe`` (a method with a per-model ``density``: ties, dare_ties, della …) with each source's density
    replaced by its LEWIS per-layer list (one value per layer)."""
    method = METHODS.get(recipe.method)
    if not any(p.name == "density" and p.scope == "source" for p in method.params):
        raise ConfigError(f"lewis: method {recipe.method!r} has no per-model density; use ties, dare_ties, della …")
    base = recipe.reference_model
    per_model: Mapping[str, list[float]] = {
        m: lewis_densities(layer_importance(stats, base, m, num_layers, model_type), density, spread=spread,
                           low=low, high=high)
        for m in delta_models(recipe)
    }
    models = tuple(
        ModelEntry(model=e.model, parameters={**e.parameters, "density": [round(d, 6) for d in per_model[e.model]]})
        if e.model in per_model else e
        for e in recipe.models
    )
    params = {k: v for k, v in recipe.parameters.items() if k != "density"}
    return recipe.model_copy(update={"models": models, "parameters": params})
