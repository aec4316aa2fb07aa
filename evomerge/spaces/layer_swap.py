"""The layer-swap space: one expert's layers with its bottom and top layers taken from other experts.

Layer swapping (Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language
Models", arXiv 2410.01335) builds a model from the ``keep`` expert (the paper's task expert) whose bottom
``k_bottom`` and top ``k_top`` transformer layers are replaced by the same layers of the ``donor`` (the paper's
language expert; ``top_donor`` may name a different model for the top layers). The result is a plain model of
the same depth: a ``passthrough`` recipe with layer routing, unscaled, which exports as mergekit
``passthrough`` slices and as a model folder.

The ``init`` (3/16 of the layers at the bottom, 1/16 at the top: 6 and 2 of a 32-layer model) rounds to 1 and 0
on a 4-layer model.

*Transition zones* (the paper's blend between the swapped and the kept layers; ``transition.max > 0``): the
``t_bottom`` layers above the bottom swap and the ``t_top`` layers below the top swap are weighted averages
of the two experts' layers on a linear ramp: the ``i``-th layer of a zone of width ``t`` (``i = 1 … t``,
counted from the swapped end) takes ``(t + 1 − i) / (t + 1)`` of the swapping expert and the rest of
``keep``. Zones stay inside the kept middle (the top zone yields to the bottom one). A recipe with a blended
layer is a *hybrid*: the blended positions route through ``"@merge"``, a ``linear`` merge whose per-layer
weights are one-hot elsewhere; with no blended layer it is the plain swap (``passthrough``, the same recipe and
hash as without zones). It exports as mergekit ``linear`` slices when its first and last layers are whole
layers of the frame model.

Genes (``[0, 1]``): ``k_bottom`` and ``k_top`` (or one ``k`` for both ends with ``tie: true``), then
``t_bottom`` and ``t_top`` (or one ``t``) when ``transition.max > 0``. A gene ``g`` decodes to the integer
``min(max, floor(g · (max + 1)))``: each of ``0 … max`` owns an equal share of the gene; ``x0`` is the centre
of the start value's share. When the two ends would overlap (``k_bottom + k_top > L``) the top end is
shortened. The embeddings, final norm and LM head come from ``frame``: by default the donor when
``k_bottom > 0``, else ``keep`` (the model of layer 0 when it is a whole layer, which is what mergekit takes
from its first slice; mergekit takes the final norm and head from its last slice, so an export whose last
layer is another model's is refused).

Template (``kind: layer_swap``)::

    kind: layer_swap
    keep: null            # the expert kept in the middle (default: the first source)
    donor: null           # the expert giving the swapped layers (default: the second source)
    top_donor: null       # the expert giving the top layers (default: donor)
    tie: false
    max_k: 0.5x           # at most this many layers at each end: an integer or "<f>x" (of the layers)
    init: {bottom: 0.1875x, top: 0.0625x}
    transition: {max: 0, init: {bottom: 0, top: 0}}   # blended layers next to each swapped end
    frame: null
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.names import DType
from evomerge.recipe import MERGED, ModelEntry, Recipe, RouteStep, Routing
from evomerge.registry import Registry
from evomerge.spaces.base import SPACES, GeneInfo, GeneSpace, SpaceModels

_FROZEN = ConfigDict(frozen=True, extra="forbid")
Count = int | Annotated[str, Field(pattern=r"^\d+(\.\d+)?x$")]


class SwapInit(BaseModel):
    """Start values of the two ends (an integer or ``"<f>x"``, rounded to the nearest layer)."""

    model_config = _FROZEN
    bottom: Count = "0.1875x"
    top: Count = "0.0625x"


class TransitionInit(BaseModel):
    """Start widths of the two transition zones (an integer or ``"<f>x"``, rounded to the nearest layer)."""

    model_config = _FROZEN
    bottom: Count = 0
    top: Count = 0


class Transition(BaseModel):
    """Transition zones: at most ``max`` blended layers next to each swapped end (0: none, no genes)."""

    model_config = _FROZEN
    max: Count = 0
    init: TransitionInit = TransitionInit()


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
    transition: Transition = Transition()
    frame: str | None = None
    seed: int = 0
    dtype: DType | None = None


def _count(value: int | str, num_layers: int, rounding: Any) -> int:
    if isinstance(value, int):
        return value
    return int(rounding(float(value[:-1]) * num_layers))


def swap_route(keep: str, donor: str, top_donor: str, k_bottom: int, k_top: int, num_layers: int) -> list[RouteStep]:
    """Layers ``0 … k_bottom − 1`` of ``donor``, the middle of ``keep``, the last ``k_top`` of ``top_donor``."""
    return [RouteStep(model=next(iter(w)), layer=layer) for layer, w in enumerate(
        swap_layers(keep, donor, top_donor, k_bottom, k_top, 0, 0, num_layers))]


def swap_layers(keep: str, donor: str, top_donor: str, k_bottom: int, k_top: int, t_bottom: int, t_top: int,
                num_layers: int) -> list[dict[str, float]]:
    """Per layer, the models it is made of and their weights (one model with weight 1: that model's layer).

    The bottom ``k_bottom`` layers are ``donor``'s, the top ``k_top`` ``top_donor``'s (shortened so that the ends
    do not overlap), the middle ``keep``'s; the ``t_bottom`` / ``t_top`` middle layers next to the swapped ends
    blend the swapping expert into ``keep`` on a linear ramp (see the module docstring)."""
    L = num_layers
    k_top = min(k_top, L - k_bottom)
    lo, hi = k_bottom, L - k_top  # the kept middle
    t_bottom = min(t_bottom, hi - lo) if k_bottom else 0
    t_top = min(t_top, hi - lo - t_bottom) if k_top else 0
    out: list[dict[str, float]] = []
    for layer in range(L):
        if layer < lo:
            parts = [(donor, 1.0)]
        elif layer >= hi:
            parts = [(top_donor, 1.0)]
        elif layer < lo + t_bottom:
            i = layer - lo + 1  # 1 next to the swapped layers
            parts = [(donor, (t_bottom + 1 - i) / (t_bottom + 1)), (keep, i / (t_bottom + 1))]
        elif layer >= hi - t_top:
            i = hi - layer
            parts = [(top_donor, (t_top + 1 - i) / (t_top + 1)), (keep, i / (t_top + 1))]
        else:
            parts = [(keep, 1.0)]
        w: dict[str, float] = {}
        for model, share in parts:  # a top donor that is `keep` blends with itself: its whole layer
            w[model] = w.get(model, 0.0) + share
        out.append({m: 1.0 for m in w} if len(w) == 1 else w)
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
        starts = {end: self._start(getattr(template.init, end), f"init.{end}", self.max_k) for end in ("bottom", "top")}
        ends = [("k", "layers swapped at each end", starts["bottom"])] if template.tie else [
            ("k_bottom", f"bottom layers taken from {self.donor!r}", starts["bottom"]),
            ("k_top", f"top layers taken from {self.top_donor!r}", starts["top"])]
        genes = [GeneInfo(n, what, 0.0, float(self.max_k), f"integer: floor(g * {self.max_k + 1})", float(k))
                 for n, what, k in ends]
        x0 = [(k + 0.5) / (self.max_k + 1) for _, _, k in ends]
        # the model the worker takes task vectors from (the first model of the start's plain swap); a blended
        # recipe names it as its base_model, so that every recipe of the space has the same reference
        self.reference = self.donor if starts["bottom"] else self.keep
        tr = template.transition
        self.max_t = min(L, max(0, _count(tr.max, L, math.floor)))
        if self.max_t:
            ts = {end: self._start(getattr(tr.init, end), f"transition.init.{end}", self.max_t)
                  for end in ("bottom", "top")}
            zones = [("t", "blended layers next to each swapped end", ts["bottom"])] if template.tie else [
                ("t_bottom", f"layers blending {self.donor!r} into {self.keep!r} above the bottom swap", ts["bottom"]),
                ("t_top", f"layers blending {self.top_donor!r} into {self.keep!r} below the top swap", ts["top"])]
            genes += [GeneInfo(n, what, 0.0, float(self.max_t), f"integer: floor(g * {self.max_t + 1})", float(t))
                      for n, what, t in zones]
            x0 += [(t + 0.5) / (self.max_t + 1) for _, _, t in zones]
        elif tr.init != TransitionInit():
            raise ConfigError("transition.init: set without transition.max (0: no transition zones)")
        super().__init__(genes, x0, f"search space 'layer_swap' (keep {self.keep!r}, {L} layers, k <= {self.max_k}"
                                    + (f", transition <= {self.max_t}" if self.max_t else "") + ")")

    def _start(self, value: int | str, field: str, most: int) -> int:
        k = _count(value, self.models.num_layers, lambda x: math.floor(x + 0.5))
        if not 0 <= k <= most:
            raise ConfigError(f"{field}: {k} layers is outside 0..{most}")
        return k

    def _ints(self, genes: Any, most: int) -> list[int]:
        return [min(most, math.floor(float(g) * (most + 1))) for g in genes]

    def counts(self, genome: Any) -> tuple[int, int]:
        """``(k_bottom, k_top)`` encoded by ``genome``."""
        n = 1 if self.template.tie else 2
        ks = self._ints(self.unit(genome)[:n], self.max_k)
        return (ks[0], ks[0]) if self.template.tie else (ks[0], ks[1])

    def widths(self, genome: Any) -> tuple[int, int]:
        """``(t_bottom, t_top)`` encoded by ``genome``, before the zones are fitted into the kept middle."""
        if not self.max_t:
            return 0, 0
        n = 1 if self.template.tie else 2
        ts = self._ints(self.unit(genome)[n:], self.max_t)
        return (ts[0], ts[0]) if self.template.tie else (ts[0], ts[1])

    def decode(self, genome: Any) -> Recipe:
        kb, kt = self.counts(genome)
        layers = swap_layers(self.keep, self.donor, self.top_donor, kb, kt, *self.widths(genome),
                             self.models.num_layers)
        steps = [RouteStep(model=next(iter(w)) if len(w) == 1 else MERGED, layer=i) for i, w in enumerate(layers)]
        frame = self.template.frame or (self.donor if kb else self.keep)
        names = list(dict.fromkeys([s.model for s in steps if s.model != MERGED] + [frame]))
        fields = dict(routing=Routing(steps=tuple(steps), frame=frame), seed=self.template.seed,
                      dtype=self.template.dtype, **self.models.vocab_fields)
        if MERGED not in (s.model for s in steps):
            return Recipe(method="passthrough", models=tuple(ModelEntry(model=n) for n in names), **fields)
        # blended layers route through "@merge": a linear merge, one-hot wherever a layer is a whole model's
        blend = list(dict.fromkeys([m for w in layers for m in w] + names))
        return Recipe(method="linear", base_model=self.reference, models=tuple(
            ModelEntry(model=n, parameters={"weight": [w.get(n, 0.0) for w in layers]}) for n in blend), **fields)


def build_layer_swap(template: LayerSwapTemplate, models: SpaceModels, *,
                     methods: Registry[MergeMethod]) -> LayerSwapSpace:
    return LayerSwapSpace(template, models, methods=methods)


SPACES.add("layer_swap", build_layer_swap, capabilities={"routing"})

__all__ = ["LayerSwapSpace", "LayerSwapTemplate", "swap_route"]
