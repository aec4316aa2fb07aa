"""Parameter space (PS): genes for a merge method's parameters, per layer group, module kind and model.

Genes: for every searched parameter of the method (read from its ``ParamSpec``s in ``METHODS``,
never restated here), one gene per

* merged model (per-source parameters such as ``weight``, ``density``) or once (global ones such as ``t``);
* module-kind slot: one ``default`` slot, or one per kind or projection in ``split_kinds`` plus ``default`` for
  the remaining kinds present (``embed`` and ``lm_head`` slots have a single gene: they have no layers); a
  projection slot (``q`` … ``down``, "Leveraging Submodule Linearity", arXiv 2504.10902) covers that projection
  of every layer, a kind slot the kind's other tensors;
* layer group: 1 (``global``), ``num_layers`` (``per_layer``) or ``ceil(num_layers / group_size)``
  (``groups``; the last group may be shorter).

A gene ``g`` in ``[0, 1]`` decodes linearly to ``low + g * (high - low)`` over the parameter's range.
Decoded values go into the recipe as a scalar (global granularity), a per-layer list of length
``num_layers`` (value ``i`` for layer ``i``; groups repeat their value over their layers), or a
``{kind: …, default: …}`` dict when kinds are split. ``x0`` decodes to the hand-set merge of the
template's ``init`` values (``"1/n"`` = one over the number of merged models) or the method's defaults.

``aim: {range, init}`` adds one last gene: AIM's ω (arXiv 2502.02421), written into the ``data:`` block of
every decoded recipe (the section must have one: the adjustment reads the base's activations on its data).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod, ParamSpec
from evomerge.recipe import ModelEntry, ParamValue, Recipe
from evomerge.registry import Registry
from evomerge.spaces.base import SPACES, Array, GeneInfo, GeneSpace, SpaceModels, Transform
from evomerge.spaces.template import ParamsSection, ParamsTemplate

logger = logging.getLogger(__name__)

_LAYERLESS = ("embed", "lm_head")


@dataclass(frozen=True)
class _Searched:
    """One searched parameter: its spec, its decoded range and its start value."""

    spec: ParamSpec
    transform: Transform
    init: float


@dataclass(frozen=True)
class _Slot:
    """One module-kind slot: its key in the recipe dict (``default`` or a kind) and its layer groups."""

    key: str
    groups: tuple[tuple[int, int], ...]  # (first layer, last layer), inclusive; () = no layers


def _groups(section: ParamsSection, num_layers: int) -> tuple[tuple[int, int], ...]:
    if section.granularity == "global":
        return ((0, num_layers - 1),)
    size = 1 if section.granularity == "per_layer" else int(section.group_size or 1)
    return tuple((a, min(a + size, num_layers) - 1) for a in range(0, num_layers, size))


class ParamGenes:
    """The PS gene block of a template section for given models; reused by the hybrid space."""

    def __init__(self, section: ParamsSection, models: SpaceModels, methods: Registry[MergeMethod], where: str = ""):
        self.section = section
        self.models = models
        self.where = where
        self.method = methods.get(section.method)
        self.num_layers = models.num_layers
        self.merged = self._merged_models()
        self.searched = self._searched()
        self.slots = self._slots()
        self.fixed = self._fixed()
        self.genes, self._x0 = self._layout()
        #: AIM's ω as the block's last gene (``aim:``), or None
        self.aim: Transform | None = None
        unknown = sorted(set((section.data.model_tasks or {}) if section.data else ()) - set(models.names))
        if unknown:
            raise ConfigError(f"{self._field('data.model_tasks')}: {unknown} are not source models "
                              f"({', '.join(models.names)})")
        if section.aim is not None:
            if section.data is None:
                raise ConfigError(f"{self._field('aim')}: AIM adjusts the merge by the base's activations on "
                                  "calibration data; give the section a data: block (suite, examples …)")
            if section.data.aim > 0:
                raise ConfigError(f"{self._field('data.aim')}: a fixed ω beside the aim: gene; drop one of them")
            self.aim = Transform(*section.aim.range)
            self.genes.append(GeneInfo("aim", "AIM's ω (activation-informed adjustment towards the base)",
                                       self.aim.low, self.aim.high, self.aim.describe(), section.aim.init))
            self._x0.append(self.aim.gene(section.aim.init))

    # ------------------------------------------------------------- construction
    def _field(self, name: str) -> str:
        return f"{self.where}{name}"

    def _merged_models(self) -> list[str]:
        s, m = self.section, self.models
        chosen = list(s.sources) if s.sources is not None else list(m.sources)
        unknown = [n for n in chosen if n not in m.names]
        if unknown:
            raise ConfigError(f"{self._field('sources')}: unknown model(s) {unknown}; models are {list(m.names)}")
        if self.method.needs_base:
            if m.base is None:
                raise ConfigError(f"{self._field('method')}: {self.method.name!r} needs a base model; none given")
            if m.base in chosen:
                raise ConfigError(f"{self._field('sources')}: the base {m.base!r} cannot also be a merged source")
            if s.include_base:
                raise ConfigError(f"{self._field('include_base')}: {self.method.name!r} always uses the base")
        elif s.include_base:
            if m.base is None:
                raise ConfigError(f"{self._field('include_base')}: no base model is given")
            chosen = [m.base] + [n for n in chosen if n != m.base]
        if not chosen:
            raise ConfigError(f"{self._field('sources')}: no model to merge")
        return chosen

    def _spec(self, name: str, field: str) -> ParamSpec:
        try:
            return self.method.param(name)
        except KeyError:
            valid = ", ".join(p.name for p in self.method.params) or "(none)"
            raise ConfigError(
                f"{self._field(field)}: method {self.method.name!r} has no parameter {name!r}; valid: {valid}"
            ) from None

    def _searched(self) -> list[_Searched]:
        s = self.section
        for field_name, names in (("ranges", s.ranges), ("init", s.init), ("fixed", s.fixed),
                                  ("allow_negative", s.allow_negative)):
            for name in names:
                self._spec(name, f"{field_name}.{name}")
        if s.search is not None:
            names = list(s.search)
        else:
            names = [p.name for p in self.method.params
                     if p.scope == "source" and not p.is_bool and p.name not in s.fixed]
        specs = [self._spec(name, f"search[{i}]") for i, name in enumerate(names)]
        for name in s.init:
            if name not in names:  # a start value of a parameter no gene holds would be ignored
                raise ConfigError(f"{self._field(f'init.{name}')}: {name!r} is not searched (search: {names}); "
                                  "set its value under fixed")
        for i, spec in enumerate(specs):
            if spec.is_bool:
                raise ConfigError(f"{self._field(f'search[{i}]')}: {spec.name!r} is a boolean; set it under fixed")
        out = []
        for spec in specs:
            transform = self._range(spec)
            out.append(_Searched(spec, transform, self._init(spec, transform)))
        return out

    def _range(self, spec: ParamSpec) -> Transform:
        name, s = spec.name, self.section
        natural = spec.bounds
        negative = name in s.allow_negative
        if natural is not None and negative:
            natural = (min(natural[0], -abs(natural[1])), natural[1])
        if name in s.ranges:
            lo, hi = s.ranges[name]
            if lo < 0 and not negative:
                raise ConfigError(
                    f"{self._field(f'ranges.{name}')}: [{lo}, {hi}] goes below 0; add {name} to allow_negative"
                )
            if natural is not None and (lo < natural[0] or hi > natural[1]):
                logger.debug(
                    "%s: [%g, %g] reaches beyond the natural bounds [%g, %g] of %s.%s",
                    self._field(f"ranges.{name}"), lo, hi, natural[0], natural[1], self.method.name, name,
                )
        elif natural is not None:
            lo, hi = natural
            if lo < 0 and not negative:
                lo = 0.0
        else:
            raise ConfigError(
                f"{self._field(f'ranges.{name}')}: {self.method.name}.{name} has no natural bounds; give a range"
            )
        return Transform(float(lo), float(hi))

    def _init(self, spec: ParamSpec, transform: Transform) -> float:
        raw = self.section.init.get(spec.name, spec.default)
        if raw == "1/n":
            value = 1.0 / len(self.merged)
        elif raw is None or isinstance(raw, bool):
            raise ConfigError(
                f"{self._field(f'init.{spec.name}')}: {self.method.name}.{spec.name} has no default; give a start value"
            )
        else:
            value = float(raw)
        if not transform.low <= value <= transform.high:
            raise ConfigError(
                f"{self._field(f'init.{spec.name}')}: {value} is outside the range [{transform.low}, {transform.high}]"
            )
        return value

    def _slots(self) -> list[_Slot]:
        present = self.models.module_kinds | self.models.projections
        split = [k for k in self.section.split_kinds if k in present]
        skipped = [k for k in self.section.split_kinds if k not in present]
        if skipped:
            logger.info("split_kinds %s: not present in the models; no genes for them", skipped)
        groups = _groups(self.section, self.num_layers)
        slots = [_Slot(k, () if k in _LAYERLESS else groups) for k in split]
        rest = set(self.models.module_kinds) - set(split)
        if not split:
            return [_Slot("default", groups)]
        if rest:
            slots.append(_Slot("default", () if rest <= set(_LAYERLESS) else groups))
        return slots

    def _fixed(self) -> dict[str, tuple[str, ParamValue]]:
        out: dict[str, tuple[str, ParamValue]] = {}
        for name, value in self.section.fixed.items():
            spec = self.method.param(name)
            if spec.is_bool != isinstance(value, bool):
                want = "true or false" if spec.is_bool else "a number, a per-layer list or a {kind: value} map"
                raise ConfigError(f"{self._field(f'fixed.{name}')}: {self.method.name}.{name} takes {want}")
            out[name] = (spec.scope, value)
        return out

    def _layout(self) -> tuple[list[GeneInfo], list[float]]:
        genes: list[GeneInfo] = []
        x0: list[float] = []
        for p in self.searched:
            owners = self.merged if p.spec.scope == "source" else [None]
            for owner in owners:
                for slot in self.slots:
                    for a, b in slot.groups or ((None, None),):
                        genes.append(self._gene(p, owner, slot, a, b))
                        x0.append(p.transform.gene(p.init))
        return genes, x0

    def _gene(self, p: _Searched, owner: str | None, slot: _Slot, a: int | None, b: int | None) -> GeneInfo:
        name = p.spec.name + (f"[{owner}]" if owner else "")
        what = f"{p.spec.name} of {owner!r}" if owner else f"{p.spec.name} (global)"
        if len(self.slots) > 1 or slot.key != "default":
            name += f".{slot.key}"
            what += " for " + ("other tensors" if slot.key == "default" else f"{slot.key} tensors")
        if a is not None and self.section.granularity != "global":
            name += f".L{a}" if a == b else f".L{a}-{b}"
            what += f", layer {a}" if a == b else f", layers {a}-{b}"
        return GeneInfo(name, what, p.transform.low, p.transform.high, p.transform.describe(), p.init)

    # ------------------------------------------------------------- decoding
    @property
    def dim(self) -> int:
        return len(self.genes)

    @property
    def x0(self) -> Array:
        return np.asarray(self._x0, dtype=np.float64)

    def _values(self, unit: Array, pos: int, transform: Transform) -> tuple[ParamValue, int]:
        L = self.num_layers
        out: dict[str, Any] = {}
        for slot in self.slots:
            if not slot.groups or self.section.granularity == "global":
                out[slot.key] = transform.value(float(unit[pos]))
                pos += 1
            else:
                per_layer = [0.0] * L
                for a, b in slot.groups:
                    v = transform.value(float(unit[pos]))
                    pos += 1
                    for layer in range(a, b + 1):
                        per_layer[layer] = v
                out[slot.key] = per_layer
        value: ParamValue = out["default"] if list(out) == ["default"] else out
        return value, pos

    def decode_parts(self, unit: Array) -> tuple[list[ModelEntry], dict[str, ParamValue]]:
        """Model entries and global parameters encoded by ``unit`` (already clipped to ``[0, 1]``)."""
        own: dict[str, dict[str, ParamValue]] = {m: {} for m in self.merged}
        glob: dict[str, ParamValue] = {}
        for name, (scope, value) in self.fixed.items():
            if scope == "source":
                for m in self.merged:
                    own[m][name] = value
            else:
                glob[name] = value
        pos = 0
        for p in self.searched:
            if p.spec.scope == "source":
                for m in self.merged:
                    own[m][p.spec.name], pos = self._values(unit, pos, p.transform)
            else:
                glob[p.spec.name], pos = self._values(unit, pos, p.transform)
        entries = [ModelEntry(model=m, parameters=own[m]) for m in self.merged]
        return entries, glob

    def encode(self, recipe: Recipe, where: str = "recipe") -> Array:
        """The genome whose genes hold ``recipe``'s values (the inverse of decoding, up to clipping).

        Each gene takes the recipe's value at the first layer of its group, for its slot: a projection slot
        reads that projection (``q`` …), a kind slot that kind, ``default`` the first present kind no slot
        takes (norms first). A value outside the gene's range is clipped to it. Exact when the recipe is one
        this block decodes to, such as a recipe of the same method with coarser groups or kinds: so a space
        split per projection starts at the best recipe of a space split per kind (the grouped-then-refined
        schedule, ``space.start_from``). The method and the merged models must be the block's.
        """
        from evomerge.io.arch import TensorRole
        from evomerge.merge.tensor_params import evaluate
        from evomerge.names import PROJECTION_KIND

        if recipe.method != self.method.name:
            raise ConfigError(f"{where}: method {recipe.method!r} differs from the space's {self.method.name!r}")
        merged = [m.model for m in recipe.models]
        if sorted(merged) != sorted(self.merged):
            raise ConfigError(f"{where}: merges {merged}; the space merges {self.merged}")
        entries = {m.model: m for m in recipe.models}
        taken = {sl.key for sl in self.slots}
        rest = [k for k in ("norm", "other", "attn", "mlp", "embed", "lm_head")
                if k in self.models.module_kinds and k not in taken]

        def role(key: str, layer: int | None) -> TensorRole:
            if key in PROJECTION_KIND:
                return TensorRole(layer, PROJECTION_KIND[key], key)  # type: ignore[arg-type]
            kind = key if key != "default" else (rest[0] if rest else "other")
            return TensorRole(None if kind in _LAYERLESS else layer, kind)  # type: ignore[arg-type]

        out: list[float] = []
        for p in self.searched:
            owners = self.merged if p.spec.scope == "source" else [None]
            for owner in owners:
                own = entries[owner].parameters if owner else {}
                value = own.get(p.spec.name, recipe.parameters.get(p.spec.name, p.spec.default))
                if value is None or isinstance(value, bool):
                    raise ConfigError(f"{where}: no value for {p.spec.name!r}" + (f" of {owner!r}" if owner else ""))
                for slot in self.slots:
                    for a, _b in slot.groups or ((None, None),):
                        v = float(evaluate(value, role(slot.key, a), self.num_layers))
                        v = min(max(v, p.transform.low), p.transform.high)
                        out.append(p.transform.gene(v))
        if self.aim is not None:
            w = recipe.data.aim if recipe.data is not None else 0.0
            out.append(self.aim.gene(min(max(w, self.aim.low), self.aim.high)))
        return np.asarray(out, dtype=np.float64)

    def recipe_fields(self, unit: Array) -> dict[str, Any]:
        entries, glob = self.decode_parts(unit)
        s = self.section
        return {
            "method": self.method.name,
            "models": entries,
            "base_model": self.models.base if self.method.needs_base else None,
            "parameters": glob,
            "seed": s.seed,
            "dtype": s.dtype,
            "data": self._data(unit),
            **self.models.vocab_fields,
        }

    def _data(self, unit: Array) -> Any:
        data = self.section.data
        if self.aim is None or data is None:
            return data
        return data.model_copy(update={"aim": self.aim.value(float(unit[self.dim - 1]))})

    def stats_unit(self) -> Array:
        """A point whose recipe reads every statistic any point of the block reads (the aim gene at its high)."""
        unit = self.x0.copy()
        if self.aim is not None:
            unit[self.dim - 1] = 1.0
        return unit


def check_recipe(recipe: Recipe, method: MergeMethod, where: str) -> None:
    """Validate a decoded recipe against its method (names, scopes, model counts, required parameters)."""
    from evomerge.merge.tensor_params import validate_recipe_params

    try:
        validate_recipe_params(recipe, method)
    except ConfigError as exc:
        raise ConfigError(f"{where}: the template gives an invalid recipe: {exc}") from None


class ParamSpace(GeneSpace):
    """Parameter space over one merge method (see the module docstring)."""

    kind = "params"

    def __init__(self, template: ParamsSection, models: SpaceModels, *, methods: Registry[MergeMethod]) -> None:
        self.template = template
        self.block = ParamGenes(template, models, methods)
        title = f"search space 'params' ({self.block.method.name}, {template.granularity})"
        super().__init__(self.block.genes, self.block.x0, title)
        check_recipe(self.decode(self.x0), self.block.method, "search space")

    @property
    def param_genes(self) -> ParamGenes:
        return self.block

    def decode(self, genome: Any) -> Recipe:
        return Recipe(**self.block.recipe_fields(self.unit(genome)))


def build_params(template: ParamsTemplate, models: SpaceModels, *, methods: Registry[MergeMethod]) -> ParamSpace:
    return ParamSpace(template, models, methods=methods)


SPACES.add("params", build_params, capabilities={"params"})

__all__ = ["ParamGenes", "ParamSpace", "check_recipe"]
