"""Comparing two runs of the same config: what a resumed run must share with an uninterrupted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.archive import Archive


def archive_rows(run_dir: str | Path) -> list[tuple[Any, ...]]:
    """Every archived evaluation in order: candidate, recipe hash, split, fidelity, status, per-example scores
    (bytes: compared bit for bit)."""
    with Archive(Path(run_dir) / "archive.sqlite", readonly=True) as a:
        return [(r.candidate_id, r.recipe_hash, r.split, r.result.fidelity, r.result.status,
                 tuple((t, ts.scores.tobytes()) for t, ts in r.result.tasks.items()))
                for r in a.records(split=None)]


def duplicates(rows: list[tuple[Any, ...]]) -> int:
    """How many evaluations were stored more than once (same candidate, split and fidelity)."""
    return len(rows) - len({(r[0], r[2], r[3]) for r in rows})


def decided_state(run_dir: str | Path) -> dict[str, Any]:
    """The final checkpoint's state without the clock, the optimizer's opaque blob (cma pickles its own timer)
    replaced by what it decides: the genomes of the next 5 candidates an optimizer restored from it proposes."""
    from evomerge.checkpoint import read_checkpoint
    from evomerge.config.load import load_run
    from evomerge.driver.run import preflight

    ckpt = read_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint")
    state = {k: v for k, v in ckpt.state.items() if k != "elapsed"}
    opt = preflight(load_run(run_dir)).optimizer
    opt.load_state_dict(state["optimizer"])
    state["optimizer"] = {k: v for k, v in state["optimizer"].items() if k != "blob"}
    state["next"] = [c.genome.tolist() for c in opt.ask(5)]
    return state
