"""Materialization: the one place that walks a model's tensors and applies a recipe.

Two paths share one per-tensor kernel (:func:`merge_tensor`) so they give identical bits:

* :func:`materialize_to_disk` streams tensor by tensor from lazily opened source folders into a
  sharded safetensors writer (peak memory: a few tensors times the number of sources);
* :class:`InPlaceMerger` (with :class:`~evomerge.merge.sources.ResidentSources`) writes merged tensors
  straight into a live ``torch.nn.Module``'s parameters — the hot path of every search.

Task vectors are always formed the same way, ``delta = theta - reference`` in the compute dtype, so a
worker that keeps them resident and a streaming merge produce the same tensors.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import evomerge.merge.methods  # noqa: F401  (registers every method)
from evomerge.errors import ConfigError, MaterializeError
from evomerge.io.arch import TensorRole
from evomerge.merge.kernels import cache_scope, fused_kernels, fused_merge
from evomerge.merge.methods.base import MergeMethod
from evomerge.merge.methods.rng import tensor_generator
from evomerge.merge.tensor_params import delta_models, tensor_params, validate_recipe_params
from evomerge.names import DTYPES
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

#: A merge to disk compiles the fused kernels (seconds) only for models of at least this many elements.
ONE_OFF_FUSED_MIN_ELEMENTS = 1 << 28

#: The torch dtype of each dtype name a recipe or a run config may give.
TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}


def torch_dtype(name: str | None, fallback: torch.dtype) -> torch.dtype:
    return TORCH_DTYPES[name] if name else fallback


@dataclass(frozen=True)
class MergePlan:
    """A recipe bound to a model layout: the method and the resolved parameters of every tensor."""

    recipe: Recipe
    method: MergeMethod
    reference: str
    order: tuple[str, ...]
    num_layers: int
    #: Calibration statistics of a data-informed recipe (``fisher``, ``regmean``, AIM), else None.
    stats: MergeStats | None = None
    #: The method merging the tensors a data-informed method has no statistics for (``data.fallback``).
    fallback: MergeMethod | None = None

    @classmethod
    def build(cls, recipe: Recipe, num_layers: int, stats: MergeStats | None = None) -> MergePlan:
        method = validate_recipe_params(recipe)
        fallback = None
        reads = bool(method.stats) or (recipe.data is not None and recipe.data.aim > 0)
        if recipe.data is not None and method.stats:
            from evomerge.merge.methods.base import METHODS

            if recipe.data.fallback not in METHODS:
                raise ConfigError(f"data.fallback: unknown merge method {recipe.data.fallback!r}; "
                                  f"valid: {', '.join(METHODS.names())}")
            fallback = METHODS.get(recipe.data.fallback)
            if fallback.stats or fallback.randomized:
                raise ConfigError(f"data.fallback: {fallback.name!r} cannot be a fallback (it reads statistics "
                                  "or draws random masks); use linear or task_arithmetic")
        if reads and stats is None:
            raise ConfigError(f"data: recipe {recipe.hash} ({method.name}) reads calibration statistics, but none "
                              "were given; evomerge merge computes them from the recipe's data: block")
        return cls(recipe, method, recipe.reference_model, tuple(delta_models(recipe)), num_layers,
                   stats if reads else None, fallback)


def merge_tensor(
    plan: MergePlan,
    name: str,
    role: TensorRole,
    base: torch.Tensor,
    deltas: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    orders: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Merge one tensor. ``deltas`` is stacked ``(N, *base.shape)`` in ``plan.order``; ``orders`` are its rows'
    magnitude orders when the caller keeps them (methods that declare ``magnitude_orders`` read them).

    Large tensors of the methods :mod:`evomerge.merge.kernels` serves take its fused kernel, which writes
    into ``out`` when given (the caller must then use the returned tensor, which may or may not be ``out``).
    """
    if not base.is_floating_point():
        return base
    if plan.stats is not None:
        return _merge_informed(plan, name, role, base, deltas)
    tp = tensor_params(plan.recipe, plan.method, role, plan.num_layers, plan.order)
    try:
        orders = orders if plan.method.magnitude_orders else None
        fused = fused_merge(plan.method, base, deltas, tp.sp, tp.gp, ref_sp=tp.ref_sp, out=out, orders=orders)
        if fused is not None:
            merged, finite = fused
        else:
            gen = tensor_generator(plan.recipe.seed, name) if plan.method.randomized else None
            extra = {"orders": orders} if orders is not None else {}
            merged = plan.method.fn(base, deltas, tp.sp, tp.gp, ref_sp=tp.ref_sp, generator=gen, **extra)
            # A finite sum proves every entry finite; only an overflowing sum needs the full elementwise check.
            finite = bool(torch.isfinite(merged.sum())) or bool(torch.isfinite(merged).all())
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    if not finite:
        raise MaterializeError(
            f"{name}: merge method {plan.method.name!r} produced non-finite values (NaN/inf); "
            "check the sources for NaN weights and the recipe's parameters"
        )
    return merged


