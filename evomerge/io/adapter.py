"""LoRA (PEFT) adapter folders as source models: the base's tensors plus ``B·A·scale`` per adapted tensor.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as ``peft``'s
``save_pretrained`` writes it) is opened as an :class:`AdapterFolder`: a :class:`~evomerge.io.folder.ModelFolder`
with the base's config, tensor names, shapes and dtypes, whose :meth:`AdapterFolder.get` returns the merged
weight ``W + ΔW`` and whose :meth:`AdapterFolder.delta` returns the task vector ``ΔW`` itself, computed in
memory from the factors (a full expert is never written to disk). ``ΔW`` is what ``peft``'s
``merge_and_unload`` adds:

* ``lora_A.weight`` (r x in) / ``lora_B.weight`` (out x r): ``ΔW = B @ A * scale``, transposed when
  ``fan_in_fan_out`` (GPT-2's Conv1D);
* ``lora_embedding_A`` (r x vocab) / ``lora_embedding_B`` (dim x r): ``ΔW = (B @ A)^T * scale``;
* ``scale = lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``; ``r`` is the factors' rank
  (``rank_pattern`` may give a module another rank than ``r``);
* a stored full tensor (``modules_to_save``, a saved ``base_layer``, biases): it replaces the base's tensor,
  ``ΔW = saved - W``.

The factors are computed in float32 and ``W + ΔW`` in the base tensor's dtype (float32 for a float32 base:
the same tensors as ``merge_and_unload``, bit for bit).

A source names an adapter as ``BASE+ADAPTER`` (mergekit's ``model+lora`` syntax: two folders joined by ``+``)
or as the adapter folder alone, when its ``base_model_name_or_path`` is a local model folder. What cannot be
applied exactly is refused with a :class:`~evomerge.errors.SourceError` naming the file and field: another
``peft_type`` than LORA, DoRA (``use_dora``), ``alpha_pattern``, ``lora_bias``, ``target_parameters``,
``layer_replication``, a pickled ``adapter_model.bin``, a key that names no tensor of the base, factors whose
product does not have the base tensor's shape, and a local ``base_model_name_or_path`` that is another
folder than the base given.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.errors import ConfigError, SourceError
from evomerge.io.folder import ModelFolder, find_tokenizer_files

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
#: adapter_config.json fields that change the merged weights in ways evomerge does not compute: refused
#: when set (the value that means "off" for each).
_REFUSED = {
    "use_dora": False, "alpha_pattern": {}, "lora_bias": False, "target_parameters": None,
    "layer_replication": None, "use_qalora": False, "trainable_token_indices": None, "use_bdlora": None,
}


def is_adapter(path: Path) -> bool:
    """Whether folder ``path`` holds a PEFT adapter (an ``adapter_config.json``)."""
    return (path / ADAPTER_CONFIG).is_file()


def split_spec(spec: str | Path) -> tuple[Path, Path] | None:
    """``(base, adapter)`` for a ``BASE+ADAPTER`` source that is not itself an existing path, else None."""
    text = str(spec)
    if Path(text).expanduser().exists() or "+" not in text:
        return None
    for i in [i for i, c in enumerate(text) if c == "+"]:
        base, adapter = Path(text[:i]).expanduser(), Path(text[i + 1:]).expanduser()
        if base.is_dir() and adapter.exists():
            return base, adapter
    return None


def _read_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{file}: cannot read the adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise SourceError(f"{file}: expected a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise SourceError(f"{file}: peft_type {config.get('peft_type')!r}: only LoRA adapters are supported")
    for key, off in _REFUSED.items():
        value = config.get(key, off)
        if value not in (off, None, False, {}, []):
            raise SourceError(f"{file}: {key} {value!r} is not supported (the merged weights would not be "
                              f"B·A·scale); merge the adapter with peft's merge_and_unload and use that folder")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or isinstance(config.get(key), bool) or config[key] <= 0:
            raise SourceError(f"{file}: {key} must be a positive number, got {config.get(key)!r}")
    return config


def _base_named(config: dict[str, Any], adapter: Path) -> Path | None:
    """The adapter's ``base_model_name_or_path`` when it is a local folder (absolute, or relative to the
    working directory), else None (a hub id, or unset: not checkable)."""
    named = config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named:
        return None
    path = Path(named).expanduser()
    return path if path.is_dir() else None


class AdapterFolder(ModelFolder):
    """A LoRA adapter applied to a base model folder, read as a model folder (see the module docstring).

    ``path`` is the adapter folder, ``base`` the base's :class:`ModelFolder`; names, shapes, dtypes and the
    config are the base's. ``factors`` maps each adapted base tensor to its ``(B, A, scale, transpose)``
    and ``full`` to the stored tensor that replaces it; both are read once at :meth:`open` (an adapter is
    small) and kept on the CPU.
    """

    def __init__(self, path: Path, base: ModelFolder, config: dict[str, Any],
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]],
                 full: dict[str, torch.Tensor]) -> None:
        super().__init__(path, base.config, base._infos, base.generation_config)
        self.base = base
        self.adapter_config = config
        self.factors = factors
        self.full = full

    @classmethod
    def open_adapter(cls, adapter: str | Path, base: str | Path | None = None) -> AdapterFolder:
        """Open adapter folder ``adapter`` on base folder ``base`` (default: its ``base_model_name_or_path``)."""
        root = Path(adapter).expanduser()
        if not root.is_dir():
            raise SourceError(f"{root}: adapter folder does not exist")
        config = _read_config(root)
        named = _base_named(config, root)
        if base is None:
            if named is None:
                raise SourceError(
                    f"{root / ADAPTER_CONFIG}: base_model_name_or_path "
                    f"{config.get('base_model_name_or_path')!r} is not a local model folder; name the base "
                    f"folder as BASE+ADAPTER (e.g. models/base+{root})")
            base = named
        base_path = Path(base).expanduser()
        if named is not None and named.resolve() != base_path.resolve():
            raise SourceError(
                f"{root / ADAPTER_CONFIG}: base_model_name_or_path {str(named)!r} is another folder than the base "
                f"given ({base_path}); the adapter was trained on another base")
        if (root / "adapter_model.bin").is_file() and not (root / ADAPTER_WEIGHTS).is_file():
            raise SourceError(
                f"{root / 'adapter_model.bin'}: adapter weights stored with pickle are refused (loading a pickle can "
                f"run arbitrary code); save the adapter with safetensors (save_pretrained(..., "
                f"safe_serialization=True)), if you trust the file")
        base_folder = ModelFolder.open(base_path)
        if isinstance(base_folder, AdapterFolder):
            raise SourceError(f"{base_path}: the base of adapter {root} is itself an adapter")
        factors, full = _read_weights(root / ADAPTER_WEIGHTS, config, base_folder)
        logger.debug("opened adapter %s on %s: %d factored, %d full tensors", root, base_path, len(factors),
                     len(full))
        return cls(root, base_folder, config, factors, full)

    # -- description -------------------------------------------------------------------------------------

    @property
    def tokenizer_files(self) -> list[Path]:
        """The adapter folder's tokenizer files when it has them, else the base's."""
        return find_tokenizer_files(self.path) or self.base.tokenizer_files

    @property
    def factored_nbytes(self) -> int:
        """Bytes of the adapter's tensors (factors and full tensors) as read."""
        tensors = [t for b, a, _, _ in self.factors.values() for t in (b, a)] + list(self.full.values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def __repr__(self) -> str:
        return f"AdapterFolder({str(self.path)!r} on {str(self.base.path)!r}, {len(self.factors)} adapted tensors)"

    # -- data --------------------------------------------------------------------------------------------

    def _factor_delta(self, name: str) -> torch.Tensor:
        b, a, scale, transpose = self.factors[name]
        d = (b.to(torch.float32) @ a.to(torch.float32)) * scale
        return d.T if transpose else d

    def delta(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
              ) -> torch.Tensor | None:
        """The task vector ``ΔW`` of base tensor ``name`` (None when the adapter leaves it unchanged)."""
        out: torch.Tensor | None = None
        if name in self.full:
            out = self.full[name].to(torch.float32) - self.base.get(name, dtype=torch.float32)
        if name in self.factors:
            d = self._factor_delta(name)
            out = d if out is None else out + d
        if out is None:
            return None
        return out.to(device=device, dtype=dtype or self.dtype(name))

    def get(self, name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
            copy: bool = True) -> torch.Tensor:
        """The merged tensor ``W + ΔW`` (the base's tensor when the adapter leaves ``name`` unchanged)."""
        stored = self.base.dtype(name)
        w = self.full[name].to(stored, copy=True) if name in self.full else self.base.get(name, copy=True)
        if name in self.factors:
            d = self._factor_delta(name)
            w = w.add_(d) if w.dtype == torch.float32 else (w.to(torch.float32) + d).to(stored)
        return w.to(device=device, dtype=dtype, copy=False)

    def delta_rows(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows ``start:stop`` of :meth:`delta` in float32, from the factors' rows (None: unchanged)."""
        out: torch.Tensor | None = None
        if name in self.full:
            out = self.full[name][start:stop].to(torch.float32) - self.base.get_rows(name, start, stop,
                                                                                    dtype=torch.float32)
        if name in self.factors:
            b, a, scale, transpose = self.factors[name]
            b32, a32 = b.to(torch.float32), a.to(torch.float32)
            d = (a32.T[start:stop] @ b32.T) * scale if transpose else (b32[start:stop] @ a32) * scale
            out = d if out is None else out + d
        return out

    def get_rows(self, name: str, start: int, stop: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = self.base.get_rows(name, start, stop, dtype=torch.float32)
        d = self.delta_rows(name, start, stop)
        return (w if d is None else w + d).to(dtype or self.dtype(name))

    def close(self) -> None:
        super().close()
        self.base.close()

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (AdapterFolder.open_adapter, (str(self.path), str(self.base.path)))


def _read_weights(file: Path, config: dict[str, Any], base: ModelFolder
                  ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]], dict[str, torch.Tensor]]:
    if not file.is_file():
        raise SourceError(f"{file}: adapter weights not found (only safetensors adapters are read)")
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            raw = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as exc:
        raise SourceError(f"{file}: cannot read safetensors file: {exc}") from exc
    if not raw:
        raise SourceError(f"{file}: the adapter holds no tensors")
    cfg = file.parent / ADAPTER_CONFIG
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    full: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if "lora_magnitude_vector" in name:
            raise SourceError(f"{file}: tensor {key!r} is a DoRA magnitude; DoRA adapters are not supported")
        for part, kind, embed in ((".lora_A.weight", "A", False), (".lora_B.weight", "B", False),
                                  (".lora_embedding_A", "A", True), (".lora_embedding_B", "B", True)):
            if name.endswith(part):
                target = name[: -len(part)] + ".weight"
                pairs.setdefault(target, {})[kind] = t
                pairs[target]["embed"] = torch.tensor(embed)
                break
        else:
            target = name.replace(".modules_to_save", "").replace(".base_layer.", ".")
            if target not in base:
                raise SourceError(f"{file}: tensor {key!r} names no tensor of the base {base.path} (looked for "
                                  f"{target!r}); target module unknown")
            if tuple(t.shape) != base.shape(target):
                raise SourceError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} but the base's {target} has "
                                  f"{base.shape(target)}")
            full[target] = t
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
    rank_pattern = config.get("rank_pattern") or {}
    for target, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise SourceError(f"{file}: {target}: lora_{'A' if 'A' not in p else 'B'} is missing")
        if target not in base:
            raise SourceError(f"{file}: adapted module {target[: -len('.weight')]!r} names no tensor of the base "
                              f"{base.path}; target module unknown")
        b, a, embed = p["B"], p["A"], bool(p["embed"])
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise SourceError(f"{file}: {target}: factors of shapes {tuple(b.shape)} and {tuple(a.shape)} do not "
                              f"multiply (B: out x r, A: r x in)")
        r = a.shape[0]
        if not rank_pattern and r != config["r"]:
            raise SourceError(f"{cfg}: r is {config['r']} but {target}'s factors have rank {r}")
        transpose = embed or bool(config.get("fan_in_fan_out", False))
        shape = (a.shape[1], b.shape[0]) if transpose else (b.shape[0], a.shape[1])
        if shape != base.shape(target):
            raise SourceError(f"{file}: {target}: B·A has shape {shape} but the base's tensor has "
                              f"{base.shape(target)}; the adapter was trained on another base")
        alpha = float(config["lora_alpha"])
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        factors[target] = (b, a, scale, transpose)
    return factors, full


