"""The layer-swap space: one expert's layers with its bottom and top layers taken from other experts.

Layer swapping (Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language
Models", arXiv 2410.01335) builds a model from the ``keep`` expert (the paper's task expert) whose bottom
``k_bottom`` and top ``k_top`` transformer layers are replaced by the same layers of the ``donor`` (the paper's
language expert; ``top_donor`` may name a different model for the top layers). The result is a plain model of
the same depth: a ``passthrough`` recipe with layer routing, unscaled, which exports as mergekit
``passthrough`` slices and as a model folder.

What the paper adds and this space does not: a *transition zone* between the swapped and the kept layers,
where each layer is a weighted average of the two experts' layers. The ``init`` (3/16 of the layers at the
bottom, 1/16 at the top: 6 and 2 of a 32-layer model) rounds to 1 and 0 on a 4-layer model.

Genes (``[0, 1]``): ``k_bottom`` and ``k_top`` (or one ``k`` for both ends with ``tie: true``). A gene ``g``
decodes to the integer ``min(max_k, floor(g · (max_k + 1)))``: each of ``0 … max_k`` owns an equal share of the
gene; ``x0`` is the centre of the start value's share. When the two ends would overlap (``k_bottom + k_top > L``)
the top end is shortened. The embeddings, final norm and LM head come from ``frame``: the model of layer 0 by
default (the donor when ``k_bottom > 0``, else ``keep``), which is what mergekit takes from its first slice.

Template (``kind: layer_swap``)::

    kind: layer_swap
    keep: null            # the expert kept in the middle (default: the first source)
    donor: null           # the expert giving the swapped layers (default: the second source)
    top_donor: null       # the expert giving the top layers (default: donor)
    tie: false
    max_k: 0.5x           # at most this many layers at each end: an integer or "<f>x" (of the layers)
    init: {bottom: 0.1875x, top: 0.0625x}
    frame: null
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.names import DType
from evomerge.recipe import ModelEntry, Recipe, RouteStep, Routing
from evomerge.registry import Registry
from evomerge.spaces.base import SPACES, GeneInfo, GeneSpace, SpaceModels

_FROZEN = ConfigDict(frozen=True, extra="forbid")
Count = int | Annotated[str, Field(pattern=r"^\d+(\.\d+)?x$")]


class SwapInit(BaseModel):
    """Start values of the two ends (an integer or ``"<f>x"``, rounded to the nearest layer)."""

    model_config = _FROZEN
    bottom: Count = "0.1875x"
    top: Count = "0.0625x"


class LayerSwapTemplate(BaseModel):
    """A layer-swap template (``kind: layer_swap``; see the module docstring)."""

    model_config = _FROZEN
    kind: Literal["layer_swap"]
    description: str = ""
    keep: str | None = None
    donor: str | None = None
    top_donor: str | None = None
    tie: bool = False
    max_k: Count = "0.5x"
    init: SwapInit = SwapInit()
    frame: str | None = None
    seed: int = 0
    dtype: DType | None = None


def _count(value: int | str, num_layers: int, rounding: Any) -> int:
    if isinstance(value, int):
        return value
    return int(rounding(float(value[:-1]) * num_layers))


def swap_route(keep: str, donor: str, top_donor: str, k_bottom: int, k_top: int, num_layers: int) -> list[RouteStep]:
    """Layers ``0 … k_bottom − 1`` of ``donor``, the middle of ``keep``, the last ``k_top`` of ``top_donor``."""
    k_top = min(k_top, num_layers - k_bottom)
    out = []
    for layer in range(num_layers):
        model = donor if layer < k_bottom else top_donor if layer >= num_layers - k_top else keep
        out.append(RouteStep(model=model, layer=layer))
    return out


class LayerSwapSpace(GeneSpace):
    """Layer swapping between experts (see the module docstring); decodes to a ``passthrough`` recipe."""

    kind = "layer_swap"

    def __init__(self, template: LayerSwapTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> None:
        self.template = template
        self.models = models
        src = list(models.sources)
        self.keep = template.keep or (src[0] if src else "")
        self.donor = template.donor or next((s for s in src if s != self.keep), "")
        self.top_donor = template.top_donor or self.donor
        for field, name in (("keep", self.keep), ("donor", self.donor), ("top_donor", self.top_donor)):
            if name not in models.names:
                raise ConfigError(f"{field}: {name or '(none)'!r} is not one of the models {list(models.names)}; "
                                  "layer swapping needs two experts")
        if self.donor == self.keep:
            raise ConfigError(f"donor: {self.donor!r} is also the kept expert; name a different model")
        if template.frame is not None and template.frame not in (self.keep, self.donor, self.top_donor):
            raise ConfigError(f"frame: {template.frame!r} is not one of keep, donor, top_donor")
        L = models.num_layers
        self.max_k = min(L, max(0, _count(template.max_k, L, math.floor)))
        if self.max_k < 1:
            raise ConfigError(f"max_k: {template.max_k!r} allows no layer to be swapped in a {L}-layer model")
        starts = {}
        for end in ("bottom", "top"):
            k = _count(getattr(template.init, end), L, lambda x: math.floor(x + 0.5))
            if not 0 <= k <= self.max_k:
                raise ConfigError(f"init.{end}: {k} layers is outside 0..max_k = {self.max_k}")
            starts[end] = k
        ends = [("k", "layers swapped at each end", starts["bottom"])] if template.tie else [
            ("k_bottom", f"bottom layers taken from {self.donor!r}", starts["bottom"]),
            ("k_top", f"top layers taken from {self.top_donor!r}", starts["top"])]
        genes = [GeneInfo(n, what, 0.0, float(self.max_k), f"integer: floor(g * {self.max_k + 1})", float(k))
                 for n, what, k in ends]
        x0 = [(k + 0.5) / (self.max_k + 1) for _, _, k in ends]
        super().__init__(genes, x0, f"search space 'layer_swap' (keep {self.keep!r}, {L} layers, k <= {self.max_k})")

    def counts(self, genome: Any) -> tuple[int, int]:
        """``(k_bottom, k_top)`` encoded by ``genome``."""
        ks = [min(self.max_k, math.floor(float(g) * (self.max_k + 1))) for g in self.unit(genome)]
        return (ks[0], ks[0]) if self.template.tie else (ks[0], ks[1])

    def decode(self, genome: Any) -> Recipe:
        kb, kt = self.counts(genome)
        steps = swap_route(self.keep, self.donor, self.top_donor, kb, kt, self.models.num_layers)
        frame = self.template.frame or steps[0].model
        names = list(dict.fromkeys([s.model for s in steps] + [frame]))
        return Recipe(
            method="passthrough", models=tuple(ModelEntry(model=n) for n in names),
            routing=Routing(steps=tuple(steps), frame=frame), seed=self.template.seed, dtype=self.template.dtype,
            **self.models.vocab_fields,
        )


def build_layer_swap(template: LayerSwapTemplate, models: SpaceModels, *,
                     methods: Registry[MergeMethod]) -> LayerSwapSpace:
    return LayerSwapSpace(template, models, methods=methods)


SPACES.add("layer_swap", build_layer_swap, capabilities={"routing"})

__all__ = ["LayerSwapSpace", "LayerSwapTemplate", "swap_route"]
