"""The hf scorer on a tiny random Llama, checked against plain unbatched reference computations."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.errors import ConfigError, ScoreError
from evomerge.scoring import SCORERS, Suite, load_suite, make_scorer
from evomerge.scoring.base import resolve_threads, torch_threads
from evomerge.scoring.extract import cut_at_stop
from evomerge.scoring.scorers.hf import generate, loglikelihoods
from evomerge.scoring.scorers.stopping import StopOnText, split_stops
from evomerge.testing.tokenizer import ALPHABET, build_tokenizer

PROMPTS = [f"{i * 37 % 1000}+{i * 11 % 97}=" for i in range(14)]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The reference computations below run one tiny matrix product at a time: one thread is fastest."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
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
def greedy(model, tok, text: str, n: int, stop: str = "\n") -> str:
    """Unbatched, cache-free greedy decoding: the reference the scorer must agree with."""
    ids = list(tok(text)["input_ids"])
    new: list[int] = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
        new.append(nxt)
        if stop in tok.decode(new, skip_special_tokens=True):
            break
    return tok.decode(new, skip_special_tokens=True).split(stop)[0]


@torch.no_grad()
def cont_logprob(model, tok, ctx: str, cont: str) -> float:
    c, full = tok(ctx)["input_ids"], tok(ctx + cont)["input_ids"]
    logp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    return float(sum(logp[i - 1, full[i]] for i in range(len(c), len(full))))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path.name


def _gen_rows(model, tok, prefix: str = "", template=None) -> tuple[list[dict], list[float]]:
    """Rows whose answers are right (even index) or wrong (odd) per the reference decoder."""
    rows, expected = [], []
    for i, p in enumerate(PROMPTS):
        text = template(prefix + p) if template else prefix + p
        ref = greedy(model, tok, text, 6).strip()
        rows.append({"id": f"g{i}", "prompt": p, "answer": ref if i % 2 == 0 else ref + "q"})
        expected.append(1.0 if i % 2 == 0 else 0.0)
    return rows, expected


@pytest.fixture(scope="module")
def suite(model, tok, tmp_path_factory) -> tuple[Suite, dict[str, list[float]]]:
    d = tmp_path_factory.mktemp("suite")
    gen, gen_expected = _gen_rows(model, tok)
    choice, acc, acc_norm = [], [], []
    for i, p in enumerate(PROMPTS):
        options = ["1", "23", "456", "7"]
        ll = np.array([cont_logprob(model, tok, p, o) for o in options])
        label = int(np.argmax(ll)) if i % 3 else (int(np.argmax(ll)) + 1) % 4
        choice.append({"id": f"c{i}", "prompt": p, "options": options, "answer": label})
        acc.append(float(np.argmax(ll) == label))
        acc_norm.append(float(np.argmax(ll / np.array([len(o) for o in options])) == label))
    texts = [{"id": f"p{i}", "text": p + str(i * 7)} for i, p in enumerate(PROMPTS)]
    ppl = []
    with torch.no_grad():
        for row in texts:
            ids = torch.tensor([[tok.bos_token_id, *tok(row["text"])["input_ids"]]])
            ppl.append(-float(model(ids, labels=ids).loss))
    config = {
        "name": "mixed",
        "tasks": [
            {
                "name": "gen",
                "kind": "generate",
                "data": {"calibration": _jsonl(d / "g.jsonl", gen)},
                "max_new_tokens": 6,
            },
            {
                "name": "choice",
                "kind": "choice",
                "metric": "acc",
                "data": {"calibration": _jsonl(d / "c.jsonl", choice)},
            },
            {"name": "ppl", "kind": "perplexity", "data": {"calibration": _jsonl(d / "p.jsonl", texts)}},
        ],
    }
    (d / "mixed.yaml").write_text(json.dumps(config))
    expected = {"gen": gen_expected, "choice": acc, "choice_norm": acc_norm, "ppl": ppl}
    return load_suite(d / "mixed.yaml"), expected


def test_scores_match_unbatched_reference_computations(model, tok, suite) -> None:
    s, expected = suite
    out = make_scorer("hf", batch_size=5).score(model, tok, s)
    assert list(out.tasks) == ["gen", "choice", "ppl"]
    assert out.tasks["gen"].example_ids == tuple(f"g{i}" for i in range(len(PROMPTS)))
    np.testing.assert_array_equal(out.tasks["gen"].scores, expected["gen"])
    np.testing.assert_array_equal(out.tasks["choice"].scores, expected["choice"])
    assert out.metrics["choice"]["acc_norm"] == pytest.approx(np.mean(expected["choice_norm"]))
    np.testing.assert_allclose(out.tasks["ppl"].scores, expected["ppl"], rtol=1e-5)
    assert out.tasks["gen"].metric == "exact_match" and out.tasks["ppl"].metric == "loglik_per_token"
    assert out.timings["total"] >= out.timings["task/gen"] > 0
    assert out.n_examples == 3 * len(PROMPTS)
    result = out.to_eval_result(7, worker="w0", timings={"merge": 0.5})
    assert result.ok and result.candidate_id == 7 and result.tasks == out.tasks
    assert result.timings["merge"] == 0.5 and result.timings["score"] == out.timings["total"]


def test_scores_are_identical_across_runs_and_agree_across_batch_sizes(model, tok, suite) -> None:
    s, _ = suite
    a = make_scorer("hf", batch_size=4).score(model, tok, s)
    b = make_scorer("hf", batch_size=4).score(model, tok, s)
    one = make_scorer("hf", batch_size=1).score(model, tok, s)
    for name in a.tasks:
        np.testing.assert_array_equal(a.tasks[name].scores, b.tasks[name].scores)
        np.testing.assert_allclose(a.tasks[name].scores, one.tasks[name].scores, rtol=1e-5, atol=1e-6)


def test_loglikelihoods_do_not_depend_on_batching(model, tok) -> None:
    reqs = [(tok(p)["input_ids"], tok(str(i) * (1 + i % 3))["input_ids"]) for i, p in enumerate(PROMPTS)]
    with torch.inference_mode():
        s1, n1 = loglikelihoods(model, reqs, batch_size=1, max_length=64, pad_id=0)
        s8, n8 = loglikelihoods(model, reqs, batch_size=8, max_length=64, pad_id=0)
    np.testing.assert_allclose(s1, s8, rtol=1e-5)
    assert n1.tolist() == n8.tolist() == [len(c) for _, c in reqs]
    assert s1[2] == pytest.approx(cont_logprob(model, tok, PROMPTS[2], "222"), rel=1e-5)


def test_stop_strings_work_on_the_decoded_text_whatever_the_tokenizer(model) -> None:
    # no newline token, so transformers' token-level stop strings refuse the default stop "\n"
    no_nl = build_tokenizer(ALPHABET.replace("\n", ""))
    prompts = [list(no_nl(p)["input_ids"]) for p in PROMPTS[:6]]
    kw = {"max_new_tokens": 8, "batch_size": 3, "max_length": 64}
    free = generate(model, no_nl, prompts, stops=[], **kw)
    assert generate(model, no_nl, prompts, stops=["\n"], **kw) == free
    spelled = next(t for t in free if len(t) >= 4)
    stops = ["\n", spelled[1:3]]  # the second spans two tokens: matched on token ids
    assert split_stops(no_nl, stops) == ((spelled[1:3],), ("\n",))
    assert generate(model, no_nl, prompts, stops=stops, **kw) == [cut_at_stop(t, stops) for t in free]
    text_only = generate(model, no_nl, prompts, stops=stops, stop_split=((), tuple(stops)), **kw)
    assert text_only == [cut_at_stop(t, stops) for t in free]
    # each row stops as soon as its decoded completion holds a stop string, and stays stopped
    crit = StopOnText(no_nl, ["tz"], start=2)
    rows = [[5, 6, *no_nl.convert_tokens_to_ids(list(text))] for text in (">k>tz", ">k>tt", "tz>kk")]
    scores = torch.zeros(3, len(no_nl))
    assert crit(torch.tensor(rows), scores).tolist() == [True, False, True]
    rows = [[*r, no_nl.convert_tokens_to_ids("t")] for r in rows]
    assert crit(torch.tensor(rows), scores).tolist() == [True, False, True]
    assert StopOnText(no_nl, ["tz"], start=4)(torch.tensor(rows[2:]), scores[2:]).tolist() == [False]


def test_subset_scores_the_same_examples_each_time(model, tok, suite) -> None:
    s, _ = suite
    scorer = make_scorer("hf", batch_size=8)
    a = scorer.score(model, tok, s, subset=5, seed=1)
    full = scorer.score(model, tok, s)
    assert (
        a.tasks["gen"].example_ids == scorer.score(model, tok, s, subset=5, seed=1).tasks["gen"].example_ids
    )
    assert len(a.tasks["gen"].example_ids) == 5
    index = {e: i for i, e in enumerate(full.tasks["ppl"].example_ids)}
    picked = [index[e] for e in a.tasks["ppl"].example_ids]
    np.testing.assert_allclose(a.tasks["ppl"].scores, full.tasks["ppl"].scores[picked], rtol=1e-5)


def test_nan_model_raises_score_error(model, tok, suite) -> None:
    s, _ = suite
    bad = copy.deepcopy(model)
    with torch.no_grad():
        bad.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    scorer = make_scorer("hf", batch_size=4)
    for name in ("gen", "choice", "ppl"):
        with pytest.raises(ScoreError, match="non-finite"):
            scorer.score(bad, tok, s.select([name]))


def test_threads_and_training_mode_are_restored(model, tok, suite) -> None:
    s, _ = suite
    assert resolve_threads("auto", model) == 1  # a tiny model on CPU runs single-threaded
    assert resolve_threads(None, model) is None and resolve_threads(3, model) == 3
    model.train()
    try:
        with torch_threads(2):
            make_scorer("hf", threads=1).score(model, tok, s.select(["ppl"]), subset=2)
            assert model.training
            assert torch.get_num_threads() == 2
    finally:
        model.eval()


def test_fewshot_and_chat_template_shape_the_prompt(model, tok, tmp_path: Path) -> None:
    shots = [{"id": "s0", "prompt": "5+5=", "answer": "10"}, {"id": "s1", "prompt": "6+1=", "answer": "7"}]
    prefix = "5+5=10\n6+1=7\n"
    rows, expected = _gen_rows(model, tok, prefix=prefix)
    config = {
        "name": "f",
        "tasks": [
            {
                "name": "gen",
                "kind": "generate",
                "data": {"calibration": _jsonl(tmp_path / "g.jsonl", rows)},
                "fewshot_file": _jsonl(tmp_path / "shots.jsonl", shots),
                "num_fewshot": 2,
                "max_new_tokens": 6,
            }
        ],
    }
    (tmp_path / "f.yaml").write_text(json.dumps(config))
    out = make_scorer("hf").score(model, tok, load_suite(tmp_path / "f.yaml"))
    np.testing.assert_array_equal(out.tasks["gen"].scores, expected)

    chat_tok = copy.deepcopy(tok)
    rows, expected = _gen_rows(model, tok, template=lambda t: f"|{t}>")
    config = {
        "name": "c",
        "tasks": [
            {
                "name": "gen",
                "kind": "generate",
                "data": {"calibration": _jsonl(tmp_path / "c.jsonl", rows)},
                "chat_template": True,
                "max_new_tokens": 6,
            }
        ],
    }
    (tmp_path / "c.yaml").write_text(json.dumps(config))
    chat_suite = load_suite(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="chat_template"):
        make_scorer("hf").score(model, chat_tok, chat_suite)
    chat_tok.chat_template = "{% for m in messages %}|{{ m['content'] }}>{% endfor %}"
    out = make_scorer("hf").score(model, chat_tok, chat_suite)
    np.testing.assert_array_equal(out.tasks["gen"].scores, expected)


def test_registry_declares_capabilities() -> None:
    assert {"hf", "lmeval"} <= set(SCORERS.names(having=["needs_module"]))
    assert "hf" in SCORERS.names(having=["generate", "choice", "perplexity"])
    assert "hf" not in SCORERS.names(having=["state_dict"])
    with pytest.raises(ConfigError, match="valid names: .*hf, lmeval"):
        SCORERS.get("nope")
    with pytest.raises(ConfigError, match="batch_size"):
        make_scorer("hf", batch_size=0)
