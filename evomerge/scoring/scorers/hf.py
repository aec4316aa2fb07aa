"""The default scorer: in-process transformers on the live model (CPU or CUDA).

* ``generate``: batched greedy decoding with the KV cache and left padding (``model.generate`` with
  ``do_sample=False`` and a fresh generation config, so the model's own sampling defaults never apply),
  stopped at the task's stop strings or EOS, and cut at the first stop string. Stop strings are matched
  on token ids by transformers where the vocabulary spells them and on the decoded text otherwise, so they
  work whatever the tokenizer (e.g. a newline with a tokenizer that has no newline token).
* ``choice`` and ``perplexity``: batched log-likelihoods (right padding, one forward pass per batch).
* ``lmeval`` tasks are handed to the lmeval scorer on the same live model.

Batches are formed after sorting by length (less padding); results come back in data order, and the
same inputs give the same scores on the same machine. Everything runs under ``torch.inference_mode``
with the model in eval mode (its previous mode is restored). Non-finite logits raise
:class:`~evomerge.errors.ScoreError`: the first decoding step of every generation batch and every
log-likelihood are checked, which costs one reduction per batch.

``threads`` is torch's intra-op thread count for the duration of a call; it is restored afterwards,
because torch's count is process-wide. ``"auto"`` (the default) uses one thread for a small model on
CPU (see :data:`~evomerge.scoring.base.AUTO_SINGLE_THREAD_PARAMS`: on such models extra threads only
add spin-waiting, ruinous when cores are shared) and otherwise keeps the process setting
(``OMP_NUM_THREADS`` or torch's default); an integer forces that count; ``None`` never touches it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteriaList,
    StopStringCriteria,
)

from evomerge.errors import ConfigError, ScoreError
from evomerge.evaluation import TaskScores
from evomerge.scoring.base import ScoreOutput, Threads, plan, resolve_threads, torch_threads
from evomerge.scoring.data import Example
from evomerge.scoring.extract import cut_at_stop
from evomerge.scoring.requests import (
    PERPLEXITY_METRIC,
    check_chat_templates,
    choice_requests,
    choice_scores,
    generation_prompts,
    generation_scores,
    perplexity_requests,
    primary_metric,
)
from evomerge.scoring.scorers.stopping import StopOnText, StopSplit, split_stops
from evomerge.scoring.suite import ChoiceTask, GenerateTask, PerplexityTask, Subset, Suite, Task

log = logging.getLogger(__name__)

KINDS = ("generate", "choice", "perplexity", "lmeval")


class _FiniteFirstStep(LogitsProcessor):
    """Raises :class:`ScoreError` if the first decoding step's logits are not all finite."""

    def __init__(self) -> None:
        self.checked = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.checked:
            self.checked = True
            if not bool(torch.isfinite(scores).all()):
                raise ScoreError("the model produced non-finite logits (NaN/inf) while generating")
        return scores


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any, model: torch.nn.Module) -> int:
    for value in (
        tokenizer.pad_token_id,
        tokenizer.eos_token_id,
        getattr(model.config, "pad_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return 0


def _max_length(model: torch.nn.Module, override: int | None) -> int:
    if override is not None:
        return override
    value = getattr(model.config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) else 2048


_STOP_CRITERIA: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], StopStringCriteria]] = (
    weakref.WeakKeyDictionary()
)


def stop_criteria(tokenizer: Any, stops: Sequence[str]) -> StopStringCriteria:
    """The stop-string criterion of ``tokenizer`` and ``stops``, built once per tokenizer.

    transformers caches this criterion under the tokenizer's vocabulary *in ``get_vocab()`` order*, which a
    fast (Rust) tokenizer returns in a different order on every call: the cache never hits, and rebuilding
    the criterion for a 49k-token BPE vocabulary costs ~1.4 s per ``generate`` call on a CPU.
    """
    per_tokenizer = _STOP_CRITERIA.setdefault(tokenizer, {})
    key = tuple(stops)
    if key not in per_tokenizer:
        per_tokenizer[key] = StopStringCriteria(tokenizer, list(key))
    return per_tokenizer[key]


