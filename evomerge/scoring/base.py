"""The scorer contract, its registry and the result type.

A scorer evaluates one model on a loaded :class:`~evomerge.scoring.suite.Suite` and returns, for every
task, the per-example scores (higher is better) in a :class:`ScoreOutput`. Construct one by name::

    scorer = SCORERS.get("hf")(batch_size=32)
    out = scorer.score(model, tokenizer, suite, split="calibration", subset=64, seed=0)

What ``model`` is depends on the scorer's registry capabilities:

* ``needs_module`` (``hf``, ``lmeval``): the live ``torch.nn.Module`` the worker merges into. It is
  scored as it is, never reloaded, and left in the mode it was in.
* ``state_dict`` (an engine-owning backend such as vLLM): the scorer owns its engine, started once per
  worker by ``bind(model_dir)``; ``score`` then receives the merged weights as a ``{name: tensor}``
  mapping, loads them into the engine in place and scores. Such a backend is one new file registered
  here with ``capabilities=("state_dict", "needs_gpu", <kinds>)``; the worker reads the flag to decide
  whether to pass its module or ``module.state_dict()``.

Capabilities also list the task kinds a scorer runs (``generate``, ``choice``, ``perplexity``,
``lmeval``), so callers and tests select scorers by flag. A scorer checks the whole request (every
task has the split, every kind is supported) before scoring anything, and raises
:class:`~evomerge.errors.ScoreError` when the model yields non-finite values: the caller records the
candidate as failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from evomerge.errors import ConfigError
from evomerge.evaluation import EvalResult, TaskScores
from evomerge.registry import Registry
from evomerge.scoring.suite import Example, Subset, Suite, Task, pick_examples


@dataclass(frozen=True)
class ScoreOutput:
    """Per-task per-example scores of one model on one split, with timings.

    ``tasks[name]`` holds the task's primary metric per example; ``metrics[name]`` the mean of every
    metric the scorer computed for it (e.g. both ``acc`` and ``acc_norm``). ``timings`` has seconds for
    ``total`` and for each task as ``task/<name>``.
    """

    tasks: dict[str, TaskScores]
    split: str = "calibration"
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def n_examples(self) -> int:
        return sum(len(ts.scores) for ts in self.tasks.values())

    def means(self) -> dict[str, float]:
        return {name: ts.mean for name, ts in self.tasks.items()}

    def to_eval_result(
        self,
        candidate_id: int,
        *,
        worker: str | None = None,
        fidelity: str = "full",
        timings: Mapping[str, float] | None = None,
    ) -> EvalResult:
        """An ``ok`` :class:`EvalResult`; ``timings`` (e.g. ``merge``) are merged with the scoring ones."""
        merged = {("score" if k == "total" else k): v for k, v in self.timings.items()}
        merged.update(timings or {})
        return EvalResult(
            candidate_id=candidate_id,
            status="ok",
            tasks=dict(self.tasks),
            timings=merged,
            worker=worker,
            fidelity=fidelity,
        )


@runtime_checkable
class Scorer(Protocol):
    """Scores a model on a suite; see the module docstring for what ``model`` is per capability."""

    def score(
        self,
        model: Any,
        tokenizer: Any,
        suite: Suite,
        *,
        split: str = "calibration",
        subset: Subset = None,
        seed: int = 0,
    ) -> ScoreOutput: ...


SCORERS: Registry[Callable[..., Scorer]] = Registry("scorer")
SCORERS.register_lazy(
    "hf",
    "evomerge.scoring.scorers.hf:HfScorer",
    capabilities=("needs_module", "cpu", "cuda", "generate", "choice", "perplexity", "lmeval"),
)
SCORERS.register_lazy(
    "lmeval",
    "evomerge.scoring.scorers.lmeval:LmevalScorer",
    capabilities=("needs_module", "cpu", "cuda", "lmeval"),
)
SCORERS.register_lazy(
    "vllm",
    "evomerge.scoring.scorers.vllm:VllmScorer",
    capabilities=("state_dict", "cpu", "cuda", "generate", "choice", "perplexity"),
)


def make_scorer(name: str, **options: Any) -> Scorer:
    """Build the scorer registered as ``name`` with its options (e.g. ``batch_size``)."""
    return SCORERS.get(name)(**options)


def plan(
    suite: Suite, split: str, subset: Subset, seed: int, *, kinds: Sequence[str], scorer: str
) -> list[tuple[Task, tuple[Example, ...]]]:
    """Check a whole scoring request up front and pick each task's examples (subset included: a count, or the
    ids per task that a calibration subset chose, see :func:`~evomerge.scoring.suite.pick_examples`).

    Raises :class:`ConfigError` for an unknown or missing split, an unsupported kind or a bad subset.
    """
    if isinstance(subset, int) and subset < 1:
        raise ConfigError(f"subset must be at least 1, got {subset}")
    bad = [f"{t.name} ({t.kind})" for t in suite.tasks if t.kind not in kinds]
    if bad:
        raise ConfigError(
            f"suite {suite.name!r}: the {scorer} scorer cannot run task(s) {', '.join(bad)}; "
            f"it runs kinds {', '.join(kinds)}"
        )
    out: list[tuple[Task, tuple[Example, ...]]] = []
    for t in suite.tasks:
        if t.kind == "lmeval" and not t.splits:
            if split != "test":
                raise ConfigError(
                    f"suite {suite.name!r}: lmeval task {t.name!r} has no 'data', so it only has lm-eval's "
                    f"own test split; give data: {{calibration: ..., test: ...}} to calibrate on it"
                )
            out.append((t, ()))
            continue
        out.append((t, pick_examples(t.examples(split), subset, seed=seed, task=t.name)))
    return out


#: On CPU, models smaller than this run single-threaded under ``threads="auto"``: their matrix products
#: are too small for intra-op parallelism to pay, and spinning threads on shared cores cost far more.
AUTO_SINGLE_THREAD_PARAMS = 20_000_000

Threads = int | Literal["auto"] | None


def resolve_threads(threads: Threads, model: Any) -> int | None:
    """The thread count a scorer uses: ``"auto"`` is 1 for a small model on CPU, else left unchanged."""
    if threads != "auto":
        return threads
    params = list(model.parameters())
    return auto_threads(sum(p.numel() for p in params), params[0].device) if params else None


def auto_threads(entries: int, device: Any) -> int | None:
    """``"auto"`` threads for a model of ``entries`` parameters on ``device``: 1 for a small model on CPU, else None."""
    return 1 if getattr(device, "type", device) == "cpu" and entries < AUTO_SINGLE_THREAD_PARAMS else None


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Use ``n`` intra-op threads inside the block and restore the previous count after it.

    torch's thread count is process-wide, so a scorer only changes it for the duration of a call;
    ``None`` leaves it as the process set it (``OMP_NUM_THREADS`` or torch's default).
    """
    import torch

    if n is None or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
