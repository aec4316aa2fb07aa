"""Routed (data-flow) models: live, over resident source layers, and exported as a plain HF folder.

A :class:`~evomerge.recipe.Routing` is an ordered path of decoder layers, each taken from one source
model, with a scale ``s_k`` applied to the residual stream entering position ``k``; the frame model
gives the embeddings, the final norm and the head.

**Live** (:func:`build_routed_model`): a stock model object of the frame's class whose decoder layer
list holds one thin :class:`RoutedLayer` per position. Each wrapper references a resident source
layer (no weight is copied; the same layer object may sit at several positions), multiplies its
input by ``s_k`` and hands the layer a view of the KV cache indexed by the *position*, so a layer that
appears twice keeps two cache entries and ``generate`` with the cache works.

**Export** (:func:`routed_state_dict`, :func:`routed_config_patch`, :func:`export_routed`): a
folder that stock ``transformers`` loads without custom code, ``num_hidden_layers`` = path length.
The scales are folded into the weights. In a pre-norm decoder (Llama family) position ``k`` computes
``a = x + Attn(N1(x))`` and ``y = a + MLP(N2(a))`` with ``x = s_k * h_{k-1}``; every norm ``N`` is
RMS-normalization, so ``N(c*v) = N(v)`` for ``c > 0`` (exactly with ``eps = 0``). Write
``P_k = s_1 * ... * s_k`` and ``g_k = h_k / P_k``. Dividing the live equations by ``P_k`` gives
``g_k = g_{k-1} + Attn(N1(g_{k-1})) / P_k + MLP(N2(a / P_k)) / P_k``: an unscaled decoder whose
residual writes at position ``k`` (``o_proj`` and ``down_proj``, weights and biases) are divided by
``P_k``, with the embedding unchanged (``g_0 = h_0``). The final norm sees ``g_K = h_K / P_K``,
which it maps to the same output. The result equals the live model up to the norms' epsilon: each
norm computes ``v / sqrt(mean(v^2) + eps)``, and the exported model feeds it ``v / P`` instead of
``v``, i.e. the live model with ``eps * P^2``; negligible when ``mean(v^2) >> eps``. Scales must be
positive. Which tensors are the residual writes depends on the family (Gemma 2/3 write through
post-norms): :mod:`evomerge.merge.folding` lists the model types it folds; other types export only
routes whose scales are all 1.
"""

from __future__ import annotations

import copy
import logging
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from evomerge.errors import MaterializeError
from evomerge.io.arch import split_layer
from evomerge.merge.folding import FOLDABLE_MODEL_TYPES, check_foldable, fold, layout_patch  # noqa: F401
from evomerge.recipe import MERGED, Recipe, Routing

logger = logging.getLogger(__name__)

GetTensor = Callable[[str, str], torch.Tensor]


