"""End-to-end runs on a tiny model family: LocalPool and RayPool, exact resume after SIGKILL, worker death."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evomerge.archive import Archive
from evomerge.cli import app
from evomerge.driver.run import resume_run, start_run
from evomerge.results import RunResults
from evomerge.testing.family import build_family, write_perplexity_suite, write_run_config


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("drv")
    fam = build_family(root / "fam", 2)
    suite = write_perplexity_suite(root / "suite")
    return root, fam, suite


def _rows(run_dir: Path) -> list[tuple]:
    with Archive(run_dir / "archive.sqlite", readonly=True) as a:
        return [(r.candidate_id, r.recipe_hash, r.split, r.result.fidelity, r.result.status,
                 tuple((t, tuple(np.round(ts.scores, 12))) for t, ts in r.result.tasks.items()))
                for r in a.records(split=None)]


def test_local_run_end_to_end_with_cli(setup, tmp_path):
    _, fam, suite = setup
    cfg = write_run_config(tmp_path / "cfg.yaml", fam, suite, name="e2e", evals=10)
    runner = CliRunner()
    res = runner.invoke(app, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "e2e"
    for f in ("config.resolved.yaml", "space.txt", "archive.sqlite", "checkpoint.json", "events.jsonl",
              "report/report.md", "report/pareto.png", "report/progress.png", "export/recipe.yaml",
              "export/mergekit.yaml", "export/config.json", "export/README.md"):
        assert (run_dir / f).is_file(), f
    r = RunResults(run_dir)
    searched = [x for x in r.calib if x.candidate_id >= 0]
    assert len(searched) == 10 and all(x.ok for x in searched)
    baselines = {x.meta["baseline"] for x in r.calib if x.candidate_id < 0}
    assert baselines == {"base", "m1", "m2", "task_arithmetic", "ties", "dare_ties"}
    # the Pareto set and the baselines were re-scored on the held-out split
    test_rows = [x for x in r.records if x.split == "test"]
    assert {x.recipe_hash for x in r.front()} <= {x.recipe_hash for x in test_rows}
    # held-out scores are set against the base's and the sources' held-out scores, not their calibration ones
    test_of = {x.meta["baseline"]: x.result.task_means() for x in test_rows if x.candidate_id < 0}
    low, high = r.references("test")
    assert low == test_of["base"]
    assert high == {t: max(test_of["m1"][t], test_of["m2"][t]) for t in r.tasks}
    best_test = r.test_scores(r.best().recipe_hash)
    spread = [t for t in r.tasks if high[t] - low[t] > 1e-9]  # tasks where the sources beat the base on test
    assert spread
    norm = r.normalize(best_test, "test")
    assert [norm[t] for t in spread] == pytest.approx([(best_test[t] - low[t]) / (high[t] - low[t]) for t in spread])
    assert r.references("calibration") == (r.low, r.high)
    # the optimizer was told scores normalized with the same references the results use
    from evomerge.checkpoint import read_checkpoint

    told = read_checkpoint(run_dir).state["references"]
    assert (told["low"], told["high"]) == (r.low, r.high)
    assert "evolved" in res.output and "held-out" in res.output
    st = runner.invoke(app, ["status", str(run_dir)])
    assert st.exit_code == 0 and '"evaluations": 10' in st.output
    # the export is a plain HF folder that transformers loads and that reproduces the best recipe
    from transformers import AutoModelForCausalLM

    from evomerge.merge.materialize import materialize_state_dict

    model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    best = r.best()
    ref = materialize_state_dict(best.recipe, {k: str(v) for k, v in fam.items()})
    for k, v in model.state_dict().items():
        assert (v == ref[k]).all(), k
    # a finished run resumes as a no-op and re-running the same config refuses to overwrite it
    assert runner.invoke(app, ["resume", str(run_dir), "--no-export"]).exit_code == 0
    again = runner.invoke(app, ["run", str(cfg)])
    assert again.exit_code == 2 and "already exists" in again.output


def test_fresh_process_runs_keep_their_kernel_cache_in_their_own_folder(setup, tmp_path):
    """In a new process (no Inductor cache folder set yet) a run starts although loading the models creates the
    cache folder inside the run folder before that exists, and a second run uses its own folder, not the first's."""
    _, fam, suite = setup
    a = write_run_config(tmp_path / "a.yaml", fam, suite, name="a", evals=2)
    b = write_run_config(tmp_path / "b.yaml", fam, suite, name="b", evals=2)
    code = (
        "import os, sys\n"
        "from evomerge.driver.run import start_run\n"
        "for cfg in sys.argv[1:]:\n"
        "    d = start_run(cfg)\n"
        "    print(d.name, os.environ['TORCHINDUCTOR_CACHE_DIR'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code, str(a), str(b)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [ln.split() for ln in out.stdout.splitlines() if ln.strip()]
    runs = tmp_path / "runs"
    assert lines == [["a", str((runs / "a" / "cache" / "kernels").resolve())],
                     ["b", str((runs / "b" / "cache" / "kernels").resolve())]]
    for name in ("a", "b"):
        assert (runs / name / "checkpoint.json").is_file()
    # a folder holding anything besides cache/ is still refused
    (runs / "c").mkdir()
    (runs / "c" / "cache").mkdir()
    (runs / "c" / "notes.txt").write_text("mine")
    c = write_run_config(tmp_path / "c.yaml", fam, suite, name="c", evals=2)
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="already exists"):
        start_run(c)
    assert (runs / "c" / "notes.txt").read_text() == "mine"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", *args]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1])  # more kills at more moments, on more seeds: experiments/kill_soak.py
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(setup, tmp_path, seed):
    """The driver's process SIGKILLed at seeded random moments of a multi-fidelity run (promotions, test
    re-scoring), resumed after each kill; tests/test_resume_exact.py covers every optimizer in-process."""
    _, fam, suite = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    extra = {"fidelity": {"subset": 3, "promote_quantile": 0.4, "rescore_test": True}}
    ref_cfg = write_run_config(tmp_path / "ref.yaml", fam, suite, name="ref", evals=14, extra=extra)
    start_run(ref_cfg)
    expected = _rows(tmp_path / "runs" / "ref")
    cfg = write_run_config(tmp_path / "k.yaml", fam, suite, name="k", evals=14, extra=extra)
    run_dir = tmp_path / "runs" / "k"
    rng = np.random.default_rng(seed)
    print(f"seed {seed}: kills after {[round(float(x), 2) for x in np.random.default_rng(seed).uniform(2, 5, 4)]} s")
    kills = 0
    proc = subprocess.Popen(_cli("run", str(cfg), "--no-export"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(4):
        time.sleep(float(rng.uniform(2.0, 5.0)))
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if not (run_dir / "config.resolved.yaml").exists():  # killed before the folder existed
            proc = subprocess.Popen(_cli("run", str(cfg), "--no-export"), env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            continue
        proc = subprocess.Popen(_cli("resume", str(run_dir), "--no-export"), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == 0
    assert kills >= 1
    got = _rows(run_dir)
    assert len({(r[0], r[2], r[3]) for r in got}) == len(got), "an evaluation was stored twice"
    assert got == expected


def test_ctrl_c_stops_gracefully_and_resume_completes(setup, tmp_path):
    _, fam, suite = setup
    cfg = write_run_config(tmp_path / "c.yaml", fam, suite, name="c", evals=12)
    ref = write_run_config(tmp_path / "r.yaml", fam, suite, name="r", evals=12)
    start_run(ref)
    seen: list[int] = []

    def interrupt(info):
        seen.append(info["told"])
        if info["told"] == 5:
            os.kill(os.getpid(), signal.SIGINT)

    from evomerge.errors import RunStopped

    with pytest.raises(RunStopped, match="SIGINT after the evaluations in flight finished") as stopped:
        start_run(cfg, on_progress=interrupt)
    assert stopped.value.exit_code == 130
    run_dir = tmp_path / "runs" / "c"
    with Archive(run_dir / "archive.sqlite", readonly=True) as a:
        assert 5 <= len([r for r in a.records() if r.candidate_id >= 0]) < 12
    resume_run(run_dir)
    assert _rows(run_dir) == _rows(tmp_path / "runs" / "r")


def test_warm_start_starts_at_the_best_grid_merge_and_resumes_exactly(setup, tmp_path):
    from evomerge.events import read_events

    _, fam, suite = setup
    extra = {"space": {"template": "builtin:task-arithmetic-per-layer", "warm_start": {"weights": [0.2, 0.6, 1.0]}}}
    opts = {"popsize": 4, "sigma0": 0.1, "x0_first": True}
    run_dir = start_run(write_run_config(tmp_path / "r.yaml", fam, suite, name="r", evals=10, options=opts,
                                         extra=extra))
    res = RunResults(run_dir)
    rows = {x.meta["baseline"]: x for x in res.calib if x.candidate_id < 0}
    grid = {w: rows[f"task_arithmetic w={w:g}"] for w in (0.2, 0.6, 1.0)}
    # the best grid merge by the mean normalized score (base = 0, best source = 1), computed here from the raw scores
    lo = rows["base"].result.task_means()
    hi = {t: max(rows[m].result.task_means()[t] for m in ("m1", "m2")) for t in lo}

    def norm_mean(rec):
        return np.mean([(v - lo[t]) / (hi[t] - lo[t]) for t, v in rec.result.task_means().items()])
    best = max(grid, key=lambda w: norm_mean(grid[w]))
    (ev,) = [e for e in read_events(run_dir / "events.jsonl") if e["event"] == "warm_start"]
    assert ev["weight"] == best
    # the first searched candidate is that merge: every per-layer weight of every model at the chosen value
    first = res.by_candidate(0)
    for m in first.recipe.models:
        assert {v for vals in m.parameters["weight"].values() for v in vals} == {best}
    assert first.result.task_means() == pytest.approx(grid[best].result.task_means(), abs=1e-12)
    # an interrupted warm-started run resumes to the same archive as the uninterrupted one
    cfg = write_run_config(tmp_path / "c.yaml", fam, suite, name="c", evals=10, options=opts, extra=extra)

    def interrupt(info):
        if info["told"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    from evomerge.errors import RunStopped

    with pytest.raises(RunStopped):
        start_run(cfg, on_progress=interrupt)
    resume_run(tmp_path / "runs" / "c")
    assert _rows(tmp_path / "runs" / "c") == _rows(run_dir)


def test_warm_start_needs_a_space_that_searches_weights(setup, tmp_path):
    from evomerge.errors import ConfigError

    _, fam, suite = setup
    cfg = write_run_config(tmp_path / "w.yaml", fam, suite, name="w", evals=2, extra={
        "space": {"template": "builtin:dfs-routing", "warm_start": {}}})
    with pytest.raises(ConfigError, match="space.warm_start: needs a params or hybrid template"):
        start_run(cfg)
    cfg = write_run_config(tmp_path / "v.yaml", fam, suite, name="v", evals=2, extra={
        "space": {"template": "builtin:task-arithmetic-per-layer", "warm_start": {"weights": [0.5, 0]}}})
    with pytest.raises(ConfigError, match="space.warm_start"):
        start_run(cfg)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.ray
def test_ray_pool_run_survives_a_killed_worker(setup, tmp_path):
    ray = pytest.importorskip("ray")
    from evomerge.driver.pool import RayPool, init_ray
    from evomerge.driver.worker import Worker

    _, fam, suite = setup
    marker = tmp_path / "killed-once"

    class Dying(Worker):
        def evaluate(self, job):
            if job.candidate_id == 3 and not marker.exists():
                marker.write_text("x")
                os._exit(1)  # the worker process dies mid-evaluation
            return super().evaluate(job)

    def factory(prep, run_dir):
        init_ray(address=None, num_cpus=2, num_gpus=None, temp_dir=None)
        return RayPool(lambda: Dying(prep.spec), 2, num_cpus=1)

    cfg = write_run_config(tmp_path / "ray.yaml", fam, suite, name="ray", evals=8,
                           optimizer="random", options={})
    try:
        run_dir = start_run(cfg, pool_factory=factory)
    finally:
        ray.shutdown()
    assert marker.exists()
    r = RunResults(run_dir)
    searched = [x for x in r.calib if x.candidate_id >= 0]
    assert sorted(x.candidate_id for x in searched) == list(range(8))
    assert all(x.ok for x in searched)
    assert any(x.result.worker and x.result.worker.startswith("worker-") for x in searched)


def test_a_suites_declared_reference_sets_that_tasks_scale_for_the_search_and_the_results(setup, tmp_path):
    """``reference: {low, high}`` of a task replaces the base / best source as that task's 0 and 1, in what the
    optimizer is told (the checkpoint's references) and in every table (RunResults)."""
    from evomerge.checkpoint import read_checkpoint

    _, fam, suite = setup
    text = suite.read_text().replace("kind: perplexity, data: {calibration: digits",
                                      "kind: perplexity, reference: {low: -6.0, high: -2.0}, data: {calibration: digits")
    assert text != suite.read_text()
    own = tmp_path / "suite" / "suite.yaml"
    own.parent.mkdir()
    for f in suite.parent.glob("*.jsonl"):
        (own.parent / f.name).write_bytes(f.read_bytes())
    own.write_text(text)
    run_dir = start_run(write_run_config(tmp_path / "r.yaml", fam, own, name="r", evals=2))
    refs = read_checkpoint(run_dir).state["references"]
    res = RunResults(run_dir)
    base = next(r for r in res.calib if r.meta.get("kind") == "base").result.task_means()
    assert (refs["low"]["digits"], refs["high"]["digits"]) == (-6.0, -2.0)
    assert refs["low"]["letters"] == base["letters"]  # the undeclared task keeps the base as its 0
    assert res.low["digits"] == -6.0 and res.high["digits"] == -2.0
    best = res.best().result.task_means()
    assert res.normalize(best)["digits"] == pytest.approx((best["digits"] + 6.0) / 4.0)


def test_an_optuna_run_end_to_end(setup, tmp_path):
    """``optimizer: {name: optuna, options: {sampler: TPESampler}}`` runs through the CLI; the checkpoint holds the
    study as JSON trials, one per evaluation, the first being the space's start point."""
    from evomerge.checkpoint import read_checkpoint

    _, fam, suite = setup
    cfg = write_run_config(tmp_path / "optuna.yaml", fam, suite, name="optuna", evals=6, optimizer="optuna",
                           options={"sampler": "TPESampler", "sampler_options": {"n_startup_trials": 3}})
    res = CliRunner().invoke(app, ["run", str(cfg)])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "runs" / "optuna"
    r = RunResults(run_dir)
    searched = sorted((x for x in r.calib if x.candidate_id >= 0), key=lambda x: x.candidate_id)
    assert [x.candidate_id for x in searched] == list(range(6)) and all(x.ok for x in searched)
    assert [x.meta["trial"] for x in searched] == list(range(6)) and searched[0].meta["origin"] == "x0"
    state = read_checkpoint(run_dir).state["optimizer"]
    assert state["optimizer"] == "optuna" and state["options"]["sampler"] == "TPESampler"
    trials = state["impl"]["trials"]
    assert [t["state"] for t in trials] == ["COMPLETE"] * 6 and state["pending"] == []
    assert len({tuple(t["params"].values()) for t in trials}) == 6
    assert (run_dir / "export" / "recipe.yaml").is_file()
