"""Import and export of mergekit YAML for what both tools can express.

What mergekit cannot express (residual scaling in a routed model, hybrid routing over a merge,
kind overrides that no substring filter reproduces on the actual tensor names) is refused with the
reason, never silently dropped. What evomerge cannot express from a mergekit file (``tokenizer:``
blocks with per-token ``tokens:`` settings, ``modules:``, slices mixing layer ranges under a merge method,
unknown filters) is refused too. ``tokenizer_source`` and ``tokenizer: {source, pad_to_multiple_of}`` map to
the recipe's ``tokenizer_source`` and ``pad_to_multiple_of``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError
from evomerge.io.adapter import mergekit_ref
from evomerge.io.arch import TensorRole
from evomerge.merge.tensor_params import evaluate
from evomerge.names import PROJECTIONS
from evomerge.recipe import MERGED, ModelEntry, ParamValue, Recipe, RouteStep, Routing

#: Substring filters that select a module kind in each naming family (first match wins in mergekit).
KIND_FILTERS: dict[str, dict[str, tuple[str, ...]]] = {
    "llama": {
        "embed": ("embed_tokens",),
        "lm_head": ("lm_head",),
        "attn": ("self_attn",),
        "mlp": ("mlp", "block_sparse_moe"),
        "norm": ("norm",),
        "q": ("q_proj",),
        "k": ("k_proj",),
        "v": ("v_proj",),
        "o": ("o_proj",),
        "gate": ("gate_proj", ".w1."),
        "up": ("up_proj", ".w3."),
        "down": ("down_proj", ".w2."),
    },
    "gpt2": {
        "embed": ("wte", "wpe"),
        "lm_head": ("lm_head",),
        "attn": (".attn.",),
        "mlp": (".mlp.",),
        "norm": ("ln_",),
        "o": ("attn.c_proj",),
        "up": ("mlp.c_fc",),
        "down": ("mlp.c_proj",),
    },
}
_FAMILY = {"gpt2": "gpt2"}
_MK_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "tokenizer_source", "tokenizer"}
_REFUSED_KEYS = {
    "modules": "per-module ('modules:') merges are not supported",
    "chat_template": "chat_template is not part of a recipe; set it on the exported tokenizer",
    "out_dtype": "out_dtype is not supported; use dtype",
}


def _filters(model_type: str | None) -> dict[str, tuple[str, ...]]:
    return KIND_FILTERS[_FAMILY.get(model_type or "", "llama")]


def _mk_eval(setting: Any, name: str, t: float) -> Any:
    """mergekit's evaluation of a parameter setting for a tensor (first matching filter wins)."""
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or f in name:
                return _mk_eval(cond["value"], name, t)
        return None
    if isinstance(setting, list):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


# ------------------------------------------------------------------------------------- export
def _export_value(
    name: str, value: ParamValue, filters: dict[str, tuple[str, ...]], tensors: Sequence[tuple[str, TensorRole]],
    num_layers: int,
) -> Any:
    if not isinstance(value, dict):
        return value
    out: list[dict[str, Any]] = []
    # norms first: ``self_attn.q_norm`` is a norm, though its name holds the attention filter; projections
    # before their kinds (``self_attn.q_proj`` holds both filters)
    order = ("embed", "lm_head", "norm", *PROJECTIONS, "attn", "mlp")
    for key in value:
        if key in PROJECTIONS and key not in filters:
            raise ConfigError(f"parameter {name!r}: a {key!r} projection override has no mergekit filter here")
    for i, kind in enumerate(order):
        if kind not in filters:
            continue
        if kind in value:
            out += [{"filter": f, "value": value[kind]} for f in filters[kind]]
        elif kind in PROJECTIONS:
            continue  # a projection without its own value takes its kind's, which the kind's filter gives
        elif "default" in value and _shadowed(kind, order[i + 1:], value, filters, tensors):
            out += [{"filter": f, "value": value["default"]} for f in filters[kind]]
    if "other" in value:
        raise ConfigError(f"parameter {name!r}: an 'other' kind override has no mergekit filter")
    if "default" in value:
        out.append({"value": value["default"]})
    for tname, role in tensors:  # prove that mergekit's first-match reproduces our kind semantics
        t = 0.0 if role.layer is None else (role.layer / (num_layers - 1) if num_layers > 1 else 1.0)
        covered = role.kind in value or "default" in value or (role.proj is not None and role.proj in value)
        ours = evaluate(value, role, num_layers) if covered else None
        theirs = _mk_eval(out, tname, t)
        if (ours is None) != (theirs is None) or (
            ours is not None and abs(float(ours) - float(theirs)) > 1e-12
        ):
            raise ConfigError(
                f"parameter {name!r}: cannot be written as mergekit filters for tensor {tname} "
                f"(kind {role.kind!r}{f', projection {role.proj!r}' if role.proj else ''}: evomerge gives {ours}, "
                f"the filters would give {theirs})"
            )
    return out


