"""The memory plan of a run: what each worker keeps resident, and whether it fits, before any work.

A worker keeps everything on its one device (:mod:`evomerge.driver.worker`):

* the reference model's floating-point tensors and one task vector per other source, in the run's dtype
  (:class:`~evomerge.merge.sources.ResidentSources`; every source of the run, whatever the space merges);
* for a method that ranks entries by magnitude (``magnitude_orders``: TIES) with the cache on, one int32
  magnitude order per task-vector entry;
* with the hf scorer, the live model candidates are merged into: a module of the reference's shapes in the run's
  dtype (a tied output head shares the input embedding's storage, so it is counted once);
* with the ``vllm`` scorer, no such model (each merged tensor is streamed into the engine as it is computed,
  :mod:`evomerge.merge.streaming`; one tensor in flight is within the merge workspace) but the engine's weights and
  its key/value cache. With ``resources.gpus_per_worker: N > 1`` the engine is tensor-parallel over N GPUs and holds
  1/N of its weights on each. On a GPU vLLM reserves :data:`VLLM_GPU_MEMORY_UTILIZATION` of the device's memory
  (its default; the run config does not set it) at start, weights included, and refuses to start when less than
  that is free; on a CPU its cache is the scorer's ``kv_cache_gib`` (``VLLM_CPU_KVCACHE_SPACE`` when set). A search
  space that routes layers (``routing``, ``hybrid``, ``layer_swap`` templates) still builds its routed models from a
  transformers copy of the reference, so its live model is counted with vllm too;
* a merge workspace: :data:`WORKSPACE_FACTOR` times the largest tensor in the run's dtype (TIES holds the
  merged sum, the elected signs, the divisor and one row of scratch at once; other methods hold less), plus,
  with magnitude orders, the sort of the largest task vector at load (an int64 index and a value per entry);
* on CUDA, the process's CUDA context (:data:`CUDA_CONTEXT_BYTES`, an estimate);
* for a data-informed merge (``Setup.stats_kinds``), the calibration statistics of every source
  (:func:`evomerge.merge.stats.stats_bytes`, float32): a diagonal Fisher is one entry per parameter; a Gram
  matrix is ``in^2`` per linear weight, and only for layers of at most ``max_gram_features`` inputs (the
  bound that keeps a 7B MLP's ``down_proj`` out: 11008^2 x 4 B = 485 MB each); activations ``in`` per linear
  weight. Linear weights are the 2-D attention and MLP tensors.

``resources.placement`` (:mod:`evomerge.merge.placement`) moves the sources: ``host`` keeps the reference, the task
vectors and the magnitude orders in (pinned) host memory, and the device holds two tensors' worth of them at a
time (:data:`STREAM_BUFFERS`, the double buffer); ``mmap`` keeps none of them, the device holds one tensor's
reference and task vectors at a time, and the page cache is not counted. ``auto`` takes the first of device,
host, mmap whose plan fits (device when the memory is unknown). On a CPU, host and device are one memory.

Not counted: the scorer's activations, which grow with ``fitness.batch_size`` and the suite's sequence lengths.

Everything is read from the sources' safetensors headers (shapes and dtypes; no weights) or, with
:func:`shapes_from`, from a built-in model config on PyTorch's meta device. The memory available is the
device's free memory (``torch.cuda.mem_get_info``), or an assumed size, and the host's (``/proc/meminfo``).
Both inputs (the shapes and the memory) are read by :mod:`evomerge.driver.plan_inputs`; this module reads a run's
config into a :class:`Setup` and :mod:`evomerge.driver.plan_compute` computes the plan from them and suggests
changes (its names are re-exported here).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from evomerge.config import RunConfig
from evomerge.driver.plan_compute import (  # noqa: F401  (the plan's parts and arithmetic: this module's interface)
    CUDA_CONTEXT_BYTES,
    ORDER_SORT_BYTES,
    SOURCE_PARTS,
    STREAM_BUFFERS,
    VLLM_CPU_KV_GIB,
    VLLM_GPU_MEMORY_UTILIZATION,
    WORKSPACE_FACTOR,
    GiB,
    Part,
    Plan,
    Setup,
    compute,
    dtype_name,
    fmt,
    statistics_bytes,
    suggest,
)
from evomerge.driver.plan_inputs import (  # noqa: F401  (SHAPES, shapes_from: part of this module's interface)
    SHAPES,
    Memory,
    Shapes,
    _folder_shapes,
    host_memory,
    probe_memory,
    shapes_from,
)
from evomerge.errors import ConfigError
from evomerge.merge.placement import PLACEMENTS

log = logging.getLogger(__name__)

# -- a run's plan ------------------------------------------------------------------------------------------


def _template(cfg: RunConfig) -> Any:
    from evomerge.spaces.template import load_template, parse_template

    template = load_template(cfg.space.template)
    if cfg.space.overrides:
        data = template.model_dump(mode="json") | dict(cfg.space.overrides)
        template = parse_template(data, source=f"{cfg.space.template} + space.overrides")
    return template


def template_stats(cfg: RunConfig) -> tuple[tuple[str, ...], int]:
    """The statistic kinds a data-informed search keeps resident per source (the method's, plus AIM's ``act``,
    counted for every source as an upper bound), and its ``data.max_gram_features``; ``((), 4096)`` for none."""
    from evomerge.merge.methods import METHODS

    template = _template(cfg)
    data = getattr(template, "data", None)
    method = getattr(template, "method", None)
    if data is None or method is None or method not in METHODS:
        return (), 4096
    kinds = set(METHODS.get(method).stats) | ({"act"} if data.aim > 0 else set())
    return tuple(sorted(kinds)), data.max_gram_features


def template_method(cfg: RunConfig) -> str | None:
    """The merge method of the run's search space (its template after ``space.overrides``)."""
    template = _template(cfg)
    method = getattr(template, "method", None)
    if method is None and getattr(template, "params", None) is not None:
        method = template.params.method
    return method


