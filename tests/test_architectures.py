"""Merging, search spaces, routing and export over real architecture layouts.

Each family is a tiny random base plus two experts (the base plus small random perturbations), built from
transformers' own config classes with the family's real tensor names and quirks: Llama (untied, and tied
like SmolLM2), Mistral, Qwen2 (qkv biases), Qwen3 (q/k norms), Gemma 2 and Gemma 3 text (post-norms,
soft-capping, tied embeddings, sliding and global layers), Phi-3 (fused ``qkv_proj`` / ``gate_up_proj``),
Mixtral and Qwen3-MoE (experts and a router per layer, stored per expert, fused when transformers loads
them). Nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ConfigError, MaterializeError, SourceMismatchError
from evomerge.io import ModelFolder, tensor_role
from evomerge.io.arch import TensorRole
from evomerge.merge.live import live_targets
from evomerge.merge.materialize import InPlaceMerger, materialize_state_dict, materialize_to_disk
from evomerge.merge.routing import live_routed_model, routed_config_patch
from evomerge.merge.sources import ResidentSources
from evomerge.merge.streaming import StreamingMerger
from evomerge.mergekit_compat import from_mergekit_yaml, to_mergekit_yaml
from evomerge.recipe import MERGED, Recipe, RouteStep, Routing
from evomerge.spaces import SpaceModels, build_space, load_template, parse_template
from evomerge.testing.tokenizer import build_tokenizer

TOK = build_tokenizer()
LAYERS = 3
_COMMON = dict(
    vocab_size=len(TOK), hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, pad_token_id=TOK.pad_token_id,
    bos_token_id=TOK.bos_token_id, eos_token_id=TOK.eos_token_id,
)
_GEMMA = dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16, rms_norm_eps=1e-6)
_MOE = dict(num_experts_per_tok=2, tie_word_embeddings=False, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=False),
    "llama_tied": lambda: LlamaConfig(**_COMMON, tie_word_embeddings=True),  # SmolLM2-style
    "mistral": lambda: MistralConfig(**_COMMON, sliding_window=4, tie_word_embeddings=False),
    "qwen2": lambda: Qwen2Config(**_COMMON, tie_word_embeddings=False),
    "qwen3": lambda: Qwen3Config(**_COMMON, head_dim=16, tie_word_embeddings=False),
    "gemma2": lambda: Gemma2Config(**_COMMON, **_GEMMA, attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3": lambda: Gemma3TextConfig(
        **_COMMON, **_GEMMA, final_logit_softcapping=30.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "phi3": lambda: Phi3Config(**_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-6),
    "mixtral": lambda: MixtralConfig(**_COMMON, **_MOE, num_local_experts=4),
    "qwen3_moe": lambda: Qwen3MoeConfig(
        **_COMMON, **_MOE, head_dim=16, num_experts=4, moe_intermediate_size=32, decoder_sparse_step=1
    ),
    # a dense layer among the MoE ones (Qwen's mlp_only_layers): routing must keep each position's structure
    "qwen3_moe_dense": lambda: Qwen3MoeConfig(
        **_COMMON, **_MOE, head_dim=16, num_experts=4, moe_intermediate_size=32, mlp_only_layers=[1]
    ),
}
NAMES = sorted(set(FAMILIES) - {"qwen3_moe_dense"})
TIED = ["gemma2", "gemma3", "llama_tied"]
MOE = ["mixtral", "qwen3_moe"]
#: A few families for the slower checks (hybrid routing): tied, sliding/global, MoE.
SOME = ["gemma3", "llama_tied", "qwen3_moe"]


def _build(root: Path, family: str) -> dict[str, str]:
    """Base + two experts of ``family`` as safetensors folders with the char-level tokenizer."""
    cfg = FAMILIES[family]()
    g = torch.Generator().manual_seed(sum(map(ord, family)))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    paths = {}
    for name in ("base", "a", "b"):
        with torch.no_grad():
            for n, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=g) * 0.01 if name != "base" else 0.0
                p.copy_(base[n] + noise)
        paths[name] = str(root / family / name)
        model.save_pretrained(paths[name])
        TOK.save_pretrained(paths[name])
    return paths


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``zoo(family)``: the family's folders, built on first use; ``zoo.resident(family)``: its sources."""
    root = tmp_path_factory.mktemp("arch")

    class Zoo:
        paths: dict[str, dict[str, str]] = {}
        sources: dict[str, ResidentSources] = {}

        def __call__(self, family: str) -> dict[str, str]:
            if family not in self.paths:
                self.paths[family] = _build(root, family)
            return self.paths[family]

        def resident(self, family: str) -> ResidentSources:
            if family not in self.sources:
                self.sources[family] = ResidentSources.load(self(family), "base", ["a", "b"])
            return self.sources[family]

    return Zoo()


