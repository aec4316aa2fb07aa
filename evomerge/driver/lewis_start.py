"""``space.lewis_start``: the start point of a per-layer density search at LEWIS's densities (arXiv 2503.03874).

Before the search the driver takes the reference's and every merged source's input activations on the named
calibration prompts (the ``act`` statistics of :mod:`evomerge.merge.stats`, cached in ``<run>/cache/stats/``
keyed by the weights and examples, so a resume loads them and starts at the same point), turns them into
per-layer densities (:func:`evomerge.merge.lewis.lewis_recipe`: importance = relative change of each layer's
input activations from the reference), and encodes that recipe in the space: the search's ``x0``. Every other
gene keeps the template's start. The space must be a params space over a method with a per-model ``density``
and genes per layer (``granularity: per_layer`` or ``groups``: a group starts at its first layer's density).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import ConfigError

log = logging.getLogger(__name__)

FIELD = "space.lewis_start"


def lewis_start_point(cfg: Any, space: Any, x0: Any, stats_dir: Path) -> np.ndarray:
    """The genome of LEWIS's recipe in ``space`` (``x0``: the template's start genome, kept for other genes)."""
    from evomerge.io.arch import tensor_role
    from evomerge.merge.lewis import lewis_recipe
    from evomerge.merge.methods.base import METHODS
    from evomerge.merge.stats import MergeStats, models_stats
    from evomerge.merge.tensor_params import delta_models, evaluate
    from evomerge.recipe import DataSpec

    ls = cfg.space.lewis_start
    block = space.param_genes
    if block is None:
        raise ConfigError(f"{FIELD}: needs a params space (the template is a {getattr(space, 'kind', '?')!r} space)")
    if not any(p.name == "density" and p.scope == "source" for p in METHODS.get(block.method.name).params):
        raise ConfigError(f"{FIELD}: method {block.method.name!r} has no per-model density; use a ties, dare_ties "
                          "or della template")
    if "density" not in [p.spec.name for p in block.searched]:
        raise ConfigError(f"{FIELD}: the template does not search density")
    if block.section.granularity == "global":
        raise ConfigError(f"{FIELD}: the template's granularity is global (one density per model); LEWIS sets one "
                          "per layer: use granularity per_layer or groups")
    if ls.low > ls.high:
        raise ConfigError(f"{FIELD}.low: {ls.low} is above high {ls.high}")
    start = space.decode(x0)
    models = [start.reference_model, *delta_models(start)]
    density = ls.density
    if density is None:  # the template's start density, averaged over the merged models
        role = tensor_role("model.layers.0.mlp.down_proj.weight")
        vals = [float(evaluate(e.parameters["density"], role, block.num_layers)) for e in start.models
                if "density" in e.parameters]
        density = float(np.mean(vals)) if vals else 0.5
    spec = DataSpec(suite=ls.suite, tasks=tuple(ls.tasks) if ls.tasks else None, examples=ls.examples)
    acts, records = models_stats(spec, cfg.sources, {m: ("act",) for m in dict.fromkeys(models)}, stats_dir,
                                 tokenizer=cfg.sources[start.reference_model], where=FIELD)
    for m, rec in zip(acts, records, strict=True):
        log.info("%s: activations of %s %s (%.1fs)", FIELD, m, "computed" if rec.computed else "loaded", rec.seconds)
    recipe = lewis_recipe(start, MergeStats(acts), block.num_layers, density=density, spread=ls.spread,
                          low=ls.low, high=ls.high)
    genome = np.asarray(x0, dtype=np.float64).copy()
    genome[: block.dim] = block.encode(recipe, where=FIELD)
    for e in recipe.models:
        if "density" in e.parameters:
            d = e.parameters["density"]
            log.info("%s: %s starts at densities %s", FIELD, e.model, [round(v, 3) for v in d])
    return genome


__all__ = ["lewis_start_point"]
