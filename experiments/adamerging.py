"""AdaMerging on the study's 2- and 3-expert problems: held-out mean and worst task relative to the experts.

    python experiments/adamerging.py                      # demo zoo, both problems, fit + warm-started search
    python experiments/adamerging.py --search-evals 0     # the fits only
    python experiments/adamerging.py --objective likelihood   # fitted to the reference answers (supervised)

For each problem (the study's: zoo-2 with add, rev; zoo with add, rev, sort) it fits the per-layer, per-module-kind
task-arithmetic space (``builtin:task-arithmetic-per-layer``, the space of the study's warm CMA-ES) by AdaMerging
(``evomerge.driver.adamerging``: Adam on the prediction entropy of the merged model's own greedy answers to the
unlabeled calibration prompts, or with ``--objective likelihood`` on the negative log-likelihood of the calibration
set's reference answers), from two starts: the template's plain start (every weight 1/n) and task arithmetic
at the best λ of the study's calibration grid (the grid costs its 5 evaluations). Then a CMA-ES search of the same
space starts from the fitted genome (``space.start_from``; popsize 8, sigma0 0.1, x0 evaluated first), scalarized
by the mean over tasks and by the worst task, as the study's warm searches. Every merge is reported on the
held-out test split relative to each task's expert (score / the expert's test score); the fit's cost is stated in
evaluations (its wall time over the wall time of one calibration scoring pass, measured in the same process).
Results: ``experiments/results/adamerging.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evomerge.config import RunConfig
from evomerge.driver.adamerging import START_FILE, AdaMerging, AdaMergingConfig, write_fit
from evomerge.driver.pool import Job
from evomerge.driver.run import preflight, start_run
from evomerge.driver.worker import Worker
from evomerge.recipe import Recipe
from evomerge.results import RunResults
from evomerge.testing.zoo import build_zoo

log = logging.getLogger("adamerging")
REPO = Path(__file__).resolve().parents[1]
TEMPLATE = "builtin:task-arithmetic-per-layer"
SPACE = {"template": TEMPLATE}  # the fitted and searched space (--template)
GRID = (0.3, 0.5, 0.7, 0.9, 1.1)
PROBLEMS = {"2 experts (add, rev)": (["add", "rev"], "builtin:zoo-2"),
            "3 experts (add, rev, sort)": (["add", "rev", "sort"], "builtin:zoo")}


def config(zoo: Any, experts: list[str], suite: str, name: str, out: Path, *, seed: int = 0, init: float | None = None,
           start_from: str | None = None, search: dict[str, Any] | None = None, evals: int = 1) -> RunConfig:
    space: dict[str, Any] = {"template": SPACE["template"]}
    if init is not None:
        space["overrides"] = {"init": {"weight": init}}
    if start_from is not None:
        space["start_from"] = start_from
    return RunConfig.model_validate({
        "name": name, "seed": seed, "output_dir": str(out / "runs"),
        "sources": {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in experts}}, "base_model": "base",
        "space": space, "fitness": {"suite": suite, "scorer": "hf", "batch_size": 200},
        "optimizer": search or {"name": "cma_es"}, "budget": {"evaluations": evals},
        "resources": {"threads_per_worker": 1}})


def score(worker: Worker, recipe: Recipe) -> tuple[dict[str, dict[str, float]], float]:
    """Calibration and test means of ``recipe``, and the wall time of its calibration scoring."""
    out, wall = {}, 0.0
    for split in ("calibration", "test"):
        t0 = time.perf_counter()
        res = worker.evaluate(Job(key=0, candidate_id=-1, recipe=recipe, split=split))
        if split == "calibration":
            wall = time.perf_counter() - t0
        if not res.ok:
            raise SystemExit(f"scoring failed: {res.error}")
        out[split] = res.task_means()
    return out, wall


def score_folder(worker: Worker, path: Path) -> dict[str, dict[str, float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return {split: worker.scorer.score(model, worker.tokenizer, worker.suite, split=split).means()
            for split in ("calibration", "test")}


def rel(means: dict[str, float], experts: dict[str, float]) -> dict[str, float]:
    return {t: means[t] / experts[t] for t in experts}


def picked(res: RunResults, pick: str) -> Any:
    """A finished search's pick: its best by the run's own scalarization (``mean``), or the candidate with the
    best worst task relative to the experts on calibration, ties by the mean (``worst``)."""
    if pick != "worst":
        return res.best()

    def key(r):
        v = list(res.relative_to_expert(r.result.task_means()).values())
        return (min(v), float(np.mean(v)))
    return max(res.searched, key=key)


def add_relative(rows: list[dict[str, Any]], expert_test: dict[str, float], expert_cal: dict[str, float]) -> None:
    """Each row's scores relative to the experts: per task on test, and mean / worst per seed (test, calibration)."""
    for r in rows:
        runs = r.get("seeds", [r["scores"]])
        r["test_rel"] = rel(r["scores"]["test"], expert_test)
        r["cal_rel"] = rel(r["scores"]["calibration"], expert_cal)
        r["test_worst"] = [min(rel(x["test"], expert_test).values()) for x in runs]
        r["test_mean"] = [float(np.mean(list(rel(x["test"], expert_test).values()))) for x in runs]
        r["cal_worst"] = [min(rel(x["calibration"], expert_cal).values()) for x in runs]


