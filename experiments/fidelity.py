"""Cheaper fitness: the calibration-subset estimator's error and the evaluations per hour a subset gains.

    python experiments/fidelity.py                 # test zoo, 3 experts, 40 evaluations per search (~15 min)
    python experiments/fidelity.py --size demo     # the demo zoo
    python experiments/fidelity.py --real ZOO --evals 12 --subset 32 --quantile 0.34   # SmolLM2-135M, 2 experts

On the tiny zoo (base + experts for add, rev, sort; 200 calibration examples per task, exact match), three searches
run through the real driver (CMA-ES over per-layer task arithmetic, same seed and budget):

* ``full``: every candidate scored on the full calibration set (the reference);
* ``anchor``: ``fidelity.subset_method: anchor``, ``subset: K`` (K = 50, a quarter), promotion by the estimate;
* ``random``: ``fidelity.subset_method: random``, the same K and promotion.

Measured: (1) *offline*, on every candidate of the ``full`` run (its per-example scores on the whole set), the
error of each design's estimate of the task score from the K examples that design picks, over 5 subset seeds,
for K = 25, 50 and 100; (2) *live*, on the subset runs' archives, the estimate stored with each cheap evaluation
against the full-set score of the candidates that were promoted; (3) the evaluation seconds per told candidate
(the archive's ``total`` timings: subset pass plus promoted full passes) and so evaluations per hour, against
the ``full`` run in the same process; the promoted share and the best full-set mean normalized score found.
Writes ``experiments/results/fidelity.md``.

``--real ZOO`` runs the same three searches on the real-model zoo (``evomerge zoo build ZOO --size real``:
SmolLM2-135M-Instruct and its experts for ``add`` and ``order``; 60 calibration prompts per task, greedy
generation), over one task-arithmetic weight per model and module kind started at the best of a weight grid
(``configs/real-demo.yaml``'s space), and writes ``experiments/results/fidelity-real.md``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evomerge.archive import Archive
from evomerge.driver.run import start_run
from evomerge.evaluation import EvalResult, TaskScores
from evomerge.references import References
from evomerge.scoring.anchors import choose_subset
from evomerge.scoring.data import Example
from evomerge.scoring.suite import subset_examples
from evomerge.testing.zoo import build_zoo

REPO = Path(__file__).resolve().parents[1]
TASKS = ["add", "rev", "sort"]


def _config(out: Path, zoo: Any, name: str, evals: int, fidelity: dict[str, Any], real: bool = False) -> Path:
    cfg = {
        "name": name, "seed": 0, "output_dir": str(out / "runs"),
        "sources": {"base": str(zoo.base), **{s: str(zoo.expert(s)) for s in TASKS}},
        "base_model": "base", "space": {"template": "builtin:task-arithmetic-per-layer"},
        "fitness": {"suite": "builtin:zoo", "scorer": "hf", "batch_size": 200},
        "optimizer": {"name": "cma_es", "options": {"popsize": 8, "sigma0": 0.25}},
        "budget": {"evaluations": evals}, "resources": {"threads_per_worker": 1},
        "fidelity": {"rescore_test": False, **fidelity},
    }
    if real:  # configs/real-demo.yaml's search, on two of its experts
        cfg["space"] = {"template": "builtin:task-arithmetic-per-layer", "overrides": {"granularity": "global"},
                        "warm_start": {"weights": [0.4, 0.7, 1.0]}}
        cfg["fitness"] = {"suite": "builtin:real", "tasks": list(TASKS), "scorer": "hf", "batch_size": 60}
        cfg["optimizer"] = {"name": "cma_es", "options": {"popsize": 6, "sigma0": 0.15, "x0_first": True}}
        cfg["resources"] = {"threads_per_worker": 2, "sorted_magnitude_cache": True}
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(path: Path) -> Path:
    cfg = yaml.safe_load(path.read_text())
    run_dir = Path(cfg["output_dir"]) / cfg["name"]
    if not (run_dir / "checkpoint.json").exists():
        start_run(path)
    return run_dir


def _rows(run_dir: Path) -> list[Any]:
    with Archive(run_dir / "archive.sqlite", readonly=True) as a:
        return a.records(split="calibration")


def _restrict(res: EvalResult, keep: dict[str, set[str]]) -> EvalResult:
    tasks = {}
    for t, ts in res.tasks.items():
        idx = [i for i, e in enumerate(ts.example_ids) if e in keep[t]]
        tasks[t] = TaskScores(tuple(ts.example_ids[i] for i in idx), ts.scores[idx], ts.metric)
    return EvalResult(res.candidate_id, res.status, tasks, fidelity="subset")


def offline_errors(rows: list[Any], ks: list[int], seeds: int) -> dict[tuple[str, int], dict[str, float]]:
    """Per (design, K): the estimate's error on the task scores of every searched candidate scored in full."""
    refs = [r.result for r in rows if r.candidate_id < 0 and r.meta.get("kind") in ("base", "source") and r.ok]
    cands = [r.result for r in rows if r.candidate_id >= 0 and r.ok and r.result.fidelity == "full"]
    out = {}
    for k in ks:
        for method in ("random", "anchor"):
            err, cover, mean_err = [], [], []
            for seed in range(seeds):
                sub = choose_subset(method, k, seed, refs, TASKS)
                if method == "random":  # the scorer's hashed subset, from the ids
                    keep = {t: {e.id for e in subset_examples(tuple(Example(i) for i in refs[0].tasks[t].example_ids),
                                                              k, seed=seed, salt=t)} for t in TASKS}
                else:
                    keep = {t: set(sub.tasks[t].chosen or ()) for t in TASKS}
                for c in cands:
                    est = sub.estimate(_restrict(c, keep))
                    e = [est[t].mean - c.tasks[t].mean for t in TASKS]
                    err += e
                    cover += [abs(x) <= 2 * est[t].se for x, t in zip(e, TASKS, strict=True)]
                    mean_err.append(float(np.mean(e)))
            a = np.abs(err)
            out[(method, k)] = {"n": len(cands) * seeds, "mae": float(a.mean()), "rmse": float(np.sqrt(np.mean(a**2))),
                                "p95": float(np.quantile(a, 0.95)), "within": float(np.mean(a <= 0.03)),
                                "cover": float(np.mean(cover)), "mean_mae": float(np.mean(np.abs(mean_err))),
                                "mean_within": float(np.mean(np.abs(mean_err) <= 0.03))}
    return out


