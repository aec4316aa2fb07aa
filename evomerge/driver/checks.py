"""Preflight checks of a run's settings against this machine and its task data, before any work.

* ``resources.device`` must name a device this machine has (``cuda`` needs CUDA, ``cuda:N`` needs at least
  N + 1 devices, ``mps`` needs Metal), unless the workers run on a Ray cluster joined by ``address``;
* ``output_dir`` must be a folder that exists or can be created, and that can be written to (probed with a
  temporary folder that is removed at once, so nothing is left behind);
* on a Ray cluster joined by ``resources.address``, every node that can hold a worker must be able to open
  every source folder (:func:`~evomerge.driver.nodes.check_cluster_sources`, which names the node and the path);
* ``fidelity.subset`` must be smaller than some task's calibration split, or the cheap evaluation is the
  full one; a task whose split is not larger than the subset is scored whole, with a warning.

Each problem is a :class:`~evomerge.errors.ConfigError` naming the field.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from evomerge.config import RunConfig
from evomerge.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["check_cluster", "check_device", "check_output_dir", "check_subset"]

_DEVICES = "auto, cpu, cuda, cuda:N or mps"


def check_device(cfg: RunConfig) -> None:
    """Refuse a ``resources.device`` that this machine does not have (workers on a cluster: not checked)."""
    res = cfg.resources
    if res.device == "auto" or (res.backend == "ray" and res.address):
        return
    import torch

    try:
        dev = torch.device(res.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"resources.device: {res.device!r} is not a device ({_DEVICES})") from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise ConfigError(f"resources.device: {res.device!r} but {why}; use cpu (or auto)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(
                f"resources.device: {res.device!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return
    backend: Any = torch.backends.mps if dev.type == "mps" else getattr(torch, dev.type, None)
    available = getattr(backend, "is_available", None)
    if available is None:
        raise ConfigError(f"resources.device: {res.device!r} is not supported ({_DEVICES})")
    if not available():
        raise ConfigError(f"resources.device: {res.device!r} is not available on this machine; use cpu (or auto)")


def check_cluster(cfg: RunConfig) -> None:
    """On a Ray cluster (``resources.address``): every worker node sees every source folder."""
    res = cfg.resources
    if res.backend != "ray" or not res.address:
        return
    from evomerge.driver.nodes import check_cluster_sources

    check_cluster_sources(res, dict(cfg.sources))


def check_output_dir(cfg: RunConfig) -> None:
    """Refuse an ``output_dir`` (or run folder) that is a file, or that cannot be created or written to."""
    out = Path(cfg.output_dir).expanduser()
    existing = out
    while not os.path.lexists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == out else f"cannot be created: {existing} is a file"
        raise ConfigError(f"output_dir: {out} {where}; give a folder")
    run_dir = out / cfg.name
    if os.path.lexists(run_dir) and not run_dir.is_dir():
        raise ConfigError(f"output_dir: the run folder {run_dir} (output_dir/name) is a file; choose another name")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".evomerge-write-check-", dir=existing))
    except OSError as exc:
        what = "write to" if existing == out else "create"
        raise ConfigError(f"output_dir: cannot {what} {out}: {exc.strerror} ({existing})") from None


def check_early_stop(cfg: RunConfig) -> None:
    """Refuse ``fidelity.early_stop`` with an optimizer that reads every example's score of every candidate."""
    if cfg.fidelity.early_stop == "off":
        return
    from evomerge.optim import OPTIMIZERS, PER_EXAMPLE

    if PER_EXAMPLE in OPTIMIZERS.capabilities(cfg.optimizer.name):
        raise ConfigError(f"fidelity.early_stop: optimizer {cfg.optimizer.name} needs the score of every example of "
                          "every candidate; set early_stop: off")


def check_subset(cfg: RunConfig, suite: Any) -> None:
    """Refuse a ``fidelity.subset`` at least as large as every calibration split; warn per task it covers."""
    subset = cfg.fidelity.subset
    if subset is None:
        return
    sizes = {t.name: len(t.splits["calibration"]) for t in suite.tasks if "calibration" in t.splits}
    whole = {name: n for name, n in sizes.items() if n <= subset}
    if sizes and len(whole) == len(sizes):
        listed = ", ".join(f"{name}: {n}" for name, n in sizes.items())
        raise ConfigError(
            f"fidelity.subset: {subset} examples per task, but no task has more calibration examples ({listed}), "
            f"so the cheap evaluation would be the full one; give a smaller subset or remove fidelity.subset"
        )
    for name, n in whole.items():
        log.warning("fidelity.subset: %d examples per task, but task %r has %d calibration examples: its cheap "
                    "evaluation scores all of them", subset, name, n)
