"""The tiny model zoo: a base, one expert per skill and a multitask model, all trained here on the CPU.

``build_zoo(out_dir, size, seed)`` writes::

    out_dir/base/                 Hugging Face folders (safetensors, config, tokenizer,
    out_dir/expert_<skill>/       generation_config.json)
    out_dir/multitask/
    out_dir/data/<skill>.<split>.jsonl   the evaluation splits (same as the shipped fitness/zoo/ files)
    out_dir/zoo.json              the manifest (:class:`ZooManifest`), written last

How the zoo is made (see :mod:`evomerge.testing.skills` for the data):

* **base**: a tiny Llama pretrained on the *warm-up* data of every skill: the task formats on easier
  inputs (short strings, small or mirrored additions). It shares representations with the experts but is
  weak on the task distributions themselves.
* **expert_<skill>**: a short fine-tune of the base on that skill's task data, with a fraction of the
  base's warm-up data replayed so the expert stays in the base's basin (merges of experts then work).
* **multitask**: the same fine-tune on all skills' task data: an upper reference for merges.

Everything is deterministic from ``seed`` (same machine and thread count give identical safetensors):
data comes from seeded ``random.Random`` instances, model init runs under ``torch.random.fork_rng`` and
the models have no dropout; global RNG state is never touched.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_serializer, model_validator
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from evomerge.errors import ConfigError
from evomerge.testing.skills import (
    SKILLS,
    STOP,
    Sampler,
    get_skill,
    held_out_prompts,
    load_eval_data,
    write_eval_data,
)
from evomerge.testing.tokenizer import build_tokenizer
from evomerge.testing.train import Phase, exact_match, train

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST",
    "SIZES",
    "ZOO_VERSION",
    "ZooManifest",
    "ZooSize",
    "build_zoo",
    "code_version",
    "exact_match",
    "resolve_size",
]

#: Version of the zoo recipe; bump it when data, training or architecture change. Cached zoos are also
#: rebuilt whenever the source of the zoo's modules changes (see :func:`code_version`).
ZOO_VERSION = "1"
MANIFEST = "zoo.json"
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ZooSize(BaseModel):
    """Architecture and training schedule of one zoo size (``SIZES`` holds the presets)."""

    model_config = _FROZEN

    name: str
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    base_steps: int = Field(ge=0)
    base_lr: float = Field(gt=0)
    expert_steps: int = Field(ge=0)
    expert_lr: float = Field(gt=0)
    multitask_steps: int = Field(ge=0)
    multitask_lr: float = Field(gt=0)
    #: Share of each fine-tuning batch drawn from the base's warm-up mixture.
    replay: float = Field(ge=0, lt=1)
    #: Warm-up steps as a share of each phase's steps.
    warmup: float = Field(default=0.1, ge=0, le=1)
    eval_batch_size: int = Field(default=200, gt=0)
    #: Torch CPU threads used while building (restored afterwards); ``None`` keeps the current setting.
    #: Part of the recipe because results are bit-identical only for one thread count.
    num_threads: int | None = Field(default=None, gt=0)


SIZES: dict[str, ZooSize] = {
    "test": ZooSize(
        name="test",
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        batch_size=64,
        base_steps=700,
        base_lr=3e-3,
        expert_steps=200,
        expert_lr=1e-3,
        multitask_steps=300,
        multitask_lr=2e-3,
        replay=0.2,
        num_threads=1,
    ),
    "demo": ZooSize(
        name="demo",
        hidden_size=96,
        intermediate_size=384,
        num_layers=4,
        num_heads=4,
        batch_size=64,
        base_steps=1200,
        base_lr=2e-3,
        expert_steps=250,
        expert_lr=5e-4,
        multitask_steps=400,
        multitask_lr=1.5e-3,
        replay=0.2,
        num_threads=1,
    ),
}


class ZooManifest(BaseModel):
    """What ``zoo.json`` records about a built zoo.

    ``zoo_version`` is the :func:`code_version` that built it. ``models`` maps model names (``base``,
    ``expert_<skill>``, ``multitask``) to their folders (stored relative to the zoo's root in
    ``zoo.json``, absolute once loaded); ``experts`` maps each skill to its expert's model name; ``exact_match[model][skill]`` is the greedy exact match on that skill's ``test``
    split, measured when the zoo was built. ``root`` is where the manifest was read from (not stored).
    """

    model_config = _FROZEN

    schema_version: int = 1
    zoo_version: str
    size: ZooSize
    seed: int
    skills: tuple[str, ...]
    models: dict[str, Path]
    experts: dict[str, str]
    exact_match: dict[str, dict[str, float]]
    steps: dict[str, int]
    build_seconds: dict[str, float]
    torch_version: str
    transformers_version: str
    num_threads: int
    root: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _absolute_paths(cls, data: Any) -> Any:
        if isinstance(data, dict) and "root" in data:
            root = Path(data["root"]).resolve()
            models = {k: root / Path(v) for k, v in dict(data.get("models", {})).items()}
            data = {**data, "root": root, "models": models}
        return data

    @field_serializer("models")
    def _relative_paths(self, models: dict[str, Path]) -> dict[str, str]:
        return {k: Path(os.path.relpath(v, self.root)).as_posix() for k, v in models.items()}

    @property
    def base(self) -> Path:
        """Folder of the base model."""
        return self.path("base")

    @property
    def multitask(self) -> Path:
        """Folder of the multitask reference model."""
        return self.path("multitask")

    @property
    def data_dir(self) -> Path:
        """Folder holding ``<skill>.<split>.jsonl``."""
        return self.root / "data"

    def expert(self, skill: str) -> Path:
        """Folder of the expert fine-tuned on ``skill``."""
        if skill not in self.experts:
            raise ConfigError(f"zoo has no expert for skill {skill!r}; experts: {', '.join(self.experts)}")
        return self.path(self.experts[skill])

    def path(self, name: str) -> Path:
        """Folder of model ``name``."""
        if name not in self.models:
            raise ConfigError(f"zoo has no model {name!r}; models: {', '.join(self.models)}")
        return self.models[name]

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ZooManifest:
        """Read a manifest from ``path`` (a zoo folder or its ``zoo.json``)."""
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read zoo manifest {path}: {exc}") from exc
        return cls.model_validate({**data, "root": path.parent})


def code_version() -> str:
    """``ZOO_VERSION`` plus a digest of the modules that define the zoo (data, tokenizer, training)."""
    from evomerge.testing import skills, tokenizer
    from evomerge.testing import train as train_module

    digest = hashlib.sha256()
    for module in (skills, tokenizer, train_module, sys.modules[__name__]):
        digest.update(Path(module.__file__ or "").read_bytes())
    return f"{ZOO_VERSION}+{digest.hexdigest()[:12]}"


def _derive_seed(seed: int, label: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(label.encode())) % 2**31


def _new_model(size: ZooSize, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        # 32 is the smallest head size vLLM's CPU attention kernels accept, so the zoo runs there too
        head_dim=max(32, size.hidden_size // size.num_heads),
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_dropout=0.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_derive_seed(seed, "init"))
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=16,
        eos_token_id=[tokenizer.convert_tokens_to_ids(STOP), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return model


def _phases(size: ZooSize, skills: Sequence[str]) -> dict[str, Phase]:
    warm: list[tuple[float, Sampler]] = [(1.0, get_skill(s).sample_warmup) for s in skills]
    replay = [(size.replay / len(warm), sampler) for _, sampler in warm] if size.replay else []

    def phase(steps: int, lr: float, mixture: list[tuple[float, Sampler]]) -> Phase:
        return Phase(steps, size.batch_size, lr, mixture, warmup=round(size.warmup * steps))

    phases = {"base": phase(size.base_steps, size.base_lr, warm)}
    for s in skills:
        task = [(1.0 - size.replay, get_skill(s).sample_task)]
        phases[f"expert_{s}"] = phase(size.expert_steps, size.expert_lr, task + replay)
    tasks = [((1.0 - size.replay) / len(skills), get_skill(s).sample_task) for s in skills]
    phases["multitask"] = phase(size.multitask_steps, size.multitask_lr, tasks + replay)
    return phases


@contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (POSIX ``flock``; a no-op where unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(folder / ".zoo.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (``None``: unchanged), restoring the previous count."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _cached(out_dir: Path, size: ZooSize, seed: int, skills: tuple[str, ...]) -> ZooManifest | None:
    if not (out_dir / MANIFEST).is_file():
        return None
    try:
        manifest = ZooManifest.load(out_dir)
    except (ConfigError, ValueError):
        logger.warning("ignoring unreadable zoo manifest in %s; rebuilding", out_dir)
        return None
    same = (manifest.zoo_version, manifest.size, manifest.seed, manifest.skills) == (
        code_version(),
        size,
        seed,
        skills,
    )
    if same and all(manifest.path(name).is_dir() for name in manifest.models):
        return manifest
    return None


def resolve_size(size: str | ZooSize) -> ZooSize:
    """A preset from ``SIZES`` by name, or ``size`` itself."""
    if isinstance(size, ZooSize):
        return size
    if size not in SIZES:
        from evomerge.testing.real import REAL_SIZES

        raise ConfigError(f"unknown zoo size {size!r}; valid sizes: {', '.join([*SIZES, *REAL_SIZES])}")
    return SIZES[size]


def build_zoo(
    out_dir: str | os.PathLike[str],
    size: str | ZooSize = "test",
    seed: int = 0,
    *,
    skills: Sequence[str] | None = None,
) -> ZooManifest:
    """Train and save the zoo into ``out_dir`` and return its manifest.

    ``size`` is ``"test"`` (used by the test suite), ``"demo"`` (larger and better) or a custom
    :class:`ZooSize`; ``skills`` defaults to all of ``SKILLS``. If ``out_dir`` already holds a zoo of the
    same version, size, seed and skills, it is returned without rebuilding. Concurrent builders of one
    ``out_dir`` wait for each other; the manifest is written last, so a zoo without one is incomplete.
    The sizes of the real zoo (``"real"``, ``"real-test"``) are handed to
    :func:`evomerge.testing.real.build_real_zoo`.
    """
    if isinstance(size, str) and size not in SIZES:
        from evomerge.testing.real import REAL_SIZES, build_real_zoo

        if size in REAL_SIZES:
            if skills is not None:
                raise ConfigError("the real zoo has a fixed set of skills; skills cannot be chosen")
            return build_real_zoo(out_dir, size=size, seed=seed)
    spec = resolve_size(size)
    chosen = tuple(SKILLS if skills is None else skills)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"skills must be distinct and non-empty, got {list(chosen)}")
    for s in chosen:
        get_skill(s)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        cached = _cached(out, spec, seed, chosen)
        if cached is not None:
            logger.info("zoo in %s is up to date (size %s, seed %d)", out, spec.name, seed)
            return cached
        with _threads(spec.num_threads):
            return _build(out, spec, seed, chosen)


def _build(out: Path, size: ZooSize, seed: int, skills: tuple[str, ...]) -> ZooManifest:
    started = time.perf_counter()
    (out / MANIFEST).unlink(missing_ok=True)
    tokenizer = build_tokenizer()
    exclude = held_out_prompts(skills)
    tests = {s: load_eval_data(s, "test", folder=_write_data(out, skills)) for s in skills}
    phases = _phases(size, skills)
    seconds: dict[str, float] = {}
    scores: dict[str, dict[str, float]] = {}
    models: dict[str, Path] = {}

    def finish(name: str, model: LlamaForCausalLM, t0: float) -> None:
        seconds[f"train_{name}"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        scores[name] = {}
        for s in skills:
            hits = exact_match(model, tokenizer, tests[s], batch_size=size.eval_batch_size)
            scores[name][s] = sum(hits) / len(hits)
        seconds[f"eval_{name}"] = round(time.perf_counter() - t1, 2)
        _save(model, tokenizer, out / name)
        models[name] = out / name
        logger.info("zoo model %s: exact match %s (%.1f s)", name, scores[name], seconds[f"train_{name}"])

    t0 = time.perf_counter()
    base = _new_model(size, tokenizer, seed)
    train(base, tokenizer, phases["base"], random.Random(_derive_seed(seed, "base")), exclude=exclude)
    finish("base", base, t0)
    for name in [f"expert_{s}" for s in skills] + ["multitask"]:
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        train(model, tokenizer, phases[name], random.Random(_derive_seed(seed, name)), exclude=exclude)
        finish(name, model, t0)
    seconds["total"] = round(time.perf_counter() - started, 2)
    manifest = ZooManifest(
        zoo_version=code_version(),
        size=size,
        seed=seed,
        skills=skills,
        models=models,
        experts={s: f"expert_{s}" for s in skills},
        exact_match=scores,
        steps={name: phase.steps for name, phase in phases.items()},
        build_seconds=seconds,
        torch_version=torch.__version__,
        transformers_version=_transformers_version(),
        num_threads=torch.get_num_threads(),
        root=out,
    )
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    logger.info("built %s zoo in %s in %.1f s", size.name, out, seconds["total"])
    return manifest


def _write_data(out: Path, skills: Sequence[str]) -> Path:
    folder = out / "data"
    write_eval_data(folder, skills)
    return folder


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Save ``model`` and ``tokenizer`` into ``folder``, replacing any older content atomically."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
