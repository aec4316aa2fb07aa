"""The shared core of the task-vector methods (mergekit's "generalized task arithmetic").

For task vectors ``d_i`` with weights ``w_i``: sparsify each ``d_i`` (optional, per-row density),
weight it (``w_i * d_i``), then either sum (no consensus) or keep only the entries that agree with
the elected sign (TIES consensus), optionally divide by the weights that contributed
(``normalize``), scale by ``lambda`` and add to the base:

* no consensus: ``mixed = sum_i w_i d_i``, divided by ``sum_i w_i`` (1 when ``|sum| < 1e-8``);
* consensus: ``mixed = sum_i w_i d_i [agree_i]``, divided elementwise by ``sum_i w_i [agree_i]``
  (1 where no source agrees); see :mod:`evomerge.merge.methods.ties`.

Every method of this family is one :func:`task_vector_method` call: a registration over
:func:`merge_task_vectors` that fixes the sparsification, the consensus and the defaults.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.arguments import Arguments, check_range, work_dtype
from evomerge.merge.methods.base import FusedPlan, FusedPlanFn, MergeFn, ParamSpec, merge_method
from evomerge.merge.methods.sparsify import sparsify

__all__ = [
    "RANDOM_SPARSIFICATIONS", "ConsensusMix", "Rows", "merge_task_vectors", "task_vector_method", "task_vector_params",
    "weight_norm", "weighted_sum",
]

#: Sparsifications that draw random masks (their methods take the tensor's generator).
RANDOM_SPARSIFICATIONS = frozenset({"random", "della_magprune"})

#: ``(rows, weights w_i, normalize) -> mixed task vector`` (a new tensor in the work dtype).
ConsensusMix = Callable[["Rows", list[float], bool], torch.Tensor]


def task_vector_params(
    *, sparsification: str | None, normalize: bool, rescale: bool
) -> list[ParamSpec]:
    """The parameter declarations of a task-vector method, with mergekit's names and defaults."""
    params = [
        ParamSpec("weight", "source", None, (0.0, 1.0), required=True,
                  doc="scale of this model's task vector"),
    ]
    if sparsification is not None:
        params.append(ParamSpec("density", "source", 1.0, (0.1, 1.0),
                                doc="share of the task vector's entries kept, in (0, 1]"))
    if sparsification == "magnitude_outliers":
        params.append(ParamSpec("gamma", "source", 0.01, (0.0, 0.1),
                                doc="share of the largest-magnitude entries removed as outliers"))
    if sparsification == "della_magprune":
        params.append(ParamSpec("epsilon", "source", 0.15, (0.0, 0.2),
                                doc="spread of keep probabilities around density by magnitude rank; "
                                    "density +/- epsilon must stay inside (0, 1)"))
    params.append(ParamSpec("normalize", "global", normalize,
                            doc="divide by the sum of the weights that contributed"))
    if sparsification is not None:
        params.append(ParamSpec("rescale", "global", rescale,
                                doc="rescale kept entries to preserve each task vector's L1 norm"))
    params += [
        ParamSpec("lambda", "global", 1.0, (0.5, 1.5), doc="scale of the merged task vector"),
        ParamSpec("int8_mask", "global", False,
                  doc="accepted for mergekit compatibility; a memory option there, no effect on values"),
    ]
    return params


def check_task_vector_args(name: str, args: Arguments, sparsification: str | None) -> None:
    if sparsification is None:
        return
    densities = args.floats("density")
    check_range(name, "density", densities, 0.0, 1.0, low_open=True)
    if sparsification == "magnitude_outliers":
        check_range(name, "gamma", args.floats("gamma"), 0.0, 1.0)
    if sparsification == "della_magprune":
        epsilons = args.floats("epsilon")
        check_range(name, "epsilon", epsilons, 0.0, 1.0)
        for d, e in zip(densities, epsilons, strict=True):
            if d < 1.0 and (d + e >= 1.0 or d - e <= 0.0):
                raise ConfigError(
                    f"{name}: epsilon {e} with density {d} puts density +/- epsilon outside (0, 1)"
                )


class Rows:
    """The weighted task vectors ``w_i d_i`` of one merge, read one at a time as ``(tensor, scale)``.

    ``get(i)`` returns ``(r, a)`` with ``w_i d_i = a * r``; ``r`` is a view of the inputs (never to be
    written), the shared ``scratch`` buffer, or a row this object owns (then writable). ``writable(i)``
    tells which. Rows in another dtype than the work dtype are converted into ``scratch``.
    """

    def __init__(self, deltas: torch.Tensor, scales: list[float], dtype: torch.dtype, *, owned: bool = False):
        self.deltas = deltas
        self.scales = scales
        self.dtype = dtype
        self.owned = owned
        self.n = deltas.shape[0]
        self.shape = deltas.shape[1:]
        self._scratch: torch.Tensor | None = None

    @property
    def scratch(self) -> torch.Tensor:
        """A work buffer of one row's shape, allocated on first use."""
        if self._scratch is None:
            self._scratch = torch.empty(self.shape, dtype=self.dtype, device=self.deltas.device)
        return self._scratch

    def writable(self, i: int) -> bool:
        return self.owned or self.deltas.dtype != self.dtype

    def get(self, i: int) -> tuple[torch.Tensor, float]:
        row = self.deltas[i]
        if row.dtype != self.dtype:
            row = self.scratch.copy_(row)
        return row, self.scales[i]

    def zeros(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device=self.deltas.device)


