"""The merge-method contract and its registry.

A merge method is a pure function of tensors and parameters (no I/O). Every method sees the same
inputs for one tensor name:

* ``base``: the base model's tensor (the reference the task vectors are taken from), shape ``S``;
* ``deltas``: the task vectors of the other models, stacked, shape ``(N, *S)``, in recipe order
  (``deltas[i] = theta_i - base``);
* ``sp``: per-source parameters, each a list of N floats resolved for this tensor (weights, densities …);
* ``gp``: global parameters (``normalize``, ``lambda``, ``t`` …) resolved for this tensor;
* ``generator``: a CPU ``torch.Generator`` seeded from the recipe seed and the tensor name (random methods only).

It returns the merged tensor, shape ``S``, in the dtype of ``base``, as a new tensor: a method never
modifies its inputs and never returns a view of them. Methods that mix full weights (linear, slerp,
model_stock …) rebuild ``theta_i = base + deltas[i]`` themselves; keeping one representation lets a
worker hold the sources resident as base + task vectors. Half-precision inputs are computed in float32
and rounded once (see :mod:`evomerge.merge.methods.arguments`). Bad parameter values raise
:class:`~evomerge.errors.ConfigError` naming the method and parameter; tensors that cannot be merged
(non-floating dtype, mismatched shapes) raise :class:`~evomerge.errors.MaterializeError`.

Two capabilities a method declares when it registers (never probed by name elsewhere):

* ``fused``: a function ``(arguments, work dtype) -> FusedPlan | None`` saying how
  :mod:`evomerge.merge.kernels`' one-pass kernel computes this call (None: not this call, run the eager
  function); a method without it always runs eagerly;
* ``magnitude_orders``: the method ranks task-vector entries by magnitude and takes ``orders=``, each row's
  :func:`~evomerge.merge.methods.sparsify.magnitude_order` (or ``None`` per row), from a caller that keeps
  them resident; the result is the same with or without them, only the selection pass is skipped;
* ``stats``: the kinds of calibration statistics (:mod:`evomerge.merge.stats`: ``fisher``, ``gram``,
  ``act``) the method reads, passed as ``stats={kind: per-source statistics of this tensor, stacked
  (N, ...)}``; the materializer looks them up by tensor name, and merges a tensor that has none with the
  recipe's ``data.fallback`` method instead (the method itself never sees a missing statistic).

Which model is the ``base`` is decided by the recipe: ``base_model`` when set; otherwise (linear,
passthrough, nuslerp) the first listed model, whose own per-source parameters are then passed in
``ref_sp`` (the reference contributes ``theta_ref = base`` with its own weight). ``ref_sp=None``
means the base only anchors the task vectors. ``min_models`` / ``max_models`` count the models besides
that reference, i.e. ``deltas.shape[0]``; ``needs_base=False`` means a ``base_model`` is optional
(nuslerp) or unused (linear, passthrough).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

import torch

from evomerge.registry import Registry

if TYPE_CHECKING:
    from evomerge.merge.methods.arguments import Arguments

ParamScope = Literal["source", "global"]


@dataclass(frozen=True)
class ParamSpec:
    """One parameter a method reads, as a search space and the recipe validator see it."""

    name: str
    scope: ParamScope
    default: float | bool | None
    #: Natural search range for float parameters (the search space may narrow it).
    bounds: tuple[float, float] | None = None
    required: bool = False
    doc: str = ""

    @property
    def is_bool(self) -> bool:
        return isinstance(self.default, bool)


@dataclass(frozen=True)
class FusedPlan:
    """One call of a method as the fused kernel computes it: ``base + lam * mix / norm`` scaled by ``coef``.

    ``weights`` are the per-source weights in the work dtype; ``densities`` (None: keep every entry) the
    share of each task vector kept by magnitude; ``consensus`` is TIES sign election over the weighted
    rows, ``normalize`` its per-entry division by the agreeing weights (otherwise ``norm`` divides).
    """

    weights: list[float]
    densities: list[float] | None
    coef: float
    norm: float
    lam: float
    consensus: bool = False
    normalize: bool = False


#: ``(resolved arguments, work dtype) -> FusedPlan`` or None (this call runs the eager function).
FusedPlanFn = Callable[["Arguments", torch.dtype], "FusedPlan | None"]


class MergeFn(Protocol):
    def __call__(
        self,
        base: torch.Tensor,
        deltas: torch.Tensor,
        sp: Mapping[str, Sequence[float]],
        gp: Mapping[str, float | bool],
        *,
        ref_sp: Mapping[str, float] | None = None,
        generator: torch.Generator | None = None,
        orders: Sequence[torch.Tensor | None] | None = None,
        stats: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: MergeFn
    params: tuple[ParamSpec, ...]
    #: True when the method needs a ``base_model`` (task-vector methods, slerp, model_stock).
    needs_base: bool = True
    #: True when ``generator`` is used (DARE, DELLA): outputs depend on the recipe seed.
    randomized: bool = False
    #: Minimum and maximum number of models besides the reference, ``deltas.shape[0]`` (``None`` = unbounded).
    min_models: int = 1
    max_models: int | None = None
    #: Name of the same method in mergekit YAML (``None`` if mergekit has no equivalent).
    mergekit_name: str | None = None
    doc: str = ""
    capabilities: frozenset[str] = field(default_factory=frozenset)
    #: How the fused kernel computes a call (see the module docstring); None: always eager.
    fused: FusedPlanFn | None = None
    #: The method takes ``orders=`` (resident magnitude orders of the task vectors' rows).
    magnitude_orders: bool = False
    #: Kinds of calibration statistics the method reads as ``stats=`` (empty: none).
    stats: tuple[str, ...] = ()

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self, scope: ParamScope) -> dict[str, float | bool]:
        return {p.name: p.default for p in self.params if p.scope == scope and p.default is not None}


METHODS: Registry[MergeMethod] = Registry("merge method")


class _SameName:
    """The type of :data:`SAME_NAME`."""

    def __repr__(self) -> str:
        return "SAME_NAME"


#: ``merge_method``'s default ``mergekit_name``: mergekit knows the method by the same name.
SAME_NAME = _SameName()


#: A method's implementation: ``(base, deltas, resolved arguments, **extras) -> merged tensor``; ``extras`` are
#: ``generator`` for randomized methods, ``orders`` for ``magnitude_orders`` methods and ``stats`` for
#: data-informed ones.
MergeImpl = Callable[..., torch.Tensor]


def merge_method(
    name: str,
    *,
    params: Sequence[ParamSpec],
    needs_base: bool = True,
    randomized: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    mergekit_name: str | None | _SameName = SAME_NAME,
    fused: FusedPlanFn | None = None,
    magnitude_orders: bool = False,
    stats: Sequence[str] = (),
) -> Callable[[MergeImpl], MergeFn]:
    """Register ``impl`` as merge method ``name`` and return its :class:`MergeFn` (module docstring).

    ``impl(base, deltas, args)`` receives the :class:`~evomerge.merge.methods.arguments.Arguments` resolved and
    checked for this call (shapes, model count, defaults, types), plus ``generator=`` (checked: a CPU
    generator) when ``randomized`` and ``orders=`` when ``magnitude_orders``. ``mergekit_name`` is the
    method's name in mergekit YAML: by default ``name``; ``None`` for a method mergekit lacks (its recipes
    are then refused on export to mergekit YAML).
    """

    stat_kinds = tuple(stats)

    def deco(impl: MergeImpl) -> MergeFn:
        from evomerge.merge.methods.arguments import require_generator, resolve

        def fn(
            base: torch.Tensor,
            deltas: torch.Tensor,
            sp: Mapping[str, Sequence[float]],
            gp: Mapping[str, float | bool],
            *,
            ref_sp: Mapping[str, float] | None = None,
            generator: torch.Generator | None = None,
            orders: Sequence[torch.Tensor | None] | None = None,
            stats: Mapping[str, torch.Tensor] | None = None,
        ) -> torch.Tensor:
            extras: dict[str, object] = {}
            if stat_kinds:
                missing = [k for k in stat_kinds if stats is None or k not in stats]
                if missing:
                    raise ValueError(f"{name} reads calibration statistics {missing}: pass stats={{kind: tensor}}")
                extras["stats"] = stats
            if randomized:
                extras["generator"] = require_generator(name, generator)
            if magnitude_orders:
                extras["orders"] = orders
            return impl(base, deltas, resolve(name, base, deltas, sp, gp, ref_sp), **extras)

        fn.__name__ = fn.__qualname__ = name
        fn.__doc__ = impl.__doc__
        caps = {"randomized"} if randomized else set()
        caps.add("needs_base" if needs_base else "baseless")
        caps |= {"fused"} if fused is not None else set()
        caps |= {"magnitude_orders"} if magnitude_orders else set()
        caps |= {"data_informed"} if stat_kinds else set()
        METHODS.add(
            name,
            MergeMethod(
                name=name,
                fn=fn,
                params=tuple(params),
                needs_base=needs_base,
                randomized=randomized,
                min_models=min_models,
                max_models=max_models,
                mergekit_name=name if isinstance(mergekit_name, _SameName) else mergekit_name,
                doc=(impl.__doc__ or "").strip(),
                capabilities=frozenset(caps),
                fused=fused,
                magnitude_orders=magnitude_orders,
                stats=stat_kinds,
            ),
            capabilities=caps,
        )
        return fn

    return deco
