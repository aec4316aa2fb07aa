"""The lm-eval-harness scorer: runs ``lmeval`` tasks on the same live model and returns per-example scores.

The model object is wrapped as ``HFLM(pretrained=model, tokenizer=tokenizer)`` (no reload) and the tasks
run offline through ``simple_evaluate`` with ``bootstrap_iters=0`` and ``log_samples=True``; each task's
per-example score is its metric (``metric`` in the suite, else the task's first metric) read from
lm-eval's logged samples. lm-eval never touches the global RNGs here (its seeding is switched off).

Where a task's documents come from:

* the suite gives ``data`` (JSONL with ids): the task YAML is loaded, its dataset is replaced by those
  records of the requested split (already subset), and example ids are the records' ids;
* a local ``task_yaml`` without ``data``: relative ``data_files`` are resolved against the YAML's folder
  and the datasets cache goes to a folder owned by the scorer; ids are the records' ``id`` or doc indices;
* a registered task ``name``: lm-eval loads it as usual (a hub dataset needs the network or a warm cache).

With ``quiet`` (default) lm-eval's logger is raised to ERROR during a call, since its warnings about
model objects and custom datasets are expected here. lm-eval is imported lazily, only in this module; when it is missing the scorer raises
:class:`~evomerge.errors.BackendUnavailableError` before scoring anything.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.errors import BackendUnavailableError, ConfigError, ScoreError
from evomerge.evaluation import TaskScores
from evomerge.scoring.base import ScoreOutput, Threads, plan, resolve_threads, torch_threads
from evomerge.scoring.requests import encode
from evomerge.scoring.suite import Example, LmevalTask, Subset, Suite, Task, pick_examples

KINDS = ("lmeval",)


def require() -> Any:
    """Import lm-eval (with its HF model wrapper), or raise :class:`BackendUnavailableError`."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise BackendUnavailableError(
            f"the lmeval scorer needs lm-eval-harness with its HF extra: pip install 'lm-eval[hf]' ({e})"
        ) from None
    return lm_eval


def _load_task_yaml(path: Path) -> dict[str, Any]:
    """A task YAML as a dict, with ``include:`` and ``!function`` resolved the way lm-eval does."""
    if not path.is_file():
        raise ConfigError(f"lm-eval task YAML not found: {path}")
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:  # lm-eval before the task-manager rewrite
        from lm_eval.utils import load_yaml_config as load_yaml  # type: ignore[no-redef]
    try:
        cfg = load_yaml(path)
    except Exception as e:  # lm-eval raises plain errors for bad YAML, includes and functions
        raise ConfigError(f"{path}: cannot load lm-eval task YAML: {e}") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("task"), str):
        raise ConfigError(f"{path}: an lm-eval task YAML needs a 'task' name")
    return dict(cfg)


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Raise the ``lm_eval`` logger to ERROR inside the block (restored after): its per-call warnings
    about model objects and custom datasets are expected here and would repeat for every candidate."""
    logger = logging.getLogger("lm_eval")
    before = logger.level
    if enabled:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


def _doc_id(doc: Any, index: int) -> str:
    """An lm-eval document's example id: its ``id`` field when it has one, else its index."""
    value = doc.get("id") if isinstance(doc, dict) else None
    return str(value) if isinstance(value, (str, int)) and not isinstance(value, bool) else str(index)


