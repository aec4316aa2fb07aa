"""``evomerge report RUN``: PNG plots and a markdown summary, all derived from the archive.

A run whose every evaluation failed has nothing to plot: :class:`~evomerge.errors.RunFailedError` names
its first error instead.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.archive.pareto import hypervolume_history

log = logging.getLogger(__name__)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report/`` (or ``out``): progress and Pareto plots and ``report.md``; replaced whole or not at all."""
    from evomerge.io.atomic import atomic_folder
    from evomerge.results import RunResults

    res = RunResults(run_dir)
    res.require_success()
    out_dir = Path(out) if out is not None else res.run_dir / "report"
    with atomic_folder(out_dir, overwrite=True, what="report") as tmp:
        _write(res, tmp)
    log.info("report written to %s", out_dir)
    return out_dir


def _write(res: Any, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = res.tasks
    searched = [r for r in res.calib if r.candidate_id >= 0]
    fid = "full" if any(r.result.fidelity == "full" for r in searched) and res.cfg.fidelity.subset is None else None
    told = [r for r in searched if fid is None or r.result.fidelity == fid]
    if res.cfg.fidelity.subset is not None:
        told = [r for r in searched if r.result.fidelity != "full"]

    # --- progress: best normalized mean and hypervolume over evaluations
    norm_pts = np.array([[res.normalize(r.result.task_means())[t] for t in tasks] if r.ok else [np.nan] * len(tasks)
                         for r in told]) if told else np.zeros((0, len(tasks)))
    best = np.fmax.accumulate(np.where(np.isfinite(norm_pts).all(1), norm_pts.mean(1), -np.inf)) if told else []
    hv = hypervolume_history(told, tasks, ref=[res.low[t] for t in tasks]) if told else []
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(np.arange(1, len(best) + 1), best, color="C0")
    ax[0].set(xlabel="evaluations", ylabel="best mean normalized score", title="best so far")
    ax[1].plot(np.arange(1, len(hv) + 1), hv, color="C1")
    ax[1].set(xlabel="evaluations", ylabel="hypervolume (ref = base)", title="hypervolume")
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "progress.png", dpi=110)
    plt.close(fig)

    # --- Pareto front (pairwise for > 2 tasks), with the baselines
    front = res.front()
    pairs = list(itertools.combinations(range(len(tasks)), 2)) or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.4 * len(pairs), 4), squeeze=False)
    pts = {r.seq: [r.result.task_means()[t] for t in tasks] for r in res.searched}
    bases = [(row.name, [row.calibration[t] for t in tasks]) for row in res.rows(front=False) if row.kind != "searched"]
    for ax, (i, j) in zip(axes[0], pairs, strict=True):
        all_p = np.array(list(pts.values())) if pts else np.zeros((0, len(tasks)))
        if len(all_p):
            ax.scatter(all_p[:, i], all_p[:, j], s=10, color="0.7", label="candidates")
        fp = np.array([[r.result.task_means()[t] for t in tasks] for r in front]) if front else np.zeros((0, 2))
        if len(fp):
            order = np.argsort(fp[:, i])
            ax.plot(fp[order, i], fp[order, j], "o-", color="C3", label="Pareto front")
        for k, (name, p) in enumerate(bases):
            ax.scatter([p[i]], [p[j]], marker="^", s=40, color=f"C{k % 10}", label=name)
        ax.set(xlabel=tasks[i], ylabel=tasks[j] if len(tasks) > 1 else tasks[i])
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("calibration scores (full set)")
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=110)
    plt.close(fig)

    status = res.status()
    md = [f"# Run `{res.cfg.name}`", "",
          f"- optimizer: `{res.cfg.optimizer.name}`, space: `{res.cfg.space.template}`, seed {res.cfg.seed}",
          f"- evaluations: {status['evaluations']} (failures: {status['failures']}), Pareto front: "
          f"{status['front_size']}, hypervolume (normalized, ref 0): {status['hypervolume']:.4f}", "",
          "## Held-out test split", "", res.markdown_table("test"), "",
          "## Calibration split (full)", "", res.markdown_table("calibration"), "",
          "![progress](progress.png)", "", "![pareto](pareto.png)", ""]
    (out_dir / "report.md").write_text("\n".join(md))
