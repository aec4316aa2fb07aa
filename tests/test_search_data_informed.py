"""Searches over data-informed methods (fisher, regmean): the driver computes the calibration statistics once
per source into ``<run>/cache/stats/`` before the search, the workers load them, and a resumed or repeated run loads
them from that cache. On the ``test`` zoo with a 2-task suite of a few examples.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from evomerge.config import RunConfig
from evomerge.driver.run import preflight, resume_run, start_run
from evomerge.errors import ConfigError
from evomerge.testing.runs import archive_rows, decided_state

DATA = {"suite": "builtin:zoo-2", "examples": 3}


def _cfg(zoo, out: Path, template: str, name: str = "s", evals: int = 6, **overrides) -> RunConfig:
    return RunConfig.model_validate({
        "name": name, "output_dir": str(out), "base_model": "base", "seed": 1,
        "sources": {"base": str(zoo.base), "add": str(zoo.expert("add")), "rev": str(zoo.expert("rev"))},
        "space": {"template": template, "overrides": overrides},
        "optimizer": {"name": "cma_es", "options": {"popsize": 3}},
        "budget": {"evaluations": evals},
        "fitness": {"suite": "builtin:zoo-2", "batch_size": 32},
        "resources": {"threads_per_worker": 1}})


def _computed(caplog) -> int:
    return sum("calibration statistics computed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("template", ["builtin:regmean-global", "builtin:fisher-global"])
def test_a_search_over_a_data_informed_method_computes_the_statistics_once(zoo_test, tmp_path, caplog, template):
    caplog.set_level("INFO", logger="evomerge")
    run_dir = start_run(_cfg(zoo_test, tmp_path / "runs", template, data=DATA))
    assert _computed(caplog) == 2  # one file per merged source, computed before the search
    files = sorted((run_dir / "cache" / "stats").glob("stats-*.safetensors"))
    assert len(files) == 2
    rows = archive_rows(run_dir)
    scored = [r for r in rows if r[0] >= 0 and r[2] == "calibration"]
    assert len(scored) == 6
    # the same run again into a new folder with the cache copied: loads, computes nothing, same archive
    caplog.clear()
    again = tmp_path / "runs2" / "s"
    again.mkdir(parents=True)
    (again / "cache" / "stats").mkdir(parents=True)
    for f in files:
        (again / "cache" / "stats" / f.name).write_bytes(f.read_bytes())
    run2 = start_run(_cfg(zoo_test, tmp_path / "runs2", template, data=DATA))
    assert _computed(caplog) == 0
    assert sum("calibration statistics loaded" in r.getMessage() for r in caplog.records) == 2
    assert archive_rows(run2) == rows


def test_resuming_a_data_informed_search_loads_the_cache_and_replays_exactly(zoo_test, tmp_path, caplog):
    caplog.set_level("INFO", logger="evomerge")
    run = start_run(_cfg(zoo_test, tmp_path / "runs", "builtin:regmean-global", evals=4, data=DATA))
    rows, state = archive_rows(run), decided_state(run)
    caplog.clear()
    resume_run(run)  # the run finished: a replay over the same statistics, read from <run>/cache/stats
    assert _computed(caplog) == 0
    assert sum("calibration statistics loaded" in r.getMessage() for r in caplog.records) == 2
    assert archive_rows(run) == rows
    assert decided_state(run) == state


def test_a_data_informed_space_without_data_is_refused_at_preflight(zoo_test, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="space.template: method 'fisher' reads calibration statistics"):
        preflight(_cfg(zoo_test, tmp_path / "runs", "builtin:fisher-global"))
    assert not (tmp_path / "runs").exists()
