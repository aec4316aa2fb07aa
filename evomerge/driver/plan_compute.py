"""The arithmetic of the memory plan: the parts a worker keeps resident for a setup and shapes, whether they fit,
and the smallest change that makes them fit.

What each part is and why is in :mod:`evomerge.driver.plan`, which reads a run's config into a :class:`Setup`
and calls :func:`compute`; this module knows nothing of run configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from evomerge.driver.plan_inputs import Memory, Shapes
from evomerge.merge.placement import PLACEMENTS

GiB = 2**30
#: The parts that are the resident sources (where the placement keeps them).
SOURCE_PARTS = ("reference weights", "task vectors", "magnitude orders")
#: Merge workspace in units of the largest tensor (see the module docstring).
WORKSPACE_FACTOR = 4
#: Bytes per entry of the transient sort that builds a magnitude order (int64 index + value) at load.
ORDER_SORT_BYTES = 16
#: The CUDA context of a worker process (an estimate: 0.3-0.6 GiB on current drivers).
CUDA_CONTEXT_BYTES = GiB // 2
#: The share of a GPU's memory a vLLM engine reserves at start (vLLM's ``gpu_memory_utilization`` default).
VLLM_GPU_MEMORY_UTILIZATION = 0.9
#: vLLM's key/value cache on a CPU (the vllm scorer's ``kv_cache_gib`` default), in GiB.
VLLM_CPU_KV_GIB = 1.0
#: Tensors of the sources the ``host`` placement holds on the device at once (the one merging, the one copying).
STREAM_BUFFERS = 2



@dataclass(frozen=True)
class Setup:
    """What the plan depends on besides the shapes (the fields a suggested change varies)."""

    n_deltas: int
    dtype: torch.dtype
    orders: bool
    scorer: str
    device: str  # "cuda", "cpu", ...
    workers: int
    workers_per_device: int
    workers_per_host: int | None  # None: the workers' hosts are not this one (a Ray cluster)
    gpus_per_worker: float = 0
    kv_cpu_bytes: int = int(VLLM_CPU_KV_GIB * GiB)
    placement: str = "device"  # where the sources are kept (merge/placement.py)
    factored: int = 0  # task vectors of LoRA adapters held as their factors (resources.adapter_residency)
    factored_bytes: int = 0  # their float32 factors, at most
    #: Calibration statistics a data-informed merge keeps per source (``fisher``, ``gram``, ``act``).
    stats_kinds: tuple[str, ...] = ()
    max_gram_features: int = 4096
    #: The space routes layers (a transformers copy of the reference is loaded even with the vllm scorer).
    routes: bool = False

    @property
    def live_model(self) -> bool:
        """Whether a worker keeps a transformers model of the reference to merge into."""
        return self.scorer != "vllm" or self.routes

    @property
    def tensor_parallel(self) -> int:
        """The vllm engine's ranks (``gpus_per_worker`` above 1 on a GPU), else 1."""
        return int(self.gpus_per_worker) if self.scorer == "vllm" and self.gpus_per_worker > 1 else 1


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int | None  # None: depends on memory not known here
    note: str = ""


