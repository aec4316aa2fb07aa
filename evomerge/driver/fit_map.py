"""The merge a gradient fit differentiates: each tensor's merge as an affine function of the genome.

:class:`WeightMap` reads, from a ``params`` space's own decode, each tensor's per-model coefficients (task
arithmetic's ``weight``, or the task-vector ``scale`` of a data-informed method) as ``A + J u`` of the genome
``u``; :func:`merged_tensors` builds ``base + lambda * sum_i w_i(u) d_i`` from the resident task vectors (or
``base + sum_i s_i(u) P_i`` from :func:`projected_task_vectors`, for RegMean / Fisher), so a loss of the model run
with those tensors is differentiable in ``u`` only (:mod:`evomerge.driver.adamerging`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe


class WeightMap:
    """Each tensor's task-arithmetic weights as an affine function of the genome: ``W(u) = A + J u``.

    ``A`` and ``J`` are read from the space's own decode (at ``u = 0`` and at each unit vector) for every tensor
    role (module kind, layer), then checked at a random genome; a space whose weights are not affine in the
    genome (a log transform) is refused. ``lam`` and ``normalize`` are the recipe's fixed global parameters.
    """

    def __init__(self, space: Any, roles: dict[str, Any], num_layers: int, stats: Any = None) -> None:
        from evomerge.merge.materialize import MergePlan
        from evomerge.merge.tensor_params import tensor_params

        genes = space.param_genes
        if genes is None or getattr(space, "kind", "") != "params":
            raise ConfigError("space.template: adamerging fits a params space (e.g. builtin:task-arithmetic-per-layer)")
        method = genes.method
        scaled = bool(method.stats) and any(p.name == "scale" for p in method.params)
        if method.name != "task_arithmetic" and not scaled:
            raise ConfigError(f"space.template: adamerging fits task_arithmetic weights or the task-vector scales "
                              f"of regmean / fisher; the space merges with {method.name!r}")
        #: the fitted per-source parameter: task arithmetic's weight, or a data-informed method's scale
        self.param = "scale" if scaled else "weight"
        searched = [p.spec.name for p in genes.searched]
        if searched != [self.param]:
            raise ConfigError(f"space.template: search: adamerging fits only {self.param!r} of {method.name}; "
                              f"the space searches {searched}")
        if scaled and (genes.aim is not None or (space.decode(space.x0).data.aim or 0) > 0):
            raise ConfigError("space.template: AIM's adjustment is not linear in the task-vector scales; "
                              "adamerging fits the scales without it (drop aim)")
        self.space = space
        self.dim = int(space.dim)
        self.keys = sorted({(r.kind, r.layer) for r in roles.values()}, key=lambda k: (k[0], -1 if k[1] is None
                                                                                          else k[1]))
        self.row = {name: self.keys.index((r.kind, r.layer)) for name, r in roles.items()}
        role_of = {(r.kind, r.layer): r for r in roles.values()}
        self._roles = [role_of[k] for k in self.keys]
        self._num_layers = num_layers
        if scaled and stats is None:
            raise ConfigError("space: the fitted merge reads calibration statistics; the worker holds none")
        self._plan = MergePlan.build(space.decode(space.x0), num_layers, stats)
        self.order = self._plan.order
        self._tensor_params = tensor_params

        def weights(u: np.ndarray) -> np.ndarray:
            recipe = space.decode(u)
            return np.asarray([self._tensor_params(recipe, self._plan.method, r, num_layers, self.order).sp[self.param]
                               for r in self._roles], dtype=np.float64)

        zero = np.zeros(self.dim)
        a = weights(zero)
        jac = np.zeros((*a.shape, self.dim))
        for g in range(self.dim):
            e = zero.copy()
            e[g] = 1.0
            jac[..., g] = weights(e) - a
        probe = np.random.default_rng(0).random(self.dim)
        if not np.allclose(a + jac @ probe, weights(probe), rtol=1e-9, atol=1e-12):
            raise ConfigError("space.template: its weights are not affine in the genome (a log transform?); "
                              "adamerging needs linear weight genes")
        gp = [self._tensor_params(self._plan.recipe, self._plan.method, r, num_layers, self.order).gp
              for r in self._roles]
        self.lam = torch.tensor([1.0 if scaled else float(g.get("lambda", 1.0)) for g in gp], dtype=torch.float64)
        self.normalize = [False if scaled else bool(g.get("normalize", False)) for g in gp]
        self.a = torch.from_numpy(a)
        self.jac = torch.from_numpy(jac)

    def weights(self, u: torch.Tensor) -> torch.Tensor:
        """``(roles, models)`` weights at genome ``u`` (differentiable in ``u``)."""
        return self.a.to(u) + self.jac.to(u) @ u


def projected_task_vectors(recipe: Recipe, sources: Any, stats: Any, rows: torch.Tensor | None,
                           names: list[str]) -> dict[str, torch.Tensor]:
    """Per tensor, the stacked ``P_i`` of a data-informed merge linear in its task-vector scales ``s_i``:
    ``merge(s) = base + sum_i s_i P_i`` (RegMean: ``P_i = d_i G~_i (sum_j G~_j)^-1`` on linear weights; Fisher:
    ``P_i = w_i F_i d_i / sum_j w_j F_j``; the fallback's tensors: its merge of ``d_i`` alone). Each ``P_i`` is
    the merge at the unit scales ``e_i`` minus the base, by the materializer itself (statistics, fallback), so
    a fit over the scales is the merge a candidate gets; linearity is checked at random scales. They are held
    beside the resident task vectors for the fit's duration (as much memory again as the task vectors)."""
    from evomerge.merge.materialize import MergePlan, merge_tensor

    plan0 = MergePlan.build(recipe, sources.num_layers, stats)

    def at(scales: list[float]) -> MergePlan:
        models = tuple(m.model_copy(update={"parameters": {**m.parameters, "scale": float(scales[plan0.order.index(m.model)])}})
                       for m in recipe.models)
        return MergePlan.build(recipe.model_copy(update={"models": models}), sources.num_layers, stats)

    n = len(plan0.order)
    plans = [at([1.0 if j == i else 0.0 for j in range(n)]) for i in range(n)]
    probe_s = np.random.default_rng(0).uniform(0.5, 2.0, n).tolist()
    probe = at(probe_s)
    out: dict[str, torch.Tensor] = {}
    for k, name in enumerate(names):
        role = sources.roles[name]
        base, deltas = sources.group(name, rows)
        p = torch.stack([merge_tensor(pl, name, role, base, deltas).to(torch.float32) - base.to(torch.float32)
                         for pl in plans])
        if k % 8 == 0:  # the merge must be linear in the scales for the fit to be the candidates' merge
            want = merge_tensor(probe, name, role, base, deltas).to(torch.float32) - base.to(torch.float32)
            got = torch.tensordot(torch.tensor(probe_s, dtype=torch.float32), p, dims=1)
            # up to the rounding of base + merged task vector in the tensor's dtype
            tol = 1e-3 * float(want.abs().max()) + 4 * torch.finfo(base.dtype).eps * float(base.abs().max())
            if float((got - want).abs().max()) > tol:
                raise ConfigError(f"{name}: the {plan0.method.name} merge is not linear in the task-vector scales "
                                  "here; adamerging cannot fit them")
        out[name] = p
    return out


def merged_tensors(wmap: WeightMap, sources: Any, targets: dict[str, str], u: torch.Tensor,
                   rows: torch.Tensor | None, directions: dict[str, torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """Live parameter name -> ``base + lambda * sum_i w_i d_i`` at genome ``u`` (with ``directions``, the
    projected task vectors of :func:`projected_task_vectors`: ``base + sum_i s_i P_i``); the graph reaches only
    ``u``."""
    w_all = wmap.weights(u)
    out: dict[str, torch.Tensor] = {}
    for name, live in targets.items():
        if directions is None:
            base, deltas = sources.group(name, rows)
        else:  # the projected task vectors replace the deltas (no row gather per batch)
            base, deltas = sources.base[name], directions[name]
        r = wmap.row[name]
        w = w_all[r].to(torch.float32)
        mixed = torch.tensordot(w.to(deltas.device), deltas.to(torch.float32), dims=1)
        if wmap.normalize[r]:
            total = w.sum()
            mixed = mixed / torch.where(total.abs() >= 1e-8, total, torch.ones_like(total))
        out[live] = (base.to(torch.float32) + float(wmap.lam[r]) * mixed).to(base.dtype)
    return out
