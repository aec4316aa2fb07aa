"""Routed models: live (over resident layers) and exported (plain HF folder with folded scales)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evomerge.errors import MaterializeError
from evomerge.merge.routing import (
    build_routed_model,
    cumulative_scales,
    export_routed,
    live_routed_model,
    routed_config_patch,
    routed_state_dict,
)
from evomerge.recipe import ModelEntry, Recipe, RouteStep, Routing
from evomerge.spaces import SpaceModels, build_space, parse_template
from evomerge.testing.tokenizer import build_tokenizer

VOCAB = 40


def _llama(seed: int, *, eps: float = 1e-12, layers: int = 3) -> LlamaForCausalLM:
    """A tiny random Llama whose weights come from a seeded generator (no global RNG)."""
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=eps,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.3 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("routing")
    models = {"a": _llama(1), "b": _llama(2)}
    paths = {}
    tok = build_tokenizer()
    for name, m in models.items():
        paths[name] = root / name
        m.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return {"models": models, "paths": paths, "root": root}


def _ids(seed: int = 0, batch: int = 2, length: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _save_routed(out: Path, routing: Routing, models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The routed model written as a plain HF folder by the export functions, loaded back."""
    sds = {k: m.state_dict() for k, m in models.items()}
    config = models[routing.frame].config.to_dict()
    names = list(sds[routing.frame])
    tensors = routed_state_dict(routing, lambda m, n: sds[m][n], names, model_type=config["model_type"])
    out.mkdir(parents=True)
    save_file({n: t.contiguous() for n, t in tensors}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**config, **routed_config_patch(routing, config, names)}))
    return AutoModelForCausalLM.from_pretrained(out).eval()


def _export(pair, routing: Routing, out: Path) -> torch.nn.Module:
    return _save_routed(out, routing, pair["models"])


def _steps(*spec: tuple[str, int, float]) -> tuple[RouteStep, ...]:
    return tuple(RouteStep(model=m, layer=i, scale=s) for m, i, s in spec)


ROUTE = Routing(
    steps=_steps(("a", 0, 1.0), ("b", 1, 1.7), ("a", 0, 0.6), ("b", 2, 1.3), ("b", 1, 0.8), ("a", 2, 1.0)),
    frame="a",
)