def space_routes(cfg: RunConfig) -> bool:
    """Whether the run's search space routes layers (its recipes have a ``routing:`` block)."""
    from evomerge.spaces.template import load_template

    return getattr(load_template(cfg.space.template), "kind", None) in ("routing", "hybrid", "layer_swap")


def magnitude_cache(cfg: RunConfig, method: str | None, device: torch.device, entries: int, n_deltas: int) -> bool:
    """Resolve ``resources.sorted_magnitude_cache`` for a method: never for one that does not read magnitude
    orders (``magnitude_orders``); ``true``: always; ``'auto'``: on the CPU, when the workers' extra int32 per
    task-vector entry stays under a quarter of the available host memory."""
    from evomerge.merge.methods import METHODS

    if method is None or method not in METHODS or not METHODS.get(method).magnitude_orders or n_deltas == 0:
        return False
    setting = cfg.resources.sorted_magnitude_cache
    if setting != "auto":
        return bool(setting)
    if device.type != "cpu":
        return False
    extra = 4 * entries * n_deltas * cfg.resources.workers
    available, _ = host_memory()
    if available is None:
        return False
    use = extra < available / 4
    log.info("magnitude-order cache %s (%.0f MB for %d worker(s))", "on" if use else "off", extra / 1e6,
             cfg.resources.workers)
    return use


def plan_run(
    cfg: RunConfig, *, shapes: Shapes | None = None, assume_gpu_memory: int | None = None,
    reference: str | None = None, orders: bool | None = None, memory: Memory | None = None,
    placement: str | None = None,
) -> Plan:
    """The memory plan of run ``cfg`` (see the module docstring).

    ``shapes``: the reference's tensors (default: read from its folder's headers); ``assume_gpu_memory``: plan
    for CUDA workers on a GPU of that many bytes; ``reference`` / ``orders``: as the preflight resolved them
    (default: ``base_model`` or the first source, and :func:`magnitude_cache` for the space's method);
    ``memory``: the memory available (default: :func:`probe_memory`); ``placement``: as the preflight resolved
    it (default: ``resources.placement``, ``auto`` chosen by :func:`choose_placement`).
    """
    from evomerge.driver.worker import resolve_device, resolve_dtype

    res = cfg.resources
    if assume_gpu_memory is not None:
        if res.device not in ("auto", "cuda") and not res.device.startswith("cuda:"):
            raise ConfigError(f"--assume-gpu-memory: resources.device is {res.device!r}, not a GPU")
        device = torch.device(res.device if res.device != "auto" else "cuda")
    else:
        device = resolve_device(res.device)
    dtype = resolve_dtype(res.dtype, device) or torch.float32
    reference = reference or cfg.base_model or next(iter(cfg.sources))
    n_deltas = len(cfg.sources) - 1
    pool = cfg.source_selection if cfg.source_selection is not None and n_deltas > cfg.source_selection.keep else None
    if pool is not None:
        n_deltas = pool.keep  # a pool: the workers hold only the kept sources (evomerge.merge.selection)
    if shapes is None:
        shapes = _folder_shapes(cfg, reference)
    if orders is None:
        orders = magnitude_cache(cfg, template_method(cfg), device, shapes.entries, n_deltas)
    ray = res.backend == "ray"
    workers = res.workers if ray else 1  # the local pool runs one worker
    per_device = 1
    if ray and device.type == "cuda" and 0 < res.gpus_per_worker < 1:
        per_device = min(workers, math.floor(1 / res.gpus_per_worker + 1e-9))
    per_host = None if ray and res.address else workers
    kv = os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    setup = Setup(
        n_deltas=n_deltas, dtype=dtype, orders=orders, scorer=cfg.fitness.scorer, device=device.type,
        workers=workers, workers_per_device=per_device, workers_per_host=per_host,
        gpus_per_worker=res.gpus_per_worker, routes=space_routes(cfg),
        kv_cpu_bytes=int(float(kv) * GiB) if kv and kv.replace(".", "", 1).isdigit() else int(VLLM_CPU_KV_GIB * GiB),
        **_factored(cfg, reference, n_deltas),
    )
    kinds, max_gram = template_stats(cfg)
    setup = replace(setup, stats_kinds=kinds, max_gram_features=max_gram)
    memory = memory or probe_memory(device, assume_gpu_memory)
    placement = placement or res.placement
    setup = replace(setup, placement=choose_placement(shapes, setup, memory) if placement == "auto" else placement)
    plan = compute(shapes, setup, memory)
    adapters = adapter_files(cfg)
    if adapters and res.adapter_residency == "dense":
        plan.notes.append(
            f"{len(adapters)} source(s) are LoRA adapters ({fmt(sum(adapters.values()))} as float32 factors): each "
            f"is held as a dense task vector (B·A·scale expanded once at load), counted above like a full source; "
            f"resources.adapter_residency: factored holds the factors instead")
    elif adapters:
        plan.notes.append(
            f"{len(adapters)} source(s) are LoRA adapters, held as their float32 factors (at most "
            f"{fmt(setup.factored_bytes)} for {setup.factored} kept) and expanded per tensor on every merge")
    if pool is not None:
        from evomerge.merge.selection import transient_bytes

        plan.notes.append(
            f"source_selection: {len(cfg.sources) - 1} sources in the pool, {pool.keep} kept; choosing them reads "
            f"each source once in blocks, {fmt(transient_bytes(len(cfg.sources) - 1, pool.block_entries))} at "
            f"most in the driver before the workers load")
    plan.suggestion = suggest(plan)
    return plan


