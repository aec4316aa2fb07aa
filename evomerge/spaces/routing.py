"""Layer routing / data-flow space (DFS), after Akiba et al., "Evolutionary Optimization of Model
Merging Recipes" (arXiv 2403.13187, section 3.2).

Layout: the layers of the M route sources in order (all layers of source 1, then of source 2 …),
repeated ``repeats`` times: ``T = repeats x M x num_layers`` slots. Genes, all in ``[0, 1]``:

* ``T`` include genes: slot ``t`` is on the path when its gene is > 0.5 (the paper includes a
  layer when its indicator is > 0; our genome is centred on 0.5). The path keeps layout order.
* scale genes (``scale.mode``): ``transition`` — one per ordered pair (i, j) of different sources,
  the scale applied to the residual stream entering a layer of source j when the previous layer
  (or the embedding, which counts as the frame's) is from source i, 1 within a source; ``pair`` —
  the full M x M matrix (the paper's W), also within a source; ``position`` — one per slot;
  ``none``. A scale gene maps to ``[low, high]`` geometrically (``log``, 0.5 is the geometric
  centre) or linearly.

Path length: at most ``max_layers`` positions. When more slots are on, the path keeps the
``max_layers`` slots with the largest include genes (ties: the earlier slot), still in layout
order. When no slot is on, the path is the single slot with the largest include gene. So every
genome decodes to a valid, non-empty route.

``x0`` is the ``start`` source's own stack: its layers of the first repetition on (0.5 + margin),
every other slot off (0.5 - margin), every scale 1; with ``frame = start`` it decodes to that model.
The recipe is ``method: passthrough`` with ``routing`` steps naming the sources.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.folding import FOLDABLE_MODEL_TYPES
from evomerge.merge.methods.base import MergeMethod
from evomerge.recipe import MERGED, ModelEntry, Recipe, RouteStep, Routing
from evomerge.registry import Registry
from evomerge.spaces.base import SPACES, Array, GeneInfo, GeneSpace, SpaceModels, Transform
from evomerge.spaces.template import RoutingSection, RoutingTemplate

THRESHOLD = 0.5


class RouteGenes:
    """The DFS gene block of a routing section for given models; reused by the hybrid space.

    ``merged=True`` (hybrid) lays out ``"@merge"`` first; ``default_sources`` replaces the default
    list of route sources (every model but the base).
    """

    def __init__(
        self,
        section: RoutingSection,
        models: SpaceModels,
        *,
        merged: bool = False,
        default_sources: list[str] | None = None,
        where: str = "",
    ) -> None:
        self.section = section
        self.where = where
        self.num_layers = models.num_layers
        self.sources = self._sources(models, merged, default_sources)
        self.start = section.start or (MERGED if merged else self.sources[0])
        if self.start not in self.sources:
            raise ConfigError(f"{where}start: {self.start!r} is not a route source {self.sources}")
        self.frame = section.frame or self.start
        if self.frame not in self.sources:
            raise ConfigError(f"{where}frame: {self.frame!r} is not a route source {self.sources}")
        M, L = len(self.sources), self.num_layers
        self.slots = [(j, layer) for _ in range(section.repeats) for j in range(M) for layer in range(L)]
        self.max_layers = self._max_layers()
        sc = section.scale
        if sc.mode != "none" and models.model_type not in FOLDABLE_MODEL_TYPES:
            raise ConfigError(
                f"{where}scale.mode: {sc.mode!r} searches residual scales, which a routed model of type "
                f"{models.model_type!r} cannot export (folding them into the weights is implemented for "
                f"{', '.join(sorted(FOLDABLE_MODEL_TYPES))}); use scale.mode: none"
            )
        self.scale = Transform(sc.range[0], sc.range[1], sc.transform)
        if sc.mode == "transition":
            self.pairs = [(i, j) for i in range(M) for j in range(M) if i != j]
        elif sc.mode == "pair":
            self.pairs = [(i, j) for i in range(M) for j in range(M)]
        else:
            self.pairs = []
        self.genes, self._x0 = self._layout()

    def _sources(self, models: SpaceModels, merged: bool, default: list[str] | None) -> list[str]:
        s = self.section
        chosen = list(s.sources) if s.sources is not None else list(default if default is not None else models.sources)
        allowed = set(models.names) | ({MERGED} if merged else set())
        unknown = [n for n in chosen if n not in allowed]
        if unknown:
            raise ConfigError(f"{self.where}sources: unknown model(s) {unknown}; models are {sorted(allowed)}")
        if s.include_base:
            if models.base is None:
                raise ConfigError(f"{self.where}include_base: no base model is given")
            chosen = [models.base] + [n for n in chosen if n != models.base]
        if merged:
            chosen = [MERGED] + [n for n in chosen if n != MERGED]
        dup = sorted({n for n in chosen if chosen.count(n) > 1})
        if dup:
            raise ConfigError(f"{self.where}sources: listed more than once: {dup}")
        if not chosen:
            raise ConfigError(f"{self.where}sources: no model to route through")
        return chosen

    def _max_layers(self) -> int:
        raw = self.section.max_layers
        if raw is None:
            return len(self.slots)
        n = raw if isinstance(raw, int) else max(1, math.floor(float(raw[:-1]) * self.num_layers))
        return min(n, len(self.slots))

    def _layout(self) -> tuple[list[GeneInfo], list[float]]:
        genes: list[GeneInfo] = []
        x0: list[float] = []
        m = self.section.init_margin
        start = self.sources.index(self.start)
        L = self.num_layers
        for t, (j, layer) in enumerate(self.slots):
            on = t < len(self.sources) * L and j == start
            genes.append(GeneInfo(
                f"include.{t}", f"slot {t}: layer {layer} of {self.sources[j]!r} (repeat {t // (len(self.sources) * L)})",
                0.0, 1.0, f"on path when > {THRESHOLD}", 1.0 if on else 0.0,
            ))
            x0.append(THRESHOLD + m if on else THRESHOLD - m)
        one = self.scale.gene(1.0)
        for i, j in self.pairs:
            a, b = self.sources[i], self.sources[j]
            genes.append(GeneInfo(
                f"scale.{a}->{b}", f"residual scale entering a layer of {b!r} after one of {a!r}",
                self.scale.low, self.scale.high, self.scale.describe(), 1.0,
            ))
            x0.append(one)
        if self.section.scale.mode == "position":
            for t, (j, layer) in enumerate(self.slots):
                genes.append(GeneInfo(
                    f"scale.{t}", f"residual scale entering slot {t} (layer {layer} of {self.sources[j]!r})",
                    self.scale.low, self.scale.high, self.scale.describe(), 1.0,
                ))
                x0.append(one)
        return genes, x0

    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def x0(self) -> Array:
        return np.asarray(self._x0, dtype=np.float64)

    def path(self, unit: Array) -> list[int]:
        """Slots on the path, in layout order (bounded by ``max_layers``, never empty)."""
        inc = unit[: len(self.slots)]
        on = [t for t in range(len(self.slots)) if inc[t] > THRESHOLD]
        if not on:
            return [int(np.argmax(inc))]
        if len(on) > self.max_layers:
            on = sorted(sorted(on, key=lambda t: (-inc[t], t))[: self.max_layers])
        return on

    def routing(self, unit: Array) -> Routing:
        """The route encoded by ``unit`` (already clipped to ``[0, 1]``)."""
        T = len(self.slots)
        scale_genes = unit[T:]
        mode = self.section.scale.mode
        matrix = {pair: self.scale.value(float(g)) for pair, g in zip(self.pairs, scale_genes, strict=False)}
        prev = self.sources.index(self.frame)
        steps = []
        for t in self.path(unit):
            j, layer = self.slots[t]
            if mode == "position":
                scale = self.scale.value(float(scale_genes[t]))
            else:
                scale = matrix.get((prev, j), 1.0)
            steps.append(RouteStep(model=self.sources[j], layer=layer, scale=scale))
            prev = j
        return Routing(steps=tuple(steps), frame=self.frame)


class RoutingSpace(GeneSpace):
    """Layer routing over the sources (see the module docstring); decodes to a ``passthrough`` recipe."""

    kind = "routing"

    def __init__(self, template: RoutingTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> None:
        self.template = template
        self.models = models
        self.block = RouteGenes(template, models)
        b = self.block
        title = (
            f"search space 'routing' ({len(b.sources)} sources x {b.num_layers} layers x {template.repeats} "
            f"repeats = {len(b.slots)} slots, path <= {b.max_layers}, scale {template.scale.mode})"
        )
        super().__init__(b.genes, b.x0, title)

    def decode(self, genome: Any) -> Recipe:
        routing = self.block.routing(self.unit(genome))
        return Recipe(
            method="passthrough",
            models=tuple(ModelEntry(model=s) for s in self.block.sources),
            routing=routing,
            seed=self.template.seed,
            dtype=self.template.dtype,
            **self.models.vocab_fields,
        )


def build_routing(template: RoutingTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> RoutingSpace:
    return RoutingSpace(template, models, methods=methods)


SPACES.add("routing", build_routing, capabilities={"routing"})

__all__ = ["THRESHOLD", "RouteGenes", "RoutingSpace"]
