"""The study's rows for the seed papers' spaces: LiNeS, layer swapping and per-projection task arithmetic.

    python experiments/spaces_study.py                 # demo zoo, 2- and 3-expert problems, seed 0 (~10 min, 1 thread)
    python experiments/spaces_study.py --evals 12      # shorter searches

On the study's 2-expert (add, rev; suite zoo-2) and 3-expert (add, rev, sort; suite zoo) problems it scores,
with the study's scorer and measures (held-out test score per task relative to that task's expert, mean and
worst task; nothing is tuned on test):

* each space at its paper's default, the template's x0 (LiNeS: α = 1/n, β = 0.5 over task arithmetic and over
  TIES at density 0.5; layer swapping: the first expert with 3/16 of its layers at the bottom and 1/16 at the
  top, rounded, from the second (the third gives the top layers in the 3-expert problem); per-projection task
  arithmetic has no data-free default beyond uniform task arithmetic: its closed-form weights need data);
* each space searched by the real driver (``evomerge.driver.run.start_run``) from that default, with equal
  small budgets: LiNeS (CMA-ES over α, β), layer swapping (random over k_bottom, k_top), and the
  grouped-then-refined schedule for per-projection weights: CMA-ES over a weight per (layer, attention / MLP /
  rest) for half the budget, then over a weight per (layer, projection) for the other half starting at the
  first half's best recipe (``space.start_from``), against the per-projection space searched from the start
  for the whole budget.

Reference rows: task arithmetic at the best λ of the study's grid (chosen on calibration) and the multitask
model. Results: ``experiments/results/spaces_study.md`` and ``.json``; the runs under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from study import REPO, Problem, Scorer, Search, extra_baselines, run_search

from evomerge.io import ModelFolder
from evomerge.recipe import Recipe
from evomerge.results import RunResults
from evomerge.spaces import SpaceModels, build_space, load_template
from evomerge.testing.zoo import build_zoo

log = logging.getLogger("spaces_study")


def problems() -> list[Problem]:
    return [Problem("2 experts (add, rev)", ["add", "rev"], "builtin:zoo-2", "builtin:lines-task-arithmetic"),
            Problem("3 experts (add, rev, sort)", ["add", "rev", "sort"], "builtin:zoo", "builtin:lines-task-arithmetic")]


def swap_overrides(prob: Problem) -> dict[str, Any]:
    return {"top_donor": prob.experts[2]} if len(prob.experts) > 2 else {}


def handset_cases(prob: Problem) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, template, overrides) of the spaces' paper defaults."""
    return [("LiNeS over TA, α=1/n, β=0.5", "builtin:lines-task-arithmetic", {}),
            ("LiNeS over TIES d=0.5, α=1/n, β=0.5", "builtin:lines-ties", {}),
            ("layer swap, 3/16 bottom + 1/16 top", "builtin:layer-swap", swap_overrides(prob))]


def handset(sc: Scorer, prob: Problem, folders: dict[str, str],
            cases: list[tuple[str, str, dict[str, Any]]] | None = None) -> dict[str, dict[str, Any]]:
    """The paper defaults: each template's x0 (``cases``: :func:`handset_cases`), scored on calibration and test."""
    from evomerge.merge.materialize import materialize_to_disk
    from evomerge.spaces import parse_template

    opened = {k: ModelFolder.open(Path(v)) for k, v in folders.items()}
    models = SpaceModels.from_folders(opened, base="base")
    for f in opened.values():
        f.close()
    out: dict[str, dict[str, Any]] = {}
    for label, ref, over in handset_cases(prob) if cases is None else cases:
        tpl = load_template(ref)
        if over:
            tpl = parse_template(tpl.model_dump(mode="json") | over)
        space = build_space(tpl, models)
        recipe = space.decode(space.x0)
        if recipe.routing is None:
            scores = sc.recipe(recipe)
        else:
            from transformers import AutoModelForCausalLM

            with tempfile.TemporaryDirectory() as tmp:
                materialize_to_disk(recipe, Path(tmp) / "m", paths=sc.paths)
                scores = sc._score(AutoModelForCausalLM.from_pretrained(Path(tmp) / "m"))
            label += " (k_bottom, k_top = {}, {})".format(*space.counts(space.x0))
        out[label] = {**scores, "kind": "handset"}
    return out


