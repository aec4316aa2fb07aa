from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ConfigError, MaterializeError, SourceError, SourceMismatchError
from evomerge.merge.materialize import InPlaceMerger, materialize_state_dict, materialize_to_disk
from evomerge.merge.sources import ResidentSources, check_finite
from evomerge.mergekit_compat import from_mergekit_yaml, to_mergekit_yaml
from evomerge.recipe import ModelEntry, Recipe
from evomerge.testing.tokenizer import build_tokenizer


def _config(**kw):
    tok = build_tokenizer()
    base = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    """A base and three 'fine-tunes' (base + structured noise), saved as HF folders."""
    root = tmp_path_factory.mktemp("family")
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        base = LlamaForCausalLM(_config())
    paths = {}
    for i, name in enumerate(["base", "a", "b", "c"]):
        model = LlamaForCausalLM(_config())
        sd = {k: v.clone() for k, v in base.state_dict().items()}
        if i:
            for v in sd.values():
                if v.is_floating_point():
                    v.add_(torch.randn(v.shape, generator=g) * 0.05)
        model.load_state_dict(sd)
        paths[name] = root / name
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
    return paths


def _recipe(family, method="ties", **params):
    models = [{"model": m, "parameters": {"weight": w, "density": 0.6}} for m, w in zip("abc", (0.5, 0.3, 0.8), strict=True)]
    if method in ("task_arithmetic", "linear"):
        models = [{"model": m["model"], "parameters": {"weight": m["parameters"]["weight"]}} for m in models]
    return Recipe.model_validate(
        dict(method=method, base_model="base", models=models, parameters=params, seed=3,
             sources={k: str(v) for k, v in family.items()})
    )


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "linear"])
def test_in_place_equals_merge_to_disk_exactly(family, tmp_path, method):
    recipe = _recipe(family, method)
    out = materialize_to_disk(recipe, tmp_path / "out", max_shard_bytes=40_000)
    assert len(list(out.glob("*.safetensors"))) > 1  # sharded with an index
    assert (out / "model.safetensors.index.json").is_file()
    disk = AutoModelForCausalLM.from_pretrained(out)
    sources = ResidentSources.load({k: str(v) for k, v in family.items()}, "base", ["a", "b", "c"])
    live = AutoModelForCausalLM.from_pretrained(family["base"])
    InPlaceMerger(sources, live).apply(recipe)
    for (n1, p1), (n2, p2) in zip(disk.state_dict().items(), live.state_dict().items(), strict=True):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    # the merged model is a real model: it generates
    tok = build_tokenizer()
    ids = tok("12+3=", return_tensors="pt", add_special_tokens=False).input_ids
    gen = disk.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape == (1, ids.shape[1] + 4)
    assert "recipe" in (out / "README.md").read_text() or recipe.hash in (out / "README.md").read_text()


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs_ties"])
def test_sorted_magnitude_cache_gives_identical_bits(family, tmp_path, method):
    paths = {k: str(v) for k, v in family.items()}
    cached = ResidentSources.load(paths, "base", ["a", "b", "c"], sorted_magnitudes=True)
    plain = ResidentSources.load(paths, "base", ["a", "b", "c"])
    live_c = AutoModelForCausalLM.from_pretrained(family["base"])
    live_p = AutoModelForCausalLM.from_pretrained(family["base"])
    permuted = Recipe.model_validate(dict(
        method=method, base_model="base", seed=5,
        models=[{"model": "c", "parameters": {"weight": 0.7, "density": 0.3}},
                {"model": "a", "parameters": {"weight": 0.4, "density": [0.9, 0.2]}}]))
    for recipe in (_recipe(family, method) if method != "breadcrumbs_ties" else permuted, permuted):
        InPlaceMerger(cached, live_c).apply(recipe)
        InPlaceMerger(plain, live_p).apply(recipe)
        disk = materialize_state_dict(recipe, paths)
        for name, p in live_c.state_dict().items():
            assert torch.equal(p, live_p.state_dict()[name]), name
            assert torch.equal(p, disk[name]), name


