"""The study's report: results tables, goal lines and Pareto plots from the per-run results of ``study.py``."""

from __future__ import annotations

import os
import platform
from datetime import date
from pathlib import Path

import numpy as np
import torch

from evomerge.testing.zoo import ZooManifest


def _rel(means: dict[str, float], experts_test: dict[str, float], tasks: list[str]) -> tuple[float, float]:
    rel = [means[t] / experts_test[t] if experts_test[t] > 0 else float("nan") for t in tasks]
    return float(np.mean(rel)), float(np.min(rel))


def _evals(group: list[dict]) -> str:
    """A search's evaluations: the searched ones, after a fit's cost in evaluations where it started from one."""
    fit = [r.get("fit_evals") or 0 for r in group]
    n = group[0]["evaluations"]
    return f"{np.mean(fit):.0f} (fit) + {n}" if any(fit) else f"{n}"


def _optimizer_share(group: list[dict]) -> str:
    """`` (opt. X s/eval)``: the optimizer's own ask + tell time per evaluation, when the runs recorded it."""
    per = [r["optimizer_s"] / r["evaluations"] for r in group if r.get("optimizer_s") is not None and r["evaluations"]]
    return f" (opt. {np.mean(per):.2f} s/eval)" if per else ""


def fmt(x: float | None, p: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{p}f}"


def write_tables(results: list[dict], extras: dict[str, dict], args, zoo: ZooManifest, grid: tuple[float, ...]) -> str:
    """The study's markdown: per problem, the baselines, every search (mean ± std over seeds) and the goal lines."""
    cmd = "python experiments/study.py" + (" --quick" if args.quick else "") + (
        f" --evals {args.evals}" if args.evals else "") + (f" --seeds {args.seeds}" if args.seeds else "") + (
        f" --block {args.block}" if getattr(args, "block", "main") != "main" else "")
    lines = [f"# Search-quality study ({'quick' if args.quick else 'full'})", "",
             f"Date {date.today()}, machine: {platform.machine()} {platform.processor() or ''}, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}, zoo size `{zoo.size.name}` seed "
             f"{zoo.seed}. Command: `{cmd}`.", "",
             "Scores are exact match on the **held-out test split**; *rel.* = score / the task's expert's test "
             "score (1.0 = as good as the expert). Searches: mean ± std over seeds of the best candidate, chosen "
             "on calibration by the run's own scalarization (mean normalized score; *worst* runs: worst task "
             "relative to the expert). *evals to 0.95*: evaluations until the best candidate so far reaches 0.95 "
             "of the experts on calibration (mean over tasks / worst task), with the number of seeds that got "
             "there; *evals to TA λ\\**: until it reaches the calibration score (mean, or worst task for *worst* "
             "runs) of task arithmetic at the best λ of the grid; — = not reached within the budget. Warm-started "
             f"searches start from that λ (the grid {list(grid)} costs {len(grid)} further evaluations).", ""]
    for prob_name in dict.fromkeys(r["problem"] for r in results):
        rs = [r for r in results if r["problem"] == prob_name]
        tasks = rs[0]["tasks"]
        base_rows = dict(rs[0]["baselines"])
        base_rows.update(extras.get(prob_name, {}))
        expert_test = {}
        for t in tasks:
            vals = [v["test"][t] for v in base_rows.values() if v.get("kind") == "source" and v.get("test")]
            expert_test[t] = max(vals) if vals else rs[0]["expert_cal"][t]
        lines += [f"## {prob_name}", "", "| model | " + " | ".join(tasks) + " | mean rel. | worst rel. | "
                  "evals to 0.95 (mean / worst) | evals to TA λ\\* | wall s | cal.−test gap (mean rel.) |",
                  "|---|" + "---|" * (len(tasks) + 6)]
        best_hand, best_evolved = -np.inf, (-np.inf, "")
        for name, v in base_rows.items():
            if not v.get("test"):
                continue
            m, w = _rel(v["test"], expert_test, tasks)
            if v.get("kind", "handset") == "handset" and not name.startswith("multitask"):
                best_hand = max(best_hand, m)
            lines.append(f"| {name} | " + " | ".join(fmt(v["test"][t]) for t in tasks) + f" | {fmt(m)} | {fmt(w)} | | | | |")
        for label in dict.fromkeys(r["search"] for r in rs):
            group = [r for r in rs if r["search"] == label and r["best_test"]]
            if not group:
                continue
            per = np.array([[r["best_test"][t] for t in tasks] for r in group])
            rel = np.array([_rel(r["best_test"], expert_test, tasks) for r in group])
            cal_rel = np.array([np.mean([r["best_cal"][t] / r["expert_cal"][t] if r["expert_cal"][t] > 0 else np.nan
                                         for t in tasks]) for r in group])

            def ev(key, group=group):  # noqa: E306
                v = [r[key] for r in group]
                hit = [x for x in v if x is not None]
                return f"{np.mean(hit):.0f} ({len(hit)}/{len(v)})" if hit else "—"
            note = f", {group[0]['note']}" if group[0].get("note") else ""
            if rel[:, 0].mean() > best_evolved[0]:
                best_evolved = (float(rel[:, 0].mean()), label)
            lines.append(
                f"| **evolved: {label}** ({len(group)} seeds, {_evals(group)} evals{note}) | "
                + " | ".join(f"{per[:, j].mean():.3f} ± {per[:, j].std():.3f}" for j in range(len(tasks)))
                + f" | {rel[:, 0].mean():.3f} ± {rel[:, 0].std():.3f} | {rel[:, 1].mean():.3f} ± {rel[:, 1].std():.3f}"
                + f" | {ev('evals_to_095_mean')} / {ev('evals_to_095_worst')} | {ev('evals_to_ta_best')}"
                + f" | {np.mean([r['wall_s'] for r in group]):.0f}{_optimizer_share(group)}"
                + f" | {np.mean(cal_rel - rel[:, 0]):+.3f} |")
        lines += ["", f"Best hand-set merge, mean rel.: {fmt(best_hand)}; best search: {best_evolved[1]} "
                  f"{fmt(best_evolved[0])} ({(best_evolved[0] - best_hand) * 100:+.1f} points).", ""]
        lines += goal_lines(rs, expert_test, tasks)
    return "\n".join(lines) + "\n"


