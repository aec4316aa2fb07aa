"""Choosing which sources of a large pool a search spends its genes on (``source_selection:``).

A pool of many fine-tunes of one base (10-20 or more) is reduced, before any worker loads anything, to the
``keep`` sources whose task vectors best represent the pool. The method (``frank_wolfe``) is data-free:

1. **Gram matrix, streamed.** ``G[i, j] = <τ_i, τ_j>`` over every floating-point tensor the sources share
   with the base (a tensor whose shape differs in some source, e.g. a resized vocabulary, is left out), with
   ``τ_i = θ_i - θ_base`` (``B·A·scale`` from the factors for a LoRA adapter on the base). Each tensor is read
   in blocks of rows of at most ``block_entries`` entries per source (or one row, when a row is longer), so the
   transient memory is ``pool x block_entries`` float32 (plus one block of the base and one of a source),
   whatever the models' size: the pool is never resident (:func:`transient_bytes`). Each source is read once.
2. **Frank-Wolfe over the pool's convex hull** (the conditional-gradient view of herding, Bach et al. 2012;
   the same step FW-Merging, Chen et al. 2025, "Scaling Model Merging with Frank-Wolfe Optimization", takes
   over a pool, with a data-free objective here in place of its calibration loss). The task vectors are taken
   as directions, ``u_i = τ_i / ||τ_i||`` (how far to move along each is the search's job: its weight genes), and
   ``f(λ) = ||Σ_i λ_i u_i - ū||²`` is minimized over the simplex, ``ū`` the pool's mean direction. It starts at
   the most central source (largest ``<u_i, ū>``); each step the linear oracle picks the source of most
   negative gradient ``2 (Cλ - C·1/N)_i`` (``C`` the cosine-similarity matrix) and an exact line search sets
   the step. Sources are kept in the order the oracle first picks them, until ``keep`` are chosen: a
   near-duplicate of a kept source has a positive gradient and comes late, so the kept set spreads over the
   pool's distinct directions, the most shared first. When the iterations (``iterations``) end or the gap
   vanishes first, the rest are taken by ascending gradient. A source equal to the base (a zero task vector)
   is taken last.

The base (``base_model``) is always kept. The kept sources replace ``sources:`` in the run's resolved config,
so the memory plan, the workers, the space and the export see only them; the choice (the order, ``λ`` and
``f``) is logged. What it does not do: score sources on the calibration tasks (FW-Merging's objective), which
would cost one evaluation per pool member.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """The outcome: ``kept`` (in pick order), the FW weights ``weights`` over the pool, ``objective`` (f at the
    end, relative to ``||ū||²``), and the task vectors' Gram matrix ``gram`` (pool order ``pool``)."""

    pool: tuple[str, ...]
    kept: tuple[str, ...]
    weights: dict[str, float]
    objective: float
    gram: np.ndarray


def transient_bytes(pool: int, block_entries: int) -> int:
    """The most memory the Gram matrix's blocks take at once (see the module docstring)."""
    return pool * block_entries * 4 + 2 * block_entries * 4


