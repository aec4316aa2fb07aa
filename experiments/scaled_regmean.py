"""RegMean with task-vector scales on the study's problems: the grid, then CMA-ES per layer from it.

    python experiments/scaled_regmean.py --zoo ZOO --only 3            # 3 experts, 1 seed per search
    python experiments/scaled_regmean.py --zoo ZOO --only 3 --seeds 3
    python experiments/scaled_regmean.py --zoo ZOO --only 3 --seeds 3 --own-tasks   # each expert's own task
    python experiments/scaled_regmean.py --real REALZOO --own-tasks --search-evals 0   # SmolLM2-135M experts

The paper's RegMean averages full models, so each task vector enters at about 1/n of its size; ``scale`` (per
model, per layer and module kind in ``builtin:regmean-per-layer``) multiplies the task vectors before the least
squares, and with equal Gram matrices scale ``s`` is task arithmetic at weight ``s/n``. Rows (held-out test split,
relative to each task's expert): task arithmetic at the best λ of the study's grid (5 evaluations); the paper's
RegMean (scale 1, α = 0.9); the calibration grid over α × scale (scale = n λ for the study's λ grid) and its best
point by the calibration mean, and by the calibration worst task; for each of ``builtin:regmean-per-layer``
(from the grid's best worst-task point) and ``builtin:task-arithmetic-per-layer`` (from task arithmetic at its
best λ): AdaMerging's likelihood fit (``--steps``, ``--lr``, ``--subset`` examples per task per step), CMA-ES
(popsize 8, sigma0 0.1, x0 first) from the fit and from the start itself (for task arithmetic: the study's warm
search), each scalarized by the mean or by the worst task (``scalarize: worst``, picking the best worst task on
calibration).
*cost* = calibration scoring passes (grid points, the search's evaluations) plus the statistics pass's wall time
over one calibration scoring pass. ``--own-tasks``: each expert's Gram matrices on its own task's calibration
examples (``data.model_tasks``, the paper's setting), else every expert's on all tasks' examples; ``--fit-seeds``
repeats each fit with other example draws (the searches start from the first). Results:
``experiments/results/scaled_regmean{,-own,-real-own}.{md,json}`` (the files the runs write: ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from adamerging import GRID, PROBLEMS, REPO, add_relative, picked, pm, rel, score, score_folder

from evomerge.config import RunConfig
from evomerge.driver.adamerging import AdaMergingConfig, run_adamerging
from evomerge.driver.run import preflight, search_stats, start_run
from evomerge.driver.worker import Worker
from evomerge.merge.stats import recipe_stats
from evomerge.recipe import Recipe
from evomerge.results import RunResults
from evomerge.testing.zoo import build_zoo

log = logging.getLogger("scaled_regmean")
ALPHAS = (0.2, 0.5, 0.9)
TA_SPACE = "builtin:task-arithmetic-per-layer"
RM_SPACE = "builtin:regmean-per-layer"
REAL_PROBLEMS = {"real zoo, 3 experts (add, order, unit)": (["add", "order", "unit"], "builtin:real")}


def config(zoo: Any, experts: list[str], suite: str, name: str, out: Path, template: str, init: dict[str, float],
           *, examples: int, own_tasks: bool = False, seed: int = 0, search: dict[str, Any] | None = None,
           evals: int = 1, start_from: Path | None = None) -> RunConfig:
    init = dict(init)
    overrides: dict[str, Any] = {"init": init}
    if "alpha" in init:
        overrides["fixed"] = {"alpha": init.pop("alpha")}
    if template == RM_SPACE:
        overrides["data"] = {"suite": suite, "examples": examples,
                             **({"model_tasks": {e: [e] for e in experts}} if own_tasks else {})}
    return RunConfig.model_validate({
        "name": name, "seed": seed, "output_dir": str(out / "runs"),
        "sources": {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in experts}}, "base_model": "base",
        "space": {"template": template, "overrides": overrides,
                  **({"start_from": str(start_from)} if start_from is not None else {})},
        "fitness": {"suite": suite, "scorer": "hf", "batch_size": 200},
        "optimizer": search or {"name": "cma_es"}, "budget": {"evaluations": evals},
        "resources": {"threads_per_worker": 1}})


def search(zoo: Any, experts: list[str], suite: str, out: Path, template: str, init: dict[str, float], pick: str,
           args: argparse.Namespace, cost: float, label: str, start_from: Path | None = None) -> dict[str, Any]:
    """CMA-ES over ``template`` from ``init`` (or a fit's genome), one run per seed: a row of their mean test
    scores."""
    slug = "-".join(experts)
    tag = ("rm" if template == RM_SPACE else "ta") + ("-fit" if start_from is not None else "")
    seeds = []
    for seed in range(args.seeds):
        name = f"search-{slug}-{tag}-{pick}-s{seed}"
        run_dir = out / "runs" / name
        opts = {"popsize": 8, "sigma0": 0.1, "x0_first": True, **({"scalarize": "worst"} if pick == "worst" else {})}
        cfg = config(zoo, experts, suite, name, out, template, init, examples=args.examples,
                     own_tasks=args.own_tasks, seed=seed, search={"name": "cma_es", "options": opts},
                     evals=args.search_evals, start_from=start_from)
        t0 = time.perf_counter()
        if not (run_dir / "checkpoint.json").exists():
            start_run(cfg)
        res = RunResults(run_dir)
        best = picked(res, pick)
        seeds.append({"calibration": best.result.task_means(), "test": res.test_scores(best.recipe_hash),
                      "evaluations": len(res.searched), "wall_s": time.perf_counter() - t0,
                      "run_dir": str(run_dir)})
        log.info("%s, seed %d: test %s", label, seed, seeds[-1]["test"])
    mean = {split: {t: float(np.mean([s[split][t] for s in seeds])) for t in experts}
            for split in ("calibration", "test")}
    n = f"{args.seeds} seeds, " if args.seeds > 1 else ""
    return {"label": f"{label}, {n}{args.search_evals} evals, pick {pick}", "scores": mean, "seeds": seeds,
            "cost_evals": cost + float(np.mean([s["evaluations"] for s in seeds]))}


def run_problem(zoo: Any, label: str, experts: list[str], suite: str, args: argparse.Namespace,
                out: Path) -> dict[str, Any]:
    slug, n = "-".join(experts), len(experts)
    first = config(zoo, experts, suite, f"grid-{slug}", out, RM_SPACE, {"scale": 1.0, "alpha": 0.9},
                   examples=args.examples, own_tasks=args.own_tasks)
    prep = preflight(first)
    # every source's Gram matrices on the calibration prompts, computed afresh to time the pass a search runs
    with tempfile.TemporaryDirectory() as tmp:
        _, records = recipe_stats(prep.space.decode(prep.space.x0), prep.cfg.sources, tmp)
    stats_s = sum(r.seconds for r in records)
    files = search_stats(prep, out / "grid")
    worker = Worker(dataclasses.replace(prep.spec, stats_files=files))
    experts_ = {e: score_folder(worker, zoo.expert(e)) for e in experts}
    expert_test = {e: experts_[e]["test"][e] for e in experts}
    expert_cal = {e: experts_[e]["calibration"][e] for e in experts}

    def decoded(template: str, init: dict[str, float]):
        p = preflight(config(zoo, experts, suite, f"grid-{slug}", out, template, init, examples=args.examples,
                                     own_tasks=args.own_tasks))
        return p.space.decode(p.space.x0)

    ta = {lam: score(worker, decoded(TA_SPACE, {"weight": lam})) for lam in GRID}
    eval_s = float(np.mean([w for _, w in ta.values()]))
    best_lam = max(ta, key=lambda lam: np.mean(list(ta[lam][0]["calibration"].values())))
    stats_cost = stats_s / eval_s
    rows = [{"label": f"task arithmetic, best λ={best_lam} (calibration grid, study baseline)",
             "scores": ta[best_lam][0], "cost_evals": len(GRID)}]
    paper = score(worker, decoded(RM_SPACE, {"scale": 1.0, "alpha": 0.9}))[0]
    rows.append({"label": "RegMean, the paper's (scale 1, α=0.9)", "scores": paper, "cost_evals": 1 + stats_cost})
    grid = {(a, round(n * lam, 3)): score(worker, decoded(RM_SPACE, {"scale": n * lam, "alpha": a}))[0]
            for a in ALPHAS for lam in GRID}
    cost = len(GRID) * (len(ALPHAS) + 1) + stats_cost

    def cal_mean(s):
        return float(np.mean(list(rel(s["calibration"], expert_cal).values())))

    def cal_worst(s):
        return min(rel(s["calibration"], expert_cal).values())

    for (a, s), sc in grid.items():
        log.info("%s: regmean α=%s scale=%s: cal %.3f / %.3f", label, a, s, cal_mean(sc), cal_worst(sc))
    by_mean = max(grid, key=lambda k: cal_mean(grid[k]))
    by_worst = max(grid, key=lambda k: (cal_worst(grid[k]), cal_mean(grid[k])))
    rows.append({"label": f"**scaled RegMean**, grid's best mean: α={by_mean[0]}, scale={by_mean[1]}",
                 "scores": grid[by_mean], "cost_evals": cost})
    rows.append({"label": f"**scaled RegMean**, grid's best worst task: α={by_worst[0]}, scale={by_worst[1]}",
                 "scores": grid[by_worst], "cost_evals": cost})
    settings = AdaMergingConfig(objective="likelihood", steps=args.steps, lr=args.lr, subset=args.subset,
                                balance=args.balance)
    how = f"{args.steps} steps, lr {args.lr}, {args.subset} examples per task per step" + (
        f", balance {args.balance:g}" if args.balance is not None else "")
    starts = [(RM_SPACE, {"alpha": by_worst[0], "scale": by_worst[1]}, cost,
               f"regmean-per-layer from α={by_worst[0]}, scale={by_worst[1]}"),
              (TA_SPACE, {"weight": best_lam}, float(len(GRID)), f"task-arithmetic-per-layer from λ={best_lam}")]
    for template, init, spent, what in starts:
        fits = []
        for fs in range(args.fit_seeds):  # the fit's example draws are seeded by the run's seed
            folder = out / (f"fit-{slug}-{'rm' if template == RM_SPACE else 'ta'}" + (f"-s{fs}" if fs else ""))
            if folder.exists() and json.loads((folder / "summary.json").read_text())["settings"] != settings.model_dump():
                raise SystemExit(f"{folder} holds another fit; move it away")
            if not folder.exists():
                run_adamerging(config(zoo, experts, suite, f"fit-{slug}", out, template, init, examples=args.examples,
                                      own_tasks=args.own_tasks, seed=fs), settings, folder)
            fitted = score(worker, Recipe.from_yaml((folder / "recipe.yaml").read_text()))[0]
            fits.append({**fitted, "evaluations": json.loads((folder / "summary.json").read_text())["cost"]["evaluations"],
                         "folder": str(folder)})
        folder = Path(fits[0]["folder"])  # the searches start from the first fit
        fit_cost = float(np.mean([f["evaluations"] for f in fits]))
        mean = {split: {t: float(np.mean([f[split][t] for f in fits])) for t in experts}
                for split in ("calibration", "test")}
        n = f", {args.fit_seeds} seeds" if args.fit_seeds > 1 else ""
        rows.append({"label": f"**likelihood fit** of {what} ({how}{n})", "scores": mean, "seeds": fits,
                     "cost_evals": spent + fit_cost, "folder": str(folder)})
        for pick in ("mean", "worst") if args.search_evals else ():
            rows.append(search(zoo, experts, suite, out, template, init, pick, args, spent + fit_cost,
                               f"CMA-ES over {what.split(' from ')[0]} from the fit", start_from=folder))
        for pick in ("mean", "worst") if args.search_evals else ():
            rows.append(search(zoo, experts, suite, out, template, init, pick, args, spent,
                               f"CMA-ES over {what}" + (" (the study's warm search)" if template == TA_SPACE else "")))
    add_relative(rows, expert_test, expert_cal)
    return {"problem": label, "experts": experts, "expert_test": expert_test, "expert_cal": expert_cal,
            "best_lambda": best_lam, "eval_s": eval_s, "stats_s": stats_s,
            "grid": {f"{a},{s}": v for (a, s), v in grid.items()}, "rows": rows}


def table(results: list[dict[str, Any]], args: argparse.Namespace, zoo: Any) -> str:
    cmd = "python experiments/scaled_regmean.py" + "".join(
        f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(args).items()
        if v is not None and k not in ("zoo", "out") and v != DEFAULTS.get(k))
    own = " (each expert's on its own task's: `data.model_tasks`)" if args.own_tasks else " (every expert's on all tasks)"
    lines = [f"Date {date.today()}, machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"zoo size `{zoo.size.name}` seed {zoo.seed}, statistics on {args.examples} calibration examples per "
             f"task{own}. Command: `{cmd}`.", ""]
    for res in results:
        tasks = res["experts"]
        lines += [f"## {res['problem']}", "",
                  f"One calibration scoring pass: {res['eval_s']:.2f} s; the statistics pass: {res['stats_s']:.1f} s.",
                  "", "| merge | " + " | ".join(tasks) + " | mean rel. | worst rel. | cal. worst rel. | cost (evaluations) |",
                  "|---|" + "---|" * (len(tasks) + 4)]
        for r in res["rows"]:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['scores']['test'][k]:.3f}" for k in tasks) +
                         f" | {pm(r['test_mean'])} | {pm(r['test_worst'])} | {pm(r['cal_worst'])} | "
                         f"{r['cost_evals']:.1f} |")
        lines.append("")
    return "\n".join(lines)


DEFAULTS = {"examples": 64, "seeds": 1, "search_evals": 150, "steps": 40, "lr": 0.03, "subset": 32, "balance": None,
            "own_tasks": False, "fit_seeds": 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=None, help="demo zoo folder (built if missing)")
    ap.add_argument("--real", type=Path, default=None,
                    help="real zoo folder (SmolLM2-135M experts add / order / unit; `evomerge zoo build DIR --size real`)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--examples", type=int, default=DEFAULTS["examples"], help="calibration examples per task")
    ap.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds of each search")
    ap.add_argument("--search-evals", type=int, default=DEFAULTS["search_evals"])
    ap.add_argument("--only", default=None, help="'2' or '3': one problem")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="likelihood fit: Adam steps")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="likelihood fit: learning rate (genome units)")
    ap.add_argument("--subset", type=int, default=DEFAULTS["subset"], help="likelihood fit: examples per task per step")
    ap.add_argument("--balance", type=float, default=DEFAULTS["balance"], help="likelihood fit: task balance")
    ap.add_argument("--fit-seeds", type=int, default=DEFAULTS["fit_seeds"], help="seeds of each likelihood fit")
    ap.add_argument("--own-tasks", action="store_true",
                    help="each expert's Gram matrices on its own task's examples (data.model_tasks), not on all")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    problems, stem = PROBLEMS, "scaled_regmean"
    if args.real is not None:
        from evomerge.testing.real import RealManifest

        if not (args.real / "zoo.json").is_file():
            raise SystemExit(f"--real: {args.real}/zoo.json not found (build it: evomerge zoo build DIR --size real)")
        zoo, problems, stem = RealManifest.load(args.real), REAL_PROBLEMS, "scaled_regmean-real"
    else:
        zoo = build_zoo(args.zoo or REPO / "zoo" / "demo", size="demo", seed=0)
    stem += "-own" if args.own_tasks else ""
    out = args.out or REPO / "experiments" / "results" / "scaled_regmean"
    out.mkdir(parents=True, exist_ok=True)
    results = [run_problem(zoo, label, experts, suite, args, out) for label, (experts, suite) in problems.items()
               if args.only is None or str(len(experts)) == args.only]
    text = table(results, args, zoo)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str))
    (out / f"{stem}.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