def choose_placement(shapes: Shapes, setup: Setup, memory: Memory) -> str:
    """``resources.placement: auto``: the first of device, host, mmap whose plan fits; device when none is known to
    fit (unknown memory never moves the sources off the device, and a plan that fits nowhere is refused as such)."""
    if setup.factored:  # factored adapters are expanded on the device from resident factors
        return "device"
    for placement in PLACEMENTS:
        if placement == "host" and setup.device == "cpu":
            continue
        fits = compute(shapes, replace(setup, placement=placement), memory).fits
        if fits is None:
            return "device"
        if fits:
            return placement
    return "device"


def adapter_files(cfg: RunConfig) -> dict[str, int]:
    """Source name -> its adapter's tensors as float32 bytes (from the safetensors header), for the sources
    that are LoRA adapters."""
    from evomerge.io.adapter import ADAPTER_WEIGHTS, is_adapter, split_spec
    from evomerge.io.header import read_header

    out = {}
    for name, spec in cfg.sources.items():
        pair = split_spec(spec)
        folder = pair[1] if pair is not None else Path(spec).expanduser()
        if folder.is_dir() and is_adapter(folder) and (folder / ADAPTER_WEIGHTS).is_file():
            out[name] = 4 * sum(math.prod(t.shape) for t in read_header(folder / ADAPTER_WEIGHTS).values())
    return out


def _factored(cfg: RunConfig, reference: str, n_deltas: int) -> dict[str, int]:
    """``factored`` / ``factored_bytes`` of the plan's setup: with ``adapter_residency: factored``, the adapter
    sources; of a pool, the fewest adapters the kept sources can hold (the rest dense), at their largest."""
    if cfg.resources.adapter_residency != "factored":
        return {}
    sizes = sorted((b for m, b in adapter_files(cfg).items() if m != reference), reverse=True)
    full = len(cfg.sources) - 1 - len(sizes)
    k = max(0, n_deltas - full)
    return {"factored": k, "factored_bytes": sum(sizes[:k])}


def refusal(plan: Plan) -> str | None:
    """The one line :func:`~evomerge.driver.run.start_run` refuses a run with, or None to go ahead.

    Only memory known here counts: a GPU's free memory, or on a CPU the host's total memory (a plan over the
    host's available memory but under its total is logged as a warning). Unknown memory never refuses.
    """
    if plan.device_fits is False and not (plan.setup.device == "cpu" and _under_total(plan)):
        return no_fit_line(plan)
    if plan.setup.device != "cpu" and plan.host_fits is False and plan.host_need and plan.memory.host_total \
            and plan.host_need > plan.memory.host_total:
        return no_fit_line(plan)
    return None


def _under_total(plan: Plan) -> bool:
    need, total = plan.device_need, plan.memory.host_total
    return total is None or (need is not None and need <= total)


def no_fit_line(plan: Plan) -> str:
    fix = plan.suggestion or "no single change to sources, resources or the scorer makes it fit"
    return f"memory plan: {plan.verdict()}; smallest change that fits: {fix}"
