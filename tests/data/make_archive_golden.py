"""Write the golden archive and checkpoint of the current schema versions into ``tests/data/``.

Run once per schema version (``python tests/data/make_archive_golden.py`` from the repository root)
and commit the files it writes: ``archive_v<N>.sqlite`` and ``checkpoint_v<N>/checkpoint.json``.
Later versions of evomerge must keep reading them; ``tests/test_archive.py`` and
``tests/test_checkpoint.py`` check their content against the values written here.
"""

from __future__ import annotations

import math
import sqlite3
import sys
from pathlib import Path

import numpy as np

from evomerge.archive import SCHEMA_VERSION as ARCHIVE_VERSION
from evomerge.archive import Archive
from evomerge.checkpoint import SCHEMA_VERSION as CHECKPOINT_VERSION
from evomerge.checkpoint import save_checkpoint
from evomerge.evaluation import Candidate, EvalResult, TaskScores
from evomerge.recipe import ModelEntry, Recipe
from evomerge.rng import rng_to_json

HERE = Path(__file__).resolve().parent


def _linear(w_a: float, w_b: float) -> Recipe:
    return Recipe(
        method="linear",
        models=(
            ModelEntry(model="math", parameters={"weight": w_a}),
            ModelEntry(model="code", parameters={"weight": w_b}),
        ),
        sources={"math": "zoo/math", "code": "zoo/code"},
    )


def write_archive(path: Path) -> None:
    path.unlink(missing_ok=True)
    add_ids = ("add-0", "add-1", "add-2", "add-3")
    rev_ids = ("rev-0", "rev-1")
    with Archive(path) as archive:
        archive.append(
            Candidate(0, np.array([0.25, 0.75]), meta={"generation": 0}),
            _linear(0.25, 0.75),
            EvalResult(
                candidate_id=0,
                status="ok",
                tasks={
                    "add": TaskScores(add_ids, np.array([1.0, 0.0, 1.0, 1.0]), metric="exact_match"),
                    "rev": TaskScores(rev_ids, np.array([0.5, 0.25]), metric="char_f1"),
                },
                timings={"merge": 0.5, "score": 1.25, "total": 1.75},
                worker="w0",
                fidelity="subset:4",
            ),
        )
        archive.append(
            Candidate(1, np.array([0.5, 0.5]), meta={"generation": 0}),
            _linear(0.5, 0.5),
            EvalResult(
                candidate_id=1,
                status="failed",
                error="MaterializeError: non-finite weights in model.layers.0.mlp.up_proj.weight",
                timings={"merge": 0.125},
                worker="w1",
                fidelity="subset:4",
            ),
        )
        ties = Recipe(
            method="ties",
            base_model="base",
            models=(
                ModelEntry(
                    model="math", parameters={"weight": 0.6, "density": {"attn": 0.3, "default": [0.2, 0.8]}}
                ),
                ModelEntry(model="code", parameters={"weight": 0.4, "density": 0.5}),
            ),
            parameters={"normalize": True},
            dtype="float32",
            seed=7,
        )
        archive.append(
            Candidate(2, np.array([0.1, 0.2, 0.3]), meta={"generation": 1, "parents": [0, 1]}),
            ties,
            EvalResult(
                candidate_id=2,
                status="ok",
                tasks={
                    "rev": TaskScores(rev_ids, np.array([1.0, 0.75]), metric="char_f1"),
                    "add": TaskScores(add_ids, np.array([0.0, 1.0, 1.0, 1.0]), metric="exact_match"),
                },
                timings={"total": 2.5},
                worker="w0",
                fidelity="full",
            ),
        )
        archive.append(
            Candidate(3, np.array([0.1, 0.2, 0.3])),
            ties,
            EvalResult(
                candidate_id=3,
                status="ok",
                tasks={"add": TaskScores(("t-0", "t-1"), np.array([1.0, math.nan]), metric="exact_match")},
                fidelity="full",
            ),
            split="test",
            meta={"opt_in": True},
        )
    with sqlite3.connect(path) as db:
        db.execute("VACUUM")
    db.close()


def write_checkpoint(folder: Path) -> None:
    for name in ("checkpoint.json", "checkpoint.prev.json"):
        (folder / name).unlink(missing_ok=True)
    rng = np.random.default_rng(1234)
    rng.random(5)
    state = {
        "optimizer": {"name": "cma_es", "generation": 3, "sigma": 0.3, "mean": [0.25, 0.75]},
        "rng": rng_to_json(rng),
        "next_candidate_id": 4,
        "best_fitness": -math.inf,
        "note": "résumé ✓",
    }
    save_checkpoint(folder, state, cursor=4)


def main() -> int:
    write_archive(HERE / f"archive_v{ARCHIVE_VERSION}.sqlite")
    write_checkpoint(HERE / f"checkpoint_v{CHECKPOINT_VERSION}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
