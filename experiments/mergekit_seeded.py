"""Run ``mergekit-yaml`` with DARE masks drawn from evomerge's per-tensor random stream.

Run it with mergekit's own interpreter (mergekit is a reference, never a dependency of evomerge):

    /work/mkvenv/bin/python experiments/mergekit_seeded.py --seed 7 mergekit.yaml OUT [mergekit-yaml options]

evomerge draws the masks of a tensor from ``tensor_generator(recipe seed, tensor name)``
(:mod:`evomerge.merge.methods.rng`): one ``torch.rand(shape) < density`` per sparsified task vector, in model
order. mergekit calls ``torch.bernoulli(full(density))`` on its global generator. While a
``GeneralizedTaskArithmeticMerge.merge_group`` call (ties, dare_ties, dare_linear, ...) runs, this script
replaces ``torch.bernoulli(p)`` by ``torch.rand(p.shape, generator) < p`` with that tensor's generator: both
tools then keep the same entries, so their DARE outputs compare entry by entry. Everything else is mergekit's
own code. ``experiments/make_mergekit_golden.py`` does the same for its seeded golden cases.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]


def _evomerge_rng() -> Any:
    """evomerge's ``rng`` module loaded by path (it needs only the standard library and torch)."""
    spec = importlib.util.spec_from_file_location("_evomerge_rng", ROOT / "evomerge" / "merge" / "methods" / "rng.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def drawn_from(gen: torch.Generator) -> Iterator[None]:
    """Make ``torch.bernoulli(p)`` return ``torch.rand(p.shape, generator=gen) < p`` (as ``p``'s dtype)."""
    original = torch.bernoulli

    def draw(p: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError("mergekit_seeded: unexpected torch.bernoulli arguments")
        return (torch.rand(p.shape, generator=gen, dtype=torch.float32) < p.float()).to(p.dtype)

    torch.bernoulli = draw  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.bernoulli = original  # type: ignore[assignment]


def patch(seed: int) -> None:
    from mergekit.merge_methods.generalized_task_arithmetic import GeneralizedTaskArithmeticMerge

    rng = _evomerge_rng()
    merge_group = GeneralizedTaskArithmeticMerge.merge_group

    def seeded(self: Any, group: Any, /, **parameters: Any) -> torch.Tensor:
        name = group.metadata.name
        if name is None:
            raise RuntimeError("mergekit_seeded: a tensor group without a name")
        with drawn_from(rng.tensor_generator(seed, name)):
            return merge_group(self, group, **parameters)

    GeneralizedTaskArithmeticMerge.merge_group = seeded  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, required=True, help="the evomerge recipe's seed")
    args, rest = p.parse_known_args(argv)
    patch(args.seed)
    from mergekit.scripts.run_yaml import main as run_yaml

    return run_yaml.main(rest, prog_name="mergekit-yaml", standalone_mode=False) or 0


if __name__ == "__main__":
    sys.exit(main())
