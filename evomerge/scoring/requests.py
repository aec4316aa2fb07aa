"""Request building and result scoring shared by the token-level scorers (hf and vLLM).

Both scorers encode the same inputs the same way, so that a task scored by either gives the same
per-example scores up to numerical noise:

* ``generate``: the task's few-shot prefix (literal text, then ``prompt + answer + separator`` per shot)
  before each prompt, optionally wrapped as one user message with the tokenizer's chat template;
  completions are matched against the reference answers with the task's extraction and metric.
* ``choice``: one ``(context_ids, continuation_ids)`` request per option, the continuation being the
  tokens that ``context + delimiter + option`` adds to ``context``; ``acc`` and ``acc_norm`` (per
  character) from the summed log-likelihoods.
* ``perplexity``: ``([bos], text_ids)`` per example (first token / rest without a BOS), truncated to the
  task's ``max_tokens``.

Text is encoded with the tokenizer's default special tokens, as lm-eval's HF model does.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.scoring.data import Example, reference_answer
from evomerge.scoring.extract import extract_answer, match
from evomerge.scoring.suite import ChoiceTask, GenerateTask, PerplexityTask, Task

__all__ = [
    "PERPLEXITY_METRIC",
    "check_chat_templates",
    "choice_requests",
    "choice_scores",
    "encode",
    "generation_prompts",
    "generation_scores",
    "perplexity_requests",
    "primary_metric",
]

#: The score of a perplexity task (mean token log-likelihood, higher is better).
PERPLEXITY_METRIC = "loglik_per_token"


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with the tokenizer's default special tokens (as lm-eval's HF model does)."""
    return list(tokenizer(text)["input_ids"])


def primary_metric(task: Task) -> str:
    """The per-example metric reported as the task's score (``loglik_per_token`` for perplexity)."""
    return str(task.spec.metric) if hasattr(task.spec, "metric") else PERPLEXITY_METRIC


def check_chat_templates(tasks: Iterable[Task], tokenizer: Any) -> None:
    """:class:`ConfigError` naming the first generate task that asks for a chat template the tokenizer lacks."""
    for t in tasks:
        if (
            isinstance(t.spec, GenerateTask)
            and t.spec.chat_template
            and not getattr(tokenizer, "chat_template", None)
        ):
            raise ConfigError(f"task {t.name!r} asks for chat_template but the tokenizer has none")


def generation_prompts(
    tokenizer: Any, task: Task, spec: GenerateTask, examples: Sequence[Example]
) -> list[list[int]]:
    """Token ids of every example's prompt, with the task's few-shot prefix and chat template."""
    prefix = spec.fewshot_prefix + "".join(s.prompt + spec.delimiter + s.answer + spec.fewshot_separator
                                           for s in task.fewshot)
    prompts = []
    for ex in examples:
        text = prefix + ex.prompt
        if spec.chat_template:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            prompts.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
        else:
            prompts.append(encode(tokenizer, text))
    return prompts


def generation_scores(
    completions: Sequence[str], examples: Sequence[Example], spec: GenerateTask
) -> dict[str, np.ndarray]:
    """``{spec.metric: per-example score}`` of completions (already cut at the stop strings)."""
    pattern = spec.pattern()
    scores = [
        match(
            extract_answer(c, spec.extract, pattern),
            reference_answer(ex, spec),
            spec.metric,
            ignore_case=spec.ignore_case,
            tolerance=spec.tolerance,
        )
        for c, ex in zip(completions, examples, strict=True)
    ]
    return {spec.metric: np.asarray(scores, dtype=np.float64)}


def choice_requests(
    tokenizer: Any, spec: ChoiceTask, examples: Sequence[Example]
) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """One ``(context_ids, continuation_ids)`` per option of every example, and each option's length."""
    reqs: list[tuple[list[int], list[int]]] = []
    lengths: list[int] = []
    for ex in examples:
        context = spec.fewshot_prefix + ex.prompt
        ctx = encode(tokenizer, context)
        for option in ex.options:
            cont = encode(tokenizer, context + spec.delimiter + option)[len(ctx) :]
            if not cont:
                raise ConfigError(f"{ex.source}: option {option!r} encodes to no tokens after the prompt")
            reqs.append((ctx, cont))
            lengths.append(max(1, len(spec.delimiter + option)))
    return reqs, lengths


def choice_scores(
    sums: np.ndarray, lengths: Sequence[int], examples: Sequence[Example]
) -> dict[str, np.ndarray]:
    """``acc`` (highest summed log-likelihood is the label) and ``acc_norm`` (per character) per example."""
    acc, acc_norm, k = [], [], 0
    for ex in examples:
        ll = sums[k : k + len(ex.options)]
        norm = ll / np.asarray(lengths[k : k + len(ex.options)], dtype=np.float64)
        acc.append(float(int(np.argmax(ll)) == ex.label))
        acc_norm.append(float(int(np.argmax(norm)) == ex.label))
        k += len(ex.options)
    return {"acc": np.asarray(acc), "acc_norm": np.asarray(acc_norm)}


def perplexity_requests(
    tokenizer: Any, spec: PerplexityTask, examples: Sequence[Example]
) -> list[tuple[list[int], list[int]]]:
    """``([bos], text_ids)`` per example (or first token / rest without a BOS), truncated to ``max_tokens``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    reqs = []
    for ex in examples:
        ids = encode(tokenizer, ex.prompt)
        if isinstance(bos, int):
            ctx, cont = [bos], ids[1:] if ids and ids[0] == bos else ids
        else:
            ctx, cont = ids[:1], ids[1:]
        cont = cont[: spec.max_tokens] if spec.max_tokens is not None else cont
        if not cont:
            raise ConfigError(f"{ex.source}: text has no token to score")
        reqs.append((ctx, cont))
    return reqs
