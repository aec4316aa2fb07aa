"""The statistics pass of the data-informed merges, and its cache.

One pass of a source model over a suite's calibration examples collects what the data-informed methods
(``fisher``, ``regmean``, AIM, LEWIS) read, per tensor of that model:

* ``fisher``: the diagonal empirical Fisher of every floating parameter, the mean over examples of the
  squared gradient of the log-likelihood of the example's reference continuation (the reference answer of a
  ``generate`` task, the correct option of a ``choice`` task, the text of a ``perplexity`` task) given its
  prompt; one backward pass per example (Matena & Raffel's per-example Fisher, not the squared batch mean);
* ``gram``: for the weight of every ``torch.nn.Linear``, ``X^T X`` of its inputs over every token of every
  example (prompt and continuation), shape ``(in, in)`` (RegMean); accumulated in float32 on the model's
  device. Bounded by ``max_gram_features``: a linear layer with more input features gets no Gram matrix
  (the merge then uses the recipe's fallback method for it), since one ``in x in`` float32 matrix per linear
  layer is what dominates the memory (a 7B Llama's ``down_proj`` alone is 11008^2 x 4 B = 485 MB per layer);
* ``act``: for the same weights, the mean absolute input activation per input channel, shape ``(in,)``
  (AIM on the base model, LEWIS on every model).

Example set: the first-listed ``split`` (only ``calibration``: the test split is never used to fit a merge)
of the tasks of ``suite`` (all, or ``tasks``; for a model named in ``model_tasks``, its own tasks), each cut
to ``examples`` by :func:`~evomerge.scoring.suite.subset_examples` (seed 0). Giving each fine-tuned model its
own task's examples is the RegMean and Fisher papers' setting: a model's Gram matrices then describe the
inputs it must keep its outputs on, where one shared example set asks every model to keep them on every
task's inputs (``experiments/results/scaled_regmean.md`` measures the difference). Chat templates are not applied: the prompts are
the tasks' plain few-shot text.

Cache: :func:`load_or_collect` keeps one safetensors file per (model, example set, kinds, bound) in a folder
of the run, named by the hash of its inputs: the content hash of the model's weight files (sha256 over
their bytes, so a retrained model with the same paths recomputes), the token ids of every example, the
kinds and ``max_gram_features``. A second call with the same inputs loads the file; any changed input gives
another name and recomputes. Files are written atomically (temporary file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from evomerge.errors import ConfigError
from evomerge.recipe import DataSpec

log = logging.getLogger(__name__)

StatKind = Literal["fisher", "gram", "act"]
STAT_KINDS: tuple[str, ...] = ("fisher", "gram", "act")
#: Version of the pass's definition: part of every cache key (a change of the pass recomputes).
STATS_VERSION = 1

#: A calibration example as token ids: (prompt ids, continuation ids).
Request = tuple[list[int], list[int]]


# --------------------------------------------------------------------------- example set
def calibration_requests(suite: Any, tokenizer: Any, spec: DataSpec) -> list[Request]:
    """The (prompt ids, reference continuation ids) of every example of ``spec``'s example set."""
    from evomerge.scoring.requests import encode
    from evomerge.scoring.suite import ChoiceTask, GenerateTask, PerplexityTask, subset_examples

    out: list[Request] = []
    for task in suite.select(spec.tasks).tasks:
        examples = subset_examples(task.examples(spec.split), spec.examples, salt=task.name)
        s = task.spec
        for ex in examples:
            if isinstance(s, GenerateTask):
                prefix = s.fewshot_prefix + "".join(
                    f.prompt + s.delimiter + f.answer + s.fewshot_separator for f in task.fewshot
                )
                context, target = prefix + ex.prompt, s.delimiter + ex.answer
            elif isinstance(s, ChoiceTask):
                context, target = s.fewshot_prefix + ex.prompt, s.delimiter + ex.options[ex.label]
            elif isinstance(s, PerplexityTask):
                context, target = "", ex.prompt
            else:
                raise ConfigError(f"data.tasks: task {task.name!r} of kind {task.kind!r} has no token-level "
                                  "examples for the statistics pass; select generate, choice or perplexity tasks")
            ctx = encode(tokenizer, context) if context else []
            full = encode(tokenizer, context + target)
            if full[: len(ctx)] != ctx:  # the tokenizer merged across the boundary: score the whole text
                ctx = []
            cont = full[len(ctx):]
            if not cont:
                raise ConfigError(f"{ex.source}: the reference continuation encodes to no tokens")
            if not ctx:
                ctx, cont = cont[:1], cont[1:]
            if cont:
                out.append((ctx, cont))
    if not out:
        raise ConfigError(f"data: the example set of {spec.suite!r} is empty")
    return out


