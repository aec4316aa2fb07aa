"""Preflight check that source models can be merged tensor by tensor.

Only safetensors headers and configs are read, never tensor data. The first model is the reference; every
other model must have the same architecture family, the same tensor names and the same shapes. A mismatch
raises :class:`~evomerge.errors.SourceMismatchError` naming both models, the first offending tensor, both
shapes and the likely fix. A tensor that is a float in one model and not in another (e.g. quantized to
integers) is refused too, naming the folder of the odd one and the tensor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from evomerge.errors import SourceMismatchError
from evomerge.io.arch import model_order_key, tensor_role
from evomerge.io.folder import ModelFolder, vocab_rows

logger = logging.getLogger(__name__)


def _family(folder: ModelFolder) -> str:
    return folder.model_type or folder.architecture


def _more(count: int, one: str, many: str) -> str:
    if count <= 0:
        return ""
    return f" (and {count} more {one if count == 1 else many})"


def _check_family(a_name: str, a: ModelFolder, b_name: str, b: ModelFolder) -> None:
    if _family(a) != _family(b):
        raise SourceMismatchError(
            f"{a_name!r} is a {a.architecture} (model_type {_family(a)!r}) but {b_name!r} is a "
            f"{b.architecture} (model_type {_family(b)!r}): these are different base models; merge only "
            f"fine-tunes of the same base model"
        )
    if a.architecture != b.architecture:
        logger.warning(
            "%r is a %s and %r a %s (same model_type %r): merging their shared tensors",
            a_name,
            a.architecture,
            b_name,
            b.architecture,
            _family(a),
        )


def _tied_message(a_name: str, a: ModelFolder, b_name: str, b: ModelFolder, head: str) -> str:
    tied, untied = (a_name, b_name) if a.tied_embeddings else (b_name, a_name)
    return (
        f"tensor {head!r} is in {untied!r} but not in {tied!r}: {tied!r} ties its output projection to the "
        f"input embeddings (tie_word_embeddings) while {untied!r} has a separate {head!r}; merge models with "
        f"the same tying, or untie {tied!r} by saving a copy of its input embedding as {head!r} and setting "
        f"tie_word_embeddings to false in its config.json"
    )


def _check_names(a_name: str, a: ModelFolder, b_name: str, b: ModelFolder) -> None:
    missing = sorted(
        (n for n in a.tensor_names if n not in b), key=lambda n: model_order_key(n, a.model_type)
    )
    extra = sorted((n for n in b.tensor_names if n not in a), key=lambda n: model_order_key(n, b.model_type))
    if not missing and not extra:
        return
    if a.num_layers != b.num_layers:
        raise SourceMismatchError(
            f"{a_name!r} has {a.num_layers} layers but {b_name!r} has {b.num_layers}: these are different "
            f"base models (or one was pruned); merge only models of the same depth"
        )
    heads = [n for n in missing + extra if tensor_role(n, a.model_type).kind == "lm_head"]
    if heads and len(missing) + len(extra) == len(heads) and a.tied_embeddings != b.tied_embeddings:
        raise SourceMismatchError(_tied_message(a_name, a, b_name, b, heads[0]))
    if missing:
        first, owner, lacking, rest = missing[0], a_name, b_name, len(missing) - 1 + len(extra)
    else:
        first, owner, lacking, rest = extra[0], b_name, a_name, len(extra) - 1
    raise SourceMismatchError(
        f"tensor {first!r} is in {owner!r} but not in {lacking!r}{_more(rest, 'differing tensor name', 'differing tensor names')}: "
        f"the models have different structures; merge only fine-tunes of the same base model"
    )


def _shape_message(
    name: str, kind: str, a_name: str, a_shape: tuple[int, ...], b_name: str, b_shape: tuple[int, ...]
) -> str:
    same_rest = len(a_shape) == len(b_shape) >= 1 and a_shape[1:] == b_shape[1:]
    if kind in ("embed", "lm_head") and same_rest:
        return (
            f"{name}: {a_shape[0]} rows in {a_name!r} vs {b_shape[0]} in {b_name!r}: the vocabularies "
            f"differ (e.g. tokens were added to one); set tokenizer_source (base, union or a model) to merge "
            f"them by token, or resize the embeddings of one (model.resize_token_embeddings({a_shape[0]}))"
        )
    return (
        f"{name}: shape {tuple(a_shape)} in {a_name!r} vs {tuple(b_shape)} in {b_name!r}: these are "
        f"different base models (or sizes) and cannot be merged tensor by tensor"
    )


def _vocab_only(name: str, a: ModelFolder, b: ModelFolder) -> bool:
    """Whether tensor ``name`` differs between ``a`` and ``b`` only in its vocabulary rows."""
    sa, sb = a.shape(name), b.shape(name)
    return (
        tensor_role(name, a.model_type).kind in ("embed", "lm_head")
        and len(sa) == len(sb) >= 1 and sa[1:] == sb[1:]
        and sa[0] == vocab_rows(a) and sb[0] == vocab_rows(b)
    )


def _check_shapes(a_name: str, a: ModelFolder, b_name: str, b: ModelFolder, vocab: bool = False) -> None:
    names = sorted(a.tensor_names, key=lambda n: model_order_key(n, a.model_type))
    bad = [n for n in names if a.shape(n) != b.shape(n) and not (vocab and _vocab_only(n, a, b))]
    if bad:
        first = bad[0]
        kind = tensor_role(first, a.model_type).kind
        message = _shape_message(first, kind, a_name, a.shape(first), b_name, b.shape(first))
        raise SourceMismatchError(
            message + _more(len(bad) - 1, "tensor with a different shape", "tensors with different shapes")
        )


def _check_dtypes(a_name: str, a: ModelFolder, b_name: str, b: ModelFolder) -> None:
    names = sorted(a.tensor_names, key=lambda n: model_order_key(n, a.model_type))
    mixed = [n for n in names if a.dtype(n).is_floating_point != b.dtype(n).is_floating_point]
    if mixed:
        first = mixed[0]
        more = _more(len(mixed) - 1, "tensor that is a float in one model only",
                     "tensors that are floats in one model only")
        pair = ((b_name, b), (a_name, a))
        (odd_name, odd), (ok_name, ok) = pair if a.dtype(first).is_floating_point else pair[::-1]
        raise SourceMismatchError(
            f"{odd.path}: tensor {first!r} of {odd_name!r} is stored as {odd.dtype(first)} but {ok_name!r} "
            f"stores it as {ok.dtype(first)}{more}: integer (e.g. quantized) and float tensors cannot be "
            f"merged; use a float (unquantized) checkpoint of {odd_name!r}"
        )
    differing = [n for n in a.tensor_names if a.dtype(n) != b.dtype(n)]
    if differing:
        logger.info(
            "%r and %r store %d tensors in different dtypes (e.g. %s: %s vs %s); they are cast when merged",
            a_name,
            b_name,
            len(differing),
            differing[0],
            a.dtype(differing[0]),
            b.dtype(differing[0]),
        )


def check_mergeable(folders: Mapping[str, ModelFolder], *, vocab: bool = False) -> None:
    """Check that the named source models can be merged tensor by tensor, reading headers only.

    The first model is the reference. Raises :class:`~evomerge.errors.SourceMismatchError` for a different
    architecture family, a missing or extra tensor (a tied vs untied ``lm_head`` is explained), or a tensor
    whose shape differs (the message names the tensor, both models and both shapes, and suggests a fix), or
    a tensor stored as a float in one model and as an integer (or other non-float) type in another.
    Fewer than two models pass trivially. With ``vocab=True``, vocabulary tensors (``embed_tokens``,
    ``lm_head``) may differ in their row count only: the caller lays them out by token
    (:mod:`evomerge.merge.vocab`).
    """
    items = list(folders.items())
    if len(items) < 2:
        return
    ref_name, ref = items[0]
    for name, other in items[1:]:
        _check_family(ref_name, ref, name, other)
        _check_names(ref_name, ref, name, other)
        _check_shapes(ref_name, ref, name, other, vocab)
        _check_dtypes(ref_name, ref, name, other)
    logger.debug("%d models are mergeable (%d tensors each)", len(items), len(ref))
