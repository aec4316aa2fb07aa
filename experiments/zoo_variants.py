"""Does the ceiling of the 2-expert merge move with the zoo? Warm CMA-ES on zoo variants (CPU).

    python experiments/zoo_variants.py                     # demo, wide, lowlr; 1 seed x 150 evaluations (~25 min)
    python experiments/zoo_variants.py --variants demo --seeds 3

The study's best 2-expert merges stop at ~0.96 of each expert. This probe asks whether that is a property of
the demo zoo's scale or training rather than of the search: it builds 2-skill zoos (add, rev) that differ
from ``demo`` in one respect each and runs the same search on every one — per-layer task arithmetic with
``space.warm_start`` (grid 0.7–1.1), CMA-ES (popsize 8, sigma0 0.1, x0 first), the mean normalized score.

* ``demo``: the demo zoo recipe (hidden 96, 4 layers, experts fine-tuned 250 steps at lr 5e-4);
* ``wide``: twice as wide (hidden 192, MLP 768: ~3.5x the parameters), learning rates scaled down;
* ``lowlr``: the demo recipe with the experts fine-tuned at lr 2e-4 (task vectors ~2/3 as long, closer to
  the small relative deltas of real fine-tunes).

For each it reports the experts' relative task-vector norm ||expert - base|| / ||base||, the cosine between
the two task vectors, task arithmetic at the grid's best weight and the search's best candidate (held-out
test, relative to each expert's held-out score), and the best worst-task calibration score of any candidate.
Results: ``experiments/results/zoo_variants.md``; zoos and runs under ``experiments/results/zoo_variants/``.
"""

from __future__ import annotations

import argparse
import logging
import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch
import yaml

from evomerge.driver.run import start_run
from evomerge.events import read_events
from evomerge.io import ModelFolder
from evomerge.results import RunResults
from evomerge.testing.zoo import SIZES, ZooManifest, ZooSize, build_zoo

log = logging.getLogger("zoo_variants")
REPO = Path(__file__).resolve().parents[1]
SKILLS = ("add", "rev")
GRID = [0.7, 0.8, 0.9, 1.0, 1.1]


def variants() -> dict[str, ZooSize]:
    demo = SIZES["demo"]
    return {
        "demo": demo,
        "wide": demo.model_copy(update={"name": "wide", "hidden_size": 192, "intermediate_size": 768,
                                        "base_lr": 1.5e-3, "expert_lr": 3e-4, "multitask_lr": 1e-3}),
        "lowlr": demo.model_copy(update={"name": "lowlr", "expert_lr": 2e-4}),
    }


def task_vector_stats(zoo: ZooManifest) -> tuple[list[float], float]:
    """||expert - base|| / ||base|| per expert, and the cosine between the two task vectors."""
    with ModelFolder.open(zoo.base) as fb:
        base = fb.load_all(dtype=torch.float64)
    deltas = []
    for s in SKILLS:
        with ModelFolder.open(zoo.expert(s)) as fe:
            deltas.append(torch.cat([(fe.get(n, dtype=torch.float64) - b).flatten() for n, b in base.items()]))
    base_norm = torch.cat([b.flatten() for b in base.values()]).norm()
    rel = [float(d.norm() / base_norm) for d in deltas]
    cos = float(torch.nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0))
    return rel, cos


def run(zoo: ZooManifest, variant: str, seed: int, evals: int, out: Path) -> Path:
    name = f"{variant}-s{seed}"
    run_dir = out / "runs" / name
    if (run_dir / "checkpoint.json").exists():
        return run_dir
    cfg = {
        "name": name, "seed": seed, "output_dir": str(out / "runs"),
        "sources": {"base": str(zoo.base), **{s: str(zoo.expert(s)) for s in SKILLS}}, "base_model": "base",
        "space": {"template": "builtin:task-arithmetic-per-layer", "warm_start": {"weights": GRID}},
        "fitness": {"suite": "builtin:zoo-2", "scorer": "hf", "batch_size": 200},
        "optimizer": {"name": "cma_es", "options": {"popsize": 8, "sigma0": 0.1, "x0_first": True}},
        "budget": {"evaluations": evals}, "resources": {"threads_per_worker": 1},
    }
    path = out / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return start_run(path)


def summarize(run_dir: Path) -> dict[str, float]:
    res = RunResults(run_dir)
    _, expert_test = res.references("test")
    (warm,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "warm_start"]  # the run's choice
    ta = next(x for x in res.calib if x.candidate_id < 0 and x.meta["baseline"] == f"task_arithmetic w={warm['weight']:g}")
    best = res.best()

    def rel_test(rec) -> list[float]:  # noqa: ANN001
        test = res.test_scores(rec.recipe_hash)
        return [test[t] / expert_test[t] for t in res.tasks]

    ta_rel, best_rel = rel_test(ta), rel_test(best)
    cal_worst = max(min(res.relative_to_expert(r.result.task_means()).values()) for r in res.searched)
    return {"ta_weight": float(warm["weight"]), "ta_mean": float(np.mean(ta_rel)),
            "ta_worst": min(ta_rel), "mean": float(np.mean(best_rel)), "worst": min(best_rel),
            "cal_worst_ceiling": cal_worst, "evaluations": len(res.searched)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="demo,wide,lowlr")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--evals", type=int, default=150)
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "zoo_variants")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    torch.set_num_threads(1)
    chosen = {k: v for k, v in variants().items() if k in args.variants.split(",")}
    lines = ["# Zoo variants: the 2-expert merge ceiling", "",
             f"Date {date.today()}, {platform.machine()}, {__import__('os').cpu_count()} CPUs, torch "
             f"{torch.__version__}. Command: `python experiments/zoo_variants.py --variants {','.join(chosen)} "
             f"--seeds {args.seeds} --evals {args.evals}`. Held-out test scores relative to each expert's held-out "
             "score; searches: per-layer task arithmetic, warm start, CMA-ES, best candidate by calibration mean.", "",
             "| zoo | params | ‖τ‖/‖base‖ (add, rev) | cos(τ_add, τ_rev) | TA at best w: mean / worst | "
             "search: mean / worst | best worst task on calibration, any candidate |", "|---|---|---|---|---|---|---|"]
    for variant, size in chosen.items():
        zoo = build_zoo(args.out / f"zoo-{variant}", size=size, seed=0, skills=SKILLS)
        rel, cos = task_vector_stats(zoo)
        rs = [summarize(run(zoo, variant, seed, args.evals, args.out)) for seed in range(args.seeds)]
        with ModelFolder.open(zoo.base) as fb:
            n = sum(t.numel() for _, t in fb.iter_tensors())

        def ms(key: str, rs: list[dict] = rs) -> str:
            v = [r[key] for r in rs]
            return f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")
        lines.append(f"| {variant} (hidden {size.hidden_size}, expert lr {size.expert_lr:g}) | {n / 1e6:.2f}M | "
                     f"{rel[0]:.3f}, {rel[1]:.3f} | {cos:+.3f} | w={rs[0]['ta_weight']:g}: {rs[0]['ta_mean']:.3f} / "
                     f"{rs[0]['ta_worst']:.3f} | {ms('mean')} / {ms('worst')} | {ms('cal_worst_ceiling')} |")
        log.info(lines[-1])
    text = "\n".join(lines) + "\n"
    (REPO / "experiments" / "results" / "zoo_variants.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
