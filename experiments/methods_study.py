"""The study's baselines for the seed papers' data-free methods: each at its paper's default and tuned by a search.

    python experiments/methods_study.py --zoo /work/cache/zoo-demo --evals 30          # demo zoo, 2 and 3 experts
    python experiments/methods_study.py --real /work/cache/realzoo --evals 20 --tune lines-ta
                                        # real zoo (SmolLM2-135M, add / order / unit): hand-set rows, and
                                        # searches only for the methods named in --tune (a candidate is ~20 s)

Methods: consensus merging with TALL masks over task arithmetic (``consensus_ta``), PCB-merging (``pcb``),
WIDEN (``widen``), Iso-C (``iso_c``), LiNeS over task arithmetic (the ``lines`` space) and layer swapping (the
``layer_swap`` space, without and with transition zones). For each problem (the demo zoo's 2-expert add/rev and 3-expert add/rev/sort problems of
``study.py``, or the real zoo's three experts on ``builtin:real``) it scores, with the study's scorer:

* *hand-set*: the method at its paper's default parameters (each method's ``ParamSpec`` defaults, whose
  sources are in the methods' docstrings; the spaces' ``init``), which is the searched space's ``x0``; and
  consensus with its scale set as the paper's protocol does, like task arithmetic's (here: task arithmetic's
  best λ on calibration);
* *tuned*: the real driver (``evomerge.driver.run.start_run``) searching the method's genes from that default,
  CMA-ES (``x0`` first) for the continuous methods, random search for layer swapping (a handful of distinct
  integer recipes), ``--evals`` evaluations, one seed.

The genes (one per model for per-model parameters, ``granularity: global``): consensus ``tall_lambda`` per
model, ``k`` and ``lambda``; PCB ``density`` per model and ``lambda``; WIDEN ``weight`` per model and its two
thresholds; Iso-C ``weight`` per model and ``lambda``; LiNeS ``alpha`` and ``beta``; layer swapping ``k_bottom``
and ``k_top`` (and ``t_bottom``, ``t_top`` with transition zones). References: task arithmetic at the best λ of the study's grid (chosen on calibration) and the
multitask model. Everything is selected on calibration and reported on the held-out test split, relative to
each task's expert. Results: ``experiments/results/methods_study.md`` (a section per zoo) and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from spaces_study import handset, swap_overrides
from study import REPO, Problem, Scorer, Search, extra_baselines, run_search

log = logging.getLogger("methods_study")

PARAMS_TEMPLATE = "builtin:task-arithmetic-global"  # a global params space; overrides give the method and genes


def methods(prob: Problem) -> list[tuple[str, str, str, dict[str, Any], str]]:
    """(label, hand-set row label, template, overrides, optimizer) of every method."""
    def params(method: str, search: list[str], desc: str, **extra: Any) -> dict[str, Any]:
        return {"method": method, "search": search, "description": desc, "init": extra.pop("init", {}),
                "fixed": extra.pop("fixed", {}), "ranges": extra.pop("ranges", {})}

    return [
        ("consensus", "consensus TA, k=2, TALL λ_t=0.4, λ=1", PARAMS_TEMPLATE,
         params("consensus_ta", ["tall_lambda", "k", "lambda"], "consensus TA: TALL λ per model, k, λ",
                fixed={"weight": 1.0}), "cma_es"),
        ("pcb", "PCB, density 0.1 (r=0.9), λ=1", PARAMS_TEMPLATE,
         params("pcb", ["density", "lambda"], "PCB: density per model, λ", fixed={"weight": 1.0}), "cma_es"),
        ("widen", "WIDEN, t=1, s=1", PARAMS_TEMPLATE,
         params("widen", ["weight", "above_average_value_ratio", "score_calibration_value"],
                "WIDEN: weight per model and the two thresholds", init={"weight": 1.0}), "cma_es"),
        ("iso_c", "Iso-C, α=1", PARAMS_TEMPLATE,
         # α searched up to 6: flattening a concentrated spectrum shrinks its top directions, and on the demo
         # zoo the isotropic sum needs α of about 4 (α in the method's own range, up to 2, stays at the base)
         params("iso_c", ["weight", "lambda"], "Iso-C: weight per model, α in [0.5, 6]", init={"weight": 1.0},
                ranges={"lambda": [0.5, 6.0]}), "cma_es"),
        ("lines-ta", "LiNeS over TA, α=1/n, β=0.5", "builtin:lines-task-arithmetic", {}, "cma_es"),
        ("layer-swap", "layer swap, 3/16 bottom + 1/16 top", "builtin:layer-swap", swap_overrides(prob), "random"),
        # the paper's transition zones: up to 2 blended layers next to each swapped end, x0 one at the bottom
        ("layer-swap-zones", "layer swap, 3/16 bottom + 1/16 top, 1 blended layer above the bottom",
         "builtin:layer-swap", {**swap_overrides(prob), "transition": {"max": 2, "init": {"bottom": 1, "top": 0}}},
         "random"),
    ]


def demo_problems() -> list[Problem]:
    return [Problem("2 experts (add, rev)", ["add", "rev"], "builtin:zoo-2", PARAMS_TEMPLATE),
            Problem("3 experts (add, rev, sort)", ["add", "rev", "sort"], "builtin:zoo", PARAMS_TEMPLATE)]


def real_problems() -> list[Problem]:
    return [Problem("real zoo, 3 experts (add, order, unit)", ["add", "order", "unit"], "builtin:real",
                    PARAMS_TEMPLATE)]


def run_zoo(zoo: Any, probs: list[Problem], evals: int, tune: set[str] | None, out: Path, seed: int,
            save: Any, previous: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Every problem's rows; ``save(sections)`` is called after the hand-set rows and after each search.
    ``previous`` (problem name -> its earlier runs): a method left out of ``tune`` keeps its earlier tuned row
    when it has one with the same number of evaluations."""
    cma = {"popsize": 6, "sigma0": 0.2, "x0_first": True}
    sections = []
    for prob in probs:
        sc = Scorer(zoo, prob.suite, prob.experts)
        extras, lam = extra_baselines(sc, prob.experts)
        ta_cal = next(v["calibration"] for v in extras.values() if v.get("ta_best"))
        folders = {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in prob.experts}}
        cases = methods(prob)
        consensus = next(over for label, _, _, over, _ in cases if label == "consensus")
        protocol = (f"consensus TA, k=2, TALL λ_t=0.4, λ = TA's best λ={lam}", PARAMS_TEMPLATE,
                    {**consensus, "search": ["tall_lambda", "k"], "fixed": {"weight": 1.0, "lambda": lam}})
        extras.update(handset(sc, prob, folders, [(hl, ref, over) for _, hl, ref, over, _ in cases] + [protocol]))
        log.info("%s: hand-set rows done", prob.name)
        # each expert on its own task, the 1.0 of the table: a real zoo's manifest holds it (measured by the
        # same scorer on the same suite while building), a demo zoo's is scored here
        ref = getattr(zoo, "reference", None)
        own = {t: ref[zoo.experts[t]] if ref else sc.folder(t) for t in prob.experts}
        experts = {split: {t: own[t][split][t] for t in prob.experts} for split in ("calibration", "test")}
        runs: list[dict[str, Any]] = []
        sections.append({"problem": prob.name, "tasks": prob.experts, "experts": experts, "extras": extras,
                         "runs": runs})
        save(sections)
        for label, _, ref, over, opt in cases:
            if tune is not None and label not in tune:
                kept = [r for r in (previous or {}).get(prob.name, [])
                        if r["search"] == label and r["evaluations"] == evals]
                runs.extend(kept[:1])
                continue
            search = Search(label, opt, cma if opt == "cma_es" else {"x0_first": True}, template=ref,
                            overrides=over, note=(over.get("description") or ref.split(":")[-1]))
            r = run_search(zoo, prob, search, seed, evals, out, (lam, ta_cal))
            runs.append(r)
            log.info("%s / %s: test %s (%.0f s)", prob.name, label, r["best_test"], r["wall_s"])
            save(sections)
    return sections