@dataclass
class Plan:
    shapes: Shapes
    setup: Setup
    memory: Memory
    parts: list[Part]
    host_parts: list[Part]  # on a GPU: what a worker holds in host memory while it loads
    suggestion: str | None = None
    blocked: str | None = None  # a reason it cannot fit whatever the memory
    notes: list[str] = field(default_factory=list)

    @property
    def per_worker(self) -> int:
        return sum(p.bytes or 0 for p in self.parts)

    @property
    def resident(self) -> int:
        """Bytes of the sources (reference, task vectors, magnitude orders) a worker keeps, wherever it keeps them."""
        kept = self.parts if self.setup.placement == "device" or self.setup.device == "cpu" else self.host_parts
        return sum(p.bytes or 0 for p in kept if p.name in SOURCE_PARTS)

    def where(self) -> str:
        """The placement and where its resident bytes are: ``placement host: 45.0 GiB in pinned host memory``."""
        s = self.setup
        at = {"device": f"on {s.device}", "host": "in host memory" if s.device == "cpu" else "in pinned host memory",
              "mmap": "(none: read from the safetensors files at each merge)"}[s.placement]
        return f"placement {s.placement}: sources {fmt(self.resident)} {at}" if s.placement != "mmap" \
            else f"placement mmap: sources {at}"

    @property
    def device_need(self) -> int | None:
        """Bytes one device needs for the workers it holds (None: vLLM's share of an unknown device)."""
        if any(p.bytes is None for p in self.parts):
            return None
        return self.per_worker * self.setup.workers_per_device

    @property
    def host_need(self) -> int | None:
        if self.setup.workers_per_host is None:
            return None
        per = self.per_worker if self.setup.device == "cpu" else sum(p.bytes or 0 for p in self.host_parts)
        return per * self.setup.workers_per_host

    @property
    def device_fits(self) -> bool | None:
        if self.blocked:
            return False
        need, free = self.device_need, self.memory.device_free
        return None if need is None or free is None else need <= free

    @property
    def host_fits(self) -> bool | None:
        need, avail = self.host_need, self.memory.host_available
        return None if need is None or avail is None else need <= avail

    @property
    def fits(self) -> bool | None:
        """False when the device or the host is known to be too small; None when the device is unknown."""
        if self.device_fits is False or self.host_fits is False:
            return False
        return self.device_fits

    def verdict(self) -> str:
        where = "per GPU" if self.setup.device == "cuda" else f"on {self.setup.device}"
        need = self.device_need
        if self.blocked:
            return f"does not fit: {self.blocked}"
        if self.device_fits is False:
            have = fmt(self.memory.device_free)
            return f"does not fit: needs {fmt(need)} {where}, {have} {self.memory.device_source}"
        if self.host_fits is False:
            return (f"does not fit: the host needs {fmt(self.host_need)} for {self.setup.workers_per_host} worker(s), "
                    f"{fmt(self.memory.host_available)} available")
        if self.device_fits is None:
            return (f"needs {fmt(need) if need is not None else fmt(self.per_worker) + ' + vLLM share'} {where}; "
                    f"device memory unknown here (give --assume-gpu-memory)")
        return f"fits: {fmt(need)} {where} of {fmt(self.memory.device_free)} {self.memory.device_source}"

    def summary(self) -> str:
        parts = ", ".join(f"{p.name} {fmt(p.bytes)}" for p in self.parts if p.bytes != 0)
        return f"memory plan per worker on {self.setup.device} ({self.where()}): {parts}; {self.verdict()}"

    def table(self) -> Any:
        from rich.table import Table

        s = self.setup
        title = (f"memory plan: {self.shapes.label}, {s.n_deltas} task vector(s), {dtype_name(s.dtype)}, "
                 f"scorer {s.scorer}, {s.workers} worker(s), {s.workers_per_device} per device; {self.where()}")
        table = Table(title=title, title_justify="left")
        table.add_column("part")
        table.add_column("bytes per worker", justify="right")
        table.add_column("GiB", justify="right")
        table.add_column("note")
        for p in self.parts:
            table.add_row(p.name, "?" if p.bytes is None else f"{p.bytes:,}",
                          "?" if p.bytes is None else f"{p.bytes / GiB:.2f}", p.note)
        table.add_row("[bold]total per device[/]", *_cells(self.device_need), "")
        m = self.memory
        table.add_row(f"available ({m.device_source})", *_cells(m.device_free), "")
        if s.device != "cpu":
            for p in self.host_parts:
                table.add_row(f"host: {p.name}", *_cells(p.bytes), p.note)
        table.add_row(f"host available (of {fmt(m.host_total)})", *_cells(m.host_available),
                      "" if s.workers_per_host is not None else "workers on the cluster's nodes: not checked")
        return table


def _cells(n: int | None) -> tuple[str, str]:
    return ("?", "?") if n is None else (f"{n:,}", f"{n / GiB:.2f}")


