"""Data-informed merges as baselines on the study's problems: fisher, regmean, AIM on top, LEWIS densities.

    python experiments/data_informed.py --zoo ZOO   # the demo zoo (built if missing), 2 and 3 experts

For each problem (the study's 2- and 3-expert problems, same suites) it scores on calibration and the held-out
test split, with the study's hf scorer: task arithmetic at the best λ of the study's grid (the reference),
`fisher` (Fisher-weighted averaging of the full models), `regmean` (α = 0.9; other tensors by task arithmetic at
the best λ), each with AIM (ω = 0.4) on top, TIES at density 0.5 with the best λ, and TIES with LEWIS's per-layer
densities (mean 0.5). The statistics come from each task's calibration prompts (`data.examples` per task) and are
computed once per model (cached); their one-off cost is reported in evaluations (its wall time over one
calibration scoring pass of a merge, measured in the same process). Results: ``experiments/results/data_informed.md``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from study import REPO, TA_GRID, Scorer, problems

from evomerge.merge.lewis import lewis_recipe
from evomerge.merge.materialize import materialize_state_dict
from evomerge.merge.stats import MergeStats, calibration_requests, load_or_collect, recipe_stats
from evomerge.recipe import DataSpec, Recipe
from evomerge.scoring.suite import load_suite
from evomerge.testing.zoo import build_zoo


def score(sc: Scorer, recipe: Recipe, stats=None) -> dict[str, dict[str, float]]:
    sd = materialize_state_dict(recipe, sc.paths, stats=stats)
    with torch.no_grad():
        for n, p in sc.model.named_parameters():
            p.copy_(sd[n])
    return sc._score(sc.model)


def rel(means: dict[str, float], experts: dict[str, float]) -> tuple[float, float]:
    r = [means[t] / experts[t] for t in experts]
    return float(np.mean(r)), float(min(r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / "zoo" / "demo")
    ap.add_argument("--examples", type=int, default=64, help="calibration examples per task for the statistics")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "data_informed.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = build_zoo(args.zoo, size="demo", seed=0)
    lines = ["# Data-informed merges on the study's problems", "",
             f"Command: `python experiments/data_informed.py --zoo ZOO --examples {args.examples}` (demo zoo, seed 0, "
             "one torch thread). Held-out test split, relative to each task's expert (mean over tasks / worst task); "
             "*cal.* the same on calibration. Statistics: the calibration prompts and reference answers of every task, "
             f"{args.examples} per task; *cost* = the statistics pass's wall time over one calibration scoring pass.", ""]
    out_json = {}
    for prob in problems(False)[:2]:
        sc = Scorer(zoo, prob.suite, prob.experts)
        experts_test = {t: sc.folder(t)["test"][t] for t in prob.experts}
        experts_cal = {t: sc.folder(t)["calibration"][t] for t in prob.experts}
        sources = {"base": sc.paths["base"], **{e: sc.paths[e] for e in prob.experts}}

        def ta(lam: float, method: str = "task_arithmetic", sources=sources, prob=prob, **params) -> Recipe:
            return Recipe(method=method, base_model="base", sources=sources,
                          models=tuple({"model": e, "parameters": {"weight": lam, **params}} for e in prob.experts))

        t0 = time.perf_counter()
        grid = {lam: score(sc, ta(lam)) for lam in TA_GRID}
        one_pass = (time.perf_counter() - t0) / len(TA_GRID) / 2  # calibration + test per grid point
        lam = max(grid, key=lambda x: np.mean(list(grid[x]["calibration"].values())))
        data = {"suite": prob.suite, "examples": args.examples}
        rows: dict[str, tuple[dict, float]] = {f"task arithmetic, best λ={lam} (reference)": (grid[lam], 0.0)}
        stats_dir = args.zoo / "stats"
        recipes = {
            "fisher": Recipe(method="fisher", base_model="base", sources=sources, data=data,
                             models=tuple({"model": e} for e in prob.experts)),
            "regmean α=0.9": Recipe(method="regmean", base_model="base", sources=sources, parameters={"alpha": 0.9},
                                    data={**data, "fallback": "task_arithmetic"},
                                    models=tuple({"model": e, "parameters": {"weight": lam}} for e in prob.experts)),
        }
        for name, r in list(recipes.items()):
            recipes[f"{name} + AIM ω=0.4"] = r.model_copy(update={"data": r.data.model_copy(update={"aim": 0.4})})
        for name, r in recipes.items():
            stats, records = recipe_stats(r, sources, stats_dir)
            cost = sum(rec.seconds for rec in records if rec.computed) / one_pass
            rows[name] = (score(sc, r, stats), cost)
        ties = ta(lam, "ties", density=0.5)
        rows["ties d=0.5, λ* weights"] = (score(sc, ties), 0.0)
        reqs = calibration_requests(load_suite(prob.suite), sc.tok, DataSpec(**data))
        acts, cost = {}, 0.0
        for m, path in sources.items():  # every model's input activations (LEWIS)
            acts[m], rec = load_or_collect(path, reqs, ("act",), stats_dir)
            cost += rec.seconds / one_pass if rec.computed else 0.0
        lew = lewis_recipe(ties, MergeStats(acts), sc.model.config.num_hidden_layers, density=0.5,
                           model_type=sc.model.config.model_type)
        rows["ties, LEWIS per-layer densities (mean 0.5), λ* weights"] = (score(sc, lew), cost)
        lines += [f"## {prob.name}", "", "| merge | " + " | ".join(prob.experts)
                  + " | mean rel. | worst rel. | cal. mean rel. | cal. worst rel. | statistics cost (evaluations) |",
                  "|---|" + "---|" * (len(prob.experts) + 5)]
        out_json[prob.name] = {}
        for name, (s, cost) in rows.items():
            m, w = rel(s["test"], experts_test)
            cm, cw = rel(s["calibration"], experts_cal)
            lines.append(f"| {name} | " + " | ".join(f"{s['test'][t]:.3f}" for t in prob.experts)
                         + f" | {m:.3f} | {w:.3f} | {cm:.3f} | {cw:.3f} | {cost:.1f} |")
            out_json[prob.name][name] = {"scores": s, "test_rel": [m, w], "cal_rel": [cm, cw], "cost": cost}
        lines.append("")
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(out_json, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
