"""Vocabularies: models with added tokens, folders without tokenizers, tokenizer_source base | union | model."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.errors import ConfigError, MaterializeError, SourceMismatchError
from evomerge.io import ModelFolder, check_mergeable
from evomerge.merge.materialize import InPlaceMerger, materialize_state_dict, materialize_to_disk
from evomerge.merge.sources import ResidentSources
from evomerge.mergekit_compat import from_mergekit_yaml, to_mergekit_yaml
from evomerge.recipe import Recipe

TEXT = (
    "the quick brown fox jumps over the lazy dog. models merge by adding task vectors to a base model; "
    "a tokenizer splits text into tokens and every token has one row in the embedding matrix. "
) * 4
BASE_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
TOOL_TEMPLATE = "{% for m in messages %}<tool>{{ m['content'] }}</tool>{% endfor %}"
ADDED_A = ["<tool>", "</tool>", "<think>"]
ADDED_B = ["<think>", "<x>"]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=BASE_TEMPLATE)


def _save(model, tok, path: Path, template: str | None = None) -> Path:
    model.save_pretrained(path)
    if tok is not None:
        if template is not None:
            tok.chat_template = template
        tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def family(request, tmp_path_factory) -> dict[str, Path]:
    """base, expert a (3 added tokens), expert b (2 added, one shared with a), e (no tokenizer files)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = request.param
    root = tmp_path_factory.mktemp("tied" if tied else "untied")
    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    out = {"base": _save(base, tok, root / "base")}
    gen = torch.Generator().manual_seed(1)
    for name, added in (("a", ADDED_A), ("b", ADDED_B), ("e", [])):
        m = LlamaForCausalLM(copy.deepcopy(cfg))
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        t = _tokenizer()
        if added:
            t.add_tokens(added)
            m.resize_token_embeddings(len(t), mean_resizing=False)
            with torch.no_grad():
                m.get_input_embeddings().weight[-len(added):] = torch.randn(len(added), 16, generator=gen)
                if not tied:
                    m.get_output_embeddings().weight[-len(added):] = torch.randn(len(added), 16, generator=gen)
        out[name] = _save(m, t if name != "e" else None, root / name, TOOL_TEMPLATE if name == "a" else None)
    return out


def _ta(family, names, weights, **kw) -> Recipe:
    return Recipe(method="task_arithmetic", base_model="base", sources={k: str(v) for k, v in family.items()},
                  models=tuple({"model": n, "parameters": {"weight": w}} for n, w in zip(names, weights, strict=False)), **kw)


def _raw(family, name) -> dict[str, torch.Tensor]:
    return load_file(str(family[name] / "model.safetensors"))


def _vocab_names(family) -> list[str]:
    return [EMBED] + ([] if ModelFolder.open(family["base"]).tied_embeddings else [HEAD])


