"""Searches over data-informed methods (fisher, regmean): the driver computes the calibration statistics once
per source into ``<run>/cache/stats/`` before the search, the workers load them, and a resumed or repeated run loads
them from that cache. On the ``test`` zoo with a 2-task suite of a few examples.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from evomerge.config import RunConfig
from evomerge.driver.run import preflight, resume_run, start_run
from evomerge.errors import ConfigError
from evomerge.export import export_run
from evomerge.merge.materialize import materialize_state_dict
from evomerge.merge.stats import MergeStats
from evomerge.merge.stats import load_file as load_stats
from evomerge.results import RunResults
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


OWN = {**DATA, "model_tasks": {"add": ["add"], "rev": ["rev"]}}  # each expert's statistics on its own task


@pytest.mark.parametrize(("template", "data"), [("builtin:regmean-global", DATA), ("builtin:fisher-global", DATA),
                                                ("builtin:regmean-per-layer", DATA),
                                                ("builtin:fisher-per-layer", OWN)])
def test_a_search_over_a_data_informed_method_computes_the_statistics_once(zoo_test, tmp_path, caplog, template,
                                                                           data):
    caplog.set_level("INFO", logger="evomerge")
    run_dir = start_run(_cfg(zoo_test, tmp_path / "runs", template, data=data))
    assert _computed(caplog) == 2  # one file per merged source, computed before the search
    files = sorted((run_dir / "cache" / "stats").glob("stats-*.safetensors"))
    assert len(files) == 2
    per_model = 3 if "model_tasks" in data else 6  # its own task's examples, or both tasks'
    for f in files:
        with safe_open(str(f), "pt") as fh:
            assert fh.metadata()["examples"] == str(per_model), f
    rows = archive_rows(run_dir)
    scored = [r for r in rows if r[0] >= 0 and r[2] == "calibration"]
    assert len(scored) == 6
    # the export merges the best recipe with the statistics the search computed (read from the run's cache)
    (out,) = export_run(run_dir)
    assert sorted((run_dir / "cache" / "stats").glob("stats-*.safetensors")) == files
    res = RunResults(run_dir)
    names = {v: k for k, v in res.cfg.sources.items()}
    kinds = ("fisher",) if "fisher" in template else ("gram",)
    by_model = {}
    for f in files:
        with safe_open(str(f), "pt") as fh:
            by_model[names[fh.metadata()["model"]]] = load_stats(f, kinds)
    want = materialize_state_dict(res.best().recipe, res.cfg.sources, stats=MergeStats(by_model))
    got = {k: v for shard in out.glob("*.safetensors") for k, v in load_file(str(shard)).items()}
    assert got and all(torch.equal(t, want[name]) for name, t in got.items())
    # the same run again into a new folder with the cache copied: loads, computes nothing, same archive
    caplog.clear()
    again = tmp_path / "runs2" / "s"
    again.mkdir(parents=True)
    (again / "cache" / "stats").mkdir(parents=True)
    for f in files:
        (again / "cache" / "stats" / f.name).write_bytes(f.read_bytes())
    run2 = start_run(_cfg(zoo_test, tmp_path / "runs2", template, data=data))
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


def test_a_search_over_aims_omega_computes_the_activations_once_and_scores_in_place_as_on_disk(zoo_test, tmp_path,
                                                                                               caplog):
    """``aim:`` makes AIM's ω a gene (x0: ω = 0, plain task arithmetic); the base's activations are computed before
    the search although x0 reads none, and a candidate with ω > 0 scores in place as its merge on disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.materialize import materialize_to_disk
    from evomerge.merge.stats import recipe_stats
    from evomerge.results import RunResults
    from evomerge.scoring.base import make_scorer
    from evomerge.scoring.suite import load_suite

    caplog.set_level("INFO", logger="evomerge")
    run_dir = start_run(_cfg(zoo_test, tmp_path / "runs", "builtin:task-arithmetic-aim", data=DATA))
    assert _computed(caplog) == 1  # the base's activations
    searched = [r for r in RunResults(run_dir).calib if r.candidate_id >= 0]
    omegas = [r.recipe.data.aim for r in searched]
    assert len(searched) == 6 and all(r.ok for r in searched) and len(set(omegas)) == 6 and max(omegas) > 0.05
    rec = max(searched, key=lambda r: r.recipe.data.aim)
    paths = {"base": str(zoo_test.base), "add": str(zoo_test.expert("add")), "rev": str(zoo_test.expert("rev"))}
    stats, records = recipe_stats(rec.recipe, paths, run_dir / "cache" / "stats")
    assert not any(r.computed for r in records)
    folder = materialize_to_disk(rec.recipe, tmp_path / "merged", paths=paths, stats=stats)
    got = make_scorer("hf", batch_size=32).score(AutoModelForCausalLM.from_pretrained(folder).eval(),
                                                 AutoTokenizer.from_pretrained(zoo_test.base),
                                                 load_suite("builtin:zoo-2"), split="calibration")
    for task, ts in rec.result.tasks.items():
        assert got.tasks[task].scores.tolist() == ts.scores.tolist(), task
    with pytest.raises(ConfigError, match="aim: AIM adjusts the merge.*give the section a data: block"):
        preflight(_cfg(zoo_test, tmp_path / "runs", "builtin:task-arithmetic-aim", name="nodata"))
    with pytest.raises(ConfigError, match="data.aim: a fixed ω beside the aim: gene"):
        preflight(_cfg(zoo_test, tmp_path / "runs", "builtin:task-arithmetic-aim", name="both",
                       data={**DATA, "aim": 0.3}))
    with pytest.raises(ConfigError, match=r"aim.range.*0 <= low < high <= 1"):
        preflight(_cfg(zoo_test, tmp_path / "runs", "builtin:task-arithmetic-aim", name="range", data=DATA,
                       aim={"range": [0.0, 2.0]}))