def run_problem(zoo: Any, label: str, experts: list[str], suite: str, args: argparse.Namespace,
                out: Path) -> dict[str, Any]:
    slug = "-".join(experts)
    cfg = config(zoo, experts, suite, f"fit-{slug}", out)
    prep = preflight(cfg)
    worker = Worker(prep.spec)
    expert_scores = {e: score_folder(worker, zoo.expert(e)) for e in experts}
    expert_test = {e: expert_scores[e]["test"][e] for e in experts}
    expert_cal = {e: expert_scores[e]["calibration"][e] for e in experts}

    def ta(lam: float) -> Recipe:
        return Recipe(method="task_arithmetic", base_model="base",
                      models=tuple({"model": e, "parameters": {"weight": lam}} for e in experts))

    grid = {lam: score(worker, ta(lam))[0] for lam in GRID}
    best_lam = max(grid, key=lambda lam: np.mean(list(grid[lam]["calibration"].values())))
    rows: list[dict[str, Any]] = [
        {"label": f"task arithmetic, best λ={best_lam} (calibration grid, study baseline)",
         "scores": grid[best_lam], "cost_evals": len(GRID)}]
    entropy = args.objective == "entropy"
    settings = AdaMergingConfig(objective=args.objective, steps=args.steps, lr=args.lr, subset=args.subset,
                                balance=args.balance, **({"refresh": args.refresh} if entropy else {}))
    tag = ("" if entropy else "-nll") + ("" if args.template == TEMPLATE else "-" + args.template.split(":")[-1])
    starts = [(s, i) for s, i, key in (("1/n", None, "1/n"), (f"λ={best_lam}", best_lam, "grid"))
              if key in args.starts.split(",")]
    for start, init in starts:
        scfg = config(zoo, experts, suite, f"fit-{slug}", out, init=init)
        sprep = preflight(scfg)
        fitter = AdaMerging(sprep.space, worker, settings, seed=0, batch_size=200)
        x0_scores, eval_s = score(worker, sprep.space.decode(sprep.space.x0))
        fit = fitter.fit()
        fit.cost.eval_s = eval_s
        fit.cost.evaluations = fit.cost.fit_s / eval_s
        fitted, _ = score(worker, fit.recipe)
        folder = out / f"fit-{slug}-{'n' if init is None else 'grid'}{tag}"
        folder.mkdir(parents=True, exist_ok=True)
        write_fit(folder, fit, settings, sprep.space, {"start": x0_scores["calibration"],
                                                      "fitted": fitted["calibration"]})
        extra = 0 if init is None else len(GRID)
        rows.append({"label": f"start of the fit: task arithmetic, weight {init or f'1/{len(experts)}'}",
                     "scores": x0_scores, "cost_evals": extra})
        name = "AdaMerging" if entropy else "AdaMerging on the answers' likelihood"
        rows.append({"label": f"**{name}** from {start} ({args.steps} steps, lr {args.lr}"
                     + (f", balance {args.balance:g})" if args.balance is not None else ")"), "scores": fitted,
                     "cost_evals": extra + fit.cost.evaluations, "loss": [fit.history[0]["loss"],
                                                                          fit.history[-1]["loss"]],
                     "fit": {"wall_s": fit.cost.fit_s, "eval_s": eval_s, "generation_passes": fit.cost.generation_passes,
                             "gradient_passes": fit.cost.gradient_passes}, "folder": str(folder)})
        log.info("%s: %s from %s: test %s (%s %.4f -> %.4f, %.1f evaluations)", label, name, start,
                 fitted["test"], args.objective, fit.history[0]["loss"], fit.history[-1]["loss"],
                 fit.cost.evaluations)
        for pick in (("mean", "worst") if args.search_evals and init is not None else ()):
            rows += search_rows(zoo, experts, suite, out, init, folder / START_FILE, pick, args,
                                extra + fit.cost.evaluations, f"CMA-ES from {name} ({start})", tag)
    for pick in ("mean", "worst") if args.search_evals else ():  # the study's warm search, on this zoo
        rows += search_rows(zoo, experts, suite, out, best_lam, None, pick, args, len(GRID),
                            f"CMA-ES from task arithmetic λ={best_lam} (the study's warm search)")
    add_relative(rows, expert_test, expert_cal)
    return {"problem": label, "experts": experts, "expert_test": expert_test, "expert_cal": expert_cal,
            "best_lambda": best_lam, "rows": rows}


