"""Fused merge kernels: one compiled pass per tensor for the hot task-vector methods.

An eager merge of one tensor runs a dozen ATen operations, each streaming the ``(N, *S)`` task
vectors or an ``S``-sized temporary through memory; a TIES merge in eager mode touches memory ~20
times more than it must. Here the whole merge of one tensor — sparsification by given thresholds,
weighting, TIES sign election and agreement, normalization, ``lambda``, the base — is one
``torch.compile`` (Inductor) kernel that reads the base and each task vector once and writes the
result once, straight into its destination (a live parameter in place). The NaN/inf check is a
reduction in the same pass.

Served: the methods that declare a fused plan (``fused=`` when they register, see
:mod:`evomerge.merge.methods.base`: ``ties`` without rescale, ``task_arithmetic``, ``linear``), on CPU tensors of at least :data:`MIN_NUMEL` elements with at most :data:`MAX_SOURCES` task vectors.
Everything else (small tensors, other methods, CUDA tensors, a machine without a C++ compiler) runs
the eager methods. Fused and eager give the same bits: the kept entries are the same (ties at the
threshold included) and the arithmetic is the same sequence of IEEE operations (each product rounded,
then added, in source order; Inductor builds with ``-ffp-contract=off``, and the eager methods never
use fused multiply-adds), so the path taken never changes a merged model: a worker merging in place,
``evomerge merge`` on another machine, with or without a compiler, write identical tensors.

Magnitude thresholds come from :func:`~evomerge.merge.methods.sparsify.top_k_threshold` (O(1) with the
resident sorted-magnitude cache, an exact selection without), so the kept entries are exactly those of
the eager ``largest_mask``, ties to the lower flat index included.

``EVOMERGE_FUSED_KERNELS=0`` turns the fused path off; compiled code is cached under
``TORCHINDUCTOR_CACHE_DIR`` (workers point it into the run folder, see :func:`set_cache_dir`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from evomerge.merge.methods.arguments import resolve, work_dtype
from evomerge.merge.methods.base import METHODS, MergeMethod
from evomerge.merge.methods.sparsify import excluded_ties, fitting_orders, top_k_threshold

log = logging.getLogger(__name__)

__all__ = ["MAX_SOURCES", "MIN_NUMEL", "cache_scope", "fused_kernels", "fused_merge", "fused_status", "set_cache_dir"]

#: Tensors smaller than this (elements) merge eagerly: compiling cannot pay off there.
MIN_NUMEL = 1 << 16
#: More task vectors than this merge eagerly (the kernel unrolls one loop body per task vector).
MAX_SOURCES = 16

_enabled: bool | None = None if os.environ.get("EVOMERGE_FUSED_KERNELS", "1") != "0" else False
_min_numel = MIN_NUMEL
_compiled = None
_disabled_reason = "" if _enabled is None else "EVOMERGE_FUSED_KERNELS=0"


def _kernel(
    out: torch.Tensor,
    base: torch.Tensor,
    deltas: torch.Tensor,
    weights: torch.Tensor,
    lows: torch.Tensor,
    scalars: torch.Tensor,
    sparse: bool,
    consensus: bool,
    normalize: bool,
    positive: bool,
    scaled: tuple[bool, bool, bool],
) -> torch.Tensor:
    """``out <- base * coef + lambda * mix(deltas) / norm`` in one pass; returns 0 if the result is finite.

    ``deltas`` is ``(N, M)`` (any row stride), ``base`` and ``out`` ``(M,)``; ``weights`` and ``lows``
    ``(N,)``; ``scalars = [coef, norm, lambda]``, all in the work dtype; ``scaled`` says which of them are
    not 1 (only those are applied). With ``sparse`` row ``i`` keeps the entries with ``|d| > lows[i]``.
    Without ``consensus``, ``mix = sum_i w_i d_i``; with it (TIES), only the weighted entries that agree
    with the sign of that sum, divided with ``normalize`` by the weights of the agreeing sources (1 where
    none agrees; with ``positive`` weights, all >= the smallest normal float, a clamp gives the same). The
    returned 0-d tensor is ``sum(res - res)``: NaN when an entry is not finite.
    """
    wdt = weights.dtype
    terms = []
    total = None
    for i in range(deltas.shape[0]):
        r = deltas[i].to(wdt)
        if sparse:
            r = torch.where(r.abs() > lows[i], r, torch.zeros_like(r))
        wd = r * weights[i]
        terms.append(wd)
        total = wd if total is None else total + wd
    assert total is not None
    if consensus:
        sign = torch.copysign(torch.ones_like(total), total)
        mixed = torch.zeros_like(total)
        div = torch.zeros_like(total)
        for i, wd in enumerate(terms):
            agree = wd * sign > 0
            mixed = mixed + torch.where(agree, wd, torch.zeros_like(wd))
            if normalize:
                div = div + torch.where(agree, weights[i], torch.zeros_like(wd))
        if normalize:
            if positive:  # no agreeing source <=> div 0 <=> mixed 0: 0 / tiny = 0
                mixed = mixed / div.clamp_min(torch.finfo(wdt).tiny)
            else:
                mixed = mixed / torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed = total / scalars[1] if scaled[1] else total
    b = base.to(wdt)
    res = (b * scalars[0] if scaled[0] else b) + (mixed * scalars[2] if scaled[2] else mixed)
    out.copy_(res)
    return (res - res).sum()


def _inclusive_lows(thresholds: list[float], dtype: torch.dtype) -> torch.Tensor:
    """Per row, the largest value below its threshold (``|d| > low`` keeps ``|d| >= thr``); -1 keeps every entry."""
    thr = torch.tensor(thresholds, dtype=dtype)
    lows = torch.nextafter(thr, torch.full_like(thr, -torch.inf))
    lows[thr < 0] = -1.0  # density 1
    return lows


def _compiled_kernel():  # noqa: ANN202 - a torch.compile wrapper
    global _compiled
    if _compiled is None:
        # One specialization per (source count, dtype, flags): allow more than Dynamo's default 8 so that a long
        # search never falls back to an uncompiled call. Only raised, once (a config patch per call costs ~1 ms).
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 256)
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4096)
        _compiled = torch.compile(_kernel, dynamic=True, fullgraph=True)
    return _compiled


_CACHE_VAR = "TORCHINDUCTOR_CACHE_DIR"
_own_cache_dir: str | None = None  # the value this module put in the variable


def _user_cache_dir() -> str | None:
    """The cache folder the user chose, or None: unset, set by this module, or Inductor's own default (Inductor
    writes its default into the variable the first time it looks, and loading a transformers model does)."""
    current = os.environ.get(_CACHE_VAR)
    if not current or current == _own_cache_dir:
        return None
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        if os.path.abspath(current) == os.path.abspath(default_cache_dir()):
            return None
    except ImportError:  # pragma: no cover - other torch layouts: treat any value as the user's
        pass
    return current


def set_cache_dir(folder: str | Path) -> None:
    """Keep compiled kernels under ``folder`` unless the user set ``TORCHINDUCTOR_CACHE_DIR`` themselves.

    A folder set here earlier (by a previous run in the same process) is replaced, so each run's kernels stay in
    its own run folder. Inductor creates the folder as soon as it looks at it (loading a transformers model does),
    so call this once the models are loaded and the run folder exists or will be created around it.
    """
    global _own_cache_dir
    if _user_cache_dir() is not None:
        return
    _own_cache_dir = str(Path(folder).resolve())
    os.environ[_CACHE_VAR] = _own_cache_dir


@contextmanager
def cache_scope() -> Iterator[None]:
    """Within the block, compiled kernels go to a temporary folder removed afterwards, unless the user or a run
    chose a cache folder (``TORCHINDUCTOR_CACHE_DIR``, e.g. a run folder's): one-off merges leave nothing behind."""
    if _user_cache_dir() is not None or (_own_cache_dir and os.environ.get(_CACHE_VAR) == _own_cache_dir):
        yield
        return
    before = os.environ.get(_CACHE_VAR)
    with tempfile.TemporaryDirectory(prefix="evomerge-kernels-") as tmp:
        os.environ[_CACHE_VAR] = tmp
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(_CACHE_VAR, None)
            else:
                os.environ[_CACHE_VAR] = before


def fused_status() -> tuple[bool | None, str]:
    """``(enabled, reason)``: ``None`` = not tried yet, ``False`` with the reason it is off."""
    return _enabled, _disabled_reason


@contextmanager
def fused_kernels(enabled: bool, min_numel: int | None = None) -> Iterator[None]:
    """Force the fused path on (where it applies) or off, and optionally its size threshold, within the block."""
    global _enabled, _min_numel, _disabled_reason
    saved = _enabled, _min_numel, _disabled_reason
    _enabled = None if enabled else False
    _disabled_reason = "" if enabled else "turned off"
    if min_numel is not None:
        _min_numel = min_numel
    try:
        yield
    finally:
        _enabled, _min_numel, _disabled_reason = saved


def fused_merge(
    method: str | MergeMethod,
    base: torch.Tensor,
    deltas: torch.Tensor,
    sp: Mapping[str, Sequence[float]],
    gp: Mapping[str, float | bool],
    *,
    ref_sp: Mapping[str, float] | None = None,
    out: torch.Tensor | None = None,
    orders: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, bool] | None:
    """Merge one tensor with the fused kernel: ``(result, all finite)``, or None where the eager method must run.

    Same inputs and result as the method's eager function (:mod:`evomerge.merge.methods.base`); the result
    is written into ``out`` when given (same shape and dtype as ``base``, contiguous), else a new tensor.
    ``orders`` are the task vectors' magnitude orders, when resident (the thresholds are then read from them).
    """
    method = METHODS.get(method) if isinstance(method, str) else method
    global _enabled, _disabled_reason
    n = deltas.shape[0]
    if (
        _enabled is False
        or method.fused is None
        or base.device.type != "cpu"
        or not base.is_floating_point()
        or base.numel() < _min_numel
        or not 1 <= n <= MAX_SOURCES
    ):
        return None
    cd = work_dtype(base.dtype)
    plan = method.fused(resolve(method.name, base, deltas, sp, gp, ref_sp), cd)
    if plan is None:
        return None
    weights, densities, consensus, normalize = plan.weights, plan.densities, plan.consensus, plan.normalize
    scalars = [plan.coef, plan.norm, plan.lam]
    m = base.numel()
    flat = deltas.reshape(n, m)
    thresholds = [-1.0] * n
    excluded: list[torch.Tensor | None] = [None] * n
    sparse = densities is not None and any(d < 1.0 for d in densities)
    if sparse:
        assert densities is not None
        hints = fitting_orders(orders, n, m)
        for i, d in enumerate(densities):
            if d < 1.0:
                k = max(1, int(d * m))
                order = hints[i] if hints else None
                thresholds[i], cut = top_k_threshold(flat[i], k, order=order)
                if cut < m:
                    excluded[i] = excluded_ties(flat[i], k, thresholds[i], cut, order=order)
    if out is None or not out.is_contiguous() or out.shape != base.shape or out.dtype != base.dtype:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
    dest, src = out.view(-1), base.reshape(-1)
    w, sc = torch.tensor(weights, dtype=cd), torch.tensor(scalars, dtype=cd)
    lows = _inclusive_lows(thresholds, cd)
    flags = (sparse, consensus, normalize, min(weights) >= torch.finfo(cd).tiny, tuple(x != 1.0 for x in sc.tolist()))
    try:
        kernel = _compiled_kernel()
        check = kernel(dest, src, flat, w, lows, sc, *flags)
        ties = [e for e in excluded if e is not None]
        if ties:
            # Entries whose magnitude equals a row's threshold but lie past its tie cut were kept above; merge
            # them again with those rows' entries dropped (a dropped entry is a zero), by the same kernel.
            pos = torch.unique(torch.cat(ties))
            rows = flat[:, pos]
            for i, e in enumerate(excluded):
                if e is not None:
                    rows[i, torch.isin(pos, e)] = 0
            fixed = torch.empty(pos.numel(), dtype=base.dtype, device=base.device)
            check = check + kernel(fixed, src[pos], rows, w, lows, sc, *flags)
            dest[pos] = fixed
    except Exception as exc:  # no C++ compiler, an unsupported platform …: merge eagerly from now on
        _enabled, _disabled_reason = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        log.warning("fused merge kernels unavailable, merging eagerly: %s", _disabled_reason)
        return None
    _enabled = True
    # (a non-finite value at a re-merged entry may flag a finite result: check the output itself then)
    finite = bool(torch.isfinite(check)) or bool(torch.isfinite(dest).all())
    return out, finite