def weight_norm(weights: list[float], dtype: torch.dtype) -> float:
    """The divisor of ``normalize`` without consensus: the weights' sum in ``dtype`` (1 when ``|sum| < 1e-8``)."""
    total = float(torch.tensor(weights, dtype=dtype).sum())
    return total if abs(total) >= 1e-8 else 1.0


def weighted_sum(rows: Rows) -> torch.Tensor:
    """``sum_i w_i d_i`` accumulated row by row (no ``(N, *S)`` temporary); zeros when there are no rows.

    Each product is rounded before it is added (a multiply, then an add; never a fused multiply-add), the
    arithmetic of the fused kernels (:mod:`evomerge.merge.kernels`), so both give the same bits.
    """
    if rows.n == 0:
        return rows.zeros()
    r, a = rows.get(0)
    mixed = torch.mul(r, a)
    term = torch.empty_like(mixed) if rows.n > 1 else None
    for i in range(1, rows.n):
        r, a = rows.get(i)
        mixed.add_(torch.mul(r, a, out=term))
    return mixed


def merge_task_vectors(
    name: str,
    base: torch.Tensor,
    deltas: torch.Tensor,
    args: Arguments,
    *,
    sparsification: str | None,
    consensus: ConsensusMix | None,
    generator: torch.Generator | None = None,
    orders: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Merge with the family's semantics (module docstring); returns a new tensor in ``base.dtype``.

    ``orders`` are the rows' magnitude orders (``magnitude`` sparsification only; same result without)."""
    check_task_vector_args(name, args, sparsification)
    n = deltas.shape[0]
    if n == 0:
        return base.clone()
    cd = work_dtype(base.dtype)
    weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
    densities = args.floats("density") if sparsification is not None else [1.0] * n
    if all(x >= 1.0 for x in densities):
        rows = Rows(deltas, weights, cd)
    else:
        masked, factors = sparsify(
            deltas,
            sparsification,  # type: ignore[arg-type]
            densities,
            dtype=cd,
            gammas=args.floats("gamma") if "gamma" in args.source else None,
            epsilons=args.floats("epsilon") if "epsilon" in args.source else None,
            rescale=args.flag("rescale"),
            generator=generator,
            orders=orders,
        )
        scales = (torch.tensor(weights, dtype=cd) * factors.cpu()).tolist()
        rows = Rows(masked, scales, cd, owned=True)
    normalize = args.flag("normalize")
    if consensus is not None:
        mixed = consensus(rows, weights, normalize)
    else:
        mixed = weighted_sum(rows)
        if normalize:
            mixed.div_(weight_norm(weights, cd))
    lam = args.num("lambda")
    if lam != 1:
        mixed.mul_(lam)
    mixed.add_(base)
    return mixed.to(base.dtype)


def _fused_plan(name: str, sparsification: str | None, consensus: bool) -> FusedPlanFn:
    """The fused kernel's plan for a family member without random masks: magnitude or no sparsification,
    plain sum or TIES sign election (a ``rescale`` call runs eagerly)."""

    def plan(args: Arguments, cd: torch.dtype) -> FusedPlan | None:
        check_task_vector_args(name, args, sparsification)
        weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
        normalize, lam = args.flag("normalize"), args.num("lambda")
        if sparsification is None:
            return FusedPlan(weights, None, 1.0, weight_norm(weights, cd) if normalize and not consensus else 1.0,
                             lam, consensus, normalize and consensus)
        if args.flag("rescale"):
            return None
        return FusedPlan(weights, args.floats("density"), 1.0, 1.0, lam, consensus, normalize and consensus)

    return plan


def task_vector_method(
    name: str, *, sparsification: str | None, consensus: ConsensusMix | None, normalize: bool, rescale: bool,
    doc: str, fused: bool = False,
) -> MergeFn:
    """Define and register the task-vector method ``name``: sparsify each task vector with ``sparsification``
    (``None``: keep all), then sum them (``consensus=None``) or mix them by ``consensus`` (TIES sign election);
    ``normalize`` and ``rescale`` are the defaults of those parameters. ``fused`` declares that the fused
    kernel serves it (magnitude or no sparsification; its consensus is TIES sign election). Returns the merge
    function."""
    randomized = sparsification in RANDOM_SPARSIFICATIONS
    if fused and sparsification not in (None, "magnitude"):
        raise ValueError(f"{name}: the fused kernel serves magnitude sparsification only, not {sparsification}")
    magnitude_orders = sparsification == "magnitude"

    def impl(base: torch.Tensor, deltas: torch.Tensor, args: Arguments, *,
             generator: torch.Generator | None = None,
             orders: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        return merge_task_vectors(name, base, deltas, args, sparsification=sparsification, consensus=consensus,
                                  generator=generator, orders=orders)

    impl.__doc__ = doc
    params = task_vector_params(sparsification=sparsification, normalize=normalize, rescale=rescale)
    plan = _fused_plan(name, sparsification, consensus is not None) if fused else None
    return merge_method(name, params=params, min_models=1, randomized=randomized, fused=plan,
                        magnitude_orders=magnitude_orders)(impl)