def live(rows: list[Any]) -> dict[str, float]:
    """A subset run read back: estimate vs full for the promoted, cost per told candidate, promoted share."""
    cheap = {r.candidate_id: r for r in rows if r.candidate_id >= 0 and r.result.fidelity != "full"}
    full = {r.candidate_id: r for r in rows if r.candidate_id >= 0 and r.result.fidelity == "full"}
    errs = [cheap[c].meta["estimate"][t][0] - full[c].result.tasks[t].mean
            for c in full if c in cheap and full[c].ok and "estimate" in cheap[c].meta for t in TASKS]
    secs = sum(r.result.timings.get("total", 0.0) for r in rows if r.candidate_id >= 0)
    return {"told": len(cheap) or len(full), "promoted": len(full), "seconds": secs,
            "live_mae": float(np.mean(np.abs(errs))) if errs else float("nan"),
            "live_max": float(np.max(np.abs(errs))) if errs else float("nan")}


def best_full(rows: list[Any]) -> float:
    refs = References.from_scored([r for r in rows if r.candidate_id < 0 and r.result.fidelity == "full"], TASKS)
    scores = [float(np.mean(refs.objectives(r.result, TASKS))) for r in rows
              if r.candidate_id >= 0 and r.ok and r.result.fidelity == "full"]
    return max(scores) if scores else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="test")
    ap.add_argument("--evals", type=int, default=40)
    ap.add_argument("--subset", type=int, default=50)
    ap.add_argument("--quantile", type=float, default=0.25)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("/tmp/evomerge-fidelity"))
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--real", type=Path, default=None, help="a real-model zoo folder (built if missing)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    real = args.real is not None
    if real:
        TASKS[:] = ["add", "order"]
    args.results = args.results or REPO / "experiments/results" / ("fidelity-real.md" if real else "fidelity.md")
    t0 = time.perf_counter()
    zoo = build_zoo(args.real if real else args.out / f"zoo-{args.size}", size="real" if real else args.size, seed=0)
    t_zoo = time.perf_counter() - t0
    runs, walls = {}, {}
    specs = {"full": {"subset": None},
             "anchor": {"subset": args.subset, "subset_method": "anchor", "promote_quantile": args.quantile},
             "random": {"subset": args.subset, "subset_method": "random", "promote_quantile": args.quantile}}
    for name, fid in specs.items():
        t = time.perf_counter()
        tag = ("real-" if real else "") + f"{name}-k{args.subset}-e{args.evals}"
        runs[name] = _rows(_run(_config(args.out, zoo, tag, args.evals, fid, real)))
        walls[name] = time.perf_counter() - t
    n = len(runs["full"][0].result.tasks["add"].scores)
    ks = sorted(k for k in {args.subset // 2, args.subset, args.subset * 2} if k < n)
    off = offline_errors(runs["full"], ks, args.seeds)
    ref = live(runs["full"])
    cmd = f"--real {args.real}" if real else f"--size {args.size}"
    what = ("real zoo (SmolLM2-135M-Instruct; 2 experts: add, order" if real else
            f"zoo `{args.size}` ({len(TASKS)} experts: {', '.join(TASKS)}")
    search = ("CMA-ES over one task-arithmetic weight per model and module kind (popsize 6, sigma0 0.15, warm start "
              "at the best of weights 0.4 / 0.7 / 1.0), 2 threads" if real else
              "CMA-ES over per-layer task arithmetic (popsize 8, sigma0 0.25), 1 thread")
    lines = [
        "# Cheaper fitness: calibration-subset estimator and promotion",
        "",
        f"`python experiments/fidelity.py {cmd} --evals {args.evals} --subset {args.subset} "
        f"--quantile {args.quantile}` — {what}; {n} calibration "
        f"examples per task, greedy exact match), {search}, promote_confidence at its default (0.9), "
        f"{args.evals} evaluations per search, this machine (2 shared cores). Zoo {t_zoo:.0f} s "
        f"(0 when reused); search wall times: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()) + ".",
        "",
        f"## Estimator error, offline: every searched candidate of the `full` run ({off[('anchor', args.subset)]['n'] // args.seeds}"
        f" candidates) x {args.seeds} subset seeds",
        "",
        "Error = estimate from the K examples the design picks − the candidate's full-set task score (exact match, "
        "raw). *within* = share of task estimates within ±0.03; *cover* = share within 2 standard errors; "
        f"*mean*: the error of the mean over the {len(TASKS)} tasks.",
        "",
        "| design | K (share) | MAE | RMSE | p95 abs | within ±0.03 | cover 2 SE | mean-over-tasks MAE | mean within ±0.03 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (method, k), m in sorted(off.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {method} | {k} ({k / n:.3g}) | {m['mae']:.4f} | {m['rmse']:.4f} | {m['p95']:.4f} | "
                     f"{m['within']:.2f} | {m['cover']:.2f} | {m['mean_mae']:.4f} | {m['mean_within']:.2f} |")
    lines += ["", "## Searches: cost per told candidate and evaluations per hour", "",
              "Seconds = the archive's `total` timing (merge + scoring) of every evaluation of a searched candidate "
              "(cheap pass + promoted full passes); evaluations/hour = told candidates / those seconds.", "",
              "| run | told | promoted to full | eval seconds | s per told | evaluations/hour | × full | "
              "live estimate MAE (max) on the promoted | best full-set mean normalized |",
              "|---|---|---|---|---|---|---|---|---|"]
    ref_rate = ref["told"] / ref["seconds"] * 3600 if ref["seconds"] else float("nan")
    for name in specs:
        m = ref if name == "full" else live(runs[name])
        told = m["told"]
        rate = told / m["seconds"] * 3600 if m["seconds"] else float("nan")
        promoted = "—" if name == "full" else f"{m['promoted']} ({m['promoted'] / max(1, m['told']):.0%})"
        est = "—" if name == "full" else f"{m['live_mae']:.4f} ({m['live_max']:.4f})"
        lines.append(f"| {name} | {told} | {promoted} | {m['seconds']:.1f} | {m['seconds'] / max(1, told):.2f} | "
                     f"{rate:.0f} | {rate / ref_rate:.2f} | {est} | {best_full(runs[name]):.3f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
