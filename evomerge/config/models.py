"""The run config: one YAML validated by pydantic (unknown keys refused, errors name the YAML path).

``RunConfig.model_json_schema()`` is shipped as ``evomerge config schema``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.config.optimizers import CmaEsConfig, OptimizerConfig
from evomerge.names import DType
from evomerge.pools import POOLS

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ZooConfig(BaseModel):
    """Build a built-in zoo into ``dir`` if it is missing (demo configs): tiny (``test``, ``demo``) or real
    (``real``, ``real-test``: SmolLM2-135M and experts fine-tuned from it; ``pip install evomerge[real]``)."""

    model_config = _FROZEN
    dir: str
    size: Literal["test", "demo", "real", "real-test"] = "demo"
    seed: int = 0


class LewisStartConfig(BaseModel):
    """``space.lewis_start``: a per-layer density search starts at LEWIS's per-layer densities (arXiv 2503.03874)."""

    model_config = _FROZEN
    suite: str = Field(description="task suite whose calibration prompts the activations are taken on")
    tasks: list[str] | None = Field(default=None, description="subset of the suite's tasks (default: all)")
    examples: int | None = Field(default=None, ge=1, description="calibration examples per task (default: all)")
    density: float | None = Field(default=None, gt=0, le=1,
                                  description="mean density per model (default: the template's start density)")
    spread: float = Field(default=1.0, ge=0, le=1,
                          description="0: the uniform density; 1: densities proportional to layer importance")
    low: float = Field(default=0.05, gt=0, le=1, description="smallest per-layer density")
    high: float = Field(default=1.0, gt=0, le=1, description="largest per-layer density")


class WarmStartConfig(BaseModel):
    """Start the search at the best task-arithmetic merge of a grid of weights (scored before the search)."""

    model_config = _FROZEN
    weights: list[float] = Field(
        default_factory=lambda: [0.3, 0.5, 0.7, 0.9, 1.1], min_length=1,
        description="task-arithmetic weights tried (every merged model gets the same weight); the best on "
                    "calibration, by the optimizer's scalarization, becomes the space's start weight",
    )

    @model_validator(mode="after")
    def _positive(self) -> WarmStartConfig:
        bad = [w for w in self.weights if not (w == w and 0 < w < float("inf"))]
        if bad:
            raise ValueError(f"weights must be finite and > 0, got {bad}")
        if len(set(self.weights)) != len(self.weights):
            raise ValueError(f"weights listed more than once: {self.weights}")
        return self


class SpaceConfig(BaseModel):
    model_config = _FROZEN
    template: str = Field(description="builtin:NAME or a path to a search-space YAML")
    overrides: dict[str, Any] = Field(default_factory=dict, description="template fields to replace")
    warm_start: WarmStartConfig | None = Field(
        default=None, description="score task arithmetic on a grid of weights first and start the search at the "
                                  "best (templates that search 'weight': params and hybrid)")
    start_from: str | None = Field(
        default=None, description="where the search starts: a recipe YAML (e.g. the exported best of a coarser "
                                  "search), encoded in this params space (grouped-then-refined: search per module "
                                  "kind, then per projection from that winner); or the start.json (or its folder) "
                                  "that `evomerge adamerge` fitted for this space")
    lewis_start: LewisStartConfig | None = Field(
        default=None, description="start a per-layer density search (ties, dare_ties, della …) at LEWIS's per-layer "
                                  "densities from the models' activations on calibration prompts (computed once "
                                  "into the run folder)")

    @model_validator(mode="after")
    def _one_start(self) -> SpaceConfig:
        given = [n for n in ("start_from", "warm_start", "lewis_start") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} {'both' if len(given) == 2 else 'all'} choose the start point; "
                             "give one of them")
        return self


class FitnessConfig(BaseModel):
    model_config = _FROZEN
    suite: str = Field(description="builtin:NAME or a path to a task-suite YAML")
    scorer: str = "hf"
    tasks: list[str] | None = Field(default=None, description="subset of the suite's tasks (default: all)")
    batch_size: int = Field(default=64, ge=1)


class BudgetConfig(BaseModel):
    model_config = _FROZEN
    evaluations: int | None = Field(default=64, ge=1)
    wall_time_s: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_budget(self) -> BudgetConfig:
        if self.evaluations is None and self.wall_time_s is None:
            raise ValueError("give evaluations and/or wall_time_s")
        return self


