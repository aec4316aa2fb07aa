"""The real zoo (SmolLM2-135M from its GGUF file): data, BPE encoding, the reduced build, and a search over it.

The reduced ``real-test`` zoo (2 layers, a few steps per model) checks correctness on the real tokenizer and
architecture, not skill; the skills of the full zoo are measured by ``evomerge zoo build DIR --size real``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from evomerge.testing import real_skills as rs
from evomerge.testing.real import RealManifest, build_real_zoo, encode_bpe_pairs
from evomerge.testing.skills import sample_training
from evomerge.testing.train import IGNORE
from evomerge.testing.zoo import _derive_seed

SHIPPED = Path(__file__).resolve().parents[1] / "fitness" / "real"
_FACTORS = {("grams", "kilograms"): 1000, ("centimeters", "meters"): 100, ("meters", "kilometers"): 1000,
            ("milliliters", "liters"): 1000, ("millimeters", "centimeters"): 10, ("cents", "dollars"): 100}


def _solve(skill: str, prompt: str) -> str:
    """Answer a prompt independently of the samplers."""
    if skill == "add":
        a, b = re.fullmatch(r"What is (\d+) \+ (\d+)\? Answer:", prompt).groups()  # type: ignore[union-attr]
        return str(int(a) + int(b))
    if skill == "order":
        words = re.fullmatch(r"Reverse the order of these words: ([a-z ]+)\. Answer:", prompt).group(1)  # type: ignore[union-attr]
        return " ".join(words.split()[::-1])
    dst, n, src = re.fullmatch(r"How many (\w+) are in (\d+) (\w+)\? Answer:", prompt).groups()  # type: ignore[union-attr]
    return str(int(n) * _FACTORS[(dst, src)])


# --- data (no model needed) ------------------------------------------------------------------


def test_shipped_real_data_equals_regenerated_and_is_correct(tmp_path: Path) -> None:
    written = rs.write_eval_data(tmp_path)
    assert len(written) == len(rs.SKILLS) * len(rs.SPLIT_SIZES)
    for path in written:
        assert (SHIPPED / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs from its regeneration"
    for skill in rs.SKILLS:
        splits = rs.generate_eval_splits(skill)
        prompts = {split: {e.prompt for e in exs} for split, exs in splits.items()}
        assert not prompts["calibration"] & prompts["test"]
        for split, exs in splits.items():
            assert len(exs) == rs.SPLIT_SIZES[split] == len(prompts[split])
            for e in exs:
                assert e.answer == _solve(skill, e.prompt), e
                assert e.prompt.endswith("Answer:") and e.answer == e.answer.strip()


def test_real_training_draws_skip_held_out_prompts() -> None:
    import random

    held = rs.held_out_prompts()
    assert len(held) == len(rs.SKILLS) * sum(rs.SPLIT_SIZES.values())
    for skill in rs.SKILLS:
        pairs = sample_training(rs.get_skill(skill).sample, 300, random.Random(1), held)
        assert not {p for p, _ in pairs} & held
        assert all(a == _solve(skill, p) for p, a in pairs)


def test_builtin_real_suite_loads() -> None:
    from evomerge.scoring import load_suite

    suite = load_suite("builtin:real")
    assert suite.names == rs.SKILLS
    for task in suite.tasks:
        assert task.spec.stop == ("\n",)
        assert len(task.examples("calibration")) == rs.SPLIT_SIZES["calibration"]


# --- the reduced zoo ------------------------------------------------------------------------


def test_encode_bpe_pairs_labels_the_answer_after_a_space(real_zoo_test: RealManifest) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_zoo_test.base)
    pairs = [("What is 23 + 45? Answer:", "68"), ("Reverse the order of these words: lamp red. Answer:", "red lamp")]
    ids, labels = encode_bpe_pairs(pairs, tok)
    for row, lab, (prompt, answer) in zip(ids.tolist(), labels.tolist(), pairs, strict=True):
        n_prompt = len(tok(prompt)["input_ids"])
        assert all(x == IGNORE for x in lab[:n_prompt])
        target = [t for t in lab if t != IGNORE]
        assert tok.decode(target) == " " + answer + "\n"
        assert row[: n_prompt + len(target)][n_prompt:] == target


def test_real_test_zoo_layout_reference_table_and_tied_embeddings(real_zoo_test: RealManifest) -> None:
    from transformers import AutoConfig, AutoTokenizer

    zoo = real_zoo_test
    assert RealManifest.load(zoo.root) == zoo
    assert set(zoo.models) == {"base", "multitask", *(f"expert_{s}" for s in rs.SKILLS)}
    for name in zoo.models:
        cfg = AutoConfig.from_pretrained(zoo.path(name))
        assert cfg.model_type == "llama" and cfg.num_hidden_layers == 2 and cfg.tie_word_embeddings
        assert cfg.vocab_size == 49152 and cfg.num_key_value_heads < cfg.num_attention_heads
        with safe_open(zoo.path(name) / "model.safetensors", "pt") as fh:
            keys = set(fh.keys())
        assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
        assert zoo.reference[name].keys() == {"calibration", "test"}
        for split in ("calibration", "test"):
            assert set(zoo.reference[name][split]) == set(rs.SKILLS)
        assert zoo.exact_match[name] == zoo.reference[name]["test"]
    tok = AutoTokenizer.from_pretrained(zoo.base)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.convert_ids_to_tokens(tok(" 68")["input_ids"]) == ["Ġ", "6", "8"]
    for skill in rs.SKILLS:
        name = f"{skill}.test.jsonl"
        assert (zoo.data_dir / name).read_bytes() == (SHIPPED / name).read_bytes()
    assert json.loads((zoo.root / "zoo.json").read_text())["base_source"]["file"].endswith(".gguf")


def test_real_build_is_deterministic_cached_and_seeded(real_zoo_test: RealManifest, real_base_loader, tmp_path: Path) -> None:
    fresh = build_real_zoo(tmp_path / "a", "real-test", 0, load_base=real_base_loader)
    for name in fresh.models:
        blob = (fresh.path(name) / "model.safetensors").read_bytes()
        assert blob == (real_zoo_test.path(name) / "model.safetensors").read_bytes(), name
    assert fresh.reference == real_zoo_test.reference

    def refuse(num_layers):  # a cached zoo must not read the base again
        raise AssertionError("the cached zoo was rebuilt")

    stamp = (fresh.root / "zoo.json").stat().st_mtime_ns
    assert build_real_zoo(tmp_path / "a", "real-test", 0, load_base=refuse) == fresh
    assert (fresh.root / "zoo.json").stat().st_mtime_ns == stamp

    # another seed draws other training streams (the whole build with seed 1 costs half a minute more)
    assert _derive_seed(0, "expert_add") != _derive_seed(1, "expert_add")


# --- a search over the reduced zoo -----------------------------------------------------------


def _small_suite(folder: Path, n: int) -> Path:
    """``builtin:real`` with its first ``n`` examples per split."""
    suite = yaml.safe_load((SHIPPED.parent / "real.yaml").read_text())
    folder.mkdir(parents=True)
    for task in suite["tasks"]:
        for split, rel in task["data"].items():
            lines = (SHIPPED.parent / rel).read_text().splitlines(keepends=True)[:n]
            (folder / Path(rel).name).write_text("".join(lines))
            task["data"][split] = Path(rel).name
    path = folder / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def test_search_over_the_real_test_zoo_exports_a_loadable_model(real_zoo_test: RealManifest, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.driver.run import start_run
    from evomerge.export import export_run
    from evomerge.merge.kernels import fused_kernels
    from evomerge.merge.materialize import materialize_state_dict
    from evomerge.results import RunResults
    from evomerge.scoring import load_suite, make_scorer

    zoo = real_zoo_test
    sources = {"base": str(zoo.base), **{s: str(zoo.expert(s)) for s in zoo.skills}}
    suite_path = _small_suite(tmp_path / "suite", 3)
    cfg = {
        "name": "real", "seed": 0, "output_dir": str(tmp_path / "runs"), "sources": sources, "base_model": "base",
        "space": {"template": "builtin:task-arithmetic-global", "warm_start": {"weights": [0.5]}},
        "fitness": {"suite": str(suite_path), "scorer": "hf", "batch_size": 12},
        "optimizer": {"name": "cma_es", "options": {"popsize": 2, "sigma0": 0.1, "x0_first": True}},
        "budget": {"evaluations": 3},
        "resources": {"threads_per_worker": 1, "sorted_magnitude_cache": True},
        "fidelity": {"subset": 2, "promote_quantile": 1.0, "rescore_test": True},
    }
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    with fused_kernels(False):  # compiling the fused merge kernels costs more than this run (tested elsewhere)
        run_dir = start_run(tmp_path / "cfg.yaml")
    res = RunResults(run_dir)
    searched = [r for r in res.calib if r.candidate_id >= 0]
    assert len(searched) >= 3 and all(r.ok for r in searched)
    assert {r.split for r in res.records} == {"calibration", "test"}

    best = res.best()
    assert best is not None and best.result.fidelity == "full"
    out = export_run(run_dir, pick="best", out=tmp_path / "export")[0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    assert tok.chat_template and tok("What is 23 + 45? Answer: 68")["input_ids"][-3:] == tok(" 68")["input_ids"]
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ref = materialize_state_dict(best.recipe, sources)
    state = model.state_dict()
    assert "lm_head.weight" not in ref and set(ref) == set(state) - {"lm_head.weight"}
    for k, v in ref.items():
        assert torch.equal(state[k], v), k
    # the exported folder scores what the run's worker scored for the same recipe
    suite = load_suite(suite_path)
    again = make_scorer("hf", batch_size=12, threads=1).score(model, tok, suite, split="calibration")
    for name, ts in again.tasks.items():
        assert ts.scores.tolist() == best.result.tasks[name].scores.tolist(), name
    enc = tok(suite.task("add").examples("test")[0].prompt, return_tensors="pt")
    gen = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > enc["input_ids"].shape[1]


def test_hf_stop_strings_on_the_real_tokenizer(real_zoo_test: RealManifest) -> None:
    """The scorer's stop-string criterion is built once per tokenizer and stops where transformers' own does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.scoring.scorers.hf import generate, stop_criteria

    tok = AutoTokenizer.from_pretrained(real_zoo_test.expert("order"))
    model = AutoModelForCausalLM.from_pretrained(real_zoo_test.expert("order"), dtype=torch.float32)
    assert stop_criteria(tok, ["\n"]) is stop_criteria(tok, ("\n",))
    prompts = [e.prompt for e in rs.generate_eval_splits("order")["test"][:4]]
    stops = ["\n", " the"]
    ours = generate(model, tok, [tok(p)["input_ids"] for p in prompts], max_new_tokens=8, stops=stops,
                    batch_size=4, max_length=64)
    for prompt, text in zip(prompts, ours, strict=True):
        enc = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False, stop_strings=stops, tokenizer=tok,
                                 pad_token_id=tok.pad_token_id)
        theirs = tok.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for stop in stops:
            theirs = theirs.split(stop)[0]
        assert text == theirs


