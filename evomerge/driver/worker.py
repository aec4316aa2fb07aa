"""A worker: loads its sources once, then merges each recipe in place into a live model and scores it.

Workers are stateless apart from their resident sources; no disk I/O happens per candidate. The same
class runs in-process (``LocalPool``) and inside a Ray actor (``RayPool``).
"""

from __future__ import annotations

import logging
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
    """Resident sources + one live model + a scorer (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, name: str = "local") -> None:
        from transformers import AutoModelForCausalLM

        from evomerge.merge.materialize import InPlaceMerger
        from evomerge.merge.sources import ResidentSources
        from evomerge.scoring.base import SCORERS, make_scorer
        from evomerge.scoring.suite import load_suite

        t0 = time.perf_counter()
        self.spec = spec
        self.name = name
        self.device = resolve_device(spec.device)
        dtype = resolve_dtype(spec.dtype, self.device)
        self.sources = ResidentSources.load(
            spec.sources, spec.reference, spec.order, device=self.device, dtype=dtype,
            sorted_magnitudes=spec.sorted_magnitudes, tokenizer_source=spec.tokenizer_source,
            pad_to_multiple_of=spec.pad_to_multiple_of, placement=spec.placement,
            factored_adapters=spec.factored_adapters,
        )
        vocab = self.sources.vocab
        ref_dir = spec.sources[spec.reference]
        self.model = AutoModelForCausalLM.from_pretrained(
            ref_dir, dtype=dtype, local_files_only=True, use_safetensors=True, trust_remote_code=False
        ).to(self.device)
        if vocab is not None and vocab.aligns:  # the merged rows overwrite these
            self.model.resize_token_embeddings(vocab.size, mean_resizing=False)
        self.model.eval()
        from evomerge.scoring.base import resolve_threads

        # small CPU models merge and score fastest on one thread (extra threads only spin-wait)
        threads = spec.threads or resolve_threads("auto", self.model)
        if threads:
            torch.set_num_threads(threads)
        self.tokenizer = vocab.load_tokenizer() if vocab is not None else None
        if self.tokenizer is None:
            raise EvomergeError(f"no source folder has tokenizer files ({', '.join(spec.sources.values())}); "
                                "scoring needs one")
        log.info("worker %s scores with %s", name, vocab.describe())
        stats = None
        if spec.stats_files:
            from evomerge.merge.stats import MergeStats, load_file

            stats = MergeStats({m: load_file(path, kinds) for m, (path, kinds) in spec.stats_files.items()})
        self.merger = InPlaceMerger(self.sources, self.model, stats)
        self.suite = load_suite(spec.suite).select(spec.tasks)
        self.scorer = make_scorer(spec.scorer, **spec.scorer_options)
        self.wants_state_dict = "state_dict" in SCORERS.capabilities(spec.scorer)
        if self.wants_state_dict and vocab.aligns:
            raise EvomergeError(f"scorer {spec.scorer!r} loads the reference folder's shapes; it cannot score models "
                                "whose vocabulary was re-laid out (tokenizer_source); use the hf scorer")
        if self.wants_state_dict:  # such a scorer owns its engine, started on the reference folder
            self.scorer.bind(ref_dir)
        self._routed: Any = None
        #: Hash of the recipe whose merge the live model holds (``None``: unknown).
        self._merged: str | None = None
        if spec.kernel_cache:  # after the loads above (loading a model creates Inductor's cache folder)
            from evomerge.merge.kernels import set_cache_dir

            set_cache_dir(spec.kernel_cache)
        log.info("worker %s ready on %s in %.1fs", name, self.device, time.perf_counter() - t0)

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

    def evaluate(self, job: Job) -> EvalResult:
        t0 = time.perf_counter()
        try:
            model, timings = self._model_for(job)
            target: Any = model
            if self.wants_state_dict:  # by checkpoint name: fused MoE experts as the checkpoint's tensors
                routed = job.recipe.routing is not None
                target = dict(model.state_dict()) if routed else self.merger.checkpoint_tensors()
            out = self.scorer.score(
                target, self.tokenizer, self.suite, split=job.split, subset=job.scored_subset, seed=self.spec.seed
            )
            timings["total"] = time.perf_counter() - t0
            return out.to_eval_result(job.candidate_id, worker=self.name, fidelity=job.fidelity, timings=timings)
        except (EvomergeError, RuntimeError, ValueError, FloatingPointError) as exc:
            detail = f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, EvomergeError):
                log.debug("candidate %d failed:\n%s", job.candidate_id, traceback.format_exc())
            return EvalResult(
                candidate_id=job.candidate_id, status="failed", error=detail,
                timings={"total": time.perf_counter() - t0}, worker=self.name, fidelity=job.fidelity,
            )
