"""Search spaces: pure, documented maps genome -> Recipe (parameter space, layer routing, hybrid, segments,
LiNeS, layer swapping).

``load_template("builtin:ties-per-layer")`` reads a template; ``build_space(template, models)``
builds the space for the source models described by :class:`SpaceModels`; ``space.describe()``
prints every gene. Space kinds register in :data:`SPACES` by the template's ``kind``.
"""

from __future__ import annotations

from evomerge.spaces.base import SPACES, GeneInfo, GeneSpace, SearchSpace, SpaceModels, Transform, build_space
from evomerge.spaces.hybrid import HybridSpace
from evomerge.spaces.layer_swap import LayerSwapSpace
from evomerge.spaces.lines import LinesSpace
from evomerge.spaces.params import ParamSpace
from evomerge.spaces.routing import RoutingSpace
from evomerge.spaces.segments import SegmentSpace
from evomerge.spaces.template import (
    TEMPLATE_KINDS,
    HybridTemplate,
    ParamsTemplate,
    RoutingTemplate,
    SpaceTemplate,
    builtin_templates,
    load_template,
    parse_template,
)

__all__ = [
    "SPACES",
    "GeneInfo",
    "GeneSpace",
    "HybridSpace",
    "HybridTemplate",
    "LayerSwapSpace",
    "LinesSpace",
    "ParamSpace",
    "ParamsTemplate",
    "RoutingSpace",
    "RoutingTemplate",
    "SearchSpace",
    "SegmentSpace",
    "SpaceModels",
    "SpaceTemplate",
    "TEMPLATE_KINDS",
    "Transform",
    "build_space",
    "builtin_templates",
    "load_template",
    "parse_template",
]
