"""Scores separate models by skill: experts fine-tuned on one skill score high on it and low elsewhere.

The experts memorize their skill's calibration examples (a second-long fine-tune of a tiny Llama), so
the test checks the scorers' per-task, per-example bookkeeping on models with known behaviour.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.builtin import builtin_dir
from evomerge.scoring import load_suite, make_scorer
from evomerge.scoring.base import torch_threads
from evomerge.testing.tokenizer import build_tokenizer

WORDS = ["abc", "dog", "cat", "zeta", "moon", "sun", "tree", "lake"]
SKILLS = {
    "add": [
        (f"{i * 37 % 900 + 100}+{i * 53 % 90 + 10}=", str(i * 37 % 900 + 100 + i * 53 % 90 + 10))
        for i in range(8)
    ],
    "rev": [(f"rev:{w}=", w[::-1]) for w in WORDS],
    "sort": [(f"sort:{w}=", "".join(sorted(w))) for w in WORDS],
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


def _batch(tok, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [tok(p + a + "\n")["input_ids"] for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tok.pad_token_id)
    labels = torch.full((len(seqs), width), -100)
    for i, (seq, (prompt, _)) in enumerate(zip(seqs, pairs, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        k = len(tok(prompt)["input_ids"])
        labels[i, k : len(seq)] = ids[i, k : len(seq)]
    return ids, labels


def _finetune(base, tok, pairs, steps: int = 150):
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels = _batch(tok, pairs)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    base = LlamaForCausalLM(cfg).eval()
    experts = {name: _finetune(base, tok, pairs) for name, pairs in SKILLS.items()}
    # the shipped zoo suite, pointed at this zoo's data
    root = tmp_path_factory.mktemp("zoo")
    (root / "zoo").mkdir()
    for name, pairs in SKILLS.items():
        for split, rows in (("calibration", pairs), ("test", [(f"x{p}", a) for p, a in pairs[:2]])):
            text = "".join(
                json.dumps({"id": f"{name}-{split}-{i}", "prompt": p, "answer": a}) + "\n"
                for i, (p, a) in enumerate(rows)
            )
            (root / "zoo" / f"{name}.{split}.jsonl").write_text(text)
    (root / "zoo.yaml").write_text((builtin_dir("fitness") / "zoo.yaml").read_text())
    return tok, base, experts, load_suite(root / "zoo.yaml")


def test_each_expert_scores_high_on_its_skill_and_low_on_the_others(zoo) -> None:
    tok, base, experts, suite = zoo
    scorer = make_scorer("hf", batch_size=8)
    assert all(v <= 0.2 for v in scorer.score(base, tok, suite).means().values())
    for name, expert in experts.items():
        means = scorer.score(expert, tok, suite).means()
        assert means[name] >= 0.9, (name, means)
        assert all(v <= 0.2 for skill, v in means.items() if skill != name), (name, means)


def test_per_example_scores_line_up_with_example_ids(zoo) -> None:
    tok, _, experts, suite = zoo
    out = make_scorer("hf", batch_size=3).score(experts["rev"], tok, suite.select(["rev"]), subset=5, seed=7)
    ids = out.tasks["rev"].example_ids
    assert len(ids) == 5 and len(set(ids)) == 5
    for ex_id, score in zip(ids, out.tasks["rev"].scores, strict=True):
        ex = next(e for e in suite.task("rev").examples("calibration") if e.id == ex_id)
        with torch.no_grad():
            ids_in = torch.tensor([tok(ex.prompt)["input_ids"]])
            gen = experts["rev"].generate(
                ids_in, max_new_tokens=len(ex.answer) + 1, do_sample=False, pad_token_id=0
            )
        text = tok.decode(gen[0, ids_in.shape[1] :], skip_special_tokens=True).split("\n")[0]
        assert score == float(text.strip() == ex.answer)
    assert np.mean(out.tasks["rev"].scores) >= 0.8
