"""Reading and writing Hugging Face model folders (safetensors only), tensor roles and merge preflight."""

from __future__ import annotations

from evomerge.io.arch import (
    TensorRole,
    layer_index,
    layer_prefix,
    model_order_key,
    rename_layer,
    split_layer,
    tensor_role,
)
from evomerge.io.check import check_mergeable
from evomerge.io.folder import ModelFolder, find_tokenizer_files
from evomerge.io.header import TensorInfo, read_header
from evomerge.io.writer import ModelWriter

__all__ = [
    "ModelFolder",
    "ModelWriter",
    "TensorInfo",
    "TensorRole",
    "check_mergeable",
    "find_tokenizer_files",
    "layer_index",
    "layer_prefix",
    "model_order_key",
    "read_header",
    "rename_layer",
    "split_layer",
    "tensor_role",
]
