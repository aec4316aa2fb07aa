"""The search-quality study: evolved merges vs hand-set merges on the tiny zoo, several optimizers and seeds.

    python experiments/study.py            # the full study (demo zoo, 3 seeds, 150 evaluations per search)
    python experiments/study.py --quick    # a reduced table in a few minutes (test zoo, 1 seed, 20 evaluations)

For each problem (2 experts, 3 experts, layer routing over 2 experts) it scores the baselines (base, each
expert, the multitask model as an upper reference, task arithmetic at λ = 1 and at the best λ of a grid chosen
on calibration, TIES and DARE-TIES at density 0.5, SLERP t = 0.5 between two experts), then runs every search
with equal budgets through the real driver (`evomerge.driver.run.start_run`, LocalPool):

* cold searches from the template's plain hand-set merge (CMA-ES, nevergrad, random over per-layer TIES);
* M2N2 over per-segment combinations of the seeds (its archive starts with task-arithmetic children);
* warm-started CMA-ES over per-layer, per-module-kind task arithmetic whose x0 is task arithmetic at the best
  λ of the calibration grid (the grid's 5 evaluations are not counted in the search's budget), scalarized by
  the mean over tasks and, for balanced merges, by the worst task.

For the best candidate of each run (chosen on calibration by the run's own scalarization: mean normalized
score, or worst task relative to the expert) it reports the held-out test score per task, relative to each
task's expert (score / expert score: 1.0 = as good as the expert), mean and worst task; the evaluations needed
to reach 0.95 of the experts on calibration (mean and worst task) and to reach the calibration score of task
arithmetic at the best λ; wall time; and the calibration-vs-test gap. Nothing is tuned on the test split.
Results: ``experiments/results/study[-quick].md``, ``.json`` and ``study[-quick]-pareto.png`` (calibration
scores of every 2-task search, seed 0, with the hand-set merges); per-run reports in each run's ``report/``.
The tables and plots are made by ``study_report.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from study_report import plot_fronts, write_tables

from evomerge.driver.run import start_run
from evomerge.recipe import Recipe
from evomerge.testing.zoo import ZooManifest, build_zoo

log = logging.getLogger("study")
REPO = Path(__file__).resolve().parents[1]


WARM_TEMPLATE = "builtin:task-arithmetic-per-layer"


@dataclass(frozen=True)
class Search:
    """One search of a problem: optimizer, options, and the space when it is not the problem's own."""

    label: str  # file-name safe; also the table label
    optimizer: str
    options: dict[str, Any]
    template: str | None = None  # None: the problem's template
    overrides: dict[str, Any] = field(default_factory=dict)
    warm: bool = False  # x0 = task arithmetic at the best λ of the calibration grid (init.weight)
    note: str = ""
    budget: int = 1  # multiple of the problem's evaluation budget (longer runs for the goals' comparisons)
    start_from: str | None = None  # space.start_from: a recipe YAML whose encoding is the optimizer's start
    # AdaMerging settings (evomerge.driver.adamerging.AdaMergingConfig): the search starts at a gradient fit of
    # the space run first (per seed), whose cost in evaluations (its wall time over one calibration scoring
    # pass, rounded up) is taken from the search's budget and added to its evaluation counts
    fit: dict[str, Any] | None = None

    @property
    def pick(self) -> str:
        """How the run's best candidate is chosen on calibration: ``mean`` or ``worst``."""
        return "worst" if self.options.get("scalarize") == "worst" else "mean"


@dataclass
class Problem:
    name: str
    experts: list[str]
    suite: str
    template: str
    searches: list[Search] = field(default_factory=list)