def export_best(run_dir: str, dest: Path) -> str:
    """The run's best recipe (on calibration, by its scalarization) written to ``dest``; returns the path."""
    best = RunResults(run_dir).best()
    if best is None:
        raise SystemExit(f"{run_dir}: no successful candidate to refine from")
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(Recipe.from_yaml(best.recipe_yaml).to_yaml())
    return str(dest.resolve())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=None, help="demo zoo folder (built if missing)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--evals", type=int, default=24, help="evaluations per search (the refined schedule: half each)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    zoo = build_zoo(args.zoo or REPO / "zoo" / "demo", size="demo", seed=0)
    out = args.out or REPO / "experiments" / "results" / "spaces_study"
    out.mkdir(parents=True, exist_ok=True)
    n, half = args.evals, args.evals // 2
    cma = {"popsize": 6, "sigma0": 0.2, "x0_first": True}
    rows: list[dict[str, Any]] = []
    for prob in problems():
        sc = Scorer(zoo, prob.suite, prob.experts)
        extras, lam = extra_baselines(sc, prob.experts)
        folders = {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in prob.experts}}
        extras.update(handset(sc, prob, folders))
        ta_cal = next(v["calibration"] for v in extras.values() if v.get("ta_best"))
        searches = [
            (Search("lines-ta", "cma_es", cma, template="builtin:lines-task-arithmetic", note="LiNeS over TA"), n),
            (Search("lines-ties", "cma_es", cma, template="builtin:lines-ties", note="LiNeS over TIES d=0.5"), n),
            (Search("layer-swap", "random", {"x0_first": True}, template="builtin:layer-swap",
                    overrides=swap_overrides(prob), note="layer swap, k_bottom and k_top"), n),
            (Search("per-kind", "cma_es", cma, template="builtin:task-arithmetic-per-layer", warm=True,
                    note="TA per (layer, attn/mlp/rest), x0 = best λ (half budget)"), half),
        ]
        for search, budget in searches:
            rows.append(run_search(zoo, prob, search, args.seed, budget, out, (lam, ta_cal)))
        start = export_best(rows[-1]["run_dir"], out / "start" / f"{'-'.join(prob.experts)}-per-kind-best.yaml")
        for search, budget in [
            (Search("per-projection-refined", "cma_es", cma, template="builtin:task-arithmetic-per-projection",
                    start_from=start, note="TA per (layer, projection) from the per-kind best (other half)"), n - half),
            (Search("per-projection", "cma_es", cma, template="builtin:task-arithmetic-per-projection", warm=True,
                    note="TA per (layer, projection), x0 = best λ (whole budget)"), n),
        ]:
            rows.append(run_search(zoo, prob, search, args.seed, budget, out, (lam, ta_cal)))
        for r in rows:
            if r["problem"] == prob.name:
                r.setdefault("extras", extras)
        log.info("%s done", prob.name)
    text = table(rows, args)
    (REPO / "experiments" / "results" / "spaces_study.md").write_text(text)
    (REPO / "experiments" / "results" / "spaces_study.json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)


def _rel(scores: dict[str, float] | None, expert: dict[str, float]) -> dict[str, float] | None:
    return None if scores is None else {t: scores[t] / expert[t] for t in scores}


def table(rows: list[dict[str, Any]], args: Any) -> str:
    lines = [
        "# The seed papers' spaces on the demo zoo: paper defaults and searched",
        "",
        f"Date {date.today()}, {platform.machine()}, torch {torch.__version__}, one thread, demo zoo, seed {args.seed}. "
        f"Command: `python experiments/spaces_study.py --evals {args.evals}`. Scores: held-out test exact match "
        "relative to each task's expert (1.0 = as good as the expert); the searched rows are each run's best "
        "candidate on calibration (mean normalized score), rescored on test.",
        "",
    ]
    for prob in dict.fromkeys(r["problem"] for r in rows):
        rs = [r for r in rows if r["problem"] == prob]
        expert = {t: rs[0]["baselines"][f"expert {t}"]["test"][t] for t in rs[0]["tasks"]}
        tasks = rs[0]["tasks"]
        lines += [f"## {prob}", "", f"| model | kind | evaluations | {' | '.join(tasks)} | mean | worst |",
                  "|---|---|---|" + "---|" * len(tasks) + "---|---|"]

        def row(name: str, kind: str, ev: str, test: dict[str, float] | None, expert=expert, tasks=tasks) -> str:
            rel = _rel(test, expert)
            if rel is None:
                return f"| {name} | {kind} | {ev} |" + " – |" * (len(tasks) + 2)
            vals = [rel[t] for t in tasks]
            return (f"| {name} | {kind} | {ev} | " + " | ".join(f"{v:.3f}" for v in vals)
                    + f" | {np.mean(vals):.3f} | {min(vals):.3f} |")

        lines.append(row("base", "reference", "", rs[0]["baselines"]["base"]["test"]))
        for name, v in rs[0]["extras"].items():
            lines.append(row(name, v.get("kind", "reference"), "", v["test"]))
        for r in rs:
            lines.append(row(f"{r['search']}: {r['note']}", "searched", str(r["evaluations"]), r["best_test"]))
        lines.append("")
    lines += ["The per-projection-refined row spends the other half of the budget after the per-kind row "
              "(its start is that run's best), so per-kind + per-projection-refined together used what the "
              "per-projection row used alone.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
