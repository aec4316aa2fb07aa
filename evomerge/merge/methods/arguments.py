"""Resolving and checking what a merge method reads for one tensor.

A method's declared :class:`ParamSpec` list is the single source of truth: :func:`resolve` fills
defaults from it, refuses missing required values and wrong lengths, checks the number of models
against the declaration, and :func:`work_dtype` picks the dtype the arithmetic runs in.

Numerics: ``float64`` inputs are merged in ``float64``; ``float32``, ``float16`` and ``bfloat16``
inputs are merged in ``float32`` and the result is rounded once to the dtype of ``base``. (mergekit
computes linear and slerp the same way; its task-vector methods, nuslerp and model_stock compute in
the input dtype, so for half-precision inputs our result is the correctly rounded value of the same
formula and may differ from mergekit's by the rounding of its intermediate half-precision steps.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from evomerge.errors import ConfigError, MaterializeError
from evomerge.merge.methods.base import METHODS, MergeMethod

__all__ = ["Arguments", "check_range", "require_generator", "resolve", "work_dtype"]

Value = float | bool | None


@dataclass(frozen=True)
class Arguments:
    """Resolved parameters of one method call.

    ``source[name][i]`` is the value for ``deltas[i]``; ``ref[name]`` the value for the reference
    model of a baseless method (``None`` when the base only serves as the point task vectors are
    taken from); ``glob[name]`` a global value.
    """

    method: MergeMethod
    n: int
    source: dict[str, list[Value]]
    glob: dict[str, Value]
    ref: dict[str, Value] | None

    def flag(self, name: str) -> bool:
        return bool(self.glob[name])

    def num(self, name: str) -> float:
        value = self.glob[name]
        assert value is not None and not isinstance(value, bool)
        return float(value)

    def floats(self, name: str) -> list[float]:
        return [float(v) for v in self.source[name]]  # type: ignore[arg-type]


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges of ``dtype`` tensors are computed in (see the module docstring)."""
    if dtype == torch.float64:
        return torch.float64
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.float32
    raise MaterializeError(f"cannot merge tensors of dtype {dtype}; only floating-point tensors are merged")


def _coerce(method: str, name: str, value: object, is_bool: bool) -> Value:
    if value is None:
        return None
    if is_bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{method}: parameter {name!r} must be true or false, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{method}: parameter {name!r} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{method}: parameter {name!r} is not finite ({out})")
    return out


def resolve(
    name: str,
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    ref_sp: Mapping[str, float] | None,
) -> Arguments:
    """Check shapes and model count, fill defaults and validate types for method ``name``."""
    method = METHODS.get(name)
    if deltas.dim() != base.dim() + 1 or deltas.shape[1:] != base.shape:
        raise MaterializeError(
            f"{name}: deltas of shape {tuple(deltas.shape)} do not stack tensors of the base's shape "
            f"{tuple(base.shape)}"
        )
    if not base.is_floating_point() or not deltas.is_floating_point():
        raise MaterializeError(f"{name}: cannot merge non-floating-point tensors ({base.dtype}, {deltas.dtype})")
    n = deltas.shape[0]
    if method.needs_base:
        ref_sp = None
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        hi = "any number of" if method.max_models is None else f"at most {method.max_models}"
        raise ConfigError(
            f"{name}: takes at least {method.min_models} and {hi} models besides the base; got {n}"
        )
    source: dict[str, list[Value]] = {}
    glob: dict[str, Value] = {}
    ref: dict[str, Value] | None = {} if ref_sp is not None else None
    for p in method.params:
        if p.scope == "global":
            raw = gp.get(p.name, p.default)
            if raw is None and p.required:
                raise ConfigError(f"{name}: global parameter {p.name!r} is required")
            glob[p.name] = _coerce(name, p.name, raw, p.is_bool)
            continue
        values = sp.get(p.name)
        if values is None:
            if p.required and n > 0:
                raise ConfigError(f"{name}: per-model parameter {p.name!r} is required")
            source[p.name] = [p.default] * n
        else:
            if len(values) != n:
                raise ConfigError(
                    f"{name}: per-model parameter {p.name!r} has {len(values)} values for {n} models"
                )
            source[p.name] = [_coerce(name, p.name, v, p.is_bool) for v in values]
        if ref is not None:
            assert ref_sp is not None
            raw = ref_sp.get(p.name, p.default)
            if raw is None and p.required:
                raise ConfigError(f"{name}: the reference model has no value for required parameter {p.name!r}")
            ref[p.name] = _coerce(name, p.name, raw, p.is_bool)
    return Arguments(method=method, n=n, source=source, glob=glob, ref=ref)


def check_range(
    method: str,
    name: str,
    values: Sequence[float],
    low: float,
    high: float,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise :class:`ConfigError` unless every value lies in the interval (``low_open``: excludes ``low``)."""
    for v in values:
        bad = v < low or v > high or (low_open and v == low) or (high_open and v == high)
        if bad:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise ConfigError(f"{method}: parameter {name!r} = {v} is outside {lo}{low}, {high}{hi}")


def require_generator(method: str, generator: torch.Generator | None) -> torch.Generator:
    """The generator of a randomized method; refuses ``None`` and non-CPU generators."""
    if generator is None:
        raise ValueError(
            f"{method} draws random masks: pass generator=tensor_generator(recipe.seed, tensor_name)"
        )
    if generator.device.type != "cpu":
        raise ValueError(f"{method}: the generator must be a CPU torch.Generator, got {generator.device}")
    return generator