def test_base_source_takes_rows_by_token(family, tmp_path: Path) -> None:
    recipe = _ta(family, ["a", "b"], [0.5, 0.7], tokenizer_source="base")
    out = materialize_to_disk(recipe, tmp_path / "m")
    merged = load_file(str(out / "model.safetensors"))
    base, a, b = _raw(family, "base"), _raw(family, "a"), _raw(family, "b")
    for name in _vocab_names(family):
        v = base[name].shape[0]
        want = base[name] + 0.5 * (a[name][:v] - base[name]) + 0.7 * (b[name][:v] - base[name])
        torch.testing.assert_close(merged[name], want, rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == base[EMBED].shape[0]
    assert (out / "tokenizer.json").read_bytes() == (family["base"] / "tokenizer.json").read_bytes()
    # unset with differing row counts: the same as base (logged), and the same tensors
    unset = materialize_state_dict(_ta(family, ["a", "b"], [0.5, 0.7]))
    assert all(torch.equal(unset[n], merged[n]) for n in merged)


def test_union_vocabulary_rows_tokenizer_and_generation(family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _ta(family, ["a", "b"], [0.5, 0.7], tokenizer_source="union")
    out = materialize_to_disk(recipe, tmp_path / "m")
    merged = load_file(str(out / "model.safetensors"))
    base, a, b = _raw(family, "base"), _raw(family, "a"), _raw(family, "b")
    v = base[EMBED].shape[0]
    tok = AutoTokenizer.from_pretrained(out)
    assert [tok.convert_tokens_to_ids(t) for t in ["<tool>", "</tool>", "<think>", "<x>"]] == [v, v + 1, v + 2, v + 3]
    assert len(tok) == v + 4 and tok.chat_template == BASE_TEMPLATE
    for name in _vocab_names(family):
        m = merged[name]
        assert m.shape[0] == v + 4
        want = base[name] + 0.5 * (a[name][:v] - base[name]) + 0.7 * (b[name][:v] - base[name])
        torch.testing.assert_close(m[:v], want, rtol=0, atol=1e-6)
        # <tool>, </tool>: only a has them, so every model gets a's row and the merge is a's row
        torch.testing.assert_close(m[v : v + 2], a[name][v : v + 2], rtol=0, atol=1e-6)
        # <x>: only b has it
        torch.testing.assert_close(m[v + 3], b[name][v + 1], rtol=0, atol=1e-6)
        # <think>: a and b have it, the base does not: the base's row is their mean
        ra, rb = a[name][v + 2], b[name][v]
        mean = (ra + rb) / 2
        torch.testing.assert_close(m[v + 2], mean + 0.5 * (ra - mean) + 0.7 * (rb - mean), rtol=0, atol=1e-6)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == v + 4
    assert (HEAD in merged) == (not config["tie_word_embeddings"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == v + 4
    if config["tie_word_embeddings"]:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    ids = tok.apply_chat_template([{"role": "user", "content": "the fox <tool>"}], tokenize=True,
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 3


def test_model_source_keeps_its_vocabulary_and_chat_template(family, tmp_path: Path) -> None:
    out = materialize_to_disk(_ta(family, ["a"], [1.0], tokenizer_source="a"), tmp_path / "m")
    merged, a = load_file(str(out / "model.safetensors")), _raw(family, "a")
    for name in _vocab_names(family):
        torch.testing.assert_close(merged[name], a[name], rtol=0, atol=1e-6)  # weight 1 gives a back
    assert (out / "tokenizer.json").read_bytes() == (family["a"] / "tokenizer.json").read_bytes()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == TOOL_TEMPLATE


def test_pad_to_multiple_of(family) -> None:
    recipe = _ta(family, ["a"], [0.5], tokenizer_source="union", pad_to_multiple_of=64)
    merged = materialize_state_dict(recipe)
    base, a = _raw(family, "base"), _raw(family, "a")
    v = base[EMBED].shape[0]
    rows = -(-(v + 3) // 64) * 64
    assert merged[EMBED].shape[0] == rows and rows > v + 3
    laid_base = torch.cat([base[EMBED], a[EMBED][v:]])  # the base takes a's rows for a's tokens
    pad_base, pad_a = laid_base.mean(0), a[EMBED].mean(0)
    torch.testing.assert_close(merged[EMBED][v + 3 :], (pad_base + 0.5 * (pad_a - pad_base)).expand(rows - v - 3, -1),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("source", ["base", "union", "a"])
def test_in_place_merge_equals_merge_to_disk(family, source: str) -> None:
    from transformers import AutoModelForCausalLM

    paths = {k: str(v) for k, v in family.items() if k != "e"}
    sources = ResidentSources.load(paths, "base", ["a", "b"], tokenizer_source=source)
    model = AutoModelForCausalLM.from_pretrained(family["base"])
    if sources.vocab.aligns:
        model.resize_token_embeddings(sources.vocab.size, mean_resizing=False)
    merger = InPlaceMerger(sources, model)
    recipe = _ta(family, ["a", "b"], [0.3, 0.9], tokenizer_source=source)
    merger.apply(recipe)
    disk = materialize_state_dict(recipe)
    live = model.state_dict()
    assert all(torch.equal(live[n], t) for n, t in disk.items())
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    with pytest.raises(MaterializeError, match="tokenizer_source"):
        merger.apply(_ta(family, ["a", "b"], [0.3, 0.9], tokenizer_source="b"))
    if source == "union":  # the union depends on the models read
        with pytest.raises(MaterializeError, match="depends on the models"):
            merger.apply(_ta(family, ["a"], [0.3], tokenizer_source=source))


def test_folders_without_tokenizer_files(family, tmp_path: Path, caplog) -> None:
    # the expert has none: the base's is written
    out = materialize_to_disk(_ta(family, ["e"], [0.5]), tmp_path / "m1")
    assert (out / "tokenizer.json").read_bytes() == (family["base"] / "tokenizer.json").read_bytes()
    # the base has none: the first model that has one gives it
    bare = tmp_path / "bare"
    shutil.copytree(family["base"], bare)
    for p in ModelFolder.open(bare).tokenizer_files:
        p.unlink()
    sources = {"base": str(bare), "e": str(family["e"]), "a": str(family["a"])}
    recipe = Recipe(method="task_arithmetic", base_model="base", sources=sources,
                    models=({"model": "e", "parameters": {"weight": 0.5}}, {"model": "a", "parameters": {"weight": 0.5}}))
    out = materialize_to_disk(recipe, tmp_path / "m2")
    assert (out / "tokenizer.json").read_bytes() == (family["a"] / "tokenizer.json").read_bytes()
    # none has one: a warning and no tokenizer
    recipe = Recipe(method="task_arithmetic", base_model="base", sources=sources,
                    models=({"model": "e", "parameters": {"weight": 0.5}},))
    with caplog.at_level("WARNING"):
        out = materialize_to_disk(recipe, tmp_path / "m3")
    assert not ModelFolder.open(out).tokenizer_files and "without a tokenizer" in caplog.text
    # a search refuses at preflight, naming the folders
    from evomerge.config import RunConfig
    from evomerge.driver.run import check_vocab

    cfg = RunConfig(name="r", sources={"base": str(bare), "e": str(family["e"])}, base_model="base",
                    space={"template": "builtin:x"}, fitness={"suite": "builtin:zoo"})
    folders = {n: ModelFolder.open(p) for n, p in cfg.sources.items()}
    with pytest.raises(ConfigError, match=f"no source folder has tokenizer files.*{bare}"):
        check_vocab(cfg, folders, "base", None, recipe)


def test_mergekit_yaml_round_trip_keeps_the_tokenizer(family) -> None:
    for kw in ({"tokenizer_source": "union"}, {"tokenizer_source": "a"},
               {"tokenizer_source": "union", "pad_to_multiple_of": 64}):
        recipe = _ta(family, ["a", "b"], [0.5, 0.7], **kw)
        text = to_mergekit_yaml(recipe)
        back = from_mergekit_yaml(text)
        assert back.pad_to_multiple_of == kw.get("pad_to_multiple_of")
        want = str(family["a"]) if kw["tokenizer_source"] == "a" else kw["tokenizer_source"]
        assert back.tokenizer_source == want
        assert torch.equal(materialize_state_dict(back)[EMBED], materialize_state_dict(recipe)[EMBED])
    with pytest.raises(ConfigError, match="tokenizer.tokens"):
        from_mergekit_yaml(f"merge_method: linear\nmodels: [{{model: {family['a']}}}]\n"
                           "tokenizer: {source: union, tokens: {'<x>': {source: base}}}\n")


def test_different_base_models_are_still_refused(family, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tied = ModelFolder.open(family["base"]).tied_embeddings
    cfg = LlamaConfig(vocab_size=310, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    other = _save(LlamaForCausalLM(cfg), None, tmp_path / "other")
    folders = {"base": ModelFolder.open(family["base"]), "other": ModelFolder.open(other)}
    with pytest.raises(SourceMismatchError, match="different base models"):
        check_mergeable(folders, vocab=True)
    with pytest.raises(SourceMismatchError, match="tokenizer_source"):  # rows only: the message says how
        check_mergeable({"base": ModelFolder.open(family["base"]), "a": ModelFolder.open(family["a"])})


def test_search_worker_scores_with_an_added_token_expert(family, tmp_path: Path) -> None:
    from evomerge.driver.pool import Job
    from evomerge.driver.worker import Worker, WorkerSpec

    rows = [{"id": f"q{i}", "prompt": p, "answer": "the"} for i, p in enumerate(["the quick", "a base"])]
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = {"name": "chat", "tasks": [{"name": "gen", "kind": "generate", "chat_template": True,
                                        "data": {"calibration": str(tmp_path / "q.jsonl")}, "max_new_tokens": 2}]}
    (tmp_path / "suite.yaml").write_text(json.dumps(suite))
    paths = {k: str(v) for k, v in family.items() if k != "e"}
    spec = WorkerSpec(sources=paths, reference="base", order=("a", "b"), suite=str(tmp_path / "suite.yaml"),
                      device="cpu", dtype="float32", threads=1, tokenizer_source="union")
    worker = Worker(spec)
    assert worker.tokenizer.chat_template == BASE_TEMPLATE and len(worker.tokenizer) == worker.sources.vocab.size
    recipe = _ta(family, ["a", "b"], [0.5, 0.5], tokenizer_source="union")
    result = worker.evaluate(Job(key=0, candidate_id=0, recipe=recipe))
    assert result.status == "ok", result.error
    assert result.tasks["gen"].scores.shape == (2,)
    live, disk = worker.model.state_dict(), materialize_state_dict(recipe)
    assert all(torch.equal(live[n], t) for n, t in disk.items())


def test_search_run_with_an_added_token_expert_exports_the_union(family, tmp_path: Path) -> None:
    import yaml
    from transformers import AutoTokenizer

    from evomerge.driver.run import start_run
    from evomerge.export import export_run
    from evomerge.testing.family import write_perplexity_suite, write_run_config

    fam = {k: v for k, v in family.items() if k != "e"}
    suite = write_perplexity_suite(tmp_path / "suite")
    cfg = write_run_config(tmp_path / "cfg.yaml", fam, suite, name="v", evals=4,
                           template="builtin:task-arithmetic-global",
                           extra={"tokenizer_source": "union", "fidelity": {"rescore_test": False}})
    run_dir = start_run(cfg)
    from evomerge.results import RunResults

    calib = RunResults(run_dir).calib  # the baselines (each source alone) read every source too
    assert len(calib) >= 4 + 3 and all(x.ok for x in calib), [x.result.error for x in calib if not x.ok]
    out = export_run(run_dir, out=tmp_path / "export")[0]
    recipe = Recipe.from_yaml((out / "recipe.yaml").read_text())
    assert recipe.tokenizer_source == "union" and {"a", "b"} <= set(recipe.model_names)
    assert yaml.safe_load((out / "mergekit.yaml").read_text())["tokenizer_source"] == "union"
    tok = AutoTokenizer.from_pretrained(out)
    assert {"<tool>", "<think>", "<x>"} <= set(tok.get_vocab()) and tok.chat_template == BASE_TEMPLATE
