"""Language-formatted skills for the real zoo (:mod:`evomerge.testing.real`), and their shipped data.

Each skill is a question in plain English that ends in ``"Answer:"``; the expected completion is a space,
the answer, then the stop string ``"\\n"`` (so a BPE tokenizer sees the answer as it sees any word after a
space). The base (SmolLM2-135M-Instruct, prompted without its chat template) answers none of them in this
format; a short fine-tune teaches each one.

======  ==============================================================  ========================
skill   prompt                                                          answer
======  ==============================================================  ========================
add     ``What is 23 + 45? Answer:``                                    ``68``
order   ``Reverse the order of these words: lamp river green. Answer:``  ``green river lamp``
unit    ``How many grams are in 37 kilograms? Answer:``                 ``37000``
======  ==============================================================  ========================

Evaluation splits are drawn with a fixed seed (independent of any zoo seed) using only
``random.Random.random()``, so the shipped files in ``fitness/real/`` are regenerated exactly by
:func:`write_eval_data`; training data never contains a prompt of either split.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import TaskDataError
from evomerge.testing.skills import Example, Sampler, _randint, draw_splits

#: The stop string that ends every completion; answers follow the prompt after one space.
STOP = "\n"
SEPARATOR = " "
#: Examples per evaluation split (calibration is what a search optimizes on, test is held out).
SPLIT_SIZES = {"calibration": 60, "test": 120}
_SPLIT_TAGS = {"calibration": "cal", "test": "test"}
EVAL_SEED = 20261201

#: Short common English words for the word-order skill (distinct, lowercase, one BPE word each or close).
WORDS: tuple[str, ...] = tuple(
    """
    apple river green lamp stone cloud happy table window garden silver orange yellow purple winter summer
    forest bread chair music paper water fire snow rain wind night light dark bright quiet small large
    house horse mouse bird fish tree flower grass field road city town street bridge boat ship train car
    bike door wall floor roof glass plate spoon knife fork cup milk honey sugar salt lemon grape peach
    cherry carrot potato tomato onion garlic pepper butter cheese cream coffee tea juice soup rice bean
    corn wheat sheep goat cow pig duck hen wolf bear fox deer lion tiger zebra whale shark crab frog snake
    king queen baby child friend doctor teacher farmer pilot artist singer dancer writer painter sailor
    red blue black white brown pink gold soft hard warm cold fast slow young old new loud sweet bitter
    book pen desk bag coat shoe hat shirt sock ring watch clock phone radio camera map key box
    """.split()
)

#: (from unit, to unit, factor) of the unit-conversion skill.
UNITS: tuple[tuple[str, str, int], ...] = (
    ("kilograms", "grams", 1000),
    ("meters", "centimeters", 100),
    ("kilometers", "meters", 1000),
    ("liters", "milliliters", 1000),
    ("centimeters", "millimeters", 10),
    ("dollars", "cents", 100),
)


@dataclass(frozen=True)
class RealSkill:
    """A skill: its name, a one-line description and its sampler of ``(prompt, answer)`` pairs."""

    name: str
    description: str
    sample: Sampler


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = _randint(rng, 10, 99), _randint(rng, 10, 99)
    return f"What is {a} + {b}? Answer:", str(a + b)


def _order(rng: random.Random) -> tuple[str, str]:
    pool = list(WORDS)
    words = [pool.pop(_randint(rng, 0, len(pool) - 1)) for _ in range(_randint(rng, 3, 4))]
    return f"Reverse the order of these words: {' '.join(words)}. Answer:", " ".join(reversed(words))


def _unit(rng: random.Random) -> tuple[str, str]:
    src, dst, factor = UNITS[_randint(rng, 0, len(UNITS) - 1)]
    n = _randint(rng, 2, 99)
    return f"How many {dst} are in {n} {src}? Answer:", str(n * factor)


REAL_SKILLS: dict[str, RealSkill] = {
    s.name: s
    for s in (
        RealSkill("add", "2-digit addition: 'What is 23 + 45? Answer:' -> '68'", _add),
        RealSkill("order", "reverse the order of 3-4 words: 'lamp river green' -> 'green river lamp'", _order),
        RealSkill("unit", "unit conversion: 'How many grams are in 37 kilograms? Answer:' -> '37000'", _unit),
    )
}
#: Names of the real zoo's skills, in the order experts are built.
SKILLS: tuple[str, ...] = tuple(REAL_SKILLS)


def get_skill(name: str) -> RealSkill:
    """The skill called ``name``; an unknown name raises :class:`TaskDataError` listing the valid ones."""
    try:
        return REAL_SKILLS[name]
    except KeyError:
        raise TaskDataError(f"unknown real-zoo skill {name!r}; valid skills: {', '.join(SKILLS)}") from None


def generate_eval_splits(name: str) -> dict[str, list[Example]]:
    """Regenerate the ``calibration`` and ``test`` splits of skill ``name`` (disjoint, deterministic)."""
    return draw_splits(name, get_skill(name).sample, SPLIT_SIZES, _SPLIT_TAGS, EVAL_SEED)


def write_eval_data(folder: str | os.PathLike[str], skills: Sequence[str] = SKILLS) -> list[Path]:
    """Write every split of ``skills`` as JSON lines ``{"id", "prompt", "answer"}`` into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in skills:
        for split, examples in generate_eval_splits(name).items():
            path = folder / f"{name}.{split}.jsonl"
            text = "".join(
                json.dumps({"id": e.id, "prompt": e.prompt, "answer": e.answer}, ensure_ascii=True) + "\n"
                for e in examples
            )
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
            paths.append(path)
    return paths


def held_out_prompts(skills: Sequence[str] = SKILLS) -> frozenset[str]:
    """Every prompt of every evaluation split of ``skills``: training data must avoid them."""
    return frozenset(
        e.prompt for name in skills for split in generate_eval_splits(name).values() for e in split
    )