class _Records:
    """``custom_dataset`` for lm-eval: the suite's records of one split, served as its test split."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __call__(self, **_: Any) -> dict[str, Any]:
        import datasets

        return {"test": datasets.Dataset.from_list(self.records)}


class LmevalScorer:
    """lm-eval-harness scorer (``SCORERS["lmeval"]``); see the module docstring.

    Options: ``batch_size`` and ``max_length`` (passed to ``HFLM``), ``threads`` (as for the hf scorer),
    ``cache_dir`` (datasets cache for YAML tasks with local files; default a private temporary folder,
    removed by :meth:`close`), ``check_finite`` (one forward pass on a real prompt before the run, and
    the logged log-likelihoods after it) and ``quiet``.
    """

    name = "lmeval"

    def __init__(
        self,
        *,
        batch_size: int = 16,
        threads: Threads = "auto",
        max_length: int | None = None,
        cache_dir: str | None = None,
        check_finite: bool = True,
        quiet: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        self.batch_size = batch_size
        self.threads = threads
        self.max_length = max_length
        self.check_finite = check_finite
        self.quiet = quiet
        self._cache_dir = cache_dir
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def cache_dir(self) -> str:
        """The datasets cache folder for YAML tasks read from files (a private temporary one by default)."""
        if self._cache_dir is None:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="evomerge-lmeval-")
            return self._tmp.name
        return self._cache_dir

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _spec(self, task: Task, examples: tuple[Example, ...], manager: Any) -> str | dict[str, Any]:
        """What ``TaskManager.load`` gets for ``task``: a config dict for a YAML task, else its name."""
        spec = task.spec
        assert isinstance(spec, LmevalTask)
        if spec.task_yaml is not None:
            path = task.path(spec.task_yaml)
        else:
            entry = manager.task_index.get(spec.task)
            if entry is None:
                where = "the include_path folders" if spec.include_path else "lm-eval's built-in tasks"
                raise ConfigError(f"task {task.name!r}: no lm-eval task named {spec.task!r} in {where}")
            yaml_path = getattr(entry, "yaml_path", None)
            if yaml_path is None or getattr(entry.kind, "name", "") != "TASK":
                if task.splits or spec.num_fewshot is not None:
                    raise ConfigError(
                        f"task {task.name!r}: data and num_fewshot need a single YAML task; {spec.task!r} is not one"
                    )
                return str(spec.task)
            path = Path(yaml_path)
        cfg, base = _load_task_yaml(path), path.parent
        cfg = copy.deepcopy(cfg)
        if task.splits:
            few = spec.num_fewshot if spec.num_fewshot is not None else cfg.get("num_fewshot") or 0
            if few:
                raise ConfigError(f"task {task.name!r}: with suite data, lm-eval few-shot is not supported")
            for key in (
                "dataset_path",
                "dataset_name",
                "dataset_kwargs",
                "training_split",
                "validation_split",
                "fewshot_split",
            ):
                cfg.pop(key, None)
            cfg.update(custom_dataset=_Records([dict(ex.record or {}) for ex in examples]), test_split="test")
        else:
            kwargs = dict(cfg.get("dataset_kwargs") or {})
            files = kwargs.get("data_files")
            if isinstance(files, dict):
                kwargs["data_files"] = {
                    k: [str(base / f) for f in v] if isinstance(v, list) else str(base / v)
                    for k, v in files.items()
                }
            elif isinstance(files, str):
                kwargs["data_files"] = str(base / files)
            if files is not None:
                kwargs.setdefault("cache_dir", self.cache_dir())
                cfg["dataset_kwargs"] = kwargs
        if spec.num_fewshot is not None:
            cfg["num_fewshot"] = spec.num_fewshot
        return cfg

    def _check_model(
        self, model: torch.nn.Module, tokenizer: Any, work: list[tuple[Task, tuple[Example, ...]]]
    ) -> None:
        """One forward pass on a real prompt: non-finite logits raise :class:`ScoreError` up front."""
        text = next((exs[0].prompt for _, exs in work if exs), "")
        ids = encode(tokenizer, text) if text else []
        if not ids:
            ids = [
                next((v for v in (tokenizer.bos_token_id, tokenizer.eos_token_id) if isinstance(v, int)), 0)
            ]
        device = next(model.parameters()).device
        logits = model(input_ids=torch.tensor([ids[-64:]], device=device)).logits
        if not bool(torch.isfinite(logits).all()):
            raise ScoreError("the model produced non-finite logits (NaN/inf)")

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
        lm_eval = require()
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        start = time.perf_counter()
        include = list(dict.fromkeys(str(t.path(p)) for t, _ in work for p in t.spec.include_path))  # type: ignore[union-attr]
        defaults = any(getattr(t.spec, "task", None) is not None and not t.spec.include_path for t, _ in work)  # type: ignore[union-attr]
        manager = TaskManager(include_path=include or None, include_defaults=defaults)
        specs = [self._spec(t, exs, manager) for t, exs in work]
        used: set[str] = set()
        for (t, _), lm_spec in zip(work, specs, strict=True):
            if isinstance(lm_spec, dict) and lm_spec["task"] in used:
                lm_spec["task"] = f"{lm_spec['task']}_{t.name}"  # the same lm-eval task with other data
            name = lm_spec if isinstance(lm_spec, str) else lm_spec["task"]
            if name in used:
                raise ConfigError(f"suite {suite.name!r}: lm-eval task {name!r} is listed twice")
            used.add(name)
        try:
            with _quiet(self.quiet):
                loaded = manager.load(specs)["tasks"]
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"suite {suite.name!r}: lm-eval could not load its tasks: {e}") from None
        names = [s if isinstance(s, str) else s["task"] for s in specs]
        samples: dict[str, list[int]] = {}
        for (t, _), lm_name in zip(work, names, strict=True):
            if not t.splits and subset is not None:
                docs = [Example(_doc_id(doc, i)) for i, doc in enumerate(loaded[lm_name].eval_docs)]
                keep = {ex.id for ex in pick_examples(tuple(docs), subset, seed=seed, task=t.name)}
                samples[lm_name] = [i for i, ex in enumerate(docs) if ex.id in keep]
        with torch_threads(resolve_threads(self.threads, model)), torch.inference_mode(), _quiet(self.quiet):
            was_training = model.training
            model.eval()
            try:
                if self.check_finite:
                    self._check_model(model, tokenizer, work)
                lm = HFLM(
                    pretrained=model,
                    tokenizer=tokenizer,
                    batch_size=self.batch_size,
                    max_length=self.max_length,
                )
                results = lm_eval.simple_evaluate(
                    model=lm,
                    tasks=[loaded[n] for n in names],
                    task_manager=manager,
                    samples=samples or None,
                    bootstrap_iters=0,
                    log_samples=True,
                    random_seed=None,
                    numpy_random_seed=None,
                    torch_random_seed=None,
                )
            finally:
                model.train(was_training)
        if results is None:
            raise ScoreError("lm-eval returned no results")
        tasks: dict[str, TaskScores] = {}
        metrics: dict[str, dict[str, float]] = {}
        for (t, exs), lm_name in zip(work, names, strict=True):
            ts, means = self._collect(t, exs, results["samples"].get(lm_name, []), loaded[lm_name])
            tasks[t.name], metrics[t.name] = ts, means
        elapsed = time.perf_counter() - start
        return ScoreOutput(
            tasks=tasks, split=split, timings={"total": elapsed, "lmeval": elapsed}, metrics=metrics
        )

    def _collect(
        self, task: Task, examples: tuple[Example, ...], logged: list[dict[str, Any]], lm_task: Any
    ) -> tuple[TaskScores, dict[str, float]]:
        if not logged:
            raise ScoreError(f"task {task.name!r}: lm-eval logged no samples")
        first_filter = logged[0].get("filter")
        rows = sorted((s for s in logged if s.get("filter") == first_filter), key=lambda s: s["doc_id"])
        spec = task.spec
        assert isinstance(spec, LmevalTask)
        metric_names = list(rows[0].get("metrics") or [])
        metric = spec.metric or (metric_names[0] if metric_names else None)
        if metric is None or metric not in rows[0]:
            raise ConfigError(
                f"task {task.name!r}: lm-eval logged no metric {metric!r}; it logged {', '.join(metric_names)}"
            )
        ids: list[str] = []
        for s in rows:
            if examples:
                ids.append(examples[s["doc_id"]].id)
            else:
                ids.append(_doc_id(s.get("doc"), s["doc_id"]))
        if self.check_finite:
            for s in rows:
                for resp in s.get("filtered_resps", []):
                    values = resp if isinstance(resp, (list, tuple)) else [resp]
                    if any(isinstance(v, float) and not np.isfinite(v) for v in values):
                        raise ScoreError(f"task {task.name!r}: non-finite log-likelihoods (NaN/inf logits)")
        per = {
            m: np.asarray([float(s[m]) for s in rows], dtype=np.float64)
            for m in metric_names
            if all(isinstance(s.get(m), (int, float, bool)) for s in rows)
        }
        if metric not in per:
            raise ConfigError(f"task {task.name!r}: lm-eval metric {metric!r} is not a per-example number")
        if not np.isfinite(per[metric]).all():
            raise ScoreError(f"task {task.name!r}: non-finite {metric} scores")
        return TaskScores(tuple(ids), per[metric], metric), {m: float(v.mean()) for m, v in per.items()}
