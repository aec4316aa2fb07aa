"""Merge methods: contract properties over every registered method, hand-computed cases, the
sparsification helpers, the seeded generators, and a comparison with mergekit's own outputs
(``tests/data/mergekit_golden.*``, written by ``experiments/make_mergekit_golden.py``)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError, MaterializeError
from evomerge.merge.methods import METHODS, tensor_generator, tensor_seed
from evomerge.merge.methods import sparsify as sparsify_module
from evomerge.merge.methods.sparsify import kth_smallest, largest_mask, smallest_mask, sparsify

DATA = Path(__file__).parent / "data"
ALL = METHODS.names()
#: Methods the tensor-only contract tests call with no calibration statistics (data-informed ones have their
#: own tests in test_merge_data_informed.py).
PLAIN = [m for m in ALL if not METHODS.get(m).stats]
RANDOMIZED = METHODS.names(having=["randomized"])
EXPECTED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nuslerp", "model_stock", "passthrough",
    "consensus_ta", "consensus_ties", "pcb", "iso_c", "widen", "fisher", "regmean",
}
#: Methods mergekit lacks (``mergekit_name`` None: refused on export to mergekit YAML).
NOT_IN_MERGEKIT = {"consensus_ta", "consensus_ties", "pcb", "iso_c", "widen", "fisher", "regmean"}


# ----------------------------------------------------------------------------- helpers
def n_models(name: str) -> int:
    m = METHODS.get(name)
    n = 3 if m.max_models is None else min(3, m.max_models)
    return max(n, m.min_models)


def params(name: str, n: int) -> tuple[dict[str, list[float]], dict[str, float | bool]]:
    """Valid arguments exercising each method's machinery (densities below 1 where there are any)."""
    m = METHODS.get(name)
    sp: dict[str, list[float]] = {}
    gp: dict[str, float | bool] = {}
    for p in m.params:
        if p.scope == "source" and p.name == "weight":
            sp["weight"] = [0.6, 0.3, 0.5, 0.2][:n]
        elif p.scope == "source" and p.name == "density":
            sp["density"] = [0.5, 0.7, 0.4, 0.6][:n]
        elif p.scope == "global" and p.required:
            gp[p.name] = 0.3
    return sp, gp


def run(name, base, deltas, sp, gp, *, ref_sp=None, seed=0, tensor="model.layers.0.mlp.up_proj.weight"):
    m = METHODS.get(name)
    gen = tensor_generator(seed, tensor) if m.randomized else None
    return m.fn(base, deltas, sp, gp, ref_sp=ref_sp, generator=gen)


