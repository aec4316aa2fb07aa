"""Start and resume runs: preflight every input before any work, then hand over to the Driver.

A run folder (``output_dir/name``) holds ``config.resolved.yaml``, ``space.txt``, ``archive.sqlite``,
``checkpoint.json``, ``events.jsonl`` (``source_selection.json`` when a pool was reduced) and, at the end, ``report/``
and ``export/``. It is created only after
the preflight passed, atomically (written under a temporary name, then renamed), so a bad config, a missing
model, mismatched sources or a bad task file never leave a half-written folder behind.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.archive import Archive
from evomerge.config import RunConfig, load_run_config
from evomerge.config.load import CONFIG_FILE, load_run
from evomerge.driver import checks, warm
from evomerge.driver.baselines import Baseline, baseline_recipes
from evomerge.driver.lock import RunLock
from evomerge.driver.loop import Driver
from evomerge.driver.plan import magnitude_cache, plan_run, refusal
from evomerge.driver.pool import Pool
from evomerge.driver.records import Settings
from evomerge.driver.warm import WarmStart
from evomerge.driver.worker import Worker, WorkerSpec, resolve_device
from evomerge.errors import ConfigError
from evomerge.events import EventLog
from evomerge.io.folder import vocab_rows
from evomerge.merge.stats import recipe_kinds, recipe_stats
from evomerge.merge.vocab import depends_on_models, effective_source
from evomerge.pools import POOLS
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)



@dataclass
class Prepared:
    """Everything validated by the preflight."""

    cfg: RunConfig
    space: Any
    optimizer: Any
    tasks: list[str]
    spec: WorkerSpec
    baselines: list[Baseline]
    reference: str
    warm_start: WarmStart | None = None  # space.warm_start
    declared: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # the suite's references
    selection: dict[str, Any] | None = None  # source_selection: what was chosen from the pool (source_selection.json)


def _ensure_zoo(cfg: RunConfig) -> None:
    if cfg.zoo is None:
        return
    zoo_dir = Path(cfg.zoo.dir)
    if (zoo_dir / "zoo.json").is_file():
        return
    from evomerge.testing.zoo import build_zoo

    log.info("building the %s zoo in %s (first run only)", cfg.zoo.size, zoo_dir)
    build_zoo(zoo_dir, size=cfg.zoo.size, seed=cfg.zoo.seed)


def preflight(cfg: RunConfig) -> Prepared:
    """Validate every input (models, suite, space, optimizer, scorer) without doing any work."""
    from evomerge.io import ModelFolder, check_mergeable
    from evomerge.io.adapter import AdapterFolder
    from evomerge.merge.selection import apply_selection, selection_record
    from evomerge.merge.tensor_params import validate_recipe_params
    from evomerge.optim import OPTIMIZERS
    from evomerge.optim.base import Problem
    from evomerge.scoring.base import SCORERS
    from evomerge.scoring.suite import load_suite
    from evomerge.spaces.base import SpaceModels, build_space
    from evomerge.spaces.template import load_template, parse_template

    checks.check_device(cfg)
    checks.check_output_dir(cfg)
    checks.check_early_stop(cfg)
    _ensure_zoo(cfg)
    pool_sources = dict(cfg.sources)
    cfg, selection = apply_selection(cfg)  # a pool: only the sources kept from here on
    folders = {name: ModelFolder.open(Path(p)) for name, p in cfg.sources.items()}
    check_mergeable(folders, vocab=True)
    checks.check_cluster(cfg)
    tokenizer_source = effective_source(cfg.tokenizer_source, [vocab_rows(f) for f in folders.values()])
    suite = load_suite(cfg.fitness.suite).select(cfg.fitness.tasks)
    tasks = list(suite.names)
    checks.check_subset(cfg, suite)
    SCORERS.get(cfg.fitness.scorer)
    template = load_template(cfg.space.template)
    if cfg.space.overrides:
        data = template.model_dump(mode="json") | dict(cfg.space.overrides)
        template = parse_template(data, source=f"{cfg.space.template} + space.overrides")
    models = SpaceModels.from_folders(folders, base=cfg.base_model, tokenizer_source=tokenizer_source,
                                      pad_to_multiple_of=cfg.pad_to_multiple_of)
    space = build_space(template, models)
    x0_recipe = space.decode(space.x0)
    validate_recipe_params(x0_recipe)
    if recipe_kinds(x0_recipe) and x0_recipe.data is None:
        raise ConfigError(f"space.template: method {x0_recipe.method!r} reads calibration statistics; give the "
                          "template a data: block (suite, examples …) naming where they come from")
    # an optimizer that recombines segments (M2N2 over recipes) gets the space's segment structure, if any
    segments = space.prepare_segments(folders) if "segments" in OPTIMIZERS.capabilities(cfg.optimizer.name) else None
    x0 = space.x0 if cfg.space.start_from is None else start_point(cfg.space.start_from, space)
    if cfg.space.lewis_start is not None:  # activations computed once into the run folder (a resume loads them)
        from evomerge.driver.lewis_start import lewis_start_point

        x0 = lewis_start_point(cfg, space, x0, Path(cfg.output_dir) / cfg.name / CACHE_DIR / STATS_DIR)
    problem = Problem(space.dim, space.lower, space.upper, x0, tuple(tasks), segments)
    factory = OPTIMIZERS.get(cfg.optimizer.name)
    run_options = cfg.optimizer.options.for_run(workers=cfg.resources.workers, evaluations=cfg.budget.evaluations)
    options = run_options.model_dump()
    optimizer = factory(problem, seed=cfg.seed, **options)
    warm_start = None
    if cfg.space.warm_start is not None:
        warm_start = warm.prepare(cfg, template, models, space, x0_recipe, problem, factory, options)
    reference = x0_recipe.reference_model
    if isinstance(folders[reference], AdapterFolder):
        raise ConfigError(f"sources.{reference}: the reference model is a LoRA adapter; name its base as a source "
                          f"and set base_model to it")
    order = tuple(n for n in cfg.sources if n != reference)
    vocab = check_vocab(cfg, folders, reference, tokenizer_source, x0_recipe)
    orders = use_magnitude_order(cfg, x0_recipe.method, folders[reference], len(order))
    placement = cfg.resources.placement
    if placement == "auto":  # the first placement whose memory plan fits
        placement = plan_run(cfg, reference=reference, orders=orders).setup.placement
        log.info("resources.placement auto: %s", placement)
    spec = WorkerSpec(
        sources=dict(cfg.sources), reference=reference, order=order, suite=str(cfg.fitness.suite),
        tasks=tuple(tasks), scorer=cfg.fitness.scorer, scorer_options=scorer_options(cfg),
        device=cfg.resources.device, dtype=cfg.resources.dtype, threads=cfg.resources.threads_per_worker,
        seed=cfg.seed,
        sorted_magnitudes=orders and placement != "mmap",  # mmap keeps nothing resident
        tokenizer_source=tokenizer_source, pad_to_multiple_of=cfg.pad_to_multiple_of, placement=placement,
        factored_adapters=cfg.resources.adapter_residency == "factored",
    )
    baselines = baseline_recipes(reference, list(order), cfg.base_model, cfg.seed, vocab=models.vocab_fields,
                                 every_source=vocab.aligns and depends_on_models(tokenizer_source, reference))
    if warm_start is not None:
        baselines += warm_start.baselines
    for f in folders.values():
        f.close()
    declared = {name: (ref.low, ref.high) for name, ref in suite.references().items()}
    record = None if selection is None else selection_record(selection, pool_sources)
    return Prepared(cfg, space, optimizer, tasks, spec, baselines, reference, warm_start, declared, record)


def scorer_options(cfg: RunConfig) -> dict[str, Any]:
    """The options the workers build their scorer with: ``fitness.batch_size``, ``resources.threads_per_worker``,
    and for the vllm scorer ``resources.gpus_per_worker`` above 1 as the engine's ``tensor_parallel_size``."""
    res = cfg.resources
    out: dict[str, Any] = {"batch_size": cfg.fitness.batch_size}
    if res.threads_per_worker and cfg.fitness.scorer != "vllm":  # a vllm worker's threads: the worker's own torch
        out["threads"] = res.threads_per_worker                    # threads (WorkerSpec.threads), not the engine's
    if cfg.fitness.scorer == "vllm" and res.gpus_per_worker > 1:
        out["tensor_parallel_size"] = int(res.gpus_per_worker)
    return out


