"""Lazy, read-only access to a Hugging Face model folder stored as safetensors.

A :class:`ModelFolder` reads ``config.json`` and the safetensors headers when it is opened (names, shapes,
dtypes, byte sizes: no tensor data), and memory-maps a shard only when one of its tensors is first asked
for; the shard's handle is then kept open and reused until :meth:`ModelFolder.close`.

Pickle-based weight files (``pytorch_model.bin``, ``*.pt``, ``*.pth``, ``*.ckpt``) are never opened: a folder
that holds only those is refused with a :class:`~evomerge.errors.SourceError` that says how to convert it.
No code from the folder is ever imported or run (there is no ``trust_remote_code``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from evomerge.errors import SourceError
from evomerge.io.arch import layer_index, tensor_role
from evomerge.io.header import TensorInfo, read_header

logger = logging.getLogger(__name__)

__all__ = [
    "CONFIG_FILE",
    "GENERATION_CONFIG_FILE",
    "INDEX_FILE",
    "PICKLE_SUFFIXES",
    "SINGLE_FILE",
    "TOKENIZER_FILES",
    "ModelFolder",
    "TensorInfo",
    "find_tokenizer_files",
    "read_header",
    "vocab_rows",
]

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
#: Files that make up a tokenizer (any of them may be absent), in the order they are listed.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
#: Suffixes of weight files stored with pickle, which evomerge refuses to load.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def config_sections(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config, then its nested ``text_config`` (multimodal wrappers) when it has one."""
    nested = config.get("text_config")
    return [config, nested] if isinstance(nested, dict) else [config]


def vocab_rows(folder: Any) -> int | None:
    """Rows of the model's input embedding: the config's ``vocab_size``, else the largest ``embed`` row count."""
    for cfg in config_sections(folder.config):
        if isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
    rows = [folder.shape(n)[0] for n in folder.tensor_names
            if tensor_role(n, folder.model_type).kind == "embed" and len(folder.shape(n)) == 2]
    return max(rows) if rows else None


def find_tokenizer_files(path: Path) -> list[Path]:
    """Return the tokenizer files present in folder ``path`` (see :data:`TOKENIZER_FILES`)."""
    return [path / name for name in TOKENIZER_FILES if (path / name).is_file()]


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise SourceError(f"{path}: {what} not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read {what}: {exc}") from exc


def _pickle_hint(folder: Path, pickled: Path) -> str:
    return (
        f"{pickled}: weights stored with pickle are refused (loading a pickle can run arbitrary code); "
        f"convert the model to safetensors first, if you trust the file, e.g. "
        f'`python -c "from transformers import AutoModelForCausalLM as M; '
        f"M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors')\"`, "
        f"and use the new folder"
    )


