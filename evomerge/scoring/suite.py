"""Task suites: a YAML file naming calibration tasks, with its local JSONL data loaded and checked.

A suite file looks like::

    name: zoo
    tasks:
      - name: add
        kind: generate            # generate | choice | perplexity | lmeval
        data: {calibration: zoo/add.calibration.jsonl, test: zoo/add.test.jsonl}
        max_new_tokens: 12
        reference: {low: 0.1, high: 0.95}   # optional: this task's 0 and 1 (default: the base and best source)

Data paths are relative to the suite file; the JSONL formats of each kind and the data checks are
described in :mod:`evomerge.scoring.data`.

:func:`load_suite` validates the YAML (errors name the file and field path) and reads every data file,
so every data problem (missing file, malformed line, empty split, overlapping splits, an answer regex
that fits no reference answer) is one :class:`~evomerge.errors.TaskDataError` before any scoring.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from evomerge.builtin import read_text, resolve
from evomerge.errors import ConfigError
from evomerge.names import SPLITS
from evomerge.scoring.data import Example, check_answers, check_overlap, read_examples, reference_answer
from evomerge.scoring.extract import AnswerMetric, ExtractMode

__all__ = [
    "ChoiceTask",
    "Example",
    "GenerateTask",
    "LmevalTask",
    "PerplexityTask",
    "Reference",
    "SplitFiles",
    "Suite",
    "SuiteConfig",
    "Task",
    "TaskSpec",
    "build_suite",
    "check_answers",
    "check_overlap",
    "load_suite",
    "parse_suite_config",
    "read_examples",
    "reference_answer",
    "pick_examples",
    "subset_examples",
]

_FROZEN = ConfigDict(frozen=True, extra="forbid")
_KINDS = ("generate", "choice", "perplexity", "lmeval")


class Reference(BaseModel):
    """Reference values of a task's raw score: ``low`` maps to 0 and ``high`` to 1 when normalized."""

    model_config = _FROZEN
    low: float
    high: float

    @model_validator(mode="after")
    def _distinct(self) -> Reference:
        if self.low == self.high:
            raise ValueError(f"reference low and high are equal ({self.low}); normalization needs a range")
        return self


class SplitFiles(BaseModel):
    """JSONL files of a task, per split, relative to the suite file."""

    model_config = _FROZEN
    calibration: str = Field(min_length=1)
    test: str | None = Field(default=None, min_length=1)


class _TaskBase(BaseModel):
    model_config = _FROZEN
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    reference: Reference | None = None


class GenerateTask(_TaskBase):
    """Greedy completion of ``prompt``, cut at the first stop string, answer extracted and compared."""

    kind: Literal["generate"]
    data: SplitFiles
    max_new_tokens: int = Field(default=32, ge=1)
    stop: tuple[str, ...] = ("\n",)
    #: ``strip``: the whole completion; ``last_number``: its last number; ``regex``: ``answer_regex``'s
    #: first group (or whole match). The same extraction is applied to the reference answer.
    extract: ExtractMode = "strip"
    answer_regex: str | None = None
    metric: AnswerMetric = "exact_match"
    ignore_case: bool = False
    tolerance: float = Field(default=0.0, ge=0)
    #: Literal text put before every prompt (e.g. an instruction or hand-written shots).
    fewshot_prefix: str = ""
    #: What a completion puts between the prompt and the answer (e.g. ``" "`` after ``"Answer:"``): in every
    #: few-shot shot, and before the reference answer wherever a completion is teacher-forced (the statistics
    #: pass of data-informed merges, ``evomerge adamerge --objective likelihood``), so a BPE tokenizer sees the
    #: answer's tokens as the model produces them. ``extract: strip`` ignores it when scoring.
    delimiter: str = ""
    #: JSONL of shots (same format as the data); the first ``num_fewshot`` are put before every prompt,
    #: each as ``prompt + delimiter + answer + fewshot_separator``.
    fewshot_file: str | None = None
    num_fewshot: int = Field(default=0, ge=0)
    fewshot_separator: str = "\n"
    #: Wrap the (prefixed) prompt as one user message with the tokenizer's chat template.
    chat_template: bool = False

    @field_validator("answer_regex")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as e:
                raise ValueError(f"answer_regex {v!r} does not compile: {e}") from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> GenerateTask:
        if (self.extract == "regex") != (self.answer_regex is not None):
            raise ValueError("answer_regex must be given exactly when extract is 'regex'")
        if (self.num_fewshot > 0) != (self.fewshot_file is not None):
            raise ValueError("fewshot_file and num_fewshot > 0 go together")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        return self

    def pattern(self) -> re.Pattern[str] | None:
        return re.compile(self.answer_regex) if self.answer_regex is not None else None