def search_stats(prep: Prepared, run_dir: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """The calibration statistics a data-informed space's recipes read, computed once per source before the
    search into ``<run>/cache/stats/`` (a resumed run loads them from there: the cache is keyed by the weights,
    the calibration examples and the settings, :func:`evomerge.merge.stats.cache_key`).

    Every recipe of a params space shares the template's method and ``data:`` block, so ``x0``'s needs are
    every candidate's (with AIM's ω as a gene, x0's at the gene's high). Returns per model name the cached file
    and its kinds (what the workers load)."""
    genome = prep.space.x0.copy()
    block = prep.space.param_genes
    if block is not None:  # AIM's ω as a gene: the probe takes it at its high, so the activations are computed
        genome[: block.dim] = block.stats_unit()
    probe = prep.space.decode(genome)
    need = recipe_kinds(probe)
    if not need:
        return {}
    _, records = recipe_stats(probe, prep.cfg.sources, run_dir / CACHE_DIR / STATS_DIR, device="cpu")
    for r in records:
        log.info("calibration statistics %s: %s (%.1fs)", "computed" if r.computed else "loaded", r.path,
                 r.seconds)
    return {m: (str(r.path.resolve()), need[m]) for m, r in zip(need, records, strict=True)}


def start_point(path: str, space: Any) -> Any:
    """``space.start_from``: the genome of the recipe in ``path`` in ``space`` (a params space), or the genome an
    ``evomerge adamerge`` fit wrote (a ``start.json``, or the folder holding one)."""
    from evomerge.recipe import Recipe

    p = Path(path)
    if p.is_dir() or p.suffix == ".json":
        from evomerge.driver.adamerging import load_start

        return load_start(p, space)
    where = f"space.start_from ({path})"
    if getattr(space, "kind", None) != "params":
        raise ConfigError(f"{where}: needs a params template; the space is a {getattr(space, 'kind', '?')} space")
    try:
        recipe = Recipe.from_yaml(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read the recipe: {exc.strerror or exc}") from None
    except (ValueError, yaml.YAMLError) as exc:  # validation or YAML errors
        raise ConfigError(f"{where}: not a valid recipe: {str(exc).splitlines()[0]}") from None
    return space.param_genes.encode(recipe, where)


def check_vocab(cfg: RunConfig, folders: dict[str, Any], reference: str, source: str | None, x0: Recipe) -> Any:
    """Plan the candidates' vocabulary (:mod:`evomerge.merge.vocab`); refuse a run that cannot score or merge it."""
    from evomerge.merge.vocab import plan_vocab

    ordered = {reference: folders[reference], **folders}
    vocab = plan_vocab(ordered, reference, source, cfg.pad_to_multiple_of)
    if vocab.tokenizer is None and vocab.tokenizer_dir is None:
        raise ConfigError("sources: no source folder has tokenizer files (" + ", ".join(cfg.sources.values())
                          + "); a search needs a tokenizer to score candidates")
    log.info("candidates are scored with %s", vocab.describe())
    if vocab.aligns and x0.routing is not None:
        raise ConfigError(f"space.template: layer routing over sources whose vocabularies differ "
                          f"(tokenizer_source {vocab.source}) is not supported; use a params template")
    if vocab.aligns and depends_on_models(source, reference) and set(x0.model_names) != set(cfg.sources):
        raise ConfigError(f"tokenizer_source {source}: the vocabulary depends on the models merged, so every "
                          f"candidate must read every source; the space merges only {x0.model_names}")
    return vocab


def use_magnitude_order(cfg: RunConfig, method: str, reference: Any, n_deltas: int) -> bool:
    """Resolve ``resources.sorted_magnitude_cache`` for the run's method (:func:`~evomerge.driver.plan.magnitude_cache`)."""
    entries = sum(math.prod(reference.shape(n)) for n in reference.tensor_names)
    return magnitude_cache(cfg, method, resolve_device(cfg.resources.device), entries, n_deltas)


def check_memory(prep: Prepared) -> None:
    """Log the run's memory plan; refuse (ConfigError, nothing written) a run the known memory cannot hold."""
    plan = plan_run(prep.cfg, reference=prep.reference, orders=prep.spec.sorted_magnitudes,
                    placement=prep.spec.placement)
    log.info("%s", plan.summary())
    why = refusal(plan)
    if why is not None:
        raise ConfigError(why)
    if plan.fits is False:
        log.warning("%s (continuing: under the host's total memory)", plan.verdict())


CACHE_DIR = "cache"  # per-run caches (compiled merge kernels); a worker may create it before the run folder
STATS_DIR = "stats"  # under CACHE_DIR: calibration statistics of a data-informed search (search_stats)


def make_pool(prep: Prepared, run_dir: Path) -> Pool:
    res = prep.cfg.resources
    # compiled merge kernels are cached inside the run folder (on a cluster: the same path on each node)
    spec = dataclasses.replace(prep.spec, kernel_cache=str((run_dir / CACHE_DIR / "kernels").resolve()),
                               stats_files=search_stats(prep, run_dir))
    pool: Pool = POOLS.get(res.backend)(functools.partial(Worker, spec), res, sources=dict(spec.sources))
    return pool


def run_dir_of(cfg: RunConfig) -> Path:
    return Path(cfg.output_dir) / cfg.name


def check_new_run_dir(run_dir: Path) -> None:
    """Refuse a run folder that holds anything but ``cache/`` (which this run's workers may have made)."""
    if run_dir.exists() and any(p.name != CACHE_DIR for p in run_dir.iterdir()):
        raise ConfigError(f"run folder {run_dir} already exists; resume it with `evomerge resume {run_dir}` "
                          "or choose another name")


#: The pool, the kept sources and their Frank–Wolfe weights of a run with ``source_selection``.
SELECTION_FILE = "source_selection.json"


def create_run_dir(prep: Prepared) -> Path:
    """Create the run folder atomically with the resolved config and the space description.

    A folder holding nothing but ``cache/`` (made by this run's workers while they started) is taken over.
    """
    run_dir = run_dir_of(prep.cfg)
    check_new_run_dir(run_dir)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(prep.cfg.model_dump(mode="json"), sort_keys=False))
        (tmp / "space.txt").write_text(prep.space.describe() + "\n")
        if prep.selection is not None:
            (tmp / SELECTION_FILE).write_text(json.dumps(prep.selection, indent=1) + "\n")
        if run_dir.exists():
            if (run_dir / CACHE_DIR).exists():
                os.replace(run_dir / CACHE_DIR, tmp / CACHE_DIR)
            run_dir.rmdir()
        os.replace(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir


def build_driver(prep: Prepared, run_dir: Path, pool: Pool, on_progress: Callable[..., None] | None = None) -> Driver:
    cfg = prep.cfg

    def start(scored: list[Any], refs: Any) -> tuple[Any, dict[str, Any] | None]:
        return warm.start_optimizer(prep.optimizer, prep.warm_start, scored, refs, prep.tasks)

    settings = Settings(
        tasks=prep.tasks, baselines=prep.baselines, budget_evals=cfg.budget.evaluations,
        budget_seconds=cfg.budget.wall_time_s, subset=cfg.fidelity.subset,
        promote_quantile=cfg.fidelity.promote_quantile, rescore_test=cfg.fidelity.rescore_test,
        subset_method=cfg.fidelity.subset_method, promote_confidence=cfg.fidelity.promote_confidence,
        seed=cfg.seed, declared=prep.declared, early_stop=cfg.fidelity.early_stop,
        early_stop_chunks=cfg.fidelity.early_stop_chunks,
    )
    return Driver(run_dir=run_dir, space=prep.space, start=start, pool=pool,
                  archive=Archive(run_dir / "archive.sqlite"), events=EventLog(run_dir / "events.jsonl"),
                  settings=settings, on_progress=on_progress)


PoolFactory = Callable[[Prepared, Path], Pool]


def start_run(
    config: str | Path | RunConfig, *, overrides: dict[str, Any] | None = None,
    on_progress: Callable[..., None] | None = None, pool_factory: PoolFactory | None = None,
) -> Path:
    """Preflight, create the run folder, run the search; returns the run folder.

    The local worker (which reads every source weight and refuses NaN/inf) is built before the run folder
    exists, so unreadable or non-finite weights stop the run with nothing written.
    """
    cfg = config if isinstance(config, RunConfig) else load_run_config(config, overrides)
    prep = preflight(cfg)
    run_dir = run_dir_of(cfg)
    check_new_run_dir(run_dir)
    check_memory(prep)
    pool = (pool_factory or make_pool)(prep, run_dir)
    try:
        run_dir = create_run_dir(prep)
        with RunLock(run_dir):
            driver = build_driver(prep, run_dir, pool, on_progress)
            driver.events.emit("start", name=cfg.name, dim=prep.space.dim, optimizer=cfg.optimizer.name)
            driver.run()
    finally:
        pool.close()
    return run_dir


def resume_run(
    run_dir: str | Path, *, on_progress: Callable[..., None] | None = None, pool_factory: PoolFactory | None = None
) -> Path:
    """Continue a run from its checkpoint and archive (see :class:`~evomerge.driver.loop.Driver`)."""
    run_dir = Path(run_dir)
    cfg = load_run(run_dir)
    with RunLock(run_dir):
        prep = preflight(cfg)
        check_memory(prep)
        pool = (pool_factory or make_pool)(prep, run_dir)
        try:
            driver = build_driver(prep, run_dir, pool, on_progress)
            driver.restore()
            driver.events.emit("resume", archived=len(driver.journal.rows))
            driver.run()
        finally:
            pool.close()
    return run_dir
