"""AdaMerging: the coefficients of task arithmetic fitted by gradient descent on the calibration inputs.

After Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR 2024, arXiv 2310.02575):
the merged model ``base + lambda * sum_i w_i d_i`` is built *functionally* from the resident base and task
vectors (``torch.func.functional_call``), so the gradient of its loss on the calibration inputs (the paper's mean
prediction entropy on unlabeled inputs, or the likelihood of the reference answers) reaches the merge
coefficients and nothing else, and Adam descends on them.

What is fitted: the genome of the run config's own search space, which must be a ``params`` space over
``task_arithmetic`` that searches only ``weight`` (``builtin:task-arithmetic-per-layer``: one weight per layer,
module kind and expert — AdaMerging's "layer-wise" coefficients, split by module kind), or over ``regmean`` /
``fisher`` that searches only their task-vector ``scale`` (``builtin:regmean-per-layer``; the merge is linear in
the scales, built from each model's projected task vector, :mod:`evomerge.driver.fit_map`). The genome lives in
``[0, 1]^d`` and each tensor's weights are an affine function of it (read off the space's own ``decode``, never
restated here, and checked at a random genome); Adam steps are projected back onto ``[0, 1]^d``. The result is a
genome and a :class:`~evomerge.recipe.Recipe` of that space, so ``evomerge merge``, export and a search started
from it (``space.start_from``) use it as any candidate.

Two objectives (``objective``):

``entropy`` (the paper's; no answers are read):

* ``generate`` tasks: the merged model's own greedy continuation of each calibration prompt (regenerated every
  ``refresh`` steps with the current merge, merged in place exactly as a candidate would be, cut after the first
  stop string or EOS) is teacher-forced, and the entropy of the next-token distribution is averaged over the
  positions that predict the continuation's tokens: the entropy of the model's answer;
* ``perplexity`` tasks: the entropy at every position that predicts a text token.

``likelihood`` (the calibration set is labeled, so the merge can be fitted to its answers, as a search's
fitness is): the mean negative log-likelihood of each ``generate`` example's reference answer (after the task's
``delimiter``) followed by the task's first stop string (the text an exact-match completion is),
teacher-forced after the same prompt ids the scorer generates from (few-shot prefix, chat template); of the text
for ``perplexity`` tasks. Nothing is generated, so a step costs one forward+backward pass and no greedy pass.

Each task's mean loss (over its positions) weighs equally and the loss is their mean; with ``balance`` a
task's weight is a softmax of its loss relative to its start (read at the previous step), a soft form of
the worst task. ``choice`` and ``lmeval`` tasks are refused. ``subset`` draws that many examples per task afresh at every step (seeded), else every
calibration example is used at every step.

Cost, in the units of a search: one *evaluation* is one calibration scoring pass of one candidate. A fit of
``steps`` steps runs ``steps`` forward+backward passes over the drawn inputs and ``ceil(steps / refresh) + 1``
greedy generation passes (``entropy`` only; every step with ``subset``; the last one measures the fitted genome's
entropy), each
about one scoring pass of the generate tasks; :func:`run_adamerging` also scores the start recipe once on
calibration and states the fit's wall time in multiples of that scoring pass (:class:`FitCost`).

A command (``evomerge adamerge``), not an optimizer of ``OPTIMIZERS``: an ask/tell optimizer sees only the
scores a worker sends back, while a gradient needs the worker's resident tensors and live model inside the
optimizer, across the boundary that keeps workers stateless and the optimizer in the driver. So a fit runs on its
own worker, writes its own folder (never a run folder), and hands a search its genome (``space.start_from``).

Entropy rewards confidence, not correctness: from a start whose answers are confidently wrong it makes them more
so (on the tiny zoo, from plain ``1/n`` weights, every task falls to near 0); start it from a tuned merge.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from evomerge.driver.fit_map import WeightMap, merged_tensors, projected_task_vectors
from evomerge.driver.fit_objective import FitTask, calibration_inputs, continue_greedily, loss_batch
from evomerge.errors import ConfigError
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

#: The file a fit writes its genome to, read back by ``space.start_from``.
START_FILE = "start.json"


class AdaMergingConfig(BaseModel):
    """The options of one fit (the ``evomerge adamerge`` flags)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    objective: Literal["entropy", "likelihood"] = Field(
        default="entropy", description="entropy of the merged model's own answers (unlabeled, the paper's) or the "
        "negative log-likelihood of the calibration set's reference answers")
    steps: int = Field(default=30, ge=0, description="Adam steps on the genome")
    lr: float = Field(default=0.01, gt=0, description="Adam learning rate, in genome units ([0, 1] per gene)")
    refresh: int = Field(default=3, ge=1, description="regenerate the greedy continuations every this many steps")
    subset: int | None = Field(default=None, ge=1, description="examples per task at each step (default: all)")
    balance: float | None = Field(
        default=None, ge=0, description="weigh the tasks by a softmax (this temperature) of each task's loss "
        "relative to its start, so the task whose loss fell least weighs most (default: equal weights)")
    batch_size: int | None = Field(default=None, ge=1,
                                   description="sequences per forward pass (default: the run's fitness.batch_size)")

    @model_validator(mode="after")
    def _refresh_needs_entropy(self) -> AdaMergingConfig:
        if self.objective == "likelihood" and "refresh" in self.model_fields_set:
            raise ValueError("refresh: regenerates the model's own answers, which the likelihood objective does not "
                             "use (it reads the reference answers)")
        return self