def _load(path: str | Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path).eval()


IDS = torch.tensor([[5, 17, 9, 30, 12, 41, 7, 22, 8]])  # longer than the sliding windows (4)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _generates(model: torch.nn.Module) -> None:
    out = model.generate(
        IDS[:, :5], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=TOK.pad_token_id
    )
    assert out.shape == (1, 8)


def _expected_role(name: str) -> tuple[int | None, str]:
    """The role of a tensor of these layouts, by plain reading of the names (independent of evomerge.io.arch)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    layer = int(m.group(1)) if m else None
    if "norm" in name:  # input/post/pre-feedforward layernorms, q_norm/k_norm, the final norm
        return layer, "norm"
    if "embed_tokens" in name:
        return layer, "embed"
    if name.startswith("lm_head"):
        return layer, "lm_head"
    if ".self_attn." in name:
        return layer, "attn"
    if ".mlp." in name or ".block_sparse_moe." in name:
        return layer, "mlp"
    return layer, "other"


def _recipe(paths: dict[str, str], method: str) -> Recipe:
    if method == "slerp":
        models, params = [{"model": "a"}], {"t": 0.35}
    else:
        models = [{"model": "a", "parameters": {"weight": 0.7}}, {"model": "b", "parameters": {"weight": 0.45}}]
        params = {}
        if method == "ties":
            for m, d in zip(models, (0.5, 0.8), strict=True):
                m["parameters"]["density"] = d
    return Recipe.model_validate(dict(method=method, base_model="base", models=models, parameters=params,
                                      seed=1, sources=paths))


def _reference(method: str, sd: dict[str, dict[str, torch.Tensor]], name: str) -> torch.Tensor:
    """The merged tensor computed here from the state dicts (task arithmetic, slerp over the whole tensor)."""
    b, a = sd["base"][name].double(), sd["a"][name].double()
    if method == "task_arithmetic":
        return b + 0.7 * (a - b) + 0.45 * (sd["b"][name].double() - b)
    v0, v1 = b.flatten(), a.flatten()
    n0, n1 = (n if n > 1e-8 else torch.ones(()) for n in (v0.norm(), v1.norm()))  # a zero vector stays as is
    cos = (v0 @ v1 / (n0 * n1)).clamp(-1, 1)
    if cos.abs() > 0.9995:  # (nearly) colinear: linear interpolation, as mergekit does
        return (1 - 0.35) * b + 0.35 * a
    omega = torch.acos(cos)
    return (torch.sin(0.65 * omega) * b + torch.sin(0.35 * omega) * a) / torch.sin(omega)


# --------------------------------------------------------------------------- roles
#: A checkpoint tensor each family must have: the quirk it is in this test for.
QUIRKS = {
    "qwen2": "self_attn.q_proj.bias", "qwen3": "self_attn.q_norm.weight", "phi3": "self_attn.qkv_proj.weight",
    "gemma2": "post_feedforward_layernorm.weight", "gemma3": "self_attn.k_norm.weight",
    "mixtral": "block_sparse_moe.experts.3.w2.weight", "qwen3_moe": "mlp.experts.3.gate_proj.weight",
}


@pytest.mark.parametrize("family", NAMES)
def test_tensor_roles_follow_each_family_layout(zoo, family):
    folder = ModelFolder.open(zoo(family)["base"])
    roles = {n: tensor_role(n, folder.model_type) for n in folder.tensor_names}
    for name, role in roles.items():
        assert (role.layer, role.kind) == _expected_role(name), name
    for layer in range(LAYERS):
        assert {r.kind for r in roles.values() if r.layer == layer} == {"attn", "mlp", "norm"}
    outside = {r.kind for r in roles.values() if r.layer is None}
    assert outside == ({"embed", "norm"} if family in TIED else {"embed", "norm", "lm_head"})
    assert folder.tied_embeddings == (family in TIED)
    if family in QUIRKS:
        assert any(n.endswith(QUIRKS[family]) for n in roles), QUIRKS[family]
    if family in MOE:  # every expert's three projections and the router, in every layer
        experts = [n for n in roles if re.search(r"\.experts\.\d+\.", n)]
        assert len(experts) == LAYERS * 4 * 3
        assert sum(n.endswith(".gate.weight") for n in roles) == LAYERS


# --------------------------------------------------------------------------- merges
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "slerp"])
@pytest.mark.parametrize("family", NAMES)
def test_merge_to_disk_equals_in_place_and_reference(zoo, family, method, tmp_path):
    paths = zoo(family)
    recipe = _recipe(paths, method)
    out = materialize_to_disk(recipe, tmp_path / "out")
    written = load_file(out / "model.safetensors")
    base_sd = load_file(Path(paths["base"]) / "model.safetensors")
    assert set(written) == set(base_sd)  # the checkpoint's own names (per-expert tensors), no extra head
    if method != "ties":
        sd = {m: load_file(Path(p) / "model.safetensors") for m, p in paths.items()}
        for name, tensor in written.items():
            torch.testing.assert_close(tensor.double(), _reference(method, sd, name), rtol=1e-5, atol=1e-6)
    disk = _load(out)
    live = _load(paths["base"])
    merger = InPlaceMerger(zoo.resident(family), live)
    merger.apply(recipe)
    by_name = merger.checkpoint_tensors()  # what a scorer loading checkpoint names gets: the written tensors
    assert set(by_name) == set(written) and all(torch.equal(by_name[n], t) for n, t in written.items())
    # what the vllm scorer's engine gets instead, computed tensor by tensor without a live model: the same bits
    streamed = dict(StreamingMerger(zoo.resident(family), tied=family in TIED).stream(recipe))
    assert list(streamed) == list(by_name) and all(torch.equal(streamed[n], by_name[n]) for n in streamed)
    live_sd, disk_sd = live.state_dict(), disk.state_dict()
    assert list(live_sd) == list(disk_sd)
    for name, tensor in disk_sd.items():
        assert torch.equal(tensor, live_sd[name]), name
    assert torch.equal(_logits(disk), _logits(live))
    assert not torch.equal(_logits(disk), _logits(_load(paths["base"])))  # the merge changed the model
    _generates(disk)


def test_cli_merge_writes_a_loadable_moe_model(zoo, tmp_path):
    paths = zoo("mixtral")
    recipe = _recipe(paths, "ties")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    model = _load(tmp_path / "out")
    assert torch.equal(_logits(model), _logits(_load(materialize_to_disk(recipe, tmp_path / "again"))))
    _generates(model)


# --------------------------------------------------------------------------- search spaces
def _gene_values(space, genome: np.ndarray) -> dict[str, float]:
    return {g.name: g.low + x * (g.high - g.low) for g, x in zip(space.genes(), genome, strict=True)}


@pytest.mark.parametrize("family", NAMES)
def test_per_layer_space_genes_reach_their_tensors(zoo, family):
    paths = zoo(family)
    folders = {m: ModelFolder.open(p) for m, p in paths.items()}
    models = SpaceModels.from_folders(folders, base="base")
    assert ("lm_head" in models.module_kinds) == (family not in TIED)
    space = build_space(load_template("builtin:task-arithmetic-per-layer"), models)
    assert space.dim == 2 * 3 * LAYERS  # models x (attn, mlp, rest) x layers
    genome = np.random.default_rng(sum(map(ord, family))).uniform(0, 1, space.dim)
    values = _gene_values(space, genome)
    recipe = space.decode(genome).model_copy(update={"sources": paths})
    merged = materialize_state_dict(recipe)
    sd = {m: f.load_all() for m, f in folders.items()}
    for name, tensor in merged.items():
        layer, kind = _expected_role(name)
        slot = kind if kind in ("attn", "mlp") else "default"
        where = f"L{layer if layer is not None else 0}"  # tensors outside the layers take layer 0's value
        want = sd["base"][name].double()
        for m in ("a", "b"):
            want = want + values[f"weight[{m}].{slot}.{where}"] * (sd[m][name].double() - sd["base"][name].double())
        torch.testing.assert_close(tensor.double(), want, rtol=1e-5, atol=1e-6, msg=name)
    # the same merge as mergekit YAML (norms such as q_norm and MoE experts need their own filters)
    tensors = [(n, TensorRole(*_expected_role(n))) for n in folders["base"].tensor_names]
    text = to_mergekit_yaml(recipe, tensors=tensors, num_layers=LAYERS, model_type=folders["base"].model_type)
    again = materialize_state_dict(from_mergekit_yaml(text).model_copy(update={"sources": paths}))
    assert all(torch.equal(again[n], t) for n, t in merged.items())
    for template, dim in (("builtin:ties-per-layer", 2 * 2 * LAYERS), ("builtin:slerp-per-layer", LAYERS)):
        tpl = load_template(template)
        if "slerp" in template:
            tpl = tpl.model_copy(update={"sources": ["a"]})
        other = build_space(tpl, models)
        assert other.dim == dim
        live = _load(paths["base"])
        InPlaceMerger(zoo.resident(family), live).apply(other.decode(np.full(dim, 0.6)))
        assert torch.isfinite(_logits(live)).all()


# --------------------------------------------------------------------------- routing
def _route_genome(space) -> np.ndarray:
    """A route that crosses models (a's layer 0, b's layers 1 and 2, a's layer 1) with scales != 1."""
    genome = space.x0
    slots = space.block.slots
    on = {(0, 0), (1, 1), (1, 2)}
    for t, (j, layer) in enumerate(slots):
        genome[t] = 0.8 if (j, layer) in on and t < 2 * LAYERS else 0.2
    genome[2 * LAYERS + 1] = 0.8  # second repeat: a's layer 1
    genome[len(slots):] = [0.8, 0.25]  # a -> b and b -> a scales
    return genome


@pytest.mark.parametrize("family", [*NAMES, "qwen3_moe_dense"])
def test_routed_export_equals_the_live_routed_model(zoo, family, tmp_path):
    paths = zoo(family)
    folders = {m: ModelFolder.open(p) for m, p in paths.items()}
    space = build_space(load_template("builtin:dfs-routing"), SpaceModels.from_folders(folders, base="base"))
    recipe = space.decode(_route_genome(space)).model_copy(update={"sources": paths})
    steps = [(s.model, s.layer) for s in recipe.routing.steps]
    assert steps == [("a", 0), ("b", 1), ("b", 2), ("a", 1)]
    assert {round(s.scale, 6) for s in recipe.routing.steps} - {1.0}  # some scale is not 1
    live = live_routed_model(recipe, _load(paths["base"]), zoo.resident(family))
    out = materialize_to_disk(recipe, tmp_path / "routed")
    exported = _load(out)
    assert exported.config.num_hidden_layers == 4
    source_types = folders["base"].config.get("layer_types")
    if source_types is not None:  # sliding / global layers keep their type at their new position
        assert exported.config.layer_types == [source_types[layer] for _, layer in steps]
    if family == "qwen3_moe_dense":  # the dense layer 1, routed to positions 1 and 3, stays dense there
        assert exported.config.mlp_only_layers == [1, 3]
    want = _logits(live)
    torch.testing.assert_close(_logits(exported), want, rtol=0, atol=2e-4 * float(want.abs().max()))
    # the routed source layers are the sources', not the live model's (which holds the base)
    assert (want - _logits(_load(paths["base"]))).abs().max() > 1e-3
    _generates(exported)
    if family in TIED:
        assert "lm_head.weight" not in load_file(out / "model.safetensors")
        assert exported.lm_head.weight.data_ptr() == exported.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("family", SOME)
def test_hybrid_route_over_the_merge_exports_like_the_worker_model(zoo, family, tmp_path):
    paths = zoo(family)
    folders = {m: ModelFolder.open(p) for m, p in paths.items()}
    space = build_space(load_template("builtin:hybrid-task-arithmetic"), SpaceModels.from_folders(folders, base="base"))
    genome = space.x0
    n_params = 2 * 3 * LAYERS
    genome[:n_params] = np.linspace(0.2, 0.8, n_params)
    genome[n_params + LAYERS + 1] = 0.9  # add a's layer 1 after the merge's layers
    genome[n_params + 3 * LAYERS:] = 0.7
    recipe = space.decode(genome).model_copy(update={"sources": paths})
    assert {s.model for s in recipe.routing.steps} == {MERGED, "a"} and recipe.routing.frame == MERGED
    live = _load(paths["base"])
    merger = InPlaceMerger(zoo.resident(family), live)
    merger.apply(recipe)  # what a worker does: merge in place, then route over the live merge
    routed = live_routed_model(recipe, live, zoo.resident(family))
    exported = _load(materialize_to_disk(recipe, tmp_path / "hybrid"))
    want = _logits(routed)
    torch.testing.assert_close(_logits(exported), want, rtol=0, atol=2e-4 * float(want.abs().max()))


def test_routed_export_refuses_to_move_a_layer_to_a_position_of_another_structure():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.extra.weight",
             "model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    swap = Routing(steps=(RouteStep(model="a", layer=1), RouteStep(model="a", layer=0)), frame="a")
    with pytest.raises(MaterializeError, match=r"routing\.steps\[0\]: layer 1 goes to position 0.*extra"):
        routed_config_patch(swap, {"model_type": "llama"}, names)
    same = Routing(steps=(RouteStep(model="a", layer=0), RouteStep(model="b", layer=1)), frame="a")
    assert routed_config_patch(same, {"model_type": "llama"}, names) == {"num_hidden_layers": 2}


def test_routing_space_refuses_scales_it_cannot_export():
    models = SpaceModels(("base", "a", "b"), 3, base="base", model_type="gpt2")
    with pytest.raises(ConfigError, match=r"scale\.mode.*'gpt2'.*scale\.mode: none"):
        build_space(load_template("builtin:dfs-routing"), models)
    space = build_space(parse_template({"kind": "routing", "scale": {"mode": "none"}}), models)
    assert all(s.scale == 1.0 for s in space.decode(np.full(space.dim, 0.9)).routing.steps)


# --------------------------------------------------------------------------- MoE and tied layouts
def test_live_targets_are_views_of_the_fused_experts(zoo):
    live = _load(zoo("qwen3_moe")["base"])
    names = ModelFolder.open(zoo("qwen3_moe")["base"]).tensor_names
    targets = live_targets(live, names)
    fused = live.model.layers[1].mlp.experts.gate_up_proj
    view = targets["model.layers.1.mlp.experts.2.up_proj.weight"]
    with torch.no_grad():
        view.fill_(3.0)
    rows = fused.shape[1] // 2
    assert bool((fused[2, rows:] == 3.0).all()) and not bool((fused[2, :rows] == 3.0).any())
    partial = [n for n in names if ".experts.3." not in n]
    with pytest.raises(MaterializeError, match=r"experts\.(gate_up|down)_proj .*fill"):
        live_targets(live, partial)
    with pytest.raises(MaterializeError, match="no parameter for tensor"):
        live_targets(live, [*names, "model.layers.0.mlp.experts.9.up_proj.weight"])


def _store_head(src: str, dst: Path, head: torch.Tensor | None = None) -> str:
    """A copy of tied model folder ``src`` that also stores its output projection (a copy of the embedding)."""
    import shutil

    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone() if head is None else head
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)


