"""fidelity.early_stop on the demo zoo: scored calibration examples and the best found, with and without it.

    python experiments/early_stop.py [--zoo /path/to/zoo-demo] [--evals 50] [--seeds 1]

Warm CMA-ES (popsize 8, sigma0 0.1, x0 = task arithmetic at λ = 0.7, the 3-expert grid's best) over the per-layer
task-arithmetic space on the 3-expert problem, run with ``fidelity.early_stop`` off, ``mean`` and ``front``.
Counts the calibration examples scored for searched candidates (the archive's per-example scores) and reports the
best full-set candidate (mean normalized calibration score) and its held-out mean relative to the experts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from study import WARM_TEMPLATE, warm_overrides  # noqa: E402

from evomerge.driver.run import start_run  # noqa: E402
from evomerge.results import RunResults  # noqa: E402
from evomerge.testing.zoo import ZooManifest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", type=Path, default=Path("zoo/demo"))
    ap.add_argument("--out", type=Path, default=Path("experiments/results/early_stop"))
    ap.add_argument("--evals", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--modes", default="off,mean,front")
    args = ap.parse_args()
    args.out = args.out.resolve()  # output_dir is read relative to the config file
    torch.set_num_threads(1)
    zoo = ZooManifest.load(args.zoo)
    rows = []
    for seed in range(args.seeds):
        for mode in args.modes.split(","):
            name = f"es-{mode}-s{seed}"
            cfg = {"name": name, "seed": seed, "output_dir": str(args.out / "runs"),
                   "sources": {"base": str(zoo.base), **{e: str(zoo.expert(e)) for e in ("add", "rev", "sort")}},
                   "base_model": "base",
                   "space": {"template": WARM_TEMPLATE, "overrides": warm_overrides(WARM_TEMPLATE, 0.7)},
                   "fitness": {"suite": "builtin:zoo", "scorer": "hf", "batch_size": 200},
                   "optimizer": {"name": "cma_es", "options": {"popsize": 8, "sigma0": 0.1, "x0_first": True}},
                   "budget": {"evaluations": args.evals}, "resources": {"threads_per_worker": 1},
                   "fidelity": {"early_stop": mode}}
            path = args.out / "configs" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            run_dir = args.out / "runs" / name
            if not (run_dir / "checkpoint.json").exists():
                start_run(path)
            res = RunResults(run_dir)
            searched = [r for r in res.calib if r.candidate_id >= 0 and r.ok]
            examples = sum(len(ts.scores) for r in searched for ts in r.result.tasks.values())
            stopped = sum(r.result.fidelity == "stopped" for r in searched)
            score_s = sum(r.result.timings.get("score", 0.0) for r in searched)
            best = res.best()
            test = res.test_scores(best.recipe_hash)
            rel = res.relative_to_expert(test, "test")
            rows.append((mode, seed, len(searched), stopped, examples, score_s, res.scalar(best),
                         sum(rel.values()) / len(rel), best.candidate_id))
    print("| early_stop | seed | evals | stopped early | scored examples | scoring s | best cal. mean norm. | "
          "best test mean rel. | best candidate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.0f} | {r[6]:.3f} | {r[7]:.3f} | {r[8]} |")


if __name__ == "__main__":
    main()