# --------------------------------------------------------------------------- live model
class _PositionCache:
    """A view of a KV cache that stores every update under one fixed layer index (the path position)."""

    def __init__(self, cache: Any, index: int) -> None:
        self._cache = cache
        self._index = index

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None,
               *args: Any, **kwargs: Any) -> Any:
        return self._cache.update(key_states, value_states, self._index, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class RoutedLayer(nn.Module):
    """Position ``index`` of a routed model: scales its input by ``scale``, then runs a resident source layer.

    The wrapped layer is referenced, not copied. The KV cache the layer sees stores its entries under
    ``index``, whatever ``layer_idx`` the layer was built with.
    """

    def __init__(self, layer: nn.Module, index: int, scale: float, source: str, source_layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.index = index
        self.scale = float(scale)
        self.source = source
        self.source_layer = source_layer
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None,
                **kwargs: Any) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        if past_key_values is not None:
            past_key_values = _PositionCache(past_key_values, self.index)
        return self.layer(hidden_states, *args, past_key_values=past_key_values, **kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}, source={self.source!r}, layer={self.source_layer}, scale={self.scale:g}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a HF causal LM (``model.get_decoder().layers``), or ``model`` if it is one."""
    if isinstance(model, nn.ModuleList):
        return model
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise MaterializeError(f"{type(model).__name__}: no decoder layer list (expected <decoder>.layers)")
    return layers


def _layer_types(routing: Routing, types_of: Callable[[str], Sequence[str] | None]) -> list[str] | None:
    out: list[str] = []
    for step in routing.steps:
        types = types_of(step.model)
        if types is None:
            return None
        out.append(types[step.layer])
    return out


def build_routed_model(
    frame_module: nn.Module, layer_sources: Mapping[str, nn.Module], routing: Routing
) -> nn.Module:
    """A live routed model: an object of ``frame_module``'s class whose decoder runs ``routing``.

    ``layer_sources`` maps every model named in ``routing.steps`` to a resident model (or its decoder
    layer list). Embeddings, final norm, rotary embedding and head are ``frame_module``'s own modules;
    decoder layers are the sources' own layers, wrapped per position (:class:`RoutedLayer`). Nothing is
    copied, so changing a source's weights in place changes the routed model too. The frame and the
    sources are not modified (the routed model has its own config, ``num_hidden_layers`` = path length).
    """
    layers_of: dict[str, nn.ModuleList] = {}
    for i, step in enumerate(routing.steps):
        if step.model not in layer_sources:
            raise MaterializeError(
                f"routing.steps[{i}]: model {step.model!r} is not among the resident sources "
                f"{sorted(layer_sources)}"
            )
        layers = layers_of.setdefault(step.model, decoder_layers(layer_sources[step.model]))
        if step.layer >= len(layers):
            raise MaterializeError(
                f"routing.steps[{i}]: layer {step.layer} of {step.model!r} does not exist "
                f"(it has {len(layers)} layers)"
            )
    frame_config = getattr(frame_module, "config", None)
    if frame_config is None:
        raise MaterializeError(f"routing frame {routing.frame!r}: {type(frame_module).__name__} has no config")
    config = copy.deepcopy(frame_config)
    config.num_hidden_layers = len(routing.steps)
    if isinstance(getattr(frame_config, "layer_types", None), list):

        def types_of(name: str) -> Sequence[str] | None:
            cfg = getattr(layer_sources[name], "config", frame_config)
            return getattr(cfg, "layer_types", None)

        config.layer_types = _layer_types(routing, types_of)
    with torch.device("meta"):
        routed = type(frame_module)(config)
    if getattr(frame_module, "generation_config", None) is not None:
        routed.generation_config = copy.deepcopy(frame_module.generation_config)
    new_decoder, frame_decoder = routed.get_decoder(), frame_module.get_decoder()
    for name, child in list(routed.named_children()):
        if child is not new_decoder:
            setattr(routed, name, getattr(frame_module, name))
    for name, _ in list(new_decoder.named_children()):
        if name != "layers":
            setattr(new_decoder, name, getattr(frame_decoder, name))
    new_decoder.layers = nn.ModuleList(
        RoutedLayer(layers_of[s.model][s.layer], k, s.scale, s.model, s.layer) for k, s in enumerate(routing.steps)
    )
    leftovers = [n for n, t in [*routed.named_parameters(), *routed.named_buffers()] if t.is_meta]
    if leftovers:
        raise MaterializeError(f"routed model: tensors with no counterpart in the frame model: {leftovers[:5]}")
    routed.train(frame_module.training)
    logger.debug("routed model: %d positions over %s", len(routing.steps), sorted(layers_of))
    return routed


_SOURCE_MODULES: weakref.WeakKeyDictionary[Any, dict[str, nn.Module]] = weakref.WeakKeyDictionary()


def _source_module(sources: Any, model: str, template: nn.Module) -> nn.Module:
    """Model ``model`` rebuilt from resident reference + task vector, once per ``sources`` object."""
    cache = _SOURCE_MODULES.setdefault(sources, {})
    if model in cache:
        return cache[model]
    if model == sources.reference:
        row = None
    elif model in sources.order:
        row = sources.order.index(model)
    else:
        raise MaterializeError(
            f"routing: model {model!r} is not held by this worker (it holds {[sources.reference, *sources.order]})"
        )
    from evomerge.merge.live import live_targets

    module = copy.deepcopy(template)
    with torch.no_grad():
        shapes = {n: tuple(t.shape) for n, t in sources.base.items()}
        for name, target in live_targets(module, list(sources.base), shapes).items():
            target.copy_(sources.base[name] if row is None else sources.base[name] + sources.deltas[name][row])
    module.eval()
    cache[model] = module
    logger.info("routing: built resident module for %r", model)
    return module


def live_routed_model(
    recipe: Recipe, live_model: nn.Module, sources: Any, *, device: str | torch.device | None = None
) -> nn.Module:
    """A worker's routed model for ``recipe``: ``"@merge"`` is ``live_model`` (holding the merged weights).

    Every other model of the route is rebuilt as a module from ``sources`` (an
    :class:`evomerge.merge.sources.ResidentSources`: reference + task vectors) the first time it is
    routed and kept for as long as ``sources`` lives (one model's memory per routed source).
    ``device`` is accepted for symmetry with the worker; the modules live where ``sources`` does.
    """
    routing = recipe.routing
    if routing is None:
        raise MaterializeError("live_routed_model: the recipe has no routing")
    names = {s.model for s in routing.steps} | {routing.frame}
    modules = {
        name: live_model if name == MERGED else _source_module(sources, name, live_model) for name in sorted(names)
    }
    return build_routed_model(modules[routing.frame], modules, routing)


# --------------------------------------------------------------------------- export
def _split_names(tensor_names: Sequence[str]) -> tuple[list[str], dict[int, list[str]], str | None]:
    """(non-layer names, layer index -> rests, layer stem) of a model's tensor names."""
    others: list[str] = []
    rests: dict[int, list[str]] = {}
    stem: str | None = None
    for name in tensor_names:
        parts = split_layer(name)
        if parts is None or not parts[2]:
            others.append(name)
            continue
        if stem is not None and parts[0] != stem:
            raise MaterializeError(f"tensor {name!r}: two decoder layer stems ({stem!r}, {parts[0]!r})")
        stem = parts[0]
        rests.setdefault(parts[1], []).append(parts[2])
    return others, rests, stem


def cumulative_scales(routing: Routing) -> list[float]:
    """``P_k = s_1 * ... * s_k`` for every position (the divisor of that position's residual writes)."""
    out, acc = [], 1.0
    for i, step in enumerate(routing.steps):
        if not (math.isfinite(step.scale) and step.scale > 0):
            raise MaterializeError(f"routing.steps[{i}].scale = {step.scale}: scales must be finite and > 0")
        acc *= step.scale
        out.append(acc)
    return out


def routed_state_dict(
    routing: Routing, get_tensor: GetTensor, tensor_names: Sequence[str], *, model_type: str = "llama"
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of the routed model as a plain ``num_hidden_layers = len(steps)`` checkpoint.

    ``tensor_names`` are the frame model's tensor names (every source shares that layout);
    ``get_tensor(model, name)`` returns one tensor of one model (``"@merge"`` included). Layer ``k`` of
    the output is layer ``steps[k].layer`` of ``steps[k].model`` with its residual writes divided by
    ``P_k`` (see the module docstring); everything else comes from ``routing.frame`` unchanged.
    """
    others, rests, stem = _split_names(tensor_names)
    if stem is None:
        raise MaterializeError("routed export: no decoder layer tensors (<stem>.<i>.<rest>) in the frame")
    divisors = cumulative_scales(routing)
    check_foldable(model_type, divisors)
    for k, step in enumerate(routing.steps):
        if step.layer not in rests:
            raise MaterializeError(
                f"routing.steps[{k}]: layer {step.layer} does not exist (layers 0..{max(rests)} in the frame)"
            )
    return _iter_routed(routing, get_tensor, tensor_names, others, rests, stem, divisors, model_type)


def _iter_routed(
    routing: Routing,
    get_tensor: GetTensor,
    tensor_names: Sequence[str],
    others: list[str],
    rests: dict[int, list[str]],
    stem: str,
    divisors: list[float],
    model_type: str,
) -> Iterator[tuple[str, torch.Tensor]]:
    position = {n: i for i, n in enumerate(tensor_names)}
    other_set = set(others)
    first_layer = min(i for n, i in position.items() if n not in other_set)
    for name in (n for n in others if position[n] < first_layer):
        yield name, get_tensor(routing.frame, name)
    seen: set[int] = set()
    for k, step in enumerate(routing.steps):
        for rest in rests[step.layer]:
            raw = get_tensor(step.model, f"{stem}.{step.layer}.{rest}")
            tensor = fold(rest, raw, divisors[k], model_type)
            if tensor is raw and tensor.data_ptr() in seen:
                tensor = tensor.clone()  # a repeated layer: writers refuse tensors that share memory
            seen.add(tensor.data_ptr())
            yield f"{stem}.{k}.{rest}", tensor
    for name in (n for n in others if position[n] > first_layer):
        yield name, get_tensor(routing.frame, name)


def routed_config_patch(
    routing: Routing, config: Mapping[str, Any], tensor_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Keys to override in the frame's ``config.json``: ``num_hidden_layers``, ``layer_types`` when present,
    and, given the frame's ``tensor_names``, what layers of different structures need (see
    :func:`evomerge.merge.folding.layout_patch`)."""
    patch: dict[str, Any] = {"num_hidden_layers": len(routing.steps)}
    types = config.get("layer_types")
    if isinstance(types, list):
        patch["layer_types"] = [types[s.layer] for s in routing.steps]
    if tensor_names is not None:
        rests = _split_names(tensor_names)[1]
        layers = [s.layer for s in routing.steps]
        patch.update(layout_patch(layers, rests, str(config.get("model_type", ""))))
    return patch


def export_routed(
    recipe: Recipe,
    folders: Mapping[str, Any],
    config: Mapping[str, Any],
    *,
    iter_merged_fn: Callable[..., Iterator[tuple[str, torch.Tensor]]] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[Iterator[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Tensors and ``config.json`` content of a routed recipe, read from opened source folders.

    ``folders`` maps model names to :class:`evomerge.io.ModelFolder`; ``config`` is the reference
    model's config. When the route names ``"@merge"`` (hybrid), the recipe without its routing is first
    merged with ``iter_merged_fn(recipe, folders, device=device)`` and held in memory (one model).
    """
    routing = recipe.routing
    if routing is None:
        raise MaterializeError("export_routed: the recipe has no routing")
    used = {s.model for s in routing.steps} | {routing.frame}
    merged: dict[str, torch.Tensor] = {}
    if MERGED in used:
        if iter_merged_fn is None:
            raise MaterializeError("routing names '@merge' but no merge function was given")
        merged = dict(iter_merged_fn(recipe.model_copy(update={"routing": None}), folders, device=device))
    dtype = getattr(torch, recipe.dtype) if recipe.dtype else None
    missing = sorted(m for m in used if m != MERGED and m not in folders)
    if missing:
        raise MaterializeError(f"routing: no source folder for model(s) {missing}")

    def get_tensor(model: str, name: str) -> torch.Tensor:
        if model == MERGED:
            return merged[name]
        return folders[model].get(name, device=device, dtype=dtype)

    names = list(merged) if routing.frame == MERGED else list(folders[routing.frame].tensor_names)
    model_type = str(config.get("model_type", ""))
    tensors = routed_state_dict(routing, get_tensor, names, model_type=model_type)
    return tensors, {**config, **routed_config_patch(routing, config, names)}