def _batches(order: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), size):
        yield list(order[start : start + size])


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    stops: Sequence[str],
    batch_size: int,
    max_length: int,
    check_finite: bool = True,
    stop_split: StopSplit | None = None,
) -> list[str]:
    """Greedy completions of token-id ``prompts`` (left-truncated to fit), each cut at the first stop.

    Generation stops at a stop string (matched on token ids where the vocabulary spells it, by a criterion
    built once per tokenizer (:func:`stop_criteria`); on the decoded text otherwise: ``stop_split``, default
    :func:`split_stops`) or EOS; the decoded completion is then cut at the first stop string, so the result
    is the same either way.
    """
    token_stops, text_stops = stop_split if stop_split is not None else split_stops(tokenizer, stops)
    device, pad = _device(model), _pad_id(tokenizer, model)
    eos = (
        model.generation_config.eos_token_id
        if model.generation_config.eos_token_id is not None
        else (tokenizer.eos_token_id)
    )
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=eos,
        use_cache=True,
    )
    room = max_length - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {max_length} tokens"
        )
    if any(len(p) > room for p in prompts):
        log.warning("some prompts are longer than %d tokens; they are truncated from the left", room)
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out: list[str] = [""] * len(prompts)
    for idx in _batches(order, batch_size):
        rows = [prompts[i][-room:] for i in idx]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[j, width - len(r) :] = 1
        procs = LogitsProcessorList([_FiniteFirstStep()] if check_finite else [])
        criteria = StoppingCriteriaList(
            ([stop_criteria(tokenizer, token_stops)] if token_stops else [])
            + ([StopOnText(tokenizer, text_stops, width)] if text_stops else [])
        )
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=procs,
            stopping_criteria=criteria,
        )
        texts = tokenizer.batch_decode(gen[:, width:].tolist(), skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            out[i] = cut_at_stop(text, stops)
    return out


def loglikelihoods(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int,
    max_length: int,
    pad_id: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Summed log-probability of each continuation given its context, and its token count.

    A request is ``(context_ids, continuation_ids)``; inputs longer than ``max_length`` lose tokens from
    the left. Non-finite results raise :class:`ScoreError`.
    """
    device = _device(model)
    sums = np.zeros(len(requests), dtype=np.float64)
    counts = np.zeros(len(requests), dtype=np.int64)
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])), i))
    for idx in _batches(order, batch_size):
        rows = []
        for i in idx:
            ctx, cont = requests[i]
            full = (ctx + cont)[-(max_length + 1) :]
            rows.append((full[:-1], full[1:], min(len(cont), len(full) - 1)))
        width = max(len(r[0]) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, (inp, _, _) in enumerate(rows):
            ids[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[j, : len(inp)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        values = []
        for j, (inp, tgt, n) in enumerate(rows):
            part = torch.log_softmax(logits[j, len(inp) - n : len(inp)].float(), dim=-1)
            target = torch.tensor(tgt[-n:], dtype=torch.long, device=part.device)
            values.append(part.gather(-1, target[:, None]).sum())
        batch = torch.stack(values).cpu().numpy()
        if not np.isfinite(batch).all():
            raise ScoreError("the model produced non-finite log-likelihoods (NaN/inf logits)")
        sums[idx] = batch
        counts[idx] = [r[2] for r in rows]
    return sums, counts


class HfScorer:
    """In-process transformers scorer (``SCORERS["hf"]``); see the module docstring.

    Options: ``batch_size`` (sequences per forward pass), ``threads`` (see the module docstring),
    ``max_length`` (token window; default the model's ``max_position_embeddings``), ``check_finite``
    (the first-step logit check while generating; log-likelihoods are always checked) and
    ``lmeval_options`` (for the lmeval scorer that runs the suite's ``lmeval`` tasks).
    """

    name = "hf"

    def __init__(
        self,
        *,
        batch_size: int = 32,
        threads: Threads = "auto",
        max_length: int | None = None,
        check_finite: bool = True,
        lmeval_options: dict[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.threads = threads
        self.max_length = max_length
        self.check_finite = check_finite
        self.lmeval_options = dict(lmeval_options or {})
        self._lmeval: Any = None
        # per tokenizer and stop strings: which ones transformers matches on token ids (see split_stops)
        self._stop_splits: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], StopSplit]] = (
            weakref.WeakKeyDictionary()
        )

    def score(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        suite: Suite,
        *,
        split: str = "calibration",
        subset: Subset = None,
        seed: int = 0,
    ) -> ScoreOutput:
        work = plan(suite, split, subset, seed, kinds=KINDS, scorer=self.name)
        delegated = [t.name for t, _ in work if t.kind == "lmeval"]
        if delegated:
            from evomerge.scoring.scorers import lmeval

            lmeval.require()
        check_chat_templates((t for t, _ in work), tokenizer)
        start = time.perf_counter()
        tasks: dict[str, TaskScores] = {}
        metrics: dict[str, dict[str, float]] = {}
        timings: dict[str, float] = {}
        with torch_threads(resolve_threads(self.threads, model)), _eval_mode(model), torch.inference_mode():
            for task, examples in work:
                if task.kind == "lmeval":
                    continue
                t0 = time.perf_counter()
                per_metric = self._score_task(model, tokenizer, task, examples)
                primary = primary_metric(task)
                tasks[task.name] = TaskScores(tuple(ex.id for ex in examples), per_metric[primary], primary)
                metrics[task.name] = {k: float(v.mean()) for k, v in per_metric.items()}
                timings[f"task/{task.name}"] = time.perf_counter() - t0
                log.debug(
                    "task %s: %d examples, %s %.4f, %.2fs",
                    task.name,
                    len(examples),
                    primary,
                    tasks[task.name].mean,
                    timings[f"task/{task.name}"],
                )
        if delegated:
            from evomerge.scoring.scorers.lmeval import LmevalScorer

            if self._lmeval is None:
                opts = {"batch_size": self.batch_size, "threads": self.threads, **self.lmeval_options}
                self._lmeval = LmevalScorer(**opts)
            sub = self._lmeval.score(
                model, tokenizer, suite.select(delegated), split=split, subset=subset, seed=seed
            )
            tasks.update(sub.tasks)
            metrics.update(sub.metrics)
            timings.update({k: v for k, v in sub.timings.items() if k != "total"})
        order = suite.names
        timings["total"] = time.perf_counter() - start
        return ScoreOutput(
            tasks={n: tasks[n] for n in order},
            split=split,
            timings=timings,
            metrics={n: metrics[n] for n in order},
        )

    def _score_task(
        self, model: torch.nn.Module, tokenizer: Any, task: Task, examples: tuple[Example, ...]
    ) -> dict[str, np.ndarray]:
        spec, max_len, pad = task.spec, _max_length(model, self.max_length), _pad_id(tokenizer, model)
        if isinstance(spec, GenerateTask):
            return self._generate_task(model, tokenizer, task, spec, examples, max_len)
        if isinstance(spec, ChoiceTask):
            reqs, lengths = choice_requests(tokenizer, spec, examples)
            sums, _ = loglikelihoods(model, reqs, batch_size=self.batch_size, max_length=max_len, pad_id=pad)
            return choice_scores(sums, lengths, examples)
        assert isinstance(spec, PerplexityTask)
        reqs = perplexity_requests(tokenizer, spec, examples)
        sums, counts = loglikelihoods(model, reqs, batch_size=self.batch_size, max_length=max_len, pad_id=pad)
        return {PERPLEXITY_METRIC: sums / counts}

    def _generate_task(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        task: Task,
        spec: GenerateTask,
        examples: tuple[Example, ...],
        max_len: int,
    ) -> dict[str, np.ndarray]:
        prompts = generation_prompts(tokenizer, task, spec, examples)
        splits = self._stop_splits.setdefault(tokenizer, {})
        if spec.stop not in splits:
            splits[spec.stop] = split_stops(tokenizer, spec.stop)
        completions = generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=spec.max_new_tokens,
            stops=spec.stop,
            batch_size=self.batch_size,
            max_length=max_len,
            check_finite=self.check_finite,
            stop_split=splits[spec.stop],
        )
        return generation_scores(completions, examples, spec)
