"""Search-space templates: the YAML files in ``search_spaces/`` and their validated models.

A template says what a genome means, independently of the concrete models (which the run config
names). Three kinds, chosen by ``kind``:

``params`` (parameter space)::

    kind: params
    method: ties                 # a registered merge method
    granularity: per_layer       # global | per_layer | groups (with group_size)
    group_size: 4
    split_kinds: [attn, mlp]     # separate genes for these module kinds; the rest share "default"
                                 # (also projections: [q, k, v, o, gate, up, down], each its own genes)
    search: [weight, density]    # method parameters searched (default: every float per-source one)
    ranges: {density: [0.05, 1]} # decoded ranges (default: the method's natural bounds)
    allow_negative: []           # parameters whose range may go below 0
    init: {weight: 1/n, density: 0.5}   # x0: the searched parameters' start (default: the method's defaults;
                                        # an unsearched one is refused: set it under fixed)
    fixed: {lambda: 1.0}         # parameters set, not searched

``routing`` (layer routing / data flow): ``sources``, ``repeats``, ``max_layers``, ``scale``,
``frame``, ``start`` (see :class:`RoutingSection`).

``hybrid``: a ``params`` section and a ``routing`` section; the route runs over the merged model
``"@merge"`` and the sources.

``lines`` (LiNeS: ``α``, ``β`` of a per-layer ``lambda`` over a task-vector method, see
:mod:`evomerge.spaces.lines`) and ``layer_swap`` (the bottom/top ``k`` layers of one expert swapped in from
another, see :mod:`evomerge.spaces.layer_swap`); ``segments`` (M2N2's per-segment combinations).

Unknown keys are refused; every error names the file and the YAML path of the faulty value.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.builtin import read_text, resolve
from evomerge.errors import ConfigError
from evomerge.names import DType, ModuleKind, Projection
from evomerge.recipe import DataSpec, ParamValue
from evomerge.registry import Registry

_FROZEN = ConfigDict(frozen=True, extra="forbid")

Range = tuple[float, float]


def _check_range(name: str, value: Range) -> Range:
    lo, hi = value
    if not lo < hi:
        raise ValueError(f"{name}: range [{lo}, {hi}] needs low < high")
    return value


class AimGene(BaseModel):
    """AIM's ω as a gene (``aim:`` of a params section): searched over ``range`` (within ``[0, 1]``) from ``init``."""

    model_config = _FROZEN
    range: tuple[float, float] = (0.0, 1.0)
    init: float = 0.0

    @field_validator("range")
    @classmethod
    def _range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= v[0] < v[1] <= 1.0:
            raise ValueError(f"[{v[0]}, {v[1]}] must satisfy 0 <= low < high <= 1 (ω is a share)")
        return v

    @model_validator(mode="after")
    def _bounds(self) -> AimGene:
        lo, hi = self.range
        if not lo <= self.init <= hi:
            raise ValueError(f"init: {self.init} is outside the range [{lo}, {hi}]")
        return self


class ParamsSection(BaseModel):
    """Parameter space: one gene per (layer group x module kind x merged model x searched parameter)."""

    model_config = _FROZEN
    method: str = Field(min_length=1)
    #: Models merged besides the base (default: every model but the base).
    sources: list[str] | None = None
    #: Methods without a base (linear …): also merge the base model, listed first.
    include_base: bool = False
    granularity: Literal["global", "per_layer", "groups"] = "global"
    group_size: int | None = Field(default=None, ge=1)
    #: Module kinds (``attn``, ``mlp`` …) and/or projections (``q``, ``k``, ``v``, ``o``, ``gate``, ``up``,
    #: ``down``) with genes of their own; a projection's genes win over its kind's.
    split_kinds: list[ModuleKind | Projection] = Field(default_factory=list)
    search: list[str] | None = None
    ranges: dict[str, Range] = Field(default_factory=dict)
    allow_negative: list[str] = Field(default_factory=list)
    init: dict[str, float | Literal["1/n"]] = Field(default_factory=dict)
    fixed: dict[str, ParamValue] = Field(default_factory=dict)
    seed: int = 0
    dtype: DType | None = None
    #: Calibration data of a data-informed method (``fisher``, ``regmean``) or AIM (``data.aim``): the search
    #: driver computes these statistics once per source before the search; every decoded recipe carries it.
    data: DataSpec | None = None
    #: AIM's ω searched as one more gene (the ``data:`` block gives the statistics; its fixed ``aim`` stays 0).
    aim: AimGene | None = None

    @field_validator("ranges")
    @classmethod
    def _ranges(cls, v: dict[str, Range]) -> dict[str, Range]:
        for k, r in v.items():
            _check_range(k, r)
        return v

    @field_validator("split_kinds", "allow_negative")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        dup = sorted({k for k in v if v.count(k) > 1})
        if dup:
            raise ValueError(f"listed more than once: {dup}")
        return v

    @model_validator(mode="after")
    def _groups(self) -> ParamsSection:
        if self.granularity == "groups" and self.group_size is None:
            raise ValueError("granularity 'groups' needs group_size")
        if self.granularity != "groups" and self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity 'groups', not {self.granularity!r}")
        if self.search is not None:
            both = sorted(set(self.search) & set(self.fixed))
            if both:
                raise ValueError(f"parameters both searched and fixed: {both}")
            dup = sorted({k for k in self.search if self.search.count(k) > 1})
            if dup:
                raise ValueError(f"search: listed more than once: {dup}")
        return self


