"""TIES merging and its sign election (TIES-Merging, arXiv 2306.01708; mergekit ``ties``).

Sign election as mergekit's ``get_mask(method="sum")``: over the weighted (and sparsified) task
vectors ``wd_i = w_i d_i``, the elected sign of an entry is ``+`` where ``sum_i wd_i >= 0`` and ``-``
elsewhere; source ``i`` agrees at an entry when ``wd_i`` is nonzero with the elected sign (a zero,
e.g. a pruned entry, never agrees). The merged entry is the sum of the agreeing ``wd_i``, divided with
``normalize`` by the sum of the agreeing sources' weights ``w_i`` (1 where none agrees).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.task_vectors import Rows, task_vector_method, weighted_sum

__all__ = ["elect_signs", "mix_agreeing", "ties"]


def elect_signs(total: torch.Tensor) -> torch.Tensor:
    """Elected signs from the sum of the weighted task vectors: ``+1`` where ``total >= 0``, else ``-1``.

    Returns a new tensor of ``total``'s dtype. (An entry whose sum is ``-0.0`` gets ``-1``: every
    term there is zero, so no source agrees either way.)
    """
    sign = torch.ones_like(total)
    return torch.copysign(sign, total, out=sign)


def mix_agreeing(rows: Rows, weights: list[float], normalize: bool) -> torch.Tensor:
    """Sum of the entries of ``w_i d_i`` that agree with the elected sign; divided, with ``normalize``, by
    the sum of the agreeing sources' weights (1 where none agrees). Streams over the rows twice.

    The agreeing part of an entry is ``clamp(s * w_i d_i, min=0)`` with ``s`` the elected sign
    (multiplying by ``s = +-1`` is exact), so neither the ``(N, *S)`` agreement mask nor the weighted
    stack is materialized.
    """
    total = weighted_sum(rows)
    sign = elect_signs(total)
    mixed = total.zero_()
    divisor = rows.zeros() if normalize else None
    for i in range(rows.n):
        r, a = rows.get(i)
        x = torch.mul(r, sign, out=r if rows.writable(i) else rows.scratch)
        if a >= 0:
            x.clamp_(min=0)
        else:
            x.clamp_(max=0)
        if divisor is not None:
            agree = x.sign()  # 1 (-1 for a < 0) where source i agrees, else 0: exact products below
            divisor.add_(agree, alpha=weights[i] if a >= 0 else -weights[i])
        mixed.add_(x.mul_(a))  # rounded product, then the add: the fused kernels' arithmetic
    mixed.mul_(sign)
    if divisor is not None:
        tiny = torch.finfo(divisor.dtype).tiny
        if all(w == 0 or w >= tiny for w in weights):
            # No agreeing source <=> divisor 0 <=> mixed 0 there: clamping gives 0 / tiny = 0.
            divisor.clamp_(min=tiny)
        else:
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
        mixed.div_(divisor)
    return mixed


ties = task_vector_method(
    "ties", sparsification="magnitude", consensus=mix_agreeing, normalize=True, rescale=False, fused=True,
    doc="TIES: keep each task vector's largest-magnitude entries (density), elect signs, merge the agreeing entries.",
)