class ChoiceTask(_TaskBase):
    """Pick among ``options`` by log-likelihood of ``prompt + delimiter + option``."""

    kind: Literal["choice"]
    data: SplitFiles
    delimiter: str = ""
    fewshot_prefix: str = ""
    #: ``acc``: highest summed log-likelihood; ``acc_norm``: highest per-character log-likelihood.
    metric: Literal["acc", "acc_norm"] = "acc_norm"


class PerplexityTask(_TaskBase):
    """Mean token log-likelihood of ``text`` (higher is better), truncated to ``max_tokens`` tokens."""

    kind: Literal["perplexity"]
    data: SplitFiles
    max_tokens: int | None = Field(default=None, ge=2)


class LmevalTask(_TaskBase):
    """An lm-eval-harness task, by registered name or as a local task YAML, run by the lmeval scorer.

    With ``data`` the suite's JSONL records replace the task's dataset (one split at a time), so the
    split, subset and overlap rules of the suite apply; without it the task's own test split is used.
    """

    kind: Literal["lmeval"]
    task: str | None = None
    task_yaml: str | None = None
    #: Extra folders (relative to the suite) lm-eval indexes for ``task``; without any, ``task`` is looked
    #: up among lm-eval's built-in tasks.
    include_path: tuple[str, ...] = ()
    data: SplitFiles | None = None
    #: The logged per-example metric used as the score (default: the task's first metric).
    metric: str | None = None
    num_fewshot: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> LmevalTask:
        if (self.task is None) == (self.task_yaml is None):
            raise ValueError("give exactly one of task (a registered name) or task_yaml (a file)")
        return self


TaskSpec = Annotated[GenerateTask | ChoiceTask | PerplexityTask | LmevalTask, Field(discriminator="kind")]


class SuiteConfig(BaseModel):
    """The validated content of a suite YAML file."""

    model_config = _FROZEN
    name: str = Field(min_length=1)
    description: str = ""
    tasks: tuple[TaskSpec, ...]

    @field_validator("tasks")
    @classmethod
    def _unique(cls, v: tuple[TaskSpec, ...]) -> tuple[TaskSpec, ...]:
        if not v:
            raise ValueError("a suite needs at least one task")
        seen: set[str] = set()
        for t in v:
            if t.name in seen:
                raise ValueError(f"duplicate task name {t.name!r}")
            seen.add(t.name)
        return v


@dataclass(frozen=True)
class Task:
    """One task of a loaded suite: its spec and its examples per split (file order)."""

    spec: TaskSpec
    splits: Mapping[str, tuple[Example, ...]]
    fewshot: tuple[Example, ...] = ()
    base_dir: Path = field(default_factory=Path.cwd)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.kind

    def examples(self, split: str) -> tuple[Example, ...]:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if split not in self.splits:
            raise ConfigError(f"task {self.name!r} has no {split!r} split")
        return self.splits[split]

    def path(self, rel: str) -> Path:
        """A path of the task's YAML resolved against the suite's folder."""
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.base_dir / p


@dataclass(frozen=True)
class Suite:
    """A loaded, checked suite: the config, where it came from, and its tasks with their data."""

    config: SuiteConfig
    tasks: tuple[Task, ...]
    path: Path | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def names(self) -> tuple[str, ...]:
        """Task names, in suite order."""
        return tuple(t.name for t in self.tasks)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise ConfigError(f"suite {self.name!r} has no task {name!r}; tasks: {', '.join(self.names)}")

    def select(self, names: Iterable[str] | None) -> Suite:
        """The suite restricted to ``names`` (in that order); ``None`` keeps every task."""
        if names is None:
            return self
        return replace(self, tasks=tuple(self.task(n) for n in names))

    def references(self) -> dict[str, Reference]:
        """The ``reference:`` each task declares (tasks declaring none are left out)."""
        return {t.name: t.spec.reference for t in self.tasks if t.spec.reference is not None}


def subset_examples(
    examples: tuple[Example, ...], k: int | None, *, seed: int = 0, salt: str = ""
) -> tuple[Example, ...]:
    """A deterministic subset of ``k`` examples, kept in their original order.

    Examples are ranked by ``sha256(seed, salt, id)``, so the choice depends only on the ids (stable
    across runs, machines and file order) and the subset of ``k`` is contained in the subset of any
    larger ``k`` with the same seed (useful for multi-fidelity promotion).
    """
    if k is None or k >= len(examples):
        return examples
    if k < 1:
        raise ConfigError(f"subset must be at least 1, got {k}")

    def rank(ex: Example) -> str:
        return hashlib.sha256(f"{seed}\0{salt}\0{ex.id}".encode()).hexdigest()

    keep = {ex.id for ex in sorted(examples, key=rank)[:k]}
    return tuple(ex for ex in examples if ex.id in keep)