# --------------------------------------------------------------------------- the pass
def linear_weights(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """``parameter name of the weight -> module`` for every ``nn.Linear`` whose weight is a parameter."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(m.weight)]: m for m in model.modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) in names}


def collect(
    model: torch.nn.Module, requests: Sequence[Request], kinds: Iterable[str], *, max_gram_features: int = 4096
) -> dict[str, dict[str, torch.Tensor]]:
    """Run the pass (module docstring): ``{kind: {tensor name: statistic}}``, on ``model``'s device, float32.

    ``model`` is left as it was (its gradients cleared, train/eval mode restored).
    """
    kinds = tuple(kinds)
    bad = sorted(set(kinds) - set(STAT_KINDS))
    if bad:
        raise ConfigError(f"statistics: unknown kind(s) {bad}; valid: {', '.join(STAT_KINDS)}")
    device = next(model.parameters()).device
    linears = linear_weights(model)
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in kinds}
    tokens = 0
    hooks = []

    def hook(name: str, in_features: int):
        want_gram = "gram" in kinds and in_features <= max_gram_features

        def fn(_mod: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, in_features).float()
            if want_gram:
                g = out["gram"].get(name)
                out["gram"][name] = x.T @ x if g is None else g.addmm_(x.T, x)
            if "act" in kinds:
                a = out["act"].get(name)
                s = x.abs().sum(0)
                out["act"][name] = s if a is None else a.add_(s)

        return fn

    if "gram" in kinds or "act" in kinds:
        hooks = [m.register_forward_hook(hook(n, m.in_features)) for n, m in linears.items()]
    params = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if "fisher" in kinds else {}
    was_training = model.training
    model.eval()
    try:
        for ctx, cont in requests:
            ids = torch.tensor([ctx + cont], device=device)
            tokens += ids.shape[1]
            if not fisher:
                with torch.no_grad():
                    model(input_ids=ids)
                continue
            model.zero_grad(set_to_none=True)
            logits = model(input_ids=ids).logits[0, len(ctx) - 1 : -1].float()
            ll = torch.log_softmax(logits, -1).gather(1, ids[0, len(ctx):, None]).sum()
            ll.backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n].addcmul_(p.grad, p.grad)
    finally:
        for h in hooks:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    n = len(requests)
    for name, f in fisher.items():
        out["fisher"][name] = f.div_(n)
    for a in out.get("act", {}).values():
        a.div_(tokens)
    for g in out.get("gram", {}).values():
        g.div_(tokens)  # a common scale (RegMean is invariant to it): float32 stays in range
    return out


# --------------------------------------------------------------------------- cache
def weights_digest(folder: str | Path) -> str:
    """sha256 over a model folder's weight files (names and bytes), streamed in 8 MiB blocks."""
    from evomerge.io import ModelFolder

    h = hashlib.sha256()
    for shard in sorted(ModelFolder.open(Path(folder)).shards):
        h.update(shard.name.encode() + b"\0")
        with open(shard, "rb") as f:
            while block := f.read(8 << 20):
                h.update(block)
    return h.hexdigest()


def cache_key(digest: str, requests: Sequence[Request], kinds: Iterable[str], max_gram_features: int) -> str:
    blob = json.dumps({"v": STATS_VERSION, "model": digest, "requests": [list(map(list, r)) for r in requests],
                       "kinds": sorted(kinds), "max_gram_features": max_gram_features}, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=12).hexdigest()


@dataclass
class PassRecord:
    """What :func:`load_or_collect` did: the cache file, whether it was computed now, and the pass's seconds."""

    path: Path
    computed: bool
    seconds: float
    tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _save(stats: Mapping[str, Mapping[str, torch.Tensor]], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    flat = {f"{k}/{n}": t.detach().to("cpu").contiguous() for k, d in stats.items() for n, t in d.items()}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load(path: Path, kinds: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: unreadable statistics file ({exc}); delete it to recompute") from None
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in kinds}
    for key, t in flat.items():
        kind, _, name = key.partition("/")
        if kind in out:
            out[kind][name] = t
    return out


def load_file(path: str | Path, kinds: Iterable[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The statistics cached at ``path`` by :func:`load_or_collect` (what a search's workers read)."""
    return _load(Path(path), kinds)


def load_or_collect(
    folder: str | Path,
    requests: Sequence[Request],
    kinds: Iterable[str],
    cache_dir: str | Path,
    *,
    max_gram_features: int = 4096,
    device: str = "cpu",
) -> tuple[dict[str, dict[str, torch.Tensor]], PassRecord]:
    """The statistics of the model in ``folder`` (module docstring), from ``cache_dir`` or computed and cached."""
    kinds = tuple(sorted(set(kinds)))
    t0 = time.perf_counter()
    key = cache_key(weights_digest(folder), requests, kinds, max_gram_features)
    path = Path(cache_dir) / f"stats-{key}.safetensors"
    if path.is_file():
        return _load(path, kinds), PassRecord(path, False, time.perf_counter() - t0)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(Path(folder), dtype=torch.float32, trust_remote_code=False)
    model.to(device)
    stats = collect(model, requests, kinds, max_gram_features=max_gram_features)
    _save(stats, path, {"model": str(folder), "kinds": ",".join(kinds), "examples": str(len(requests))})
    seconds = time.perf_counter() - t0
    log.info("statistics of %s (%s, %d examples) in %.1fs -> %s", folder, ",".join(kinds), len(requests),
             seconds, path)
    return stats, PassRecord(path, True, seconds, sum(len(a) + len(b) for a, b in requests))


def stats_bytes(shapes: Mapping[str, tuple[int, ...]], linear_in: Mapping[str, int], kinds: Iterable[str],
                max_gram_features: int = 4096) -> int:
    """Bytes of one model's statistics (float32): Fisher = the parameters, Gram ``in^2`` and activations ``in``
    per linear weight (Gram only up to ``max_gram_features`` input features)."""
    import math

    kinds = set(kinds)
    total = 0
    if "fisher" in kinds:
        total += sum(math.prod(s) for s in shapes.values())
    if "gram" in kinds:
        total += sum(k * k for k in linear_in.values() if k <= max_gram_features)
    if "act" in kinds:
        total += sum(linear_in.values())
    return 4 * total


# --------------------------------------------------------------------------- what a merge reads
@dataclass(frozen=True)
class MergeStats:
    """Per model name, the ``{kind: {tensor name: statistic}}`` of :func:`collect` (what a merge reads)."""

    models: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]]

    def stacked(self, kind: str, name: str, order: Sequence[str]) -> torch.Tensor | None:
        """The statistic of tensor ``name`` of every model of ``order``, stacked; None when one lacks it."""
        rows = []
        for m in order:
            t = self.models.get(m, {}).get(kind, {}).get(name)
            if t is None:
                return None
            rows.append(t)
        return torch.stack(rows)

    def one(self, kind: str, name: str, model: str) -> torch.Tensor | None:
        return self.models.get(model, {}).get(kind, {}).get(name)


def recipe_kinds(recipe: Any) -> dict[str, tuple[str, ...]]:
    """Which kinds a recipe's merge reads, per model name (the method's sources, and AIM's base)."""
    from evomerge.merge.methods.base import METHODS
    from evomerge.merge.tensor_params import delta_models

    method = METHODS.get(recipe.method)
    need: dict[str, set[str]] = {m: set() for m in recipe.model_names}
    for m in delta_models(recipe):
        need[m] |= set(method.stats)
    if recipe.data is not None and recipe.data.aim > 0:
        need[recipe.reference_model].add("act")
    return {m: tuple(sorted(k)) for m, k in need.items() if k}


def recipe_stats(
    recipe: Any, folders: Mapping[str, str | Path], cache_dir: str | Path, *, device: str = "cpu"
) -> tuple[MergeStats | None, list[PassRecord]]:
    """Compute or load the statistics ``recipe`` reads (None when it reads none), from ``recipe.data``."""
    need = recipe_kinds(recipe)
    if not need:
        return None, []
    if recipe.data is None:
        raise ConfigError(f"data: method {recipe.method!r} needs statistics; give the recipe a 'data:' block "
                          "naming the suite whose calibration examples they come from")
    models, records = models_stats(recipe.data, folders, need, cache_dir, tokenizer=folders[recipe.reference_model],
                                   device=device)
    return MergeStats(models), records


def models_stats(
    spec: DataSpec, folders: Mapping[str, str | Path], need: Mapping[str, Iterable[str]], cache_dir: str | Path, *,
    tokenizer: str | Path, device: str = "cpu", where: str = "data",
) -> tuple[dict[str, dict[str, dict[str, torch.Tensor]]], list[PassRecord]]:
    """The statistics of kinds ``need[m]`` of every model ``m`` on ``spec``'s example set (its own tasks' for a
    model of ``spec.model_tasks``), each from ``cache_dir`` or computed and cached; one record per model.
    The prompts are encoded with the tokenizer in folder ``tokenizer``; ``where`` names the block in errors."""
    from transformers import AutoTokenizer

    from evomerge.scoring.suite import load_suite

    suite = load_suite(spec.suite)
    named = {f"{where}.tasks": spec.tasks or ()} | {f"{where}.model_tasks.{m}": t
                                                    for m, t in (spec.model_tasks or {}).items()}
    for field_, tasks in named.items():
        missing = [t for t in tasks if t not in suite.names]
        if missing:
            raise ConfigError(f"{field_}: {missing} are not tasks of {spec.suite} ({', '.join(suite.names)})")
    tok = AutoTokenizer.from_pretrained(Path(tokenizer), trust_remote_code=False)
    by_tasks: dict[tuple[str, ...] | None, list[Request]] = {}
    models: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    records = []
    for m, kinds in need.items():
        own = spec.for_model(m)
        if own.tasks not in by_tasks:
            by_tasks[own.tasks] = calibration_requests(suite, tok, own)
        models[m], rec = load_or_collect(folders[m], by_tasks[own.tasks], kinds, cache_dir,
                                         max_gram_features=spec.max_gram_features, device=device)
        records.append(rec)
    return models, records


def aim_adjust(base: torch.Tensor, merged: torch.Tensor, act: torch.Tensor, omega: float) -> torch.Tensor:
    """AIM (arXiv 2502.02421): ``base + (1 - omega * s) * (merged - base)`` with ``s`` the base model's input
    activation magnitudes of this linear weight normalized to ``[0, 1]`` (divided by their maximum) and
    broadcast over the output rows: the weights fed by the channels the base model uses most move least.
    ``omega = 0`` returns ``merged`` unchanged (a copy)."""
    if omega == 0:
        return merged.clone()
    cd = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = act.to(device=base.device, dtype=cd)
    top = a.max()
    s = a / top if top > 0 else torch.zeros_like(a)
    keep = (1 - omega * s).reshape(1, -1)
    b = base.to(cd)
    return (b + (merged.to(cd) - b) * keep).to(base.dtype)


__all__ = [
    "STAT_KINDS",
    "DataSpec",
    "MergeStats",
    "PassRecord",
    "aim_adjust",
    "cache_key",
    "calibration_requests",
    "collect",
    "linear_weights",
    "load_file",
    "load_or_collect",
    "models_stats",
    "recipe_kinds",
    "recipe_stats",
    "stats_bytes",
    "weights_digest",
]
