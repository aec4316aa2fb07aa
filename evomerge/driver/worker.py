"""A worker: loads its sources once, then merges each recipe and scores it.

With the hf scorer each recipe is merged in place into a live transformers model; with a scorer that owns an
inference engine (vLLM) the merged tensors are streamed into the engine tensor by tensor, and no transformers copy
of the model is kept (:mod:`evomerge.merge.streaming`). Workers are stateless apart from their resident sources; no
disk I/O happens per candidate. The same
class runs in-process (``LocalPool``) and inside a Ray actor (``RayPool``).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.driver.pool import Job
from evomerge.errors import EvomergeError
from evomerge.evaluation import EvalResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs to build itself (picklable: it travels to Ray actors)."""

    sources: dict[str, str]
    reference: str
    order: tuple[str, ...]
    suite: str
    tasks: tuple[str, ...] | None = None
    scorer: str = "hf"
    scorer_options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    seed: int = 0
    sorted_magnitudes: bool = False
    #: Keep LoRA adapter sources factored (``resources.adapter_residency: factored``).
    factored_adapters: bool = False
    #: Folder for compiled merge kernels (``TORCHINDUCTOR_CACHE_DIR`` unless already set).
    kernel_cache: str | None = None
    #: Output vocabulary of every recipe (see :mod:`evomerge.merge.vocab`).
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None
    #: Where the sources are kept (:mod:`evomerge.merge.placement`), resolved from ``resources.placement``.
    placement: str = "device"
    #: Calibration statistics every recipe of a data-informed search reads: per model name, the cached
    #: ``stats-<key>.safetensors`` path (in the run folder, which every node sees) and the kinds it holds.
    stats_files: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    from evomerge.merge.materialize import TORCH_DTYPES

    return TORCH_DTYPES[dtype]


