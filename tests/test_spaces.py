"""Search-space contract, over every registered space kind and every built-in template."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.io.arch import TensorRole
from evomerge.merge.methods.base import METHODS, MergeMethod, ParamSpec
from evomerge.merge.tensor_params import evaluate, validate_recipe_params
from evomerge.names import MODULE_KINDS
from evomerge.recipe import MERGED, Recipe
from evomerge.registry import Registry
from evomerge.spaces import SPACES, GeneSpace, SpaceModels, build_space, builtin_templates, load_template
from evomerge.spaces.template import parse_template


def _noop(*args, **kwargs):
    raise AssertionError("search spaces never call a merge function")


def stand_in_methods() -> Registry[MergeMethod]:
    """Methods declared here so the space mechanics are tested independently of the real declarations."""
    reg: Registry[MergeMethod] = Registry("merge method")
    weight = ParamSpec("weight", "source", None, (0.0, 1.0), required=True)
    density = ParamSpec("density", "source", 1.0, (0.0, 1.0))
    normalize = ParamSpec("normalize", "global", True)
    lam = ParamSpec("lambda", "global", 1.0, (0.0, 2.0))
    t = ParamSpec("t", "global", None, (0.0, 1.0), required=True)
    for name, params, needs_base, most in [
        ("ties", (weight, density, normalize, lam), True, None),
        ("linear", (weight, normalize), False, None),
        ("slerp", (t,), True, 1),
    ]:
        reg.add(name, MergeMethod(name, _noop, params, needs_base=needs_base, max_models=most))
    return reg


FAKE = stand_in_methods()
MODELS = SpaceModels(("base", "a", "b"), 5, base="base")

#: One example template per registered space kind (the contract test checks every kind has one).
EXAMPLES = {
    "params": {
        "kind": "params", "method": "ties", "granularity": "groups", "group_size": 2,
        "split_kinds": ["attn", "embed"], "search": ["weight", "density", "lambda"],
        "ranges": {"density": [0.05, 1.0]}, "init": {"weight": "1/n", "density": 0.5}, "fixed": {"normalize": False},
    },
    "routing": {"kind": "routing", "repeats": 2, "max_layers": 7, "scale": {"mode": "pair"}},
    "hybrid": {
        "kind": "hybrid",
        "params": {"method": "ties", "granularity": "per_layer", "init": {"weight": 0.4, "density": 0.7}},
        "routing": {"repeats": 1, "scale": {"mode": "position", "transform": "linear", "range": [0.25, 1.5]}},
    },
    "segments": {"kind": "segments", "coefficient_range": [-0.5, 1.5]},
    "lines": {"kind": "lines", "method": "ties", "fixed": {"weight": 1.0, "density": 0.5},
              "beta": {"range": [0.0, 1.0], "init": 0.25}},
    "layer_swap": {"kind": "layer_swap", "keep": "b", "donor": "a", "max_k": 2, "init": {"bottom": 1, "top": 1}},
}


def _cases():
    for kind in SPACES.names():
        yield pytest.param(EXAMPLES.get(kind), FAKE, id=f"kind-{kind}")
    for name in builtin_templates():
        yield pytest.param(f"builtin:{name}", None, id=f"builtin-{name}")


def _space(template, methods):
    tpl = load_template(template) if isinstance(template, str) else parse_template(template)
    models = MODELS
    if getattr(tpl, "method", None) == "slerp":
        models = SpaceModels(("base", "a"), 5, base="base")
    if getattr(tpl, "aim", None) is not None and tpl.data is None:  # AIM's gene reads calibration data
        tpl = parse_template(tpl.model_dump(mode="json") | {"data": {"suite": "builtin:zoo-2"}})
    return build_space(tpl, models, methods=methods)


def _method_of(recipe: Recipe, methods) -> MergeMethod:
    return (methods or METHODS).get(recipe.method)


def _check_recipe(recipe: Recipe, space, methods) -> None:
    if recipe.method != "passthrough":
        method = _method_of(recipe, methods)
        declared = {p.name: p.scope for p in method.params}
        for name in recipe.parameters:
            assert declared[name] == "global", name
        for entry in recipe.models:
            for name in entry.parameters:
                assert declared[name] == "source", name
        validate_recipe_params(recipe, method)
    if recipe.routing is not None:
        n = space.num_layers if hasattr(space, "num_layers") else MODELS.num_layers
        assert all(0 <= s.layer < n and s.scale > 0 for s in recipe.routing.steps)


@pytest.mark.parametrize(("template", "methods"), list(_cases()))
def test_space_contract(template, methods):
    assert template is not None, "every registered space kind needs an example template here"
    space = _space(template, methods)
    genes = space.genes()
    assert space.dim == len(genes) == space.x0.shape[0] == space.lower.shape[0] == space.upper.shape[0] > 0
    assert np.all(space.lower <= space.x0) and np.all(space.x0 <= space.upper)
    table = space.describe()
    assert len(table.splitlines()) == space.dim + 3
    for g in genes:
        assert g.name in table and g.controls in table and g.low <= g.start <= g.high
    assert len({g.name for g in genes}) == space.dim

    rng = np.random.default_rng(0)
    genomes = [space.x0, space.lower, space.upper, *rng.uniform(space.lower, space.upper, (6, space.dim))]
    for genome in genomes:
        kept = genome.copy()
        first, second = space.decode(genome), space.decode(list(genome))
        assert np.array_equal(genome, kept)
        assert first == second and first.hash == second.hash
        assert Recipe.from_yaml(first.to_yaml()).hash == first.hash
        _check_recipe(first, space, methods)
    wild = rng.normal(0.5, 3.0, space.dim)
    assert space.decode(wild) == space.decode(np.clip(wild, space.lower, space.upper))
    with pytest.raises(ConfigError):
        space.decode(np.zeros(space.dim + 1))
    with pytest.raises(ConfigError):
        space.decode(np.full(space.dim, np.nan))
    # declared capabilities: the parameter genes a warm start re-centres exist exactly for params and hybrid
    genes_block = space.param_genes
    assert (genes_block is not None) == (space.kind in ("params", "hybrid")), space.kind
    if genes_block is not None:
        assert genes_block.dim <= space.dim and genes_block.method.name == first.method
    if space.kind != "segments":
        assert space.prepare_segments({}) is None


def _all_roles(n: int):
    for kind in MODULE_KINDS:
        if kind in ("embed", "lm_head"):
            yield TensorRole(None, kind)
        else:
            yield from (TensorRole(layer, kind) for layer in range(n))


def test_x0_is_the_hand_set_merge():
    space = build_space(parse_template(EXAMPLES["params"]), MODELS, methods=FAKE)
    recipe = space.decode(space.x0)
    assert recipe.parameters["normalize"] is False
    for entry in recipe.models:
        for role in _all_roles(5):
            assert evaluate(entry.parameters["weight"], role, 5) == pytest.approx(1 / 2)
            assert evaluate(entry.parameters["density"], role, 5) == pytest.approx(0.5)
    for role in _all_roles(5):
        assert evaluate(recipe.parameters["lambda"], role, 5) == pytest.approx(1.0)  # the declared default


def _genes_by_name(space) -> dict[str, int]:
    return {g.name: i for i, g in enumerate(space.genes())}


@pytest.mark.parametrize(("granularity", "extra", "groups"), [
    ("global", {}, [[0, 1, 2, 3, 4]]),
    ("per_layer", {}, [[0], [1], [2], [3], [4]]),
    ("groups", {"group_size": 2}, [[0, 1], [2, 3], [4]]),
])
def test_granularity_gives_per_layer_lists(granularity, extra, groups):
    tpl = {"kind": "params", "method": "ties", "granularity": granularity, **extra,
           "search": ["weight"], "init": {"weight": 0.5}}
    space = build_space(parse_template(tpl), MODELS, methods=FAKE)
    assert space.dim == 2 * len(groups)
    genome = np.linspace(0.05, 0.95, space.dim)
    recipe = space.decode(genome)
    for m, entry in enumerate(recipe.models):
        value = entry.parameters["weight"]
        if granularity == "global":
            assert value == pytest.approx(genome[m])
            continue
        assert isinstance(value, list) and len(value) == 5
        for g, layers in enumerate(groups):
            for layer in layers:
                assert value[layer] == pytest.approx(genome[m * len(groups) + g])
                assert evaluate(value, TensorRole(layer, "attn"), 5) == pytest.approx(genome[m * len(groups) + g])


def test_module_kinds_split_and_absent_kinds_skipped():
    tied = SpaceModels(("base", "a"), 4, base="base", module_kinds={"embed", "attn", "mlp", "norm"})
    tpl = {"kind": "params", "method": "ties", "granularity": "per_layer", "split_kinds": ["attn", "lm_head", "embed"],
           "search": ["weight"], "init": {"weight": 0.5}}
    space = build_space(parse_template(tpl), tied, methods=FAKE)
    names = _genes_by_name(space)
    assert space.dim == 4 + 1 + 4  # attn per layer, embed once, the rest (mlp, norm) per layer
    assert not any("lm_head" in n for n in names)
    genome = np.full(space.dim, 0.5)
    genome[names["weight[a].embed"]] = 0.9
    genome[names["weight[a].attn.L2"]] = 0.1
    value = space.decode(genome).models[0].parameters["weight"]
    assert set(value) == {"attn", "embed", "default"}
    assert value["embed"] == pytest.approx(0.9) and value["attn"][2] == pytest.approx(0.1)
    assert evaluate(value, TensorRole(2, "mlp"), 4) == pytest.approx(0.5)


def test_ranges_and_transforms(caplog):
    tpl = {"kind": "params", "method": "ties", "search": ["weight", "density"], "ranges": {"density": [0.05, 1.0]},
           "init": {"weight": 0.5, "density": 0.5}}
    space = build_space(parse_template(tpl), MODELS, methods=FAKE)
    low, high = space.decode(space.lower), space.decode(space.upper)
    for entry in low.models:
        assert entry.parameters == {"weight": 0.0, "density": 0.05}
    for entry in high.models:
        assert entry.parameters == {"weight": 1.0, "density": 1.0}
    neg = {**tpl, "ranges": {"weight": [-1.0, 1.0]}}
    with pytest.raises(ConfigError, match=r"ranges\.weight.*allow_negative"):
        build_space(parse_template(neg), MODELS, methods=FAKE)
    space = build_space(parse_template({**neg, "allow_negative": ["weight"]}), MODELS, methods=FAKE)
    assert space.decode(space.lower).models[0].parameters["weight"] == -1.0
    with caplog.at_level(logging.DEBUG, logger="evomerge.spaces.params"):
        wide = build_space(parse_template({**tpl, "ranges": {"density": [0.05, 1.5]}}), MODELS, methods=FAKE)
    assert "ranges.density: [0.05, 1.5] reaches beyond the natural bounds [0, 1]" in caplog.text
    assert wide.decode(wide.upper).models[0].parameters["density"] == 1.5
    with pytest.raises(ConfigError, match=r"init\.density.*outside"):
        build_space(parse_template({**tpl, "init": {"weight": 0.5, "density": 0.01}}), MODELS, methods=FAKE)


def test_user_errors_name_the_field():
    def build(tpl, models=MODELS):
        return build_space(parse_template(tpl, source="my.yaml"), models, methods=FAKE)

    with pytest.raises(ConfigError, match=r"unknown merge method 'nope'.*linear, slerp, ties"):
        build({"kind": "params", "method": "nope"})
    with pytest.raises(ConfigError, match=r"search\[1\].*no parameter 'dens'.*valid: weight"):
        build({"kind": "params", "method": "ties", "search": ["weight", "dens"]})
    with pytest.raises(ConfigError, match=r"search\[0\].*boolean"):
        build({"kind": "params", "method": "ties", "search": ["normalize"]})
    with pytest.raises(ConfigError, match=r"fixed\.normalize: ties\.normalize takes true or false"):
        build({"kind": "params", "method": "ties", "init": {"weight": 1}, "fixed": {"normalize": 0.5}})
    with pytest.raises(ConfigError, match=r"init\.density: 'density' is not searched.*set its value under fixed"):
        build({"kind": "params", "method": "ties", "search": ["weight"], "init": {"weight": 1, "density": 0.5}})
    with pytest.raises(ConfigError, match=r"init\.weight.*no default"):
        build({"kind": "params", "method": "ties", "search": ["weight"]})
    with pytest.raises(ConfigError, match=r"data\.model_tasks: \['c'\] are not source models \(base, a, b\)"):
        build({"kind": "params", "method": "ties", "init": {"weight": 1, "density": 0.5},
               "data": {"suite": "builtin:zoo", "model_tasks": {"a": ["add"], "c": ["rev"]}}})
    with pytest.raises(ConfigError, match=r"models: method 'slerp' takes 1\.\.1"):
        build({"kind": "params", "method": "slerp", "search": ["t"], "init": {"t": 0.5}})
    with pytest.raises(ConfigError, match="needs a base model"):
        build({"kind": "params", "method": "ties", "init": {"weight": 1}}, SpaceModels(("a", "b"), 2))
    with pytest.raises(ConfigError, match=r"my\.yaml: granularit: Extra inputs"):
        parse_template({"kind": "params", "method": "ties", "granularit": "global"}, source="my.yaml")
    with pytest.raises(ConfigError, match=r"my\.yaml: params\.group_size.*greater than or equal to 1"):
        parse_template({"kind": "hybrid", "params": {"method": "ties", "granularity": "groups", "group_size": 0}},
                       source="my.yaml")
    with pytest.raises(ConfigError, match=r"needs group_size"):
        parse_template({"kind": "params", "method": "ties", "granularity": "groups"})
    with pytest.raises(ConfigError, match=r"kind: unknown kind 'bogus'; use one of hybrid, layer_swap, lines, params, routing, segments"):
        parse_template({"kind": "bogus"})
    with pytest.raises(ConfigError, match=r"no built-in search_spaces named 'nope'.*ties-per-layer"):
        load_template("builtin:nope")
    with pytest.raises(ConfigError, match=f"{MERGED!r} is reserved"):
        SpaceModels(("a", MERGED), 2)


def test_baseless_method_merges_the_sources_and_optionally_the_base():
    tpl = {"kind": "params", "method": "linear", "search": ["weight"], "init": {"weight": "1/n"}}
    space = build_space(parse_template(tpl), MODELS, methods=FAKE)
    recipe = space.decode(space.x0)
    assert recipe.base_model is None and [m.model for m in recipe.models] == ["a", "b"]
    with_base = build_space(parse_template({**tpl, "include_base": True}), MODELS, methods=FAKE)
    recipe = with_base.decode(with_base.x0)
    assert [m.model for m in recipe.models] == ["base", "a", "b"]
    assert recipe.models[0].parameters["weight"] == pytest.approx(1 / 3)


def test_space_models_from_tensor_names():
    names = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight",
             "model.layers.0.input_layernorm.weight", "model.norm.weight"]
    models = SpaceModels.from_tensor_names(["base", "a"], num_layers=1, tensor_names=names, base="base")
    assert models.module_kinds == {"embed", "attn", "mlp", "norm"} and models.sources == ("a",)


def test_describe_is_a_table_of_every_gene():
    space = build_space(parse_template(EXAMPLES["params"]), MODELS, methods=FAKE)
    assert isinstance(space, GeneSpace)
    lines = space.describe().splitlines()
    assert lines[0].startswith(f"search space 'params' (ties, groups): {space.dim} genes")
    assert lines[1].split() == ["#", "gene", "controls", "range", "transform", "x0"]
    row = next(line for line in lines if "density[b].attn.L2-3" in line)
    assert "[0.05, 1]" in row and "linear" in row and "layers 2-3" in row


@pytest.mark.parametrize("name", builtin_templates())
def test_builtin_x0_is_the_templates_hand_set_merge(name):
    tpl = load_template(f"builtin:{name}")
    space = _space(f"builtin:{name}", None)
    recipe = space.decode(space.x0)
    section = tpl.params if tpl.kind == "hybrid" else (tpl if tpl.kind == "params" else None)
    if section is not None:
        method = METHODS.get(section.method)
        n = len(recipe.models)
        for pname in section.search:
            raw = section.init.get(pname, method.param(pname).default)
            want = 1 / n if raw == "1/n" else float(raw)
            holders = [m.parameters for m in recipe.models] if method.param(pname).scope == "source" else [
                recipe.parameters]
            for params in holders:
                for role in _all_roles(MODELS.num_layers):
                    assert evaluate(params[pname], role, MODELS.num_layers) == pytest.approx(want, abs=1e-12)
    if tpl.kind == "lines":  # alpha = 1/n, beta = 0.5 over the layers
        n, L = len(recipe.models), MODELS.num_layers
        assert recipe.parameters["lambda"] == pytest.approx([1 / n + 0.5 * i / (L - 1) for i in range(L)])
    if tpl.kind == "layer_swap":  # 3/16 of the 5 layers at the bottom (1), 1/16 at the top (0)
        assert [s.model for s in recipe.routing.steps] == ["b", "a", "a", "a", "a"]
    elif recipe.routing is not None:
        steps = recipe.routing.steps
        assert [s.layer for s in steps] == list(range(MODELS.num_layers))
        assert {s.model for s in steps} == {recipe.routing.frame} and all(s.scale == 1.0 for s in steps)


def test_bad_genomes_are_refused_with_the_reason():
    space = build_space(parse_template(EXAMPLES["params"]), MODELS, methods=FAKE)
    with pytest.raises(ConfigError, match=f"genome has {space.dim + 1} values; this search space has dim {space.dim}"):
        space.decode(np.zeros(space.dim + 1))
    bad = space.x0
    bad[3] = np.inf
    with pytest.raises(ConfigError, match=r"non-finite values at \[3\]"):
        space.decode(bad)