# --------------------------------------------------------------------------- the fit
@dataclass
class FitCost:
    """What a fit cost: passes over the calibration inputs it drew, and wall time."""

    steps: int
    generation_passes: int  # greedy continuations of the drawn prompts (about one calibration scoring each)
    gradient_passes: int  # forward+backward passes over the drawn inputs
    fit_s: float
    eval_s: float | None = None  # one calibration scoring pass of the start recipe, measured in the same process
    evaluations: float | None = None  # fit_s / eval_s: the fit's wall time in evaluations


@dataclass
class FitResult:
    genome: np.ndarray
    recipe: Recipe
    x0: np.ndarray
    history: list[dict[str, Any]]
    cost: FitCost
    gene_names: list[str]


class AdaMerging:
    """One fit over a run's resident sources, live model, tokenizer and suite (a driver worker's)."""

    def __init__(self, space: Any, worker: Any, settings: AdaMergingConfig, *, seed: int, batch_size: int) -> None:
        self.space = space
        self.worker = worker
        self.settings = settings
        self.seed = seed
        self.batch_size = settings.batch_size or batch_size
        sources = worker.sources
        self.wmap = WeightMap(space, {n: sources.roles[n] for n in worker.merger.targets}, sources.num_layers,
                              worker.stats)
        self.rows = sources.row_index(self.wmap._plan)
        self.targets = self._live_names(worker.model, worker.merger.targets)
        self.directions = None
        if self.wmap.param == "scale":
            self.directions = projected_task_vectors(self.wmap._plan.recipe, sources, worker.stats, self.rows,
                                                     list(self.targets))
        worker.model.requires_grad_(False)  # the live weights are replaced by the merged tensors in each forward
        self.tasks = calibration_inputs(worker.suite, worker.tokenizer, settings.objective == "likelihood")
        tok = worker.tokenizer
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    @staticmethod
    def _live_names(model: torch.nn.Module, targets: dict[str, torch.Tensor]) -> dict[str, str]:
        """Checkpoint name -> the live parameter it is; a target that is a view into a fused one is refused."""
        by_ptr = {(p.data_ptr(), tuple(p.shape)): n for n, p in model.named_parameters()}
        out = {}
        for name, t in targets.items():
            live = by_ptr.get((t.data_ptr(), tuple(t.shape)))
            if live is None:
                raise ConfigError(f"sources: tensor {name} is part of a fused live parameter (MoE experts); "
                                  "adamerging needs one live parameter per checkpoint tensor")
            out[name] = live
        return out

    def _draw(self, rng: np.random.Generator) -> list[list[int]]:
        n = self.settings.subset
        return [sorted(rng.choice(len(t.prompts), n, replace=False).tolist()) if n and n < len(t.prompts)
                else list(range(len(t.prompts))) for t in self.tasks]

    def _regenerate(self, u: np.ndarray, drawn: list[list[int]]) -> None:
        self.worker.merger.apply(self.space.decode(u))
        self.worker._merged = None  # the live model no longer holds a recipe the worker scored
        for task, idx in zip(self.tasks, drawn, strict=True):
            if task.kind == "generate":
                if not task.continuations:
                    task.continuations = [[] for _ in task.prompts]
                continue_greedily(self.worker.model, self.worker.tokenizer, task, idx, self.batch_size)

    def _sequences(self, task: FitTask, idx: list[int]) -> tuple[list[list[int]], list[int]]:
        if task.kind == "generate" and self.settings.objective == "likelihood":
            return ([task.prompts[i] + task.answers[i] for i in idx], [len(task.prompts[i]) for i in idx])
        if task.kind == "generate":
            return ([task.prompts[i] + task.continuations[i] for i in idx], [len(task.prompts[i]) for i in idx])
        return [task.prompts[i] for i in idx], [1] * len(idx)

    def merged(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """The merged tensors at genome ``u`` (float64, unit scale), keyed by the live model's parameter names:
        the functional merge the fit differentiates (the materializer's merge of ``space.decode(u)``)."""
        return merged_tensors(self.wmap, self.worker.sources, self.targets, u, self.rows, self.directions)

    def task_losses(self, u: torch.Tensor, drawn: list[list[int]], weights: np.ndarray | None = None
                    ) -> list[float]:
        """Each task's mean loss (entropy or NLL, per ``objective``) at genome ``u``; with ``weights`` (one per
        task), the gradient of ``sum_t weights[t] * L_t`` is accumulated into ``u.grad`` (without, nothing is
        differentiated)."""
        out = []
        for t, (task, idx) in enumerate(zip(self.tasks, drawn, strict=True)):
            seqs, starts = self._sequences(task, idx)
            positions = sum(len(q) - a for q, a in zip(seqs, starts, strict=True))
            order = sorted(range(len(seqs)), key=lambda j: -len(seqs[j]))
            total = 0.0
            for b in range(0, len(order), self.batch_size):
                part = order[b:b + self.batch_size]
                with torch.set_grad_enabled(weights is not None):
                    h = loss_batch(self.worker.model, self.merged(u), [seqs[j] for j in part],
                                    [starts[j] for j in part], self.pad, self.settings.objective) / positions
                if not torch.isfinite(h):
                    raise ConfigError(f"task {task.name!r}: the merged model's {self.settings.objective} is not "
                                      "finite (NaN/inf weights or logits)")
                if weights is not None:
                    (h * float(weights[t])).backward()
                total += float(h.detach())
            out.append(total)
        return out

    def loss_and_grad(self, u: torch.Tensor, drawn: list[list[int]]) -> float:
        """Mean over tasks of each task's mean loss; accumulates its gradient into ``u.grad``."""
        return float(np.mean(self.task_losses(u, drawn, np.full(len(self.tasks), 1.0 / len(self.tasks)))))

    def _weights(self, last: list[float] | None, first: list[float] | None) -> np.ndarray:
        """The tasks' weights in the loss: equal, or with ``balance`` a softmax of each task's loss relative
        to its loss at the start (from the last step), so the task whose loss fell least weighs most."""
        n = len(self.tasks)
        if self.settings.balance is None or last is None or first is None:
            return np.full(n, 1.0 / n)
        ratio = np.asarray(last) / np.maximum(np.asarray(first), 1e-12)
        z = np.exp(self.settings.balance * (ratio - ratio.max()))
        return z / z.sum()

    def fit(self, x0: np.ndarray | None = None, progress: Callable[[dict[str, Any]], None] | None = None
            ) -> FitResult:
        s = self.settings
        x0 = self.space.unit(self.space.x0 if x0 is None else x0)
        u = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([u], lr=s.lr)
        rng = np.random.default_rng(self.seed)
        history: list[dict[str, Any]] = []
        gens = grads = 0
        first: list[float] | None = None
        last: list[float] | None = None
        t0 = time.perf_counter()
        model = self.worker.model
        was_training = model.training
        model.eval()
        try:
            for step in range(s.steps + 1):  # the last pass only measures the final genome's loss
                drawn = self._draw(rng)
                if s.objective == "entropy" and (step % s.refresh == 0 or s.subset or step == s.steps):
                    self._regenerate(u.detach().numpy(), drawn)
                    gens += 1
                opt.zero_grad()
                weights = None if step == s.steps else self._weights(last, first)
                per_task = self.task_losses(u, drawn, weights)
                grads += weights is not None
                first = per_task if first is None else first
                last = per_task
                rec = {"step": step, "loss": float(np.mean(per_task)),
                       "tasks": dict(zip((t.name for t in self.tasks), per_task, strict=True)),
                       "genome": u.detach().tolist()}
                if weights is not None and s.balance is not None:
                    rec["weights"] = weights.tolist()
                history.append(rec)
                if progress:
                    progress(rec)
                if step == s.steps:
                    break
                opt.step()
                with torch.no_grad():
                    u.clamp_(0.0, 1.0)
        finally:
            model.train(was_training)
        genome = u.detach().numpy().copy()
        cost = FitCost(steps=s.steps, generation_passes=gens, gradient_passes=grads, fit_s=time.perf_counter() - t0)
        return FitResult(genome, self.space.decode(genome), x0, history, cost,
                         [g.name for g in self.space.genes()])


# --------------------------------------------------------------------------- the command
def run_adamerging(config: str | Path | Any, settings: AdaMergingConfig, out_dir: str | Path | None = None, *,
                   overrides: dict[str, Any] | None = None, score: bool = True,
                   progress: Callable[[dict[str, Any]], None] | None = None) -> Path:
    """Fit a run config's space by AdaMerging and write ``recipe.yaml``, ``start.json``, ``log.jsonl`` and
    ``summary.json`` to ``out_dir`` (default ``OUTPUT_DIR/adamerging-NAME``), atomically as one folder.

    ``score``: also score the start and the fitted recipe on calibration (the start's scoring time is the
    evaluation unit of the cost)."""
    import os
    import shutil

    from evomerge.config import RunConfig, load_run_config
    from evomerge.driver.run import check_memory, preflight

    cfg = config if isinstance(config, RunConfig) else load_run_config(config, overrides)
    prep = preflight(cfg)
    out = Path(out_dir) if out_dir is not None else Path(cfg.output_dir) / f"adamerging-{cfg.name}"
    if out.exists():
        raise ConfigError(f"{out}: already exists; remove it or give another --out")
    check_memory(prep)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        return _fit_into(prep, settings, out, tmp, score, progress)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fit_into(prep: Any, settings: AdaMergingConfig, out: Path, tmp: Path, score: bool,
              progress: Callable[[dict[str, Any]], None] | None) -> Path:
    import dataclasses
    import os

    from evomerge.driver.run import search_stats
    from evomerge.driver.worker import Worker

    cfg = prep.cfg
    # a data-informed space's statistics, computed into the fit's own folder (cache/stats, as a run's)
    worker = Worker(dataclasses.replace(prep.spec, stats_files=search_stats(prep, tmp)))
    fitter = AdaMerging(prep.space, worker, settings, seed=cfg.seed, batch_size=cfg.fitness.batch_size)
    result = fitter.fit(progress=progress)
    scores: dict[str, Any] = {}
    if score:
        from evomerge.driver.pool import Job

        for label, recipe in (("start", prep.space.decode(result.x0)), ("fitted", result.recipe)):
            t0 = time.perf_counter()
            res = worker.evaluate(Job(key=0, candidate_id=-1, recipe=recipe))
            if res.status != "ok":
                raise ConfigError(f"scoring the {label} recipe failed: {res.error}")
            scores[label] = res.task_means()
            if label == "start":
                result.cost.eval_s = time.perf_counter() - t0
        result.cost.evaluations = result.cost.fit_s / result.cost.eval_s if result.cost.eval_s else None
    write_fit(tmp, result, settings, prep.space, scores)
    os.replace(tmp, out)
    return out


def write_fit(folder: Path, result: FitResult, settings: AdaMergingConfig, space: Any,
              scores: dict[str, Any]) -> None:
    (folder / "recipe.yaml").write_text(result.recipe.to_yaml())
    (folder / START_FILE).write_text(json.dumps({
        "kind": "adamerging", "genes": result.gene_names, "genome": result.genome.tolist(),
        "recipe_hash": result.recipe.hash}, indent=1))
    with (folder / "log.jsonl").open("w") as f:
        for rec in result.history:
            f.write(json.dumps(rec) + "\n")
    (folder / "summary.json").write_text(json.dumps({
        "settings": settings.model_dump(), "cost": asdict(result.cost), "recipe_hash": result.recipe.hash,
        "objective": settings.objective,
        "loss": {"start": result.history[0]["loss"], "fitted": result.history[-1]["loss"]},
        "calibration": scores, "dim": int(space.dim)}, indent=1))


def load_start(path: str | Path, space: Any, *, where: str = "space.start_from") -> np.ndarray:
    """The genome of a ``start.json`` (or of the folder holding one), checked against ``space``."""
    p = Path(path)
    p = p / START_FILE if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{where}: {p} not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{where}: {p} is not a readable JSON start file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("genome"), list) or not isinstance(data.get("genes"), list):
        raise ConfigError(f"{where}: {p} holds no 'genes' and 'genome' lists")
    names = [g.name for g in space.genes()]
    if data["genes"] != names:
        raise ConfigError(f"{where}: {p} was fitted in another search space ({len(data['genes'])} genes, this space "
                          f"has {len(names)}, or other gene names)")
    try:
        genome = np.asarray(data["genome"], dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {p}: genome holds values that are not numbers") from None
    if genome.shape != (len(names),) or not np.all(np.isfinite(genome)) or genome.min() < 0 or genome.max() > 1:
        raise ConfigError(f"{where}: {p}: genome must hold {len(names)} finite values in [0, 1]")
    want = data.get("recipe_hash")
    if want is not None and space.decode(genome).hash != want:
        raise ConfigError(f"{where}: {p}: the genome decodes to another recipe than the one fitted "
                          "(the space's fixed parameters or ranges changed)")
    return genome


__all__ = ["AdaMerging", "AdaMergingConfig", "FitCost", "FitResult", "WeightMap", "load_start", "merged_tensors",
           "run_adamerging"]
