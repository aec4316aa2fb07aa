"""Where a checkpoint's tensors live in a loaded transformers model.

A source folder names its tensors as the checkpoint stores them; the live model a worker merges into
may hold some of them under another name or fused into a larger parameter. transformers 5 loads the
per-expert tensors of Mixtral-style checkpoints (``<layer>.block_sparse_moe.experts.<e>.w1|w3|w2.weight``)
and of Qwen-MoE-style ones (``<layer>.mlp.experts.<e>.gate_proj|up_proj|down_proj.weight``) into two
parameters per layer, ``<layer>.mlp.experts.gate_up_proj`` ``(E, 2I, H)`` (gate rows, then up rows) and
``<layer>.mlp.experts.down_proj`` ``(E, H, I)``, and renames ``block_sparse_moe`` to ``mlp``.

:func:`live_targets` maps every checkpoint name to the tensor it must be written to: the parameter of
the same name, else a view into the fused parameter (so writing the view writes the live model). A
fused parameter that the checkpoint's tensors do not cover exactly once is refused, as is a name with
no counterpart: a merge never leaves part of a live model stale.

Tied embeddings: a model whose output projection is its input embedding holds one parameter under two
names; :func:`aliased` lists the names whose target is another name's target, so a merge writes it once.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

from evomerge.errors import MaterializeError

#: A per-expert checkpoint tensor of a Mixtral- or Qwen-MoE-style layer.
_EXPERT = re.compile(
    r"^(?P<prefix>.*\.)(?:block_sparse_moe|mlp)\.experts\.(?P<expert>\d+)\."
    r"(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
#: Checkpoint projection -> (fused live parameter, part of its rows: 0 = first half, 1 = second, None = all).
_FUSED: dict[str, tuple[str, int | None]] = {
    "w1": ("gate_up_proj", 0),
    "gate_proj": ("gate_up_proj", 0),
    "w3": ("gate_up_proj", 1),
    "up_proj": ("gate_up_proj", 1),
    "w2": ("down_proj", None),
    "down_proj": ("down_proj", None),
}
#: Module renames transformers applies when it loads a checkpoint (checkpoint fragment, live fragment).
_RENAMES = ((".block_sparse_moe.", ".mlp."),)


def _renamed(name: str) -> str:
    for old, new in _RENAMES:
        name = name.replace(old, new)
    return name


def _fused_view(
    name: str, shape: tuple[int, ...] | None, params: Mapping[str, torch.Tensor]
) -> tuple[str, torch.Tensor] | None:
    """(fused parameter name, writable view) for a per-expert checkpoint tensor, or None."""
    match = _EXPERT.match(name)
    if match is None:
        return None
    fused, part = _FUSED[match["proj"]]
    target = f"{_renamed(match['prefix'])}mlp.experts.{fused}"
    param = params.get(target)
    expert = int(match["expert"])
    if param is None or param.dim() != 3 or expert >= param.shape[0]:
        return None
    view = param.detach()[expert]
    if part is not None:
        rows = view.shape[0] // 2
        view = view.narrow(0, part * rows, rows)
    if shape is not None and tuple(view.shape) != tuple(shape):
        raise MaterializeError(
            f"tensor {name}: shape {tuple(shape)} in the checkpoint, but its place in the live parameter "
            f"{target} {tuple(param.shape)} has shape {tuple(view.shape)}; this expert layout is not supported"
        )
    return target, view


def live_targets(
    module: torch.nn.Module, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]] | None = None
) -> dict[str, torch.Tensor]:
    """For every checkpoint tensor name, the live tensor it is written to (a parameter or a view of one).

    ``shapes`` (checkpoint name -> shape) lets fused views be checked against the checkpoint. Raises
    :class:`MaterializeError` naming the tensors that have no place in ``module``, or a fused parameter
    the checkpoint tensors do not fill exactly.
    """
    params = {n: p for n, p in module.named_parameters(remove_duplicate=False)}
    targets: dict[str, torch.Tensor] = {}
    filled: dict[str, int] = {}
    missing: list[str] = []
    for name in names:
        param = params.get(name)
        if param is None and _renamed(name) != name:
            param = params.get(_renamed(name))
        if param is not None:
            targets[name] = param.detach()
            continue
        found = _fused_view(name, None if shapes is None else shapes.get(name), params)
        if found is None:
            missing.append(name)
            continue
        fused, view = found
        targets[name] = view
        filled[fused] = filled.get(fused, 0) + view.numel()
    if missing:
        raise MaterializeError(
            f"live module {type(module).__name__} has no parameter for tensor(s) {missing[:3]}"
            + (f" ({len(missing) - 3} more)" if len(missing) > 3 else "")
        )
    for fused, count in filled.items():
        if count != params[fused].numel():
            raise MaterializeError(
                f"live parameter {fused} {tuple(params[fused].shape)}: the checkpoint's expert tensors fill "
                f"{count} of its {params[fused].numel()} entries; the sources and the live model differ"
            )
    return targets


def aliased(targets: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names whose target is the very tensor of an earlier name (tied embeddings): name -> that earlier name."""
    first: dict[tuple[int, tuple[int, ...], tuple[int, ...]], str] = {}
    out: dict[str, str] = {}
    for name, t in targets.items():
        if t.numel() == 0:
            continue
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key in first:
            out[name] = first[key]
        else:
            first[key] = name
    return out


__all__ = ["aliased", "live_targets"]
