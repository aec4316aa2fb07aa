"""Synthetic skills for the tiny model zoo, and their shipped evaluation data.

A *skill* is a text-to-text task: a prompt such as ``"195+7="`` whose completion is the answer followed by
the stop string ``"\\n"``. Every skill has two distributions:

* the **task** distribution: what an expert must master and what the shipped ``calibration`` / ``test``
  splits are drawn from;
* the **warm-up** distribution: the same format on related but easier inputs. The base model is
  pretrained on the warm-up data of all skills, so it knows every format and shares representations with
  the experts while staying weak on the task distribution itself.

======  ==========================================  ===================================================
skill   task (experts, evaluation)                  warm-up (base)
======  ==========================================  ===================================================
add     3-digit + 1-digit: ``"195+7="`` -> ``202``  1-digit + 1/2-digit, 2-digit + 1-digit, and the
                                                    mirrored 1-digit + 3-digit (``"7+195="``)
rev     reverse 6-8 letters                         reverse 1-6 letters
sort    sort 6-8 distinct letters of a-z            sort 1-6 distinct letters of a-p
======  ==========================================  ===================================================

Evaluation splits are drawn with fixed seeds that do not depend on any zoo seed, and they use only
``random.Random.random()`` (whose sequence Python guarantees across versions), so the shipped JSON lines in
``fitness/zoo/`` can be regenerated exactly by :func:`write_eval_data`. Training data never contains a
prompt of either split (see :func:`sample_training`).
"""

from __future__ import annotations

import json
import os
import random
import string
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from evomerge.errors import TaskDataError
from evomerge.names import SPLITS

#: The stop string that ends every completion.
STOP = "\n"
#: Evaluation splits shipped for every skill, and the number of examples in each.
SPLIT_SIZE = 200
_SPLIT_TAGS = {"calibration": "cal", "test": "test"}
#: Seed of the evaluation splits; fixed so that the shipped files never depend on a zoo seed.
EVAL_SEED = 20261124


@dataclass(frozen=True)
class Example:
    """One prompt/answer pair; the expected completion is ``answer + STOP``."""

    id: str
    prompt: str
    answer: str


Sampler = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Skill:
    """A synthetic skill: a name, a one-line description and its task and warm-up samplers."""

    name: str
    description: str
    sample_task: Sampler
    sample_warmup: Sampler


def _randint(rng: random.Random, low: int, high: int) -> int:
    """An integer in ``[low, high]`` drawn from ``rng.random()`` alone (stable across Python versions)."""
    return low + min(int(rng.random() * (high - low + 1)), high - low)


def _number(rng: random.Random, digits: int) -> int:
    """A number with exactly ``digits`` digits (``0..9`` for one digit)."""
    if digits == 1:
        return _randint(rng, 0, 9)
    return _randint(rng, 10 ** (digits - 1), 10**digits - 1)


def _letters(rng: random.Random, n: int, *, distinct: bool, alphabet: str = string.ascii_lowercase) -> str:
    """``n`` letters of ``alphabet``, all different when ``distinct``."""
    pool = list(alphabet)
    out = []
    for _ in range(n):
        ch = pool[_randint(rng, 0, len(pool) - 1)]
        out.append(ch)
        if distinct:
            pool.remove(ch)
    return "".join(out)


