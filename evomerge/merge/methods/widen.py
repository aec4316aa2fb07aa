"""WIDEN, weight disentanglement (Yu et al., "Extend Model Merging from Fine-Tuned to Pre-Trained Large
Language Models via Weight Disentanglement", arXiv 2408.03092); no mergekit equivalent.

Meant for models that share the base but moved far from it in different ways (a chat fine-tune and a
continued pre-training of the same backbone): each model's columns are weighed by how much they changed
in magnitude and in direction, ranked within the model, instead of by one fixed weight.

For a 2-D tensor ``W`` (``rows x cols``, a linear layer's ``(out, in)``), the base ``W_0`` and the models
``W_n = W_0 + d_n``, per column ``j``:

* disentangle: magnitude ``|W[:, j]|`` (L2) and direction ``W[:, j] / |W[:, j]|``; the divergences from the
  base are ``dM_n[j] = | |W_n[:, j]| - |W_0[:, j]| |`` and ``dD_n[j] = 1 - cos(W_n[:, j], W_0[:, j])``
  (torch's ``cosine_similarity``, norms clamped to 1e-8);
* rank within each model: ``r_n[j] = rank of dM_n[j] among the cols columns / cols`` in ``[0, 1)``
  (ascending; equal values by index), the same for ``dD_n``;
* importance: ``S_n[j] = Softmax_n(r_n[j])`` over the models, calibrated: where
  ``r_n[j] > above_average_value_ratio * mean_j(r_n)`` the score is set to ``score_calibration_value``;
* merge: ``base + sum_n w_n d_n[:, j] (S^M_n[j] + S^D_n[j]) / 2``.

Tensors that are not 2-D (norm weights, biases), and every entry treated alike: the importance is the
calibrated softmax over the models of the raw ``|d_n|`` (no ranking), ``base + sum_n w_n S_n d_n`` (the
reference code's rule for vector parameters).

As in the reference code (yule-BUAA/MergeLLM, ``merge_llms.py``: ``--above_average_value_ratio`` and
``--score_calibration_value`` both default to ``1.0``): the defaults ``1.0`` / ``1.0``; no ``lambda``. ``w_n``
(default 1) scales each model's contribution after scoring (the paper has none). The reference code
transposes token embeddings so that a "column" is a token; a method sees no module kinds, so every 2-D
tensor is read as ``(out, in)`` here, and ``per_row: {embed: true, default: false}`` in a recipe reproduces
the reference's embedding layout (rows disentangled instead of columns; ``lm_head`` stays a linear layer).
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.arguments import Arguments, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method

__all__ = ["calibrated_scores", "within_model_ranks", "widen"]


def within_model_ranks(diff: torch.Tensor) -> torch.Tensor:
    """``(N, C)`` ascending ranks of each row's entries divided by ``C`` (equal values: lower index first)."""
    n, c = diff.shape
    order = torch.argsort(diff, dim=1, stable=True)
    steps = (torch.arange(c, device=diff.device, dtype=diff.dtype) / c).expand(n, c)
    return torch.empty_like(diff).scatter_(1, order, steps)


def calibrated_scores(significance: torch.Tensor, ratio: float, calibration: float) -> torch.Tensor:
    """Softmax over the models (dimension 0) of ``(N, C)`` significances; entries above ``ratio`` times
    their row's mean get ``calibration``."""
    scores = torch.softmax(significance, dim=0)
    above = significance > significance.mean(dim=1, keepdim=True) * ratio
    return scores.masked_fill_(above, calibration)


@merge_method(
    "widen",
    params=[
        ParamSpec("weight", "source", 1.0, (0.0, 1.0), doc="scale of this model's scored task vector"),
        ParamSpec("above_average_value_ratio", "global", 1.0, (0.5, 2.0),
                  doc="entries ranked above this times their model's mean rank get the calibration score"),
        ParamSpec("score_calibration_value", "global", 1.0, (0.5, 2.0),
                  doc="importance score given to the entries above the threshold"),
        ParamSpec("per_row", "global", False,
                  doc="disentangle rows instead of columns (the reference's layout for token embeddings)"),
    ],
    min_models=1,
    mergekit_name=None,
)
def widen(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """WIDEN: weigh each model's columns by the within-model rank of their magnitude and direction changes."""
    cd = work_dtype(base.dtype)
    n = args.n
    ratio, calibration = args.num("above_average_value_ratio"), args.num("score_calibration_value")
    weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
    b = base.to(cd)
    d = deltas.to(cd).contiguous()  # one layout: the reductions below give the same bits for any input layout
    if base.dim() != 2:
        scores = calibrated_scores(d.abs().reshape(n, -1), ratio, calibration).reshape(d.shape)
    else:
        if args.flag("per_row"):
            b, d = b.transpose(0, 1), d.transpose(1, 2)
        models = d + b
        dm = (torch.linalg.vector_norm(models, dim=1) - torch.linalg.vector_norm(b, dim=0)).abs_()
        dd = 1.0 - torch.cosine_similarity(models, b.expand_as(models), dim=1)
        scores = calibrated_scores(within_model_ranks(dm), ratio, calibration)
        scores.add_(calibrated_scores(within_model_ranks(dd), ratio, calibration)).mul_(0.5)
        scores = scores[:, None, :]
    merged = torch.mul(d[0], scores[0]).mul_(weights[0])
    for i in range(1, n):
        merged.add_(torch.mul(d[i], scores[i]).mul_(weights[i]))
    if base.dim() == 2 and args.flag("per_row"):
        merged = merged.transpose(0, 1)
    return merged.add_(base).contiguous().to(base.dtype)
