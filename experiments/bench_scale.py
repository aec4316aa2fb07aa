"""Memory plans at scale: what one worker keeps resident for Llama-3-8B-, Qwen2.5-32B- and Llama-3-70B-shaped
sources, with 2 and 4 experts, scorer hf and vllm, bfloat16, with and without the magnitude-order cache
(a TIES search, the one method that reads the orders), on one CUDA GPU per worker.

Shapes come from the models' configs on the meta device (:func:`evomerge.driver.plan.shapes_from`): no weights,
no download, no GPU. The figures are arithmetic (see :mod:`evomerge.driver.plan`), not measurements.

    python experiments/bench_scale.py                       # 80 GiB GPUs, writes experiments/results/bench_scale.md
    python experiments/bench_scale.py --gpu-memory 141GiB --results /tmp/bench_scale_h200.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

from evomerge.config import RunConfig
from evomerge.driver import plan as memory

MODELS = ("llama-3-8b", "qwen2.5-32b", "llama-3-70b")
COLUMNS = ("reference weights", "task vectors", "magnitude orders", "live model", "vLLM engine weights",
           "vLLM KV cache + activations", "merge workspace", "CUDA context")


def config(experts: int, scorer: str, cache: bool) -> RunConfig:
    sources = {"base": "/models/base", **{f"expert{i}": f"/models/expert{i}" for i in range(experts)}}
    return RunConfig.model_validate({
        "name": "scale", "sources": sources, "base_model": "base",
        "space": {"template": "builtin:ties-per-layer"}, "fitness": {"suite": "builtin:zoo", "scorer": scorer},
        "resources": {"backend": "ray", "workers": 8, "gpus_per_worker": 1, "address": "auto", "device": "cuda",
                      "dtype": "bfloat16", "sorted_magnitude_cache": cache},
    })


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpu-memory", default="80GiB", help="GPU size planned for (default 80GiB)")
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "bench_scale.md")
    args = ap.parse_args()
    from evomerge.cli import parse_size

    gpu = parse_size(args.gpu_memory, "--gpu-memory")
    head = ["model", "experts", "scorer", "orders", *(c.replace("vLLM KV cache + activations", "vLLM KV+act")
                                                      for c in COLUMNS),
            "beside vLLM", "total", "fits", "smallest change that fits"]
    rows = []
    for model in MODELS:
        shapes = memory.shapes_from(model)
        for experts in (2, 4):
            for scorer in ("hf", "vllm"):
                for cache in (False, True):
                    p = memory.plan_run(config(experts, scorer, cache), shapes=shapes, assume_gpu_memory=gpu)
                    parts = {x.name: x.bytes for x in p.parts}
                    beside = p.per_worker - (parts.get("vLLM engine weights") or 0) \
                        - (parts.get("vLLM KV cache + activations") or 0)
                    fix = "" if p.fits else (p.suggestion or "none: needs more than one GPU per worker")
                    rows.append([model, str(experts), scorer, "on" if cache else "off",
                                 *(gib(parts[c]) if c in parts else "-" for c in COLUMNS),
                                 gib(beside), gib(p.device_need), "yes" if p.fits else "**no**", fix])
                    print(f"{model:12s} {experts} experts {scorer:4s} orders {'on ' if cache else 'off'}: "
                          f"{p.summary()}")
    lines = [
        f"# Memory plan per worker at scale ({args.gpu_memory} GPU, one per worker, bfloat16, TIES)", "",
        "GiB per worker, from `python experiments/bench_scale.py --gpu-memory " + args.gpu_memory + "` "
        "(arithmetic over the models' shapes: `evomerge/driver/plan.py`; not measured). 'beside vLLM': "
        f"everything but the engine; vLLM reserves {memory.VLLM_GPU_MEMORY_UTILIZATION:g} of the GPU at start "
        "(its default gpu_memory_utilization), so with vllm the total is that share plus what is beside it. "
        "Scoring activations are not counted.", "",
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows), "",
    ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
