"""Fused merge kernels: same kept entries and values (to rounding) as the eager methods, and safe fallbacks."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from evomerge.merge import kernels
from evomerge.merge.kernels import fused_kernels, fused_merge, fused_status
from evomerge.merge.methods.base import METHODS
from evomerge.merge.methods.sparsify import (
    excluded_ties,
    largest_mask,
    magnitude_order,
    top_k_threshold,
)

M = 1 << 12  # above the lowered threshold used in these tests
#: Inductor compiles the kernels with this C++ compiler; without one the library merges eagerly (tested below).
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for torch.compile"
)


def _sources(seed: int, n: int = 3, m: int = M, quantized: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(m, generator=g) * 0.02
    deltas = torch.randn(n, m, generator=g) * 2e-3
    if quantized:  # many equal magnitudes: the top-k threshold falls inside a run of ties
        deltas = torch.round(deltas * 2000) / 2000
    return base.to(dtype), deltas.to(dtype)


CASES = [
    ("ties", {"weight": [0.3, 0.5, 0.8], "density": [0.3, 0.7, 1.0]}, {}),
    ("ties", {"weight": [0.3, -0.5, 0.8], "density": [0.3, 0.5, 0.2]}, {"normalize": False, "lambda": 1.3}),
    ("ties", {"weight": [0.6, 0.2, 0.4], "density": [1.0, 1.0, 1.0]}, {"lambda": 0.8}),
    ("task_arithmetic", {"weight": [0.3, 0.5, -0.8]}, {"lambda": 0.7}),
    ("task_arithmetic", {"weight": [0.3, 0.5, 0.8]}, {"normalize": True}),
    ("linear", {"weight": [0.3, 0.5, 0.8]}, {}),
    ("linear", {"weight": [0.3, 0.5, 0.8]}, {"normalize": False}),
]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize(("method", "sp", "gp"), CASES)
def test_fused_equals_eager_bit_for_bit(method, sp, gp, quantized, dtype):
    """Same kept entries (ties at the threshold included) and the same arithmetic: identical bits."""
    base, deltas = _sources(1, quantized=quantized, dtype=dtype)
    eager = METHODS.get(method).fn(base, deltas, sp, gp)
    dest = torch.empty_like(base)
    with fused_kernels(True, min_numel=1024):
        res = fused_merge(method, base, deltas, sp, gp, out=dest)
    assert res is not None, fused_status()
    out, finite = res
    assert finite and out is dest
    assert out.dtype == base.dtype and out.shape == base.shape
    assert torch.equal(out, eager), int((out != eager).sum())


@needs_compiler
def test_sorted_magnitude_hints_give_identical_bits():
    base, deltas = _sources(3, quantized=True)
    sp, gp = {"weight": [0.5, 0.3, 0.8], "density": [0.25, 0.6, 0.9]}, {}
    with fused_kernels(True, min_numel=1024):
        plain, _ = fused_merge("ties", base, deltas, sp, gp)
        hinted, _ = fused_merge("ties", base, deltas, sp, gp, orders=[magnitude_order(r) for r in deltas])
        # orders for another stack (wrong row count) are ignored, never misread
        ignored, _ = fused_merge("ties", base, deltas, sp, gp, orders=[magnitude_order(deltas[0])])
    eager = METHODS.get("ties").fn(base, deltas, sp, gp, orders=[magnitude_order(r) for r in deltas])
    assert torch.equal(plain, hinted) and torch.equal(plain, ignored) and torch.equal(plain, eager)


def test_methods_declare_their_fused_plan_and_magnitude_orders():
    assert set(METHODS.names(having={"fused"})) == {"ties", "task_arithmetic", "linear"}
    assert set(METHODS.names(having={"magnitude_orders"})) == {"ties"}
    for name in METHODS.names():
        method = METHODS.get(name)
        assert (method.fused is not None) == ("fused" in METHODS.capabilities(name))


@pytest.mark.parametrize("seed", range(4))
def test_top_k_threshold_describes_largest_mask(seed):
    g = torch.Generator().manual_seed(seed)
    row = torch.round(torch.randn(5000, generator=g) * 8) / 8  # heavy ties
    idx = torch.arange(row.numel())
    for k in (1, 7, 1000, 2500, 4999, 5000):
        expected = largest_mask(row.abs(), k)
        order = magnitude_order(row)
        assert torch.equal(largest_mask(row.abs(), k, order=order), expected)
        for hint in (None, order):
            thr, cut = top_k_threshold(row, k, order=hint)
            a = row.abs()
            got = (a > thr) | ((a == thr) & (idx <= cut))
            assert torch.equal(got, expected), (k, hint is not None)
            assert int(got.sum()) == k
            if cut < row.numel():
                left_out = torch.nonzero((a == thr) & ~expected).view(-1)
                assert torch.equal(excluded_ties(row, k, thr, cut, order=hint), left_out)


def test_not_served_cases_return_none():
    base, deltas = _sources(4)
    with fused_kernels(True, min_numel=1024):
        assert fused_merge("dare_ties", base, deltas, {"weight": [1, 1, 1], "density": [0.5] * 3}, {}) is None
        assert fused_merge("ties", base, deltas, {"weight": [1, 1, 1], "density": [0.5] * 3}, {"rescale": True}) is None
        assert fused_merge("task_arithmetic", base[:100], deltas[:, :100], {"weight": [1, 1, 1]}, {}) is None
    with fused_kernels(False, min_numel=1024):
        assert fused_merge("task_arithmetic", base, deltas, {"weight": [1, 1, 1]}, {}) is None


@needs_compiler
def test_non_finite_result_is_reported():
    base, deltas = _sources(5)
    base[17] = 3e38
    deltas[:, 17] = 3e38
    with fused_kernels(True, min_numel=1024):
        _, finite = fused_merge("task_arithmetic", base, deltas, {"weight": [1.0, 1.0, 1.0]}, {})
    assert finite is False


def test_compile_failure_falls_back_to_eager(monkeypatch):
    from evomerge.io.arch import TensorRole
    from evomerge.merge.materialize import MergePlan, merge_tensor
    from evomerge.recipe import Recipe

    def broken():
        def fail(*args, **kwargs):
            raise RuntimeError("no C++ compiler found\nmore detail")
        return fail

    monkeypatch.setattr(kernels, "_compiled_kernel", broken)
    base, deltas = _sources(6)
    recipe = Recipe.model_validate({"method": "task_arithmetic", "base_model": "b", "models": [
        {"model": m, "parameters": {"weight": 0.5}} for m in ("x", "y", "z")]})
    plan = MergePlan.build(recipe, num_layers=1)
    with fused_kernels(True, min_numel=1024):
        out = merge_tensor(plan, "t", TensorRole(None, "other"), base, deltas)
        enabled, reason = fused_status()
        assert enabled is False and "no C++ compiler found" in reason and "\n" not in reason
    assert torch.equal(out, METHODS.get("task_arithmetic").fn(base, deltas, {"weight": [0.5] * 3}, {}))


def test_cache_scope_is_temporary_unless_a_cache_is_set(monkeypatch, tmp_path):
    import os
    from pathlib import Path

    from evomerge.merge.kernels import cache_scope

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with cache_scope():
        inside = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
        assert inside.is_dir()
    assert not inside.exists() and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with cache_scope():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path)
    assert tmp_path.is_dir()
