"""The search-quality study: evolved merges vs hand-set merges on the tiny zoo, several optimizers and seeds.

    python experiments/study.py            # the full study (demo zoo, 3 seeds, 150 evaluations per search)
    python experiments/study.py --quick    # a reduced table in a few minutes (test zoo, 1 seed, 20 evaluations)

For each problem (2 experts, 3 experts, layer routing over 2 experts) it scores the baselines (base, each
expert, the multitask model as an upper reference, task arithmetic at λ = 1 and at the best λ of a grid chosen
on calibration, TIES and DARE-TIES at density 0.5, SLERP t = 0.5 between two experts), then runs every search
with equal budgets through the real driver (`evomerge.driver.run.start_run`, LocalPool), and reports for the
best candidate (by calibration score) its held-out test score per task, relative to each task's expert (score /
expert score: 1.0 = as good as the expert), mean and worst task; the evaluations needed to reach 0.95 of the
experts on calibration (mean and worst task); wall time; and the calibration-vs-test gap.
Results: ``experiments/results/study[-quick].md`` and ``.json``; Pareto plots in each run's ``report/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from evomerge.archive import Archive
from evomerge.driver.run import start_run
from evomerge.recipe import Recipe
from evomerge.testing.zoo import ZooManifest, build_zoo

log = logging.getLogger("study")
REPO = Path(__file__).resolve().parents[1]


@dataclass
class Problem:
    name: str
    experts: list[str]
    suite: str
    template: str
    searches: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (label, optimizer, options)


def problems(quick: bool) -> list[Problem]:
    ps_searches = [
        ("cma_es", "cma_es", {"popsize": 8, "sigma0": 0.25}),
        ("nevergrad", "nevergrad", {"optimizer": "TwoPointsDE"}),
        ("random", "random", {}),
    ]
    out = [
        Problem("2 experts (add, rev)", ["add", "rev"], "builtin:zoo-2", "builtin:ties-per-layer",
                ps_searches + [("m2n2", "m2n2", {"archive_size": 12})]),
        Problem("3 experts (add, rev, sort)", ["add", "rev", "sort"], "builtin:zoo", "builtin:ties-per-layer",
                ps_searches + [("m2n2", "m2n2", {"archive_size": 12})]),
        Problem("routing (add, rev)", ["add", "rev"], "builtin:zoo-2", "builtin:dfs-routing",
                [("cma_es", "cma_es", {"popsize": 8, "sigma0": 0.2}), ("random", "random", {})]),
    ]
    return out[:1] if quick else out


# ------------------------------------------------------------------ scoring helpers for extra baselines
class Scorer:
    """Scores recipes and folders on calibration and test with the hf scorer (baselines outside the search)."""

    def __init__(self, zoo: ZooManifest, suite: str, experts: list[str]) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from evomerge.scoring.base import make_scorer
        from evomerge.scoring.suite import load_suite

        self.zoo = zoo
        self.paths = {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in experts},
                      "multitask": str(zoo.multitask)}
        self.suite = load_suite(suite)
        self.scorer = make_scorer("hf", batch_size=200)
        self.tok = AutoTokenizer.from_pretrained(zoo.base)
        self.model = AutoModelForCausalLM.from_pretrained(zoo.base)

    def _score(self, model) -> dict[str, dict[str, float]]:
        return {split: self.scorer.score(model, self.tok, self.suite, split=split).means()
                for split in ("calibration", "test")}

    def folder(self, name: str) -> dict[str, dict[str, float]]:
        from transformers import AutoModelForCausalLM

        return self._score(AutoModelForCausalLM.from_pretrained(self.paths[name]))

    def recipe(self, recipe: Recipe) -> dict[str, dict[str, float]]:
        from evomerge.merge.materialize import materialize_state_dict

        sd = materialize_state_dict(recipe, self.paths)
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                p.copy_(sd[n])
        return self._score(self.model)


def extra_baselines(sc: Scorer, experts: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {"multitask (upper ref.)": sc.folder("multitask")}

    def ta(lam: float) -> Recipe:
        return Recipe(method="task_arithmetic", base_model="base",
                      models=tuple({"model": e, "parameters": {"weight": lam}} for e in experts))

    grid = {lam: sc.recipe(ta(lam)) for lam in (0.3, 0.5, 0.7, 0.9, 1.1)}
    best = max(grid, key=lambda lam: np.mean(list(grid[lam]["calibration"].values())))
    out[f"task arithmetic, best λ={best} (calibration)"] = grid[best]
    if len(experts) == 2:
        out["slerp t=0.5 (expert to expert)"] = sc.recipe(Recipe(
            method="slerp", base_model=experts[0], models=({"model": experts[1]},), parameters={"t": 0.5}))
    return out


# ------------------------------------------------------------------ one search
def run_search(zoo: ZooManifest, prob: Problem, label: str, opt: str, options: dict, seed: int, evals: int,
               out_dir: Path) -> dict[str, Any]:
    from evomerge.results import RunResults

    name = f"{prob.template.split(':')[-1]}-{'-'.join(prob.experts)}-{label}-s{seed}"
    template = "builtin:segments" if opt == "m2n2" else prob.template
    cfg = {
        "name": name, "seed": seed, "output_dir": str(out_dir / "runs"),
        "sources": {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in prob.experts}},
        "base_model": "base", "space": {"template": template},
        "fitness": {"suite": prob.suite, "scorer": "hf", "batch_size": 200},
        "optimizer": {"name": opt, "options": options}, "budget": {"evaluations": evals},
        "resources": {"threads_per_worker": 1},
    }
    path = out_dir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = out_dir / "runs" / name
    t0 = time.perf_counter()
    if not (run_dir / "checkpoint.json").exists():
        start_run(path)
    from evomerge.events import read_events

    evs = read_events(run_dir / "events.jsonl")  # the run's own wall time (also when it was run earlier)
    wall = evs[-1]["t"] - evs[0]["t"] if len(evs) > 1 else time.perf_counter() - t0
    res = RunResults(run_dir)
    from evomerge.archive.report import write_report

    write_report(run_dir)
    tasks = res.tasks
    searched = [r for r in res.calib if r.candidate_id >= 0]
    best = res.best()
    rel_cal = [res.relative_to_expert(r.result.task_means()) if r.ok else None for r in searched]
    mean_so_far = np.maximum.accumulate([np.mean(list(x.values())) if x else -np.inf for x in rel_cal])
    worst_so_far = np.maximum.accumulate([min(x.values()) if x else -np.inf for x in rel_cal])

    def first(arr, thr):
        hit = np.flatnonzero(np.asarray(arr) >= thr)
        return int(hit[0]) + 1 if hit.size else None

    test = res.test_scores(best.recipe_hash) if best else None
    cal = best.result.task_means() if best else None
    return {
        "problem": prob.name, "search": label, "seed": seed, "evaluations": len(searched), "wall_s": wall,
        "tasks": tasks, "expert_cal": res.high,
        "best_cal": cal, "best_test": test,
        "best_test_rel": res.relative_to_expert(test) if test else None,
        "best_cal_rel": res.relative_to_expert(cal) if cal else None,
        "evals_to_095_mean": first(mean_so_far, 0.95), "evals_to_095_worst": first(worst_so_far, 0.95),
        "run_dir": str(run_dir),
        "baselines": {(f"expert {row.name}" if row.kind == "source" else row.name):
                      {"calibration": row.calibration, "test": row.test, "kind": row.kind}
                      for row in res.rows(front=False) if row.kind != "searched"},
    }


# ------------------------------------------------------------------ report
def _rel(means: dict[str, float], experts_test: dict[str, float], tasks: list[str]) -> tuple[float, float]:
    rel = [means[t] / experts_test[t] if experts_test[t] > 0 else float("nan") for t in tasks]
    return float(np.mean(rel)), float(np.min(rel))


def fmt(x: float | None, p: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{p}f}"


def write_tables(results: list[dict], extras: dict[str, dict], args, zoo: ZooManifest, out: Path) -> str:
    lines = [f"# Search-quality study ({'quick' if args.quick else 'full'})", "",
             f"Date {date.today()}, machine: {platform.machine()} {platform.processor() or ''}, "
             f"{__import__('os').cpu_count()} CPUs, torch {torch.__version__}, zoo size `{zoo.size.name}` seed "
             f"{zoo.seed}. Command: `python experiments/study.py{' --quick' if args.quick else ''}`.", "",
             "Scores are exact match on the **held-out test split**; *rel.* = score / the task's expert's test "
             "score (1.0 = as good as the expert). Searches: mean ± std over seeds of the best candidate (chosen "
             "on calibration). *evals to 0.95*: evaluations until the best candidate so far reaches 0.95 of the "
             "experts on calibration (mean over tasks / worst task); — = not reached within the budget.", ""]
    for prob_name in dict.fromkeys(r["problem"] for r in results):
        rs = [r for r in results if r["problem"] == prob_name]
        tasks = rs[0]["tasks"]
        base_rows = dict(rs[0]["baselines"])
        base_rows.update(extras.get(prob_name, {}))
        expert_test = {}
        for t in tasks:
            vals = [v["test"][t] for v in base_rows.values() if v.get("kind") == "source" and v.get("test")]
            expert_test[t] = max(vals) if vals else rs[0]["expert_cal"][t]
        lines += [f"## {prob_name}", "", "| model | " + " | ".join(tasks) + " | mean rel. | worst rel. | evals to 0.95 (mean / worst) | wall s | cal.−test gap (mean rel.) |",
                  "|---|" + "---|" * (len(tasks) + 5)]
        best_hand = -np.inf
        for name, v in base_rows.items():
            if not v.get("test"):
                continue
            m, w = _rel(v["test"], expert_test, tasks)
            if v.get("kind", "handset") == "handset" and not name.startswith("multitask"):
                best_hand = max(best_hand, m)
            lines.append(f"| {name} | " + " | ".join(fmt(v["test"][t]) for t in tasks) + f" | {fmt(m)} | {fmt(w)} | | | |")
        for label in dict.fromkeys(r["search"] for r in rs):
            group = [r for r in rs if r["search"] == label and r["best_test"]]
            if not group:
                continue
            per = np.array([[r["best_test"][t] for t in tasks] for r in group])
            rel = np.array([_rel(r["best_test"], expert_test, tasks) for r in group])
            cal_rel = np.array([np.mean([r["best_cal"][t] / r["expert_cal"][t] if r["expert_cal"][t] > 0 else np.nan
                                         for t in tasks]) for r in group])
            e_mean = [r["evals_to_095_mean"] for r in group]
            e_worst = [r["evals_to_095_worst"] for r in group]
            def ev(v):  # noqa: E306
                hit = [x for x in v if x is not None]
                return f"{np.mean(hit):.0f} ({len(hit)}/{len(v)})" if hit else "—"
            lines.append(
                f"| **evolved: {label}** ({len(group)} seeds, {group[0]['evaluations']} evals) | "
                + " | ".join(f"{per[:, j].mean():.3f} ± {per[:, j].std():.3f}" for j in range(len(tasks)))
                + f" | {rel[:, 0].mean():.3f} ± {rel[:, 0].std():.3f} | {rel[:, 1].mean():.3f} | {ev(e_mean)} / {ev(e_worst)}"
                + f" | {np.mean([r['wall_s'] for r in group]):.0f} | {np.mean(cal_rel - rel[:, 0]):+.3f} |")
        lines += ["", f"Best hand-set merge, mean rel.: {fmt(best_hand)}.", ""]
    text = "\n".join(lines) + "\n"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (built if missing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--evals", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    size = "test" if args.quick else "demo"
    zoo_dir = args.zoo or REPO / "zoo" / size
    zoo = build_zoo(zoo_dir, size=size, seed=0)
    out = args.out or REPO / "experiments" / "results" / ("study-quick" if args.quick else "study")
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or (1 if args.quick else 3)
    evals = args.evals or (20 if args.quick else 150)
    results, extras = [], {}
    for prob in problems(args.quick):
        sc = Scorer(zoo, prob.suite, prob.experts)
        extras[prob.name] = extra_baselines(sc, prob.experts)
        for label, opt, options in prob.searches:
            for seed in range(seeds):
                r = run_search(zoo, prob, label, opt, options, seed, evals, out)
                log.info("%s / %s / seed %d: test %s (%.0f s)", prob.name, label, seed, r["best_test"], r["wall_s"])
                results.append(r)
    text = write_tables(results, extras, args, zoo, out)
    name = "study-quick" if args.quick else "study"
    (REPO / "experiments" / "results" / f"{name}.md").write_text(text) if args.out is None else None
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"results": results, "extras": extras}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