def gram_matrix(paths: Mapping[str, str | Path], reference: str, *, block_entries: int = 2**22
                ) -> tuple[tuple[str, ...], np.ndarray]:
    """The pool's task-vector Gram matrix (float64), streamed in blocks (see the module docstring)."""
    from evomerge.io import ModelFolder
    from evomerge.io.adapter import AdapterFolder
    from evomerge.merge.sources import check_finite

    pool = tuple(m for m in paths if m != reference)
    folders = {m: ModelFolder.open(Path(paths[m]).expanduser()) for m in (reference, *pool)}
    ref = folders[reference]
    if isinstance(ref, AdapterFolder):
        raise ConfigError(f"sources.{reference}: the base model is a LoRA adapter; name its base as a source")
    gram = np.zeros((len(pool), len(pool)))
    try:
        for name in ref.tensor_names:
            shape = ref.shape(name)
            if not ref.dtype(name).is_floating_point or not shape:
                continue
            if any(name not in folders[m] or folders[m].shape(name) != shape for m in pool):
                log.debug("source selection: %s left out (its shape differs in some source)", name)
                continue
            per_row = max(1, math.prod(shape[1:]))
            step = max(1, block_entries // per_row)
            for start in range(0, shape[0], step):
                stop = min(shape[0], start + step)
                b = ref.get_rows(name, start, stop, dtype=torch.float32)
                block = torch.empty((len(pool), b.numel()), dtype=torch.float32)
                for i, m in enumerate(pool):
                    f = folders[m]
                    same_base = isinstance(f, AdapterFolder) and f.base.path.resolve() == ref.path.resolve()
                    d = f.delta_rows(name, start, stop) if same_base else None
                    if d is None:
                        d = torch.zeros_like(b) if same_base else f.get_rows(name, start, stop,
                                                                              dtype=torch.float32) - b
                    check_finite(name, m, d)
                    block[i] = d.reshape(-1)
                gram += (block @ block.T).double().numpy()  # float32 per block, summed in float64
    finally:
        for f in folders.values():
            f.close()
    return pool, gram


def frank_wolfe(gram: np.ndarray, keep: int, iterations: int) -> tuple[list[int], np.ndarray, float]:
    """Pick ``keep`` indices by Frank-Wolfe on ``||Σ λ_i v_i - v̄||²`` over the simplex, for vectors of Gram
    matrix ``gram`` (the module docstring: the cosine matrix of the task vectors).

    Returns the picks in order, the final ``λ`` and the objective relative to ``||v̄||²``.
    """
    n = gram.shape[0]
    target = gram.mean(axis=1)  # <v_i, v̄>
    tt = float(gram.mean())  # ||v̄||²
    # f(e_i) = G_ii - 2 <v_i, v̄> + ||v̄||²: start at the vector nearest the mean
    first = int(np.argmin(np.diag(gram) - 2 * target))
    lam = np.zeros(n)
    lam[first] = 1.0
    picks = [first]
    for _ in range(iterations):
        if len(picks) >= keep:
            break
        grad = 2 * (gram @ lam - target)
        s = int(np.argmin(grad))
        d = -lam.copy()
        d[s] += 1.0
        gap = -float(grad @ d)
        if gap <= 1e-12 * max(tt, 1e-300):
            break
        curv = float(d @ gram @ d)
        gamma = 1.0 if curv <= 0 else min(1.0, gap / (2 * curv))
        lam = lam + gamma * d
        if s not in picks:
            picks.append(s)
    if len(picks) < keep:
        grad = 2 * (gram @ lam - target)
        picks += [int(i) for i in np.argsort(grad, kind="stable") if int(i) not in picks][: keep - len(picks)]
    objective = float(lam @ gram @ lam - 2 * lam @ target + tt) / max(tt, 1e-300)
    return picks, lam, objective


def select_sources(paths: Mapping[str, str | Path], reference: str, keep: int, *, iterations: int = 100,
                   block_entries: int = 2**22) -> Selection:
    """The ``keep`` sources of the pool ``paths`` (besides ``reference``) that a search should merge."""
    t0 = time.perf_counter()
    pool, gram = gram_matrix(paths, reference, block_entries=block_entries)
    if keep >= len(pool):
        return Selection(pool, pool, {m: 1 / len(pool) for m in pool}, 0.0, gram)
    if not np.isfinite(gram).all():
        raise ConfigError("source_selection: the task vectors' inner products overflow float64")
    norms = np.sqrt(np.clip(np.diag(gram), 0, None))
    live = [i for i in range(len(pool)) if norms[i] > 0]
    cos = gram[np.ix_(live, live)] / np.outer(norms[live], norms[live])
    picks, lam_live, objective = frank_wolfe(cos, min(keep, len(live)), iterations) if live else ([], np.zeros(0), 0.0)
    picks = [live[i] for i in picks] + [i for i in range(len(pool)) if i not in live][: keep - len(picks)]
    lam = np.zeros(len(pool))
    lam[live] = lam_live
    kept = tuple(pool[i] for i in picks)
    sel = Selection(pool, kept, {m: float(lam[i]) for i, m in enumerate(pool)}, objective, gram)
    log.info("source selection (frank_wolfe): kept %s of %d sources (relative objective %.4f) in %.1fs; weights %s",
             ", ".join(kept), len(pool), objective, time.perf_counter() - t0,
             ", ".join(f"{m} {sel.weights[m]:.3f}" for m in pool))
    return sel


def apply_selection(cfg: RunConfig) -> tuple[RunConfig, Selection | None]:
    """``cfg`` with ``sources:`` reduced to the base and the kept sources (in their config order), and the
    :class:`Selection`, when it has a ``source_selection:`` and more sources than it keeps; ``(cfg, None)``
    otherwise (a resumed run's resolved config already holds only the kept sources)."""
    sel_cfg = cfg.source_selection
    if sel_cfg is None or len(cfg.sources) - 1 <= sel_cfg.keep:
        return cfg, None
    reference = cfg.base_model or next(iter(cfg.sources))
    sel = select_sources(cfg.sources, reference, sel_cfg.keep, iterations=sel_cfg.iterations,
                         block_entries=sel_cfg.block_entries)
    kept = {m: p for m, p in cfg.sources.items() if m == reference or m in sel.kept}
    return cfg.model_copy(update={"sources": kept}), sel


def selection_record(sel: Selection, sources: dict[str, str]) -> dict[str, object]:
    """What a run folder's ``source_selection.json`` keeps of a selection: the pool with its paths, the kept
    sources in pick order, the Frank–Wolfe weights, the objective and the task vectors' cosine matrix."""
    norms = np.sqrt(np.clip(np.diag(sel.gram), 1e-300, None))
    return {"pool": {m: sources[m] for m in sel.pool}, "kept": list(sel.kept),
            "weights": {m: float(w) for m, w in sel.weights.items()}, "objective": float(sel.objective),
            "cosine": (sel.gram / np.outer(norms, norms)).round(6).tolist()}
