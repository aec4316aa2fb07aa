"""Contract tests run over every registered scorer, selected by declared capabilities.

Each scorer scores the base of the tiny model family (:func:`evomerge.testing.family.build_family`) on
the tasks of a small suite whose kinds it declares: per-example scores carry the examples' ids in file
order, repeat exactly, and a model yielding NaN is a :class:`ScoreError`. A scorer whose backend is not
installed here is skipped with the reason.
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.builtin import builtin_dir
from evomerge.errors import ConfigError, ScoreError
from evomerge.scoring import SCORERS, load_suite, make_scorer
from evomerge.scoring.base import torch_threads
from evomerge.testing.family import build_family
from evomerge.testing.tokenizer import build_tokenizer

KINDS = ("generate", "choice", "perplexity", "lmeval")
#: The Python package each backend needs; a scorer whose package is missing is skipped.
BACKEND_PACKAGE = {"lmeval": "lm_eval", "vllm": "vllm"}
LMEVAL_YAML = builtin_dir("fitness") / "lmeval" / "zoo_add.yaml"
MAX_NEW = 10  # max_gen_toks of the shipped lm-eval task
N = 6

pytestmark = pytest.mark.usefixtures("isolated_hf")


def _available(name: str) -> bool:
    package = BACKEND_PACKAGE.get(name)
    return package is None or importlib.util.find_spec(package) is not None


SCORER_PARAMS = [
    pytest.param(n, marks=() if _available(n) else pytest.mark.skip(reason=f"{BACKEND_PACKAGE[n]} is not installed"))
    for n in SCORERS.names()
]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    return build_family(tmp_path_factory.mktemp("family"), n=1)


@pytest.fixture(scope="module")
def model(family):
    return AutoModelForCausalLM.from_pretrained(family["base"]).eval()


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path.name


@pytest.fixture(scope="module")
def data(model, tok, tmp_path_factory) -> Path:
    """One task of each kind; the addition answers are the model's own greedy completions for two rows
    in three and wrong for the rest, so right and wrong answers mix."""
    d = tmp_path_factory.mktemp("contract")
    prompts = [f"{i * 37 % 1000}+{i * 13 % 100}=" for i in range(N)]
    with torch.no_grad(), torch_threads(1):
        rows = []
        for i, prompt in enumerate(prompts):
            ids = tok(prompt, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.pad_token_id)
            done = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).split("\n")[0]
            right = i % 3 != 1 and done and done == done.strip()
            rows.append({"id": f"add-{i}", "prompt": prompt, "answer": done if right else done + "q"})
    add = _jsonl(d / "add.jsonl", rows)
    choice = _jsonl(d / "choice.jsonl", [
        {"id": f"pick-{i}", "prompt": f"{i}+1=", "options": [str(i + 1), str(i + 2)], "answer": i % 2}
        for i in range(N)
    ])
    text = _jsonl(d / "text.jsonl", [{"id": f"text-{i}", "text": f"{i}{i + 1}{i + 2}+{i}="} for i in range(N)])
    tasks = [
        {"name": "gen", "kind": "generate", "data": {"calibration": add}, "max_new_tokens": MAX_NEW},
        {"name": "pick", "kind": "choice", "data": {"calibration": choice}},
        {"name": "ppl", "kind": "perplexity", "data": {"calibration": text}},
        {"name": "lme", "kind": "lmeval", "task_yaml": str(LMEVAL_YAML), "data": {"calibration": add}},
    ]
    (d / "suite.yaml").write_text(json.dumps({"name": "contract", "tasks": tasks}))
    return d


def _kinds(name: str) -> list[str]:
    return [k for k in KINDS if k in SCORERS.capabilities(name)]


def _suite(data: Path, name: str):
    suite = load_suite(data / "suite.yaml")
    return suite.select([t.name for t in suite.tasks if t.kind in _kinds(name)])


def _score(name: str, model, tok, suite, family, **kw):
    scorer = make_scorer(name, batch_size=4)
    if "state_dict" in SCORERS.capabilities(name):
        scorer.bind(family["base"])
        return scorer.score(model.state_dict(), tok, suite, **kw)
    return scorer.score(model, tok, suite, **kw)


def _ids(task) -> tuple[str, ...]:
    return tuple(ex.id for ex in task.splits["calibration"])


@pytest.mark.parametrize("name", SCORER_PARAMS)
def test_per_example_scores_carry_the_example_ids(name, model, tok, data, family) -> None:
    suite = _suite(data, name)
    assert suite.tasks, f"scorer {name!r} declares none of the kinds {KINDS}"
    out = _score(name, model, tok, suite, family)
    assert tuple(out.tasks) == tuple(suite.names)
    for task in suite.tasks:
        ts = out.tasks[task.name]
        assert ts.example_ids == _ids(task)
        assert ts.scores.shape == (N,) and np.isfinite(ts.scores).all()
    sub = _score(name, model, tok, suite, family, subset=3, seed=1)
    for task in suite.tasks:
        ids = sub.tasks[task.name].example_ids
        assert len(ids) == 3 == len(sub.tasks[task.name].scores) and set(ids) <= set(_ids(task))


@pytest.mark.parametrize("name", SCORER_PARAMS)
def test_scores_repeat_exactly(name, model, tok, data, family) -> None:
    suite = _suite(data, name)
    first, second = (_score(name, model, tok, suite, family) for _ in range(2))
    for task in suite.names:
        assert first.tasks[task].example_ids == second.tasks[task].example_ids
        np.testing.assert_array_equal(first.tasks[task].scores, second.tasks[task].scores)


@pytest.mark.parametrize("name", SCORER_PARAMS)
def test_failures_raise_before_or_instead_of_scores(name, model, tok, data, family) -> None:
    suite = _suite(data, name)
    with pytest.raises(ConfigError, match="subset must be at least 1"):
        _score(name, model, tok, suite, family, subset=0)
    with pytest.raises(ConfigError, match="split"):
        _score(name, model, tok, suite, family, split="test")  # the suite has no test split
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[1].mlp.down_proj.weight[:] = float("nan")
    with pytest.raises(ScoreError, match="non-finite"):
        _score(name, model=bad, tok=tok, suite=suite, family=family)


@pytest.mark.skipif(not _available("lmeval"), reason="lm_eval is not installed")
def test_hf_and_lmeval_agree_per_example_on_generation(model, tok, data, family) -> None:
    suite = load_suite(data / "suite.yaml")
    hf = _score("hf", model, tok, suite.select(["gen"]), family).tasks["gen"]
    lm = _score("lmeval", model, tok, suite.select(["lme"]), family).tasks["lme"]
    assert lm.example_ids == hf.example_ids
    np.testing.assert_array_equal(lm.scores, hf.scores)
    assert 0 < hf.scores.sum() < N  # right and wrong answers mix
