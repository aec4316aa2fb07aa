"""Merge methods: pure tensor functions registered by name in :data:`METHODS`.

Importing this package registers every built-in method (see :mod:`evomerge.merge.methods.base` for
the contract).
"""

from __future__ import annotations

from evomerge.merge.methods import (  # noqa: F401  (imported to register)
    breadcrumbs,
    consensus,
    dare,
    della,
    fisher,
    iso_c,
    linear,
    model_stock,
    passthrough,
    pcb,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    widen,
)
from evomerge.merge.methods.base import METHODS, MergeFn, MergeMethod, ParamSpec, merge_method
from evomerge.merge.methods.rng import tensor_generator, tensor_seed

__all__ = ["METHODS", "MergeFn", "MergeMethod", "ParamSpec", "merge_method", "tensor_generator", "tensor_seed"]