def test_stored_tied_head_is_merged_once_and_exported_tied(zoo, tmp_path):
    paths = {m: _store_head(p, tmp_path / m) for m, p in zoo("llama_tied").items()}
    # the embedding and the head get different weights, and DARE draws per tensor name
    recipe = Recipe.model_validate(dict(
        method="dare_ties", base_model="base", seed=2, sources=paths,
        models=[{"model": m, "parameters": {"weight": {"embed": 0.3, "lm_head": 0.9, "default": 0.6},
                                            "density": 0.6}} for m in ("a", "b")],
    ))
    out = materialize_to_disk(recipe, tmp_path / "out")
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    disk = _load(out)
    assert disk.lm_head.weight.data_ptr() == disk.model.embed_tokens.weight.data_ptr()
    live = _load(paths["base"])
    InPlaceMerger(ResidentSources.load(paths, "base", ["a", "b"]), live).apply(recipe)
    assert torch.equal(_logits(disk), _logits(live))
    folders = {m: ModelFolder.open(p) for m, p in paths.items()}
    assert "lm_head" not in SpaceModels.from_folders(folders, base="base").module_kinds


def test_tied_head_that_differs_from_the_embedding_is_refused(zoo, tmp_path):
    src = zoo("llama_tied")
    emb = load_file(Path(src["a"]) / "model.safetensors")["model.embed_tokens.weight"]
    paths = {m: _store_head(src[m], tmp_path / m, emb + 0.1 if m == "a" else None) for m in src}
    recipe = _recipe(paths, "task_arithmetic")
    with pytest.raises(SourceMismatchError, match=r"lm_head\.weight differs from model\.embed_tokens\.weight in 'a'"):
        materialize_to_disk(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(MaterializeError, match="tie_word_embeddings"):
        InPlaceMerger(ResidentSources.load(paths, "base", ["a", "b"]), _load(paths["base"]))



def test_worker_hands_weight_loading_scorers_the_checkpoint_names(zoo, monkeypatch):
    """A scorer that loads weights by name (vLLM) gets the checkpoint's per-expert tensors, not fused ones."""
    import evomerge.scoring.base as scoring
    from evomerge.driver.pool import Job
    from evomerge.driver.worker import Worker, WorkerSpec
    from evomerge.errors import ScoreError

    seen: list[dict[str, torch.Tensor]] = []
    bound: list[str] = []

    class Recorder:
        def bind(self, model_dir):  # a state-dict scorer starts its engine on the reference folder
            bound.append(str(model_dir))

        def score(self, model, *args, **kwargs):
            seen.append(dict(model))  # the merged tensors as they are streamed, (name, tensor) pairs
            raise ScoreError("recorded")

    monkeypatch.setattr(scoring, "make_scorer", lambda name, **options: Recorder())
    paths = zoo("mixtral")
    worker = Worker(WorkerSpec(sources=paths, reference="base", order=("a", "b"), suite="builtin:zoo",
                               scorer="vllm", device="cpu", dtype="float32", threads=1))
    recipe = _recipe(paths, "ties").model_copy(update={"sources": {}})
    result = worker.evaluate(Job(key=0, candidate_id=0, recipe=recipe))
    assert result.status == "failed" and "recorded" in (result.error or "")
    written = materialize_state_dict(_recipe(paths, "ties"))
    assert set(seen[0]) == set(written)
    assert all(torch.equal(seen[0][n], t) for n, t in written.items())
    assert bound == [str(paths["base"])]
