"""The run's calibration subset: chosen once from the reference models' full-set scores, kept in the run folder.

``calibration_subset.json`` is written (temporary file, then ``os.replace``) the first time the subset is chosen.
A resumed run reads it back instead of choosing again, so the subset its archived evaluations used is the one it
keeps using; the choice is deterministic anyway (see :mod:`evomerge.scoring.anchors`), the file makes it visible
and pins it. A file that does not match the run's ``fidelity`` settings is refused naming it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import CheckpointError, ConfigError, RunFolderError
from evomerge.evaluation import EvalResult
from evomerge.scoring.anchors import CalibrationSubset, choose_subset

log = logging.getLogger(__name__)

SUBSET_FILE = "calibration_subset.json"


def calibration_subset(run_dir: str | Path, method: str, k: int, seed: int,
                       references: Sequence[EvalResult], tasks: Sequence[str]) -> CalibrationSubset:
    """The run's subset: the one in ``run_dir`` if there is one, else chosen now from ``references`` and stored."""
    path = Path(run_dir) / SUBSET_FILE
    if path.exists():
        try:
            doc = json.loads(path.read_text())
            got = CalibrationSubset.from_json(doc, source=str(path))
        except (OSError, ValueError, ConfigError) as exc:
            raise CheckpointError(f"{path}: cannot read the run's calibration subset ({exc}); remove it to choose "
                                  "it again from the archived reference scores") from None
        if (got.method, got.k, got.seed) != (method, k, seed) or set(got.tasks) != set(tasks):
            raise CheckpointError(f"{path}: a {got.method} subset of {got.k} (seed {got.seed}) over tasks "
                                  f"{sorted(got.tasks)}, but the run has fidelity.subset_method {method}, subset {k}, "
                                  f"seed {seed}, tasks {sorted(tasks)}")
        return got
    sub = choose_subset(method, k, seed, references, tasks)
    tmp = path.with_name(f".{SUBSET_FILE}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(sub.to_json(), sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise RunFolderError(f"run folder {run_dir}: cannot write {SUBSET_FILE} ({exc})") from exc
    strata = {t: len(p.strata) for t, p in sorted(sub.tasks.items())}
    log.info("calibration subset (%s, %d per task) chosen; strata per task: %s", method, k, strata)
    return sub
