"""The memory plan (`evomerge plan`, evomerge/driver/plan.py): bytes from headers, magnitude orders only for
methods that read them, tied heads once, refusing a run that cannot fit, planning 7B shapes without weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from evomerge.cli import app
from evomerge.config import RunConfig
from evomerge.driver import plan as memory
from evomerge.errors import ConfigError
from evomerge.io import read_header
from evomerge.merge.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent


def _config(zoo: Any, tmp_path: Path, template: str = "builtin:ties-per-layer", **resources: Any) -> dict[str, Any]:
    base = _base_dir(zoo)
    sources = {"base": str(base), **{s: str(base.parent / f"expert_{s}") for s in ("add", "rev", "sort")}}
    return {
        "name": "plan", "output_dir": str(tmp_path / "runs"), "sources": sources, "base_model": "base",
        "space": {"template": template}, "fitness": {"suite": "builtin:zoo", "scorer": "hf"},
        "budget": {"evaluations": 2},
        # the arithmetic of sources on the device (placement auto would move them to fit: test_placement.py)
        "resources": {"device": "cpu", "dtype": "float32", "threads_per_worker": 1, "placement": "device",
                      **resources},
    }


def _base_dir(zoo: Any) -> Path:
    return Path(zoo.base)


def _float_entries(folder: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        for name, info in read_header(shard).items():
            if info.dtype.is_floating_point:
                out[name] = math.prod(info.shape)
    return out


def test_plan_bytes_are_the_headers_sum_and_what_the_worker_holds(zoo_test: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.merge.sources import ResidentSources

    cfg = RunConfig.model_validate(_config(zoo_test, tmp_path, sorted_magnitude_cache=True))
    p = memory.plan_run(cfg)
    parts = {x.name: x.bytes for x in p.parts}
    entries = _float_entries(_base_dir(zoo_test))
    total = sum(entries.values())
    assert parts["reference weights"] == 4 * total
    assert parts["task vectors"] == 3 * 4 * total
    assert parts["magnitude orders"] == 3 * 4 * total  # ties reads them and the cache is on
    assert parts["live model"] == 4 * total  # untied: every tensor is its own
    assert parts["merge workspace"] == memory.WORKSPACE_FACTOR * 4 * max(entries.values()) \
        + memory.ORDER_SORT_BYTES * max(entries.values())
    assert "vLLM engine weights" not in parts and "CUDA context" not in parts
    assert p.device_need == sum(parts.values()) and p.fits  # a tiny model on a CPU fits

    # what a worker really keeps: the resident sources and the live module
    res = ResidentSources.load(cfg.sources, "base", ("add", "rev", "sort"), dtype=torch.float32,
                               sorted_magnitudes=True)
    assert res.nbytes == parts["reference weights"] + parts["task vectors"] + parts["magnitude orders"]
    model = AutoModelForCausalLM.from_pretrained(_base_dir(zoo_test), dtype=torch.float32)
    assert sum(t.numel() * t.element_size() for t in model.parameters()) == parts["live model"]


@pytest.mark.parametrize("template", ["builtin:ties-per-layer", "builtin:dare-ties-groups",
                                      "builtin:task-arithmetic-global"])
@pytest.mark.parametrize("cache", [True, False, "auto"])
def test_magnitude_orders_only_for_methods_that_read_them(zoo_test: Any, tmp_path: Path, template: str,
                                                          cache: Any) -> None:
    cfg = RunConfig.model_validate(_config(zoo_test, tmp_path, template, sorted_magnitude_cache=cache))
    method = memory.template_method(cfg)
    p = memory.plan_run(cfg)
    orders = next(x for x in p.parts if x.name == "magnitude orders").bytes
    reads = METHODS.get(method).magnitude_orders
    # 'auto' on a CPU: on for a tiny model (far under a quarter of the host's memory)
    assert (orders > 0) == (reads and cache is not False)
    assert p.setup.orders == (orders > 0)


def test_tied_head_is_counted_once_in_the_live_model(zoo_test: Any, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    tied = tmp_path / "tied"
    shutil.copytree(_base_dir(zoo_test), tied)
    conf = json.loads((tied / "config.json").read_text())
    conf["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(conf))
    tensors = load_file(tied / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, tied / "model.safetensors")

    from evomerge.io import ModelFolder

    shapes = memory.Shapes.from_folder(ModelFolder.open(tied))
    assert shapes.tied == {"lm_head.weight"}
    setup = memory.Setup(n_deltas=2, dtype=torch.bfloat16, orders=False, scorer="hf", device="cpu", workers=1,
                         workers_per_device=1, workers_per_host=1)
    p = memory.compute(shapes, setup, memory.Memory())
    parts = {x.name: x.bytes for x in p.parts}
    head = 52 * 64
    entries = sum(_float_entries(tied).values())
    assert parts["reference weights"] == 2 * entries  # the sources keep both names (as ResidentSources does)
    assert parts["live model"] == 2 * (entries - head)
    model = AutoModelForCausalLM.from_pretrained(tied, dtype=torch.bfloat16)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(t.numel() * t.element_size() for t in model.parameters()) == parts["live model"]


def test_cli_refuses_a_device_too_small_with_one_line(zoo_test: Any, tmp_path: Path) -> None:
    doc = _config(zoo_test, tmp_path, device="cuda", dtype="bfloat16")
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    out = CliRunner().invoke(app, ["plan", str(tmp_path / "cfg.yaml"), "--assume-gpu-memory", "1MiB"])
    assert out.exit_code == 2, out.output
    err = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "smallest change that fits" in err[0]
    # the CUDA context alone is over 1 MiB: nothing in the config can fit
    assert "no single change" in err[0]
    ok = CliRunner().invoke(app, ["plan", str(tmp_path / "cfg.yaml"), "--assume-gpu-memory", "2GiB"])
    assert ok.exit_code == 0 and "fits:" in ok.output
    bad = CliRunner().invoke(app, ["plan", str(tmp_path / "cfg.yaml"), "--assume-gpu-memory", "lots"])
    assert bad.exit_code == 2 and "--assume-gpu-memory" in bad.output
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(yaml.safe_dump(_config(zoo_test, tmp_path)))
    wrong = CliRunner().invoke(app, ["plan", str(cpu), "--assume-gpu-memory", "80GiB"])
    assert wrong.exit_code == 2 and "resources.device is 'cpu'" in wrong.output


def test_suggestion_is_the_smallest_change_the_arithmetic_shows(zoo_test: Any, tmp_path: Path) -> None:
    cfg = RunConfig.model_validate(_config(zoo_test, tmp_path, sorted_magnitude_cache=True))
    p = memory.plan_run(cfg)
    orders = next(x.bytes for x in p.parts if x.name == "magnitude orders")
    sort = memory.ORDER_SORT_BYTES * p.shapes.largest
    need = p.device_need
    assert need is not None
    tight = memory.Memory(need - 1, need - 1, "test", 10**12, 10**12)
    p = memory.plan_run(cfg, memory=tight)
    assert p.fits is False and p.suggestion.startswith("resources.sorted_magnitude_cache: false")
    # without the orders it still does not fit: fewer sources is what remains (float32 -> bfloat16 halves it)
    small = need - orders - sort - 1
    p = memory.plan_run(cfg, memory=memory.Memory(small // 2, small // 2, "test", 10**12, 10**12))
    assert p.fits is False and "resources.dtype: bfloat16" in p.suggestion and "sorted_magnitude_cache" in p.suggestion


def test_run_refuses_what_cannot_fit_and_writes_nothing(zoo_test: Any, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from evomerge.driver.run import start_run

    cfg = RunConfig.model_validate(_config(zoo_test, tmp_path))
    monkeypatch.setattr(memory, "probe_memory", lambda device, assume_gpu=None: memory.Memory(
        1000, 1000, "host available", 1000, 1000))
    with pytest.raises(ConfigError, match="smallest change that fits"):
        start_run(cfg, pool_factory=lambda prep, run_dir: pytest.fail("a pool was built"))
    assert not (tmp_path / "runs").exists()


def test_plan_of_7b_shapes_needs_no_weights() -> None:
    out = CliRunner().invoke(app, ["plan", str(ROOT / "configs/cluster-7b.yaml"), "--shapes-from", "mistral-7b",
                                   "--assume-gpu-memory", "80GiB"])
    assert out.exit_code == 0, out.output
    assert "fits:" in out.output
    shapes = memory.shapes_from("mistral-7b")
    assert shapes.entries == 7_241_732_096  # Mistral-7B-v0.1's parameter count
    cfg = RunConfig.model_validate(yaml.safe_load((ROOT / "configs/cluster-7b.yaml").read_text()))
    p = memory.plan_run(cfg, shapes=shapes, assume_gpu_memory=80 * 2**30)
    parts = {x.name: x.bytes for x in p.parts}
    assert parts["task vectors"] == 3 * 2 * shapes.entries and parts["magnitude orders"] == 0  # dare_ties
    # the vllm scorer holds no transformers copy, but its engine reserves the GPU's KV cache: the sources do not fit
    # beside it on the device, and placement auto keeps them in host memory, streamed
    vllm_cfg = cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"scorer": "vllm"})})
    on_device = memory.plan_run(
        vllm_cfg.model_copy(update={"resources": cfg.resources.model_copy(update={"placement": "device"})}),
        shapes=shapes, assume_gpu_memory=80 * 2**30)
    assert on_device.fits is False and on_device.suggestion.startswith("resources.placement: host")
    vllm = memory.plan_run(vllm_cfg, shapes=shapes, assume_gpu_memory=80 * 2**30)
    assert vllm.fits is True and vllm.setup.placement == "host"
    assert "live model" not in {x.name for x in vllm.parts}
    unknown = CliRunner().invoke(app, ["plan", str(ROOT / "configs/cluster-7b.yaml"), "--shapes-from", "gpt-9"])
    assert unknown.exit_code == 2 and "--shapes-from" in unknown.output


def test_vllm_plan_counts_engine_weights_not_a_live_model() -> None:
    """The vllm scorer streams merged tensors into its engine: no transformers copy of the model, except for a space
    that routes layers; gpus_per_worker 2 makes the engine tensor-parallel, half its weights per GPU."""
    shapes = memory.shapes_from("mistral-7b")
    cfg = RunConfig.model_validate(yaml.safe_load((ROOT / "configs/cluster-7b.yaml").read_text()))

    def plan(scorer: str, gpus: float = 1, template: str | None = None) -> memory.Plan:
        space = cfg.space if template is None else cfg.space.model_copy(update={"template": template,
                                                                                 "overrides": {}})
        c = cfg.model_copy(update={"fitness": cfg.fitness.model_copy(update={"scorer": scorer}), "space": space,
                                   "resources": cfg.resources.model_copy(update={"gpus_per_worker": gpus,
                                                                                 "placement": "device"})})
        return memory.plan_run(c, shapes=shapes, assume_gpu_memory=80 * 2**30)

    hf, vllm, tp2 = plan("hf"), plan("vllm"), plan("vllm", 2)
    parts = [{p.name: p.bytes for p in x.parts} for x in (hf, vllm, tp2)]
    assert parts[0]["live model"] == 2 * shapes.live_entries and "vLLM engine weights" not in parts[0]
    assert "live model" not in parts[1] and parts[1]["vLLM engine weights"] == 2 * shapes.live_entries
    assert not any(p.name == "live model staging" for p in vllm.host_parts)
    assert parts[2]["vLLM engine weights"] == shapes.live_entries  # 16-bit weights over 2 ranks
    assert vllm.per_worker - parts[1]["vLLM engine weights"] - parts[1]["vLLM KV cache + activations"] \
        == hf.per_worker - parts[0]["live model"]  # beside the engine: what the hf worker holds but its model
    assert any("tensor-parallel over 2 GPUs" in n for n in tp2.notes)
    routed = plan("vllm", template="builtin:dfs-routing")
    assert {p.name for p in routed.parts} >= {"live model", "vLLM engine weights"}
    with pytest.raises(ValueError, match="whole number of GPUs"):
        RunConfig.model_validate(yaml.safe_load((ROOT / "configs/cluster-7b.yaml").read_text())
                                 | {"resources": {"gpus_per_worker": 1.5}})


def test_gpus_per_worker_becomes_the_vllm_engines_tensor_parallel_size() -> None:
    from evomerge.driver.run import scorer_options

    cfg = RunConfig.model_validate(yaml.safe_load((ROOT / "configs/cluster-7b.yaml").read_text()))

    def options(scorer: str, gpus: float) -> dict[str, Any]:
        return scorer_options(cfg.model_copy(update={
            "fitness": cfg.fitness.model_copy(update={"scorer": scorer}),
            "resources": cfg.resources.model_copy(update={"gpus_per_worker": gpus})}))

    assert options("vllm", 4) == {"batch_size": 64, "tensor_parallel_size": 4}
    assert options("vllm", 1) == {"batch_size": 64} and options("vllm", 0.5) == {"batch_size": 64}
    assert options("hf", 4) == {"batch_size": 64}
