"""The LiNeS space: two genes that scale a task-vector merge linearly with depth.

LiNeS ("Layer-increasing network scaling", Wang et al., ICLR 2025, arXiv 2410.17146) scales the merged task
vector of layer ``l`` (of ``L``) by ``λ_l = α + β · l / (L − 1)``: shallow layers stay near the base, deep layers
keep the task-specific update. Here the merged task vector is whatever a task-vector method (one with the
global ``lambda`` that scales its merged task vector: ``task_arithmetic``, ``ties``, ``dare_ties``,
``breadcrumbs`` …) computes from the template's ``fixed`` parameters, and the space writes ``lambda`` as a
per-layer list ``[λ_0, …, λ_{L−1}]``. Tensors outside the layer stack (embeddings, final norm, LM head) take
the value at ``t = 0``, ``α``, as every per-layer list in a recipe does (mergekit's gradient rule). The list
exports to mergekit as a gradient, so a LiNeS recipe is a plain mergekit config.

Template (``kind: lines``)::

    kind: lines
    method: task_arithmetic     # any method with a global 'lambda'
    sources: null               # merged models (default: every model but the base)
    fixed: {weight: 1.0}        # the method's other parameters (here: the sum of the task vectors)
    alpha: {range: [0.0, 1.5], init: 1/n}
    beta: {range: [0.0, 1.5], init: 0.5}

Genes (``[0, 1]``, linear over each range): ``alpha``, ``beta``. ``x0`` decodes to the ``init`` values:
``1/n`` is one over the number of merged models.

Defaults, from the authors' code (wang-kee/LiNeS, ``src/eval/eval.py``: ``LiNeS_scaling`` and ``evaluate``): for
multi-task merging ``alpha = (||sum_t tau_t||_1 / ||tau_merged||_1) / T`` for ``T`` tasks, which is ``1/n`` for
task arithmetic (the merged vector is the sum), and ``beta`` is chosen on validation from ``0.1, 0.2, ..., 1.0``:
it has no data-free value, and ``0.5`` (the grid's middle) is the hand-set start here. Over another method
(TIES …) the code's ``alpha`` also carries that L1 norm ratio, which a template cannot know before the
merge: the ``lines-ties`` template starts at ``1/n`` and leaves the ratio to the search. Tensors outside
the blocks get ``alpha`` there too, as here.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod
from evomerge.names import DType
from evomerge.recipe import ParamValue, Recipe
from evomerge.registry import Registry
from evomerge.spaces.base import SPACES, GeneInfo, GeneSpace, SpaceModels, Transform
from evomerge.spaces.params import ParamGenes, check_recipe
from evomerge.spaces.template import ParamsSection, Range

_FROZEN = ConfigDict(frozen=True, extra="forbid")
SCALE = "lambda"


class LinesGene(BaseModel):
    """The decoded range of one LiNeS gene and its start value (``1/n``: one over the merged models)."""

    model_config = _FROZEN
    range: Range
    init: float | Literal["1/n"]

    @field_validator("range")
    @classmethod
    def _range(cls, v: Range) -> Range:
        if not v[0] < v[1]:
            raise ValueError(f"range [{v[0]}, {v[1]}] needs low < high")
        return v


class LinesTemplate(BaseModel):
    """A LiNeS template (``kind: lines``; see the module docstring)."""

    model_config = _FROZEN
    kind: Literal["lines"]
    description: str = ""
    method: str = Field(min_length=1)
    sources: list[str] | None = None
    fixed: dict[str, ParamValue] = Field(default_factory=dict)
    alpha: LinesGene = LinesGene(range=(0.0, 1.5), init="1/n")
    beta: LinesGene = LinesGene(range=(0.0, 1.5), init=0.5)
    seed: int = 0
    dtype: DType | None = None


def lines_scales(alpha: float, beta: float, num_layers: int) -> list[float]:
    """``λ_l = α + β · l / (L − 1)`` for ``l = 0 … L − 1`` (one layer: ``α + β``), rounded to 12 digits."""
    if num_layers == 1:
        return [float(f"{alpha + beta:.12g}")]
    return [float(f"{alpha + beta * layer / (num_layers - 1):.12g}") for layer in range(num_layers)]


class LinesSpace(GeneSpace):
    """LiNeS over a task-vector method (see the module docstring)."""

    kind = "lines"

    def __init__(self, template: LinesTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> None:
        self.template = template
        self.models = models
        if SCALE in template.fixed:
            raise ConfigError(f"fixed.{SCALE}: LiNeS sets {SCALE!r} per layer; remove it from fixed")
        section = ParamsSection(method=template.method, sources=template.sources, search=[],
                                fixed=template.fixed, seed=template.seed, dtype=template.dtype)
        self.block = ParamGenes(section, models, methods)
        method = self.block.method
        spec = next((p for p in method.params if p.name == SCALE), None)
        if spec is None or spec.scope != "global" or spec.is_bool:
            raise ConfigError(
                f"method: {method.name!r} has no global {SCALE!r} scaling its merged task vector; LiNeS needs a "
                "task-vector method (task_arithmetic, ties, dare_ties, …)"
            )
        n = len(self.block.merged)
        self.transforms: list[Transform] = []
        genes, x0 = [], []
        for name, g, what in (("alpha", template.alpha, "λ of the first layer (and of tensors outside the layers)"),
                              ("beta", template.beta, "increase of λ from the first to the last layer")):
            t = Transform(float(g.range[0]), float(g.range[1]))
            init = 1.0 / n if g.init == "1/n" else float(g.init)
            if not t.low <= init <= t.high:
                raise ConfigError(f"{name}.init: {init:g} is outside the range [{t.low:g}, {t.high:g}]")
            self.transforms.append(t)
            genes.append(GeneInfo(name, what, t.low, t.high, t.describe(), init))
            x0.append(t.gene(init))
        super().__init__(genes, x0, f"search space 'lines' (LiNeS over {method.name}, {models.num_layers} layers)")
        check_recipe(self.decode(self.x0), method, "search space")

    def decode(self, genome: Any) -> Recipe:
        unit = self.unit(genome)
        alpha, beta = (t.value(float(g)) for t, g in zip(self.transforms, unit, strict=True))
        fields = self.block.recipe_fields(np.zeros(0))
        fields["parameters"] = {**fields["parameters"], SCALE: lines_scales(alpha, beta, self.models.num_layers)}
        return Recipe(**fields)


def build_lines(template: LinesTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> LinesSpace:
    return LinesSpace(template, models, methods=methods)


SPACES.add("lines", build_lines, capabilities={"lines"})

__all__ = ["LinesSpace", "LinesTemplate", "lines_scales"]