class ResourcesConfig(BaseModel):
    model_config = _FROZEN
    backend: str = Field(
        default="local", description="the evaluation pool backend", json_schema_extra={"enum": POOLS.names()}
    )
    workers: int = Field(default=1, ge=1)
    gpus_per_worker: float = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1, gt=0)
    address: str | None = Field(default=None, description="join this Ray cluster (ray backend)")
    custom_resources_per_worker: dict[str, float] = Field(
        default_factory=dict,
        description="custom Ray resources each worker needs besides its CPUs and GPUs (ray backend), e.g. "
                    "{merge_worker: 1} to place workers only on the nodes started with that resource",
    )
    device: str = "auto"
    dtype: Literal[DType, "auto"] = "auto"
    placement: Literal["auto", "device", "host", "mmap"] = Field(
        default="auto",
        description="where each worker keeps its sources: device (fastest), host (host memory, pinned for a GPU, "
                    "streamed to the device tensor by tensor with the copies overlapped with merging), mmap (read "
                    "from the safetensors files at each merge; the last resort); auto: the first whose memory plan "
                    "fits (`evomerge plan` shows each placement's resident bytes). Same recipe, same bits in each",
    )
    eval_timeout_s: float | None = Field(default=None, gt=0)
    threads_per_worker: int | None = Field(default=None, ge=1)
    sorted_magnitude_cache: bool | Literal["auto"] = Field(
        default="auto",
        description="keep each task vector's magnitude order resident: TIES top-k thresholds become O(1) "
        "lookups (several times faster merges) at the cost of one int32 per task-vector entry in worker memory; "
        "kept only for methods that read them (TIES); 'auto': on for TIES searches on the CPU when that costs "
        "under a quarter of the available memory (`evomerge plan` shows the cost)",
    )

    adapter_residency: Literal["dense", "factored"] = Field(
        default="dense",
        description="how a worker holds the task vector of a LoRA adapter source: dense (like a full source: "
        "a model's size each, merges as fast as with full sources) or factored (its B and A factors in float32: "
        "a few MB each, expanded again per tensor on every merge; `evomerge plan` shows both)",
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in POOLS:
            raise ValueError(f"unknown pool backend {v!r}; valid names: {', '.join(POOLS.names())}")
        return v

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus(cls, v: float) -> float:
        if v > 1 and v != int(v):
            raise ValueError(f"above 1 it must be a whole number of GPUs (the vllm scorer's tensor_parallel_size), "
                             f"got {v:g}")
        return v

    @field_validator("custom_resources_per_worker")
    @classmethod
    def _custom_resources(cls, v: dict[str, float]) -> dict[str, float]:
        builtin = [k for k in v if k in ("CPU", "GPU", "memory", "object_store_memory")]
        if builtin:
            raise ValueError(f"{builtin} are not custom resources; use cpus_per_worker / gpus_per_worker")
        bad = {k: x for k, x in v.items() if not (x == x and 0 < x < float("inf"))}
        if bad:
            raise ValueError(f"amounts must be finite and > 0, got {bad}")
        return v

    @model_validator(mode="after")
    def _ray_only(self) -> ResourcesConfig:
        if self.custom_resources_per_worker and self.backend not in POOLS.names(having=("distributed",)):
            raise ValueError(f"custom_resources_per_worker places Ray workers; backend {self.backend!r} runs one "
                             "worker in this process (use backend: ray)")
        return self


class FidelityConfig(BaseModel):
    """Multi-fidelity: score on a calibration subset, promote the best to the full calibration set."""

    model_config = _FROZEN
    subset: int | None = Field(default=None, ge=1, description="examples per task for the cheap evaluation")
    subset_method: Literal["random", "anchor"] = Field(
        default="random",
        description="how the subset is chosen: random (hashed example ids; the estimate is the subset mean) or "
                    "anchor (a stratified sample over clusters of the base's and sources' per-example scores, "
                    "chosen once per run after they are scored; the estimate is the cluster-weighted mean)")
    promote_quantile: float = Field(default=0.25, gt=0, le=1, description="top share promoted to full")
    promote_confidence: float = Field(
        default=0.9, ge=0.5, lt=1,
        description="one-sided confidence of the upper bound on a candidate's estimated full-set score: a candidate "
                    "is promoted only while that bound reaches the promotion cut and is not dominated by a scored "
                    "front (higher promotes more; 0.5: the estimate itself)")
    rescore_test: bool = Field(default=True, description="re-score the Pareto set on the test split at the end")
    early_stop: Literal["off", "front", "mean"] = Field(
        default="off",
        description="score a searched candidate's calibration set in chunks and stop it once even a perfect score "
                    "on the rest cannot reach the front of the full-set scores (front) or their best mean objective "
                    "(mean); it is recorded with fidelity 'stopped' and its partial scores")
    early_stop_chunks: int = Field(default=4, ge=2, description="chunks per task when early_stop is on")

    @model_validator(mode="after")
    def _early_stop(self) -> FidelityConfig:
        if self.early_stop != "off" and self.subset is not None:
            raise ValueError("fidelity.early_stop stops full-set scoring; with fidelity.subset the promotion decides "
                             "what is scored in full: unset one of them")
        return self


class SourceSelectionConfig(BaseModel):
    """Merge only ``keep`` sources of a larger pool, chosen before the run (:mod:`evomerge.merge.selection`)."""

    model_config = _FROZEN
    keep: int = Field(ge=1, description="sources kept besides the base; the rest of the pool is never loaded")
    method: Literal["frank_wolfe"] = Field(
        default="frank_wolfe",
        description="frank_wolfe: data-free Frank-Wolfe over the pool's task-vector Gram matrix (the sources that "
                    "together best reconstruct the pool's mean task vector)")
    iterations: int = Field(default=100, ge=1, description="Frank-Wolfe steps at most")
    block_entries: int = Field(
        default=2**22, ge=1024,
        description="tensor entries read per source at once while the Gram matrix is computed: the selection "
                    "holds pool x block_entries float32 at most")


class RunConfig(BaseModel):
    model_config = _FROZEN
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    output_dir: str = Field(default="runs", description="the run folder is OUTPUT_DIR/NAME")
    sources: dict[str, str] = Field(min_length=2, description="model name -> Hugging Face folder")
    base_model: str | None = None
    tokenizer_source: str | None = Field(
        default=None,
        description="vocabulary of every merged candidate: base, union or a source name (mergekit's semantics: "
                    "embedding rows are matched by token); unset: as stored, or base when the sources' embedding "
                    "row counts differ. The tokenizer candidates are scored with is the one it names",
    )
    pad_to_multiple_of: int | None = Field(
        default=None, ge=1, description="round the merged embedding rows up to a multiple of this (as mergekit's "
                                        "tokenizer.pad_to_multiple_of)")
    zoo: ZooConfig | None = None
    space: SpaceConfig
    fitness: FitnessConfig
    optimizer: OptimizerConfig = CmaEsConfig()
    budget: BudgetConfig = BudgetConfig()
    resources: ResourcesConfig = ResourcesConfig()
    fidelity: FidelityConfig = FidelityConfig()
    trust_remote_code: bool = False
    source_selection: SourceSelectionConfig | None = Field(
        default=None, description="a pool of many sources: keep only some, chosen before any worker loads")

    @field_validator("optimizer", mode="before")
    @classmethod
    def _default_optimizer(cls, v: Any) -> Any:
        # ``name`` picks the options model; an ``optimizer:`` block without it means CMA-ES, the default
        if isinstance(v, dict) and "name" not in v:
            return {"name": "cma_es", **v}
        return v

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.base_model is not None and self.base_model not in self.sources:
            raise ValueError(f"base_model {self.base_model!r} is not one of sources ({', '.join(self.sources)})")
        if self.tokenizer_source not in (None, "base", "union") and self.tokenizer_source not in self.sources:
            raise ValueError(f"tokenizer_source {self.tokenizer_source!r}: use base, union or one of sources "
                             f"({', '.join(self.sources)})")
        if self.source_selection is not None and self.base_model is None:
            raise ValueError("source_selection: set base_model (the task vectors are taken relative to it)")
        if self.trust_remote_code:
            raise ValueError("trust_remote_code: models with custom code are not supported")
        return self