def test_identity_route_reproduces_the_source_live_and_exported(pair, tmp_path):
    a = pair["models"]["a"]
    identity = Routing(steps=_steps(("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)), frame="a")
    ids = _ids()
    expected = _logits(a, ids)
    live = build_routed_model(a, pair["models"], identity)
    torch.testing.assert_close(_logits(live, ids), expected, rtol=0, atol=1e-6)
    exported = _export(pair, identity, tmp_path / "identity")
    torch.testing.assert_close(_logits(exported, ids), expected, rtol=0, atol=1e-6)


def test_live_routed_model_equals_its_exported_folder(pair, tmp_path):
    live = build_routed_model(pair["models"]["a"], pair["models"], ROUTE)
    exported = _export(pair, ROUTE, tmp_path / "routed")
    assert exported.config.num_hidden_layers == len(ROUTE.steps)
    ids = _ids(1)
    got, want = _logits(exported, ids), _logits(live, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unscaled = Routing(steps=tuple(s.model_copy(update={"scale": 1.0}) for s in ROUTE.steps), frame="a")
    plain = _logits(build_routed_model(pair["models"]["a"], pair["models"], unscaled), ids)
    assert (plain - want).abs().max() > 1e-2  # the scales do change the model


def test_scale_folding_is_exact_up_to_the_norm_epsilon(tmp_path):
    models = {"a": _llama(1, eps=1e-2), "b": _llama(2, eps=1e-2)}
    live = build_routed_model(models["a"], models, ROUTE)
    exported = _save_routed(tmp_path / "eps", ROUTE, models)
    diff = (_logits(exported, _ids()) - _logits(live, _ids())).abs().max()
    assert diff > 1e-4  # a large epsilon breaks the scale invariance the folding relies on


def test_generate_with_cache_matches_no_cache_and_export(pair, tmp_path):
    live = build_routed_model(pair["models"]["a"], pair["models"], ROUTE)
    ids = _ids(2, batch=1, length=5)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = live.generate(ids, **kw)
    uncached = live.generate(ids, use_cache=False, **kw)
    exported = _export(pair, ROUTE, tmp_path / "gen").generate(ids, **kw)
    assert cached.shape[1] == ids.shape[1] + 6
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, exported)


def test_live_model_references_resident_layers_without_copy(pair):
    a, b = pair["models"]["a"], pair["models"]["b"]
    live = build_routed_model(a, pair["models"], ROUTE)
    layers = live.model.layers
    assert layers[0].layer is a.model.layers[0] and layers[2].layer is a.model.layers[0]
    assert layers[1].layer is b.model.layers[1]
    assert live.model.embed_tokens is a.model.embed_tokens and live.lm_head is a.lm_head
    assert [layer.index for layer in layers] == list(range(len(ROUTE.steps)))
    assert a.config.num_hidden_layers == 3 and live.config.num_hidden_layers == len(ROUTE.steps)
    ids = _ids(3)
    before = _logits(live, ids)
    with torch.no_grad():
        b.model.layers[1].mlp.down_proj.weight.mul_(2.0)
    try:
        assert (_logits(live, ids) - before).abs().max() > 1e-3
    finally:
        with torch.no_grad():
            b.model.layers[1].mlp.down_proj.weight.div_(2.0)


def test_routing_errors_name_the_step(pair):
    bad_layer = Routing(steps=_steps(("a", 0, 1.0), ("b", 7, 1.0)), frame="a")
    with pytest.raises(MaterializeError, match=r"steps\[1\].*layer 7"):
        build_routed_model(pair["models"]["a"], pair["models"], bad_layer)
    unknown = Routing(steps=_steps(("c", 0, 1.0),), frame="a")
    with pytest.raises(MaterializeError, match=r"steps\[0\].*'c'"):
        build_routed_model(pair["models"]["a"], pair["models"], unknown)
    negative = Routing(steps=_steps(("a", 0, 1.0), ("a", 1, -0.5)), frame="a")
    sd = pair["models"]["a"].state_dict()
    with pytest.raises(MaterializeError, match=r"steps\[1\]\.scale"):
        routed_state_dict(negative, lambda m, n: sd[n], list(sd))
    with pytest.raises(MaterializeError, match="gpt2"):
        routed_state_dict(ROUTE, lambda m, n: sd[n], list(sd), model_type="gpt2")


def test_export_layout_and_config_patch(pair):
    sds = {k: m.state_dict() for k, m in pair["models"].items()}
    out = dict(routed_state_dict(ROUTE, lambda m, n: sds[m][n], list(sds["a"])))
    n = len(ROUTE.steps)
    assert {k for k in out if ".layers." in k} == {
        k.replace("layers.0.", f"layers.{i}.") for k in sds["a"] if ".layers.0." in k for i in range(n)
    }
    prods = cumulative_scales(ROUTE)
    for k, step in enumerate(ROUTE.steps):
        src = sds[step.model]
        q = f"model.layers.{k}.self_attn.q_proj.weight"
        o = f"model.layers.{k}.self_attn.o_proj.weight"
        assert torch.equal(out[q], src[f"model.layers.{step.layer}.self_attn.q_proj.weight"])
        torch.testing.assert_close(out[o] * prods[k], src[f"model.layers.{step.layer}.self_attn.o_proj.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], sds["a"]["model.embed_tokens.weight"])
    patch = routed_config_patch(ROUTE, {"num_hidden_layers": 3, "layer_types": ["x0", "x1", "x2"]})
    assert patch == {"num_hidden_layers": n, "layer_types": ["x0", "x1", "x0", "x2", "x1", "x2"]}


def test_export_routed_from_folders_and_merge(pair, tmp_path):
    from evomerge.io import ModelFolder

    folders = {k: ModelFolder.open(p) for k, p in pair["paths"].items()}
    recipe = Recipe(method="passthrough", models=(ModelEntry(model="a"), ModelEntry(model="b")), routing=ROUTE)
    tensors, config = export_routed(recipe, folders, dict(folders["a"].config))
    assert config["num_hidden_layers"] == len(ROUTE.steps)
    sds = {k: m.state_dict() for k, m in pair["models"].items()}
    want = dict(routed_state_dict(ROUTE, lambda m, n: sds[m][n], list(sds["a"])))
    got = dict(tensors)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    merged_route = Routing(steps=_steps(("@merge", 0, 1.0), ("b", 1, 1.0)), frame="@merge")
    hybrid = recipe.model_copy(update={"routing": merged_route})
    calls = []

    def fake_merge(r, f, device="cpu"):
        calls.append(r.routing)
        yield from ((n, t * 0 + 7.0) for n, t in sds["a"].items())

    tensors, _ = export_routed(hybrid, folders, dict(folders["a"].config), iter_merged_fn=fake_merge)
    got = dict(tensors)
    assert calls == [None]
    assert torch.all(got["model.layers.0.mlp.up_proj.weight"] == 7.0)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], sds["b"]["model.layers.1.mlp.up_proj.weight"])
    assert torch.all(got["lm_head.weight"] == 7.0)


def test_live_routed_model_from_resident_sources(pair):
    from evomerge.merge.sources import ResidentSources

    sources = ResidentSources.load(pair["paths"], "a", ["b"])
    live = AutoModelForCausalLM.from_pretrained(pair["paths"]["a"]).eval()
    with torch.no_grad():
        for p in live.parameters():
            p.mul_(0.5)  # stands for whatever merge the worker last wrote
    recipe = Recipe(method="passthrough", models=(ModelEntry(model="a"), ModelEntry(model="b")), routing=ROUTE)
    routed = live_routed_model(recipe, live, sources)
    ids = _ids(4)
    want = _logits(build_routed_model(pair["models"]["a"], pair["models"], ROUTE), ids)
    torch.testing.assert_close(_logits(routed, ids), want, rtol=1e-5, atol=1e-5)
    merged_route = Routing(steps=_steps(("@merge", 0, 1.0), ("b", 2, 1.0)), frame="@merge")
    hybrid = live_routed_model(recipe.model_copy(update={"routing": merged_route}), live, sources)
    assert hybrid.model.layers[0].layer is live.model.layers[0] and hybrid.lm_head is live.lm_head
    assert live_routed_model(recipe, live, sources).model.layers[1].layer is routed.model.layers[1].layer


def test_decoded_route_materializes_to_the_live_model(pair, tmp_path):
    from evomerge.merge.materialize import materialize_to_disk

    template = parse_template({"kind": "routing", "repeats": 2, "scale": {"mode": "pair", "range": [0.5, 2.0]}})
    space = build_space(template, SpaceModels(("a", "b"), 3))
    genome = np.random.default_rng(3).uniform(0.0, 1.0, space.dim)
    recipe = space.decode(genome)
    steps = recipe.routing.steps
    assert len(steps) > 3 and any(s.scale != 1.0 for s in steps)
    bound = recipe.model_copy(update={"sources": {k: str(p) for k, p in pair["paths"].items()}})
    out = materialize_to_disk(bound, tmp_path / "merged")
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    live = build_routed_model(pair["models"][recipe.routing.frame], pair["models"], recipe.routing)
    ids = _ids(5)
    torch.testing.assert_close(_logits(exported, ids), _logits(live, ids), rtol=1e-4, atol=1e-4)
