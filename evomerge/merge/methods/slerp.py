"""Spherical interpolation: ``slerp`` (base and one model) and ``nuslerp`` (two models, optional base).

``slerp`` (mergekit ``slerp``): the whole tensor is one vector. With ``v0 = base``, ``v1 = base + d``
(each normalized only when its norm exceeds 1e-8) and ``c = cos(v0, v1)`` clamped to [-1, 1]:
``|c| > 0.9995`` (colinear or antipodal) falls back to ``lerp = (1 - t) v0 + t v1``; otherwise
``sin((1 - t) theta) / sin(theta) v0 + sin(t theta) / sin(theta) v1`` with ``theta = acos(c)``.
The norms and the dot product come from ``|base|^2``, ``base . d`` and ``|d|^2`` so ``v1`` is never
materialized; ``t = 0`` gives ``base`` and ``t = 1`` gives ``base + d`` exactly.

``nuslerp`` (mergekit ``nuslerp``): ``t = w_1 / (w_0 + w_1)`` (0.5 when ``|w_0 + w_1| < 1e-6``);
with a base model the two task vectors are interpolated and added to the base, without one the two
models themselves (the first is the reference, ``ref_sp`` holds its weight). Vectors are the whole
tensor (``nuslerp_flatten``, default), its rows (last dimension) or, with ``nuslerp_row_wise``, its
columns (dimension 0); norms are clamped to at least 1e-7 and a vector pair with ``1 - c^2 <= 1e-16``
is linearly interpolated.
"""

from __future__ import annotations

import math

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.arguments import Arguments, check_range, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method

__all__ = ["nuslerp", "slerp", "slerp_coefficients"]

_DOT_THRESHOLD = 0.9995
_NORM_EPS = 1e-8


def slerp_coefficients(t: float, bb: float, bd: float, dd: float) -> tuple[float, float] | None:
    """``(c0, c1)`` with ``slerp = c0 v0 + c1 v1`` from ``|v0|^2``, ``v0 . d`` and ``|d|^2`` (``v1 = v0 + d``).

    ``None`` means the vectors are (nearly) colinear: use ``lerp``.
    """
    n0 = math.sqrt(max(bb, 0.0))
    n1 = math.sqrt(max(bb + 2.0 * bd + dd, 0.0))
    n0 = n0 if n0 > _NORM_EPS else 1.0
    n1 = n1 if n1 > _NORM_EPS else 1.0
    cos = min(1.0, max(-1.0, (bb + bd) / (n0 * n1)))
    if abs(cos) > _DOT_THRESHOLD:
        return None
    theta = math.acos(cos)
    sin = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin, math.sin(t * theta) / sin


def _dot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1), y.reshape(-1)))


@merge_method(
    "slerp",
    params=[ParamSpec("t", "global", None, (0.0, 1.0), required=True,
                      doc="interpolation position: 0 is the base, 1 the other model")],
    needs_base=True,
    min_models=1,
    max_models=1,
)
def slerp(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """SLERP between the base and one other model, over the whole tensor as one vector."""
    t = args.num("t")
    check_range("slerp", "t", [t], 0.0, 1.0)
    cd = work_dtype(base.dtype)
    b = base.to(cd)
    d = deltas[0].to(cd)
    coef = slerp_coefficients(t, _dot(b, b), _dot(b, d), _dot(d, d))
    if coef is None:
        out = torch.add(b, d, alpha=t)
    else:
        c0, c1 = coef
        out = torch.mul(b, c0 + c1).add_(d, alpha=c1)
    return out.to(base.dtype)


def _nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool) -> torch.Tensor:
    """mergekit's ``nuslerp(t, v0, v1)``; returns a new tensor shaped like ``v0``."""
    shape = v0.shape
    if flatten or v0.dim() == 0:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    n0 = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_(min=1e-7)
    n1 = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_(min=1e-7)
    cos = torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1).div_(n0 * n1).clamp_(-1, 1)
    colinear = (1 - cos * cos) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    out = (a * c0).addcmul_(b, c1)
    if row_wise and not flatten and v0.dim() > 0:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@merge_method(
    "nuslerp",
    params=[
        ParamSpec("weight", "source", None, (0.0, 1.0), required=True,
                  doc="relative weight; t = w_second / (w_first + w_second)"),
        ParamSpec("nuslerp_row_wise", "global", False, doc="interpolate column vectors (dimension 0)"),
        ParamSpec("nuslerp_flatten", "global", True, doc="treat the whole tensor as one vector"),
    ],
    needs_base=False,
    min_models=1,
    max_models=2,
)
def nuslerp(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """NuSLERP: spherical interpolation of two models (or of their task vectors when a base is given)."""
    cd = work_dtype(base.dtype)
    weights = args.floats("weight")
    with_base = args.ref is None
    if args.n != (2 if with_base else 1):
        got = args.n if with_base else args.n + 1
        raise ConfigError(f"nuslerp: takes exactly two models besides the optional base model; got {got}")
    if not with_base:
        assert args.ref is not None
        weights = [float(args.ref["weight"])] + weights  # type: ignore[arg-type]
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    row_wise, flatten = args.flag("nuslerp_row_wise"), args.flag("nuslerp_flatten")
    if with_base:
        out = _nuslerp(t, deltas[0].to(cd), deltas[1].to(cd), row_wise=row_wise, flatten=flatten)
        return out.add_(base).to(base.dtype)
    v0 = base.to(cd)
    v1 = torch.add(v0, deltas[0])
    return _nuslerp(t, v0, v1, row_wise=row_wise, flatten=flatten).to(base.dtype)
