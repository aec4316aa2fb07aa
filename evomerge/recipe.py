"""The Recipe: the complete, serializable description of one merged model.

Same recipe + same sources => the same tensors, bit for bit. A recipe has a stable content hash
(``Recipe.hash``) used as the cache key everywhere; the hash covers everything that changes the
tensors and nothing else (not the folder paths in ``sources``).

Parameter values (``ParamValue``) are, per model or global:

* a scalar: ``0.5``;
* a per-layer list ("gradient", as in mergekit): ``[0.2, 0.8]`` interpolated linearly across the
  layers (a list as long as the model has layers gives one value per layer);
* overrides by module kind: ``{"attn": 0.3, "mlp": [0.1, 0.9], "default": 0.5}``; kinds are
  ``embed, attn, mlp, norm, lm_head, other``; ``default`` applies to the rest. Overrides may also name
  projections (``q, k, v, o, gate, up, down``), which win over their kind: ``{"q": 0.2, "attn": 0.3}`` gives
  the query projection 0.2 and the rest of attention 0.3.

Layer routing (``routing``) describes a data-flow merge: which layer of which model runs at each
position, with a scale applied to the residual stream entering that layer. A step may name the
reserved model ``"@merge"``: the parameter-space merge that the rest of the recipe defines (hybrid).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.names import PARAM_KEYS, DType

MERGED = "@merge"

Scalar = float | bool
LayerValue = float | list[float]
ParamValue = bool | float | list[float] | dict[str, LayerValue]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
# libyaml's safe dumper/loader when available (same output, ~10x faster than the pure-Python ones)
_Dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_param(name: str, value: Any) -> Any:
    if isinstance(value, dict):
        bad = sorted(set(value) - set(PARAM_KEYS) - {"default"})
        if bad:
            raise ValueError(
                f"parameter {name!r}: unknown module kind(s) {bad}; use {', '.join(PARAM_KEYS)} or default"
            )
        for k, v in value.items():
            if isinstance(v, list) and not v:
                raise ValueError(f"parameter {name!r}[{k!r}]: empty per-layer list")
    elif isinstance(value, list) and not value:
        raise ValueError(f"parameter {name!r}: empty per-layer list")
    return value


class ModelEntry(BaseModel):
    """One input model of a merge and its per-model parameters."""

    model_config = _FROZEN
    model: str = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, val in v.items():
            _check_param(k, val)
        return v


class RouteStep(BaseModel):
    """One position of a routed model: layer ``layer`` of ``model``, input residual scaled by ``scale``."""

    model_config = _FROZEN
    model: str = Field(min_length=1)
    layer: int = Field(ge=0)
    scale: float = 1.0


class Routing(BaseModel):
    """Layer routing: the ordered path of layers, and which model gives embeddings, final norm and head."""

    model_config = _FROZEN
    steps: tuple[RouteStep, ...] = Field(min_length=1)
    frame: str = Field(min_length=1, description="model providing embed_tokens, the final norm and lm_head")


class DataSpec(BaseModel):
    """Where a data-informed recipe's statistics come from, and what the materializer does with them.

    ``fallback`` merges the tensors a method has no statistics for (regmean: everything but linear weights;
    both: layers beyond ``max_gram_features``); it reads the recipe's parameters it declares. ``aim`` is
    AIM's ω (0: no adjustment), applied on top of the recipe's method (see :func:`evomerge.merge.stats.aim_adjust`).
    ``model_tasks`` gives a model the tasks its own statistics come from (the RegMean and Fisher papers' setting:
    each fine-tuned model's statistics on its own task's data); the models it leaves out read ``tasks``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")
    suite: str = Field(min_length=1, description="task suite (builtin:NAME or a YAML path)")
    split: Literal["calibration"] = "calibration"
    tasks: tuple[str, ...] | None = None
    examples: int | None = Field(default=None, ge=1, description="examples per task (deterministic subset)")
    max_gram_features: int = Field(default=4096, ge=1)
    fallback: str = "linear"
    aim: float = Field(default=0.0, ge=0.0, le=1.0)
    model_tasks: dict[str, tuple[str, ...]] | None = None

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and not v:
            raise ValueError("tasks: empty list; omit it to use every task of the suite")
        return v

    @field_validator("model_tasks")
    @classmethod
    def _model_tasks(cls, v: dict[str, tuple[str, ...]] | None) -> dict[str, tuple[str, ...]] | None:
        if v is not None:
            if not v:
                raise ValueError("model_tasks: empty mapping; omit it to give every model the same tasks")
            for m, tasks in v.items():
                if not tasks:
                    raise ValueError(f"model_tasks.{m}: empty list of tasks")
        return v

    def for_model(self, model: str) -> DataSpec:
        """The example set of ``model``'s statistics: ``model_tasks[model]`` when given, else ``tasks``."""
        tasks = (self.model_tasks or {}).get(model)
        return self if tasks is None else self.model_copy(update={"tasks": tasks, "model_tasks": None})