def fmt(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def statistics_bytes(shapes: Shapes, setup: Setup) -> int:
    """Bytes of the calibration statistics of every source (the reference included), module docstring."""
    from evomerge.io import tensor_role
    from evomerge.merge.stats import stats_bytes

    linear_in = {n: s[1] for n, s in shapes.tensors.items()
                 if len(s) == 2 and tensor_role(n).kind in ("attn", "mlp")}
    one = stats_bytes(shapes.tensors, linear_in, setup.stats_kinds, setup.max_gram_features)
    return (setup.n_deltas + 1) * one


def compute(shapes: Shapes, setup: Setup, memory: Memory) -> Plan:
    """The parts of ``setup`` for a reference of ``shapes`` (see the module docstring), checked against ``memory``."""
    el = _bytes(setup.dtype)
    n = setup.n_deltas
    live = shapes.live_entries * el
    orders = setup.orders and setup.placement != "mmap"
    sources = [
        Part("reference weights", shapes.entries * el, f"{len(shapes.tensors)} tensors"),
        Part("task vectors", (n - setup.factored) * shapes.entries * el + setup.factored_bytes,
             f"{n} x reference" if not setup.factored
             else f"{n - setup.factored} x reference + {setup.factored} adapter(s) as factors"),
        Part("magnitude orders", 4 * n * shapes.entries if orders else 0,
             "int32 per task-vector entry" if orders else "off"),
    ]
    host_sources: list[Part] = []
    if setup.placement == "device" or (setup.placement == "host" and setup.device == "cpu"):
        parts = list(sources)
    else:  # on the device: the tensors in flight only
        group = (n + 1) * shapes.largest * el + (4 * n * shapes.largest if orders else 0)
        if setup.placement == "host":
            host_sources = [replace(p, note=f"{p.note}, pinned" if p.note != "off" else "off") for p in sources]
            moved = Part("stream buffers", STREAM_BUFFERS * group,
                         f"{STREAM_BUFFERS} x the largest tensor's reference + task vectors (double buffer)")
        else:
            moved = Part("read buffers", group, "the largest tensor's reference + task vectors, read from the files")
        parts = [replace(p, bytes=0, note="in host memory" if setup.placement == "host" else "not resident")
                 for p in sources] + [moved]
    if setup.live_model:
        parts.append(Part("live model", live, ("tied head counted once" if shapes.tied else "")
                          + ("; loaded for layer routing" if setup.scorer == "vllm" else "")))
    if setup.scorer == "vllm":
        if setup.device == "cuda":
            tp = setup.tensor_parallel
            weights = math.ceil(shapes.live_entries * 2 / tp)  # vLLM's 'auto' dtype on a GPU is 16-bit
            share = None if memory.device_total is None else int(VLLM_GPU_MEMORY_UTILIZATION * memory.device_total)
            parts.append(Part("vLLM engine weights", weights, "16-bit" + (f", 1/{tp} per GPU (tensor parallel)"
                                                                          if tp > 1 else "")))
            parts.append(Part("vLLM KV cache + activations", None if share is None else share - weights,
                              f"rest of {VLLM_GPU_MEMORY_UTILIZATION:g} x device"))
        else:
            parts.append(Part("vLLM engine weights", shapes.live_entries * 4, "float32 on a CPU"))
            parts.append(Part("vLLM KV cache", setup.kv_cpu_bytes, "kv_cache_gib"))
    work = WORKSPACE_FACTOR * shapes.largest * el + (ORDER_SORT_BYTES * shapes.largest if orders else 0)
    work += n * shapes.largest * el if setup.factored else 0  # one tensor's task vectors, expanded
    parts.append(Part("merge workspace", work, f"{WORKSPACE_FACTOR} x largest tensor"
                                                + (" + its sort at load" if orders else "")
                                                + (f" + {n} expanded task vectors of it" if setup.factored else "")))
    if setup.stats_kinds:
        parts.append(Part("calibration statistics", statistics_bytes(shapes, setup),
                          f"{'+'.join(setup.stats_kinds)}, float32, {setup.n_deltas + 1} models"))
    if setup.device == "cuda":
        parts.append(Part("CUDA context", CUDA_CONTEXT_BYTES, "estimate"))
    host = [*host_sources]
    if setup.live_model:
        host.append(Part("live model staging", live, "from_pretrained loads on the host, then moves"))
    plan = Plan(shapes, setup, memory, parts, host)
    if setup.scorer == "vllm" and setup.device == "cuda":
        weights, kv = (p.bytes for p in parts if p.name.startswith("vLLM"))
        if kv is not None and kv <= 0:
            plan.blocked = f"vLLM's {VLLM_GPU_MEMORY_UTILIZATION:g} share of the device is smaller than its weights"
            at = next(i for i, x in enumerate(parts) if x.name.startswith("vLLM KV"))
            parts[at] = replace(parts[at], bytes=0, note="none left: the share is under the weights")
            kv = 0
        beside = plan.per_worker - (weights or 0) - (kv or 0)
        plan.notes.append(
            f"vLLM starts only with {VLLM_GPU_MEMORY_UTILIZATION:g} of the device free: the {fmt(beside)} held "
            f"beside the engine must fit in the other {1 - VLLM_GPU_MEMORY_UTILIZATION:.1g}; even without that "
            f"rule the worker needs {fmt(beside + (weights or 0))} + a KV cache")
    if setup.tensor_parallel > 1 and setup.device == "cuda":
        plan.notes.append(f"gpus_per_worker {setup.gpus_per_worker:g}: the vLLM engine is tensor-parallel over "
                          f"{setup.tensor_parallel} GPUs (the parts above are its first GPU's: the sources and the "
                          "merge stay there); its other GPUs hold their share of the weights and KV cache")
    elif setup.gpus_per_worker > 1:
        plan.notes.append(f"gpus_per_worker {setup.gpus_per_worker:g}: a worker holds everything on its first GPU; "
                          "the others stay idle")
    return plan


def _changes(setup: Setup, shapes: Shapes) -> list[tuple[str, Setup]]:
    """Single changes to try, smallest first: (the config change, its setup)."""
    out: list[tuple[str, Setup]] = []
    # another placement changes no result, only the merge's speed: host (a copy per merge) before any change that
    # alters results or the search; mmap (the files read at each merge) only when nothing else fits (suggest)
    later = PLACEMENTS[PLACEMENTS.index(setup.placement) + 1:] if setup.placement in PLACEMENTS else ()
    moves = {p: (f"resources.placement: {p} (" + ("sources in pinned host memory, streamed" if p == "host"
                                                   else "sources read from the files") + ")",
                 replace(setup, placement=p)) for p in later if not (p == "host" and setup.device == "cpu")}
    if setup.orders:
        out.append(("resources.sorted_magnitude_cache: false", replace(setup, orders=False)))
    if "host" in moves:
        out.append(moves["host"])
    if setup.dtype == torch.float32:
        out.append(("resources.dtype: bfloat16", replace(setup, dtype=torch.bfloat16)))
    if setup.device == "cuda" and setup.workers_per_device > 1:
        for k in range(setup.workers_per_device - 1, 0, -1):
            out.append((f"resources.gpus_per_worker: {1 / k:g} ({k} worker(s) per GPU)",
                        replace(setup, workers_per_device=k, gpus_per_worker=1 / k)))
    if setup.device == "cpu" and (setup.workers_per_host or 0) > 1:
        for k in range(setup.workers_per_host - 1, 0, -1):  # type: ignore[operator]
            out.append((f"resources.workers: {k} (fewer workers per node)", replace(setup, workers=k,
                                                                                     workers_per_host=k)))
    if setup.scorer == "vllm":
        out.append(("fitness.scorer: hf (a live model instead of vLLM's weights, KV cache and reservation)",
                    replace(setup, scorer="hf")))
    for k in range(1, setup.n_deltas):
        out.append((f"{k} source(s) fewer ({setup.n_deltas - k} task vector(s))", replace(setup, n_deltas=setup.n_deltas - k)))
    return out


def suggest(plan: Plan) -> str | None:
    """The smallest change that makes ``plan`` fit: one change, else the changes above combined in order, else
    the same with the sources read from the files (``resources.placement: mmap``, the last resort)."""
    found = _suggest(plan)
    if found is not None or plan.setup.placement == "mmap":
        return found
    mmap = compute(plan.shapes, replace(plan.setup, placement="mmap"), plan.memory)
    text = "resources.placement: mmap (sources read from the files)"
    if mmap.fits:
        return f"{text}: {mmap.verdict()}"
    more = _suggest(mmap)
    return None if more is None else f"{text} and {more}"


def _suggest(plan: Plan) -> str | None:
    if plan.fits is not False:
        return None
    changes = _changes(plan.setup, plan.shapes)
    for text, setup in changes:
        p = compute(plan.shapes, setup, plan.memory)
        if p.fits:
            return f"{text}: {p.verdict()}"
    # combine: every change that is not a source count, then drop sources one by one
    combined, texts = plan.setup, []
    for text, setup in changes:
        if "source(s) fewer" in text or "placement" in text or ("per GPU" in text and texts and "per GPU" in texts[-1]) \
                or ("fewer workers" in text and texts and "fewer workers" in texts[-1]):
            continue
        combined = _merge(combined, setup, plan.setup)
        texts.append(text)
    for k in range(0, plan.setup.n_deltas):
        trial = replace(combined, n_deltas=plan.setup.n_deltas - k)
        p = compute(plan.shapes, trial, plan.memory)
        if p.fits:
            extra = [f"{k} source(s) fewer"] if k else []
            return " and ".join(texts + extra) + f": {p.verdict()}"
    return None


def _merge(acc: Setup, change: Setup, orig: Setup) -> Setup:
    diff = {f: getattr(change, f) for f in Setup.__dataclass_fields__ if getattr(change, f) != getattr(orig, f)}
    return replace(acc, **diff)
