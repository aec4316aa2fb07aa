"""hf and lmeval scorers on the real model (the ``real-test`` cut of SmolLM2-135M, its BPE tokenizer): the same
per-example scores on the real zoo's generate, multiple-choice and perplexity tasks (``real_agreement`` in
conftest). The vllm scorer's side of the same comparison is in test_scoring_vllm.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.scoring import load_suite, make_scorer
from evomerge.scoring.base import plan
from evomerge.scoring.requests import choice_requests, perplexity_requests
from evomerge.scoring.scorers import hf as hf_module

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("isolated_hf")

GENERATE = ("add", "order", "unit")


@pytest.fixture(scope="module")
def scored(real_zoo_test: Any, real_agreement: dict[str, Any]) -> dict[str, Any]:
    """Both scorers' outputs on the real-test base, with the summed log-likelihoods behind capital and text."""
    from evomerge.scoring.scorers.lmeval import LmevalScorer

    class Capturing(LmevalScorer):
        """Keeps lm-eval's logged samples per task, for the options' log-likelihoods."""

        logged: dict[str, list[dict[str, Any]]] = {}

        def _collect(self, task, examples, logged, lm_task):  # type: ignore[no-untyped-def]
            self.logged[task.name] = logged
            return super()._collect(task, examples, logged, lm_task)

    folder = real_zoo_test.path("base")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    suite, lm_suite = load_suite(real_agreement["suite"]), load_suite(real_agreement["lmeval_suite"])
    hf = make_scorer("hf", batch_size=8).score(model, tok, suite)
    lm_scorer = Capturing(batch_size=8)
    lm = lm_scorer.score(model, tok, lm_suite)
    lm_scorer.close()
    work = plan(suite, "calibration", None, 0, kinds=("generate", "choice", "perplexity"), scorer="test")
    by_name = {t.name: (t, exs) for t, exs in work}
    capital, text = by_name["capital"], by_name["text"]
    reqs = {"capital": choice_requests(tok, capital[0].spec, capital[1])[0],
            "text": perplexity_requests(tok, text[0].spec, text[1])}
    with torch.inference_mode():
        sums = {name: hf_module.loglikelihoods(model, r, batch_size=8, max_length=hf_module._max_length(model, None),
                                               pad_id=hf_module._pad_id(tok, model))[0]
                for name, r in reqs.items()}
    return {"hf": hf, "lm": lm, "logged": lm_scorer.logged, "sums": sums, "reqs": reqs, "tok": tok}


def _lm_logliks(logged: list[dict[str, Any]]) -> np.ndarray:
    rows = sorted(logged, key=lambda s: s["doc_id"])
    return np.asarray([float(resp[0][0]) for s in rows for resp in s["resps"]])


def test_greedy_answers_after_the_space_agree_per_example(scored) -> None:
    for task in GENERATE:
        hf, lm = scored["hf"].tasks[task], scored["lm"].tasks[task]
        assert lm.example_ids == hf.example_ids, task
        np.testing.assert_array_equal(lm.scores, hf.scores, err_msg=task)
        # two answers in three are the model's own completion, the rest are wrong
        assert hf.scores.sum() >= 4 and hf.scores.sum() < len(hf.scores), (task, hf.scores)


def test_multiple_choice_agrees_per_example_and_per_option(scored) -> None:
    hf, lm = scored["hf"].tasks["capital"], scored["lm"].tasks["capital"]
    assert lm.example_ids == hf.example_ids and len(hf.scores) == 15
    np.testing.assert_array_equal(lm.scores, hf.scores)
    ours, theirs = scored["sums"]["capital"], _lm_logliks(scored["logged"]["capital"])
    assert ours.shape == theirs.shape == (60,)
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the options' continuations start with the delimiter's space: " Paris" is one BPE token, not " " + "Paris"
    tok = scored["tok"]
    assert scored["reqs"]["capital"][0][1] == tok(" Paris", add_special_tokens=False)["input_ids"]


def test_text_log_likelihood_agrees_per_example(scored) -> None:
    hf, lm = scored["hf"].tasks["text"], scored["lm"].tasks["text"]
    assert lm.example_ids == hf.example_ids and len(hf.scores) == 15
    counts = np.asarray([len(cont) for _, cont in scored["reqs"]["text"]], dtype=np.float64)
    # lm-eval logs each text's summed log-likelihood; evomerge's perplexity task divides it by the tokens
    np.testing.assert_allclose(lm.scores, scored["sums"]["text"], atol=1e-3, rtol=0)
    np.testing.assert_allclose(lm.scores / counts, hf.scores, atol=1e-4, rtol=0)
    assert np.all(hf.scores < 0) and np.ptp(hf.scores) > 0.1