class Recipe(BaseModel):
    """A merge recipe (see the module docstring)."""

    model_config = _FROZEN
    schema_version: Literal[1] = 1
    method: str = Field(min_length=1)
    models: tuple[ModelEntry, ...] = Field(min_length=1)
    base_model: str | None = None
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    dtype: DType | None = None
    seed: int = 0
    #: Output vocabulary: ``base``, ``union`` or a model name (see :mod:`evomerge.merge.vocab`); unset: as stored.
    tokenizer_source: str | None = None
    #: Round the merged vocabulary's embedding rows up to a multiple of this (mergekit's
    #: ``tokenizer.pad_to_multiple_of``).
    pad_to_multiple_of: int | None = Field(default=None, ge=1)
    routing: Routing | None = None
    #: Where a data-informed merge's statistics come from (``fisher``, ``regmean``, AIM); see
    #: :mod:`evomerge.merge.stats`. Unset for every other recipe (and then absent from the hash).
    data: DataSpec | None = None
    #: Model name -> folder. Binding only: not part of the hash.
    sources: dict[str, str] = Field(default_factory=dict)

    @field_validator("parameters")
    @classmethod
    def _params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, val in v.items():
            _check_param(k, val)
        return v

    @model_validator(mode="after")
    def _names(self) -> Recipe:
        names = [m.model for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"models: listed more than once: {dup}")
        known = set(names) | ({self.base_model} if self.base_model else set())
        if self.tokenizer_source not in (None, "base", "union") and self.tokenizer_source not in known:
            raise ValueError(f"tokenizer_source {self.tokenizer_source!r} is not one of the recipe's models")
        if self.routing is not None:
            known_r = known | {MERGED}
            for i, step in enumerate(self.routing.steps):
                if step.model not in known_r:
                    raise ValueError(f"routing.steps[{i}].model {step.model!r} is not one of the recipe's models")
            if self.routing.frame not in known_r:
                raise ValueError(f"routing.frame {self.routing.frame!r} is not one of the recipe's models")
        if self.data is not None and self.data.model_tasks:
            bad = sorted(set(self.data.model_tasks) - known)
            if bad:
                raise ValueError(f"data.model_tasks: {bad} are not models of the recipe ({sorted(known)})")
        return self

    # ----------------------------------------------------------------- identity
    def canonical(self) -> dict[str, Any]:
        """The JSON-able content that defines the tensors (no paths), with sorted keys."""
        data = self.model_dump(mode="json", exclude={"sources"})
        if data.get("pad_to_multiple_of") is None:  # absent from recipes written before it existed
            data.pop("pad_to_multiple_of", None)
        if data.get("data") is None:  # absent from recipes that read no calibration data
            data.pop("data", None)
        elif data["data"].get("model_tasks") is None:  # absent from recipes written before it existed
            data["data"].pop("model_tasks", None)
        return data

    @property
    def hash(self) -> str:
        """Stable content hash (hex, 16 chars) of :meth:`canonical`."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.blake2b(blob.encode(), digest_size=8).hexdigest()

    # ----------------------------------------------------------------- YAML
    def to_yaml(self) -> str:
        data = self.model_dump(mode="json", exclude_defaults=True)
        data = {"method": data.pop("method"), **data}
        return yaml.dump(data, Dumper=_Dumper, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.model_validate(yaml.load(text, Loader=_Loader))

    @property
    def reference_model(self) -> str:
        """The model task vectors are taken from: ``base_model``, else the first listed model."""
        return self.base_model if self.base_model else self.models[0].model

    @property
    def model_names(self) -> list[str]:
        """Every model the recipe reads, base first when there is one."""
        names = [m.model for m in self.models]
        if self.base_model and self.base_model not in names:
            names.insert(0, self.base_model)
        return names
