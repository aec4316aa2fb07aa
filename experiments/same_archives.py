"""Do two run folders hold the same search? For checking that a change of the code kept behaviour.

Compares, row by row, every archived evaluation (candidate id, recipe hash, split, fidelity, status and every
per-example score bit for bit: the same rows mean the optimizer proposed the same genomes in the same order)
and the final checkpoint state (the optimizer's JSON state, references, promotions, counters), less what depends
on the clock (elapsed time) and the optimizer's opaque third-party pickle (``blob``: cma and nevergrad objects,
whose dict keys include per-process string hashes and uuid4 ids that differ between any two processes). Runs
of the same config and seed on two versions of the code must agree on all of it.

    python experiments/same_archives.py RUN_A RUN_B [RUN_A2 RUN_B2 ...]

Exit 0 when every pair agrees, 1 otherwise (the first difference of each pair is printed).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.testing.runs import archive_rows  # noqa: E402

#: Checkpoint fields that are not the search: the clock, and the opaque library pickle (see the docstring).
SKIPPED = {"elapsed", "created", "blob"}


def _first_difference(a: Any, b: Any, path: str) -> str | None:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        same = isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape and bool(
            np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
        return None if same else path
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k in SKIPPED:
                continue
            if k not in a or k not in b:
                return f"{path}.{k} (missing on one side)"
            d = _first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return None
    return None if a == b else f"{path}: {str(a)[:80]} != {str(b)[:80]}"


def compare(run_a: Path, run_b: Path) -> str | None:
    rows_a, rows_b = archive_rows(run_a), archive_rows(run_b)
    if len(rows_a) != len(rows_b):
        return f"archive: {len(rows_a)} vs {len(rows_b)} rows"
    d = _first_difference(rows_a, rows_b, "archive")
    if d:
        return d
    state_a = json.loads((run_a / "checkpoint.json").read_text())["payload"]["state"]
    state_b = json.loads((run_b / "checkpoint.json").read_text())["payload"]["state"]
    return _first_difference(state_a, state_b, "checkpoint")


def main() -> int:
    args = [Path(a) for a in sys.argv[1:]]
    if not args or len(args) % 2:
        print(__doc__)
        return 2
    ok = True
    for run_a, run_b in zip(args[::2], args[1::2], strict=True):
        d = compare(run_a, run_b)
        rows = len(archive_rows(run_a))
        print(f"{run_a} vs {run_b}: " + ("same" if d is None else f"DIFFERENT at {d}") + f" ({rows} archive rows)")
        ok = ok and d is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