def search_rows(zoo: Any, experts: list[str], suite: str, out: Path, init: float, start: Path | None, pick: str,
                args: argparse.Namespace, cost: float, label: str, tag: str = "") -> list[dict[str, Any]]:
    """Warm CMA-ES searches of the space (from a fitted genome, or from the template's start at ``init``), one per
    seed: one row holding their mean test scores per task and each seed's row."""
    slug = "-".join(experts)
    seeds = []
    for seed in range(args.seeds):
        name = f"search-{slug}-{'ada' + tag if start else 'ta'}-{pick}" + (f"-s{seed}" if seed else "")
        run_dir = out / "runs" / name
        search = {"name": "cma_es", "options": {"popsize": 8, "sigma0": 0.1, "x0_first": True,
                                                **({"scalarize": "worst"} if pick == "worst" else {})}}
        qcfg = config(zoo, experts, suite, name, out, seed=seed, init=init,
                      start_from=str(start) if start else None, search=search, evals=args.search_evals)
        if not (run_dir / "checkpoint.json").exists():
            start_run(qcfg)
        res = RunResults(run_dir)
        best = picked(res, pick)
        seeds.append({"calibration": best.result.task_means(), "test": res.test_scores(best.recipe_hash),
                      "evaluations": len(res.searched), "run_dir": str(run_dir)})
        log.info("%s, seed %d: test %s", label, seed, seeds[-1]["test"])
    mean = {split: {t: float(np.mean([s[split][t] for s in seeds])) for t in experts}
            for split in ("calibration", "test")}
    n = f"{args.seeds} seeds, " if args.seeds > 1 else ""
    return [{"label": f"{label}, {n}{args.search_evals} evals, pick {pick}", "scores": mean, "seeds": seeds,
             "cost_evals": cost + float(np.mean([s["evaluations"] for s in seeds]))}]


def pm(values: list[float]) -> str:
    """A value, or the mean ± std over seeds."""
    return f"{values[0]:.3f}" if len(values) == 1 else f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(results: list[dict[str, Any]], args: argparse.Namespace, zoo: Any) -> str:
    cmd = "python experiments/adamerging.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v is not None and k not in ("zoo", "out") and v != DEFAULTS.get(k))
    lines = [f"Date {date.today()}, machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
             f"zoo size `{zoo.size.name}` seed {zoo.seed}. Command: `{cmd}`.", ""]
    for res in results:
        tasks = res["experts"]
        lines += [f"## {res['problem']}", "", "| merge | " + " | ".join(tasks) +
                  " | mean rel. | worst rel. | cal. worst rel. | cost (evaluations) |",
                  "|---|" + "---|" * (len(tasks) + 4)]
        for r in res["rows"]:
            lines.append(f"| {r['label']} | " + " | ".join(f"{r['scores']['test'][k]:.3f}" for k in tasks) +
                         f" | {pm(r['test_mean'])} | {pm(r['test_worst'])} | {pm(r['cal_worst'])} | "
                         f"{r['cost_evals']:.1f} |")
        lines.append("")
    return "\n".join(lines)


DEFAULTS = {"template": TEMPLATE, "starts": "1/n,grid", "objective": "entropy", "steps": 30, "lr": 0.01, "refresh": 3, "subset": None, "balance": None, "seeds": 1, "search_evals": 150}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (built if missing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--objective", choices=("entropy", "likelihood"), default=DEFAULTS["objective"])
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--refresh", type=int, default=DEFAULTS["refresh"])
    ap.add_argument("--subset", type=int, default=DEFAULTS["subset"])
    ap.add_argument("--balance", type=float, default=DEFAULTS["balance"])
    ap.add_argument("--seeds", type=int, default=DEFAULTS["seeds"], help="seeds of each search")
    ap.add_argument("--search-evals", type=int, default=DEFAULTS["search_evals"])
    ap.add_argument("--only", default=None, help="'2' or '3': one problem")
    ap.add_argument("--template", default=DEFAULTS["template"],
                    help="the fitted space (a task-arithmetic weight space, e.g. builtin:task-arithmetic-per-projection)")
    ap.add_argument("--starts", default=DEFAULTS["starts"], help="which fits: 1/n, grid (task arithmetic at the best λ)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    SPACE["template"] = args.template
    zoo = build_zoo(args.zoo or REPO / "zoo" / "demo", size="demo", seed=0)
    out = args.out or REPO / "experiments" / "results" / "adamerging"
    out.mkdir(parents=True, exist_ok=True)
    results = [run_problem(zoo, label, experts, suite, args, out) for label, (experts, suite) in PROBLEMS.items()
               if args.only is None or str(len(experts)) == args.only]
    text = table(results, args, zoo)
    (out / "adamerging.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "adamerging.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
