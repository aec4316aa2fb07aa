"""Placements of the resident sources (``resources.placement``): device, host (streamed), mmap (read from the files).

Same recipe, same bits in every placement, on the tiny zoo; the plan shows each placement's resident bytes and
``auto`` takes the first that fits; CUDA-only paths (pinned memory, the copy stream) are checked where CUDA is.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.driver.plan import GiB, Memory, Setup, Shapes, choose_placement, compute, suggest
from evomerge.merge.kernels import fused_kernels
from evomerge.merge.materialize import InPlaceMerger
from evomerge.merge.sources import ResidentSources
from evomerge.recipe import Recipe


def _recipes(names: list[str]) -> list[Recipe]:
    a, b, c = names[:3]
    ties = [{"model": m, "parameters": {"weight": w, "density": d}} for m, w, d in ((a, 0.6, 0.5), (b, 0.9, 0.3),
                                                                                   (c, 0.4, 0.8))]
    return [
        Recipe.model_validate(dict(method="ties", base_model="base", models=ties, seed=1)),
        Recipe.model_validate(dict(method="dare_ties", base_model="base", models=ties, seed=7)),
        # a permuted subset of the resident task vectors
        Recipe.model_validate(dict(method="task_arithmetic", base_model="base", models=[
            {"model": c, "parameters": {"weight": 0.7}}, {"model": a, "parameters": {"weight": 0.5}}])),
    ]


def _merged(paths: dict[str, str], order: list[str], placement: str, device: str, recipes: list[Recipe]):
    sources = ResidentSources.load(paths, "base", order, device=device, placement=placement, sorted_magnitudes=True)
    live = AutoModelForCausalLM.from_pretrained(paths["base"]).to(device)
    merger = InPlaceMerger(sources, live)
    out = []
    for recipe in recipes:
        merger.apply(recipe)
        out.append({k: v.detach().cpu().clone() for k, v in live.state_dict().items()})
    return sources, out


def _assert_same(a: list[dict], b: list[dict], what: str) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        for name, t in x.items():
            assert torch.equal(t, y[name]), f"{what}: recipe {i}, {name}"


def _zoo_paths(zoo_test) -> tuple[dict[str, str], list[str]]:
    paths = {k: str(v) for k, v in zoo_test.models.items()}
    order = [m for m in paths if m != "base"]
    return paths, order


def test_every_placement_gives_the_same_bits_on_the_tiny_zoo(zoo_test):
    paths, order = _zoo_paths(zoo_test)
    recipes = _recipes(order)
    with fused_kernels(False):  # fused and eager agree bit for bit (test_materialize); the placement is what varies
        device, want = _merged(paths, order, "device", "cpu", recipes)
        host, got_host = _merged(paths, order, "host", "cpu", recipes)
        mmap, got_mmap = _merged(paths, order, "mmap", "cpu", recipes)
    _assert_same(want, got_host, "host")
    _assert_same(want, got_mmap, "mmap")
    assert want[0] != {} and not all(torch.equal(t, want[1][n]) for n, t in want[0].items())  # the recipes differ
    # what each keeps: host the same bytes as device (one memory on a CPU), mmap nothing, and no magnitude orders
    assert host.nbytes == device.nbytes > 0 and device.ordered is not None and host.ordered is not None
    assert mmap.nbytes == 0 and mmap.ordered is None and not isinstance(mmap.base, dict)
    assert mmap.shapes == device.shapes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_host_placement_streams_pinned_tensors_to_the_gpu_with_the_same_bits(zoo_test):
    paths, order = _zoo_paths(zoo_test)
    recipes = _recipes(order)
    device, want = _merged(paths, order, "device", "cuda", recipes)
    host, got = _merged(paths, order, "host", "cuda", recipes)
    mmap, got_mmap = _merged(paths, order, "mmap", "cuda", recipes)
    _assert_same(want, got, "host on cuda")
    _assert_same(want, got_mmap, "mmap on cuda")
    name = next(iter(host.base))
    assert host.base[name].is_pinned() and host.deltas[name].is_pinned() and host.ordered[name].is_pinned()
    assert device.base[name].is_cuda and not host.base[name].is_cuda


def _setup(placement: str, device: str = "cuda") -> Setup:
    return Setup(n_deltas=2, dtype=torch.bfloat16, orders=False, scorer="hf", device=device, workers=1,
                 workers_per_device=1, workers_per_host=1, placement=placement)


def test_the_plan_shows_each_placements_resident_bytes_and_auto_takes_the_first_that_fits():
    shapes = Shapes("toy", {f"w{i}": (1024, 32 * 1024) for i in range(64)})  # 2 Gi entries, 4 GiB in bf16
    ample = Memory(100 * GiB, 100 * GiB, "assumed", 100 * GiB, 100 * GiB)
    device, host, mmap = (compute(shapes, _setup(p), ample) for p in ("device", "host", "mmap"))
    assert device.resident == host.resident == 12 * GiB and mmap.resident == 0  # reference + 2 task vectors
    assert device.device_need - host.device_need == 12 * GiB - 2 * 3 * 64 * 2**20  # the double buffer stays
    assert host.host_need == 12 * GiB + 4 * GiB  # pinned sources + the live model's staging
    assert "placement host: sources 12.0 GiB in pinned host memory" in host.summary()
    assert "placement mmap: sources (none" in mmap.summary()
    assert choose_placement(shapes, _setup("device"), ample) == "device"
    small_gpu = Memory(14 * GiB, 14 * GiB, "assumed", 100 * GiB, 100 * GiB)
    assert compute(shapes, _setup("device"), small_gpu).fits is False
    assert suggest(compute(shapes, _setup("device"), small_gpu)).startswith("resources.placement: host")
    assert choose_placement(shapes, _setup("device"), small_gpu) == "host"
    small_host = Memory(14 * GiB, 14 * GiB, "assumed", 10 * GiB, 100 * GiB)
    assert choose_placement(shapes, _setup("device"), small_host) == "mmap"
    cpu = Memory(10 * GiB, 10 * GiB, "host available", 10 * GiB, 10 * GiB)  # on a CPU, host is the device's memory
    assert choose_placement(shapes, _setup("device", "cpu"), cpu) == "mmap"
    unknown = Memory(None, None, "unknown", 100 * GiB, 100 * GiB)
    assert choose_placement(shapes, _setup("device"), unknown) == "device"


def test_a_run_config_placement_reaches_the_worker(tmp_path):
    """``resources.placement`` is resolved at preflight (auto by the plan) and the worker loads its sources so;
    an mmap worker scores a candidate exactly as a device worker does."""
    from evomerge.config import load_run_config
    from evomerge.driver.pool import Job
    from evomerge.driver.run import check_memory, preflight
    from evomerge.driver.worker import Worker
    from evomerge.testing.family import build_family, write_perplexity_suite, write_run_config

    fam = build_family(tmp_path / "fam", 2)
    suite = write_perplexity_suite(tmp_path / "suite")
    scores = {}
    for placement in ("auto", "mmap"):
        cfg = load_run_config(write_run_config(tmp_path / f"{placement}.yaml", fam, suite, name=placement, extra={
            "resources": {"placement": placement, "threads_per_worker": 1, "sorted_magnitude_cache": True}}))
        prep = preflight(cfg)
        check_memory(prep)
        assert prep.spec.placement == ("device" if placement == "auto" else "mmap")
        assert prep.spec.sorted_magnitudes is (placement == "auto")  # mmap keeps no magnitude orders
        worker = Worker(prep.spec)
        assert worker.sources.placement == prep.spec.placement
        res = worker.evaluate(Job(0, 0, prep.baselines[-1].recipe))
        assert res.ok, res.error
        scores[placement] = {t: s.scores.tolist() for t, s in res.tasks.items()}
    assert scores["auto"] == scores["mmap"]
