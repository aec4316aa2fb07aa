"""The zoo's training loop and greedy evaluation.

Training minimizes next-token loss on completions only, with AdamW, a linear warm-up then cosine decay.
It is deterministic for a given data stream, model and thread count: the loop itself draws no random
numbers (dropout is off in zoo models), and data comes from a caller-owned ``random.Random``.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from evomerge.testing.skills import STOP, Example, Sampler, sample_training

logger = logging.getLogger(__name__)

IGNORE = -100


@dataclass(frozen=True)
class Phase:
    """One training run: ``steps`` AdamW steps of ``batch_size`` pairs drawn from ``mixture``.

    ``mixture`` is a sequence of ``(weight, sampler)``; each training pair comes from one sampler picked
    with probability proportional to its weight. The learning rate warms up linearly over ``warmup`` steps
    and then follows a cosine from ``lr`` down to ``lr * final_lr_ratio``.
    """

    steps: int
    batch_size: int
    lr: float
    mixture: Sequence[tuple[float, Sampler]]
    warmup: int = 0
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.0


def encode_pairs(
    pairs: Sequence[tuple[str, str]], tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``prompt + answer + STOP`` per pair, right-padded; labels cover only ``answer + STOP``."""
    vocab = tokenizer.get_vocab()
    pad = tokenizer.pad_token_id
    seqs, n_prompt = [], []
    for prompt, answer in pairs:
        text = prompt + answer + STOP
        try:
            seqs.append([vocab[ch] for ch in text])
        except KeyError as exc:
            raise ValueError(f"character {exc.args[0]!r} of {text!r} is not in the zoo tokenizer") from None
        n_prompt.append(len(prompt))
    return pad_batch(seqs, n_prompt, pad)


def pad_batch(seqs: Sequence[Sequence[int]], n_prompt: Sequence[int], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded with ``pad`` into ``ids``, and ``labels`` that cover each row past its first
    ``n_prompt`` tokens (the answer), ``IGNORE`` elsewhere."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    for i, (seq, k) in enumerate(zip(seqs, n_prompt, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, k : len(seq)] = ids[i, k : len(seq)]
    return ids, labels


def draw_batch(
    mixture: Sequence[tuple[float, Sampler]], n: int, rng: random.Random, exclude: frozenset[str]
) -> list[tuple[str, str]]:
    """``n`` pairs from ``mixture`` (see :class:`Phase`), skipping prompts in ``exclude``."""
    weights = [w for w, _ in mixture]
    total = sum(weights)
    counts = [0] * len(mixture)
    for _ in range(n):
        u, acc = rng.random() * total, 0.0
        for j, w in enumerate(weights):
            acc += w
            if u < acc or j == len(weights) - 1:
                counts[j] += 1
                break
    pairs: list[tuple[str, str]] = []
    for (_, sampler), c in zip(mixture, counts, strict=True):
        if c:
            pairs.extend(sample_training(sampler, c, rng, exclude))
    return pairs


def _lr_at(step: int, phase: Phase) -> float:
    if step < phase.warmup:
        return phase.lr * (step + 1) / phase.warmup
    span = max(phase.steps - phase.warmup, 1)
    progress = (step - phase.warmup) / span
    ratio = phase.final_lr_ratio + (1 - phase.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return phase.lr * ratio


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    phase: Phase,
    rng: random.Random,
    *,
    exclude: frozenset[str] = frozenset(),
    encode: Callable[
        [Sequence[tuple[str, str]], PreTrainedTokenizerBase], tuple[torch.Tensor, torch.Tensor]
    ] = encode_pairs,
) -> list[float]:
    """Run ``phase`` on ``model`` in place with data from ``rng``; return the loss of every step.

    ``encode`` turns a batch of ``(prompt, answer)`` pairs into ``(input_ids, labels)`` (default: the
    char-level :func:`encode_pairs`).
    """
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=phase.lr, betas=(0.9, 0.98), weight_decay=phase.weight_decay, eps=1e-8
    )
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(phase.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, phase)
        ids, labels = encode(draw_batch(phase.mixture, phase.batch_size, rng, exclude), tokenizer)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0:
            logger.debug("step %d/%d loss %.4f", step + 1, phase.steps, sum(losses[-100:]) / 100)
    model.eval()
    logger.debug("trained %d steps in %.1f s", phase.steps, time.perf_counter() - start)
    return losses


@torch.no_grad()
def exact_match(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    batch_size: int = 200,
) -> list[bool]:
    """Greedy-decode every prompt (left-padded batches); True where the completion is ``answer + STOP``.

    The completion must be exactly the answer's tokens followed by the stop string; generation is cut
    at ``len(answer) + 1`` new tokens, so a missing stop string is a miss. Leaves ``model`` in eval mode.
    """
    stop_id = tokenizer.convert_tokens_to_ids(STOP)
    pad_id = tokenizer.pad_token_id
    model.eval()
    out: list[bool] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in chunk]
        answers = [tokenizer(e.answer, add_special_tokens=False)["input_ids"] for e in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            max_new_tokens=max(len(a) for a in answers) + 1,
            do_sample=False,
            eos_token_id=stop_id,
            pad_token_id=pad_id,
        )[:, width:].tolist()
        out.extend(row[: len(ans) + 1] == [*ans, stop_id] for row, ans in zip(gen, answers, strict=True))
    return out
