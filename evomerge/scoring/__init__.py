"""Fitness: task suites (``fitness/*.yaml``) and the scorers that turn a live model into per-example scores.

>>> suite = load_suite("builtin:zoo")
>>> out = make_scorer("hf", batch_size=32).score(model, tokenizer, suite, subset=64, seed=0)
>>> out.tasks["add"].scores        # one score per example, higher is better
"""

from __future__ import annotations

from evomerge.scoring.base import (
    SCORERS,
    ScoreOutput,
    Scorer,
    make_scorer,
)
from evomerge.scoring.suite import (
    Example,
    Suite,
    SuiteConfig,
    Task,
    build_suite,
    load_suite,
    parse_suite_config,
    pick_examples,
    subset_examples,
)

__all__ = [
    "SCORERS",
    "Example",
    "ScoreOutput",
    "Scorer",
    "Suite",
    "SuiteConfig",
    "Task",
    "build_suite",
    "load_suite",
    "make_scorer",
    "parse_suite_config",
    "pick_examples",
    "subset_examples",
]