def table(sections: list[dict[str, Any]], title: str, command: str) -> str:
    lines = [f"## {title}", "", f"Command: `{command}`. {date.today()}, {platform.machine()}, torch "
             f"{torch.__version__}, {torch.get_num_threads()} thread(s), seed 0 (one seed). Held-out test exact "
             "match relative to each task's expert (1.0 = as good as the expert); *cal. mean* the same on calibration. Searched rows: "
             "each run's best candidate on calibration (mean normalized score), rescored on test.", ""]
    for sec in sections:
        tasks, expert = sec["tasks"], sec["experts"]
        lines += [f"### {sec['problem']}", "",
                  f"| model | kind | evaluations | {' | '.join(tasks)} | mean | worst | cal. mean |",
                  "|---|---|---|" + "---|" * len(tasks) + "---|---|---|"]

        def row(name: str, kind: str, ev: str, scores: dict[str, dict[str, float]] | None,
                tasks=tasks, expert=expert) -> str:
            if scores is None or scores.get("test") is None:
                return f"| {name} | {kind} | {ev} |" + " – |" * (len(tasks) + 3)
            rel = [scores["test"][t] / expert["test"][t] for t in tasks]
            cal = [scores["calibration"][t] / expert["calibration"][t] for t in tasks] if scores.get(
                "calibration") else None
            return (f"| {name} | {kind} | {ev} | " + " | ".join(f"{v:.3f}" for v in rel)
                    + f" | {np.mean(rel):.3f} | {min(rel):.3f} | " + (f"{np.mean(cal):.3f} |" if cal else "– |"))

        for name, v in sec["extras"].items():
            lines.append(row(name, v.get("kind", "reference"), "", v))
        for r in sec["runs"]:
            lines.append(row(f"{r['search']}: {r['note']}", "tuned", str(r["evaluations"]),
                             {"test": r["best_test"], "calibration": r["best_cal"]}))
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    grp = ap.add_mutually_exclusive_group(required=True)
    grp.add_argument("--zoo", type=Path, help="demo zoo folder (built if missing)")
    grp.add_argument("--real", type=Path, help="real zoo folder (its zoo.json must exist: built by `evomerge zoo "
                                                "build DIR --size real`)")
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "methods_study")
    ap.add_argument("--evals", type=int, default=30, help="evaluations per tuning search")
    ap.add_argument("--tune", default=None, help="comma-separated methods to search (default: all; 'none': none); "
                    "the others keep their tuned rows from the earlier results with the same --evals")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the hand-set rows and each search)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    import study

    study.THREADS = args.threads
    tune = None if args.tune is None else set() if args.tune == "none" else set(args.tune.split(","))
    if args.real is not None:
        from evomerge.testing.real import RealManifest

        if not (args.real / "zoo.json").is_file():
            raise SystemExit(f"--real: {args.real}/zoo.json not found (the real zoo is not built)")
        zoo, probs, key = RealManifest.load(args.real), real_problems(), "real"
        command = (f"python experiments/methods_study.py --real ZOO --evals {args.evals} --tune {args.tune or 'all'}"
                   + (f" --threads {args.threads}" if args.threads != 1 else ""))
    else:
        from evomerge.testing.zoo import build_zoo

        zoo, probs, key = build_zoo(args.zoo, size="demo", seed=0), demo_problems(), "demo"
        command = f"python experiments/methods_study.py --zoo ZOO --evals {args.evals}"
    title = "Real zoo (SmolLM2-135M base, builtin:real)" if key == "real" else "Demo zoo (size demo, seed 0)"
    res = REPO / "experiments" / "results"

    def save(sections: list[dict[str, Any]]) -> None:  # the tables so far (a long run keeps what it has done)
        text = table(sections, title, command)
        (res / f"methods_study-{key}.json").write_text(json.dumps({"text": text, "sections": sections}, indent=1,
                                                                  default=str))
        parts = [json.loads(f.read_text())["text"] for k in ("demo", "real")
                 if (f := res / f"methods_study-{k}.json").is_file()]
        notes = res / "methods_study-notes.md"  # the written notes on the figures, kept across reruns
        parts += [notes.read_text()] if notes.is_file() else []
        (res / "methods_study.md").write_text("\n".join([HEADER, *parts]) + "\n")

    earlier = res / f"methods_study-{key}.json"
    previous = ({sec["problem"]: sec["runs"] for sec in json.loads(earlier.read_text())["sections"]}
                if tune is not None and earlier.is_file() else None)
    sections = run_zoo(zoo, probs, args.evals, tune, args.out / key, args.seed, save, previous)
    print(table(sections, title, command))


HEADER = """# The seed papers' data-free methods: paper defaults and tuned by a search

Each method at its paper's default parameters (hand-set) and searched over its own genes by the real driver
from that default (tuned), with the study's problems, scorer and measures (`experiments/methods_study.py`; the
defaults and their sources are in each method's docstring). One seed: differences of about ±0.01 are within
the seed-to-seed spread the main study reports.
"""


if __name__ == "__main__":
    main()