def test_likelihood_adamerging_teacher_forces_the_answer_as_the_bpe_model_completes_it(
        real_zoo_test: RealManifest, tmp_path: Path) -> None:
    """On the real tokenizer the reference answer is teacher-forced as the completion the model produces after
    the prompt ids (``builtin:real``'s ``delimiter: " "``: " 68\\n", not "68\\n"), the same tokens as the joint
    encoding of prompt + completion past the prompt; a fit over the real model lowers that loss."""
    from evomerge.config import RunConfig
    from evomerge.driver.adamerging import AdaMerging, AdaMergingConfig
    from evomerge.driver.fit_objective import calibration_inputs
    from evomerge.driver.run import preflight
    from evomerge.driver.worker import Worker

    zoo = real_zoo_test
    suite_path = _small_suite(tmp_path / "suite", 4)
    cfg = RunConfig.model_validate({
        "name": "ada-real", "output_dir": str(tmp_path / "runs"), "base_model": "base",
        "sources": {"base": str(zoo.base), **{s: str(zoo.expert(s)) for s in zoo.skills}},
        "space": {"template": "builtin:task-arithmetic-per-layer", "overrides": {"init": {"weight": 0.5}}},
        "fitness": {"suite": str(suite_path), "batch_size": 12}, "resources": {"threads_per_worker": 1}})
    worker = Worker(preflight(cfg).spec)
    tok = worker.tokenizer
    tasks = calibration_inputs(worker.suite, tok, answers=True)
    for task, spec_task in zip(tasks, worker.suite.tasks, strict=True):
        for prompt, answer, ex in zip(task.prompts, task.answers, spec_task.examples("calibration"), strict=True):
            assert tok.decode(answer) == " " + ex.answer + "\n"
            joint = tok(ex.prompt + " " + ex.answer + "\n", add_special_tokens=False)["input_ids"]
            assert joint[:len(prompt)] == prompt and joint[len(prompt):] == answer
    fit = AdaMerging(preflight(cfg).space, worker, AdaMergingConfig(objective="likelihood", steps=2, lr=0.05),
                     seed=0, batch_size=12).fit()
    assert fit.history[-1]["loss"] < fit.history[0]["loss"] and fit.cost.generation_passes == 0


