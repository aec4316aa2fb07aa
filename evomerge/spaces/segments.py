"""The segments space: merged weights as per-segment linear combinations of seed models (M2N2).

A segment is one (layer, module kind) block of the model (attention, MLP and norms of each layer; the
embeddings; the LM head). An individual is a coefficient matrix ``C[segment, seed]``; its genome is
``C.ravel()`` (segment-major) and it decodes to a ``linear`` recipe with ``normalize: false`` whose weights
are per-kind per-layer lists, so ``theta[s] = sum_m C[s, m] * seed_m[s]`` exactly. The genome *is* the
coefficient matrix (no affine transform), so a SLERP of two individuals in weight space is a SLERP of
their coefficients under the seeds' Gram matrices (:func:`segment_gram`), which is what M2N2 needs.

Tensors outside the layer stack follow mergekit's gradient rule (t = 0): the final norm shares layer 0's
norm coefficients.

Template (``kind: segments``)::

    kind: segments
    seeds: null            # seed models (default: every source; with include_base the base first)
    include_base: true
    coefficient_range: [-1.0, 2.0]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.spaces.base import SPACES, GeneInfo, SpaceModels

_PER_LAYER = ("attn", "mlp", "norm", "other")
_GLOBAL = ("embed", "lm_head")


class SegmentsTemplate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    kind: Literal["segments"]
    seeds: list[str] | None = None
    include_base: bool = True
    coefficient_range: tuple[float, float] = (-1.0, 2.0)
    description: str = ""


def segment_of(layer: int | None, kind: str) -> tuple[int | None, str]:
    """The segment key of a tensor: ``(layer, kind)``; outside layers ``(0, kind)`` for norms/other (t = 0)."""
    if kind in _GLOBAL:
        return (None, kind)
    return (layer if layer is not None else 0, kind)


class SegmentSpace:
    """See the module docstring."""

    kind = "segments"

    def __init__(self, template: SegmentsTemplate, models: SpaceModels, **_: Any) -> None:
        self.template = template
        self.models = models
        seeds = list(template.seeds) if template.seeds is not None else list(models.sources)
        if template.include_base and models.base is not None and models.base not in seeds:
            seeds.insert(0, models.base)
        unknown = [s for s in seeds if s not in models.names]
        if unknown:
            raise ConfigError(f"seeds: unknown model(s) {unknown}; models are {list(models.names)}")
        if len(seeds) < 2:
            raise ConfigError("seeds: a segments space needs at least two seed models")
        self.seeds = seeds
        lo, hi = template.coefficient_range
        if not lo < hi:
            raise ConfigError(f"coefficient_range: [{lo}, {hi}] needs low < high")
        self.lo, self.hi = float(lo), float(hi)
        L = models.num_layers
        kinds = models.module_kinds
        self.segments: list[tuple[int | None, str]] = [(None, k) for k in _GLOBAL if k in kinds]
        self.segments += [(layer, k) for layer in range(L) for k in _PER_LAYER if k in kinds]
        self._index = {s: i for i, s in enumerate(self.segments)}
        self.gram: npt.NDArray[np.float64] | None = None
        self.sizes: npt.NDArray[np.int64] | None = None

    # ---------------------------------------------------------------- protocol
    @property
    def dim(self) -> int:
        return len(self.segments) * len(self.seeds)

    @property
    def lower(self) -> npt.NDArray[np.float64]:
        return np.full(self.dim, self.lo)

    @property
    def upper(self) -> npt.NDArray[np.float64]:
        return np.full(self.dim, self.hi)

    @property
    def x0(self) -> npt.NDArray[np.float64]:
        return np.full(self.dim, 1.0 / len(self.seeds))

    def genes(self) -> list[GeneInfo]:
        return [
            GeneInfo(f"c[{self._name(s)}][{m}]", f"coefficient of seed {m!r} in segment {self._name(s)}",
                     self.lo, self.hi, "identity (coefficient)", 1.0 / len(self.seeds))
            for s in self.segments for m in self.seeds
        ]

    @staticmethod
    def _name(seg: tuple[int | None, str]) -> str:
        return seg[1] if seg[0] is None else f"L{seg[0]}.{seg[1]}"

    def describe(self) -> str:
        lines = [f"segments space: {len(self.segments)} segments x {len(self.seeds)} seeds = {self.dim} genes "
                 f"(coefficients in [{self.lo:g}, {self.hi:g}], x0 = uniform average)",
                 f"seeds: {', '.join(self.seeds)}", "#  gene  controls"]
        lines += [f"{i}  {g.name}  {g.controls}" for i, g in enumerate(self.genes())]
        return "\n".join(lines)

    def decode(self, genome: npt.ArrayLike) -> Recipe:
        c = np.asarray(genome, dtype=np.float64).reshape(-1)
        if c.shape != (self.dim,) or not np.all(np.isfinite(c)):
            raise ConfigError(f"genome: expected {self.dim} finite values")
        C = np.clip(c, self.lo, self.hi).reshape(len(self.segments), len(self.seeds))
        L = self.models.num_layers
        entries = []
        for m, seed in enumerate(self.seeds):
            weight: dict[str, Any] = {}
            for seg, i in self._index.items():
                layer, kind = seg
                v = float(f"{C[i, m]:.12g}")
                if layer is None:
                    weight[kind] = v
                else:
                    weight.setdefault(kind, [0.0] * L)[layer] = v
            entries.append({"model": seed, "parameters": {"weight": weight}})
        base = self.models.base
        return Recipe(method="linear", base_model=base if base is not None else None, models=tuple(entries),
                      parameters={"normalize": False}, **self.models.vocab_fields)

    # ---------------------------------------------------------------- M2N2 structure
    def segment_structure(self) -> Any:
        from evomerge.optim.base import SegmentStructure

        if self.gram is None:
            return None
        return SegmentStructure(len(self.seeds), len(self.segments), self.gram, self.sizes)

    def attach_gram(self, folders: Mapping[str, Any]) -> None:
        """Compute the seeds' per-segment Gram matrices from their folders (read once, streaming)."""
        self.gram, self.sizes = segment_gram(folders, self.seeds, self.segments)

    #: Segments hold model coefficients, not method parameters: nothing for a warm start to re-centre.
    param_genes = None

    def prepare_segments(self, folders: Mapping[str, Any]) -> Any:
        """The Gram matrices of the seeds (SLERP angles of M2N2 over recipes) and the segment structure."""
        self.attach_gram(folders)
        return self.segment_structure()


def segment_gram(
    folders: Mapping[str, Any], seeds: Sequence[str], segments: Sequence[tuple[int | None, str]]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """``gram[s, a, b] = <seed_a[s], seed_b[s]>`` over every float tensor of segment ``s`` (float64)."""
    import torch

    from evomerge.io import tensor_role

    index = {s: i for i, s in enumerate(segments)}
    M = len(seeds)
    gram = np.zeros((len(segments), M, M))
    sizes = np.zeros(len(segments), dtype=np.int64)
    ref = folders[seeds[0]]
    for name in ref.tensor_names:
        role = tensor_role(name, ref.model_type)
        seg = index.get(segment_of(role.layer, role.kind))
        if seg is None or len({tuple(folders[s].shape(name)) for s in seeds}) > 1:
            continue  # vocabulary tensors of different vocabularies: left out of the Gram matrices
        rows = [folders[s].get(name, dtype=torch.float64).reshape(-1) for s in seeds]
        if not rows[0].is_floating_point():
            continue
        X = torch.stack(rows)
        gram[seg] += (X @ X.T).numpy()
        sizes[seg] += X.shape[1]
    sizes = np.maximum(sizes, 1)
    return gram, sizes


SPACES.add("segments", SegmentSpace, capabilities={"segments"})