class ScaleSection(BaseModel):
    """Residual-stream scaling of a routed path.

    ``mode``: ``none`` (all 1); ``transition`` (one gene per ordered pair of different sources,
    applied when the path moves from one source to the other; within a source the scale is 1);
    ``pair`` (a full sources x sources matrix, also within a source); ``position`` (one gene per
    slot, applied to that slot's layer when it is on the path). The embedding counts as coming
    from the frame model.
    """

    model_config = _FROZEN
    mode: Literal["none", "transition", "pair", "position"] = "transition"
    range: Range = (0.5, 2.0)
    transform: Literal["log", "linear"] = "log"

    @field_validator("range")
    @classmethod
    def _range(cls, v: Range) -> Range:
        _check_range("range", v)
        if v[0] <= 0:
            raise ValueError(f"range [{v[0]}, {v[1]}]: scales must be > 0")
        if not v[0] <= 1.0 <= v[1]:
            raise ValueError(f"range [{v[0]}, {v[1]}] must contain 1 (the start route is unscaled)")
        return v


class RoutingSection(BaseModel):
    """Layer routing (data-flow space), after Akiba et al. 2024 (arXiv 2403.13187), section 3.2.

    The layers of the sources are laid out in order (all of source 1, then all of source 2 …) and
    the layout is repeated ``repeats`` times: ``T = repeats x sources x num_layers`` slots, one
    include gene each; a slot is on the path when its gene is > 0.5. The path keeps layout order.
    ``max_layers`` bounds the path length: an integer, or ``"<f>x"`` for ``floor(f x num_layers)``
    (at least 1); unset = no bound beyond ``T``.
    """

    model_config = _FROZEN
    #: Models laid out (default: every model but the base; a hybrid adds "@merge" first).
    sources: list[str] | None = None
    include_base: bool = False
    repeats: int = Field(default=2, ge=1)
    max_layers: int | Annotated[str, Field(pattern=r"^\d+(\.\d+)?x$")] | None = None
    scale: ScaleSection = Field(default_factory=ScaleSection)
    #: Model giving embeddings, final norm and head (default: ``start``).
    frame: str | None = None
    #: x0 route: every layer of this model once, in order, unscaled (default: the first source).
    start: str | None = None
    #: x0 include genes are 0.5 + margin (on the start route) or 0.5 - margin (off it).
    init_margin: float = Field(default=0.25, gt=0.0, le=0.5)

    @field_validator("max_layers")
    @classmethod
    def _max_layers(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError("max_layers must be >= 1")
        if isinstance(v, str) and float(v[:-1]) <= 0:
            raise ValueError("max_layers factor must be > 0")
        return v


class ParamsTemplate(ParamsSection):
    """A parameter-space template (``kind: params``)."""

    kind: Literal["params"]
    description: str = ""


class RoutingTemplate(RoutingSection):
    """A layer-routing template (``kind: routing``)."""

    kind: Literal["routing"]
    description: str = ""
    seed: int = 0
    dtype: DType | None = None


class HybridTemplate(BaseModel):
    """A hybrid template (``kind: hybrid``): parameter-space genes, then routing genes over ``"@merge"``."""

    model_config = _FROZEN
    kind: Literal["hybrid"]
    description: str = ""
    params: ParamsSection
    routing: RoutingSection = Field(default_factory=RoutingSection)


SpaceTemplate = ParamsTemplate | RoutingTemplate | HybridTemplate

#: Template models by ``kind``. A new space kind registers its template model here and its
#: factory in ``evomerge.spaces.base.SPACES`` under the same name.
TEMPLATE_KINDS: Registry[type[BaseModel]] = Registry("search space template kind")
TEMPLATE_KINDS.add("params", ParamsTemplate)
TEMPLATE_KINDS.add("routing", RoutingTemplate)
TEMPLATE_KINDS.add("hybrid", HybridTemplate)
TEMPLATE_KINDS.register_lazy("segments", "evomerge.spaces.segments:SegmentsTemplate")
TEMPLATE_KINDS.register_lazy("lines", "evomerge.spaces.lines:LinesTemplate")
TEMPLATE_KINDS.register_lazy("layer_swap", "evomerge.spaces.layer_swap:LayerSwapTemplate")


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def parse_template(data: Any, *, source: str = "search space") -> Any:
    """Validate a template from plain data; errors name ``source`` and the YAML path of each bad value."""
    if isinstance(data, BaseModel) and getattr(data, "kind", None) in TEMPLATE_KINDS:
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a search-space template is a mapping, got {type(data).__name__}")
    kind = data.get("kind")
    if kind is None:
        raise ConfigError(f"{source}: kind: missing; use one of {', '.join(TEMPLATE_KINDS.names())}")
    if not isinstance(kind, str) or kind not in TEMPLATE_KINDS:
        raise ConfigError(f"{source}: kind: unknown kind {kind!r}; use one of {', '.join(TEMPLATE_KINDS.names())}")
    try:
        return TEMPLATE_KINDS.get(kind).model_validate(data)
    except ValidationError as exc:
        msgs = [f"{_loc(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{source}: " + "; ".join(msgs)) from None


def load_template(ref: str | Path, *, base_dir: Path | None = None) -> Any:
    """Load ``builtin:NAME`` or a YAML file path (relative to ``base_dir``) as a validated template."""
    path = resolve(ref, "search_spaces", base_dir=base_dir)
    try:
        data = yaml.safe_load(read_text(path))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_template(data, source=str(path))


def builtin_templates() -> list[str]:
    """Names of the built-in templates (usable as ``builtin:NAME``)."""
    from evomerge.builtin import builtin_dir

    return sorted(p.stem for p in builtin_dir("search_spaces").glob("*.yaml"))


__all__ = [
    "HybridTemplate",
    "ParamsSection",
    "ParamsTemplate",
    "RoutingSection",
    "RoutingTemplate",
    "ScaleSection",
    "SpaceTemplate",
    "TEMPLATE_KINDS",
    "builtin_templates",
    "load_template",
    "parse_template",
]