def _shadowed(
    kind: str, later: Sequence[str], value: dict[str, Any], filters: dict[str, tuple[str, ...]],
    tensors: Sequence[tuple[str, TensorRole]],
) -> bool:
    """Whether a tensor of ``kind`` (which takes the default) would match a later kind's filter first."""
    later_filters = [f for k in later if k in value for f in filters.get(k, ())]
    return any(role.kind == kind and any(f in name for f in later_filters) for name, role in tensors)


def to_mergekit_yaml(
    recipe: Recipe,
    *,
    tensors: Sequence[tuple[str, TensorRole]] = (),
    num_layers: int = 1,
    model_type: str | None = None,
) -> str:
    """Write ``recipe`` as a mergekit YAML (model names become their source paths when known).

    ``tensors`` (name, role) of the actual model lets the export verify that kind overrides turn into
    filters that select exactly the same tensors; without it kind overrides are refused.
    """
    from evomerge.merge.methods import METHODS

    method = METHODS.get(recipe.method)
    if method.mergekit_name is None:
        raise ConfigError(f"method {recipe.method!r} has no mergekit equivalent")
    if recipe.data is not None and recipe.data.aim > 0:
        raise ConfigError("data.aim: mergekit has no activation-informed adjustment (AIM); export the merged "
                          "folder instead of mergekit YAML")
    path = {n: mergekit_ref(recipe.sources.get(n, n)) for n in recipe.model_names}  # adapters: BASE+ADAPTER
    filters = _filters(model_type)

    def params(p: dict[str, ParamValue]) -> dict[str, Any]:
        if any(isinstance(v, dict) for v in p.values()) and not tensors:
            raise ConfigError("kind overrides need the model's tensor names to be exported to mergekit")
        return {k: _export_value(k, v, filters, tensors, num_layers) for k, v in p.items()}

    doc: dict[str, Any] = {"merge_method": method.mergekit_name}
    if recipe.routing is not None:
        doc.update(_export_routing(recipe, path))
    else:
        doc["models"] = [
            {"model": path[m.model], **({"parameters": params(m.parameters)} if m.parameters else {})}
            for m in recipe.models
        ]
        if recipe.method == "linear" and recipe.base_model and recipe.base_model not in {m.model for m in recipe.models}:
            # evomerge's linear base only anchors the task vectors; mergekit averages its base_model in and
            # refuses it without a weight, so it is listed with weight 0 (the same average, and the same
            # config and tokenizer source)
            doc["models"].append({"model": path[recipe.base_model], "parameters": {"weight": 0.0}})
    if recipe.base_model and not (recipe.routing is not None and recipe.method == "linear"):
        doc["base_model"] = path[recipe.base_model]  # (a routed linear's base only anchors its task vectors)
    if recipe.parameters:
        doc["parameters"] = params(recipe.parameters)
    if recipe.dtype:
        doc["dtype"] = recipe.dtype
    if recipe.pad_to_multiple_of:
        doc["tokenizer"] = {"source": path.get(recipe.tokenizer_source or "base", recipe.tokenizer_source or "base"),
                            "pad_to_multiple_of": recipe.pad_to_multiple_of}
    elif recipe.tokenizer_source:
        doc["tokenizer_source"] = path.get(recipe.tokenizer_source, recipe.tokenizer_source)
    head = f"# evomerge recipe {recipe.hash}\n"
    if method.randomized:
        head += (
            f"# {recipe.method} draws random masks: evomerge seeds them per tensor from seed {recipe.seed}; "
            "mergekit draws its own, so its output matches in distribution, not bit for bit.\n"
        )
    return head + yaml.safe_dump(doc, sort_keys=False)


