"""LoRA (PEFT) adapter folders as sources, checked against peft's own merge; pools reduced by source_selection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.errors import ConfigError, SourceError
from evomerge.io import ModelFolder
from evomerge.io.adapter import AdapterFolder
from evomerge.testing.family import build_family, write_perplexity_suite, write_run_config

peft = pytest.importorskip("peft")

LORA_A = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"],
          "modules_to_save": ["lm_head"]}
LORA_B = {"r": 4, "lora_alpha": 6, "target_modules": ["o_proj", "gate_proj", "down_proj"], "use_rslora": True,
          "rank_pattern": {"o_proj": 2}}


def _adapter(base: Path, out: Path, seed: int, **options) -> Path:
    """A genuine peft adapter on ``base`` with random (small) factors and, with modules_to_save, a changed copy."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base), LoraConfig(init_lora_weights=False, **options))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(0.2)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """base, m1, m2 (full fine-tunes), la / lb (LoRA adapters on base) and a perplexity suite."""
    root = tmp_path_factory.mktemp("lora")
    fam = build_family(root / "fam", 2)
    fam["la"] = _adapter(fam["base"], root / "la", 1, **LORA_A)
    fam["lb"] = _adapter(fam["base"], root / "lb", 2, **LORA_B)
    return root, fam, write_perplexity_suite(root / "suite")


def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base), adapter).merge_and_unload().state_dict()


@pytest.mark.parametrize("name", ["la", "lb"])
def test_adapter_equals_peft_merge_and_unload(pool, name):
    _, fam, _ = pool
    merged = _peft_merged(fam["base"], fam[name])
    base = ModelFolder.open(fam["base"])
    with ModelFolder.open(fam[name]) as folder:  # the adapter alone: its base_model_name_or_path is the base
        assert isinstance(folder, AdapterFolder) and folder.tensor_names == base.tensor_names
        changed = 0
        for n in folder.tensor_names:
            assert torch.equal(folder.get(n), merged[n]), n  # bit for bit
            d = folder.delta(n)
            if d is None:
                assert torch.equal(merged[n], base.get(n)), n
            else:
                changed += 1
                torch.testing.assert_close(base.get(n) + d, merged[n], rtol=0, atol=1e-6)
                start, stop = 1, 3
                torch.testing.assert_close(folder.delta_rows(n, start, stop), d[start:stop], rtol=1e-5, atol=1e-6)
        assert changed == (2 * 2 + 2 if name == "la" else 3 * 2)  # 2 layers x targets (+ embed, lm_head)


def test_fan_in_fan_out_adapter_on_gpt2_conv1d(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=16)).save_pretrained(
        tmp_path / "gpt2")
    model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False))
    model.save_pretrained(tmp_path / "ad")
    merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "ad"
                                       ).merge_and_unload().state_dict()
    folder = ModelFolder.open(tmp_path / "ad")
    assert len(folder.factors) == 4 and all(t for _, _, _, t in folder.factors.values())  # transposed
    for n in folder.tensor_names:
        assert torch.equal(folder.get(n), merged[n]), n


def test_resident_sources_mix_full_and_adapter_sources(pool):
    from evomerge.merge.sources import ResidentSources

    _, fam, _ = pool
    paths = {k: fam[k] for k in ("base", "m1", "la", "lb")}
    res = ResidentSources.load(paths, "base")
    base = ModelFolder.open(fam["base"])
    m1, la, lb = (ModelFolder.open(fam[k]) for k in ("m1", "la", "lb"))
    for n in res.names:
        assert torch.equal(res.deltas[n][0], m1.get(n) - base.get(n))
        for row, ad in ((1, la), (2, lb)):
            d = ad.delta(n)
            assert torch.equal(res.deltas[n][row], torch.zeros_like(res.base[n]) if d is None else d), n
    # the decision: adapters are held as dense task vectors, like full sources: (1 + 3) x the base in float32
    dense = sum(t.numel() for t in res.base.values()) * 4
    assert res.nbytes == 4 * dense
    assert la.factored_nbytes < dense / 2 and lb.factored_nbytes < dense / 10


def test_factored_adapters_merge_exactly_as_dense_ones(pool, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.config.load import load_run_config
    from evomerge.driver.plan import plan_run
    from evomerge.merge.materialize import InPlaceMerger
    from evomerge.merge.sources import ResidentSources, TaskVectors
    from evomerge.recipe import Recipe

    _, fam, suite = pool
    paths = {k: fam[k] for k in ("base", "m1", "la", "lb")}
    dense = ResidentSources.load(paths, "base", sorted_magnitudes=True)
    fact = ResidentSources.load(paths, "base", sorted_magnitudes=True, factored_adapters=True)
    assert isinstance(fact.deltas, TaskVectors) and sorted(fact.deltas.factors) == [1, 2]
    base_bytes = sum(t.numel() * t.element_size() for t in dense.base.values())
    orders = sum(t.numel() * t.element_size() for t in dense.ordered.values())
    assert dense.nbytes - orders == 4 * base_bytes and fact.nbytes - orders < 2.5 * base_bytes
    for n in dense.names:
        assert torch.equal(fact.deltas[n], dense.deltas[n]), n
        assert torch.equal(fact.group(n, torch.tensor([2, 0]))[1], dense.group(n, torch.tensor([2, 0]))[1]), n
    models = [{"model": m, "parameters": {"weight": w, "density": 0.5}} for m, w in (("m1", 0.6), ("la", 0.9),
                                                                                    ("lb", 1.2))]
    for method in ("ties", "task_arithmetic"):
        recipe = Recipe.model_validate({"method": method, "base_model": "base", "models": models if method == "ties"
                                        else [{**m, "parameters": {"weight": m["parameters"]["weight"]}} for m in models]})
        out = []
        for res in (dense, fact):
            live = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
            InPlaceMerger(res, live).apply(recipe)
            out.append(live.state_dict())
        for n, t in out[0].items():
            assert torch.equal(t, out[1][n]), (method, n)
    cfg = write_run_config(tmp_path / "r.yaml", paths, suite, name="f", evals=2,
                           extra={"resources": {"threads_per_worker": 1, "adapter_residency": "factored"}})
    plan = plan_run(load_run_config(cfg))
    tv = next(p for p in plan.parts if p.name == "task vectors")
    assert plan.setup.factored == 2 and "2 adapter(s) as factors" in tv.note
    assert tv.bytes < 2 * sum(plan.shapes.tensors[n][0] * max(1, np.prod(plan.shapes.tensors[n][1:])) * 4
                              for n in plan.shapes.tensors)


def _recipe_file(tmp_path: Path, fam: dict[str, Path], sources: dict[str, str]) -> Path:
    doc = {"method": "task_arithmetic", "base_model": "base", "sources": sources,
           "models": [{"model": "m1", "parameters": {"weight": 0.5}},
                      {"model": "la", "parameters": {"weight": 0.7}}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "r.yaml"


def test_cli_merge_with_base_plus_adapter_source(pool, tmp_path):
    from evomerge.cli import load_recipe_file
    from evomerge.mergekit_compat import to_mergekit_yaml

    root, fam, _ = pool
    rel = {k: str(Path("..") / Path(fam[k]).relative_to(root)) for k in fam}
    (root / "x").mkdir(exist_ok=True)
    recipe = _recipe_file(root / "x", fam, {"base": rel["base"], "m1": rel["m1"], "la": f"{rel['base']}+{rel['la']}"})
    res = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    out = load_file(tmp_path / "out" / "model.safetensors")
    merged_la = _peft_merged(fam["base"], fam["la"])
    base, m1 = load_file(fam["base"] / "model.safetensors"), load_file(fam["m1"] / "model.safetensors")
    for n, t in out.items():
        want = base[n] + 0.5 * (m1[n] - base[n]) + 0.7 * (merged_la[n] - base[n])
        torch.testing.assert_close(t, want, rtol=0, atol=1e-5)
    assert not torch.equal(out["lm_head.weight"], base["lm_head.weight"] + 0.5 * (m1["lm_head.weight"]
                                                                                     - base["lm_head.weight"]))
    # mergekit names a LoRA source as model+lora; an adapter named alone gets its base_model_name_or_path
    r = load_recipe_file(recipe)
    mk = yaml.safe_load(to_mergekit_yaml(r))
    assert {m["model"] for m in mk["models"]} == {str(fam["m1"].resolve()), f"{fam['base'].resolve()}+{fam['la'].resolve()}"}
    alone = r.model_copy(update={"sources": {**r.sources, "la": str(fam["la"])}})
    assert f"{fam['base']}+{fam['la']}" in {m["model"] for m in yaml.safe_load(to_mergekit_yaml(alone))["models"]}


def _edit(src: Path, dst: Path, config: dict | None = None, tensors=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def _rename(sd: dict[str, torch.Tensor], old: str, new: str) -> dict[str, torch.Tensor]:
    return {k.replace(old, new): v for k, v in sd.items()}


def _pickled(p: Path) -> None:
    (p / "adapter_model.safetensors").rename(p / "adapter_model.bin")


BAD = {
    "dora": (dict(config={"use_dora": True}), "use_dora"),
    "peft_type": (dict(config={"peft_type": "IA3"}), "peft_type 'IA3'"),
    "unknown_module": (dict(tensors=lambda sd: _rename(sd, "layers.0.self_attn.q_proj", "layers.0.self_attn.x_proj")),
                       "x_proj'"),
    "shape": (dict(tensors=lambda sd: {k: (torch.cat([v, v[:1]]) if "q_proj.lora_B" in k else v)
                                       for k, v in sd.items()}), "B·A has shape (33, 32)"),
    "rank": (dict(config={"r": 8}), "r is 8"),
    "other_base": ("m1", "another folder than the base given"),
    "pickle": ("pickle", "adapter_model.bin: adapter weights stored with pickle are refused"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_adapters_that_cannot_be_applied_exactly_are_refused(pool, tmp_path, case):
    _, fam, _ = pool
    how, message = BAD[case]
    if how == "m1":
        bad = _edit(fam["la"], tmp_path / case, config={"base_model_name_or_path": str(fam["m1"])})
    elif how == "pickle":
        bad = _edit(fam["la"], tmp_path / case)
        _pickled(bad)
    else:
        bad = _edit(fam["la"], tmp_path / case, **how)
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelFolder.open(f"{fam['base']}+{bad}")


def test_cli_refuses_a_dora_adapter_in_one_line(pool, tmp_path):
    _, fam, _ = pool
    bad = _edit(fam["la"], tmp_path / "dora", config={"use_dora": True})
    recipe = _recipe_file(tmp_path, fam, {"base": str(fam["base"]), "m1": str(fam["m1"]), "la": str(bad)})
    res = CliRunner().invoke(app, ["merge", str(recipe), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "use_dora" in res.output and "adapter_config.json" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    hub = _edit(fam["la"], tmp_path / "hub", config={"base_model_name_or_path": "org/some-model"})
    with pytest.raises(SourceError, match="name the base folder as BASE\\+ADAPTER"):
        ModelFolder.open(hub)


def test_search_run_with_full_and_adapter_sources(pool, tmp_path):
    from evomerge.driver.run import start_run
    from evomerge.export import export_run
    from evomerge.results import RunResults

    _, fam, suite = pool
    sources = {"base": fam["base"], "m1": fam["m1"], "la": Path(f"{fam['base']}+{fam['la']}"), "lb": fam["lb"]}
    cfg = write_run_config(tmp_path / "r.yaml", sources, suite, name="lora", evals=4,
                           template="builtin:task-arithmetic-global", extra={"fidelity": {"rescore_test": False}})
    run_dir = start_run(cfg)
    r = RunResults(run_dir)
    searched = [x for x in r.calib if x.candidate_id >= 0]
    assert len(searched) == 4 and all(x.ok for x in searched)
    # the adapter-only baselines differ from the base: the task vectors were applied
    base_scores = {x.meta["baseline"]: x.result.task_means() for x in r.calib if x.candidate_id < 0}
    assert base_scores["la"] != base_scores["base"] and base_scores["lb"] != base_scores["base"]
    out = export_run(run_dir, pick="best", overwrite=True)[0]
    assert (out / "model.safetensors").is_file()
    mk = yaml.safe_load((out / "mergekit.yaml").read_text())
    assert f"{fam['base']}+{fam['la']}" in {m["model"] for m in mk["models"]}


def test_reference_adapter_is_refused(pool, tmp_path):
    from evomerge.config.load import load_run_config
    from evomerge.driver.run import preflight

    _, fam, suite = pool
    cfg = write_run_config(tmp_path / "r.yaml", {"base": fam["la"], "m1": fam["m1"]}, suite, name="x", evals=2,
                           template="builtin:task-arithmetic-global")
    with pytest.raises(ConfigError, match="sources.base: the reference model is a LoRA adapter"):
        preflight(load_run_config(cfg))


# -- pools -------------------------------------------------------------------------------------------------


def test_frank_wolfe_keeps_one_source_per_cluster():
    from evomerge.merge.selection import frank_wolfe

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(3, 200))
    tv = np.concatenate([c + 0.05 * rng.normal(size=(k, 200)) for c, k in zip(centers, (4, 3, 2), strict=True)])
    cluster = [0] * 4 + [1] * 3 + [2] * 2
    picks, lam, objective = frank_wolfe(tv @ tv.T, keep=3, iterations=100)
    assert sorted(cluster[i] for i in picks) == [0, 1, 2]
    assert abs(lam.sum() - 1) < 1e-9 and (lam >= -1e-12).all()
    # the kept sources' hull reconstructs the pool's mean task vector far better than any single source
    mean = tv.mean(axis=0)
    single = min(float(np.sum((t - mean) ** 2)) for t in tv) / float(mean @ mean)
    assert objective < 0.2 * single


def test_pool_selection_streams_and_bounds_what_the_run_holds(pool, tmp_path):
    from evomerge.config.load import load_run_config
    from evomerge.driver.plan import plan_run
    from evomerge.driver.run import SELECTION_FILE, create_run_dir, preflight
    from evomerge.merge.selection import gram_matrix

    root, fam, suite = pool
    shutil.copytree(fam["m1"], tmp_path / "m1_twin")
    paths = {"base": fam["base"], "m1": fam["m1"], "m1_twin": tmp_path / "m1_twin", "m2": fam["m2"],
             "la": fam["la"], "lb": fam["lb"]}
    order, small = gram_matrix(paths, "base", block_entries=1024)
    _, large = gram_matrix(paths, "base", block_entries=2**24)
    np.testing.assert_allclose(small, large, rtol=1e-5)
    # against the dense task vectors
    base = ModelFolder.open(fam["base"])
    flat = [torch.cat([(ModelFolder.open(paths[m]).get(n) - base.get(n)).double().reshape(-1)
                       for n in base.tensor_names]) for m in order]
    dense = torch.stack(flat)
    np.testing.assert_allclose(small, (dense @ dense.T).numpy(), rtol=1e-5)
    cfg = write_run_config(tmp_path / "r.yaml", paths, suite, name="pool", evals=2,
                           template="builtin:task-arithmetic-global",
                           extra={"source_selection": {"keep": 3, "block_entries": 1024}})
    run_cfg = load_run_config(cfg)
    plan = plan_run(run_cfg)
    assert plan.setup.n_deltas == 3 and any("5 sources in the pool, 3 kept" in n for n in plan.notes)
    assert any("LoRA adapters" in n for n in plan.notes)
    prep = preflight(run_cfg)
    kept = set(prep.cfg.sources) - {"base"}
    assert len(kept) == 3 and len(kept & {"m1", "m1_twin"}) == 1  # a twin adds nothing to what is kept
    assert set(prep.spec.sources) == kept | {"base"}
    record = json.loads((create_run_dir(prep) / SELECTION_FILE).read_text())  # the choice is kept in the run
    assert set(record["pool"]) == set(paths) - {"base"} and set(record["kept"]) == kept
    assert sum(record["weights"].values()) == pytest.approx(1.0) and len(record["cosine"]) == 5
    with pytest.raises(ConfigError, match="source_selection: set base_model"):
        load_run_config(write_run_config(tmp_path / "b.yaml", paths, suite, name="b",
                                         extra={"base_model": None, "source_selection": {"keep": 2}}))
