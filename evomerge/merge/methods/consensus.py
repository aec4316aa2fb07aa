"""Consensus merging with TALL masks (Wang et al., "Localizing Task Information for Improved Model Merging
and Compression", ICML 2024, arXiv 2405.07813); no mergekit equivalent.

For task vectors ``d_i`` with weights ``w_i`` (``t_i = w_i d_i``; the paper has ``w_i = 1``):

* the multi-task vector ``tau`` is task arithmetic, ``tau = sum_i t_i`` (``consensus_ta``), or TIES over
  the ``t_i`` (``consensus_ties``: keep each task vector's ``density`` share of largest magnitudes, elect
  signs, sum the agreeing entries, divided with ``normalize`` by the agreeing weights; see
  :mod:`evomerge.merge.methods.ties`);
* task ``i``'s TALL mask keeps the entries where the task carries more of its own information than the
  others' contribution scaled by ``tall_lambda_i``:
  ``m_i = |t_i| >= tall_lambda_i * |tau - t_i|``
  (the paper's ``|theta_0 - theta_i| >= lambda_i |theta_MTL - theta_i|`` with ``theta_MTL = theta_0 + tau``);
* the consensus mask keeps the entries that at least ``k`` TALL masks keep: ``c = [sum_i m_i >= k]``
  (``k = 2`` drops both the "selfish" entries, useful to one task only, and the "catastrophic" ones,
  useful to none; ``k <= 0`` keeps every entry: plain TA / TIES; ``k > N`` keeps none: the base);
* the result is ``base + lambda * (tau * c)``.

Reading of the paper and its code (nik-dim/tall_masks): ``tau`` is the unscaled sum (or TIES output) and
the same ``tau`` serves the masks and the result; the paper writes the mask with ``>=``, the code with
``>``; they differ only where both sides are equal, and ``>=`` is used here (so ``tall_lambda = 0`` keeps
every entry). The paper picks ``lambda_i`` per task from ``{0.2, ..., 0.6}`` on validation data; here it
is a per-model parameter with that range. The reference code builds ``consensus_ties`` from TIES with the
top 20% kept and a disjoint *sum*: those are ``consensus_ties``' defaults (``density = 0.2``,
``normalize = false``). ``k`` is a count threshold, searchable as a real number: ``k = 1.5`` acts as 2.
Masks are computed per tensor (the paper's are over the flattened model; a per-entry rule, so the same).

Defaults, from the reference code (nik-dim/tall_masks, also vendored by wang-kee/LiNeS:
``src/utils/tallmask_utils.py`` and ``src/eval/eval.py``): ``prun_thre_k = 2``; ``tall_mask_lambda`` chosen per
task from ``[0.2, 0.3, 0.4, 0.5, 0.6]`` on validation (0.4, the grid's middle, is the data-free default here);
the final scale ``lambda`` is chosen on validation from ``0.1, 0.2, ..., 1.0`` like task arithmetic's, so it
has no data-free value: it defaults to 1.0 (the plain masked sum) and is searched over ``[0.1, 1.5]``, which
holds that grid.
"""

from __future__ import annotations

import torch

from evomerge.errors import ConfigError
from evomerge.merge.methods.arguments import Arguments, check_range, work_dtype
from evomerge.merge.methods.base import MergeFn, ParamSpec, merge_method
from evomerge.merge.methods.sparsify import sparsify
from evomerge.merge.methods.task_vectors import Rows, weighted_sum
from evomerge.merge.methods.ties import mix_agreeing

__all__ = ["consensus_mask", "consensus_ta", "consensus_ties"]


def _params(ties: bool) -> list[ParamSpec]:
    params = [
        ParamSpec("weight", "source", 1.0, (0.0, 1.0), doc="scale of this model's task vector t_i = w_i d_i"),
        ParamSpec("tall_lambda", "source", 0.4, (0.2, 0.6),
                  doc="TALL mask threshold: keep entries where |t_i| >= tall_lambda * |tau - t_i|"),
    ]
    if ties:
        params.append(ParamSpec("density", "source", 0.2, (0.1, 1.0),
                                doc="share of the task vector's largest-magnitude entries TIES keeps, in (0, 1]"))
        params.append(ParamSpec("normalize", "global", False,
                                doc="TIES divides by the sum of the agreeing weights (false: disjoint sum)"))
    params += [
        ParamSpec("k", "global", 2.0, (0.0, 3.0),
                  doc="keep entries that at least k TALL masks keep (2: drop selfish and catastrophic weights)"),
        ParamSpec("lambda", "global", 1.0, (0.1, 1.5), doc="scale of the masked multi-task vector"),
    ]
    return params


def consensus_mask(deltas: torch.Tensor, weights: list[float], lambdas: list[float], tau: torch.Tensor,
                   k: float) -> torch.Tensor:
    """``[sum_i [|w_i d_i| >= lambda_i |tau - w_i d_i|] >= k]`` (module docstring), a new boolean tensor.

    Streams over the rows: one row, its residual and the count are held at a time, never an ``(N, *S)`` mask.
    """
    count = torch.zeros(tau.shape, dtype=tau.dtype, device=tau.device)
    t = torch.empty_like(tau)
    rest = torch.empty_like(tau)
    for i in range(deltas.shape[0]):
        torch.mul(deltas[i].to(tau.dtype), weights[i], out=t)
        torch.sub(tau, t, out=rest).abs_().mul_(lambdas[i])
        count.add_(torch.ge(t.abs_(), rest))
    return count >= k


def _multi_task_vector(base: torch.Tensor, deltas: torch.Tensor, args: Arguments, weights: list[float],
                       cd: torch.dtype, ties: bool) -> torch.Tensor:
    if not ties:
        return weighted_sum(Rows(deltas, weights, cd))
    densities = args.floats("density")
    if all(d >= 1.0 for d in densities):
        rows = Rows(deltas, weights, cd)
    else:
        masked, _ = sparsify(deltas, "magnitude", densities, dtype=cd)
        rows = Rows(masked, weights, cd, owned=True)
    return mix_agreeing(rows, weights, args.flag("normalize"))


def _consensus(name: str, ties: bool, doc: str) -> MergeFn:
    def impl(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
        lambdas = args.floats("tall_lambda")
        check_range(name, "tall_lambda", lambdas, 0.0, float("inf"))
        if ties:
            check_range(name, "density", args.floats("density"), 0.0, 1.0, low_open=True)
        k = args.num("k")
        if k < 0:
            raise ConfigError(f"{name}: parameter 'k' = {k} is negative")
        cd = work_dtype(base.dtype)
        weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
        tau = _multi_task_vector(base, deltas, args, weights, cd, ties)
        keep = consensus_mask(deltas, weights, lambdas, tau, k)
        tau.mul_(keep)
        lam = args.num("lambda")
        if lam != 1:
            tau.mul_(lam)
        return tau.add_(base).to(base.dtype)

    impl.__doc__ = doc
    return merge_method(name, params=_params(ties), min_models=1, mergekit_name=None)(impl)


consensus_ta = _consensus(
    "consensus_ta", False,
    "Consensus TA: task arithmetic, keeping only the entries that at least k tasks' TALL masks keep.",
)
consensus_ties = _consensus(
    "consensus_ties", True,
    "Consensus TIES: TIES merging, keeping only the entries that at least k tasks' TALL masks keep.",
)