def _merge_informed(
    plan: MergePlan, name: str, role: TensorRole, base: torch.Tensor, deltas: torch.Tensor
) -> torch.Tensor:
    """Merge one tensor of a recipe that reads calibration statistics (eager; same on disk and in place).

    The method gets ``stats=`` stacked in ``plan.order``; a tensor some source lacks a statistic for is merged
    by ``plan.fallback`` with the parameters it shares with the method (by name; its own defaults otherwise),
    on the task vectors times the method's per-source ``scale`` when the method has one and the fallback not.
    AIM (``data.aim > 0``) then adjusts every linear weight the base model has activations for.
    """
    assert plan.stats is not None and plan.recipe.data is not None
    tp = tensor_params(plan.recipe, plan.method, role, plan.num_layers, plan.order)
    method, sp, gp, extra = plan.method, tp.sp, tp.gp, {}
    if method.stats:
        found = {k: plan.stats.stacked(k, name, plan.order) for k in method.stats}
        if all(v is not None for v in found.values()):
            extra = {"stats": found}
        else:
            assert plan.fallback is not None
            method = plan.fallback
            own = {p.name: p.scope for p in method.params}
            if "scale" in tp.sp and "scale" not in own:  # the method's task-vector scale holds for these too
                scales = torch.tensor([float(v) for v in tp.sp["scale"]], dtype=deltas.dtype, device=deltas.device)
                deltas = deltas * scales.reshape(-1, *([1] * (deltas.dim() - 1)))
            sp = {k: v for k, v in tp.sp.items() if own.get(k) == "source"}
            gp = {k: v for k, v in tp.gp.items() if own.get(k) == "global"}
    try:
        merged = method.fn(base, deltas, sp, gp, ref_sp=tp.ref_sp if not method.needs_base else None, **extra)
    except ConfigError as exc:
        raise ConfigError(f"{name}: {exc}") from exc
    omega = plan.recipe.data.aim
    act = plan.stats.one("act", name, plan.reference) if omega > 0 else None
    if act is not None and base.dim() == 2 and act.shape == (base.shape[1],):
        merged = aim_adjust(base, merged, act, omega)
    if not bool(torch.isfinite(merged).all()):
        raise MaterializeError(f"{name}: merge method {method.name!r} produced non-finite values (NaN/inf); "
                               "check the sources and the statistics")
    return merged


# --------------------------------------------------------------------------- to disk
def _open_sources(recipe: Recipe, paths: Mapping[str, str | Path] | None):  # -> dict[str, ModelFolder]
    from evomerge.io import ModelFolder, check_mergeable

    paths = dict(recipe.sources) | dict(paths or {})
    missing = [m for m in recipe.model_names if m not in paths]
    if missing:
        # a model named by path (mergekit style) binds to itself
        for m in missing:
            if Path(m).expanduser().is_dir():
                paths[m] = m
        missing = [m for m in recipe.model_names if m not in paths]
    if missing:
        raise ConfigError(f"sources: no folder given for model(s) {missing}; add them under 'sources:'")
    folders = {m: ModelFolder.open(Path(paths[m]).expanduser()) for m in recipe.model_names}
    check_mergeable(folders, vocab=True)
    return folders


