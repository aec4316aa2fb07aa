"""Layer-routing (data-flow) and hybrid search spaces."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.errors import ConfigError
from evomerge.merge.methods.base import MergeMethod, ParamSpec
from evomerge.merge.routing import build_routed_model
from evomerge.recipe import MERGED
from evomerge.registry import Registry
from evomerge.spaces import HybridSpace, RoutingSpace, SpaceModels, build_space
from evomerge.spaces.template import parse_template


def _noop(*args, **kwargs):
    raise AssertionError("search spaces never call a merge function")


#: A stand-in method, so these tests do not depend on the real methods' declarations.
FAKE: Registry[MergeMethod] = Registry("merge method")
FAKE.add("ties", MergeMethod("ties", _noop, (
    ParamSpec("weight", "source", None, (0.0, 1.0), required=True),
    ParamSpec("density", "source", 1.0, (0.0, 1.0)),
)))

MODELS = SpaceModels(("base", "a", "b"), 3, base="base")


def _routing(models=MODELS, **kw) -> RoutingSpace:
    space = build_space(parse_template({"kind": "routing", **kw}), models, methods=FAKE)
    assert isinstance(space, RoutingSpace)
    return space


def _path(recipe):
    return [(s.model, s.layer) for s in recipe.routing.steps]


def _genome(space, on: list[int], scale_genes=None) -> np.ndarray:
    g = np.full(space.dim, 0.5)
    T = len(space.block.slots)
    g[:T] = 0.2
    g[on] = 0.8
    if scale_genes is not None:
        g[T:] = scale_genes
    return g


def test_layout_and_x0_identity_route():
    space = _routing(repeats=2, scale={"mode": "transition"})
    T = 2 * 2 * 3
    assert space.block.slots == [(j, layer) for _ in range(2) for j in range(2) for layer in range(3)]
    assert space.dim == T + 2  # a->b and b->a
    recipe = space.decode(space.x0)
    assert recipe.method == "passthrough" and recipe.routing.frame == "a"
    assert _path(recipe) == [("a", 0), ("a", 1), ("a", 2)]
    assert all(s.scale == 1.0 for s in recipe.routing.steps)
    assert [m.model for m in recipe.models] == ["a", "b"]
    start_b = _routing(repeats=2, start="b")
    assert _path(start_b.decode(start_b.x0)) == [("b", 0), ("b", 1), ("b", 2)]
    assert start_b.decode(start_b.x0).routing.frame == "b"


def test_include_rule_keeps_layout_order():
    space = _routing(repeats=2, scale={"mode": "none"})
    assert space.dim == 12
    g = _genome(space, [7, 1, 10, 5])
    g[3] = 0.5  # exactly 0.5 is off
    assert _path(space.decode(g)) == [("a", 1), ("b", 2), ("a", 1), ("b", 1)]


def test_path_length_bound_keeps_the_strongest_slots():
    space = _routing(repeats=2, max_layers=4, scale={"mode": "none"})
    g = np.linspace(0.6, 0.95, space.dim)  # every slot on, later slots stronger
    g[2] = 0.99
    recipe = space.decode(g)
    assert len(recipe.routing.steps) == 4
    assert _path(recipe) == [("a", 2), ("b", 0), ("b", 1), ("b", 2)]  # slots 2, 9, 10, 11 in layout order
    factor = _routing(repeats=3, max_layers="1.5x", scale={"mode": "none"})
    assert factor.block.max_layers == 4 and len(factor.decode(np.ones(factor.dim)).routing.steps) == 4
    empty = np.full(space.dim, 0.1)
    empty[4] = 0.3
    assert _path(space.decode(empty)) == [("b", 1)]


def test_transition_scales_apply_when_the_path_switches_source():
    space = _routing(repeats=1, scale={"mode": "transition", "range": [0.5, 2.0], "transform": "log"})
    names = [g.name for g in space.genes()[6:]]
    assert names == ["scale.a->b", "scale.b->a"]
    recipe = space.decode(_genome(space, [0, 4, 5, 2], [1.0, 0.0]))  # a->b = 2, b->a = 0.5
    assert _path(recipe) == [("a", 0), ("a", 2), ("b", 1), ("b", 2)]
    assert [s.scale for s in recipe.routing.steps] == [1.0, 1.0, 2.0, 1.0]
    framed = _routing(repeats=1, frame="b", start="a", scale={"mode": "transition"})
    recipe = framed.decode(_genome(framed, [0, 3], [0.0, 1.0]))  # a->b = 0.5, b->a = 2
    assert [s.scale for s in recipe.routing.steps] == [2.0, 0.5]  # the embedding comes from the frame, b


def test_pair_and_position_scales():
    pair = _routing(repeats=1, scale={"mode": "pair", "range": [0.25, 4.0]})
    assert [g.name for g in pair.genes()[6:]] == ["scale.a->a", "scale.a->b", "scale.b->a", "scale.b->b"]
    recipe = pair.decode(_genome(pair, [0, 1, 4], [1.0, 0.75, 0.5, 0.0]))
    assert [s.scale for s in recipe.routing.steps] == [4.0, 4.0, 2.0]
    pos = _routing(repeats=1, scale={"mode": "position", "range": [0.5, 1.5], "transform": "linear"})
    assert pos.dim == 12
    scales = np.linspace(0.0, 1.0, 6)
    recipe = pos.decode(_genome(pos, [1, 3], scales))
    assert [s.scale for s in recipe.routing.steps] == pytest.approx([0.5 + scales[1], 0.5 + scales[3]])
    assert pos.decode(pos.x0).routing.steps[0].scale == 1.0


def test_routing_template_errors():
    with pytest.raises(ConfigError, match=r"frame: 'base' is not a route source"):
        _routing(frame="base")
    with pytest.raises(ConfigError, match=r"sources: unknown model\(s\) \['c'\]"):
        _routing(sources=["a", "c"])
    with pytest.raises(ConfigError, match=r"scale\.range.*must contain 1"):
        _routing(scale={"range": [1.5, 2.0]})
    with pytest.raises(ConfigError, match=r"scale\.range.*> 0"):
        _routing(scale={"range": [-1.0, 2.0]})
    with pytest.raises(ConfigError, match=r"max_layers"):
        _routing(max_layers="two")
    with_base = _routing(include_base=True, repeats=1, scale={"mode": "none"})
    assert with_base.block.sources == ["base", "a", "b"]


def test_hybrid_routes_over_the_merge_and_the_sources():
    tpl = {"kind": "hybrid", "params": {"method": "ties", "search": ["weight"], "init": {"weight": 0.5}},
           "routing": {"repeats": 1, "scale": {"mode": "transition"}}}
    space = build_space(parse_template(tpl), MODELS, methods=FAKE)
    assert isinstance(space, HybridSpace)
    assert space.route.sources == [MERGED, "a", "b"]
    assert space.dim == 2 + 9 + 6
    recipe = space.decode(space.x0)
    assert recipe.method == "ties" and recipe.base_model == "base"
    assert [m.parameters["weight"] for m in recipe.models] == [0.5, 0.5]
    assert recipe.routing.frame == MERGED and _path(recipe) == [(MERGED, 0), (MERGED, 1), (MERGED, 2)]
    g = space.x0
    g[0] = 1.0
    g[2:11] = 0.2
    g[[2 + 0, 2 + 4, 2 + 8]] = 0.9  # @merge layer 0, a layer 1, b layer 2
    recipe = space.decode(g)
    assert recipe.models[0].parameters["weight"] == 1.0
    assert _path(recipe) == [(MERGED, 0), ("a", 1), ("b", 2)]


def test_x0_route_reproduces_the_start_model():
    cfg = LlamaConfig(vocab_size=30, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    models = {name: LlamaForCausalLM(cfg).eval() for name in ("a", "b")}
    space = _routing(repeats=2, scale={"mode": "pair"})
    routing = space.decode(space.x0).routing
    live = build_routed_model(models[routing.frame], models, routing)
    ids = torch.arange(3, 12).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(live(ids).logits, models["a"](ids).logits, rtol=0, atol=0)


def test_builtin_hybrid_task_arithmetic_starts_at_the_warm_merge_unrouted():
    """`builtin:hybrid-task-arithmetic` with a tuned weight: x0 is that task-arithmetic merge, run layer by layer."""
    from evomerge.merge.methods import METHODS
    from evomerge.spaces.template import load_template

    data = load_template("builtin:hybrid-task-arithmetic").model_dump(mode="json")
    data["params"]["init"] = {"weight": 0.9}
    space = build_space(parse_template(data), MODELS, methods=METHODS)
    assert isinstance(space, HybridSpace)
    assert space.dim == 2 * 3 * 3 + 3 * 3 + 6  # weights (2 models x 3 layers x attn/mlp/rest) + slots + scales
    recipe = space.decode(space.x0)
    assert recipe.method == "task_arithmetic"
    for m in recipe.models:
        assert {k: v for k, v in m.parameters["weight"].items()} == {
            "attn": [0.9] * 3, "mlp": [0.9] * 3, "default": [0.9] * 3}
    assert recipe.routing.frame == MERGED and _path(recipe) == [(MERGED, 0), (MERGED, 1), (MERGED, 2)]
    assert all(s.scale == 1.0 for s in recipe.routing.steps)
