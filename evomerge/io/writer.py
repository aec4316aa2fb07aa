"""Streaming writer of a Hugging Face model folder (safetensors shards + config + tokenizer + card).

Tensors are added one at a time and copied into the current shard; a shard is written to disk as soon as
the next tensor would overflow it, so memory is bounded by one shard. Everything is written into a hidden
temporary sibling of the output folder, which :meth:`ModelWriter.finish` moves into place with
``os.replace``: an interrupted or failed write never leaves a half-written output folder. Files are saved
world-readable (0644) with safetensors metadata ``{"format": "pt"}`` so transformers loads them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors.torch import save_file

from evomerge.errors import ConfigError, SourceError
from evomerge.io.folder import GENERATION_CONFIG_FILE, INDEX_FILE, SINGLE_FILE, find_tokenizer_files

logger = logging.getLogger(__name__)

FILE_MODE = 0o644
DIR_MODE = 0o755


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    os.chmod(path, FILE_MODE)


class ModelWriter:
    """Writes one model folder at ``out_dir``; use as a context manager or call :meth:`abort` on failure.

    ``max_shard_bytes`` bounds a shard's tensor data (a single larger tensor gets a shard of its own).
    An existing non-empty ``out_dir`` is refused unless ``overwrite=True``, in which case it is replaced
    only when :meth:`finish` succeeds. :meth:`add` copies the tensor, so the caller may change it afterwards.
    """

    def __init__(self, out_dir: str | Path, *, max_shard_bytes: float = 5e9, overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.max_shard_bytes = int(max_shard_bytes)
        self.overwrite = overwrite
        if self.max_shard_bytes <= 0:
            raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self._refuse_existing()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.partial-", dir=self.out_dir.parent))
        self._shard: dict[str, torch.Tensor] = {}
        self._shard_bytes = 0
        self._shard_files: list[Path] = []
        self._weight_map: dict[str, int] = {}
        self._total_bytes = 0
        self._state = "open"

    def _refuse_existing(self) -> None:
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise ConfigError(f"{self.out_dir}: output path exists and is not a folder")
        if _is_nonempty_dir(self.out_dir) and not self.overwrite:
            raise ConfigError(
                f"{self.out_dir}: output folder exists and is not empty; choose another folder or allow "
                f"overwriting it"
            )

    def _require_open(self) -> None:
        if self._state != "open":
            raise RuntimeError(f"ModelWriter for {self.out_dir} is {self._state}; it accepts no more writes")

    @property
    def num_shards(self) -> int:
        """Shards written so far, plus the one being filled."""
        return len(self._shard_files) + (1 if self._shard else 0)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Copy ``tensor`` into the output under ``name``, writing the current shard first if it is full."""
        self._require_open()
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(tensor).__name__}")
        if name in self._weight_map:
            raise ValueError(f"tensor {name!r} was already added to {self.out_dir}")
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard and self._shard_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        copy = tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        self._shard[name] = copy
        self._shard_bytes += nbytes
        self._total_bytes += nbytes
        self._weight_map[name] = len(self._shard_files)

    def _flush(self) -> None:
        if not self._shard:
            return
        path = self._tmp / f"shard-{len(self._shard_files):05d}.safetensors"
        try:
            save_file(self._shard, str(path), metadata={"format": "pt"})
            os.chmod(path, FILE_MODE)
        except BaseException:
            self.abort()
            raise
        logger.debug("wrote %s (%d tensors, %d bytes)", path.name, len(self._shard), self._shard_bytes)
        self._shard_files.append(path)
        self._shard = {}
        self._shard_bytes = 0

    def _place_shards(self) -> dict[str, str]:
        """Give the shards their final names; return tensor name -> shard file name."""
        count = len(self._shard_files)
        finals = (
            [SINGLE_FILE]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for tmp_path, final in zip(self._shard_files, finals, strict=True):
            os.replace(tmp_path, self._tmp / final)
        return {name: finals[i] for name, i in self._weight_map.items()}

    def _copy_extras(
        self, tokenizer_from: Path | None, generation_config_from: Path | None, model_card: str | None,
        tokenizer: Any = None,
    ) -> None:
        if tokenizer is not None:
            before = set(self._tmp.iterdir())
            tokenizer.save_pretrained(str(self._tmp))
            for path in set(self._tmp.iterdir()) - before:
                os.chmod(path, FILE_MODE)
        elif tokenizer_from is not None:
            files = find_tokenizer_files(Path(tokenizer_from))
            if not files:
                raise SourceError(f"{tokenizer_from}: no tokenizer files to copy (e.g. tokenizer.json)")
            for src in files:
                shutil.copyfile(src, self._tmp / src.name)
                os.chmod(self._tmp / src.name, FILE_MODE)
        if generation_config_from is not None:
            src = Path(generation_config_from)
            src = src / GENERATION_CONFIG_FILE if src.is_dir() else src
            if src.is_file():
                shutil.copyfile(src, self._tmp / GENERATION_CONFIG_FILE)
                os.chmod(self._tmp / GENERATION_CONFIG_FILE, FILE_MODE)
            else:
                logger.debug("%s: no generation config to copy", src)
        if model_card is not None:
            _write_text(self._tmp / "README.md", model_card)

    def finish(
        self,
        config: dict[str, Any],
        *,
        tokenizer_from: Path | None = None,
        generation_config_from: Path | None = None,
        model_card: str | None = None,
        tokenizer: Any = None,
    ) -> Path:
        """Write the last shard, the index (only for several shards), ``config.json``, the tokenizer files
        of folder ``tokenizer_from`` (or ``tokenizer.save_pretrained``'s, when a tokenizer object is given),
        ``generation_config.json`` of folder ``generation_config_from`` when
        it has one, and ``README.md`` holding ``model_card``; then move the folder into place.

        Returns the output folder. On any failure the temporary folder is removed and nothing is placed.
        """
        self._require_open()
        try:
            if not self._weight_map:
                raise ConfigError(f"{self.out_dir}: no tensors were added; refusing to write an empty model")
            self._flush()
            weight_map = self._place_shards()
            if len(self._shard_files) > 1:
                index = {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map}
                _write_text(self._tmp / INDEX_FILE, json.dumps(index, indent=2) + "\n")
            _write_text(self._tmp / "config.json", json.dumps(config, indent=2) + "\n")
            self._copy_extras(tokenizer_from, generation_config_from, model_card, tokenizer)
            os.chmod(self._tmp, DIR_MODE)
            self._move_into_place()
        except BaseException:
            self.abort()
            raise
        self._state = "finished"
        logger.info(
            "wrote %s (%d shard(s), %d bytes)", self.out_dir, len(self._shard_files), self._total_bytes
        )
        return self.out_dir

    def _move_into_place(self) -> None:
        self._refuse_existing()
        old: Path | None = None
        if _is_nonempty_dir(self.out_dir):
            old = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.old-", dir=self.out_dir.parent))
            os.replace(self.out_dir, old / "model")
        try:
            os.replace(self._tmp, self.out_dir)
        except BaseException:
            if old is not None:
                os.replace(old / "model", self.out_dir)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Discard everything written so far; the output folder is left as it was."""
        if self._state == "open":
            self._state = "aborted"
            self._shard = {}
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> ModelWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._state == "open":
            if exc_type is None:
                logger.warning(
                    "ModelWriter for %s closed without finish(); nothing was written", self.out_dir
                )
            self.abort()
