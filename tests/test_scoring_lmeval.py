"""The lmeval scorer: same per-example numbers as the hf scorer, offline, with clear failures."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.builtin import builtin_dir
from evomerge.errors import BackendUnavailableError, ConfigError, ScoreError
from evomerge.scoring import load_suite, make_scorer
from evomerge.scoring.base import torch_threads
from evomerge.testing.tokenizer import build_tokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("isolated_hf")

LMEVAL_YAML = builtin_dir("fitness") / "lmeval" / "zoo_add.yaml"
MAX_NEW = 10  # max_gen_toks of the shipped lm-eval task


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@torch.no_grad()
def greedy(model, tok, text: str, n: int) -> str:
    ids, new = list(tok(text)["input_ids"]), []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
        new.append(nxt)
    return tok.decode(new, skip_special_tokens=True).split("\n")[0]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data(model, tok, tmp_path_factory) -> Path:
    """Zoo-format splits whose answers are the model's own completions for some rows, wrong for others."""
    d = tmp_path_factory.mktemp("lmeval_data")
    for split, offset in (("calibration", 0), ("test", 500)):
        rows = []
        with torch_threads(1):
            for i in range(16):
                prompt = f"{(i + offset) * 37 % 1000}+{(i + offset) * 13 % 100}="
                done = greedy(model, tok, prompt, MAX_NEW)
                right = i % 3 != 1 and done and done == done.strip()
                rows.append({"id": f"{split}-{i}", "prompt": prompt, "answer": done if right else done + "q"})
        _jsonl(d / f"{split}.jsonl", rows)
    return d


def _suite(d: Path, name: str, task: dict) -> Path:
    path = d / f"{name}.yaml"
    path.write_text(json.dumps({"name": name, "tasks": [task]}))
    return path


SPLITS = {"calibration": "calibration.jsonl", "test": "test.jsonl"}


def test_hf_and_lmeval_give_the_same_per_example_scores(model, tok, data: Path) -> None:
    gen = load_suite(
        _suite(data, "gen", {"name": "add", "kind": "generate", "data": SPLITS, "max_new_tokens": MAX_NEW})
    )
    lme = load_suite(
        _suite(data, "lme", {"name": "add", "kind": "lmeval", "task_yaml": str(LMEVAL_YAML), "data": SPLITS})
    )
    hf_out = make_scorer("hf", batch_size=4).score(model, tok, gen)
    lm_out = make_scorer("lmeval", batch_size=4).score(model, tok, lme)
    assert lm_out.tasks["add"].example_ids == hf_out.tasks["add"].example_ids
    assert lm_out.tasks["add"].metric == "exact_match"
    scores = lm_out.tasks["add"].scores
    np.testing.assert_array_equal(scores, hf_out.tasks["add"].scores)
    assert 3 <= scores.sum() <= len(scores) - 3  # a real mix of right and wrong answers

    sub_hf = make_scorer("hf").score(model, tok, gen, split="test", subset=5, seed=2)
    sub_lm = make_scorer("hf").score(model, tok, lme, split="test", subset=5, seed=2)  # delegated to lmeval
    assert sub_lm.tasks["add"].example_ids == sub_hf.tasks["add"].example_ids
    assert len(sub_lm.tasks["add"].example_ids) == 5
    np.testing.assert_array_equal(sub_lm.tasks["add"].scores, sub_hf.tasks["add"].scores)


def test_task_yaml_data_files_resolve_against_the_yaml_folder(model, tok, data: Path) -> None:
    folder = data / "tasks"
    folder.mkdir(exist_ok=True)
    text = LMEVAL_YAML.read_text().replace("../zoo/add.test.jsonl", "../test.jsonl")
    (folder / "own.yaml").write_text(text.replace("evomerge_zoo_add", "own_add"))
    suite = load_suite(_suite(data, "own", {"name": "add", "kind": "lmeval", "task_yaml": "tasks/own.yaml"}))
    with pytest.raises(ConfigError, match="only has lm-eval's own test split"):
        make_scorer("lmeval").score(model, tok, suite)
    out = make_scorer("lmeval").score(model, tok, suite, split="test", subset=6, seed=3)
    gen = {"name": "add", "kind": "generate", "data": SPLITS, "max_new_tokens": MAX_NEW}
    ref = make_scorer("hf").score(
        model, tok, load_suite(_suite(data, "g2", gen)), split="test", subset=6, seed=3
    )
    assert len(out.tasks["add"].example_ids) == 6
    assert out.tasks["add"].example_ids == ref.tasks["add"].example_ids  # same ids -> same subset
    np.testing.assert_array_equal(out.tasks["add"].scores, ref.tasks["add"].scores)


def test_nan_model_raises_score_error(model, tok, data: Path) -> None:
    lme = load_suite(
        _suite(data, "lme", {"name": "add", "kind": "lmeval", "task_yaml": str(LMEVAL_YAML), "data": SPLITS})
    )
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[:] = float("nan")
    with pytest.raises(ScoreError, match="non-finite"):
        make_scorer("lmeval").score(bad, tok, lme)


def test_refuses_other_kinds_and_a_missing_lm_eval(model, tok, data: Path, monkeypatch) -> None:
    gen = load_suite(_suite(data, "gen", {"name": "add", "kind": "generate", "data": SPLITS}))
    with pytest.raises(ConfigError, match=r"lmeval scorer cannot run task\(s\) add \(generate\)"):
        make_scorer("lmeval").score(model, tok, gen)
    lme = load_suite(
        _suite(data, "lme", {"name": "add", "kind": "lmeval", "task_yaml": str(LMEVAL_YAML), "data": SPLITS})
    )
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(BackendUnavailableError, match="lm-eval"):
        make_scorer("lmeval").score(model, tok, lme)
    with pytest.raises(BackendUnavailableError, match="lm-eval"):
        make_scorer("hf").score(model, tok, lme)


def test_registered_task_by_name_twice_with_suite_data(model, tok, data: Path) -> None:
    task = {
        "kind": "lmeval",
        "task": "evomerge_zoo_add",
        "include_path": [str(LMEVAL_YAML.parent)],
        "data": SPLITS,
    }
    path = data / "byname.yaml"
    path.write_text(json.dumps({"name": "byname", "tasks": [{"name": "a", **task}, {"name": "b", **task}]}))
    out = make_scorer("lmeval", batch_size=8).score(model, tok, load_suite(path))
    assert list(out.tasks) == ["a", "b"]
    assert out.tasks["a"].example_ids == out.tasks["b"].example_ids
    assert len(out.tasks["a"].example_ids) == 16
    np.testing.assert_array_equal(out.tasks["a"].scores, out.tasks["b"].scores)
    missing = dict(task, task="no_such_task")
    path.write_text(json.dumps({"name": "byname", "tasks": [{"name": "a", **missing}]}))
    with pytest.raises(ConfigError, match="no lm-eval task named 'no_such_task'"):
        make_scorer("lmeval").score(model, tok, load_suite(path))