def inputs(n: int, shape=(12, 10), dtype=torch.float32, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    deltas = 0.1 * torch.randn((n, *shape), generator=g)
    return base.to(dtype), deltas.to(dtype)


def t(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- registry
def test_every_standard_method_is_registered() -> None:
    assert set(ALL) == EXPECTED
    assert set(RANDOMIZED) == {"dare_linear", "dare_ties", "della", "della_linear"}


@pytest.mark.parametrize("name", PLAIN)
def test_param_specs_are_well_formed(name: str) -> None:
    m = METHODS.get(name)
    assert m.mergekit_name == (None if name in NOT_IN_MERGEKIT else name) and m.doc
    assert len({p.name for p in m.params}) == len(m.params)
    for p in m.params:
        assert p.scope in ("source", "global") and p.doc
        if p.is_bool:
            assert p.bounds is None and not p.required
        elif p.scope == "source" or p.required:
            assert p.bounds is not None and p.bounds[0] < p.bounds[1]
            if p.default is not None:
                assert p.bounds[0] <= p.default <= p.bounds[1]


# ----------------------------------------------------------------------------- properties of every method
@pytest.mark.parametrize("name", PLAIN)
def test_identity_when_every_source_equals_the_base(name: str) -> None:
    n = n_models(name)
    base, _ = inputs(n)
    sp, gp = params(name, n)
    out = run(name, base, torch.zeros((n, *base.shape)), sp, gp)
    close(out, base)
    m = METHODS.get(name)
    if not m.needs_base:  # the reference model contributes with its own parameters
        k = 1 if name == "nuslerp" else n
        ref = {"weight": 0.4} if name != "passthrough" else {"scale": 1.0}
        close(run(name, base, torch.zeros((k if name != "passthrough" else 0, *base.shape)), params(name, k)[0],
                  gp, ref_sp=ref), base)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", PLAIN)
def test_shape_dtype_and_inputs_untouched(name: str, dtype: torch.dtype) -> None:
    n = n_models(name)
    base, deltas = inputs(n, shape=(7, 9), dtype=dtype)
    b0, d0 = base.clone(), deltas.clone()
    sp, gp = params(name, n)
    out = run(name, base, deltas, sp, gp)
    assert out.shape == base.shape and out.dtype == dtype
    assert out.data_ptr() != base.data_ptr()
    assert torch.equal(base, b0) and torch.equal(deltas, d0)
    assert torch.isfinite(out).all()
    if name != "passthrough":
        assert not torch.equal(out, base)


@pytest.mark.parametrize("name", PLAIN)
def test_same_inputs_and_seed_give_identical_bits_in_any_layout(name: str) -> None:
    n = n_models(name)
    base, deltas = inputs(n, shape=(33, 17))
    sp, gp = params(name, n)
    out = run(name, base, deltas, sp, gp, seed=5)
    assert torch.equal(out, run(name, base, deltas, sp, gp, seed=5))
    strided = deltas.transpose(1, 2).contiguous().transpose(1, 2)  # same values, non-contiguous layout
    assert not strided.is_contiguous() or n == 0
    assert torch.equal(out, run(name, base, strided, sp, gp, seed=5))


@pytest.mark.parametrize("name", RANDOMIZED)
def test_random_masks_depend_on_seed_and_tensor_name(name: str) -> None:
    base, deltas = inputs(3, shape=(33, 17))
    sp, gp = params(name, 3)
    ref = run(name, base, deltas, sp, gp, seed=1, tensor="a")
    assert not torch.equal(ref, run(name, base, deltas, sp, gp, seed=1, tensor="b"))
    assert not torch.equal(ref, run(name, base, deltas, sp, gp, seed=2, tensor="a"))
    with pytest.raises(ValueError, match="generator"):
        METHODS.get(name).fn(base, deltas, sp, gp, generator=None)


@pytest.mark.parametrize("name", PLAIN)
def test_number_of_models_is_checked(name: str) -> None:
    m = METHODS.get(name)
    base, _ = inputs(1)
    for n in ([m.max_models + 1] if m.max_models is not None else []) + ([m.min_models - 1] if m.min_models else []):
        sp, gp = params(name, max(n, 1))
        sp = {k: v[:n] for k, v in sp.items()}
        with pytest.raises(ConfigError, match=name):
            run(name, base, torch.zeros((n, *base.shape)), sp, gp)


@pytest.mark.parametrize("name", PLAIN)
def test_bad_tensors_are_refused(name: str) -> None:
    n = n_models(name)
    sp, gp = params(name, n)
    with pytest.raises(MaterializeError):
        run(name, torch.zeros(4, dtype=torch.int64), torch.zeros((n, 4), dtype=torch.int64), sp, gp)
    with pytest.raises(MaterializeError, match="shape"):
        run(name, torch.zeros(4), torch.zeros((n, 5)), sp, gp)


# ----------------------------------------------------------------------------- parameter validation
@pytest.mark.parametrize(
    "name, sp, gp, match",
    [
        ("ties", {"weight": [1.0], "density": [0.0]}, {}, "density"),
        ("ties", {"weight": [1.0], "density": [1.5]}, {}, "density"),
        ("dare_ties", {"weight": [1.0], "density": [-0.1]}, {}, "density"),
        ("ties", {"density": [0.5]}, {}, "weight"),
        ("ties", {"weight": [1.0, 2.0]}, {}, "2 values for 1"),
        ("ties", {"weight": [float("nan")]}, {}, "finite"),
        ("ties", {"weight": [1.0]}, {"normalize": 0.5}, "normalize"),
        ("della", {"weight": [1.0], "density": [0.9], "epsilon": [0.15]}, {}, "epsilon"),
        ("della", {"weight": [1.0], "density": [0.1], "epsilon": [0.1]}, {}, "epsilon"),
        ("breadcrumbs", {"weight": [1.0], "density": [0.5], "gamma": [1.5]}, {}, "gamma"),
        ("slerp", {}, {"t": 1.5}, "'t'"),
        ("slerp", {}, {"t": -0.1}, "'t'"),
        ("slerp", {}, {}, "'t'"),
    ],
)
def test_invalid_parameters_raise_config_errors(name, sp, gp, match) -> None:
    base, deltas = inputs(1)
    with pytest.raises(ConfigError, match=match):
        run(name, base, deltas, sp, gp)


# ----------------------------------------------------------------------------- linear, task arithmetic
def test_linear_hand_computed() -> None:
    base, other = t(1.0, 2.0), t(3.0, 4.0)
    d = (other - base)[None]
    close(run("linear", base, d, {"weight": [3.0]}, {}, ref_sp={"weight": 1.0}), t(2.5, 3.5))
    close(run("linear", base, d, {"weight": [3.0]}, {"normalize": False}, ref_sp={"weight": 1.0}), t(10.0, 14.0))
    # Without ref_sp the base only anchors the task vectors: the result is the other model.
    close(run("linear", base, d, {"weight": [0.7]}, {}), other)
    with pytest.raises(ConfigError, match="sum to 0"):
        run("linear", base, d, {"weight": [-1.0]}, {}, ref_sp={"weight": 1.0})


def test_linear_weights_are_normalized() -> None:
    base, deltas = inputs(2)
    a = run("linear", base, deltas, {"weight": [2.0, 2.0]}, {}, ref_sp={"weight": 2.0})
    b = run("linear", base, deltas, {"weight": [1.0, 1.0]}, {}, ref_sp={"weight": 1.0})
    assert torch.equal(a, b)
    close(a, base + deltas.sum(0) / 3)


def test_task_arithmetic_hand_computed() -> None:
    base = t(1.0, 1.0, 1.0)
    deltas = torch.stack([t(1.0, 0.0, -1.0), t(0.0, 2.0, 2.0)])
    sp = {"weight": [0.5, 0.25]}
    close(run("task_arithmetic", base, deltas, sp, {}), t(1.5, 1.5, 1.0))
    close(run("task_arithmetic", base, deltas, sp, {"lambda": 2.0}), t(2.0, 2.0, 1.0))
    close(run("task_arithmetic", base, deltas, sp, {"normalize": True}), base + t(0.5, 0.5, 0.0) / 0.75)


# ----------------------------------------------------------------------------- TIES
TIES_DELTAS = torch.stack([t(1.0, -2.0, 3.0, 0.0), t(-2.0, 1.0, 1.0, -1.0), t(0.5, -1.0, -5.0, 2.0)])


def test_ties_sign_election_equal_weights() -> None:
    base = torch.zeros(4)
    sp = {"weight": [1.0, 1.0, 1.0]}
    # Column sums -0.5, -2, -1, 1 elect -, -, -, +; agreeing entries: [-2], [-2, -1], [-5], [2] (0 never agrees).
    close(run("ties", base, TIES_DELTAS, sp, {}), t(-2.0, -1.5, -5.0, 2.0))
    close(run("ties", base, TIES_DELTAS, sp, {"normalize": False}), t(-2.0, -3.0, -5.0, 2.0))


def test_ties_sign_election_is_weighted_and_zero_sum_elects_plus() -> None:
    base = torch.ones(4)
    # Weighted: [1,-2,3,0], [-4,2,2,-2], [.5,-1,-5,2]; sums -2.5, -1, 0, 0 elect -, -, +, +.
    out = run("ties", base, TIES_DELTAS, {"weight": [1.0, 2.0, 1.0]}, {})
    close(out, 1 + t(-4.0 / 2, -3.0 / 2, 5.0 / 3, 2.0 / 1))


def test_ties_negative_weights_keep_mergekit_divisor_rule() -> None:
    deltas = torch.stack([t(1.0, 2.0), t(1.0, -3.0)])
    # Weighted [1, 2], [-1, 3]: both agree in column 1 and their weights sum to 0 -> divisor 1.
    close(run("ties", torch.zeros(2), deltas, {"weight": [1.0, -1.0]}, {}), t(1.0, 5.0))


def test_ties_magnitude_pruning_and_tie_rule() -> None:
    base = torch.zeros(4)
    d = t(0.1, -3.0, 2.0, 0.5)[None]
    close(run("ties", base, d, {"weight": [1.0], "density": [0.5]}, {}), t(0.0, -3.0, 2.0, 0.0))
    # Equal magnitudes: the lower index is kept first.
    d = t(1.0, -1.0, 1.0, 1.0)[None]
    close(run("ties", base, d, {"weight": [1.0], "density": [0.5]}, {}), t(1.0, -1.0, 0.0, 0.0))
    # Rescale keeps the L1 norm of the task vector.
    d = t(4.0, -1.0, 2.0, 1.0)[None]
    close(run("ties", base, d, {"weight": [1.0], "density": [0.5]}, {"rescale": True}), t(8.0 / 6 * 4, 0, 8.0 / 6 * 2, 0))


# ----------------------------------------------------------------------------- DARE
def test_dare_expectation_matches_the_unsparsified_task_vector() -> None:
    base, deltas = inputs(1, shape=(2000,))
    sp = {"weight": [1.0], "density": [0.5]}
    for rescale, expect in ((True, deltas[0]), (False, 0.5 * deltas[0])):
        runs = torch.stack([run("dare_linear", base, deltas, sp, {"rescale": rescale}, seed=s) - base
                            for s in range(150)])
        assert (runs.mean(0) - expect).norm() / expect.norm() < 0.15
        kept = (runs != 0).float().mean()
        assert abs(float(kept) - 0.5) < 0.01
    one = run("dare_linear", base, deltas, {"weight": [1.0], "density": [0.3]}, {}) - base
    close((one.abs().sum()), deltas[0].abs().sum(), 1e-4)  # L1 rescale


def test_dare_ties_density_one_is_ties() -> None:
    base, deltas = inputs(3)
    sp = {"weight": [0.6, 0.3, 0.5], "density": [1.0, 1.0, 1.0]}
    close(run("dare_ties", base, deltas, sp, {"normalize": True}), run("ties", base, deltas, sp, {}))
    close(run("dare_linear", base, deltas, sp, {}), run("task_arithmetic", base, deltas, {"weight": sp["weight"]}, {}))


# ----------------------------------------------------------------------------- breadcrumbs, DELLA
def test_breadcrumbs_keep_the_band_between_outliers_and_small_entries() -> None:
    d = torch.arange(1, 11, dtype=torch.float32)[None] / 10  # magnitudes 0.1 .. 1.0
    base = torch.zeros(10)
    out = run("breadcrumbs", base, d, {"weight": [1.0], "density": [0.5], "gamma": [0.2]}, {})
    close(out, torch.where((d[0] >= 0.35) & (d[0] <= 0.85), d[0], 0))  # 0.4 .. 0.8
    out = run("breadcrumbs", base, d, {"weight": [1.0], "density": [0.5], "gamma": [0.0]}, {})
    close(out, torch.where(d[0] >= 0.55, d[0], 0))  # top five
    out = run("breadcrumbs_ties", base, torch.cat([d, -2 * d]), {"weight": [1.0, 1.0], "density": [0.5, 0.5],
                                                                  "gamma": [0.2, 0.2]}, {})
    close(out, torch.where((d[0] >= 0.35) & (d[0] <= 0.85), -2 * d[0], 0))


def test_della_keep_probability_rises_with_magnitude_rank() -> None:
    c = 4000
    d = torch.linspace(0.01, 1.0, c)[torch.randperm(c, generator=torch.Generator().manual_seed(0))]
    keep = torch.zeros(c)
    for s in range(20):
        out = run("della_linear", torch.zeros(c), d[None], {"weight": [1.0], "density": [0.5], "epsilon": [0.4]},
                  {"rescale": False}, seed=s)
        keep += (out != 0).float()
    rate = keep / 20
    order = torch.argsort(d)
    low, high = rate[order[: c // 4]].mean(), rate[order[-c // 4:]].mean()
    assert abs(float(low) - 0.2) < 0.03 and abs(float(high) - 0.8) < 0.03
    assert abs(float(rate.mean()) - 0.5) < 0.02


def test_della_rows_and_density_one() -> None:
    base, deltas = inputs(3, shape=(6, 50))
    sp = {"weight": [0.6, 0.3, 0.5], "density": [1.0, 1.0, 1.0], "epsilon": [0.15] * 3}
    close(run("della", base, deltas, sp, {}), run("ties", base, deltas, {"weight": sp["weight"]}, {}))
    # Ranks are per row: a row of tiny entries loses as much as a row of huge ones.
    d = torch.cat([torch.rand(1, 2000) * 1e-3, torch.rand(1, 2000) * 1e3])[None]
    out = run("della_linear", torch.zeros(2, 2000), d, {"weight": [1.0], "density": [0.5], "epsilon": [0.2]}, {})
    kept = (out != 0).float().mean(1)
    assert torch.all((kept - 0.5).abs() < 0.05)


# ----------------------------------------------------------------------------- SLERP, NuSLERP
def test_slerp_endpoints_are_exact() -> None:
    base, deltas = inputs(1, shape=(20, 8))
    assert torch.equal(run("slerp", base, deltas, {}, {"t": 0.0}), base)
    assert torch.equal(run("slerp", base, deltas, {}, {"t": 1.0}), base + deltas[0])


def test_slerp_hand_computed_and_colinear_fallback() -> None:
    h = math.sqrt(0.5)
    close(run("slerp", t(1.0, 0.0), t(-1.0, 1.0)[None], {}, {"t": 0.5}), t(h, h))
    close(run("slerp", t(2.0, 0.0), t(-2.0, 1.0)[None], {}, {"t": 0.5}), (t(2.0, 0.0) * h + t(0.0, 1.0) * h))
    base = t(1.0, 2.0, 3.0)
    close(run("slerp", base, base[None], {}, {"t": 0.3}), 0.7 * base + 0.3 * 2 * base)  # colinear: lerp
    close(run("slerp", base, (-2 * base)[None], {}, {"t": 0.5}), torch.zeros(3))  # antipodal: lerp
    close(run("slerp", torch.zeros(2), t(3.0, 4.0)[None], {}, {"t": 1 / 3}), t(1.5, 2.0))  # zero base stays unnormalized


def test_nuslerp_with_base_interpolates_task_vectors() -> None:
    base = t(1.0, 1.0)
    deltas = torch.stack([t(1.0, 0.0), t(0.0, 1.0)])
    h = math.sqrt(0.5)
    close(run("nuslerp", base, deltas, {"weight": [1.0, 1.0]}, {}), base + t(h, h))
    s, c = math.sin(math.pi / 8), math.cos(math.pi / 8)
    close(run("nuslerp", base, deltas, {"weight": [1.0, 3.0]}, {}), base + t(s, c))
    close(run("nuslerp", base, deltas, {"weight": [0.0, 0.0]}, {}), base + t(h, h))  # t = 0.5


def test_nuslerp_without_base_and_model_count() -> None:
    h = math.sqrt(0.5)
    v0, v1 = t(1.0, 0.0), t(0.0, 1.0)
    close(run("nuslerp", v0, (v1 - v0)[None], {"weight": [1.0]}, {}, ref_sp={"weight": 1.0}), t(h, h))
    with pytest.raises(ConfigError, match="two models"):
        run("nuslerp", v0, torch.zeros(2, 2), {"weight": [1.0, 1.0]}, {}, ref_sp={"weight": 1.0})
    with pytest.raises(ConfigError, match="two models"):
        run("nuslerp", v0, torch.zeros(1, 2), {"weight": [1.0]}, {})


def test_nuslerp_vector_granularity() -> None:
    base = torch.zeros(2, 2)
    deltas = torch.stack([t([1.0, 0.0], [0.0, 1.0]), t([2.0, 0.0], [0.0, -1.0])])
    sp = {"weight": [1.0, 1.0]}
    # Per row: row 0 colinear, row 1 antipodal -> both linear.
    rows = run("nuslerp", base, deltas, sp, {"nuslerp_flatten": False})
    close(rows, t([1.5, 0.0], [0.0, 0.0]))
    # Flattened: cos = 1 / sqrt(10), a true spherical interpolation.
    theta = math.acos(1 / math.sqrt(10))
    c = math.sin(theta / 2) / math.sin(theta)
    close(run("nuslerp", base, deltas, sp, {}), c * (deltas[0] + deltas[1]))
    # Row-wise (dimension 0) is the per-row interpolation of the transposes.
    _, x = inputs(2, shape=(5, 7))
    cols = run("nuslerp", torch.zeros(5, 7), x, {"weight": [0.3, 0.7]}, {"nuslerp_flatten": False, "nuslerp_row_wise": True})
    rowsT = run("nuslerp", torch.zeros(7, 5), x.transpose(1, 2).contiguous(), {"weight": [0.3, 0.7]}, {"nuslerp_flatten": False})
    close(cols, rowsT.T)


# ----------------------------------------------------------------------------- model stock, passthrough
def test_model_stock_hand_computed() -> None:
    base = t(1.0, 1.0)
    ms = METHODS.get("model_stock").fn
    close(ms(base, torch.stack([t(1.0, 0.0), t(0.0, 1.0)]), {}, {}), base)  # orthogonal: t = 0
    close(ms(base, torch.stack([t(1.0, 0.0), t(1.0, 0.0)]), {}, {}), base + t(1.0, 0.0))  # identical: t = 1
    close(ms(base, torch.stack([t(1.0, 0.0), t(-1.0, 0.0)]), {}, {}), base)  # singular: keep the base
    c = math.sqrt(0.5)
    ratio = 2 * c / (1 + c)
    close(ms(base, torch.stack([t(1.0, 0.0), t(1.0, 1.0)]), {}, {}), base + ratio * t(1.0, 0.5))


def test_model_stock_filter_wise_has_one_ratio_per_row() -> None:
    base = torch.zeros(2, 2)
    deltas = torch.stack([t([1.0, 0.0], [1.0, 0.0]), t([0.0, 1.0], [1.0, 0.0])])
    ms = METHODS.get("model_stock").fn
    close(ms(base, deltas, {}, {"filter_wise": True}), t([0.0, 0.0], [1.0, 0.0]))
    flat = ms(base, deltas, {}, {})
    c = 1 / 2  # (1 + 0 + 0 + 1) / (sqrt(2) sqrt(2))
    close(flat, (2 * c / (1 + c)) * deltas.mean(0))


def test_passthrough_scale() -> None:
    base = torch.randn(3, 4)
    pt = METHODS.get("passthrough").fn
    empty = torch.zeros((0, 3, 4))
    close(pt(base, empty, {}, {}, ref_sp={"scale": 0.5}), 0.5 * base)
    assert torch.equal(pt(base, empty, {}, {}, ref_sp={}), base)
    half = base.to(torch.bfloat16)
    assert torch.equal(pt(half, empty.to(torch.bfloat16), {}, {}, ref_sp={"scale": 0.3}), half * 0.3)


# ----------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "slerp", "model_stock", "consensus_ta",
                                  "consensus_ties", "pcb", "iso_c", "widen"])
def test_half_precision_is_computed_in_float32_and_rounded_once(name: str) -> None:
    n = n_models(name)
    base, deltas = inputs(n, shape=(40, 30), dtype=torch.bfloat16)
    sp, gp = params(name, n)
    sp.pop("density", None)
    exact = run(name, base.double(), deltas.double(), sp, gp).to(torch.bfloat16)
    out = run(name, base, deltas, sp, gp)
    ulp = torch.ldexp(torch.ones(exact.shape), torch.frexp(exact.float()).exponent - 8)  # bf16: 8 significant bits
    assert torch.all((out.float() - exact.float()).abs() <= ulp)


# ----------------------------------------------------------------------------- sparsification helpers
def _data(kind: str, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    if kind == "random":
        return torch.randn(m, generator=g).abs()
    if kind == "few_values":
        return torch.randint(0, 7, (m,), generator=g).float()
    if kind == "strided":  # large values at a regular stride
        x = torch.rand(m, generator=g)
        x[:: m // 16384] += 10
        return x
    return torch.sort(torch.randn(m, generator=g)).values


@pytest.mark.parametrize("kind", ["random", "few_values", "strided", "sorted"])
def test_kth_smallest_is_exact(kind: str) -> None:
    x = _data(kind, 300_000)
    ordered = torch.sort(x).values
    for r in (1, 17, 150_000, 299_000, 300_000):
        assert torch.equal(kth_smallest(x, r), ordered[r - 1])


def test_kth_smallest_sample_does_not_alias_with_the_row_length(monkeypatch) -> None:
    # columns of different scales (as in a fine-tune's update of an embedding matrix), and a row length that
    # divides m // _SAMPLE: a strided sample would see column 0 only and fall back to a full kthvalue
    rows, cols = 32768, 64
    x = (torch.rand(rows, cols, generator=torch.Generator().manual_seed(5)) * torch.arange(1, cols + 1)).reshape(-1)
    m = x.numel()
    assert (m // sparsify_module._SAMPLE) % cols == 0
    sizes = []
    kthvalue = torch.kthvalue

    def spy(t, r, *args, **kwargs):
        sizes.append(t.numel())
        return kthvalue(t, r, *args, **kwargs)

    ordered = torch.sort(x).values
    monkeypatch.setattr(torch, "kthvalue", spy)
    for r in (m // 10, m // 2, m - m // 3):
        assert torch.equal(kth_smallest(x, r), ordered[r - 1])
    assert sizes and max(sizes) < m // 20  # the band around the threshold, never the whole tensor


def test_kth_smallest_is_exact_when_the_sample_misses(monkeypatch) -> None:
    x = _data("sorted", 300_000)
    ordered = torch.sort(x).values
    # a sample of the smallest values only brackets nothing above them: the exact fallback answers
    monkeypatch.setattr(sparsify_module, "_sample_index", lambda m, device: torch.arange(sparsify_module._SAMPLE))
    for r in (1, 150_000, 300_000):
        assert torch.equal(kth_smallest(x, r), ordered[r - 1])


@pytest.mark.parametrize("kind", ["random", "few_values"])
def test_masks_match_a_stable_sort(kind: str) -> None:
    x = _data(kind, 200_003)
    m = x.numel()
    descending = torch.sort(x, descending=True, stable=True).indices
    ascending = torch.sort(x, stable=True).indices
    for k in (1, 1000, 100_000, m - 1):
        top = torch.zeros(m, dtype=torch.bool)
        top[descending[:k]] = True
        assert torch.equal(largest_mask(x, k), top)
        low = torch.zeros(m, dtype=torch.bool)
        low[ascending[:k]] = True
        assert torch.equal(smallest_mask(x, k), low)


def test_sparsify_keeps_exact_counts_and_leaves_density_one_rows() -> None:
    _, deltas = inputs(2, shape=(300, 250))
    masked, factors = sparsify(deltas, "magnitude", [0.3, 1.0], rescale=True)
    assert int((masked[0] != 0).sum()) == int(0.3 * 75_000)
    assert torch.equal(masked[1], deltas[1]) and float(factors[1]) == 1.0
    close(masked[0].abs().sum() * factors[0], deltas[0].abs().sum(), 1e-4)


# ----------------------------------------------------------------------------- seeded generators
def test_tensor_generator_is_stable_across_processes() -> None:
    path = Path(__file__).resolve().parents[1] / "evomerge" / "merge" / "methods" / "rng.py"
    code = (
        f"import importlib.util as u; s = u.spec_from_file_location('rng', {str(path)!r}); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); "
        "print(m.tensor_seed(7, 'model.layers.3.mlp.up_proj.weight'))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    other = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert int(other.stdout) == tensor_seed(7, "model.layers.3.mlp.up_proj.weight")
    g = tensor_generator(7, "x")
    assert g.device.type == "cpu" and g.initial_seed() == tensor_seed(7, "x")
    assert len({tensor_seed(s, n) for s in (0, 1) for n in ("a", "b", "0a", "1a")}) == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", RANDOMIZED)
def test_random_masks_are_identical_on_gpu(name: str) -> None:
    base, deltas = inputs(1, shape=(64, 48))
    sp = {"weight": [1.0], "density": [0.5]}
    cpu = run(name, base, deltas, sp, {"rescale": False})
    gpu = run(name, base.cuda(), deltas.cuda(), sp, {"rescale": False})
    assert torch.equal((cpu - base) != 0, (gpu.cpu() - base) != 0)


# ----------------------------------------------------------------------------- mergekit golden outputs
GOLDEN = json.loads((DATA / "mergekit_golden.json").read_text())


@pytest.fixture(scope="module")
def golden_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "mergekit_golden.safetensors"))


def test_golden_covers_every_method_with_a_mergekit_equivalent() -> None:
    covered = {c["method"] for c in GOLDEN["cases"]}
    assert covered == {n for n in ALL if METHODS.get(n).mergekit_name is not None}


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["output"] for c in GOLDEN["cases"]])
def test_matches_mergekit(case: dict, golden_tensors: dict[str, torch.Tensor]) -> None:
    tensors = [golden_tensors[f"{case['inputs']}/{i}"] for i in range(case["count"])]
    base = tensors[0]
    deltas = torch.stack([x - base for x in tensors[1:]]) if len(tensors) > 1 else base.new_empty((0, *base.shape))
    m = METHODS.get(case["method"])
    gen = torch.Generator().manual_seed(case["seed"] if case["seed"] is not None else 0) if m.randomized else None
    out = m.fn(base, deltas, case["sp"], case["gp"], ref_sp=None if case["base"] else case["ref"], generator=gen)
    expected = golden_tensors[case["output"]]
    assert out.dtype == expected.dtype and out.shape == expected.shape
    # mergekit computes task-vector methods and model_stock in bfloat16 itself (several roundings).
    tol = 2e-6 if expected.dtype == torch.float32 else 2**-5
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol)