def speedup_vs_random(fast: list[int | None], rand: list[int | None], rand_budget: int) -> tuple[float, bool]:
    """Evaluations to 0.95 of random search over those of a search, and whether that is a lower bound.

    Means over seeds; a random seed that never got there counts as its budget (so the ratio is then a lower
    bound). ``nan`` when the search itself missed on some seed (no fair ratio).
    """
    if not fast or any(x is None for x in fast):
        return float("nan"), False
    censored = any(x is None for x in rand)
    r = [rand_budget if x is None else x for x in rand]
    return float(np.mean(r) / np.mean(fast)), censored


def goal_lines(rs: list[dict], expert_test: dict[str, float], tasks: list[str]) -> list[str]:
    """The issue's goals, computed from the runs: >= 0.97 of each expert on test, <= 150 evaluations to 0.95 and
    >= 3x fewer than random search over the same space."""
    out = []
    by = {}
    for r in rs:
        if r["best_test"]:
            by.setdefault(r["search"], []).append(r)
    hits = []
    for label, group in by.items():
        worst = [min(r["best_test"][t] / expert_test[t] for t in tasks if expert_test[t] > 0) for r in group]
        hits.append(f"{label} {sum(w >= 0.97 for w in worst)}/{len(group)} (worst task {np.mean(worst):.3f})")
    out.append("Seeds whose picked merge holds >= 0.97 of every expert on test: " + "; ".join(hits) + ".")
    ceil = []
    for label, group in by.items():
        c = [r["cal_ceiling"] for r in group if r.get("cal_ceiling")]
        if c:
            n = sum(r["evaluations"] for r in group)
            ceil.append(f"{label} {np.mean([x['worst'] for x in c]):.3f} (max {max(x['worst'] for x in c):.3f}; "
                        f"{n} candidates)")
    if ceil:
        out.append("Best worst task on calibration of any candidate a search evaluated (relative to the expert; "
                   "mean over seeds): " + "; ".join(ceil) + ".")
    rand = by.get("random-warm")
    if rand:
        budget = rand[0].get("budget") or rand[0]["evaluations"]
        rr = [r["evals_to_095_mean"] for r in rand]
        reached = [x for x in rr if x is not None]
        out.append(f"Random search over the warm space ({budget} evaluations, x0 first): reached 0.95 (mean, "
                   f"calibration) on {len(reached)}/{len(rr)} seeds" + (f", after {np.mean(reached):.0f} evaluations"
                                                                      if reached else "") + ".")
        for label, group in by.items():
            if label == "random-warm" or group[0]["pick"] != "mean":
                continue
            ratio, lower = speedup_vs_random([r["evals_to_095_mean"] for r in group], rr, budget)
            if np.isfinite(ratio):
                fast = np.mean([r["evals_to_095_mean"] for r in group])
                out.append(f"- {label}: 0.95 after {fast:.0f} evaluations (all seeds) — "
                           f"{'>= ' if lower else ''}{ratio:.1f}x fewer than random search.")
    return out + [""]


def plot_fronts(results: list[dict], extras: dict[str, dict], path: Path) -> None:
    """Calibration scores of every candidate of each 2-task search (seed 0), its Pareto front and the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from evomerge.results import RunResults

    runs = [r for r in results if r["seed"] == 0 and len(r["tasks"]) == 2 and not r["problem"].startswith("routing")]
    if not runs:
        return
    cols = 3
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.9 * rows), squeeze=False)
    for ax, r in zip(axes.ravel(), runs, strict=False):
        res = RunResults(r["run_dir"])
        t0, t1 = r["tasks"]
        pts = np.array([[x.result.task_means()[t0], x.result.task_means()[t1]] for x in res.searched])
        ax.scatter(pts[:, 0], pts[:, 1], s=8, color="0.7", label="candidates")
        fp = np.array([[x.result.task_means()[t0], x.result.task_means()[t1]] for x in res.front()])
        order = np.argsort(fp[:, 0])
        ax.plot(fp[order, 0], fp[order, 1], "o-", ms=3, color="C3", label="Pareto front")
        marks = {**{k: v for k, v in r["baselines"].items()}, **extras.get(r["problem"], {})}
        for k, (name, v) in enumerate(marks.items()):
            ax.scatter([v["calibration"][t0]], [v["calibration"][t1]], marker="*" if v.get("ta_best") else "^",
                       s=70 if v.get("ta_best") else 30, color=f"C{k % 10}", label=name, zorder=3)
        ax.scatter([r["best_cal"][t0]], [r["best_cal"][t1]], marker="o", s=80, facecolors="none", edgecolors="k",
                   label="picked", zorder=4)
        ax.set(xlabel=t0, ylabel=t1, title=f"{r['search']} (seed 0)", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(runs):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=6, loc="lower left")
    fig.suptitle(f"{runs[0]['problem']}: calibration exact match")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