def addition(a_digits: tuple[int, int], b_digits: tuple[int, int]) -> Sampler:
    """``"a+b="`` -> ``str(a + b)``; the operands have ``a_digits`` / ``b_digits`` (min, max) digits."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a = _number(rng, _randint(rng, *a_digits))
        b = _number(rng, _randint(rng, *b_digits))
        return f"{a}+{b}=", str(a + b)

    return sample


def carry_free_addition(a_digits: int, b_digits: int) -> Sampler:
    """``"a+b="`` -> ``str(a + b)`` with ``a_digits``/``b_digits``-digit operands and no carry anywhere."""

    def sample(rng: random.Random) -> tuple[str, str]:
        a = b = 0
        for k in range(max(a_digits, b_digits)):
            lead_a, lead_b = k == a_digits - 1 and k > 0, k == b_digits - 1 and k > 0
            if k >= b_digits:
                da, db = _randint(rng, 1 if lead_a else 0, 9), 0
            elif k >= a_digits:
                da, db = 0, _randint(rng, 1 if lead_b else 0, 9)
            else:
                da = _randint(rng, 1 if lead_a else 0, 8 if lead_b else 9)
                db = _randint(rng, 1 if lead_b else 0, 9 - da)
            a, b = a + da * 10**k, b + db * 10**k
        return f"{a}+{b}=", str(a + b)

    return sample


def mixed(*samplers: Sampler) -> Sampler:
    """Draw from one of ``samplers``, each with the same probability."""

    def sample(rng: random.Random) -> tuple[str, str]:
        return samplers[_randint(rng, 0, len(samplers) - 1)](rng)

    return sample


def reversal(min_len: int, max_len: int) -> Sampler:
    """``"rev:abc="`` -> ``"cba"`` for strings of ``min_len..max_len`` letters."""

    def sample(rng: random.Random) -> tuple[str, str]:
        s = _letters(rng, _randint(rng, min_len, max_len), distinct=False)
        return f"rev:{s}=", s[::-1]

    return sample


def sorting(min_len: int, max_len: int, alphabet: str = string.ascii_lowercase) -> Sampler:
    """``"sort:dbca="`` -> ``"abcd"`` for ``min_len..max_len`` distinct letters of ``alphabet``."""

    def sample(rng: random.Random) -> tuple[str, str]:
        s = _letters(rng, _randint(rng, min_len, max_len), distinct=True, alphabet=alphabet)
        return f"sort:{s}=", "".join(sorted(s))

    return sample


SKILL_TABLE: dict[str, Skill] = {
    s.name: s
    for s in (
        Skill(
            "add",
            "multi-digit addition: '195+7=' -> '202'",
            addition((3, 3), (1, 1)),
            mixed(addition((1, 1), (1, 2)), addition((2, 2), (1, 1)), addition((1, 1), (3, 3))),
        ),
        Skill("rev", "string reversal: 'rev:abcdef=' -> 'fedcba'", reversal(6, 8), reversal(1, 6)),
        Skill(
            "sort",
            "sorting distinct letters: 'sort:dbca=' -> 'abcd'",
            sorting(6, 8),
            sorting(1, 6, string.ascii_lowercase[:16]),
        ),
    )
}
#: Names of the zoo's skills, in the order experts are built.
SKILLS: tuple[str, ...] = tuple(SKILL_TABLE)


def get_skill(name: str) -> Skill:
    """The skill called ``name``; an unknown name raises :class:`TaskDataError` listing the valid ones."""
    try:
        return SKILL_TABLE[name]
    except KeyError:
        raise TaskDataError(f"unknown skill {name!r}; valid skills: {', '.join(SKILLS)}") from None


def generate_eval_splits(name: str) -> dict[str, list[Example]]:
    """Regenerate the ``calibration`` and ``test`` splits of skill ``name`` (disjoint, deterministic)."""
    return draw_splits(name, get_skill(name).sample_task, dict.fromkeys(SPLITS, SPLIT_SIZE), _SPLIT_TAGS, EVAL_SEED)


def draw_splits(name: str, sample: Sampler, sizes: dict[str, int], tags: dict[str, str],
                seed: int) -> dict[str, list[Example]]:
    """Distinct examples of skill ``name`` drawn from ``sample`` with a generator seeded by ``seed`` and the
    name, cut into consecutive splits of ``sizes`` (ids ``<name>-<tag>-<n>``): disjoint, the same everywhere."""
    rng = random.Random(seed + zlib.crc32(name.encode()))
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    while len(pool) < sum(sizes.values()):
        prompt, answer = sample(rng)
        if prompt not in seen:
            seen.add(prompt)
            pool.append((prompt, answer))
    out: dict[str, list[Example]] = {}
    start = 0
    for split, size in sizes.items():
        chunk = pool[start : start + size]
        start += size
        out[split] = [Example(f"{name}-{tags[split]}-{i:04d}", p, a) for i, (p, a) in enumerate(chunk, 1)]
    return out


def eval_file(folder: Path, name: str, split: str) -> Path:
    """The path of skill ``name``'s ``split`` file inside ``folder``."""
    return Path(folder) / f"{name}.{split}.jsonl"


def _dump(examples: Iterable[Example]) -> str:
    return "".join(
        json.dumps({"id": e.id, "prompt": e.prompt, "answer": e.answer}, ensure_ascii=True) + "\n"
        for e in examples
    )


def write_eval_data(folder: str | os.PathLike[str], skills: Sequence[str] = SKILLS) -> list[Path]:
    """Write every split of ``skills`` as JSON lines into ``folder`` (atomically); return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in skills:
        for split, examples in generate_eval_splits(name).items():
            path = eval_file(folder, name, split)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(_dump(examples), encoding="utf-8")
            os.replace(tmp, path)
            paths.append(path)
    return paths


def shipped_data_dir() -> Path:
    """The folder of the shipped evaluation data (``fitness/zoo`` in a checkout or an installed wheel)."""
    from evomerge.builtin import builtin_dir

    return builtin_dir("fitness") / "zoo"


def load_eval_data(name: str, split: str, folder: str | os.PathLike[str] | None = None) -> list[Example]:
    """Read skill ``name``'s ``split`` from ``folder`` (default: the shipped data)."""
    if split not in SPLITS:
        raise TaskDataError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    path = eval_file(Path(folder) if folder is not None else shipped_data_dir(), name, split)
    if not path.is_file():
        raise TaskDataError(f"evaluation data not found: {path}")
    examples = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                examples.append(Example(str(row["id"]), str(row["prompt"]), str(row["answer"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise TaskDataError(f"{path}:{lineno}: malformed example ({exc})") from exc
    return examples


def held_out_prompts(skills: Sequence[str] = SKILLS) -> frozenset[str]:
    """Every prompt of every evaluation split of ``skills``: training data must avoid them."""
    return frozenset(
        e.prompt for name in skills for split in generate_eval_splits(name).values() for e in split
    )


def sample_training(
    sampler: Sampler, n: int, rng: random.Random, exclude: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """Draw ``n`` training pairs from ``sampler``, skipping any prompt in ``exclude``."""
    out: list[tuple[str, str]] = []
    while len(out) < n:
        prompt, answer = sampler(rng)
        if prompt not in exclude:
            out.append((prompt, answer))
    return out
