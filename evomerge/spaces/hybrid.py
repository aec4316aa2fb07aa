"""Hybrid space (PS + DFS): a parameter-space merge ``"@merge"`` routed together with the sources.

The genome is the parameter-space genes of the ``params`` section (see ``evomerge.spaces.params``)
followed by the routing genes of the ``routing`` section (see ``evomerge.spaces.routing``), whose
layout puts ``"@merge"`` first, then the route sources (default: the models the ``params`` section
merges). The recipe is the parameter-space recipe plus ``routing``; by default the frame and the
start route are ``"@merge"``, so ``x0`` decodes to the plain hand-set merge, unrouted in effect.
"""

from __future__ import annotations

from typing import Any

from evomerge.merge.methods.base import MergeMethod
from evomerge.recipe import Recipe
from evomerge.registry import Registry
from evomerge.spaces.base import SPACES, GeneSpace, SpaceModels
from evomerge.spaces.params import ParamGenes, check_recipe
from evomerge.spaces.routing import RouteGenes
from evomerge.spaces.template import HybridTemplate


class HybridSpace(GeneSpace):
    """Parameter-space genes, then routing genes over ``"@merge"`` and the sources."""

    kind = "hybrid"

    def __init__(self, template: HybridTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> None:
        self.template = template
        self.params = ParamGenes(template.params, models, methods, where="params.")
        route_default = [m for m in self.params.merged if m != models.base]
        self.route = RouteGenes(
            template.routing, models, merged=True, default_sources=route_default, where="routing."
        )
        r = self.route
        title = (
            f"search space 'hybrid' ({self.params.method.name} {template.params.granularity} + routing over "
            f"{r.sources}: {len(r.slots)} slots, path <= {r.max_layers}, scale {template.routing.scale.mode})"
        )
        super().__init__(self.params.genes + r.genes, list(self.params.x0) + list(r.x0), title)
        check_recipe(self.decode(self.x0), self.params.method, "search space")

    @property
    def param_genes(self) -> ParamGenes:
        return self.params

    def decode(self, genome: Any) -> Recipe:
        unit = self.unit(genome)
        fields = self.params.recipe_fields(unit[: self.params.dim])
        routing = self.route.routing(unit[self.params.dim :])
        return Recipe(**fields, routing=routing)


def build_hybrid(template: HybridTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> HybridSpace:
    return HybridSpace(template, models, methods=methods)


SPACES.add("hybrid", build_hybrid, capabilities={"params", "routing", "hybrid"})

__all__ = ["HybridSpace"]
