"""Streamed merges: a recipe's merged tensors one at a time, for a scorer that loads weights into its own engine.

A scorer that owns an inference engine (vLLM; registry capability ``state_dict``) needs no transformers copy of
the model to merge into: :class:`StreamingMerger` computes each merged tensor from the resident sources, under the
checkpoint's names, and hands it on as it is made (``LLM.collective_rpc("reload_weights", kwargs={"weights_iterator":
...})``), so a swap holds about one merged tensor beside the engine's weights instead of a whole model.

Each tensor is computed by :func:`~evomerge.merge.materialize.merge_resident`, the step the in-place merge into a
live module runs, so a streamed recipe gives the very bits :class:`~evomerge.merge.materialize.InPlaceMerger` writes
(TIES top-k masks, DARE's seeded drops and rescale, SLERP). A tied output projection is not streamed: its name
shares the input embedding's tensor (the engine ties them), as in the in-place merge.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from evomerge.merge.materialize import MergePlan, _check_tied_sources, _tied_pairs, merge_resident
from evomerge.merge.sources import ResidentSources
from evomerge.merge.stats import MergeStats
from evomerge.recipe import Recipe

__all__ = ["MergedStream", "StreamingMerger"]


class MergedStream:
    """One recipe's merged tensors as ``(checkpoint name, tensor)`` pairs, computed as they are iterated (once).

    ``names`` lists every name the stream yields, in order, before any is computed: a consumer that loads them into
    a live engine can tell a complete swap from a partial one. ``merge_seconds`` is the time spent merging.
    """

    def __init__(self, plan: MergePlan, sources: ResidentSources, names: list[str]) -> None:
        self.plan, self.sources, self.names = plan, sources, list(names)
        self.merge_seconds = 0.0
        self.done = 0
        self._started = False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self._started:
            raise RuntimeError("a merged stream is iterated once")
        self._started = True
        return self._tensors()

    @torch.no_grad()
    def _tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        it = merge_resident(self.plan, self.sources, self.names)
        while True:
            t0 = time.perf_counter()
            try:
                name, merged = next(it)
            except StopIteration:
                return
            finally:
                self.merge_seconds += time.perf_counter() - t0
            self.done += 1
            yield name, merged


class StreamingMerger:
    """Merge recipes from resident ``sources`` into :class:`MergedStream` s (no live module; module docstring).

    ``tied``: the reference ties its output projection to its input embedding (``ModelFolder.tied_embeddings``);
    a stored projection is then left out of the stream, after checking that every source stores it equal to the
    embedding, as :class:`~evomerge.merge.materialize.InPlaceMerger` does.
    """

    def __init__(self, sources: ResidentSources, *, tied: bool, stats: MergeStats | None = None) -> None:
        self.sources, self.stats = sources, stats
        names = list(sources.names)
        if tied:
            heads = [n for n in names if sources.roles[n].kind == "lm_head"]
            embeds = [n for n in names if sources.roles[n].kind == "embed"
                      and heads and sources.shapes[n] == sources.shapes[heads[0]]]
            if len(heads) == 1 and len(embeds) == 1:
                for name, kept in _tied_pairs({heads[0]: embeds[0]}, sources.roles).items():
                    _check_tied_sources(sources, name, kept)
                    names.remove(name)
        self.names = names

    def stream(self, recipe: Recipe) -> MergedStream:
        """The merged tensors of ``recipe`` (computed when iterated); raises a config error of the recipe now."""
        plan = MergePlan.build(recipe, self.sources.num_layers, self.stats)
        self.sources.row_index(plan)  # a recipe the sources cannot serve fails before anything is streamed
        return MergedStream(plan, self.sources, self.names)
