"""Iso-C, isotropic merging in the common subspace (Marczak et al., "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959); no mergekit equivalent.

For task vectors ``d_i`` with weights ``w_i`` (the paper has ``w_i = 1``), ``M = sum_i w_i d_i``:

* 2-D tensors: with the thin SVD ``M = U S V^T`` and ``r`` the number of singular values above
  ``tol = max(S) * max(rows, cols) * eps`` (``eps`` of the work dtype; torch's ``matrix_rank`` rule), every
  kept singular value is replaced by their mean: ``merged = mean(S[:r]) * U[:, :r] V[:, :r]^T``;
* other tensors (norm weights, biases, scalars) and 2-D tensors with ``isotropic = false``: task
  arithmetic averaging, ``merged = M / N`` (the reference code's mean for non-matrix parameters);
* the result is ``base + lambda * merged`` (``lambda`` is the paper's ``alpha``). The authors' code
  (danielm1405/iso-merging; ``config/method/iso_c.yaml``: no fixed scale) chooses ``alpha`` on validation like
  task arithmetic's coefficient, so it has no data-free value: 1.0 (the isotropic sum unscaled) is the default
  here and ``[0.5, 2.0]`` the searched range.

For a full-rank ``M`` this is the paper's ``mean(S) U V^T`` exactly (``r = min(rows, cols)``). Where
``M`` is rank deficient (e.g. task vectors of low-rank adapters) the paper's ``U V^T`` is not unique: the
singular vectors of zero singular values are arbitrary and differ between LAPACK and cuSOLVER; those
directions are left out here, and averaging over the ``r`` kept values preserves the nuclear norm
``sum(S)`` as in the full-rank case. A rank-1 ``M`` is therefore returned unchanged.

Which tensors are matrices: a method sees tensors, not module kinds, so every 2-D tensor is treated as a
linear layer, embeddings and ``lm_head`` included. The reference code does the same by shape (every 2-D
parameter but CLIP's ``text_projection``, its 2-D positional embedding included); its LLM ports leave
``embed_tokens`` / ``lm_head`` out by name. A recipe does that with a kind override,
``isotropic: {embed: false, lm_head: false, default: true}``. A fallback above some row count was rejected:
no count separates vocabularies from MLP widths across families (a 16384-row MLP in Gemma-2B, a
53248-row one in Llama-3.1-405B, 32000- to 256000-row vocabularies), and the method would then change with
the model's size. The SVD of a ``rows x cols`` tensor costs ``O(rows * cols * min(rows, cols))``: for a
vocabulary-sized embedding this is the slowest tensor of the merge.
"""

from __future__ import annotations

import torch

from evomerge.merge.methods.arguments import Arguments, work_dtype
from evomerge.merge.methods.base import ParamSpec, merge_method
from evomerge.merge.methods.task_vectors import Rows, weighted_sum

__all__ = ["iso_c", "isotropic"]


def isotropic(m: torch.Tensor) -> torch.Tensor:
    """``mean(S[:r]) * U[:, :r] V[:, :r]^T`` of a 2-D ``m`` (module docstring); a new tensor, zeros for ``m = 0``."""
    u, s, vh = torch.linalg.svd(m.contiguous(), full_matrices=False)
    if s.numel() == 0:
        return torch.zeros_like(m)
    tol = s[0] * max(m.shape) * torch.finfo(s.dtype).eps
    r = int((s > tol).sum())
    if r == 0:
        return torch.zeros_like(m)
    return torch.matmul(u[:, :r], vh[:r]).mul_(s[:r].mean())


@merge_method(
    "iso_c",
    params=[
        ParamSpec("weight", "source", 1.0, (0.0, 1.0), doc="scale of this model's task vector in the sum M"),
        ParamSpec("lambda", "global", 1.0, (0.5, 2.0), doc="scale of the merged task vector (the paper's alpha)"),
        ParamSpec("isotropic", "global", True,
                  doc="give 2-D tensors the isotropic spectrum (false: the task-vector mean, as for 1-D tensors)"),
    ],
    min_models=1,
    mergekit_name=None,
)
def iso_c(base: torch.Tensor, deltas: torch.Tensor, args: Arguments) -> torch.Tensor:
    """Iso-C: sum the task vectors and flatten the spectrum of each weight matrix to its mean singular value."""
    cd = work_dtype(base.dtype)
    weights = torch.tensor(args.floats("weight"), dtype=cd).tolist()
    m = weighted_sum(Rows(deltas, weights, cd))
    merged = isotropic(m) if base.dim() == 2 and args.flag("isotropic") else m.div_(args.n)
    lam = args.num("lambda")
    if lam != 1:
        merged.mul_(lam)
    return merged.add_(base).to(base.dtype)
