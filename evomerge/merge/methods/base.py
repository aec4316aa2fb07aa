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
from typing import Literal, Protocol

import torch

from evomerge.registry import Registry

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

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def defaults(self, scope: ParamScope) -> dict[str, float | bool]:
        return {p.name: p.default for p in self.params if p.scope == scope and p.default is not None}


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    *,
    params: Sequence[ParamSpec],
    needs_base: bool = True,
    randomized: bool = False,
    min_models: int = 1,
    max_models: int | None = None,
    mergekit_name: str | None = None,
) -> Callable[[MergeFn], MergeFn]:
    """Register ``fn`` as merge method ``name`` (see the module docstring for the contract)."""

    def deco(fn: MergeFn) -> MergeFn:
        caps = {"randomized"} if randomized else set()
        caps.add("needs_base" if needs_base else "baseless")
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
                mergekit_name=mergekit_name if mergekit_name is not None else name,
                doc=(fn.__doc__ or "").strip(),
                capabilities=frozenset(caps),
            ),
            capabilities=caps,
        )
        return fn

    return deco
