"""Export a run's winner: merged HF folder, ``recipe.yaml``, ``mergekit.yaml`` (when expressible), model card."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from evomerge.errors import ConfigError
from evomerge.results import RunResults

log = logging.getLogger(__name__)


def _card(res: RunResults, rec) -> str:  # noqa: ANN001
    cal = rec.result.task_means()
    test = res.test_scores(rec.recipe_hash)
    try:
        expert_test: dict[str, float] | None = res.references("test")[1]
    except ConfigError:
        expert_test = None
    lines = ["", "## Scores", "", "| task | calibration | held-out test | best expert (calibration) | best expert (test) |",
             "|---|---|---|---|---|"]
    for t in res.tasks:
        tv = f"{test[t]:.3f}" if test else "n/a"
        ev = f"{expert_test[t]:.3f}" if expert_test else "n/a"
        lines.append(f"| {t} | {cal[t]:.3f} | {tv} | {res.high[t]:.3f} | {ev} |")
    lines += ["", f"Run `{res.cfg.name}`, candidate {rec.candidate_id}, optimizer `{res.cfg.optimizer.name}`."]
    return "\n".join(lines) + "\n"


def export_run(run_dir: str | Path, *, pick: str = "best", out: str | Path | None = None, overwrite: bool = False) -> list[Path]:
    """Export ``best``, every ``pareto`` member, or candidate ``ID``; returns the written folders.

    The export folder is written whole or not at all (a killed export leaves the previous one, or none)."""
    from evomerge.io.atomic import atomic_folder

    res = RunResults(run_dir)
    if pick == "best":
        best = res.best()
        picked = [best] if best is not None else []
    elif pick == "pareto":
        picked = res.front()
    else:
        try:
            picked = [res.by_candidate(int(pick))]
        except ValueError:
            raise ConfigError(f"--pick: expected best, pareto or a candidate id, got {pick!r}") from None
    if not picked:
        res.require_success()
        raise ConfigError(f"{run_dir}: no successful evaluation to export yet")
    out_root = Path(out) if out is not None else res.run_dir / "export"
    with atomic_folder(out_root, overwrite=overwrite, what="export") as tmp_root:
        written = _export(res, picked, tmp_root)
    return [out_root / p.relative_to(tmp_root) for p in written]


def _export(res: RunResults, picked: list[Any], out_root: Path) -> list[Path]:
    from evomerge.driver.run import CACHE_DIR, STATS_DIR
    from evomerge.io import ModelFolder, tensor_role
    from evomerge.merge.materialize import materialize_to_disk
    from evomerge.merge.stats import recipe_stats
    from evomerge.mergekit_compat import to_mergekit_yaml

    written = []
    for rec in picked:
        target = out_root if len(picked) == 1 else out_root / f"candidate-{rec.candidate_id}"
        recipe = rec.recipe.model_copy(update={"sources": dict(res.cfg.sources)})
        # a data-informed recipe reads the statistics its search computed: loaded from the run's cache
        stats, _ = recipe_stats(recipe, res.cfg.sources, res.run_dir / CACHE_DIR / STATS_DIR)
        path = materialize_to_disk(recipe, target, overwrite=True, card_extra=_card(res, rec), stats=stats)
        (path / "recipe.yaml").write_text(recipe.to_yaml())
        folder = ModelFolder.open(Path(res.cfg.sources[recipe.reference_model]))
        tensors = [(n, tensor_role(n, folder.model_type)) for n in folder.tensor_names]
        try:
            mk = to_mergekit_yaml(recipe, tensors=tensors, num_layers=folder.num_layers,
                                  model_type=folder.model_type)
            (path / "mergekit.yaml").write_text(mk)
        except ConfigError as exc:
            (path / "mergekit.txt").write_text(f"not expressible as mergekit YAML: {exc}\n")
            log.info("candidate %d: no mergekit.yaml (%s)", rec.candidate_id, exc)
        folder.close()
        written.append(path)
    return written
