"""Stop strings for transformers' ``generate``, whatever the tokenizer.

transformers' ``stop_strings`` match on token ids, from the vocabulary's token strings: fast, but they refuse
a stop string that no token spells (e.g. a newline for a tokenizer without a newline token).
:func:`split_stops` sends those to :class:`StopOnText`, which matches on the decoded completions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import StoppingCriteria, StopStringCriteria

log = logging.getLogger(__name__)

__all__ = ["StopOnText", "StopSplit", "split_stops"]


class StopOnText(StoppingCriteria):
    """Stops each row once its decoded completion (the tokens after ``start``) holds one of ``stops``.

    For the stop strings that transformers' token-level ``stop_strings`` refuse because no token of the
    vocabulary spells them (e.g. a newline for a tokenizer without a newline token): this one decodes the
    completions at every step, so it works whatever the tokenizer, at the cost of a batch decode per step.
    """

    def __init__(self, tokenizer: Any, stops: Sequence[str], start: int) -> None:
        self.tokenizer = tokenizer
        self.stops = tuple(s for s in stops if s)
        self.start = start
        self.done: list[bool] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        if self.done is None:
            self.done = [False] * input_ids.shape[0]
        rows = [i for i, d in enumerate(self.done) if not d]
        texts = self.tokenizer.batch_decode(input_ids[rows, self.start :].tolist(), skip_special_tokens=True)
        for i, text in zip(rows, texts, strict=True):
            self.done[i] = any(s in text for s in self.stops)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)  # type: ignore[return-value]


StopSplit = tuple[tuple[str, ...], tuple[str, ...]]


def split_stops(tokenizer: Any, stops: Sequence[str]) -> StopSplit:
    """``(token_level, text_level)``: the stop strings transformers' ``stop_strings`` can match in the
    tokenizer's vocabulary (fast, on token ids), and those it refuses, left to :class:`StopOnText`."""
    token_level: list[str] = []
    text_level: list[str] = []
    for stop in dict.fromkeys(s for s in stops if s):
        try:
            StopStringCriteria(tokenizer=tokenizer, stop_strings=[stop])
        except ValueError:
            text_level.append(stop)
        else:
            token_level.append(stop)
    if text_level:
        log.debug("stop strings %r are matched on the decoded text (no token spells them)", text_level)
    return tuple(token_level), tuple(text_level)