def _export_routing(recipe: Recipe, path: dict[str, str]) -> dict[str, Any]:
    """Slices of a routed recipe: ``passthrough`` (each step a layer of one model) or ``linear`` whose
    ``"@merge"`` steps (a layer swap's transition zones) become slices averaging those layers with the recipe's
    per-layer weights. mergekit takes embeddings from the first slice and the final norm and head from the last,
    so both must be whole layers of the frame model."""
    assert recipe.routing is not None
    steps = recipe.routing.steps
    hybrid = any(s.model == MERGED for s in steps)
    if recipe.method != "passthrough" and not (hybrid and recipe.method == "linear"):
        raise ConfigError("a routed recipe exports to mergekit only with method passthrough (or linear over the "
                          "routed '@merge' layers)")
    weights = _layer_weights(recipe, len(steps)) if hybrid else {}
    slices: list[dict[str, Any]] = []
    for i, step in enumerate(steps):
        if step.scale != 1.0:
            raise ConfigError(
                f"routing.steps[{i}] scales the residual stream by {step.scale}; mergekit cannot express it "
                "(export the merged folder, where the scale is folded into the weights)"
            )
        if step.model == MERGED:
            if step.layer != i:
                raise ConfigError(f"routing.steps[{i}]: '@merge' at layer {step.layer} of position {i} cannot be "
                                  "expressed in mergekit; export the model")
            slices.append({"sources": [
                {"model": path[m], "layer_range": [i, i + 1], "parameters": {"weight": w[i]}}
                for m, w in weights.items() if w[i]]})
            continue
        src = slices[-1]["sources"][0] if slices and len(slices[-1]["sources"]) == 1 else None
        if src and src["model"] == path[step.model] and src["layer_range"][1] == step.layer:
            src["layer_range"][1] += 1
        else:
            one = {"model": path[step.model], "layer_range": [step.layer, step.layer + 1]}
            slices.append({"sources": [{**one, "parameters": {"weight": 1.0}} if hybrid else one]})
    frame = recipe.routing.frame
    for end, step in (("first", steps[0]), ("last", steps[-1])):
        if step.model != frame:
            takes = "embeddings from the first" if end == "first" else "the final norm and LM head from the last"
            raise ConfigError(
                f"routing.frame {frame!r} differs from the {end} routed model {step.model!r}; mergekit takes "
                f"{takes} slice's model: export the merged folder instead"
            )
    return {"slices": slices}


def _layer_weights(recipe: Recipe, num_layers: int) -> dict[str, list[float]]:
    """Each model's ``weight`` per layer in a hybrid linear recipe (a scalar or one value per layer)."""
    out = {}
    for m in recipe.models:
        w = m.parameters.get("weight", 1.0)
        if isinstance(w, (int, float)) and not isinstance(w, bool):
            w = [float(w)] * num_layers
        if not isinstance(w, list) or len(w) != num_layers or set(m.parameters) - {"weight"}:
            raise ConfigError(f"models[{m.model!r}].parameters: only a weight (a number or one per layer, "
                              f"{num_layers}) exports as mergekit linear slices")
        out[m.model] = w
    if set(recipe.parameters) - {"normalize"} or not recipe.parameters.get("normalize", True):
        raise ConfigError("parameters: a hybrid linear recipe exports to mergekit only with normalized weights")
    return out


# ------------------------------------------------------------------------------------- import
def _import_value(where: str, setting: Any, filters: dict[str, tuple[str, ...]]) -> ParamValue:
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        by_filter = {f: k for k, fs in filters.items() for f in fs}
        out: dict[str, Any] = {}
        for i, cond in enumerate(setting):
            f = cond.get("filter")
            if set(cond) - {"filter", "value"}:
                raise ConfigError(f"{where}[{i}]: unknown keys {sorted(set(cond) - {'filter', 'value'})}")
            if f is None or f == "*":
                out.setdefault("default", cond["value"])
            elif f in by_filter:
                out.setdefault(by_filter[f], cond["value"])
            else:
                raise ConfigError(
                    f"{where}[{i}].filter {f!r} does not select a module kind evomerge knows "
                    f"({', '.join(sorted(by_filter))}); it cannot be imported without changing the merge"
                )
        return out
    if isinstance(setting, (int, float, bool)) or (
        isinstance(setting, list) and all(isinstance(x, (int, float)) for x in setting)
    ):
        return setting
    raise ConfigError(f"{where}: unsupported value {setting!r}")


