"""The archive of every evaluation (SQLite, append-only) and what is derived from it (Pareto front, HV)."""

from __future__ import annotations

from evomerge.archive.pareto import hypervolume, hypervolume_history, objectives, pareto_front
from evomerge.archive.store import SCHEMA_VERSION, Archive, Record, mean_of_tasks

__all__ = [
    "SCHEMA_VERSION",
    "Archive",
    "Record",
    "hypervolume",
    "hypervolume_history",
    "mean_of_tasks",
    "objectives",
    "pareto_front",
]
