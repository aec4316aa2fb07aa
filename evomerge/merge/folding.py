"""Family rules of routed exports: folding residual scales, and layers of different structures.

:mod:`evomerge.merge.routing` explains the algebra: with every norm scale-invariant (RMS-normalization),
a residual scale ``s_k`` entering position ``k`` is the same model as an unscaled decoder whose writes into
the residual stream at position ``k`` are divided by ``P_k = s_1 * ... * s_k``. Which tensors are those
writes depends on the family:

* pre-norm decoders (:data:`LINEAR_WRITES`): the projections that end each block: ``o_proj``,
  ``down_proj`` (every MoE expert's ``w2`` / ``down_proj`` and a shared expert's ``down_proj`` too),
  weights and biases divided by ``P_k``; a router reads a normalized input, so it is unchanged;
* Gemma 2 / Gemma 3 (:data:`POST_NORM_WRITES`): each block ends in a post-norm
  ``(1 + w) * normalize(v)``, so ``o_proj`` is irrelevant and the post-norm's gain is divided instead:
  ``w' = (1 + w) / P_k - 1``.

Other model types export only routes whose scales are all 1 (:func:`check_foldable` says why).

A stock model builds the layer at position ``k`` from its config, so a route that moves a layer must give
position ``k`` a config entry for the structure of the layer it now holds: ``layer_types`` (sliding or
global attention, same tensors; see :func:`evomerge.merge.routing.routed_config_patch`) and, in Qwen-MoE
models with dense layers among the sparse ones (``mlp_only_layers``, ``decoder_sparse_step``),
:func:`layout_patch`. Moving a layer to a position of another structure in any other model is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evomerge.errors import MaterializeError

#: Model types whose residual writes are linear projections (see the module docstring).
LINEAR_WRITES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"}
)
#: Model types whose residual writes go through an offset post-norm ``(1 + w) * normalize(v)``.
POST_NORM_WRITES = frozenset({"gemma2", "gemma3_text"})
FOLDABLE_MODEL_TYPES = LINEAR_WRITES | POST_NORM_WRITES

#: A layer tensor (name after ``layers.<i>.``) that writes into the residual stream, in a pre-norm decoder.
_LINEAR = re.compile(
    r"^(?:self_attn\.o_proj|mlp\.down_proj|mlp\.shared_expert\.down_proj|"
    r"(?:block_sparse_moe|mlp)\.experts\.\d+\.(?:w2|down_proj))\.(?:weight|bias)$"
)
_POST_NORM = re.compile(r"^(?:post_attention_layernorm|post_feedforward_layernorm)\.weight$")


def check_foldable(model_type: str, divisors: list[float]) -> None:
    """:class:`MaterializeError` when ``divisors`` are not all 1 and ``model_type`` cannot fold them."""
    if model_type not in FOLDABLE_MODEL_TYPES and any(d != 1.0 for d in divisors):
        raise MaterializeError(
            f"routed export: folding residual scales is implemented for {sorted(FOLDABLE_MODEL_TYPES)}, "
            f"not model_type {model_type!r}; use scales of 1"
        )


def is_residual_write(rest: str, model_type: str) -> bool:
    """Whether layer tensor ``rest`` (the name after ``layers.<i>.``) is folded for ``model_type``."""
    if model_type in POST_NORM_WRITES:
        return _POST_NORM.match(rest) is not None
    return _LINEAR.match(rest) is not None


def fold(rest: str, tensor: torch.Tensor, divisor: float, model_type: str) -> torch.Tensor:
    """``tensor`` (layer tensor ``rest``) with a residual write divided by ``divisor``; others unchanged."""
    if divisor == 1.0 or not is_residual_write(rest, model_type):
        return tensor
    wide = tensor.to(torch.float64)
    folded = (1.0 + wide) / divisor - 1.0 if model_type in POST_NORM_WRITES else wide / divisor
    return folded.to(tensor.dtype)


#: Model types whose config says which layers are dense (``mlp_only_layers``) among MoE ones.
DENSE_OR_SPARSE = frozenset({"qwen2_moe", "qwen3_moe"})


def layout_patch(layers: Sequence[int], rests: Mapping[int, Sequence[str]], model_type: str) -> dict[str, Any]:
    """Config keys that give each position the structure of the layer routed there (``layers[k]``).

    ``rests`` maps each layer of the frame to its tensor names after ``layers.<i>.``. Empty when every
    layer has the same tensors; :class:`MaterializeError` when a layer moves to a position built with
    another structure and ``model_type`` has no config entry for it.
    """
    layouts = {i: frozenset(r) for i, r in rests.items()}
    if len(set(layouts.values())) <= 1:
        return {}
    if model_type in DENSE_OR_SPARSE:
        dense = [k for k, i in enumerate(layers) if not any(".experts." in r for r in layouts[i])]
        return {"decoder_sparse_step": 1, "mlp_only_layers": dense}
    for k, i in enumerate(layers):
        if layouts.get(k) != layouts[i]:
            ref = 0 if k not in layouts else k
            odd = sorted(layouts[i] ^ layouts[ref])[:2]
            raise MaterializeError(
                f"routing.steps[{k}]: layer {i} goes to position {k}, whose layer has another structure "
                f"(tensors {odd} differ); a {model_type!r} model builds each position from its config, so "
                f"such a route cannot be exported; keep layers of each structure at positions of that structure"
            )
    return {}


__all__ = [
    "DENSE_OR_SPARSE", "FOLDABLE_MODEL_TYPES", "LINEAR_WRITES", "POST_NORM_WRITES", "check_foldable", "fold",
    "is_residual_write", "layout_patch",
]
