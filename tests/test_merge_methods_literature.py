"""Merge methods from the literature without a mergekit equivalent: consensus merging with TALL masks
(``consensus_ta`` / ``consensus_ties``), PCB-merging (``pcb``), Iso-C (``iso_c``) and WIDEN (``widen``). Their defining
properties on small hand-computed cases, their refusal on export to mergekit YAML, and ``evomerge merge``
of a recipe with each on the tiny test zoo. (The contract every method keeps is in test_merge_methods.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from evomerge.errors import ConfigError
from evomerge.merge.methods import METHODS
from evomerge.merge.methods.pcb import balance_scores
from evomerge.mergekit_compat import to_mergekit_yaml
from evomerge.recipe import Recipe

NEW = ["consensus_ta", "consensus_ties", "pcb", "iso_c", "widen"]


def run(name, base, deltas, sp=None, gp=None):
    return METHODS.get(name).fn(base, deltas, sp or {}, gp or {})


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random(n: int, shape=(9, 7), seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), 0.1 * torch.randn((n, *shape), generator=g)


def close(a, b, tol=1e-6) -> None:
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- consensus (TALL masks)
def test_consensus_hand_computed_masks() -> None:
    base = t(10.0, 20.0, 30.0)
    d = torch.stack([t(1.0, 0.1, -1.0), t(1.0, 2.0, 1.0)])
    # tau = (2, 2.1, 0); with lambda_t = 0.5: m_1 = (1, 0, 1) (|0.1| < 0.5 * 2), m_2 = (1, 1, 1); counts (2, 1, 2)
    sp = {"tall_lambda": [0.5, 0.5]}
    close(run("consensus_ta", base, d, sp, {"k": 2}), base + t(2.0, 0.0, 0.0))
    close(run("consensus_ta", base, d, sp, {"k": 1}), base + t(2.0, 2.1, 0.0))
    close(run("consensus_ta", base, d, sp, {"k": 2, "lambda": 0.5}), base + t(1.0, 0.0, 0.0))
    # the masks compare the weighted task vectors: w = (1, 0.05) makes t_2 = (0.05, 0.1, 0.05), tau = (1.05, 0.2, -0.95);
    # m_1 = [|t_1| >= 0.5 |t_2|] = (1, 1, 1), m_2 = [|t_2| >= 0.5 |t_1|] = (0, 1, 0); counts (1, 2, 1)
    sp_w = {"tall_lambda": [0.5, 0.5], "weight": [1.0, 0.05]}
    close(run("consensus_ta", base, d, sp_w, {"k": 2}), base + t(0.0, 0.2, 0.0))


def test_consensus_k_one_with_lambda_zero_is_task_arithmetic_and_k_above_n_is_the_base() -> None:
    base, d = random(3)
    w = [0.6, 0.3, 0.9]
    everything = run("consensus_ta", base, d, {"weight": w, "tall_lambda": [0.0] * 3}, {"k": 1, "lambda": 0.7})
    close(everything, run("task_arithmetic", base, d, {"weight": w}, {"lambda": 0.7}))
    nothing = run("consensus_ta", base, d, {"weight": w}, {"k": 4})
    assert torch.equal(nothing, base)
    some = run("consensus_ta", base, d, {"weight": w}, {"k": 2})
    assert 0 < int((some != base).sum()) < base.numel()


@pytest.mark.parametrize("normalize", [False, True])
def test_consensus_ties_with_k_zero_is_ties(normalize: bool) -> None:
    base, d = random(3, seed=1)
    sp = {"weight": [0.6, 0.3, 0.9], "density": [0.5, 0.7, 0.4]}
    gp = {"normalize": normalize, "lambda": 1.2}
    close(run("consensus_ties", base, d, sp, {**gp, "k": 0}), run("ties", base, d, sp, gp))
    fewer = run("consensus_ties", base, d, sp, {**gp, "k": 2})
    kept = fewer != base
    assert kept.sum() < (run("ties", base, d, sp, gp) != base).sum()
    close(fewer[kept], run("ties", base, d, sp, gp)[kept])  # what is kept is TIES' value


@pytest.mark.parametrize(
    "name, sp, gp, match",
    [
        ("consensus_ta", {"tall_lambda": [-0.1]}, {}, "tall_lambda"),
        ("consensus_ta", {}, {"k": -1}, "'k'"),
        ("consensus_ties", {"density": [0.0]}, {}, "density"),
        ("pcb", {"density": [0.0]}, {}, "density"),
        ("pcb", {"density": [1.5]}, {}, "density"),
        ("iso_c", {}, {"isotropic": 0.5}, "isotropic"),
    ],
)
def test_invalid_parameters_are_refused(name, sp, gp, match) -> None:
    base, d = random(1)
    with pytest.raises(ConfigError, match=match):
        run(name, base, d, sp, gp)


# ----------------------------------------------------------------------------- PCB
def test_pcb_equal_task_vectors_without_drop_give_their_mean() -> None:
    base, d = random(1)
    same = d.expand(3, *d.shape[1:]).clone()
    close(run("pcb", base, same, {"density": [1.0] * 3}), base + d[0])
    close(run("pcb", base, same, {"density": [1.0] * 3, "weight": [0.5, 1.0, 1.5]}, {"lambda": 0.8}),
          base + 0.8 * d[0])  # mean weight 1, times lambda


def test_pcb_single_task_is_magnitude_pruning() -> None:
    base = torch.zeros(4)
    d = t(3.0, -1.0, 2.0, 0.5)[None]
    close(run("pcb", base, d, {"density": [0.5]}), t(3.0, 0.0, 2.0, 0.0))


def test_pcb_two_disjoint_tasks_hand_computed() -> None:
    # d_1 = (1, 0), d_2 = (0, 1): N = 2, D = 2. b_1 = Softmax(2 (1, 0)) * (Softmax((1, 0)) + Softmax((0, 0))),
    # b_2 the same reversed; merged entry 0 = b_1[0] / (b_1[0] + b_2[0]) = a / (a + b).
    e = math.e
    a = e**2 / (e**2 + 1) * (e / (e + 1) + 0.5)
    b = 1 / (e**2 + 1) * (1 / (e + 1) + 0.5)
    base = t(1.0, 1.0)
    d = torch.stack([t(1.0, 0.0), t(0.0, 1.0)])
    close(run("pcb", base, d, {"density": [1.0, 1.0]}), base + a / (a + b))
    # dropping half: each task keeps its own entry, which then gets its full value back
    close(run("pcb", base, d, {"density": [0.5, 0.5]}), base + 1.0)
    rows = [d[0], d[1]]
    close(balance_scores(rows, 0) / balance_scores(rows, 0).sum(), t(a, b) / (a + b))


def test_pcb_entries_every_task_drops_keep_the_base() -> None:
    base, d = random(2, shape=(20, 10), seed=2)
    out = run("pcb", base, d, {"density": [0.3, 0.2]})
    changed = int((out != base).sum())
    assert max(60, 40) <= changed <= 60 + 40
    rows = [d[i].reshape(-1) for i in range(2)]
    top = [set(torch.topk(balance_scores(rows, i), k).indices.tolist()) for i, k in enumerate((60, 40))]
    assert set(torch.nonzero((out != base).reshape(-1)).flatten().tolist()) == top[0] | top[1]


# ----------------------------------------------------------------------------- Iso-C
def test_iso_c_single_task_vector_gets_a_flat_spectrum_with_the_same_singular_vectors() -> None:
    base, d = random(1, shape=(8, 5), seed=3)
    u, s, vh = torch.linalg.svd(d[0].double(), full_matrices=False)
    out = run("iso_c", base, d, {}, {"lambda": 1.5})
    delta = (out - base).double() / 1.5
    s2 = torch.linalg.svdvals(delta)
    close(s2, torch.full_like(s2, float(s.mean())), tol=1e-5)
    close(delta, s.mean() * u @ vh, tol=1e-5)  # same singular vectors (the polar factor U V^T)
    close(s2.sum(), s.sum(), tol=1e-5)  # nuclear norm kept


def test_iso_c_sums_the_weighted_task_vectors_and_keeps_a_rank_one_sum() -> None:
    base, d = random(2, shape=(6, 6), seed=4)
    w = [0.3, 0.8]
    m = (w[0] * d[0] + w[1] * d[1]).double()
    u, s, vh = torch.linalg.svd(m)
    close(run("iso_c", base, d, {"weight": w}).double(), base.double() + s.mean() * u @ vh, tol=1e-5)
    rank_one = torch.outer(t(1.0, -2.0, 0.5), t(0.3, 0.1))
    close(run("iso_c", torch.zeros(3, 2), torch.stack([rank_one, rank_one])), 2 * rank_one, tol=1e-5)


def test_iso_c_averages_tensors_that_are_not_matrices_or_not_isotropic() -> None:
    base, d = random(3, shape=(9,), seed=5)
    close(run("iso_c", base, d, {}, {"lambda": 0.5}), base + 0.5 * d.mean(0))
    base2, d2 = random(3, seed=6)
    close(run("iso_c", base2, d2, {}, {"isotropic": False}), base2 + d2.mean(0))
    assert not torch.allclose(run("iso_c", base2, d2), base2 + d2.mean(0))


# ----------------------------------------------------------------------------- WIDEN
def _pair_scores(r1: float, r2: float, calibration: float, threshold: float = 0.375) -> tuple[float, float]:
    """Softmax over two models, calibrated above the threshold (the mean rank 0.375 of 4 columns, ratio 1)."""
    z = math.exp(r1) + math.exp(r2)
    return (calibration if r1 > threshold else math.exp(r1) / z,
            calibration if r2 > threshold else math.exp(r2) / z)


def test_widen_vector_parameters_hand_computed() -> None:
    d = torch.stack([t(0.3, 0.0, 0.0, 0.1), t(0.0, 0.2, 0.0, 0.1)])
    # mean |d_1| = 0.1: only entry 0 is above it; mean |d_2| = 0.075: entries 1 and 3; those get the calibration 2
    out = run("widen", torch.zeros(4), d, {}, {"score_calibration_value": 2.0})
    close(out, t(0.3 * 2, 0.2 * 2, 0.0, 0.1 * 0.5 + 0.1 * 2))


def test_widen_matrix_hand_computed() -> None:
    base = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    w1 = torch.tensor([[3.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.2, -0.05]])
    w2 = torch.tensor([[1.0, 2.0, 1.5, 0.8], [0.5, 0.0, -0.3, 0.8]])
    # magnitude changes: model 1 (2, .414, .2, .00125), model 2 (.118, 1, .530, .131);
    # direction changes 1 - cos: model 1 (0, .293, 1, .00125), model 2 (.106, 0, .0194, .293); ranks / 4:
    r_m = ([0.75, 0.5, 0.25, 0.0], [0.0, 0.75, 0.5, 0.25])
    r_d = ([0.0, 0.5, 0.75, 0.25], [0.5, 0.0, 0.25, 0.75])
    c = 1.5
    weights = torch.zeros(2, 4)
    for j in range(4):
        sm = _pair_scores(r_m[0][j], r_m[1][j], c)
        sd = _pair_scores(r_d[0][j], r_d[1][j], c)
        weights[:, j] = 0.5 * (torch.tensor(sm) + torch.tensor(sd))
    d = torch.stack([w1 - base, w2 - base])
    expected = base + (d * weights[:, None, :]).sum(0)
    close(run("widen", base, d, {}, {"score_calibration_value": c}), expected)
    close(run("widen", base, d, {"weight": [0.5, 1.0]}, {"score_calibration_value": c}),
          base + 0.5 * d[0] * weights[0] + d[1] * weights[1])


def test_widen_single_model_is_itself_and_per_row_is_the_transposed_layout() -> None:
    base, d = random(1, seed=7)
    close(run("widen", base, d), base + d[0])  # one model: softmax 1, calibration 1
    base, d = random(3, seed=8)
    rows = run("widen", base.T.contiguous(), d.transpose(1, 2).contiguous(), {}, {"per_row": True})
    close(rows.T, run("widen", base, d))
    assert not torch.allclose(run("widen", base, d, {}, {"per_row": True}), run("widen", base, d))


# ----------------------------------------------------------------------------- mergekit export, zoo merge
@pytest.mark.parametrize("name", NEW)
def test_export_to_mergekit_is_refused(name: str) -> None:
    r = Recipe.model_validate(dict(method=name, base_model="base", models=[{"model": "a"}, {"model": "b"}]))
    with pytest.raises(ConfigError, match="no mergekit equivalent"):
        to_mergekit_yaml(r)


def test_cli_merges_the_zoo_with_each_method(zoo_test, tmp_path) -> None:
    from evomerge.cli import app

    experts = [zoo_test.experts[s] for s in zoo_test.skills]
    sources = {name: str(zoo_test.models[name]) for name in ["base", *experts]}
    base_sd = load_file(str(zoo_test.models["base"] / "model.safetensors"))
    expert_sds = [load_file(str(zoo_test.models[e] / "model.safetensors")) for e in experts]
    params = {"consensus_ta": {"k": 2}, "consensus_ties": {"k": 1}, "pcb": {"lambda": 1.0},
              "iso_c": {"isotropic": {"embed": False, "lm_head": False, "default": True}},
              "widen": {"per_row": {"embed": True, "default": False}}}
    runner = CliRunner()
    for name in NEW:
        recipe = Recipe.model_validate(dict(method=name, base_model="base", models=[{"model": e} for e in experts],
                                            parameters=params[name], sources=sources, dtype="float32"))
        (tmp_path / f"{name}.yaml").write_text(recipe.to_yaml())
        res = runner.invoke(app, ["merge", str(tmp_path / f"{name}.yaml"), "--out", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
        out = load_file(str(tmp_path / name / "model.safetensors"))
        assert set(out) == set(base_sd)
        assert all(torch.isfinite(v).all() for v in out.values())
        assert any(not torch.equal(out[k], base_sd[k]) for k in out)
        if name == "iso_c":  # embeddings are averaged (kind override), attention matrices isotropic
            emb = "model.embed_tokens.weight"
            mean = base_sd[emb] + sum(sd[emb] - base_sd[emb] for sd in expert_sds) / len(experts)
            close(out[emb], mean, tol=1e-5)
            q = "model.layers.0.self_attn.q_proj.weight"
            s = torch.linalg.svdvals((out[q] - base_sd[q]).double())
            assert float(s.max() / s.min()) < 1.001


# ----------------------------------------------------------------------------- search space genes
SEARCHED_GLOBALS = {"consensus_ta": ["k", "lambda"], "consensus_ties": ["k", "lambda"], "pcb": ["lambda"],
                    "iso_c": ["lambda"], "widen": ["above_average_value_ratio", "score_calibration_value"]}


@pytest.mark.parametrize("name", NEW)
def test_parameters_are_searchable_genes(name: str) -> None:
    from evomerge.merge.tensor_params import validate_recipe_params
    from evomerge.spaces import SpaceModels, build_space
    from evomerge.spaces.template import parse_template

    method = METHODS.get(name)
    per_model = [p.name for p in method.params if p.scope == "source"]
    models = SpaceModels(("base", "a", "b"), 4, base="base")
    space = build_space(parse_template({"kind": "params", "method": name, "granularity": "global"}), models)
    assert len(space.genes()) == 2 * len(per_model)  # by default: every per-model parameter of each model
    searched = per_model + SEARCHED_GLOBALS[name]
    space = build_space(parse_template({"kind": "params", "method": name, "granularity": "global",
                                        "search": searched}), models)
    assert len(space.genes()) == 2 * len(per_model) + len(SEARCHED_GLOBALS[name])
    x0 = space.decode(space.x0)  # the method's declared defaults
    validate_recipe_params(x0, method)
    for p in method.params:
        if p.name in SEARCHED_GLOBALS[name]:
            assert x0.parameters[p.name] == pytest.approx(p.default)
        elif p.scope == "source":
            assert all(e.parameters[p.name] == pytest.approx(p.default) for e in x0.models)
    top = space.decode([1.0] * len(space.genes()))
    for p in method.params:
        if p.name in SEARCHED_GLOBALS[name]:
            assert top.parameters[p.name] == pytest.approx(p.bounds[1])
