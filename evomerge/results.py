"""Read a run folder back: references, best recipe, Pareto front, baselines, test scores.

Everything here is derived from the archive (and the run's config); nothing is stored twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from evomerge.archive import Archive
from evomerge.archive.pareto import hypervolume, pareto_front
from evomerge.archive.store import Record
from evomerge.errors import ConfigError, EvomergeError, RunFailedError
from evomerge.references import References

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Row:
    """One model in a results table: calibration and test means per task, normalized mean and worst."""

    name: str
    kind: str  # base | source | handset | searched
    candidate_id: int
    recipe_hash: str
    calibration: dict[str, float]
    test: dict[str, float] | None


class RunResults:
    """A read-only view of a run (see the module docstring)."""

    def __init__(self, run_dir: str | Path) -> None:
        from evomerge.config.load import load_run

        self.run_dir = Path(run_dir)
        self.cfg = load_run(self.run_dir)
        path = self.run_dir / "archive.sqlite"
        if not path.is_file():
            raise ConfigError(f"{self.run_dir}: no archive.sqlite (the run has not evaluated anything yet)")
        self.archive = Archive(path, readonly=True)
        self.records = self.archive.records(split=None)
        self.calib = [r for r in self.records if r.split == "calibration"]
        self.full = [r for r in self.calib if r.result.fidelity == "full"]
        self.tasks = self._tasks()
        # Per split: a held-out score is set against the base's and experts' held-out scores, never against
        # their calibration scores (the two differ by sampling noise, which would tilt every relative score).
        self._refs = {split: self._references(split) for split in ("calibration", "test")}
        self.low, self.high = self._refs["calibration"]

    def _tasks(self) -> list[str]:
        for r in self.records:
            if r.ok:
                return list(r.result.tasks)
        return list(self.cfg.fitness.tasks or [])

    def _references(self, split: str) -> tuple[dict[str, float], dict[str, float]] | None:
        """(base score, best source score) per task on ``split``; ``None`` when the split lacks a reference
        model that calibration has (e.g. no test rescoring), so the two splits always use the same models."""
        def scored(recs: list[Record], kind: str) -> list[Record]:
            return [r for r in recs if r.ok and r.meta.get("kind") == kind]

        recs = self.full if split == "calibration" else [
            r for r in self.records if r.split == split and r.candidate_id < 0]
        base, srcs = scored(recs, "base"), scored(recs, "source")
        if split != "calibration":
            names = {str(r.meta.get("baseline")) for r in base + srcs}
            wanted = {str(r.meta.get("baseline")) for r in scored(self.full, "base") + scored(self.full, "source")}
            if names != wanted:
                return None
        refs = References.from_scored(base + srcs, self.tasks, self._declared())
        return refs.low, refs.high

    def _declared(self) -> dict[str, tuple[float, float]]:
        """The suite's declared references (``reference:`` of a task), which the driver normalized with too."""
        from evomerge.scoring.suite import load_suite

        try:
            suite = load_suite(self.cfg.fitness.suite)
        except EvomergeError as exc:
            log.warning("task suite %s not readable (%s): scores are set against the base and best source only",
                        self.cfg.fitness.suite, exc)
            return {}
        return {name: (ref.low, ref.high) for name, ref in suite.references().items()}

    def references(self, split: str = "calibration") -> tuple[dict[str, float], dict[str, float]]:
        """(low, high) per task on ``split``: the base's score and the best source's score there."""
        refs = self._refs.get(split)
        if refs is None:
            raise ConfigError(f"{self.run_dir}: no {split} scores of the base and source models to compare "
                              f"{split} scores with (run with fidelity.rescore_test: true)")
        return refs

    def require_success(self) -> None:
        """Raise :class:`RunFailedError` with the first error when the run has evaluations but none succeeded."""
        if not self.records or any(r.ok for r in self.records):
            return
        first = min(self.records, key=lambda r: r.seq)
        who = (f"baseline {first.meta['baseline']!r}" if first.candidate_id < 0 and first.meta.get("baseline")
               else f"candidate {first.candidate_id}")
        error = " ".join((first.result.error or "no error recorded").split())
        raise RunFailedError(
            f"all {len(self.records)} evaluations of {self.run_dir} failed; the first ({who}, "
            f"{first.split}): {error}"
        )

    # ------------------------------------------------------------------ scores
    def normalize(self, means: dict[str, float], split: str = "calibration") -> dict[str, float]:
        """(score - base) / (best source - base) per task, with the references of ``split``."""
        refs = References(*self.references(split))
        return {t: refs.value(t, means[t]) for t in self.tasks}

    def relative_to_expert(self, means: dict[str, float], split: str = "calibration") -> dict[str, float]:
        """Score / best source's score on ``split`` per task (1.0 = as good as the expert)."""
        high = self.references(split)[1]
        return {t: (means[t] / high[t] if high[t] > 0 else float("nan")) for t in self.tasks}

    def scalar(self, record: Record) -> float:
        return float(np.mean(list(self.normalize(record.result.task_means()).values())))

    @property
    def searched(self) -> list[Record]:
        """Successful searched candidates at the highest fidelity available."""
        full = [r for r in self.full if r.ok and r.candidate_id >= 0]
        if full:
            return full
        return [r for r in self.calib if r.ok and r.candidate_id >= 0]

    def best(self) -> Record | None:
        rs = self.searched
        return max(rs, key=self.scalar) if rs else None

    def front(self) -> list[Record]:
        rs = self.searched
        return pareto_front(rs, self.tasks) if rs else []

    def hypervolume(self) -> float:
        pts = [list(self.normalize(r.result.task_means()).values()) for r in self.front()]
        return hypervolume(np.array(pts), 0.0) if pts else 0.0

    def by_candidate(self, candidate_id: int) -> Record:
        rs = [r for r in self.full if r.candidate_id == candidate_id and r.ok] or [
            r for r in self.calib if r.candidate_id == candidate_id and r.ok]
        if not rs:
            raise ConfigError(f"--pick {candidate_id}: no successful evaluation of candidate {candidate_id}")
        return rs[-1]

    def test_scores(self, recipe_hash: str) -> dict[str, float] | None:
        for r in self.records:
            if r.split == "test" and r.recipe_hash == recipe_hash and r.ok:
                return r.result.task_means()
        return None

    # ------------------------------------------------------------------ tables
    def rows(self, *, front: bool = True) -> list[Row]:
        rows = []
        for r in self.full:
            if r.candidate_id < 0 and r.ok:
                rows.append(Row(str(r.meta.get("baseline")), str(r.meta.get("kind")), r.candidate_id, r.recipe_hash,
                                r.result.task_means(), self.test_scores(r.recipe_hash)))
        best = self.best()
        picked = self.front() if front else ([best] if best else [])
        if best is not None and best not in picked:
            picked.append(best)
        for r in sorted(picked, key=self.scalar, reverse=True):
            name = f"evolved #{r.candidate_id}" + (" (best)" if best is not None and r.seq == best.seq else "")
            rows.append(Row(name, "searched", r.candidate_id, r.recipe_hash, r.result.task_means(),
                            self.test_scores(r.recipe_hash)))
        return rows

    def markdown_table(self, split: str = "test") -> str:
        """Per-task scores (split), mean and worst task relative to the best source, for every row."""
        head = ["model", "kind", *self.tasks, "mean rel. expert", "worst rel. expert", "mean normalized"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in self.rows():
            means = row.test if split == "test" else row.calibration
            if means is None:
                continue
            rel = self.relative_to_expert(means, split)
            norm = self.normalize(means, split)
            cells = [row.name, row.kind, *(f"{means[t]:.3f}" for t in self.tasks),
                     f"{np.mean(list(rel.values())):.3f}", f"{min(rel.values()):.3f}",
                     f"{np.mean(list(norm.values())):.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def status(self) -> dict[str, Any]:
        told = [r for r in self.calib if r.candidate_id >= 0 and (self.cfg.fidelity.subset is None
                or r.result.fidelity != "full")]
        from evomerge.checkpoint import read_checkpoint
        from evomerge.driver.lock import holder

        best = self.best()
        ckpt = read_checkpoint(self.run_dir)
        return {
            "run": str(self.run_dir),
            "phase": None if ckpt is None else ckpt.state.get("phase"),
            "driver": holder(self.run_dir),  # the live (or killed) driver's pid and host; None when none holds it
            "evaluations": len(told),
            "budget": self.cfg.budget.evaluations,
            "failures": sum(1 for r in told if not r.ok),
            "best": None if best is None else {
                "candidate": best.candidate_id, "hash": best.recipe_hash,
                "scores": best.result.task_means(), "normalized_mean": self.scalar(best)},
            "front_size": len(self.front()),
            "hypervolume": self.hypervolume(),
            "tasks": self.tasks,
        }