def exact_delta(folder: ModelFolder, reference: ModelFolder, name: str, out: torch.Tensor) -> bool:
    """Write ``folder``'s task vector of ``name`` relative to ``reference`` into ``out`` from the adapter's
    factors, when ``folder`` is an adapter on ``reference`` itself (True); else leave ``out`` (False: the
    caller subtracts the two tensors)."""
    if not isinstance(folder, AdapterFolder) or isinstance(reference, AdapterFolder):
        return False
    if folder.base.path.resolve() != reference.path.resolve():
        return False
    d = folder.delta(name, device=out.device, dtype=out.dtype)
    if d is None:
        out.zero_()
    else:
        out.copy_(d)
    return True


def resolve_spec(value: str, root: Path) -> str:
    """Source ``value`` with relative folders resolved against ``root``; in ``BASE+ADAPTER`` both sides are.

    ``value`` is split at the first ``+`` whose two sides exist (else at the first ``+``) unless the whole of
    it names an existing path.
    """
    def rel(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else (root / path).resolve()

    if "+" not in value or rel(value).exists():
        return str(rel(value))
    cuts = [i for i, c in enumerate(value) if c == "+"]
    at = next((i for i in cuts if rel(value[:i]).is_dir() and rel(value[i + 1:]).exists()), cuts[0])
    return f"{rel(value[:at])}+{rel(value[at + 1:])}"


def mergekit_ref(value: str) -> str:
    """Source ``value`` as mergekit names it: an adapter folder alone becomes ``BASE+ADAPTER`` (mergekit's
    LoRA syntax, applied with peft's merge), with the base its ``base_model_name_or_path`` names."""
    path = Path(value).expanduser()
    if split_spec(value) is not None or not path.is_dir() or not is_adapter(path):
        return value
    named = _base_named(_read_config(path), path)
    if named is None:
        raise ConfigError(f"{path / ADAPTER_CONFIG}: base_model_name_or_path is not a local model folder; name the "
                          f"source as BASE+ADAPTER")
    return f"{named}+{value}"
