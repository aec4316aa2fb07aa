"""Task data: examples read from JSONL files and the checks run on them before any scoring.

Each JSONL line is one example with a unique ``id``:

* ``generate``: ``{"id", "prompt", "answer"}``;
* ``choice``: ``{"id", "prompt", "options": [...], "answer": index or option text}``;
* ``perplexity``: ``{"id", "text"}``;
* ``lmeval``: any record with an ``id`` (handed to lm-eval as the task's documents).

Files are UTF-8. Every problem (missing file, text that is not UTF-8, malformed line, empty split,
overlapping splits, an answer extraction that fits no reference answer) is a :class:`~evomerge.errors.TaskDataError` naming the file and line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from evomerge.builtin import read_text
from evomerge.errors import TaskDataError
from evomerge.scoring.extract import extract_answer, parse_number

if TYPE_CHECKING:
    from evomerge.scoring.suite import GenerateTask

__all__ = ["Example", "check_answers", "check_overlap", "read_examples", "reference_answer"]


@dataclass(frozen=True)
class Example:
    """One example. ``prompt`` is the model input (for ``perplexity``: the whole text); ``answer`` the
    reference answer (``generate``); ``options`` and ``label`` the choices and the correct index
    (``choice``); ``record`` the raw JSON object (``lmeval``); ``source`` is ``file:line``."""

    id: str
    prompt: str = ""
    answer: str = ""
    options: tuple[str, ...] = ()
    label: int = -1
    record: Mapping[str, Any] | None = field(default=None, compare=False)
    source: str = field(default="", compare=False)

    @property
    def key(self) -> str:
        """The text that identifies the example's input, for overlap checks (prompt plus options)."""
        return (
            json.dumps([self.prompt, list(self.options)], ensure_ascii=False) if self.options else self.prompt
        )


def _field(obj: dict[str, Any], name: str, where: str, *, types: tuple[type, ...] = (str,)) -> Any:
    value = obj.get(name)
    if value is None or isinstance(value, bool) or not isinstance(value, types):
        kinds = " or ".join(t.__name__ for t in types)
        raise TaskDataError(f"{where}: field {name!r} must be a {kinds}, got {value!r}")
    return value


def _example(obj: dict[str, Any], kind: str, where: str) -> Example:
    ex_id = str(_field(obj, "id", where, types=(str, int)))
    if kind == "generate":
        answer = _field(obj, "answer", where, types=(str, int, float))
        return Example(ex_id, prompt=_field(obj, "prompt", where), answer=str(answer), source=where)
    if kind == "choice":
        options = obj.get("options")
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise TaskDataError(f"{where}: field 'options' must be a list of at least 2 strings")
        answer = _field(obj, "answer", where, types=(int, str))
        label = options.index(answer) if isinstance(answer, str) and answer in options else answer
        if not isinstance(label, int) or not 0 <= label < len(options):
            raise TaskDataError(f"{where}: answer {answer!r} is neither an option nor an index into options")
        return Example(
            ex_id, prompt=_field(obj, "prompt", where), options=tuple(options), label=label, source=where
        )
    if kind == "perplexity":
        text = _field(obj, "text", where)
        if not text:
            raise TaskDataError(f"{where}: field 'text' is empty")
        return Example(ex_id, prompt=text, source=where)
    rest = {k: v for k, v in obj.items() if k != "id"}
    prompt = obj["prompt"] if isinstance(obj.get("prompt"), str) else json.dumps(rest, sort_keys=True)
    return Example(ex_id, prompt=prompt, record=obj, source=where)


def read_examples(path: Path, kind: str, *, where: str) -> tuple[Example, ...]:
    """Read and check a JSONL file of ``kind`` examples (errors name ``where``, the file and the line)."""
    if not path.is_file():
        raise TaskDataError(f"{where}: data file not found: {path}")
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(read_text(path, error=TaskDataError).split("\n"), start=1):
        if not line.strip():
            continue
        at = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(f"{at}: malformed JSON line: {e.msg}") from None
        if not isinstance(obj, dict):
            raise TaskDataError(f"{at}: a line must be a JSON object, got {type(obj).__name__}")
        ex = _example(obj, kind, at)
        if ex.id in first_line:
            raise TaskDataError(f"{at}: duplicate id {ex.id!r} (first at line {first_line[ex.id]})")
        first_line[ex.id] = lineno
        examples.append(ex)
    if not examples:
        raise TaskDataError(f"{where}: {path} holds no examples (empty split)")
    return tuple(examples)


def check_overlap(splits: Mapping[str, tuple[Example, ...]], *, where: str) -> None:
    """Refuse examples shared by two splits, by id or by input text."""
    names = list(splits)
    for i, a in enumerate(names):
        ids_a = {ex.id for ex in splits[a]}
        keys_a = {ex.key: ex for ex in splits[a]}
        for b in names[i + 1 :]:
            for ex in splits[b]:
                if ex.id in ids_a:
                    raise TaskDataError(
                        f"{where}: splits {a!r} and {b!r} overlap: id {ex.id!r} ({ex.source})"
                    )
                if ex.key in keys_a:
                    raise TaskDataError(
                        f"{where}: splits {a!r} and {b!r} overlap: the same input {ex.prompt[:60]!r} "
                        f"({keys_a[ex.key].source} and {ex.source})"
                    )


def reference_answer(ex: Example, spec: GenerateTask) -> str:
    """The reference answer compared with predictions: extracted like a completion when that finds one."""
    found = extract_answer(ex.answer, spec.extract, spec.pattern())
    return found if found is not None else ex.answer.strip()


def check_answers(examples: tuple[Example, ...], spec: GenerateTask, *, where: str) -> None:
    """Refuse an extraction that fits no reference answer, and non-numeric references under ``numeric``."""
    if spec.extract != "strip":
        pattern = spec.pattern()
        if all(extract_answer(ex.answer, spec.extract, pattern) is None for ex in examples):
            what = (
                f"answer_regex {spec.answer_regex!r}" if spec.extract == "regex" else "extract 'last_number'"
            )
            raise TaskDataError(
                f"{where}: {what} matches none of the {len(examples)} reference answers "
                f"(e.g. {examples[0].answer!r} at {examples[0].source})"
            )
    if spec.metric == "numeric":
        for ex in examples:
            if parse_number(reference_answer(ex, spec)) is None:
                raise TaskDataError(f"{ex.source}: metric 'numeric' but answer {ex.answer!r} is not a number")
