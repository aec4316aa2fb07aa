"""What an AdaMerging fit reads and minimizes: each calibration task's token ids (prompts, and with the
``likelihood`` objective the reference answers), the live model's greedy continuations (``entropy``), and the
summed per-position loss of a batch under merged parameters (:mod:`evomerge.driver.adamerging`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.errors import ConfigError

__all__ = ["FitTask", "calibration_inputs", "continue_greedily", "cut", "loss_batch"]


@dataclass
class FitTask:
    name: str
    kind: str  # generate | perplexity
    prompts: list[list[int]]
    max_new_tokens: int = 0
    stops: tuple[str, ...] = ()
    continuations: list[list[int]] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)  # reference answer ids (objective likelihood)


def calibration_inputs(suite: Any, tokenizer: Any, answers: bool = False) -> list[FitTask]:
    """Token ids of every calibration input; with ``answers``, also each generate example's reference answer and
    the task's first stop string, encoded on their own (the tokens a completion after the prompt ids is)."""
    from evomerge.scoring.requests import check_chat_templates, encode, generation_prompts
    from evomerge.scoring.suite import GenerateTask, PerplexityTask

    check_chat_templates(suite.tasks, tokenizer)
    out = []
    for task in suite.tasks:
        spec = task.spec
        examples = task.examples("calibration")
        if isinstance(spec, GenerateTask):
            t = FitTask(task.name, "generate", generation_prompts(tokenizer, task, spec, examples),
                      spec.max_new_tokens, tuple(spec.stop))
            if answers:
                end = spec.stop[0] if spec.stop else ""
                t.answers = [list(tokenizer(spec.delimiter + ex.answer + end, add_special_tokens=False)
                                  ["input_ids"])
                             for ex in examples]
                eos = tokenizer.eos_token_id
                if not end and eos is not None:  # no stop string: the completion ends at EOS
                    t.answers = [a + [eos] for a in t.answers]
                empty = next((ex for ex, a in zip(examples, t.answers, strict=True) if not a), None)
                if empty is not None:
                    raise ConfigError(f"{empty.source}: the reference answer encodes to no tokens")
            out.append(t)
        elif isinstance(spec, PerplexityTask):
            texts = [encode(tokenizer, ex.prompt)[: (spec.max_tokens or 10**9) + 1] for ex in examples]
            out.append(FitTask(task.name, "perplexity", [t for t in texts if len(t) >= 2]))
        else:
            raise ConfigError(f"fitness.suite: task {task.name!r} is a {task.kind} task; adamerging fits on generate "
                              "and perplexity tasks (select others out with fitness.tasks)")
    return out


def cut(tokenizer: Any, ids: list[int], stops: Sequence[str], eos: set[int]) -> list[int]:
    """``ids`` up to and including the first EOS or the token that completes the first stop string."""
    for k in range(1, len(ids) + 1):
        if ids[k - 1] in eos:
            return ids[:k]
        if stops and any(s in tokenizer.decode(ids[:k], skip_special_tokens=True) for s in stops):
            return ids[:k]
    return ids


@torch.no_grad()
def continue_greedily(model: Any, tokenizer: Any, task: FitTask, idx: Sequence[int], batch_size: int) -> None:
    """Fill ``task.continuations[i]`` for ``i in idx`` with the live model's greedy continuation."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id if eos_id is not None else tokenizer.eos_token_id
    eos = set(eos_id if isinstance(eos_id, list) else [] if eos_id is None else [eos_id])
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=task.max_new_tokens, pad_token_id=pad,
                              eos_token_id=eos_id, use_cache=True)
    idx = list(idx)
    for s in range(0, len(idx), batch_size):
        part = idx[s:s + batch_size]
        rows = [task.prompts[i] for i in part]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, width - len(r):] = torch.tensor(r)
            mask[j, width - len(r):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for j, i in enumerate(part):
            task.continuations[i] = cut(tokenizer, gen[j, width:].tolist(), task.stops, eos) or [pad]


def loss_batch(model: Any, params: dict[str, torch.Tensor], seqs: list[list[int]], starts: list[int],
                pad: int, objective: str = "entropy") -> torch.Tensor:
    """Summed next-token entropy (or negative log-likelihood of the next token, ``likelihood``) over the
    positions ``starts[j]-1 .. len-2`` of each sequence (right padded)."""
    from torch.func import functional_call

    device = next(iter(params.values())).device
    width = max(map(len, seqs)) - 1
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    pick = torch.zeros((len(seqs), width), dtype=torch.bool)
    for j, (s, a) in enumerate(zip(seqs, starts, strict=True)):
        ids[j, :len(s) - 1] = torch.tensor(s[:-1])
        mask[j, :len(s) - 1] = 1
        pick[j, a - 1:len(s) - 1] = True
    logits = functional_call(model, params, args=(), kwargs={"input_ids": ids.to(device),
                                                             "attention_mask": mask.to(device)}).logits
    logp = torch.log_softmax(logits[pick.to(device)].float(), dim=-1)
    if objective == "likelihood":
        target = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            target[j, :len(s) - 1] = torch.tensor(s[1:])
        return -logp.gather(1, target[pick].to(device)[:, None]).sum()
    return -(logp.exp() * logp).sum()
