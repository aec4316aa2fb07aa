"""Write reference outputs of mergekit's merge methods for evomerge's tests.

Run with a separate environment that has mergekit (it is a reference only, never a dependency):

    python3 -m venv /work/mkvenv && /work/mkvenv/bin/pip install torch==2.13.0 mergekit
    /work/mkvenv/bin/python experiments/make_mergekit_golden.py

It calls mergekit's method objects directly on small seeded random tensors and writes
``tests/data/mergekit_golden.safetensors`` (inputs and outputs) and ``tests/data/mergekit_golden.json``
(one entry per case: method, which tensors, per-model and global parameters, RNG seed).

DARE and DELLA draw random masks. mergekit calls ``torch.bernoulli(p)``; for the cases marked with a
``seed`` this script replaces that call, for the duration of the merge, by ``torch.rand(p.shape,
generator) < p`` with ``generator = torch.Generator().manual_seed(seed)``: the stream evomerge draws from
(one ``torch.rand`` per sparsified task vector, in model order). The test passes the same generator to
evomerge, so these cases compare the whole pipeline exactly (same masks), not only in distribution.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from mergekit.merge_methods.base import TensorGroup
from mergekit.merge_methods.registry import get as get_method
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def uniform_bernoulli(seed: int) -> Iterator[None]:
    """Make ``torch.bernoulli(p)`` draw ``torch.rand(p.shape, generator) < p`` from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    original = torch.bernoulli

    def draw(p: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        assert not args and not kwargs
        return (torch.rand(p.shape, generator=gen, dtype=torch.float32) < p).to(p.dtype)

    torch.bernoulli = draw  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.bernoulli = original  # type: ignore[assignment]


def make_sets() -> dict[str, dict[str, Any]]:
    """Input sets: a base and models close to it (task vectors ~ 0.1 of the base's scale)."""
    g = torch.Generator().manual_seed(1234)
    sets: dict[str, dict[str, Any]] = {}

    def add(name: str, shape: tuple[int, ...], n: int, dtype: torch.dtype = torch.float32, scale: float = 0.1) -> None:
        base = torch.randn(shape, generator=g)
        models = [base + scale * torch.randn(shape, generator=g) for _ in range(n)]
        sets[name] = {"tensors": [t.to(dtype) for t in [base, *models]], "dtype": str(dtype).removeprefix("torch.")}

    add("m2d", (16, 24), 3)
    add("m1d", (40,), 3)
    add("big", (48, 64), 3)
    add("two", (12, 20), 2)
    add("bf16", (16, 24), 3, torch.bfloat16)
    # Colinear pair for slerp: the other model is exactly twice the base.
    base = torch.randn(10, 12, generator=g)
    sets["colinear"] = {"tensors": [base, 2 * base], "dtype": "float32"}
    # Task vectors with a disagreeing sign pattern and exact ties in magnitude.
    base = torch.randn(6, 8, generator=g)
    ties = (torch.randint(-3, 4, (3, 6, 8), generator=g).float() * 0.25)
    sets["ties"] = {"tensors": [base, *(base + ties[i] for i in range(3))], "dtype": "float32"}
    return sets


def cases() -> list[dict[str, Any]]:
    """Every case: method, input set, whether tensor 0 is the base, parameters, optional RNG seed."""
    out: list[dict[str, Any]] = []

    def case(method: str, inputs: str, *, base: bool = True, sp: dict[str, list[float]] | None = None,
             ref: dict[str, float] | None = None, gp: dict[str, Any] | None = None, seed: int | None = None,
             n: int | None = None) -> None:
        out.append({"method": method, "inputs": inputs, "base": base, "sp": sp or {}, "ref": ref or {},
                    "gp": gp or {}, "seed": seed, "n": n})

    w3 = [0.5, 0.3, 0.6]
    for s in ("m2d", "m1d", "bf16"):
        case("linear", s, base=False, ref={"weight": 0.2}, sp={"weight": [0.5, 0.3, 0.4]})
    case("linear", "m2d", base=False, ref={"weight": 1.0}, sp={"weight": [2.0, -0.5, 0.7]}, gp={"normalize": False})
    for s in ("m2d", "m1d", "bf16"):
        case("task_arithmetic", s, sp={"weight": [0.5, 0.3, -0.2]})
    case("task_arithmetic", "m2d", sp={"weight": [0.5, 0.3, 0.2]}, gp={"normalize": True, "lambda": 0.8})
    for s in ("m2d", "m1d", "big"):
        case("ties", s, sp={"weight": w3, "density": [0.5, 0.3, 0.7]})
    case("ties", "m2d", sp={"weight": w3, "density": [1.0, 1.0, 1.0]})
    case("ties", "m2d", sp={"weight": w3, "density": [0.4, 1.0, 0.2]}, gp={"rescale": True, "lambda": 1.3})
    case("ties", "m2d", sp={"weight": [0.5, -0.3, 0.6], "density": [0.5, 0.5, 0.5]}, gp={"normalize": False})
    case("ties", "ties", sp={"weight": [1.0, 1.0, 1.0], "density": [1.0, 1.0, 1.0]})
    # Half-precision magnitudes tie often and mergekit's order among ties is unspecified: no pruning here.
    case("ties", "bf16", sp={"weight": w3, "density": [1.0, 1.0, 1.0]})
    for m in ("breadcrumbs", "breadcrumbs_ties"):
        for s in ("m2d", "m1d", "big"):
            case(m, s, sp={"weight": w3, "density": [0.6, 0.8, 0.5], "gamma": [0.05, 0.01, 0.1]})
        case(m, "m2d", sp={"weight": w3, "density": [0.9, 0.95, 0.5], "gamma": [0.0, 0.2, 0.3]},
             gp={"rescale": True})
    for m in ("dare_linear", "dare_ties"):
        case(m, "m2d", sp={"weight": w3, "density": [1.0, 1.0, 1.0]})
        for i, s in enumerate(("m2d", "m1d", "big")):
            case(m, s, sp={"weight": w3, "density": [0.5, 0.3, 0.8]}, seed=100 + i)
        case(m, "m2d", sp={"weight": w3, "density": [0.5, 1.0, 0.7]}, gp={"rescale": False, "normalize": True},
             seed=7)
    for m in ("della", "della_linear"):
        case(m, "m2d", sp={"weight": w3, "density": [1.0, 1.0, 1.0]})
        for i, s in enumerate(("m2d", "m1d", "big")):
            case(m, s, sp={"weight": w3, "density": [0.5, 0.4, 0.7], "epsilon": [0.1, 0.2, 0.15]}, seed=200 + i)
        case(m, "m2d", sp={"weight": w3, "density": [0.6, 0.6, 0.6]}, gp={"rescale": False}, seed=9)
    for s in ("two", "m1d", "bf16"):
        for t in (0.0, 0.3, 0.75, 1.0):
            case("slerp", s, gp={"t": t}, n=1)
    case("slerp", "colinear", gp={"t": 0.4}, n=1)
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        gp = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        case("nuslerp", "m2d", sp={"weight": [0.3, 0.9]}, gp=gp, n=2)
        case("nuslerp", "two", base=False, ref={"weight": 0.4}, sp={"weight": [0.6]}, gp=gp, n=1)
    case("nuslerp", "m1d", sp={"weight": [1.0, 1.0]}, n=2, gp={"nuslerp_flatten": False})
    for s in ("m2d", "m1d", "big", "bf16"):
        for fw in (False, True):
            case("model_stock", s, gp={"filter_wise": fw})
    case("passthrough", "m2d", base=False, ref={"scale": 0.7}, n=0)
    case("passthrough", "bf16", base=False, ref={"scale": 1.5}, n=0)
    return out


def run_mergekit(c: dict[str, Any], tensors: list[torch.Tensor]) -> torch.Tensor:
    method = get_method(c["method"])
    group = TensorGroup.from_tensors(tensors, base_index=0 if c["base"] else None)
    params: dict[str, Any] = dict(c["gp"])
    names = set(c["sp"]) | set(c["ref"])
    for name in names:
        values = list(c["sp"].get(name, []))
        if not c["base"]:
            values = [c["ref"][name], *values]
        params[name] = values
    ctx = uniform_bernoulli(c["seed"]) if c["seed"] is not None else contextlib.nullcontext()
    with ctx:
        (result,) = method([group], parameters=params)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "data")
    a = ap.parse_args()
    sets = make_sets()
    blobs: dict[str, torch.Tensor] = {}
    for name, s in sets.items():
        for i, t in enumerate(s["tensors"]):
            blobs[f"{name}/{i}"] = t.contiguous()
    described = []
    for k, c in enumerate(cases()):
        s = sets[c["inputs"]]
        n = c["n"] if c["n"] is not None else len(s["tensors"]) - 1
        count = n + 1
        tensors = s["tensors"][:count]
        result = run_mergekit(c, tensors)
        key = f"case{k:03d}/{c['method']}"
        blobs[key] = result.contiguous()
        described.append({**{x: c[x] for x in ("method", "inputs", "base", "sp", "ref", "gp", "seed")},
                          "count": count, "output": key, "dtype": s["dtype"]})
    a.out.mkdir(parents=True, exist_ok=True)
    save_file(blobs, str(a.out / "mergekit_golden.safetensors"))
    meta = {"mergekit_version": importlib.metadata.version("mergekit"),
            "torch_version": torch.__version__, "cases": described}
    lines = ",\n".join("  " + json.dumps(c) for c in described)
    head = json.dumps({k: v for k, v in meta.items() if k != "cases"})[:-1]
    (a.out / "mergekit_golden.json").write_text(f'{head}, "cases": [\n{lines}\n]}}\n')
    (a.out / "mergekit_golden.safetensors").chmod(0o644)
    size = (a.out / "mergekit_golden.safetensors").stat().st_size
    print(f"wrote {len(described)} cases, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