def test_regmean_scale_fit_on_the_real_model_is_the_materialized_merge(real_zoo_test: RealManifest,
                                                                      tmp_path: Path) -> None:
    """``builtin:regmean-per-layer`` on the real model (tied embeddings, BPE prompts for the statistics, each
    expert's on its own task): the fit's functional merge at a random genome is the materializer's merge of the decoded recipe, tensor for
    tensor (the tied embedding by the fallback), and a likelihood step lowers the loss."""
    import dataclasses

    import numpy as np

    from evomerge.config import RunConfig
    from evomerge.driver.adamerging import AdaMerging, AdaMergingConfig
    from evomerge.driver.run import preflight, search_stats
    from evomerge.driver.worker import Worker
    from evomerge.merge.materialize import materialize_state_dict

    zoo = real_zoo_test
    suite_path = _small_suite(tmp_path / "suite", 4)
    cfg = RunConfig.model_validate({
        "name": "rm-real", "output_dir": str(tmp_path / "runs"), "base_model": "base",
        "sources": {"base": str(zoo.base), **{s: str(zoo.expert(s)) for s in zoo.skills}},
        "space": {"template": "builtin:regmean-per-layer", "overrides": {
            "init": {"scale": 1.5}, "fixed": {"alpha": 0.5},
            "data": {"suite": str(suite_path), "examples": 4, "model_tasks": {s: [s] for s in zoo.skills}}}},
        "fitness": {"suite": str(suite_path), "batch_size": 12}, "resources": {"threads_per_worker": 1}})
    prep = preflight(cfg)
    files = search_stats(prep, tmp_path / "stats")
    from safetensors import safe_open

    for m, (path, _) in files.items():  # each expert's Gram matrices on its own task's 4 prompts
        with safe_open(path, "pt") as fh:
            assert fh.metadata()["examples"] == "4", m
    worker = Worker(dataclasses.replace(prep.spec, stats_files=files))
    fitter = AdaMerging(prep.space, worker, AdaMergingConfig(objective="likelihood", steps=1, lr=0.05), seed=0,
                        batch_size=12)
    u = np.random.default_rng(0).random(prep.space.dim)
    with torch.no_grad():
        params = fitter.merged(torch.tensor(u, dtype=torch.float64))
    sd = materialize_state_dict(prep.space.decode(u), cfg.sources, stats=worker.stats)
    assert "model.embed_tokens.weight" in fitter.targets
    for ckpt, name in fitter.targets.items():
        torch.testing.assert_close(params[name].float(), sd[ckpt].float(), rtol=1e-3, atol=1e-4)
    fit = fitter.fit()
    assert fit.history[-1]["loss"] < fit.history[0]["loss"]
