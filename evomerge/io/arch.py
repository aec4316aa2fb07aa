"""What a tensor is, from its name: which layer it belongs to and what kind of weight it is.

Covers the naming of Llama, Mistral, Qwen2/Qwen3 (``q_norm``/``k_norm`` are norms), Gemma/Gemma 2/Gemma 3
(the extra ``pre_``/``post_feedforward_layernorm`` are norms), Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``),
MoE checkpoints (Mixtral's ``block_sparse_moe.experts.N.w1|w2|w3`` and ``block_sparse_moe.gate``, Qwen-MoE's
``mlp.experts.N.*_proj`` and ``mlp.gate``: experts and router are ``mlp``) and GPT-2
(``transformer.h.N.attn.c_attn``, ``mlp.c_fc``, ``ln_1``, ``wte``, ``wpe``, ``ln_f``), with a generic
fallback for any model whose layers are named ``layers.N``, ``layer.N``, ``h.N`` or ``blocks.N``. Names are
the checkpoint's (what a folder stores), not a loaded model's (see :mod:`evomerge.merge.live`). Helpers
split, index and rename layer tensors for layer routing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from evomerge.names import ModuleKind, Projection

#: ``<stem>.<index>.<rest>``: the first ``layers``/``layer``/``h``/``blocks`` component followed by a number.
_LAYER = re.compile(r"^(?P<stem>(?:.*?\.)?(?:layers|layer|h|blocks))\.(?P<index>\d+)(?:\.(?P<rest>.*))?$")

# Rules are tried in order on the dotted components; the first that matches decides the kind.
_BUFFER_WORDS = ("rotary_emb", "inv_freq", "masked_bias")
_NORM = re.compile(r"(norm|^ln_\w*$|^ln$|layernorm)")
_ATTN = re.compile(
    r"^(self_attn|attn|attention|self_attention|cross_attn|mixer|"
    r"[qkvo]_proj|qkv_proj|c_attn|query_key_value|query|key|value|wqkv|wq|wk|wv|wo)$"
)
_MLP = re.compile(
    r"^(mlp|ffn|feed_forward|feedforward|block_sparse_moe|moe|experts|shared_expert|"
    r"gate_proj|up_proj|down_proj|gate_up_proj|c_fc|fc1|fc2|fc_in|fc_out|w1|w2|w3|"
    r"dense_h_to_4h|dense_4h_to_h)$"
)
_LM_HEAD = re.compile(r"^(lm_head|embed_out|output_layer)$")
_EMBED = re.compile(r"(embed|^wte$|^wpe$|^tok_embeddings$|^word_embeddings$|^position_embeddings$)")

#: Family-specific names whose meaning differs from the generic rules.
_FAMILY_RULES: dict[str, tuple[tuple[re.Pattern[str], ModuleKind], ...]] = {
    # GPT-2 checkpoints store the causal-mask buffers ``attn.bias`` / ``attn.masked_bias``: not weights.
    "gpt2": ((re.compile(r"(^|\.)attn\.(masked_)?bias$"), "other"),),
}


#: Projection names inside a layer (Llama/Mistral/Qwen/Gemma/Phi-3 ``*_proj``, Mixtral experts ``w1|w3|w2``,
#: GPT-2 ``attn.c_proj``, ``mlp.c_fc|c_proj``); fused tensors (``qkv_proj``, ``gate_up_proj``, ``c_attn``) have none.
_PROJ_WORDS: dict[str, Projection] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down",
}


@dataclass(frozen=True)
class TensorRole:
    """The role of one tensor: its layer index (None outside the layer stack), its kind and, for the
    projections of attention and MLP, which projection it is (``q`` … ``down``; None otherwise)."""

    layer: int | None
    kind: ModuleKind
    proj: Projection | None = None


def split_layer(name: str) -> tuple[str, int, str] | None:
    """Split a layer tensor name into ``(stem, index, rest)``, or None for a tensor outside the layers.

    ``"model.layers.3.mlp.up_proj.weight"`` -> ``("model.layers", 3, "mlp.up_proj.weight")``.
    """
    match = _LAYER.match(name)
    if match is None:
        return None
    return match["stem"], int(match["index"]), match["rest"] or ""


def layer_index(name: str) -> int | None:
    """Layer index of tensor ``name``, or None when it is not inside a numbered layer."""
    parts = split_layer(name)
    return None if parts is None else parts[1]


def layer_prefix(name: str) -> str | None:
    """Name prefix of the layer holding ``name`` (``"model.layers.3"``), or None outside the layers."""
    parts = split_layer(name)
    return None if parts is None else f"{parts[0]}.{parts[1]}"


def rename_layer(name: str, new_index: int) -> str:
    """Return ``name`` moved to layer ``new_index`` (``model.layers.3.x`` -> ``model.layers.7.x``).

    Raises ValueError when ``name`` is not a layer tensor or ``new_index`` is negative.
    """
    parts = split_layer(name)
    if parts is None:
        raise ValueError(
            f"tensor {name!r} is not inside a numbered layer; it cannot be moved to another layer"
        )
    if new_index < 0:
        raise ValueError(f"layer index must be >= 0, got {new_index} for tensor {name!r}")
    stem, _, rest = parts
    return f"{stem}.{new_index}.{rest}" if rest else f"{stem}.{new_index}"


def _kind_in_layer(parts: list[str]) -> ModuleKind:
    if any(word in parts for word in _BUFFER_WORDS):
        return "other"
    # Norms first: ``self_attn.q_norm`` and ``post_attention_layernorm`` are norms, not attention weights.
    if any(_NORM.search(p) for p in parts):
        return "norm"
    if any(_ATTN.match(p) for p in parts):
        return "attn"
    if any(_MLP.match(p) for p in parts):
        return "mlp"
    return "other"


def _kind_outside(parts: list[str]) -> ModuleKind:
    if any(word in parts for word in _BUFFER_WORDS):
        return "other"
    if any(_LM_HEAD.match(p) for p in parts) or parts[:2] == ["output", "weight"]:
        return "lm_head"
    if any(_EMBED.search(p) for p in parts):
        return "embed"
    if any(_NORM.search(p) for p in parts):
        return "norm"
    return "other"


def tensor_role(name: str, model_type: str | None = None) -> TensorRole:
    """Classify tensor ``name`` (optionally knowing the config's ``model_type``).

    Norms inside a layer are ``norm`` with that layer's index; the final norm is ``norm`` with layer None.
    Non-weight buffers (rotary ``inv_freq``, GPT-2 mask biases) and unknown names are ``other``.
    """
    for pattern, kind in _FAMILY_RULES.get(model_type or "", ()):
        if pattern.search(name):
            return TensorRole(layer_index(name), kind)
    parts = split_layer(name)
    if parts is not None:
        words = parts[2].split(".")
        kind = _kind_in_layer(words)
        return TensorRole(parts[1], kind, _projection(words, kind))
    return TensorRole(None, _kind_outside(name.split(".")))


def _projection(words: list[str], kind: ModuleKind) -> Projection | None:
    if kind not in ("attn", "mlp"):
        return None
    for w in words:
        if w in _PROJ_WORDS:
            return _PROJ_WORDS[w]
    if "c_proj" in words:  # GPT-2: attn.c_proj is the output projection, mlp.c_proj the down projection
        return "o" if kind == "attn" else "down"
    if "c_fc" in words:
        return "up"
    return None


_ORDER = {"embed": 0, "lm_head": 3}


def model_order_key(name: str, model_type: str | None = None) -> tuple[int, int, str]:
    """Sort key that lists tensors as a model runs them: embeddings, then layer by layer (in numeric
    order), then the remaining tensors (final norm), then the output projection."""
    role = tensor_role(name, model_type)
    if role.layer is not None:
        return (1, role.layer, name)
    return (_ORDER.get(role.kind, 2), -1, name)
