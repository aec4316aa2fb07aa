"""Bad input stops a run before any work: one clear line naming the culprit, exit code 2, no run folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.testing.family import build_family, write_perplexity_suite


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    fam = build_family(root / "fam", 2)
    suite = write_perplexity_suite(root / "suite")
    return root, fam, suite


def _base_cfg(root: Path, fam, suite) -> dict:
    return {
        "name": "x", "seed": 0, "output_dir": str(root / "out"),
        "sources": {k: str(v) for k, v in fam.items()}, "base_model": "base",
        "space": {"template": "builtin:ties-per-layer"},
        "fitness": {"suite": str(suite), "scorer": "hf"},
        "optimizer": {"name": "cma_es", "options": {"popsize": 4}},
        "budget": {"evaluations": 4},
    }


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _copy_suite(suite: Path, dst: Path) -> Path:
    shutil.copytree(suite.parent, dst)
    return dst / "suite.yaml"


# each case: (id, mutate(cfg, tmp, fam, suite) -> cfg | str (raw YAML), expected fragment)
def c_missing_file(cfg, tmp, fam, suite):
    return None


def c_bad_yaml(cfg, tmp, fam, suite):
    return "name: [unclosed\n"


def c_top_list(cfg, tmp, fam, suite):
    return "- 1\n- 2\n"


def c_unknown_top(cfg, tmp, fam, suite):
    return {**cfg, "optimiser": {}}


def c_unknown_nested(cfg, tmp, fam, suite):
    return {**cfg, "space": {**cfg["space"], "templat": "x"}}


def c_no_sources(cfg, tmp, fam, suite):
    return {k: v for k, v in cfg.items() if k != "sources"}


def c_one_source(cfg, tmp, fam, suite):
    return {**cfg, "sources": {"base": cfg["sources"]["base"]}}


def c_base_not_source(cfg, tmp, fam, suite):
    return {**cfg, "base_model": "nope"}


def c_bad_name(cfg, tmp, fam, suite):
    return {**cfg, "name": "a/b"}


def c_negative_budget(cfg, tmp, fam, suite):
    return {**cfg, "budget": {"evaluations": -3}}


def c_no_budget(cfg, tmp, fam, suite):
    return {**cfg, "budget": {"evaluations": None, "wall_time_s": None}}


def c_unknown_optimizer(cfg, tmp, fam, suite):
    return {**cfg, "optimizer": {"name": "cmaes"}}


def c_unknown_opt_option(cfg, tmp, fam, suite):
    return {**cfg, "optimizer": {"name": "cma_es", "options": {"sigma": 0.1}}}


def c_unknown_scorer(cfg, tmp, fam, suite):
    return {**cfg, "fitness": {**cfg["fitness"], "scorer": "tgi"}}


def c_unknown_builtin(cfg, tmp, fam, suite):
    return {**cfg, "space": {"template": "builtin:nope"}}


def c_missing_template(cfg, tmp, fam, suite):
    return {**cfg, "space": {"template": str(tmp / "none.yaml")}}


def c_missing_suite(cfg, tmp, fam, suite):
    return {**cfg, "fitness": {**cfg["fitness"], "suite": str(tmp / "none.yaml")}}


def c_remote_code(cfg, tmp, fam, suite):
    return {**cfg, "trust_remote_code": True}


def c_bad_backend(cfg, tmp, fam, suite):
    return {**cfg, "resources": {"backend": "slurm"}}


def c_zero_workers(cfg, tmp, fam, suite):
    return {**cfg, "resources": {"workers": 0}}


def c_unknown_task(cfg, tmp, fam, suite):
    return {**cfg, "fitness": {**cfg["fitness"], "tasks": ["digits", "poetry"]}}


def c_missing_model(cfg, tmp, fam, suite):
    return {**cfg, "sources": {**cfg["sources"], "m1": str(tmp / "gone")}}


def c_pickle_model(cfg, tmp, fam, suite):
    d = tmp / "pick"
    d.mkdir()
    shutil.copy(fam["m1"] / "config.json", d / "config.json")
    torch.save({}, d / "pytorch_model.bin")
    return {**cfg, "sources": {**cfg["sources"], "m1": str(d)}}


def c_corrupt_model(cfg, tmp, fam, suite):
    d = _copy_model(fam["m1"], tmp / "corrupt")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:50])
    return {**cfg, "sources": {**cfg["sources"], "m1": str(d)}}


def c_shape_mismatch(cfg, tmp, fam, suite):
    from transformers import AutoConfig, LlamaForCausalLM

    c = AutoConfig.from_pretrained(fam["m1"])
    c.hidden_size = c.hidden_size * 2  # another base model (vocabularies differing only in rows are merged)
    LlamaForCausalLM(c).save_pretrained(tmp / "wide")
    return {**cfg, "sources": {**cfg["sources"], "m1": str(tmp / "wide")}}


def c_missing_config(cfg, tmp, fam, suite):
    d = _copy_model(fam["m1"], tmp / "noconf")
    (d / "config.json").unlink()
    return {**cfg, "sources": {**cfg["sources"], "m1": str(d)}}


def c_layer_mismatch(cfg, tmp, fam, suite):
    from transformers import AutoConfig, LlamaForCausalLM

    c = AutoConfig.from_pretrained(fam["m1"])
    c.num_hidden_layers = 3
    LlamaForCausalLM(c).save_pretrained(tmp / "deep")
    return {**cfg, "sources": {**cfg["sources"], "m1": str(tmp / "deep")}}


def c_nan_weights(cfg, tmp, fam, suite):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(fam["m1"])
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    m.save_pretrained(tmp / "nan")
    return {**cfg, "sources": {**cfg["sources"], "m1": str(tmp / "nan")}}


def c_missing_shard(cfg, tmp, fam, suite):
    d = _copy_model(fam["m1"], tmp / "shard")
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    return {**cfg, "sources": {**cfg["sources"], "m1": str(d)}}


def _suite_case(mutator):
    def case(cfg, tmp, fam, suite):
        new = _copy_suite(suite, tmp / "suite")
        mutator(new.parent)
        return {**cfg, "fitness": {**cfg["fitness"], "suite": str(new)}}
    return case


c_bad_jsonl = _suite_case(lambda d: (d / "digits.calibration.jsonl").write_text('{"id": "a", "text": "12"}\n{oops\n'))
c_missing_data = _suite_case(lambda d: (d / "letters.test.jsonl").unlink())
c_unknown_kind = _suite_case(lambda d: (d / "suite.yaml").write_text(
    (d / "suite.yaml").read_text().replace("kind: perplexity", "kind: essay", 1)))
c_overlap = _suite_case(lambda d: shutil.copy(d / "digits.calibration.jsonl", d / "digits.test.jsonl"))
c_empty_split = _suite_case(lambda d: (d / "letters.calibration.jsonl").write_text(""))
c_regex_never = _suite_case(lambda d: (
    (d / "g.calibration.jsonl").write_text('{"id": "g1", "prompt": "1+1=", "answer": "2"}\n'),
    (d / "g.test.jsonl").write_text('{"id": "g2", "prompt": "2+2=", "answer": "4"}\n'),
    (d / "suite.yaml").write_text((d / "suite.yaml").read_text() + (
        "  - {name: g, kind: generate, extract: regex, answer_regex: 'ANSWER: (\\d+)',"
        " data: {calibration: g.calibration.jsonl, test: g.test.jsonl}}\n"))))


def c_template_unknown_key(cfg, tmp, fam, suite):
    (tmp / "t.yaml").write_text("kind: params\nmethod: ties\ngranularity: per_layer\ncolour: red\n")
    return {**cfg, "space": {"template": str(tmp / "t.yaml")}}


def c_template_bad_method(cfg, tmp, fam, suite):
    (tmp / "t.yaml").write_text("kind: params\nmethod: tiess\n")
    return {**cfg, "space": {"template": str(tmp / "t.yaml")}}


def c_template_bad_param(cfg, tmp, fam, suite):
    (tmp / "t.yaml").write_text("kind: params\nmethod: ties\nsearch: [weight, gamma]\n")
    return {**cfg, "space": {"template": str(tmp / "t.yaml")}}


CASES = [
    (c_missing_file, "not found"),
    (c_bad_yaml, "not valid YAML"),
    (c_top_list, "mapping"),
    (c_unknown_top, "optimiser: unknown key"),
    (c_unknown_nested, "space.templat"),
    (c_no_sources, "sources"),
    (c_one_source, "sources"),
    (c_base_not_source, "base_model"),
    (c_bad_name, "name"),
    (c_negative_budget, "budget.evaluations"),
    (c_no_budget, "budget"),
    (c_unknown_optimizer, "cmaes"),
    (c_unknown_opt_option, "sigma"),
    (c_unknown_scorer, "tgi"),
    (c_unknown_builtin, "nope"),
    (c_missing_template, "none.yaml"),
    (c_missing_suite, "none.yaml"),
    (c_remote_code, "trust_remote_code"),
    (c_bad_backend, "resources.backend"),
    (c_zero_workers, "resources.workers"),
    (c_unknown_task, "poetry"),
    (c_missing_model, "gone"),
    (c_pickle_model, "pytorch_model.bin"),
    (c_corrupt_model, "model.safetensors"),
    (c_shape_mismatch, "embed_tokens"),
    (c_missing_config, "config.json"),
    (c_layer_mismatch, "layer"),
    (c_nan_weights, "q_proj"),
    (c_missing_shard, "model-00002-of-00002.safetensors"),
    (c_bad_jsonl, "digits.calibration.jsonl"),
    (c_missing_data, "letters.test.jsonl"),
    (c_unknown_kind, "essay"),
    (c_overlap, "overlap"),
    (c_empty_split, "letters.calibration.jsonl"),
    (c_regex_never, "regex"),
    (c_template_unknown_key, "colour"),
    (c_template_bad_method, "tiess"),
    (c_template_bad_param, "gamma"),
]


@pytest.mark.parametrize("mutate, fragment", CASES, ids=[c.__name__.removeprefix("c_") for c, _ in CASES])
def test_bad_input_is_refused_before_any_work(good, tmp_path, mutate, fragment):
    root, fam, suite = good
    cfg = _base_cfg(tmp_path, fam, suite)
    doc = mutate(cfg, tmp_path, fam, suite)
    path = tmp_path / "cfg.yaml"
    if doc is not None:
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    assert "error:" in out and fragment.lower() in out.lower(), out
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
