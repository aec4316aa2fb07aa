"""What a memory plan is computed from: the tensors of a model (read from safetensors headers, or the built-in
shapes of well-known models, on the meta device: nothing downloaded) and the memory a worker's device and host
have free. :mod:`evomerge.driver.plan` turns them into per-worker resident bytes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evomerge.config import RunConfig
from evomerge.errors import ConfigError

GiB = 2**30


# -- the tensors of a model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shapes:
    """The tensors of the reference model: floating-point shapes by checkpoint name, and the names that share
    the live model's storage with another (a tied output head stored beside its embedding)."""

    label: str
    tensors: dict[str, tuple[int, ...]]
    tied: frozenset[str] = frozenset()

    @property
    def entries(self) -> int:
        return sum(math.prod(s) for s in self.tensors.values())

    @property
    def live_entries(self) -> int:
        return sum(math.prod(s) for n, s in self.tensors.items() if n not in self.tied)

    @property
    def largest(self) -> int:
        return max((math.prod(s) for s in self.tensors.values()), default=0)

    @classmethod
    def from_folder(cls, folder: Any, vocab_size: int | None = None) -> Shapes:
        """From an opened :class:`~evomerge.io.ModelFolder`'s headers; ``vocab_size``: the rows the vocabulary
        tensors are laid out in when the sources' vocabularies are merged by token."""
        from evomerge.io import tensor_role
        from evomerge.io.folder import config_sections
        from evomerge.merge.vocab import vocab_tensors

        tensors = {n: tuple(folder.shape(n)) for n in folder.tensor_names if folder.dtype(n).is_floating_point}
        if vocab_size is not None:
            for name in vocab_tensors(folder):
                if name in tensors:
                    tensors[name] = (vocab_size, *tensors[name][1:])
        tied_flag = any(bool(c.get("tie_word_embeddings", False)) for c in config_sections(folder.config))
        kinds = {n: tensor_role(n, folder.model_type).kind for n in tensors}
        tied = frozenset(n for n, k in kinds.items() if k == "lm_head") if tied_flag and "embed" in kinds.values() \
            else frozenset()
        return cls(str(folder.path), tensors, tied)


#: Built-in model shapes for planning without the weights (``--shapes-from``): the released models' configs.
SHAPES: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(model_type="llama", hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, intermediate_size=5632, vocab_size=32000, tie_word_embeddings=False),
    "llama-7b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, intermediate_size=11008, vocab_size=32000, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=32000, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                       tie_word_embeddings=False),
    "qwen2.5-32b": dict(model_type="qwen2", hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                        num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                        tie_word_embeddings=False),
    "llama-3-70b": dict(model_type="llama", hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256,
                        tie_word_embeddings=False),
}


def shapes_from(name: str) -> Shapes:
    """The checkpoint tensors of built-in model ``name`` (:data:`SHAPES`), built on the meta device (no weights,
    no download). A tied head is not a checkpoint tensor (Hugging Face saves the embedding only)."""
    if name not in SHAPES:
        raise ConfigError(f"--shapes-from: unknown model {name!r}; known: {', '.join(SHAPES)}")
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(SHAPES[name])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    tensors = {n: tuple(p.shape) for n, p in model.named_parameters() if p.is_floating_point()}
    return Shapes(name, tensors)


# -- the memory available ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """Free and total bytes of the workers' device and of the host (None: unknown)."""

    device_free: int | None = None
    device_total: int | None = None
    device_source: str = "unknown"
    host_available: int | None = None
    host_total: int | None = None


def host_memory() -> tuple[int | None, int | None]:
    """(available, total) host bytes: ``/proc/meminfo``'s MemAvailable and MemTotal, else ``os.sysconf``."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = int(rest.split()[0]) * 1024
        return info.get("MemAvailable"), info.get("MemTotal")
    except (OSError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page
    except (OSError, ValueError, AttributeError):
        return None, None


def probe_memory(device: torch.device, assume_gpu: int | None = None) -> Memory:
    """The memory a worker on ``device`` can use on this machine (``assume_gpu``: a GPU of that many bytes)."""
    avail, total = host_memory()
    if assume_gpu is not None:
        return Memory(assume_gpu, assume_gpu, "assumed", avail, total)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index or 0
        free, cap = torch.cuda.mem_get_info(index)
        return Memory(free, cap, f"cuda:{index} free", avail, total)
    if device.type == "cpu":
        return Memory(avail, total, "host available", avail, total)
    return Memory(None, None, "unknown", avail, total)


# -- the plan ----------------------------------------------------------------------------------------------


def _folder_shapes(cfg: RunConfig, reference: str) -> Shapes:
    from evomerge.io import ModelFolder
    from evomerge.io.folder import vocab_rows
    from evomerge.merge.vocab import effective_source

    folders: Mapping[str, Any] = {name: ModelFolder.open(Path(p)) for name, p in cfg.sources.items()}
    try:
        size = None
        source = effective_source(cfg.tokenizer_source, [vocab_rows(f) for f in folders.values()])
        if source is not None or cfg.pad_to_multiple_of:
            from evomerge.merge.vocab import plan_vocab

            vocab = plan_vocab({reference: folders[reference], **folders}, reference, source, cfg.pad_to_multiple_of)
            size = vocab.size if vocab.aligns else None
        return Shapes.from_folder(folders[reference], size)
    finally:
        for f in folders.values():
            f.close()