class Worker:
    """Resident sources + a scorer, and the live model candidates are merged into (see the module docstring).

    With a scorer that owns its engine (capability ``state_dict``: vLLM) the worker keeps no transformers model: each
    candidate's merged tensors are streamed into the engine one at a time (:mod:`evomerge.merge.streaming`). Only a
    layer-routing recipe (``routing:``) still builds the routed model from a transformers copy of the reference,
    loaded the first time such a recipe is scored.
    """

    def __init__(self, spec: WorkerSpec, name: str = "local") -> None:
        from evomerge.merge.sources import ResidentSources
        from evomerge.scoring.base import SCORERS, make_scorer
        from evomerge.scoring.suite import load_suite

        t0 = time.perf_counter()
        self.spec = spec
        self.name = name
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self.sources = ResidentSources.load(
            spec.sources, spec.reference, spec.order, device=self.device, dtype=self.dtype,
            sorted_magnitudes=spec.sorted_magnitudes, tokenizer_source=spec.tokenizer_source,
            pad_to_multiple_of=spec.pad_to_multiple_of, placement=spec.placement,
            factored_adapters=spec.factored_adapters,
        )
        vocab = self.sources.vocab
        self.wants_state_dict = "state_dict" in SCORERS.capabilities(spec.scorer)
        if self.wants_state_dict and vocab.aligns:
            raise EvomergeError(f"scorer {spec.scorer!r} loads the reference folder's shapes; it cannot score models "
                                "whose vocabulary was re-laid out (tokenizer_source); use the hf scorer")
        self._model: Any = None
        self._merger: Any = None
        self.streamer: Any = None
        #: Calibration statistics of a data-informed method, computed by the driver before the search.
        self.stats: Any = None
        if spec.stats_files:
            from evomerge.merge.stats import MergeStats, load_file

            self.stats = MergeStats({m: load_file(path, kinds) for m, (path, kinds) in spec.stats_files.items()})
        if self.wants_state_dict:  # merged tensors go straight to the scorer's engine: no transformers model
            from evomerge.io import ModelFolder
            from evomerge.merge.streaming import StreamingMerger

            with ModelFolder.open(spec.sources[spec.reference]) as ref:
                tied = ref.tied_embeddings
            self.streamer = StreamingMerger(self.sources, tied=tied, stats=self.stats)
        else:
            self._load_model()
        from evomerge.scoring.base import auto_threads

        # small CPU models merge and score fastest on one thread (extra threads only spin-wait)
        entries = sum(math.prod(s) for s in self.sources.shapes.values())
        threads = spec.threads or auto_threads(entries, self.device)
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = vocab.load_tokenizer() if vocab is not None else None
        if self.tokenizer is None:
            raise EvomergeError(f"no source folder has tokenizer files ({', '.join(spec.sources.values())}); "
                                "scoring needs one")
        log.info("worker %s scores with %s", name, vocab.describe())
        self.suite = load_suite(spec.suite).select(spec.tasks)
        self.scorer = make_scorer(spec.scorer, **spec.scorer_options)
        if self.wants_state_dict:  # such a scorer owns its engine, started on the reference folder
            self.scorer.bind(spec.sources[spec.reference])
        #: Hash of the recipe whose merge the live model (or the scorer's engine) holds (``None``: unknown).
        self._merged: str | None = None
        if spec.kernel_cache:  # after the loads above (loading a model creates Inductor's cache folder)
            from evomerge.merge.kernels import set_cache_dir

            set_cache_dir(spec.kernel_cache)
        log.info("worker %s ready on %s in %.1fs", name, self.device, time.perf_counter() - t0)

    def _load_model(self) -> None:
        """Load the transformers model of the reference that recipes are merged into in place."""
        from transformers import AutoModelForCausalLM

        from evomerge.merge.materialize import InPlaceMerger

        vocab = self.sources.vocab
        model = AutoModelForCausalLM.from_pretrained(
            self.spec.sources[self.spec.reference], dtype=self.dtype, local_files_only=True, use_safetensors=True,
            trust_remote_code=False,
        ).to(self.device)
        if vocab is not None and vocab.aligns:  # the merged rows overwrite these
            model.resize_token_embeddings(vocab.size, mean_resizing=False)
        model.eval()
        self._model, self._merger = model, InPlaceMerger(self.sources, model, self.stats)

    @property
    def model(self) -> Any:
        """The live transformers model (loaded on first use when the scorer streams into its own engine)."""
        if self._model is None:
            log.info("worker %s loads a transformers copy of the reference (layer routing)", self.name)
            self._load_model()
        return self._model

    @property
    def merger(self) -> Any:
        """The :class:`~evomerge.merge.materialize.InPlaceMerger` writing into :attr:`model`."""
        if self._merger is None:
            self.model  # noqa: B018  (loads it)
        return self._merger

    def _model_for(self, job: Job) -> tuple[Any, dict[str, float]]:
        recipe = job.recipe
        if recipe.routing is None:
            # the same recipe gives the same tensors: a job that re-scores the live merge (a baseline's full
            # and subset scoring, a promotion) skips the merge
            if recipe.hash == self._merged:
                return self.model, {"merge": 0.0}
            self._merged = None
            timings = self.merger.apply(recipe)
            self._merged = recipe.hash
            return self.model, timings
        self._merged = None
        from evomerge.merge.routing import live_routed_model

        timings: dict[str, float] = {}
        if any(s.model == "@merge" for s in recipe.routing.steps) or recipe.routing.frame == "@merge":
            timings = self.merger.apply(recipe)
        t0 = time.perf_counter()
        model = live_routed_model(recipe, self.model, self.sources, device=self.device)
        timings["route"] = time.perf_counter() - t0
        return model, timings

    def _streamed_target(self, job: Job) -> tuple[Any, dict[str, float]]:
        """What a ``state_dict`` scorer is given for a recipe without routing: ``None`` when its engine already
        holds the recipe, else the stream of the recipe's merged tensors (swapped into the engine as it scores)."""
        if job.recipe.hash == self._merged:
            return None, {"merge": 0.0}
        self._merged = None
        return self.streamer.stream(job.recipe), {}

    def _score_in_chunks(self, target: Any, job: Job, *, once: bool) -> tuple[Any, bool]:
        """Score ``job`` chunk by chunk under its early-stop bound; ``once``: ``target`` is a stream, swapped in
        with the first chunk (the engine then holds it)."""
        from evomerge.driver.early_stop import score_in_chunks
        from evomerge.scoring.suite import pick_examples

        examples = {t.name: tuple(ex.id for ex in pick_examples(t.examples(job.split), job.scored_subset,
                                                                seed=self.spec.seed, task=t.name))
                    for t in self.suite.tasks}
        given = [target]

        def score(suite: Any, chunk: Any) -> Any:
            model = given[0]
            if once:
                given[0] = None
            return self.scorer.score(model, self.tokenizer, suite, split=job.split, subset=chunk, seed=self.spec.seed)

        return score_in_chunks(score, self.suite, examples, job.early_stop)

    def evaluate(self, job: Job) -> EvalResult:
        t0 = time.perf_counter()
        try:
            streamed = self.wants_state_dict and job.recipe.routing is None
            if streamed:
                target, timings = self._streamed_target(job)
            else:
                model, timings = self._model_for(job)
                # a state_dict scorer given a routed model: the module's tensors by name
                target = dict(model.state_dict()) if self.wants_state_dict else model
            fidelity = job.fidelity
            if job.early_stop is None:
                out = self.scorer.score(
                    target, self.tokenizer, self.suite, split=job.split, subset=job.scored_subset, seed=self.spec.seed
                )
            else:
                out, stopped = self._score_in_chunks(target, job, once=streamed)
                fidelity = "stopped" if stopped else fidelity
            if streamed:
                self._merged = job.recipe.hash
                if target is not None:
                    timings["merge"] = target.merge_seconds
            timings["total"] = time.perf_counter() - t0
            return out.to_eval_result(job.candidate_id, worker=self.name, fidelity=fidelity, timings=timings)
        except (EvomergeError, RuntimeError, ValueError, FloatingPointError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, EvomergeError):
                log.debug("candidate %d failed:\n%s", job.candidate_id, traceback.format_exc())
            return EvalResult(
                candidate_id=job.candidate_id, status="failed", error=detail,
                timings={"total": time.perf_counter() - t0}, worker=self.name, fidelity=job.fidelity,
            )
