"""Per-projection parameters (q, k, v, o, gate, up, down), the grouped-then-refined start, LiNeS and layer
swapping, each against hand-computed small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import ConfigError
from evomerge.io import ModelFolder, TensorRole, tensor_role
from evomerge.merge.materialize import materialize_state_dict, materialize_to_disk
from evomerge.merge.tensor_params import evaluate
from evomerge.mergekit_compat import from_mergekit_yaml, to_mergekit_yaml
from evomerge.recipe import Recipe
from evomerge.spaces import SpaceModels, build_space, parse_template
from evomerge.testing.family import build_family, write_perplexity_suite

PROJ = ["q", "k", "v", "o", "gate", "up", "down"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """base, m1, m2: a 3-layer Llama (hidden 16) and two noisy copies."""
    root = tmp_path_factory.mktemp("submod")
    return build_family(root / "fam", 2, layers=3, hidden=16)


def _folders(fam):
    return {k: ModelFolder.open(v) for k, v in fam.items()}


def _models(fam) -> SpaceModels:
    return SpaceModels.from_folders(_folders(fam), base="base")


# ------------------------------------------------------------------------------ roles and values
@pytest.mark.parametrize(("name", "model_type", "role"), [
    ("model.layers.2.self_attn.q_proj.weight", None, TensorRole(2, "attn", "q")),
    ("model.layers.0.self_attn.k_proj.bias", None, TensorRole(0, "attn", "k")),
    ("model.layers.0.self_attn.o_proj.weight", None, TensorRole(0, "attn", "o")),
    ("model.layers.1.mlp.gate_proj.weight", None, TensorRole(1, "mlp", "gate")),
    ("model.layers.1.mlp.down_proj.weight", None, TensorRole(1, "mlp", "down")),
    ("model.layers.1.self_attn.q_norm.weight", None, TensorRole(1, "norm", None)),
    ("model.layers.1.self_attn.qkv_proj.weight", None, TensorRole(1, "attn", None)),  # fused: its kind only
    ("model.layers.1.mlp.gate_up_proj.weight", None, TensorRole(1, "mlp", None)),
    ("model.layers.3.block_sparse_moe.experts.1.w3.weight", None, TensorRole(3, "mlp", "up")),
    ("model.layers.3.block_sparse_moe.gate.weight", None, TensorRole(3, "mlp", None)),  # the router
    ("transformer.h.0.attn.c_proj.weight", "gpt2", TensorRole(0, "attn", "o")),
    ("transformer.h.0.mlp.c_proj.weight", "gpt2", TensorRole(0, "mlp", "down")),
    ("transformer.h.0.attn.c_attn.weight", "gpt2", TensorRole(0, "attn", None)),
    ("model.embed_tokens.weight", None, TensorRole(None, "embed", None)),
])
def test_tensor_role_names_the_projection(name, model_type, role):
    assert tensor_role(name, model_type) == role


def test_a_projection_override_wins_over_its_kind():
    value = {"q": 0.2, "down": [0.0, 1.0], "attn": 0.3, "default": 0.5}
    assert evaluate(value, TensorRole(1, "attn", "q"), 3) == 0.2
    assert evaluate(value, TensorRole(1, "attn", "k"), 3) == 0.3
    assert evaluate(value, TensorRole(1, "attn", None), 3) == 0.3
    assert evaluate(value, TensorRole(1, "mlp", "down"), 3) == 0.5  # layer 1 of 3: halfway along [0, 1]
    assert evaluate(value, TensorRole(1, "mlp", "up"), 3) == 0.5  # default
    with pytest.raises(ValueError, match="unknown module kind"):
        Recipe(method="linear", models=[{"model": "a", "parameters": {"weight": {"qq": 1.0}}}])


def test_per_projection_task_arithmetic_merges_each_projection_by_its_own_weight(fam):
    weight = {"q": 2.0, "down": -1.0, "attn": 0.5, "default": 0.0}
    r = Recipe(method="task_arithmetic", base_model="base",
               models=[{"model": "m1", "parameters": {"weight": weight}}], sources={k: str(v) for k, v in fam.items()})
    out = materialize_state_dict(r)
    with ModelFolder.open(fam["base"]) as b, ModelFolder.open(fam["m1"]) as m:
        checked = set()
        for name in b.tensor_names:
            role = tensor_role(name)
            w = 2.0 if role.proj == "q" else -1.0 if role.proj == "down" else 0.5 if role.kind == "attn" else 0.0
            want = b.get(name) + w * (m.get(name) - b.get(name))
            torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6)
            checked.add(w)
    assert checked == {2.0, -1.0, 0.5, 0.0}


# ------------------------------------------------------------------------------ mergekit export
def test_mergekit_export_writes_projection_filters_and_reads_them_back(fam):
    folder = ModelFolder.open(fam["base"])
    tensors = [(n, tensor_role(n, folder.model_type)) for n in folder.tensor_names]
    r = Recipe(method="task_arithmetic", base_model="base",
               models=[{"model": "m1", "parameters": {"weight": {"q": 0.2, "up": [0.1, 0.9], "attn": 0.7,
                                                                  "default": 1.0}}},
                       {"model": "m2", "parameters": {"weight": 0.4}}])
    text = to_mergekit_yaml(r, tensors=tensors, num_layers=folder.num_layers, model_type=folder.model_type)
    filters = yaml.safe_load(text)["models"][0]["parameters"]["weight"]
    assert filters[:3] == [{"filter": "q_proj", "value": 0.2}, {"filter": "up_proj", "value": [0.1, 0.9]},
                           {"filter": ".w3.", "value": [0.1, 0.9]}]
    assert filters[-1] == {"value": 1.0}
    assert from_mergekit_yaml(text).canonical() == r.canonical()


def test_mergekit_export_refuses_a_projection_filter_that_also_selects_a_fused_tensor():
    names = ["model.layers.0.mlp.gate_up_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    tensors = [(n, tensor_role(n)) for n in names]
    r = Recipe(method="task_arithmetic", base_model="b",
               models=[{"model": "a", "parameters": {"weight": {"up": 0.2, "default": 1.0}}}])
    with pytest.raises(ConfigError, match="gate_up_proj"):
        to_mergekit_yaml(r, tensors=tensors, num_layers=1)


# ------------------------------------------------------------------------------ spaces
def _ta(split, granularity="per_layer"):
    return parse_template({"kind": "params", "method": "task_arithmetic", "granularity": granularity,
                           "split_kinds": split, "search": ["weight"], "ranges": {"weight": [0.0, 1.5]},
                           "init": {"weight": 0.5}})


def test_a_space_split_per_projection_has_a_gene_per_projection_layer_and_model(fam):
    models = _models(fam)
    assert models.projections == frozenset(PROJ)
    space = build_space(_ta(PROJ), models)
    # 2 models x (7 projections + default) x 3 layers
    assert space.dim == 2 * 8 * 3
    names = [g.name for g in space.genes()]
    assert "weight[m1].q.L0" in names and "weight[m2].down.L2" in names and "weight[m1].default.L1" in names
    genome = np.linspace(0, 1, space.dim)
    w = space.decode(genome).models[0].parameters["weight"]
    assert sorted(w) == sorted([*PROJ, "default"])
    assert w["q"] == [0.0, pytest.approx(1.5 / 47), pytest.approx(3.0 / 47)]  # genes 0..2, over [0, 1.5]


def test_grouped_then_refined_start_reproduces_the_grouped_recipe(fam):
    models = _models(fam)
    grouped = build_space(_ta(["attn", "mlp"], "per_layer"), models)
    fine = build_space(_ta(PROJ, "per_layer"), models)
    rng = np.random.default_rng(0)
    g = grouped.decode(rng.uniform(size=grouped.dim))
    x0 = fine.param_genes.encode(g)
    refined = fine.decode(x0)
    assert refined.hash != g.hash  # different recipe text: one key per projection
    with ModelFolder.open(fam["base"]) as f:
        roles = [tensor_role(n) for n in f.tensor_names]
    for a, b in zip(g.models, refined.models, strict=True):
        for role in roles:
            assert evaluate(b.parameters["weight"], role, 3) == pytest.approx(
                evaluate(a.parameters["weight"], role, 3), abs=1e-9), role
    with pytest.raises(ConfigError, match="method 'ties' differs"):
        fine.param_genes.encode(g.model_copy(update={"method": "ties"}))


def test_space_start_from_sets_the_optimizer_start(fam, tmp_path):
    from evomerge.config import load_run_config
    from evomerge.driver.run import preflight

    suite = write_perplexity_suite(tmp_path / "suite")
    models = _models(fam)
    grouped = build_space(_ta(["attn", "mlp"]), models)
    start = grouped.decode(np.full(grouped.dim, 0.8))
    (tmp_path / "best.yaml").write_text(start.to_yaml())
    (tmp_path / "fine.yaml").write_text(yaml.safe_dump(_ta(PROJ).model_dump(mode="json")))
    cfg = {"name": "x", "seed": 0, "output_dir": str(tmp_path / "out"), "base_model": "base",
           "sources": {k: str(v) for k, v in fam.items()},
           "space": {"template": "fine.yaml", "start_from": "best.yaml"},
           "fitness": {"suite": str(suite), "scorer": "hf"},
           "optimizer": {"name": "cma_es", "options": {"popsize": 4, "x0_first": True}},
           "budget": {"evaluations": 4}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    prep = preflight(load_run_config(tmp_path / "cfg.yaml"))
    first = prep.optimizer.ask(1)[0].genome
    np.testing.assert_allclose(first, np.full(prep.space.dim, 0.8), atol=1e-12)
    (tmp_path / "best.yaml").write_text("method: [")
    with pytest.raises(ConfigError, match="space.start_from .*best.yaml"):
        preflight(load_run_config(tmp_path / "cfg.yaml"))
    cfg["space"]["warm_start"] = {}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match="start_from and warm_start"):
        load_run_config(tmp_path / "cfg.yaml")


# ------------------------------------------------------------------------------ LiNeS
def test_lines_scales_the_summed_task_vectors_linearly_with_depth(fam):
    from evomerge.spaces import load_template
    from evomerge.spaces.lines import lines_scales

    assert lines_scales(0.5, 0.5, 3) == [0.5, 0.75, 1.0]
    assert lines_scales(0.2, 0.6, 1) == [0.8]
    models = _models(fam)
    space = build_space(load_template("builtin:lines-task-arithmetic"), models)
    assert space.dim == 2 and [g.name for g in space.genes()] == ["alpha", "beta"]
    x0 = space.decode(space.x0)  # the paper default as set here: alpha = 1/n = 0.5, beta = 0.5
    assert x0.parameters["lambda"] == [0.5, 0.75, 1.0]
    r = space.decode([0.2, 0.4]).model_copy(update={"sources": {k: str(v) for k, v in fam.items()}})
    lam = [0.3 + 0.6 * i / 2 for i in range(3)]  # alpha = 0.2 * 1.5, beta = 0.4 * 1.5
    assert r.parameters["lambda"] == pytest.approx(lam)
    out = materialize_state_dict(r)
    with ModelFolder.open(fam["base"]) as b, ModelFolder.open(fam["m1"]) as m1, ModelFolder.open(fam["m2"]) as m2:
        for name in b.tensor_names:
            layer = tensor_role(name).layer
            s = lam[0] if layer is None else lam[layer]
            want = b.get(name) + s * ((m1.get(name) - b.get(name)) + (m2.get(name) - b.get(name)))
            torch.testing.assert_close(out[name], want, rtol=0, atol=1e-5)
    doc = yaml.safe_load(to_mergekit_yaml(r))
    assert doc["merge_method"] == "task_arithmetic" and doc["parameters"]["lambda"] == pytest.approx(lam)


def test_lines_refuses_a_method_without_a_task_vector_scale(fam):
    with pytest.raises(ConfigError, match="'linear' has no global 'lambda'"):
        build_space(parse_template({"kind": "lines", "method": "linear", "fixed": {"weight": 1.0}}), _models(fam))
    with pytest.raises(ConfigError, match="fixed.lambda"):
        build_space(parse_template({"kind": "lines", "method": "task_arithmetic",
                                    "fixed": {"weight": 1.0, "lambda": 1.0}}), _models(fam))
    with pytest.raises(ConfigError, match="alpha.init"):
        build_space(parse_template({"kind": "lines", "method": "task_arithmetic", "fixed": {"weight": 1.0},
                                    "alpha": {"range": [0.6, 1.0], "init": "1/n"}}), _models(fam))


# ------------------------------------------------------------------------------ layer swapping
def test_layer_swap_takes_the_bottom_and_top_layers_from_the_donor(fam, tmp_path):
    from evomerge.spaces import load_template

    models = _models(fam)
    space = build_space(load_template("builtin:layer-swap"), models)  # keep m1, donor m2, 3 layers: max_k 1
    assert (space.keep, space.donor, space.max_k, space.dim) == ("m1", "m2", 1, 2)
    assert space.counts(space.x0) == (1, 0)  # round(0.1875 * 3) = 1 at the bottom, round(0.1875) = 0 at the top
    r = space.decode([0.9, 0.7])
    assert [(s.model, s.layer) for s in r.routing.steps] == [("m2", 0), ("m1", 1), ("m2", 2)]
    assert r.routing.frame == "m2" and r.method == "passthrough"
    assert space.decode([0.1, 0.1]).routing.frame == "m1"  # nothing swapped: the kept expert itself
    assert yaml.safe_load(to_mergekit_yaml(r))["slices"] == [
        {"sources": [{"model": "m2", "layer_range": [0, 1]}]}, {"sources": [{"model": "m1", "layer_range": [1, 2]}]},
        {"sources": [{"model": "m2", "layer_range": [2, 3]}]}]
    materialize_to_disk(r, tmp_path / "swapped", paths={k: str(v) for k, v in fam.items()})  # a plain model folder
    with (ModelFolder.open(tmp_path / "swapped") as out, ModelFolder.open(fam["m1"]) as m1,
          ModelFolder.open(fam["m2"]) as m2):
        assert out.num_layers == 3 and sorted(out.tensor_names) == sorted(m1.tensor_names)
        for name in m1.tensor_names:
            layer = tensor_role(name).layer
            src = m1 if layer == 1 else m2  # embeddings, final norm and head from the frame, m2
            torch.testing.assert_close(out.get(name), src.get(name), rtol=0, atol=0)
    # ends that would overlap: the top end is shortened; one tied gene for both ends
    wide = build_space(parse_template({"kind": "layer_swap", "max_k": 2, "tie": True}), models)
    assert wide.dim == 1 and wide.counts([1.0]) == (2, 2)
    assert [s.model for s in wide.decode([1.0]).routing.steps] == ["m2", "m2", "m2"]
    with pytest.raises(ConfigError, match="donor: 'm1' is also the kept expert"):
        build_space(parse_template({"kind": "layer_swap", "donor": "m1"}), models)


def test_layer_swap_transition_zones_blend_on_a_linear_ramp_and_width_zero_is_the_plain_swap(fam, tmp_path):
    from evomerge.recipe import MERGED
    from evomerge.spaces.layer_swap import swap_layers

    # the ramp on a 10-layer model: 2 swapped + 2 blended at the bottom, 1 swapped + 3 blended at the top
    layers = swap_layers("keep", "d", "top", 2, 1, 2, 3, 10)
    assert layers[:5] == [{"d": 1.0}, {"d": 1.0}, {"d": 2 / 3, "keep": 1 / 3}, {"d": 1 / 3, "keep": 2 / 3},
                          {"keep": 1.0}]
    assert layers[5:] == [{"keep": 1.0}, {"top": 0.25, "keep": 0.75}, {"top": 0.5, "keep": 0.5},
                          {"top": 0.75, "keep": 0.25}, {"top": 1.0}]
    # zones stay inside the kept middle (the top one yields), none without a swapped end, a top donor = keep
    assert swap_layers("keep", "d", "d", 1, 1, 5, 5, 4)[1:3] == [{"d": 2 / 3, "keep": 1 / 3}, {"d": 1 / 3, "keep": 2 / 3}]
    assert swap_layers("keep", "d", "d", 0, 0, 2, 2, 4) == [{"keep": 1.0}] * 4
    assert swap_layers("keep", "d", "keep", 1, 1, 0, 1, 4)[2] == {"keep": 1.0}

    models = _models(fam)  # 3 layers; keep m1, donor m2
    plain = build_space(parse_template({"kind": "layer_swap", "max_k": 1}), models)
    zoned = build_space(parse_template({"kind": "layer_swap", "max_k": 1, "transition": {"max": 1}}), models)
    assert [g.name for g in zoned.genes()] == ["k_bottom", "k_top", "t_bottom", "t_top"] and zoned.dim == 4
    for k in ([0.9, 0.1], [0.9, 0.9], [0.1, 0.9]):
        assert zoned.decode([*k, 0.1, 0.1]).hash == plain.decode(k).hash  # width 0: the same recipe
    r = zoned.decode([0.9, 0.1, 0.9, 0.9])  # m2's layer 0, layer 1 half m2 / half m1, m1's layer 2
    assert r.method == "linear" and r.routing.frame == "m2"
    assert [(s.model, s.layer) for s in r.routing.steps] == [("m2", 0), (MERGED, 1), ("m1", 2)]
    assert {m.model: m.parameters["weight"] for m in r.models} == {"m2": [1.0, 0.5, 0.0], "m1": [0.0, 0.5, 1.0]}
    paths = {k: str(v) for k, v in fam.items()}
    materialize_to_disk(r, tmp_path / "zoned", paths=paths)
    with (ModelFolder.open(tmp_path / "zoned") as out, ModelFolder.open(fam["m1"]) as m1,
          ModelFolder.open(fam["m2"]) as m2):
        assert sorted(out.tensor_names) == sorted(m1.tensor_names)
        for name in m1.tensor_names:
            layer = tensor_role(name).layer
            want = (m1.get(name) + m2.get(name)) / 2 if layer == 1 else m1.get(name) if layer == 2 else m2.get(name)
            torch.testing.assert_close(out.get(name), want, rtol=1e-6, atol=1e-6)
    # mergekit takes the final norm and head from the last slice: m1's here, not the frame's
    with pytest.raises(ConfigError, match="differs from the last routed model 'm1'.*final norm and LM head"):
        to_mergekit_yaml(r)
    with pytest.raises(ConfigError, match="differs from the last routed model 'm1'"):
        to_mergekit_yaml(plain.decode([0.9, 0.1]))
    both = zoned.decode([0.9, 0.9, 0.9, 0.1])  # m2 at both ends, layer 1 blended: linear slices
    assert yaml.safe_load(to_mergekit_yaml(both)) == {"merge_method": "linear", "slices": [
        {"sources": [{"model": "m2", "layer_range": [0, 1], "parameters": {"weight": 1.0}}]},
        {"sources": [{"model": "m2", "layer_range": [1, 2], "parameters": {"weight": 0.5}},
                     {"model": "m1", "layer_range": [1, 2], "parameters": {"weight": 0.5}}]},
        {"sources": [{"model": "m2", "layer_range": [2, 3], "parameters": {"weight": 1.0}}]}]}
    with pytest.raises(ConfigError, match="transition.init.bottom: 2 layers is outside 0..1"):
        build_space(parse_template({"kind": "layer_swap", "transition": {"max": 1, "init": {"bottom": 2}}}), models)
    with pytest.raises(ConfigError, match="transition.init: set without transition.max"):
        build_space(parse_template({"kind": "layer_swap", "transition": {"init": {"top": 1}}}), models)