def problems(quick: bool) -> list[Problem]:
    m2n2 = Search("m2n2", "m2n2", {"archive_size": 16}, template="builtin:segments", note="segments")
    warm = {"popsize": 8, "sigma0": 0.1, "x0_first": True}
    ps_searches = [
        Search("cma_es", "cma_es", {"popsize": 8, "sigma0": 0.25}, note="per-layer TIES"),
        Search("nevergrad", "nevergrad", {"optimizer": "TwoPointsDE"}, note="per-layer TIES"),
        Search("random", "random", {}, note="per-layer TIES"),
        m2n2,
        Search("cma_es-warm", "cma_es", warm, template=WARM_TEMPLATE, warm=True,
               note="per-layer TA, x0 = best λ"),
        Search("cma_es-warm-worst", "cma_es", {**warm, "scalarize": "worst"}, template=WARM_TEMPLATE, warm=True,
               note="per-layer TA, x0 = best λ, worst task"),
        # the same space searched at random (x0 first), 3x as long: evaluations to 0.95 against the warm CMA-ES
        Search("random-warm", "random", {}, template=WARM_TEMPLATE, warm=True, budget=3,
               note="per-layer TA, x0 = best λ, 3x budget"),
        # the warm CMA-ES given 3x the budget: how far it gets when evaluations are not the limit
        Search("cma_es-warm-long", "cma_es", warm, template=WARM_TEMPLATE, warm=True, budget=3,
               note="per-layer TA, x0 = best λ, 3x budget"),
    ]
    out = [
        Problem("2 experts (add, rev)", ["add", "rev"], "builtin:zoo-2", "builtin:ties-per-layer", ps_searches),
        # the 3x runs only where 0.95 is within reach (2 experts): with 3 experts no search gets there
        Problem("3 experts (add, rev, sort)", ["add", "rev", "sort"], "builtin:zoo", "builtin:ties-per-layer",
                [s for s in ps_searches if s.budget == 1]),
        Problem("routing (add, rev)", ["add", "rev"], "builtin:zoo-2", "builtin:dfs-routing",
                [Search("cma_es", "cma_es", {"popsize": 8, "sigma0": 0.2}), Search("random", "random", {}),
                 # routing over a tuned merge and the experts: starts at the merge (x0 runs its own layers)
                 Search("cma_es-hybrid-warm", "cma_es", warm, template="builtin:hybrid-task-arithmetic",
                        warm=True, note="per-layer TA + routing over it and the experts, x0 = best λ")]),
    ]
    return out[:1] if quick else out


def budget_problems(quick: bool) -> list[Problem]:
    """The small-budget block (``--block budget50``): every search in the warm per-layer task-arithmetic space,
    started at task arithmetic at the best λ of the grid, for budgets of tens of evaluations."""
    searches = [
        Search("bo", "bo", {}, template=WARM_TEMPLATE, warm=True, note="GP + qLogNEI, x0 = best λ"),
        Search("bo-tr", "bo", {"trust_region": True}, template=WARM_TEMPLATE, warm=True,
               note="GP + qLogNEI in a trust region, x0 = best λ"),
        Search("optuna-tpe", "optuna", {"sampler": "TPESampler"}, template=WARM_TEMPLATE, warm=True,
               note="TPE, x0 = best λ"),
        Search("cma_es-warm", "cma_es", {"popsize": 8, "sigma0": 0.1, "x0_first": True}, template=WARM_TEMPLATE,
               warm=True, note="x0 = best λ"),
        Search("random-warm", "random", {}, template=WARM_TEMPLATE, warm=True, note="x0 = best λ"),
        # fit-then-search: the likelihood of the calibration answers, 40 Adam steps on 32 examples per task
        # (about 15 evaluations), then bo in a trust region from the fitted genome for the rest of the budget
        Search("fit-bo-tr", "bo", {"trust_region": True}, template=WARM_TEMPLATE, warm=True,
               fit={"objective": "likelihood", "steps": 40, "lr": 0.03, "subset": 32},
               note="likelihood fit from best λ, then GP + qLogNEI in a trust region"),
        Search("fit-cma_es", "cma_es", {"popsize": 8, "sigma0": 0.1, "x0_first": True}, template=WARM_TEMPLATE,
               warm=True, fit={"objective": "likelihood", "steps": 40, "lr": 0.03, "subset": 32},
               note="likelihood fit from best λ, then CMA-ES"),
    ]
    # the 3-expert goal's reference: warm CMA-ES at 3x the budget (150 evaluations) on the same zoo
    long = Search("cma_es-warm-150", "cma_es", {"popsize": 8, "sigma0": 0.1, "x0_first": True},
                  template=WARM_TEMPLATE, warm=True, budget=3, note="x0 = best λ, 3x budget")
    out = [Problem("2 experts (add, rev)", ["add", "rev"], "builtin:zoo-2", WARM_TEMPLATE, searches),
           Problem("3 experts (add, rev, sort)", ["add", "rev", "sort"], "builtin:zoo", WARM_TEMPLATE,
                   [*searches, long])]
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


TA_GRID = (0.3, 0.5, 0.7, 0.9, 1.1)
THREADS = 1  # torch threads of each search's worker (methods_study.py --threads)


def extra_baselines(sc: Scorer, experts: list[str]) -> tuple[dict[str, dict[str, dict[str, float]]], float]:
    """Baselines outside the runs, and the best task-arithmetic λ of :data:`TA_GRID` on calibration."""
    out: dict[str, dict[str, dict[str, float]]] = {"multitask (upper ref.)": sc.folder("multitask")}

    def ta(lam: float) -> Recipe:
        return Recipe(method="task_arithmetic", base_model="base",
                      models=tuple({"model": e, "parameters": {"weight": lam}} for e in experts))

    grid = {lam: sc.recipe(ta(lam)) for lam in TA_GRID}
    best = max(grid, key=lambda lam: np.mean(list(grid[lam]["calibration"].values())))
    out[f"task arithmetic, best λ={best} (calibration)"] = {**grid[best], "kind": "handset", "ta_best": True}
    if len(experts) == 2:
        out["slerp t=0.5 (expert to expert)"] = sc.recipe(Recipe(
            method="slerp", base_model=experts[0], models=({"model": experts[1]},), parameters={"t": 0.5}))
    return out, best