def _weight_files(root: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """Return the shards to read, and the index's tensor -> shard map when the folder has an index."""
    index_path = root / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path, "safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise SourceError(f"{index_path}: no 'weight_map' mapping tensor names to shard files")
        by_name: dict[str, Path] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise SourceError(f"{index_path}: tensor {name!r} maps to an invalid shard name {shard!r}")
            by_name[name] = root / shard
        shards = sorted(set(by_name.values()))
        for shard in shards:
            if not shard.is_file():
                first = next(n for n, s in by_name.items() if s == shard)
                raise SourceError(
                    f"{shard}: shard named by {index_path.name} (e.g. for tensor {first!r}) does not exist; "
                    f"the download may be incomplete"
                )
        return shards, by_name
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE], None
    found = sorted(p for p in root.glob("*.safetensors") if p.is_file())
    if len(found) == 1:
        return found, None
    if found:
        names = ", ".join(p.name for p in found)
        raise SourceError(
            f"{root}: several safetensors files ({names}) but no {INDEX_FILE} saying which tensors they hold"
        )
    pickled = sorted(p for p in root.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    weights = [p for p in pickled if p.name.startswith("pytorch_model")] or pickled
    if weights:
        raise SourceError(_pickle_hint(root, weights[0]))
    gguf = sorted(root.glob("*.gguf"))
    if gguf:
        raise SourceError(
            f"{gguf[0]}: GGUF files are not supported; use the safetensors release of the model"
        )
    raise SourceError(f"{root}: no model weights (*.safetensors) in this folder")


class ModelFolder:
    """One Hugging Face model folder, read lazily.

    Open it with :meth:`open`. Shapes, dtypes and names come from the safetensors headers; tensor data is
    read only by :meth:`get` (or :meth:`load_all` / :meth:`iter_tensors`, when a whole model is wanted).
    ``tensor_names`` lists tensors in file order: shard by shard (shards sorted by file name), and by data
    offset within a shard. Usable as a context manager; pickling a folder pickles its path only.
    """

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        infos: dict[str, TensorInfo],
        generation_config: dict[str, Any] | None,
    ) -> None:
        self.path = path
        self.config = config
        self.generation_config = generation_config
        self._infos = infos
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        """Read ``config.json`` and every safetensors header of folder ``path``.

        A LoRA adapter folder, or ``BASE+ADAPTER``, opens as an :class:`~evomerge.io.adapter.AdapterFolder`
        (the base with the adapter applied).

        Raises :class:`~evomerge.errors.SourceError` (naming the file) for a missing folder or config, a
        pickle-only folder, a shard named by the index that does not exist, a tensor listed by the index but
        absent from its shard, and a truncated or corrupt safetensors file.
        """
        from evomerge.io.adapter import AdapterFolder, is_adapter, split_spec

        pair = split_spec(path)
        if pair is not None:  # BASE+ADAPTER (mergekit's model+lora)
            return AdapterFolder.open_adapter(pair[1], pair[0])
        root = Path(path).expanduser()
        if not root.exists():
            raise SourceError(f"{root}: model folder does not exist")
        if root.is_dir() and is_adapter(root):
            return AdapterFolder.open_adapter(root)
        if not root.is_dir():
            raise SourceError(f"{root}: expected a model folder, found a file")
        config = _read_json(root / CONFIG_FILE, CONFIG_FILE)
        if not isinstance(config, dict):
            raise SourceError(f"{root / CONFIG_FILE}: expected a JSON object")
        shards, by_name = _weight_files(root)
        infos: dict[str, TensorInfo] = {}
        for shard in shards:
            header = read_header(shard)
            if by_name is None:
                wanted = list(header)
            else:
                wanted = [n for n, s in by_name.items() if s == shard]
                missing = [n for n in wanted if n not in header]
                if missing:
                    raise SourceError(
                        f"{shard}: tensor {missing[0]!r} is listed in {INDEX_FILE} but absent from this shard"
                        + (f" ({len(missing) - 1} more missing)" if len(missing) > 1 else "")
                    )
                extra = len(header) - len(wanted)
                if extra:
                    logger.debug("%s: %d tensors not listed in the index are ignored", shard, extra)
            order = sorted(wanted, key=lambda n: header[n].offset)
            for name in order:
                infos[name] = header[name]
        gen_path = root / GENERATION_CONFIG_FILE
        generation_config = _read_json(gen_path, GENERATION_CONFIG_FILE) if gen_path.is_file() else None
        folder = cls(root, config, infos, generation_config)
        logger.debug("opened %s: %d tensors in %d shard(s)", root, len(infos), len(shards))
        return folder

    # -- description -------------------------------------------------------------------------------------

    @property
    def model_type(self) -> str | None:
        """The config's ``model_type`` (e.g. ``"llama"``), or None when the config has none."""
        value = self.config.get("model_type")
        return str(value) if value is not None else None

    @property
    def architecture(self) -> str:
        """The config's ``architectures[0]`` (e.g. ``"LlamaForCausalLM"``), else its ``model_type``."""
        archs = self.config.get("architectures")
        if isinstance(archs, list) and archs:
            return str(archs[0])
        return self.model_type or "unknown"

    def _configs(self) -> list[dict[str, Any]]:
        return config_sections(self.config)

    @property
    def num_layers(self) -> int:
        """Number of transformer layers: from the config, else counted from the tensor names."""
        for cfg in self._configs():
            for key in _LAYER_COUNT_KEYS:
                if isinstance(cfg.get(key), int):
                    return int(cfg[key])
        indices = [i for i in map(layer_index, self._infos) if i is not None]
        return max(indices) + 1 if indices else 0

    @property
    def tensor_names(self) -> list[str]:
        """Every tensor name, in file order."""
        return list(self._infos)

    @property
    def shards(self) -> list[Path]:
        """The safetensors files read, in order."""
        return list(dict.fromkeys(info.file for info in self._infos.values()))

    @property
    def nbytes(self) -> int:
        """Total size of the tensor data, in bytes."""
        return sum(info.nbytes for info in self._infos.values())

    @property
    def tokenizer_files(self) -> list[Path]:
        """Tokenizer files present in the folder (see :data:`TOKENIZER_FILES`)."""
        return find_tokenizer_files(self.path)

    @property
    def tied_embeddings(self) -> bool:
        """Whether the output projection shares the input embedding matrix.

        The config's ``tie_word_embeddings`` when it says; otherwise True exactly when the folder stores no
        ``lm_head`` tensor.
        """
        for cfg in self._configs():
            if isinstance(cfg.get("tie_word_embeddings"), bool):
                return bool(cfg["tie_word_embeddings"])
        return not any(tensor_role(n, self.model_type).kind == "lm_head" for n in self._infos)

    def info(self, name: str) -> TensorInfo:
        """Header entry of tensor ``name`` (shape, dtype, file, size)."""
        try:
            return self._infos[name]
        except KeyError:
            raise SourceError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name``, from the header."""
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor ``name``, from the header."""
        return self.info(name).dtype

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def __repr__(self) -> str:
        return f"ModelFolder({str(self.path)!r}, {self.architecture}, {len(self._infos)} tensors)"

    # -- data --------------------------------------------------------------------------------------------

    def _handle(self, file: Path) -> Any:
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except (SafetensorError, OSError) as exc:
                    raise SourceError(f"{file}: cannot open safetensors file: {exc}") from exc
                self._handles[file] = handle
            return handle

    def get(
        self,
        name: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        copy: bool = True,
    ) -> torch.Tensor:
        """Read tensor ``name`` and return it on ``device`` in ``dtype`` (default: the stored dtype).

        With ``copy=True`` (the default) the result owns its memory. With ``copy=False`` and no device or
        dtype change, the result may be a view of the memory-mapped file: it must then not be modified,
        since the change would show in later reads of the same tensor from this folder.
        """
        info = self.info(name)
        try:
            tensor: torch.Tensor = self._handle(info.file).get_tensor(name)
        except SafetensorError as exc:
            raise SourceError(f"{info.file}: cannot read tensor {name!r}: {exc}") from exc
        return tensor.to(device=device, dtype=dtype, copy=copy)

    def get_rows(self, name: str, start: int, stop: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (along its first dimension), read without the rest of it."""
        info = self.info(name)
        try:
            rows: torch.Tensor = self._handle(info.file).get_slice(name)[start:stop]
        except SafetensorError as exc:
            raise SourceError(f"{info.file}: cannot read tensor {name!r}: {exc}") from exc
        return rows.to(dtype=dtype, copy=True)

    def iter_tensors(
        self, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` for every tensor, in file order, one at a time."""
        for name in self._infos:
            yield name, self.get(name, device=device, dtype=dtype)

    def load_all(
        self, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
    ) -> dict[str, torch.Tensor]:
        """Read the whole model into a name -> tensor dict (only when a whole model is wanted)."""
        return dict(self.iter_tensors(device=device, dtype=dtype))

    def close(self) -> None:
        """Release the open shard handles; a later :meth:`get` opens them again."""
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> ModelFolder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (ModelFolder.open, (str(self.path),))