def test_in_place_is_reusable_and_subset_rows(family):
    sources = ResidentSources.load({k: str(v) for k, v in family.items()}, "base", ["a", "b", "c"])
    live = AutoModelForCausalLM.from_pretrained(family["base"])
    merger = InPlaceMerger(sources, live)
    r1 = _recipe(family, "task_arithmetic")
    merger.apply(r1)
    first = {k: v.clone() for k, v in live.state_dict().items()}
    # a recipe over a permuted subset of the resident models
    r2 = Recipe.model_validate(dict(method="task_arithmetic", base_model="base",
                                    models=[{"model": "c", "parameters": {"weight": 1.0}},
                                            {"model": "a", "parameters": {"weight": 0.0}}]))
    merger.apply(r2)
    c = AutoModelForCausalLM.from_pretrained(family["c"]).state_dict()
    for k, v in live.state_dict().items():
        torch.testing.assert_close(v, c[k], rtol=0, atol=1e-6)
    merger.apply(r1)  # back to the first recipe: bit-identical
    for k, v in live.state_dict().items():
        assert torch.equal(v, first[k]), k


def test_random_method_is_deterministic_and_seeded(family):
    r = _recipe(family, "dare_ties")
    a = materialize_state_dict(r)
    b = materialize_state_dict(r)
    c = materialize_state_dict(r.model_copy(update={"seed": 4}))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_nan_source_is_reported_with_tensor_name(family, tmp_path):
    bad = tmp_path / "bad"
    model = AutoModelForCausalLM.from_pretrained(family["a"])
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(bad)
    recipe = _recipe(family).model_copy(update={"sources": {**_recipe(family).sources, "a": str(bad)}})
    with pytest.raises(MaterializeError, match="model.layers.1.mlp.down_proj.weight"):
        materialize_state_dict(recipe)
    assert not (tmp_path / "out").exists()
    with pytest.raises(MaterializeError, match="'a'"):
        materialize_to_disk(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mismatched_and_pickle_sources_are_refused(family, tmp_path):
    other = tmp_path / "other"  # a different base model (vocabularies that differ only in rows are merged)
    LlamaForCausalLM(_config(vocab_size=60, hidden_size=48)).save_pretrained(other)
    r = _recipe(family)
    with pytest.raises(SourceMismatchError, match="embed_tokens"):
        materialize_state_dict(r.model_copy(update={"sources": {**r.sources, "b": str(other)}}))
    pick = tmp_path / "pickled"
    pick.mkdir()
    (pick / "config.json").write_text((family["a"] / "config.json").read_text())
    torch.save({}, pick / "pytorch_model.bin")
    with pytest.raises(SourceError, match="pytorch_model.bin"):
        materialize_state_dict(r.model_copy(update={"sources": {**r.sources, "b": str(pick)}}))


def test_bad_recipe_parameters_name_the_field(family):
    r = _recipe(family)
    with pytest.raises(ConfigError, match="densty"):
        materialize_state_dict(r.model_copy(update={"parameters": {"densty": 0.5}}))
    with pytest.raises(ConfigError, match="base_model"):
        materialize_state_dict(r.model_copy(update={"base_model": None}))


def test_mergekit_yaml_round_trip(family):
    from evomerge.io import ModelFolder, tensor_role

    folder = ModelFolder.open(family["base"])
    tensors = [(n, tensor_role(n, folder.model_type)) for n in folder.tensor_names]
    r = Recipe.model_validate(dict(
        method="ties", base_model=str(family["base"]),
        models=[{"model": str(family["a"]), "parameters": {"weight": {"attn": [0.2, 0.9], "mlp": 0.4, "default": 1.0},
                                                            "density": 0.5}},
                {"model": str(family["b"]), "parameters": {"weight": 0.7, "density": [0.3, 0.6, 0.9]}}],
        parameters={"normalize": True}, dtype="float32"))
    text = to_mergekit_yaml(r, tensors=tensors, num_layers=folder.num_layers, model_type=folder.model_type)
    doc = yaml.safe_load(text)
    assert doc["merge_method"] == "ties"
    assert doc["models"][0]["parameters"]["weight"][0] == {"filter": "self_attn", "value": [0.2, 0.9]}
    back = from_mergekit_yaml(text)
    assert back.canonical() == r.canonical()
    # and the imported recipe merges to the same tensors
    a = materialize_state_dict(r, {str(v): v for v in family.values()})
    b = materialize_state_dict(back)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_check_finite_finds_every_nan_and_inf_and_only_them(dtype):
    x = torch.linspace(-3, 3, 10_000).to(dtype)
    check_finite("t", "m", x)
    check_finite("t", "m", torch.arange(10))  # integers are not checked
    big = torch.full((10_000,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite, its sum overflows
    assert not bool(torch.isfinite(big.sum()))
    check_finite("t", "m", big)
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        y = x.clone()
        y[[17, 9000][: len(bad)]] = torch.tensor(bad, dtype=dtype)
        with pytest.raises(MaterializeError, match="source 'm', tensor t: contains NaN or inf"):
            check_finite("t", "m", y)


def test_mergekit_export_of_linear_lists_the_base_with_weight_zero(family):
    # mergekit averages a linear merge's base_model in and refuses it without a weight ("Missing required
    # parameter weight"); evomerge's linear base only anchors the task vectors, i.e. weight 0
    r = _recipe(family, "linear")
    doc = yaml.safe_load(to_mergekit_yaml(r))
    assert doc["base_model"] == str(family["base"])
    assert [m["model"] for m in doc["models"]] == [str(family[m]) for m in ("a", "b", "c", "base")]
    assert doc["models"][-1]["parameters"] == {"weight": 0.0}
    assert all("weight" in m["parameters"] for m in doc["models"])
    a = materialize_state_dict(r)
    b = materialize_state_dict(from_mergekit_yaml(to_mergekit_yaml(r)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a recipe whose base is listed among its models is exported as written
    listed = r.model_copy(update={"models": (*r.models, ModelEntry(model="base", parameters={"weight": 0.2}))})
    assert [m["model"] for m in yaml.safe_load(to_mergekit_yaml(listed))["models"]].count(str(family["base"])) == 1
    # other methods keep the base as base_model only
    assert str(family["base"]) not in [m["model"] for m in yaml.safe_load(to_mergekit_yaml(_recipe(family)))["models"]]


def test_mergekit_refuses_what_it_cannot_express():
    r = Recipe.model_validate(dict(method="passthrough", models=[{"model": "x"}],
                                   routing={"steps": [{"model": "x", "layer": 0, "scale": 0.5}], "frame": "x"}))
    with pytest.raises(ConfigError, match="scales the residual"):
        to_mergekit_yaml(r)
    with pytest.raises(ConfigError, match="tokenizer.tokens"):
        from_mergekit_yaml("merge_method: linear\nmodels: [{model: a}]\ntokenizer: {source: union, tokens: {x: {}}}\n")
    with pytest.raises(ConfigError, match="filter 'layers.3'"):  # a layer filter: no module kind or projection
        from_mergekit_yaml("merge_method: linear\nmodels:\n- model: a\n  parameters:\n"
                           "    weight: [{filter: layers.3, value: 1}, {value: 0.5}]\n")


def test_cli_merge_accepts_recipe_and_mergekit_yaml(family, tmp_path):
    r = _recipe(family, "task_arithmetic")
    (tmp_path / "r.yaml").write_text(r.to_yaml())
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    mk = to_mergekit_yaml(r)
    (tmp_path / "mk.yaml").write_text(mk)
    res = runner.invoke(app, ["merge", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 0, res.output
    cfg = json.loads((tmp_path / "o2" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 3
    res = runner.invoke(app, ["merge", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o3")])
    assert res.exit_code == 2 and "not found" in res.output
    assert not (tmp_path / "o3").exists()


def test_corrupt_source_file(family, tmp_path):
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "config.json").write_text((family["a"] / "config.json").read_text())
    save_file({"x": torch.zeros(2)}, bad / "model.safetensors")
    raw = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(raw[:10])
    r = _recipe(family)
    with pytest.raises(SourceError, match="model.safetensors"):
        materialize_state_dict(r.model_copy(update={"sources": {**r.sources, "b": str(bad)}}))


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for torch.compile")
@pytest.mark.parametrize("method", ["ties", "task_arithmetic", "linear"])
def test_fused_kernels_in_place_equal_to_disk_and_to_eager(family, tmp_path, method):
    """With the fused kernels on every tensor (threshold lowered), in place == to disk == eager, bit for bit,
    with and without the magnitude-order cache."""
    from evomerge.merge.kernels import fused_kernels, fused_status

    paths = {k: str(v) for k, v in family.items()}
    recipe = _recipe(family, method, **({"lambda": 0.9} if method != "linear" else {}))
    eager = materialize_state_dict(recipe, paths)
    with fused_kernels(True, min_numel=256):
        disk = materialize_state_dict(recipe, paths)
        assert fused_status()[0] is True, fused_status()
        for sorted_cache in (False, True):
            sources = ResidentSources.load(paths, "base", ["a", "b", "c"], sorted_magnitudes=sorted_cache)
            live = AutoModelForCausalLM.from_pretrained(family["base"])
            InPlaceMerger(sources, live).apply(recipe)
            for name, p in live.state_dict().items():
                assert torch.equal(p, disk[name]), (name, sorted_cache)
    assert any(t.numel() >= 256 for t in disk.values())
    for name, t in disk.items():
        assert torch.equal(t, eager[name]), name