def from_mergekit_yaml(
    text: str, *, base_dir: Path | None = None, num_layers: Callable[[str], int] | None = None
) -> Recipe:
    """Read a mergekit YAML into a Recipe; model references become names bound to their folders."""
    doc = yaml.safe_load(text)
    if not isinstance(doc, dict) or "merge_method" not in doc:
        raise ConfigError("not a mergekit config: no 'merge_method'")
    for key in doc:
        if key in _REFUSED_KEYS:
            raise ConfigError(f"{key}: {_REFUSED_KEYS[key]}")
        if key not in _MK_KEYS:
            raise ConfigError(f"{key}: unknown mergekit key (supported: {', '.join(sorted(_MK_KEYS))})")
    filters = _filters(None)

    def ref(m: Any, where: str) -> str:
        if isinstance(m, dict):
            if set(m) - {"model"}:
                raise ConfigError(f"{where}: only a plain model reference is supported, got {sorted(m)}")
            m = m["model"]
        if not isinstance(m, str):
            raise ConfigError(f"{where}: expected a model path, got {m!r}")
        if "+" in m:
            raise ConfigError(f"{where}: LoRA references ('model+lora') are not supported")
        return m

    def params(p: Any, where: str) -> dict[str, ParamValue]:
        if p is None:
            return {}
        if not isinstance(p, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return {k: _import_value(f"{where}.{k}", v, filters) for k, v in p.items()}

    method = doc["merge_method"]
    models: list[ModelEntry] = []
    routing = None
    if "models" in doc and "slices" in doc:
        raise ConfigError("models and slices are mutually exclusive")
    if "models" in doc:
        for i, m in enumerate(doc["models"] or []):
            models.append(ModelEntry(model=ref(m["model"], f"models[{i}].model"),
                                     parameters=params(m.get("parameters"), f"models[{i}].parameters")))
    elif "slices" in doc:
        models, routing = _import_slices(doc["slices"], method, ref, params, num_layers)
    else:
        raise ConfigError("neither models nor slices given")
    base = ref(doc["base_model"], "base_model") if doc.get("base_model") else None
    tok, pad = _import_tokenizer(doc, ref)
    names = [m.model for m in models] + ([base] if base else [])
    sources = {}
    for n in names:
        p = Path(n).expanduser()
        if base_dir is not None and not p.is_absolute() and (base_dir / p).exists():
            p = base_dir / p
        sources[n] = str(p)
    try:
        return Recipe(
            method=method, models=tuple(models), base_model=base,
            parameters=params(doc.get("parameters"), "parameters"), dtype=doc.get("dtype"),
            tokenizer_source=tok, pad_to_multiple_of=pad, routing=routing, sources=sources,
        )
    except ValueError as exc:
        raise ConfigError(f"mergekit config: {exc}") from exc


def _import_tokenizer(doc: dict[str, Any], ref: Any) -> tuple[str | None, int | None]:
    """``tokenizer_source`` or the ``tokenizer:`` block as (source, pad_to_multiple_of)."""
    block = doc.get("tokenizer")
    if block is None:
        src = doc.get("tokenizer_source")
        return (None if src is None else (src if src in ("base", "union") else ref(src, "tokenizer_source"))), None
    if "tokenizer_source" in doc:
        raise ConfigError("tokenizer, tokenizer_source: give one of them, not both")
    if not isinstance(block, dict):
        raise ConfigError("tokenizer: expected a mapping with source and pad_to_multiple_of")
    if block.get("tokens"):
        raise ConfigError("tokenizer.tokens: per-token embedding settings are not supported")
    extra = sorted(set(block) - {"source", "pad_to_multiple_of", "tokens"})
    if extra:
        raise ConfigError(f"tokenizer: unknown keys {extra} (supported: source, pad_to_multiple_of)")
    src = block.get("source", "union")  # mergekit's default for a tokenizer block
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    return (src if src in ("base", "union") else ref(src, "tokenizer.source")), pad


def _import_slices(slices: Any, method: str, ref: Any, params: Any, num_layers: Any):
    if method == "passthrough":
        steps: list[RouteStep] = []
        models: dict[str, ModelEntry] = {}
        for i, sl in enumerate(slices):
            srcs = sl.get("sources") or []
            if len(srcs) != 1:
                raise ConfigError(f"slices[{i}]: passthrough slices take exactly one source")
            s = srcs[0]
            if s.get("parameters") or sl.get("parameters"):
                raise ConfigError(f"slices[{i}]: per-slice parameters (e.g. scale) are not supported")
            name = ref(s["model"], f"slices[{i}].sources[0].model")
            a, b = s["layer_range"]
            steps += [RouteStep(model=name, layer=j) for j in range(a, b)]
            models.setdefault(name, ModelEntry(model=name))
        return list(models.values()), Routing(steps=tuple(steps), frame=steps[0].model)
    if len(slices) != 1:
        raise ConfigError(f"slices: {method} over several slices (layer ranges) is not supported; use models")
    sl = slices[0]
    out = []
    for j, s in enumerate(sl.get("sources") or []):
        name = ref(s["model"], f"slices[0].sources[{j}].model")
        a, b = s["layer_range"]
        full = num_layers(name) if num_layers else None
        if a != 0 or (full is not None and b != full):
            raise ConfigError(f"slices[0].sources[{j}].layer_range {[a, b]}: only the full layer range is supported")
        out.append(ModelEntry(model=name, parameters=params(s.get("parameters"), f"slices[0].sources[{j}].parameters")))
    if sl.get("parameters"):
        raise ConfigError("slices[0].parameters: move them to the top-level parameters")
    return out, None
