"""Resolve a recipe's parameter values for one tensor.

Precedence, as in mergekit: a model's own ``parameters`` > the recipe's global ``parameters`` >
the method's declared default. Values are evaluated for the tensor's role:

* kind overrides (``{"attn": …, "default": …}``) pick the tensor's projection (``q`` … ``down``) when the map
  names it, else its module kind, else ``default``;
* per-layer lists interpolate linearly at ``t = layer / (num_layers - 1)`` (mergekit's gradients);
  tensors outside the layer stack (embeddings, final norm, lm_head) use ``t = 0``, as mergekit does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from evomerge.errors import ConfigError
from evomerge.io.arch import TensorRole
from evomerge.merge.methods.base import METHODS, MergeMethod
from evomerge.recipe import ParamValue, Recipe


def layer_position(layer: int | None, num_layers: int) -> float:
    """mergekit's gradient position ``t`` for a tensor: 0 outside layers, else layer / (L - 1)."""
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def evaluate(value: ParamValue, role: TensorRole, num_layers: int) -> float | bool:
    """Evaluate one parameter value for a tensor of ``role`` in a model of ``num_layers`` layers."""
    if isinstance(value, dict):
        if role.proj is not None and role.proj in value:
            value = value[role.proj]
        elif role.kind in value:
            value = value[role.kind]
        elif "default" in value:
            value = value["default"]
        else:
            raise ConfigError(
                f"parameter has overrides for {sorted(value)} but none for kind {role.kind!r} and no 'default'"
            )
    if isinstance(value, bool):
        return value
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        scaled = layer_position(role.layer, num_layers) * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * float(value[i0]) + frac * float(value[i1])
    return float(value)


@dataclass(frozen=True)
class TensorParams:
    """Everything a merge method reads for one tensor, besides the tensors themselves."""

    sp: dict[str, list[float]]
    gp: dict[str, float | bool]
    ref_sp: dict[str, float] | None


def delta_models(recipe: Recipe) -> list[str]:
    """Models that contribute a task vector, in recipe order (every listed model but the reference)."""
    ref = recipe.reference_model
    return [m.model for m in recipe.models if m.model != ref]


def validate_recipe_params(recipe: Recipe, method: MergeMethod | None = None) -> MergeMethod:
    """Check names and counts against the method's declaration; return the method."""
    method = method or METHODS.get(recipe.method)
    known = {p.name: p for p in method.params}
    for where, params in [("parameters", recipe.parameters)] + [
        (f"models[{i}].parameters", m.parameters) for i, m in enumerate(recipe.models)
    ]:
        for name in params:
            if name not in known:
                raise ConfigError(
                    f"{where}.{name}: method {method.name!r} has no parameter {name!r}; "
                    f"valid: {', '.join(sorted(known)) or '(none)'}"
                )
    for i, m in enumerate(recipe.models):
        for name in m.parameters:
            if known[name].scope == "global":
                raise ConfigError(
                    f"models[{i}].parameters.{name}: {name!r} is a global parameter of {method.name!r}; "
                    "set it under the recipe's top-level parameters"
                )
    if method.needs_base and not recipe.base_model:
        raise ConfigError(f"base_model: method {method.name!r} needs a base model")
    n = len(delta_models(recipe))
    if recipe.routing is not None and method.name == "passthrough":
        return method  # a routed recipe lists every routed model; passthrough merges none of them
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        hi = "∞" if method.max_models is None else method.max_models
        raise ConfigError(
            f"models: method {method.name!r} takes {method.min_models}..{hi} models besides the base, got {n}"
        )
    for p in method.params:
        if p.required and p.name not in recipe.parameters and not any(
            p.name in m.parameters for m in recipe.models
        ):
            raise ConfigError(f"parameters.{p.name}: required by method {method.name!r}")
    return method


def _value(
    name: str, own: Mapping[str, ParamValue], recipe: Recipe, default: float | bool | None
) -> ParamValue | None:
    if name in own:
        return own[name]
    if name in recipe.parameters:
        return recipe.parameters[name]
    return default


def tensor_params(
    recipe: Recipe, method: MergeMethod, role: TensorRole, num_layers: int, order: Sequence[str] | None = None
) -> TensorParams:
    """Resolve every declared parameter of ``method`` for one tensor.

    ``order`` lists the delta models in the order the deltas are stacked (default: recipe order).
    """
    entries = {m.model: m for m in recipe.models}
    order = list(order) if order is not None else delta_models(recipe)
    sp: dict[str, list[float]] = {}
    gp: dict[str, float | bool] = {}
    ref = recipe.reference_model
    # the reference contributes its own weight (linear, nuslerp …) only when it is listed among the models
    ref_entry = entries.get(ref)
    ref_sp: dict[str, float] | None = {} if ref_entry is not None else None
    for p in method.params:
        if p.scope == "global":
            v = _value(p.name, {}, recipe, p.default)
            if v is not None:
                gp[p.name] = evaluate(v, role, num_layers)
            continue
        vals = []
        for name in order:
            v = _value(p.name, entries[name].parameters, recipe, p.default)
            if v is None:
                raise ConfigError(f"models: {name!r} has no value for {p.name!r} (required by {method.name!r})")
            vals.append(float(evaluate(v, role, num_layers)))
        sp[p.name] = vals
        if ref_sp is not None and ref_entry is not None:
            v = _value(p.name, ref_entry.parameters, recipe, p.default)
            if v is not None:
                ref_sp[p.name] = float(evaluate(v, role, num_layers))
    return TensorParams(sp=sp, gp=gp, ref_sp=ref_sp)


__all__ = [
    "TensorParams",
    "delta_models",
    "evaluate",
    "layer_position",
    "tensor_params",
    "validate_recipe_params",
]
