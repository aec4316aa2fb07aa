"""Answer extraction and per-example metrics for generated completions (pure string functions).

A generated completion is first cut at the first stop string (:func:`cut_at_stop`), then an answer is
extracted from it (:func:`extract_answer`) and compared with the reference answer (:func:`match`).
The same extraction is applied to the reference answer, so a reference such as ``"#### 72"`` and a
completion ``"... so the answer is 72."`` both reduce to ``"72"`` under ``last_number``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

ExtractMode = Literal["strip", "last_number", "regex"]
AnswerMetric = Literal["exact_match", "numeric"]

#: A signed integer or decimal, optionally with thousands separators (``1,234.5``).
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    end = len(text)
    for stop in stops:
        if stop:
            pos = text.find(stop)
            if 0 <= pos < end:
                end = pos
    return text[:end]


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (commas removed), or ``None`` when there is none."""
    found = NUMBER_RE.findall(text)
    return found[-1].replace(",", "") if found else None


def regex_answer(text: str, pattern: re.Pattern[str]) -> str | None:
    """The first match of ``pattern`` in ``text``: its first capture group if it has one, else the match."""
    m = pattern.search(text)
    if m is None:
        return None
    if pattern.groups:
        group = m.group(1)
        return group.strip() if group is not None else None
    return m.group(0).strip()


def extract_answer(text: str, mode: ExtractMode, pattern: re.Pattern[str] | None = None) -> str | None:
    """Extract the answer from ``text``; ``None`` when the mode finds nothing."""
    if mode == "strip":
        return text.strip()
    if mode == "last_number":
        return last_number(text)
    if pattern is None:
        raise ValueError("extract mode 'regex' needs a compiled pattern")
    return regex_answer(text, pattern)


def parse_number(text: str | None) -> float | None:
    """``text`` as a float (thousands separators and a trailing period allowed), else ``None``."""
    if text is None:
        return None
    cleaned = text.strip().replace(",", "").rstrip(".")
    try:
        value = float(cleaned)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def match(
    pred: str | None,
    ref: str,
    metric: AnswerMetric,
    *,
    ignore_case: bool = False,
    tolerance: float = 0.0,
) -> float:
    """1.0 when the extracted prediction equals the reference under ``metric``, else 0.0.

    ``exact_match`` compares the stripped strings (optionally case-folded); ``numeric`` parses both as
    numbers and compares them with an absolute ``tolerance`` (``0`` means equal values, so ``"7.0"``
    matches ``"7"``). A prediction that could not be extracted or parsed scores 0.
    """
    if pred is None:
        return 0.0
    if metric == "exact_match":
        a, b = pred.strip(), ref.strip()
        if ignore_case:
            a, b = a.casefold(), b.casefold()
        return float(a == b)
    p, r = parse_number(pred), parse_number(ref)
    if p is None or r is None:
        return 0.0
    return float(abs(p - r) <= tolerance)
