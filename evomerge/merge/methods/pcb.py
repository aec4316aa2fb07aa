"""PCB-merging, parameter competition balancing (Du et al., "Parameter Competition Balancing for Model
Merging", NeurIPS 2024, arXiv 2410.02396); no mergekit equivalent.

For one tensor, with its task vectors ``d_1..d_N`` flattened to ``D`` entries, ``Norm`` the min-max
normalization of a vector to ``[0, 1]`` (0 everywhere for a constant vector) and ``Softmax`` over the
``D`` entries:

* intra-balancing (how much an entry matters to its own task): ``b_intra_i = Softmax(N * Norm(d_i * d_i))``;
  the number of tasks ``N`` is the softmax's inverse temperature, sharpening it as tasks are added;
* inter-balancing (how much the other tasks agree with it): ``b_inter_i = sum_j Softmax(Norm(d_i * d_j))``
  (``j`` over all tasks, ``i`` included);
* the balancing matrix ``b_i = b_intra_i * b_inter_i``;
* drop: each task keeps the ``max(1, int(density_i * D))`` entries of largest ``b_i`` (equal scores:
  the lower index first), ``bhat_i = b_i * m_i``; ``density = 1 - r`` for the paper's drop ratio ``r``
  (``density >= 1`` drops nothing);
* rescale: ``merged = lambda * sum_i w_i bhat_i d_i / sum_i bhat_i`` (0 where every task dropped the
  entry), and the result is ``base + merged``.

``w_i`` (default 1) are the per-task coefficients of the paper's evolutionary variant (PCB-merging + ES:
``lambda_i`` applied after balancing, the balance itself unweighted); ``lambda`` is its single-coefficient
form. What the equations leave open, decided here: ``Norm`` is min-max (the authors' code); both
softmaxes are computed as ``D * Softmax`` (a factor common to every task, so the result is unchanged);
the authors' code also clips each ``|d_i|`` to its 0.01% / 99.99% quantiles and replaces the inter term
by ``tanh(d_i * sum_j d_j)``: neither is done here, this follows the paper's equations. Balancing is per
tensor (the paper flattens the whole model): the softmaxes, the drop and the rescale see one tensor.

Defaults, from the authors' code (duguodong7/pcb-merging): ``PCB_merge(..., pcb_ratio=0.1)`` keeps the
``pcb_ratio`` share of entries of highest balancing score (it clamps the rest to the ``1 - pcb_ratio``
quantile, which the min-max rescale then maps to 0), hence ``density = 0.1``; their merging script sweeps
``ratio`` over 5, 10, 20 % and ``lambda`` over 0.8 to 2.2 in steps of 0.1 (T5) or keeps 1.0 (IA3), so
``lambda`` defaults to 1.0 and is searched over ``[0.5, 2.2]``; their evolutionary variant uses
``pcb_ratio = 0.05`` and per-task ``lambda_i`` in ``[0.8, 1.3]`` starting at 1.0 (``weight`` here).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.arguments import Arguments, check_range, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method
from evomerge.merge.methods.sparsify import largest_mask

__all__ = ["balance_scores", "pcb"]


def _norm01(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalization to ``[0, 1]``, in place; a constant vector becomes zeros."""
    lo, hi = torch.aminmax(x)
    span = hi - lo
    if span <= 0:
        return x.zero_()
    return x.sub_(lo).div_(span)


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """``D * Softmax(x)`` over the ``D`` entries of 1-D ``x`` (a new tensor; mean 1)."""
    return torch.softmax(x, dim=0).mul_(x.numel())


def balance_scores(rows: list[torch.Tensor], i: int) -> torch.Tensor:
    """The balancing scores ``b_i = b_intra_i * b_inter_i`` of task ``i`` (module docstring; a new 1-D tensor,
    scaled by ``D**2``). ``rows`` are the flattened task vectors in the work dtype."""
    n = len(rows)
    sq = torch.mul(rows[i], rows[i])
    intra = _softmax(_norm01(sq.clone()).mul_(n))
    inter = _softmax(_norm01(sq))
    for j in range(n):
        if j != i:
            inter.add_(_softmax(_norm01(torch.mul(rows[i], rows[j]))))
    return intra.mul_(inter)


@merge_method(
    "pcb",
    params=[
        ParamSpec("weight", "source", 1.0, (0.5, 1.5),
                  doc="coefficient of this model's balanced task vector (the paper's per-task lambda_i)"),
        ParamSpec("density", "source", 0.1, (0.05, 1.0),
                  doc="share of entries kept by balancing score (1 - the paper's drop ratio r), in (0, 1]"),
        ParamSpec("lambda", "global", 1.0, (0.5, 2.2), doc="scale of the merged task vector"),
    ],
    min_models=1,
    mergekit_name=None,
)
def pcb(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """PCB-merging: weigh each task vector's entries by intra- and inter-task balancing scores, drop the
    lowest-scoring ones, merge the rest rescaled by their scores."""
    densities = args.floats("density")
    check_range("pcb", "density", densities, 0.0, 1.0, low_open=True)
    cd = work_dtype(base.dtype)
    if base.numel() == 0:
        return base.clone()
    weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
    rows = [deltas[i].to(cd).reshape(-1) for i in range(args.n)]
    numel = base.numel()
    num = torch.zeros(numel, dtype=cd, device=base.device)
    den = torch.zeros(numel, dtype=cd, device=base.device)
    keep = torch.empty(numel, dtype=torch.bool, device=base.device)
    for i, row in enumerate(rows):
        b = balance_scores(rows, i)
        if densities[i] < 1.0:
            b.mul_(largest_mask(b, max(1, int(densities[i] * numel)), out=keep))
        den.add_(b)
        num.add_(b.mul_(row).mul_(weights[i]))
    merged = num.div_(torch.where(den > 0, den, torch.ones_like(den))).reshape(base.shape)
    lam = args.num("lambda")
    if lam != 1:
        merged.mul_(lam)
    return merged.add_(base).to(base.dtype)