# ------------------------------------------------------------------ one search
def warm_overrides(template: str, lam: float) -> dict[str, Any]:
    """``space.overrides`` that start a template's task-arithmetic weights at ``lam`` (``params.init`` of a
    hybrid template, ``init`` otherwise; overrides replace whole top-level fields, so the rest is copied)."""
    from evomerge.driver.warm import with_start_weight
    from evomerge.spaces.template import load_template

    t = with_start_weight(load_template(template).model_dump(mode="json", exclude_defaults=True), lam)
    return {"params": t["params"]} if t["kind"] == "hybrid" else {"init": t["init"]}


def fit_start(cfg: dict[str, Any], settings: dict[str, Any], folder: Path) -> tuple[int, float]:
    """Fit the search's space by AdaMerging into ``folder`` (once; a finished fit is reread); its cost in
    evaluations, rounded up, and its wall time."""
    import math

    from evomerge.config import RunConfig
    from evomerge.driver.adamerging import AdaMergingConfig, run_adamerging

    if not (folder / "summary.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        run_adamerging(RunConfig.model_validate(cfg), AdaMergingConfig(**settings), folder)
    summary = json.loads((folder / "summary.json").read_text())
    if summary["settings"] != AdaMergingConfig(**settings).model_dump():
        raise SystemExit(f"{folder} holds another fit ({summary['settings']}); move it away")
    return math.ceil(summary["cost"]["evaluations"]), float(summary["cost"]["fit_s"])


def run_search(zoo: ZooManifest, prob: Problem, search: Search, seed: int, evals: int, out_dir: Path,
               ta_best: tuple[float, dict[str, float]]) -> dict[str, Any]:
    """Run (or reread) one search; ``ta_best`` is (λ, calibration means) of task arithmetic at the best λ."""
    from evomerge.events import read_events
    from evomerge.report import write_report
    from evomerge.results import RunResults

    template = search.template or prob.template
    overrides = dict(search.overrides)
    if search.warm:
        overrides.update(warm_overrides(template, ta_best[0]))
    name = f"{prob.template.split(':')[-1]}-{'-'.join(prob.experts)}-{search.label}-s{seed}"
    cfg = {
        "name": name, "seed": seed, "output_dir": str(out_dir / "runs"),
        "sources": {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in prob.experts}},
        "base_model": "base", "space": {"template": template, "overrides": overrides,
                                        **({"start_from": search.start_from} if search.start_from else {})},
        "fitness": {"suite": prob.suite, "scorer": "hf", "batch_size": 200},
        "optimizer": {"name": search.optimizer, "options": search.options},
        "budget": {"evaluations": evals * search.budget},
        "resources": {"threads_per_worker": THREADS},
    }
    spent, fit_s = 0, 0.0
    if search.fit is not None:
        spent, fit_s = fit_start(cfg, search.fit, out_dir / "fits" / name)
        cfg["space"]["start_from"] = str(out_dir / "fits" / name)
        cfg["budget"]["evaluations"] -= spent
    path = out_dir / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = out_dir / "runs" / name
    t0 = time.perf_counter()
    if (run_dir / "checkpoint.json").exists():  # reuse a finished run only when it is the same search
        done = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        for key, sub in (("optimizer", None), ("space", None), ("budget", "evaluations")):
            was, want = done[key], cfg[key]
            if sub is not None:
                was, want = was[sub], want[sub]
            if key == "space":
                was = {"template": was["template"], "overrides": was.get("overrides") or {},
                       **({"start_from": was["start_from"]} if was.get("start_from") else {})}
            if key == "optimizer":  # the resolved config lists every option: compare the ones this search sets
                was = {"name": was["name"], "options": {k: was["options"].get(k) for k in want["options"]}}
            if was != want:
                raise SystemExit(f"{run_dir} holds another search ({key}: {was} != {want}); move it away")
    else:
        start_run(path)
    evs = read_events(run_dir / "events.jsonl")  # the run's own wall time (also when it was run earlier)
    wall = (evs[-1]["t"] - evs[0]["t"] if len(evs) > 1 else time.perf_counter() - t0) + fit_s
    done = [e for e in evs if e.get("event") == "done"]
    optimizer_s = done[-1].get("optimizer_s") if done else None  # the optimizer's ask + tell, in the last process
    res = RunResults(run_dir)
    write_report(run_dir)
    tasks = res.tasks
    searched = [r for r in res.calib if r.candidate_id >= 0]
    rel_cal = [res.relative_to_expert(r.result.task_means()) if r.ok else None for r in searched]
    mean_so_far = np.maximum.accumulate([np.mean(list(x.values())) if x else -np.inf for x in rel_cal])
    worst_so_far = np.maximum.accumulate([min(x.values()) if x else -np.inf for x in rel_cal])
    ta_rel = res.relative_to_expert(ta_best[1])
    ta_mean, ta_worst = float(np.mean(list(ta_rel.values()))), float(min(ta_rel.values()))

    def first(arr, thr):  # evaluations until then, the fit's included
        hit = np.flatnonzero(np.asarray(arr) >= thr)
        return int(hit[0]) + 1 + spent if hit.size else None

    if search.pick == "worst":  # max-min, ties to the better mean: a Pareto-front member, so rescored on test
        def key(r):
            rel = list(res.relative_to_expert(r.result.task_means()).values())
            return (min(rel), float(np.mean(rel)))
        best = max(res.searched, key=key) if res.searched else None
    else:
        best = res.best()
    test = res.test_scores(best.recipe_hash) if best else None
    cal = best.result.task_means() if best else None
    return {
        "problem": prob.name, "search": search.label, "note": search.note, "pick": search.pick, "seed": seed,
        "evaluations": len(searched), "fit_evals": spent, "budget": evals * search.budget, "wall_s": wall, "optimizer_s": optimizer_s, "tasks": tasks, "expert_cal": res.high,
        "best_candidate": best.candidate_id if best else None, "best_cal": cal, "best_test": test,
        "best_test_rel": res.relative_to_expert(test, "test") if test else None,
        "best_cal_rel": res.relative_to_expert(cal) if cal else None,
        # the best calibration score of any candidate: what the optimizer saw at most (the space's reach)
        "cal_ceiling": {"mean": float(mean_so_far[-1]), "worst": float(worst_so_far[-1])} if searched else None,
        "evals_to_095_mean": first(mean_so_far, 0.95), "evals_to_095_worst": first(worst_so_far, 0.95),
        "evals_to_ta_best": first(mean_so_far if search.pick == "mean" else worst_so_far,
                                  (ta_mean if search.pick == "mean" else ta_worst) + 1e-12),
        "ta_best_lambda": ta_best[0] if search.warm else None,
        "run_dir": str(run_dir),
        "baselines": {(f"expert {row.name}" if row.kind == "source" else row.name):
                      {"calibration": row.calibration, "test": row.test, "kind": row.kind}
                      for row in res.rows(front=False) if row.kind != "searched"},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (built if missing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--evals", type=int, default=None)
    ap.add_argument("--only", default=None, help="comma-separated search labels to run (default: all)")
    ap.add_argument("--experts", type=int, default=None, help="only the problem with this many experts")
    ap.add_argument("--block", choices=("main", "budget50"), default="main",
                    help="main: the study above; budget50: bo, Optuna TPE, warm CMA-ES and random search in the "
                         "warm space at 50 evaluations")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    size = "test" if args.quick else "demo"
    zoo_dir = args.zoo or REPO / "zoo" / size
    zoo = build_zoo(zoo_dir, size=size, seed=0)
    name = ("study-quick" if args.quick else "study") + ("" if args.block == "main" else f"-{args.block}")
    out = args.out or REPO / "experiments" / "results" / name
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds or (1 if args.quick else 3)
    evals = args.evals or (20 if args.quick else 150 if args.block == "main" else 50)
    only = set(args.only.split(",")) if args.only else None
    results, extras = [], {}
    for prob in (problems if args.block == "main" else budget_problems)(args.quick):
        if args.experts is not None and len(prob.experts) != args.experts:
            continue
        sc = Scorer(zoo, prob.suite, prob.experts)
        extras[prob.name], lam = extra_baselines(sc, prob.experts)
        ta_cal = next(v["calibration"] for v in extras[prob.name].values() if v.get("ta_best"))
        for search in prob.searches:
            if only is not None and search.label not in only:
                continue
            for seed in range(seeds):
                r = run_search(zoo, prob, search, seed, evals, out, (lam, ta_cal))
                log.info("%s / %s / seed %d: test %s (%.0f s)", prob.name, search.label, seed, r["best_test"],
                         r["wall_s"])
                results.append(r)
    text = write_tables(results, extras, args, zoo, TA_GRID)
    dests = [out] + ([REPO / "experiments" / "results"] if args.out is None else [])
    for d in dests:
        (d / f"{name}.md").write_text(text)
        plot_fronts(results, extras, d / f"{name}-pareto.png")
    (out / f"{name}.json").write_text(json.dumps({"results": results, "extras": extras}, indent=1, default=str))
    if args.out is None:
        (REPO / "experiments" / "results" / f"{name}.json").write_text(
            json.dumps({"results": results, "extras": extras}, indent=1, default=str))
    print(text)


if __name__ == "__main__":
    main()