def iter_merged(
    recipe: Recipe, folders: Mapping[str, object], *, device: str | torch.device = "cpu",
    vocab: VocabPlan | None = None, stats: MergeStats | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, merged tensor)`` for every tensor of the reference model, streaming from disk.

    Vocabulary tensors are laid out in the output vocabulary of ``vocab`` (default: the recipe's plan).
    """
    from evomerge.io import tensor_role
    from evomerge.io.adapter import exact_delta

    ref_name = recipe.reference_model
    ref = folders[ref_name]
    plan = MergePlan.build(recipe, ref.num_layers, stats)
    vocab = vocab if vocab is not None else recipe_plan(recipe, folders)
    by_token = set(vocab_tensors(ref)) if vocab.aligns else set()
    others = [folders[m] for m in plan.order]
    tied = tied_head(ref)
    if tied is not None:
        check_tied_head(tied, {m: folders[m] for m in (ref_name, *plan.order)})
    for name in ref.tensor_names:
        if tied is not None and name == tied[0]:
            continue  # the output projection is the input embedding: merged once, stored once
        dtype = torch_dtype(recipe.dtype, ref.dtype(name))
        base = ref.get(name, device=device, dtype=dtype)
        check_finite(name, ref_name, base)
        role = tensor_role(name, ref.model_type)
        if name in by_token:
            raw = {ref_name: base}
            for m in vocab.models[1:]:
                raw[m] = folders[m].get(name, device=device, dtype=dtype)
                check_finite(name, m, raw[m])
            laid = vocab.align(raw)
            base = laid[ref_name]
            deltas = torch.stack([laid[m] - base for m in plan.order]) if others else base.new_empty((0, *base.shape))
            del raw, laid
        elif base.is_floating_point() and others:
            deltas = torch.empty((len(others), *base.shape), dtype=base.dtype, device=base.device)
            for i, (mname, f) in enumerate(zip(plan.order, others, strict=True)):
                if exact_delta(f, ref, name, deltas[i]):  # an adapter on the reference: B·A·scale
                    check_finite(name, mname, deltas[i])
                    continue
                t = f.get(name, device=device, dtype=dtype)
                check_finite(name, mname, t)
                torch.sub(t, base, out=deltas[i])
                del t
        else:
            deltas = base.new_empty((0, *base.shape))
        yield name, merge_tensor(plan, name, role, base, deltas)


def tied_head(folder) -> tuple[str, str] | None:  # noqa: ANN001  (a ModelFolder)
    """``(head, embedding)`` names when ``folder`` ties its output projection to its input embedding but
    also stores the projection (with the same values, else transformers would load it untied), else None."""
    from evomerge.io import tensor_role

    if not folder.tied_embeddings:
        return None
    roles = {n: tensor_role(n, folder.model_type).kind for n in folder.tensor_names}
    heads = [n for n, k in roles.items() if k == "lm_head"]
    embeds = [n for n, k in roles.items() if k == "embed" and heads and folder.shape(n) == folder.shape(heads[0])]
    if len(heads) != 1 or len(embeds) != 1:
        return None
    same = torch.equal(folder.get(heads[0], copy=False), folder.get(embeds[0], copy=False))
    return (heads[0], embeds[0]) if same else None


def check_tied_head(tied: tuple[str, str], folders: Mapping[str, object]) -> None:
    """:class:`SourceMismatchError` unless every source stores its tied head equal to its embedding."""
    from evomerge.errors import SourceMismatchError

    head, embed = tied
    for model, folder in folders.items():
        if head in folder and not torch.equal(folder.get(head, copy=False), folder.get(embed, copy=False)):
            raise SourceMismatchError(
                f"{folder.path}: {head} differs from {embed} in {model!r}, but the reference model ties "
                f"them (tie_word_embeddings); set tie_word_embeddings to false in {model!r}'s config.json "
                f"if its output projection is separate, or merge it with untied models"
            )


def model_card(recipe: Recipe, extra: str = "") -> str:
    return (
        "---\ntags: [merge, evomerge]\n---\n# Merged model\n\n"
        f"Produced by evomerge from the recipe below (hash `{recipe.hash}`).\n\n"
        f"```yaml\n{recipe.to_yaml()}```\n{extra}"
    )


def materialize_to_disk(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    paths: Mapping[str, str | Path] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    overwrite: bool = False,
    device: str = "cpu",
    card_extra: str = "",
    progress: Callable[[int, int], None] | None = None,
    fused: bool | None = None,
    stats: MergeStats | None = None,
) -> Path:
    """Merge ``recipe`` into an HF folder at ``out_dir`` (written atomically; streams tensor by tensor).

    ``fused``: use the compiled kernels of :mod:`evomerge.merge.kernels` (same bits either way); ``None``
    decides by model size (:data:`ONE_OFF_FUSED_MIN_ELEMENTS`). ``stats``: the calibration statistics of a
    data-informed recipe (:func:`evomerge.merge.stats.recipe_stats`).
    """
    from evomerge.io import ModelWriter

    folders = _open_sources(recipe, paths)
    ref = folders[recipe.reference_model]
    vocab = recipe_plan(recipe, folders)
    config = set_vocab_size(ref.config, vocab.size) if vocab.aligns else dict(ref.config)
    if recipe.dtype:
        config["torch_dtype"] = recipe.dtype
        config["dtype"] = recipe.dtype
    writer = ModelWriter(Path(out_dir), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    if recipe.routing is not None:
        from evomerge.merge.routing import export_routed

        if stats is not None:
            raise ConfigError("routing: layer routing over a data-informed merge is not supported")
        if vocab.aligns:
            raise ConfigError("routing: layer routing over models whose vocabularies differ is not supported; "
                              "merge them with a parameter-space method")
        tensors, config = export_routed(recipe, folders, config, iter_merged_fn=iter_merged, device=device)
    else:
        tensors = iter_merged(recipe, folders, device=device, vocab=vocab, stats=stats)
    total = len(ref.tensor_names) - (recipe.routing is None and tied_head(ref) is not None)
    t0 = time.perf_counter()
    if fused is None:  # compiling costs seconds: a one-off merge of a small model is faster without
        fused = sum(math.prod(ref.shape(n)) for n in ref.tensor_names) >= ONE_OFF_FUSED_MIN_ELEMENTS
    with cache_scope() if fused else fused_kernels(False):
        for i, (name, tensor) in enumerate(tensors):
            writer.add(name, tensor.to("cpu"))
            if progress:
                progress(i + 1, total)
    if vocab.tokenizer is None and vocab.tokenizer_dir is None:
        log.warning("no source folder has tokenizer files (%s): the merged model is written without a tokenizer",
                    ", ".join(str(f.path) for f in folders.values()))
    elif vocab.tokenizer_model != recipe.reference_model or vocab.source == "union":
        log.info("tokenizer of the merged model: %s", vocab.describe())
    out = writer.finish(
        config,
        tokenizer_from=vocab.tokenizer_dir,
        tokenizer=vocab.tokenizer,
        generation_config_from=ref.path,
        model_card=model_card(recipe, card_extra),
    )
    log.info("merged %s into %s in %.2fs", recipe.hash, out, time.perf_counter() - t0)
    return Path(out)


def materialize_state_dict(
    recipe: Recipe, paths: Mapping[str, str | Path] | None = None, *, device: str = "cpu",
    stats: MergeStats | None = None,
) -> dict[str, torch.Tensor]:
    """The merged model as an in-memory state dict (small models, tests)."""
    folders = _open_sources(recipe, paths)
    return dict(iter_merged(recipe, folders, device=device, stats=stats))



# --------------------------------------------------------------------------- in place
class InPlaceMerger:
    """Write a recipe's merged tensors straight into a live module's parameters.

    ``sources`` holds the reference and the stacked task vectors resident on the module's device; the
    module's parameters are overwritten in place (no second model, no disk).
    """

    def __init__(self, sources: ResidentSources, module: torch.nn.Module,  # noqa: F821
                 stats: MergeStats | None = None) -> None:
        from evomerge.merge.live import aliased, live_targets

        self.sources = sources
        self.stats = stats
        self.module = module
        targets = live_targets(module, sources.names, sources.shapes)
        for name, kept in _tied_pairs(aliased(targets), sources.roles).items():
            _check_tied_sources(sources, name, kept)
            del targets[name]
        self.targets = targets

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The live model's merged tensors under the source checkpoint's names (views, not copies).

        What a scorer that loads weights by checkpoint name (vLLM) needs: fused MoE experts appear as the
        checkpoint's per-expert tensors, and a tied output projection only as the input embedding.
        """
        return dict(self.targets)

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> dict[str, float]:
        """Merge ``recipe`` into the live module; return timings in seconds."""
        t0 = time.perf_counter()
        plan = MergePlan.build(recipe, self.sources.num_layers, self.stats)
        for name, merged in merge_resident(plan, self.sources, list(self.targets), out=self.targets):
            dest = self.targets[name]
            if merged is not dest:
                dest.copy_(merged)
        if self.sources.device.type == "cuda":
            torch.cuda.synchronize(self.sources.device)
        return {"merge": time.perf_counter() - t0}


def merge_resident(
    plan: MergePlan, sources: ResidentSources, names: Sequence[str], *, out: Mapping[str, torch.Tensor] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, merged tensor)`` for each of ``names`` in turn, merged from resident ``sources``: the per-tensor step
    of both the in-place merge (:class:`InPlaceMerger`) and the streamed one (:mod:`evomerge.merge.streaming`).

    The tensors come tensor by tensor from where the sources are kept (``resources.placement``, see
    :mod:`evomerge.merge.placement`). ``out`` maps names to tensors the fused kernels may write the result into
    (the live module's); without it every merged tensor is a new one.
    """
    select = sources.row_index(plan)
    for name, base, deltas, orders in sources.stream(list(names), select):
        dest = None if out is None else out[name]
        yield name, merge_tensor(plan, name, sources.roles[name], base, deltas, out=dest, orders=orders)


def _tied_pairs(pairs: Mapping[str, str], roles: Mapping[str, TensorRole]) -> dict[str, str]:
    """Of each pair of names sharing one live tensor: the name not to write -> the name written.

    The output projection of a tied model is never written: the input embedding is (the merge to disk
    drops a stored tied head the same way).
    """
    out: dict[str, str] = {}
    for name, first in pairs.items():
        if roles[first].kind == "lm_head" and roles[name].kind != "lm_head":
            name, first = first, name
        out[name] = first
    return out


def _check_tied_sources(sources: ResidentSources, name: str, kept: str) -> None:
    same = sources.shapes[name] == sources.shapes[kept] and torch.equal(
        sources.deltas[name], sources.deltas[kept]
    )
    if not same:
        raise MaterializeError(
            f"{name} and {kept} are one tied tensor in the live model (tie_word_embeddings), but differ in "
            f"some source; set tie_word_embeddings to false in that source's config.json"
        )


from evomerge.merge.sources import ResidentSources, check_finite  # noqa: E402
from evomerge.merge.stats import MergeStats, aim_adjust  # noqa: E402
from evomerge.merge.vocab import VocabPlan, recipe_plan, set_vocab_size, vocab_tensors  # noqa: E402

__all__ = [
    "InPlaceMerger",
    "MergePlan",
    "ResidentSources",
    "iter_merged",
    "materialize_state_dict",
    "materialize_to_disk",
    "merge_resident",
    "merge_tensor",
]