#: A scoring request's subset: a count per task (the hashed choice of :func:`subset_examples`), or the ids to
#: score per task (a task not named is scored whole), or ``None`` for every example.
Subset = int | Mapping[str, Sequence[str]] | None


def pick_examples(
    examples: tuple[Example, ...], subset: Subset, *, seed: int = 0, task: str = ""
) -> tuple[Example, ...]:
    """The examples of ``task`` a scoring request with ``subset`` scores, kept in their original order.

    Ids that the split does not hold are a :class:`ConfigError` naming the task and the first such id.
    """
    if subset is None or isinstance(subset, int):
        return subset_examples(examples, subset, seed=seed, salt=task)
    wanted = subset.get(task)
    if wanted is None:
        return examples
    keep = set(wanted)
    missing = keep - {ex.id for ex in examples}
    if missing:
        raise ConfigError(f"task {task!r}: the subset names example id {sorted(missing)[0]!r}, which the split "
                          f"does not hold ({len(missing)} unknown ids)")
    return tuple(ex for ex in examples if ex.id in keep)


def _format_loc(loc: tuple[Any, ...], raw: Any) -> str:
    """``('tasks', 0, 'generate', 'stop')`` -> ``tasks[0](add).stop`` (pydantic's union tag dropped)."""
    out = ""
    for i, item in enumerate(loc):
        if isinstance(item, int):
            out += f"[{item}]"
            if i == 1 and loc[0] == "tasks" and isinstance(raw, dict):
                tasks = raw.get("tasks")
                if isinstance(tasks, list) and item < len(tasks) and isinstance(tasks[item], dict):
                    out += f"({tasks[item].get('name', '?')})"
        elif not (i == 2 and loc[0] == "tasks" and item in _KINDS):
            out += ("." if out else "") + str(item)
    return out or "(top level)"


def parse_suite_config(raw: Any, *, source: str) -> SuiteConfig:
    """Validate a suite mapping; errors become one :class:`ConfigError` naming ``source`` and each field."""
    try:
        return SuiteConfig.model_validate(raw)
    except ValidationError as e:
        lines = [f"{source}: {_format_loc(tuple(err['loc']), raw)}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid task suite\n  " + "\n  ".join(lines)) from None


def _load_task(spec: TaskSpec, base_dir: Path, source: str) -> Task:
    where = f"{source}: task {spec.name!r}"
    splits: dict[str, tuple[Example, ...]] = {}
    fewshot: tuple[Example, ...] = ()
    if spec.data is not None:
        for split in SPLITS:
            rel = getattr(spec.data, split)
            if rel is not None:
                p = Path(rel).expanduser()
                splits[split] = read_examples(p if p.is_absolute() else base_dir / p, spec.kind, where=where)
        check_overlap(splits, where=where)
    if isinstance(spec, GenerateTask):
        if spec.fewshot_file is not None:
            p = Path(spec.fewshot_file).expanduser()
            shots = read_examples(p if p.is_absolute() else base_dir / p, "generate", where=where)
            if len(shots) < spec.num_fewshot:
                raise ConfigError(
                    f"{where}: num_fewshot={spec.num_fewshot} but {p} holds {len(shots)} examples"
                )
            fewshot = shots[: spec.num_fewshot]
            check_overlap({**splits, "fewshot": fewshot}, where=where)
        for split, exs in splits.items():
            check_answers(exs, spec, where=f"{where} ({split})")
    return Task(spec=spec, splits=splits, fewshot=fewshot, base_dir=base_dir)


def build_suite(config: SuiteConfig, base_dir: Path, *, path: Path | None = None) -> Suite:
    """Load and check the data of every task of ``config`` (paths relative to ``base_dir``)."""
    source = str(path) if path is not None else f"suite {config.name!r}"
    tasks = tuple(_load_task(spec, base_dir, source) for spec in config.tasks)
    return Suite(config=config, tasks=tasks, path=path)


def load_suite(ref: str | Path, *, base_dir: Path | None = None) -> Suite:
    """Load ``builtin:NAME`` or a suite YAML path, validate it and read all its data."""
    path = resolve(ref, "fitness", base_dir=base_dir)
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a task suite must be a mapping with 'name' and 'tasks'")
    config = parse_suite_config(raw, source=str(path))
    return build_suite(config, path.parent, path=path)