def _lewis_cfg(zoo, out: Path, name: str, template: str = "builtin:ties-per-layer", **space) -> RunConfig:
    return RunConfig.model_validate({
        "name": name, "output_dir": str(out), "base_model": "base", "seed": 1,
        "sources": {"base": str(zoo.base), "add": str(zoo.expert("add")), "rev": str(zoo.expert("rev"))},
        "space": {"template": template, **space},
        "optimizer": {"name": "cma_es", "options": {"popsize": 3, "x0_first": True}},
        "budget": {"evaluations": 4}, "fitness": {"suite": "builtin:zoo-2", "batch_size": 32},
        "resources": {"threads_per_worker": 1}})


def test_lewis_start_begins_a_per_layer_ties_search_at_lewis_densities_and_resumes_exactly(zoo_test, tmp_path,
                                                                                            caplog):
    from transformers import AutoTokenizer

    from evomerge.merge.lewis import lewis_recipe
    from evomerge.merge.stats import MergeStats, calibration_requests, load_or_collect
    from evomerge.recipe import DataSpec, Recipe
    from evomerge.results import RunResults
    from evomerge.scoring.suite import load_suite

    caplog.set_level("INFO", logger="evomerge")
    lewis = {"suite": "builtin:zoo-2", "examples": 3}
    run = start_run(_lewis_cfg(zoo_test, tmp_path / "runs", "lewis", lewis_start=lewis))
    msgs = [r.getMessage() for r in caplog.records if "activations of" in r.getMessage()]
    assert len(msgs) == 3 and all("computed" in m for m in msgs)  # base, add, rev: once each
    first = RunResults(run).by_candidate(0).recipe
    # by hand, from the cached activations: the template's start (density 0.5) with LEWIS's per-layer densities
    spec = DataSpec(suite="builtin:zoo-2", examples=3)
    reqs = calibration_requests(load_suite(spec.suite), AutoTokenizer.from_pretrained(zoo_test.base), spec)
    paths = {"base": str(zoo_test.base), "add": str(zoo_test.expert("add")), "rev": str(zoo_test.expert("rev"))}
    acts = {}
    for m, p in paths.items():
        acts[m], rec = load_or_collect(p, reqs, ("act",), run / "cache" / "stats")
        assert not rec.computed
    start = Recipe.model_validate({**first.model_dump(), "models": [
        {"model": e.model, "parameters": {**e.parameters, "density": 0.5}} for e in first.models]})
    layers = len(first.models[0].parameters["density"])  # the test zoo's layers
    want = lewis_recipe(start, MergeStats(acts), layers, density=0.5, spread=1.0)
    for got_e, want_e in zip(first.models, want.models, strict=True):
        assert got_e.parameters["density"] == pytest.approx(want_e.parameters["density"], abs=1e-6)
        assert len(set(want_e.parameters["density"])) > 1  # per layer, not uniform
    rows, state = archive_rows(run), decided_state(run)
    caplog.clear()
    resume_run(run)
    assert not any("computed" in r.getMessage() for r in caplog.records if "activations of" in r.getMessage())
    assert archive_rows(run) == rows and decided_state(run) == state
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match="space.lewis_start: method 'task_arithmetic' has no per-model density"):
        preflight(_lewis_cfg(zoo_test, out, "ta", "builtin:task-arithmetic-per-layer", lewis_start=lewis))
    with pytest.raises(ConfigError, match="space.lewis_start: the template's granularity is global"):
        preflight(_lewis_cfg(zoo_test, out, "g", lewis_start=lewis, overrides={"granularity": "global"}))
    with pytest.raises(ValueError, match="warm_start and lewis_start both choose the start point"):
        _lewis_cfg(zoo_test, out, "w", lewis_start=lewis, warm_start={"weights": [0.5]})
    assert not out.exists()
