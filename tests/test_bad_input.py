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


def c_bad_opt_value(cfg, tmp, fam, suite):
    return {**cfg, "optimizer": {"name": "cma_es", "options": {"sigma0": -1}}}


def c_option_of_another_optimizer(cfg, tmp, fam, suite):
    return {**cfg, "optimizer": {"name": "random", "options": {"sigma0": 0.1}}}


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


c_not_utf8 = _suite_case(lambda d: (d / "digits.calibration.jsonl").write_bytes(
    b'{"id": "a", "text": "12"}\n{"id": "b", "text": "caf\xe9"}\n'))


def c_int_tensor(cfg, tmp, fam, suite):
    from safetensors.torch import load_file, save_file

    d = _copy_model(fam["m1"], tmp / "quantized")
    tensors = load_file(d / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = (tensors[name] * 100).to(torch.int8)
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    return {**cfg, "sources": {**cfg["sources"], "m1": str(d)}}


def c_output_is_file(cfg, tmp, fam, suite):
    (tmp / "out").write_text("not a folder\n")
    return cfg


def c_output_under_file(cfg, tmp, fam, suite):
    (tmp / "out").write_text("not a folder\n")
    return {**cfg, "output_dir": str(tmp / "out" / "runs")}


def c_run_dir_is_file(cfg, tmp, fam, suite):
    (tmp / "out").mkdir()
    (tmp / "out" / "x").write_text("not a folder\n")
    return cfg


def c_bad_device(cfg, tmp, fam, suite):
    return {**cfg, "resources": {"device": "gpu0"}}


def c_subset_too_large(cfg, tmp, fam, suite):
    return {**cfg, "fidelity": {"subset": 100}}


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
    (c_unknown_opt_option, "optimizer.options.sigma: unknown key"),
    (c_bad_opt_value, "optimizer.options.sigma0: Input should be greater than 0"),
    (c_option_of_another_optimizer, "optimizer.options.sigma0: unknown key"),
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
    (c_not_utf8, ("digits.calibration.jsonl:2", "not UTF-8", "offset 50")),
    (c_int_tensor, ("quantized", "model.layers.1.mlp.up_proj.weight", "torch.int8")),
    (c_output_is_file, ("output_dir", "out is a file")),
    (c_output_under_file, ("output_dir", "out is a file")),
    (c_run_dir_is_file, ("output_dir", "the run folder", "is a file")),
    (c_bad_device, ("resources.device", "gpu0")),
    (c_subset_too_large, ("fidelity.subset", "digits: 6, letters: 6")),
]


def _tree(root: Path) -> set[tuple[str, bool]]:
    """Every path under ``root`` (itself included) with whether it is a folder."""
    if not root.exists():
        return set()
    return {(str(p), p.is_dir()) for p in [root, *root.rglob("*")]}


def _assert_refused(tmp_path: Path, doc: dict | str | None, fragment: str | tuple[str, ...]) -> None:
    """Run ``doc`` (a config, raw YAML or no file at all): exit code 2, one line naming ``fragment``, and
    nothing written under ``output_dir`` (what was there before the run is left as it was)."""
    path = tmp_path / "cfg.yaml"
    if doc is not None:
        path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    out_dir = Path(doc.get("output_dir", tmp_path / "out")) if isinstance(doc, dict) else tmp_path / "out"
    before = _tree(tmp_path / "out") | _tree(out_dir)
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 2, res.output
    out = " ".join(res.output.split())
    for frag in (fragment,) if isinstance(fragment, str) else fragment:
        assert "error:" in out and frag.lower() in out.lower(), out
    assert "Traceback" not in res.output and sum("error:" in line for line in res.output.splitlines()) == 1
    assert _tree(tmp_path / "out") | _tree(out_dir) == before


@pytest.mark.parametrize("mutate, fragment", CASES, ids=[c.__name__.removeprefix("c_") for c, _ in CASES])
def test_bad_input_is_refused_before_any_work(good, tmp_path, mutate, fragment):
    root, fam, suite = good
    cfg = _base_cfg(tmp_path, fam, suite)
    _assert_refused(tmp_path, mutate(cfg, tmp_path, fam, suite), fragment)


@pytest.mark.parametrize("device, cuda_devices, fragment", [
    ("cuda", 0, "no CUDA"), ("cuda:3", 1, "has 1 CUDA device"), ("mps", 0, "not available"),
])
def test_a_device_this_machine_lacks_is_refused(good, tmp_path, monkeypatch, device, cuda_devices, fragment):
    root, fam, suite = good
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda_devices)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = {**_base_cfg(tmp_path, fam, suite), "resources": {"device": device}}
    _assert_refused(tmp_path, cfg, ("resources.device", repr(device), fragment))


def test_an_output_dir_that_cannot_be_written_is_refused(good, tmp_path, monkeypatch):
    import errno
    import os
    import tempfile

    root, fam, suite = good
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:  # the superuser writes anywhere: make the write check meet what a user would

        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    cfg = {**_base_cfg(tmp_path, fam, suite), "output_dir": str(locked / "runs")}
    try:
        _assert_refused(tmp_path, cfg, ("output_dir", "cannot create", "Permission denied"))
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_subset_larger_than_some_splits_warns_and_scores_them_whole(good, tmp_path, caplog):
    from evomerge.config import load_run_config
    from evomerge.driver.run import preflight

    root, fam, suite = good
    new = _copy_suite(suite, tmp_path / "suite")
    (new.parent / "digits.calibration.jsonl").write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"{i}+{i}={2 * i}"}) + "\n" for i in range(20)))
    cfg = {**_base_cfg(tmp_path, fam, suite), "fitness": {"suite": str(new), "scorer": "hf"},
           "fidelity": {"subset": 10}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level("WARNING", logger="evomerge.driver.checks"):
        prep = preflight(load_run_config(tmp_path / "cfg.yaml"))
    assert prep.tasks == ["digits", "letters"]
    warned = [r.getMessage() for r in caplog.records if "fidelity.subset" in r.getMessage()]
    assert len(warned) == 1 and "'letters' has 6 calibration examples" in warned[0], warned
    assert not (tmp_path / "out").exists()


def test_a_bad_recipe_file_gets_one_line_naming_the_field(good, tmp_path):
    _root, fam, _suite = good
    doc = {"method": "regmean", "base_model": "base", "models": [{"model": m} for m in fam if m != "base"],
           "data": {"suite": "builtin:zoo-2", "model_tasks": {"nope": ["add"]}},
           "sources": {k: str(v) for k, v in fam.items()}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = CliRunner().invoke(app, ["merge", str(path), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "r.yaml: data.model_tasks: ['nope'] are not models of the recipe" in lines[0]
    assert not (tmp_path / "out").exists()
