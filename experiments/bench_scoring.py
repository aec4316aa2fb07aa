"""Scoring benchmark: hf scorer throughput on the zoo, and a candidate's time split between merging and scoring.

    python experiments/bench_scoring.py [--zoo zoo/demo] [--size demo] [--repeats 3]

* examples/second of the hf scorer on the zoo suite (all three skills, calibration split), per batch size;
* a search candidate end to end in a real worker (resident sources, in-place TIES merge, hf scoring): the
  share of its time spent merging vs scoring, from the worker's own timings.

The vLLM scorer's swap time and throughput are measured by ``experiments/vllm_swap_probe.py`` (it needs the
vLLM venv made by ``scripts/setup_vllm_venv.sh``).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from evomerge.driver.pool import Job
from evomerge.driver.worker import Worker, WorkerSpec
from evomerge.recipe import Recipe
from evomerge.scoring.base import make_scorer
from evomerge.scoring.suite import load_suite
from evomerge.testing.zoo import build_zoo

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="demo", choices=["test", "demo"])
    ap.add_argument("--zoo", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "experiments" / "results" / "bench_scoring.md")
    args = ap.parse_args()
    zoo = build_zoo(args.zoo or REPO / "zoo" / args.size, size=args.size, seed=0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    suite = load_suite("builtin:zoo")
    tok = AutoTokenizer.from_pretrained(zoo.base)
    model = AutoModelForCausalLM.from_pretrained(zoo.expert("add"))
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        "# Scoring benchmark (`experiments/bench_scoring.py`)", "",
        f"- date: {datetime.now().isoformat(timespec='seconds')}; machine: {platform.platform()}, "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}",
        f"- command: `python experiments/bench_scoring.py --size {args.size}`; zoo `{args.size}` "
        f"({n_params / 1e6:.2f}M parameters per model); suite `builtin:zoo` (3 generate tasks), calibration split",
        "", "## hf scorer throughput (best of repeats)", "",
        "| batch size | threads | examples | seconds | examples/s |", "|---|---|---|---|---|",
    ]
    for bs in (32, 100, 200):
        scorer = make_scorer("hf", batch_size=bs)
        best = np.inf
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = scorer.score(model, tok, suite, split="calibration")
            best = min(best, time.perf_counter() - t0)
        lines.append(f"| {bs} | auto (1 for small CPU models) | {out.n_examples} | {best:.3f} | "
                     f"{out.n_examples / best:.0f} |")
    spec = WorkerSpec(
        sources={"base": str(zoo.base), **{s: str(zoo.expert(s)) for s in zoo.skills}}, reference="base",
        order=tuple(zoo.skills), suite="builtin:zoo", scorer="hf", scorer_options={"batch_size": 200},
    )
    worker = Worker(spec)
    recipe = Recipe(method="ties", base_model="base", models=tuple(
        {"model": s, "parameters": {"weight": 1.0, "density": [0.3, 0.7]}} for s in zoo.skills))
    rows = []
    for i in range(args.repeats + 1):
        res = worker.evaluate(Job(i, i, recipe))
        if i:
            rows.append(res.timings)
    merge = min(r["merge"] for r in rows)
    score = min(r["score"] for r in rows)
    total = min(r["total"] for r in rows)
    lines += ["", "## One candidate in a worker (in-place TIES merge of 3 experts + hf scoring, best of repeats)", "",
              "| merge s | score s | total s | merge share | score share |", "|---|---|---|---|---|",
              f"| {merge:.3f} | {score:.3f} | {total:.3f} | {merge / total:.1%} | {score / total:.1%} |", ""]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
