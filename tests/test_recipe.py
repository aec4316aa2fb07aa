from __future__ import annotations

import pytest

from evomerge.errors import ConfigError
from evomerge.io.arch import TensorRole
from evomerge.merge.tensor_params import evaluate
from evomerge.recipe import Recipe
from evomerge.registry import Registry


def _recipe(**kw):
    base = dict(
        method="ties",
        base_model="base",
        models=[
            {"model": "a", "parameters": {"weight": 0.5, "density": [0.2, 0.8]}},
            {"model": "b", "parameters": {"weight": {"attn": 0.3, "default": 1.0}}},
        ],
        parameters={"normalize": True},
    )
    base.update(kw)
    return Recipe.model_validate(base)


def test_yaml_round_trip_and_hash_stability():
    r = _recipe(sources={"a": "/models/a"})
    back = Recipe.from_yaml(r.to_yaml())
    assert back == r
    assert back.hash == r.hash
    # paths bind a recipe to folders; they are not part of its identity
    assert _recipe(sources={"a": "/elsewhere"}).hash == r.hash
    assert _recipe(seed=1).hash != r.hash
    assert len(r.hash) == 16


def test_hash_independent_of_key_order():
    a = Recipe.model_validate({"method": "linear", "models": [{"model": "x", "parameters": {"weight": 1.0, "w2": 2.0}}]})
    b = Recipe.model_validate({"models": [{"parameters": {"w2": 2.0, "weight": 1.0}, "model": "x"}], "method": "linear"})
    assert a.hash == b.hash


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ({"unknown_key": 1}, "unknown_key"),
        ({"models": []}, "models"),
        ({"models": [{"model": "a"}, {"model": "a"}]}, "more than once"),
        ({"parameters": {"weight": {"attention": 1.0}}}, "unknown module kind"),
        ({"tokenizer_source": "zzz"}, "tokenizer_source"),
        ({"routing": {"steps": [{"model": "q", "layer": 0}], "frame": "a"}}, "routing.steps[0]"),
    ],
)
def test_invalid_recipes_name_the_field(bad, fragment):
    with pytest.raises(ValueError) as exc:
        _recipe(**bad)
    assert fragment in str(exc.value)


def test_recipe_is_frozen():
    r = _recipe()
    with pytest.raises(ValueError):
        r.method = "linear"  # type: ignore[misc]


def test_param_evaluation_gradients_and_kinds():
    L = 5
    # gradient interpolates across layers; tensors outside layers use t=0 (mergekit)
    assert evaluate([0.0, 1.0], TensorRole(0, "attn"), L) == 0.0
    assert evaluate([0.0, 1.0], TensorRole(4, "attn"), L) == 1.0
    assert evaluate([0.0, 1.0], TensorRole(2, "mlp"), L) == pytest.approx(0.5)
    assert evaluate([0.0, 1.0], TensorRole(None, "lm_head"), L) == 0.0
    # a list as long as the layers gives one value per layer
    vals = [0.1, 0.2, 0.3, 0.4, 0.5]
    assert [evaluate(vals, TensorRole(i, "mlp"), L) for i in range(L)] == pytest.approx(vals)
    kinds = {"attn": [0.0, 1.0], "default": 0.7}
    assert evaluate(kinds, TensorRole(4, "attn"), L) == 1.0
    assert evaluate(kinds, TensorRole(4, "mlp"), L) == 0.7
    with pytest.raises(ConfigError, match="kind 'mlp'"):
        evaluate({"attn": 1.0}, TensorRole(1, "mlp"), L)


def test_registry_collisions_unknown_names_and_capabilities():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1, capabilities={"fast"})
    reg.register_lazy("b", "math:pi", capabilities={"fast", "lazy"})
    with pytest.raises(ValueError, match="already registered"):
        reg.add("a", 2)
    with pytest.raises(ConfigError, match="valid names: a, b"):
        reg.get("c")
    assert reg.get("b") == pytest.approx(3.14159, rel=1e-4)
    assert reg.names(having={"lazy"}) == ["b"]
    assert reg.names(having={"fast"}) == ["a", "b"]
