"""The search-space contract: a pure, documented map genome -> Recipe.

A search space has a fixed dimension ``dim`` and box bounds ``lower``/``upper`` (``[0, 1]^dim`` for the
built-in kinds); ``x0`` is the default start, the plain hand-set merge the template describes.
``decode(genome)`` is pure and deterministic: the same genome always gives the same Recipe (and
hash). A genome outside the bounds is clipped to them; a genome of the wrong length or with
non-finite values raises :class:`~evomerge.errors.ConfigError`. ``genes()`` lists every gene (its
name, what it controls, its decoded range and transform) and ``describe()`` prints them as a table.

Spaces are built from a template (``evomerge.spaces.template``) and a :class:`SpaceModels`, a
description of the source models read from folder headers only (names, base, layer count, model
type, module kinds present): building a space never reads weights. Space kinds register in
:data:`SPACES` by the template's ``kind``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from evomerge.errors import ConfigError
from evomerge.names import MODULE_KINDS, PROJECTIONS
from evomerge.recipe import MERGED, Recipe
from evomerge.registry import Registry

if TYPE_CHECKING:
    from evomerge.merge.methods.base import MergeMethod
    from evomerge.optim.problem import SegmentStructure
    from evomerge.spaces.params import ParamGenes

Array = npt.NDArray[np.float64]


@dataclass(frozen=True)
class GeneInfo:
    """One gene: its name, what it controls, the decoded values at gene 0 and 1, the transform, the start."""

    name: str
    controls: str
    low: float
    high: float
    transform: str
    start: float


@dataclass(frozen=True)
class SpaceModels:
    """What a space needs to know about the source models (read from folder headers, never weights).

    ``names`` are every model available to the space (the base included when there is one);
    ``module_kinds`` are the tensor kinds present (``embed``, ``attn``, ``mlp``, ``norm``, ``lm_head``,
    ``other``): a model with tied embeddings has no ``lm_head``. ``projections`` are the attention and MLP
    projections present (``q`` … ``down``; none for fused ones). ``tokenizer_source`` and
    ``pad_to_multiple_of`` are copied into every decoded recipe (:attr:`vocab_fields`).
    """

    names: tuple[str, ...]
    num_layers: int
    base: str | None = None
    model_type: str = "llama"
    module_kinds: frozenset[str] = field(default_factory=lambda: frozenset(MODULE_KINDS))
    tokenizer_source: str | None = None
    pad_to_multiple_of: int | None = None
    projections: frozenset[str] = field(default_factory=lambda: frozenset(PROJECTIONS))

    @property
    def vocab_fields(self) -> dict[str, Any]:
        """The recipe fields that choose the merged vocabulary (only those set)."""
        out = {"tokenizer_source": self.tokenizer_source, "pad_to_multiple_of": self.pad_to_multiple_of}
        return {k: v for k, v in out.items() if v is not None}

    def __post_init__(self) -> None:
        names = tuple(self.names)
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "module_kinds", frozenset(self.module_kinds))
        object.__setattr__(self, "projections", frozenset(self.projections))
        if not names:
            raise ConfigError("models: a search space needs at least one source model")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"models: listed more than once: {dup}")
        if MERGED in names:
            raise ConfigError(f"models: {MERGED!r} is reserved for the parameter-space merge of a hybrid")
        if self.base is not None and self.base not in names:
            raise ConfigError(f"base_model {self.base!r} is not one of the models {list(names)}")
        if self.num_layers < 1:
            raise ConfigError(f"num_layers must be >= 1, got {self.num_layers}")
        bad = sorted(self.module_kinds - set(MODULE_KINDS))
        if bad:
            raise ConfigError(f"module kinds {bad} are unknown; kinds are {', '.join(MODULE_KINDS)}")
        bad = sorted(self.projections - set(PROJECTIONS))
        if bad:
            raise ConfigError(f"projections {bad} are unknown; projections are {', '.join(PROJECTIONS)}")

    @property
    def sources(self) -> tuple[str, ...]:
        """Every model but the base, in order."""
        return tuple(n for n in self.names if n != self.base)

    @classmethod
    def from_tensor_names(
        cls,
        names: Sequence[str],
        *,
        num_layers: int,
        tensor_names: Iterable[str],
        base: str | None = None,
        model_type: str = "llama",
    ) -> SpaceModels:
        """Build from one model's tensor names (the module kinds come from ``evomerge.io.arch.tensor_role``)."""
        from evomerge.io.arch import tensor_role

        roles = [tensor_role(n, model_type) for n in tensor_names]
        kinds = frozenset(r.kind for r in roles)
        projections = frozenset(r.proj for r in roles if r.proj is not None)
        return cls(tuple(names), num_layers, base, model_type, kinds, projections=projections)

    @classmethod
    def from_folders(
        cls, folders: Mapping[str, Any], *, base: str | None = None, tokenizer_source: str | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> SpaceModels:
        """Build from opened source folders (objects with ``num_layers``, ``model_type``, ``tensor_names``).

        A folder with tied embeddings (``tied_embeddings``) has no ``lm_head`` kind, even when it also
        stores its output projection: that tensor is merged as the input embedding.
        """
        from evomerge.io.arch import tensor_role

        if not folders:
            raise ConfigError("models: a search space needs at least one source model")
        ref = folders[base] if base is not None else next(iter(folders.values()))
        names = list(ref.tensor_names)
        if getattr(ref, "tied_embeddings", False):
            names = [n for n in names if tensor_role(n, ref.model_type).kind != "lm_head"]
        models = cls.from_tensor_names(
            list(folders),
            num_layers=int(ref.num_layers),
            tensor_names=names,
            base=base,
            model_type=str(ref.model_type or ""),
        )
        return dataclasses.replace(models, tokenizer_source=tokenizer_source, pad_to_multiple_of=pad_to_multiple_of)


@runtime_checkable
class SearchSpace(Protocol):
    """A pure, documented map genome -> Recipe (see the module docstring)."""

    kind: str

    @property
    def dim(self) -> int: ...

    @property
    def lower(self) -> Array: ...

    @property
    def upper(self) -> Array: ...

    @property
    def x0(self) -> Array: ...

    def decode(self, genome: npt.ArrayLike) -> Recipe: ...

    def genes(self) -> list[GeneInfo]: ...

    def describe(self) -> str: ...

    #: The parameter-space genes (per-model weights …) a warm start re-centres; None where the space has none
    #: (routing, segments).
    @property
    def param_genes(self) -> ParamGenes | None: ...

    def prepare_segments(self, folders: Mapping[str, Any]) -> SegmentStructure | None:
        """The segment structure M2N2's crossover works over (reading what it needs from the source folders),
        or None for a space without segments."""
        ...


# --------------------------------------------------------------------------- transforms
@dataclass(frozen=True)
class Transform:
    """Map a gene in ``[0, 1]`` to a value in ``[low, high]``: ``linear`` or ``log`` (geometric)."""

    low: float
    high: float
    kind: str = "linear"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ConfigError(f"range [{self.low}, {self.high}]: need finite low < high")
        if self.kind == "log" and self.low <= 0:
            raise ConfigError(f"range [{self.low}, {self.high}]: a log transform needs low > 0")
        if self.kind not in ("linear", "log"):
            raise ConfigError(f"transform {self.kind!r}: use linear or log")

    def value(self, gene: float) -> float:
        """The decoded value of ``gene``, rounded to 12 significant digits (so round numbers stay round)."""
        if self.kind == "log":
            raw = self.low * (self.high / self.low) ** gene
        else:
            raw = self.low + gene * (self.high - self.low)
        return float(f"{min(max(raw, self.low), self.high):.12g}")

    def gene(self, value: float) -> float:
        """The gene that decodes to ``value`` (``value`` must lie in the range)."""
        if not self.low <= value <= self.high:
            raise ConfigError(f"value {value} is outside the range [{self.low}, {self.high}]")
        if self.kind == "log":
            return float(math.log(value / self.low) / math.log(self.high / self.low))
        return float((value - self.low) / (self.high - self.low))

    def describe(self) -> str:
        return "linear" if self.kind == "linear" else "log (geometric)"


# --------------------------------------------------------------------------- common machinery
class GeneSpace:
    """Shared machinery of the built-in spaces: genome in ``[0, 1]^dim``, clipping, the gene table."""

    kind: str = ""

    def __init__(self, genes: Sequence[GeneInfo], x0: Sequence[float], title: str) -> None:
        if len(genes) != len(x0):
            raise ValueError("one start value per gene")
        if not genes:
            raise ConfigError(f"{title}: the search space has no genes (nothing to search)")
        self._genes = list(genes)
        self._x0 = np.asarray(x0, dtype=np.float64)
        self._title = title

    @property
    def dim(self) -> int:
        return len(self._genes)

    @property
    def lower(self) -> Array:
        return np.zeros(self.dim)

    @property
    def upper(self) -> Array:
        return np.ones(self.dim)

    @property
    def x0(self) -> Array:
        return self._x0.copy()

    def genes(self) -> list[GeneInfo]:
        return list(self._genes)

    @property
    def param_genes(self) -> ParamGenes | None:
        return None

    def prepare_segments(self, folders: Mapping[str, Any]) -> SegmentStructure | None:
        return None

    def unit(self, genome: npt.ArrayLike) -> Array:
        """``genome`` as a float vector clipped to the bounds; wrong length or non-finite -> ConfigError."""
        g = np.asarray(genome, dtype=np.float64).reshape(-1)
        if g.shape != (self.dim,):
            raise ConfigError(f"genome has {g.size} values; this search space has dim {self.dim}")
        if not np.all(np.isfinite(g)):
            raise ConfigError(f"genome has non-finite values at {np.flatnonzero(~np.isfinite(g)).tolist()}")
        return np.clip(g, self.lower, self.upper)

    def describe(self) -> str:
        rows = [("#", "gene", "controls", "range", "transform", "x0")]
        for i, g in enumerate(self._genes):
            rows.append((str(i), g.name, g.controls, f"[{g.low:g}, {g.high:g}]", g.transform, f"{g.start:g}"))
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [f"{self._title}: {self.dim} genes, genome in [0, 1]^{self.dim}"]
        for j, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
            if j == 0:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)


SpaceFactory = Callable[..., SearchSpace]

#: Space kinds by template ``kind``: ``factory(template, models, methods=…) -> SearchSpace``.
SPACES: Registry[SpaceFactory] = Registry("search space kind")


def build_space(template: Any, models: SpaceModels, *, methods: Registry[MergeMethod] | None = None) -> SearchSpace:
    """Build the space a validated template describes for ``models``.

    ``methods`` is the merge-method registry the parameters are read from (default: the project's
    ``METHODS``, with every built-in method imported).
    """
    if methods is None:
        from evomerge.merge.methods.base import METHODS

        _import_methods()
        methods = METHODS
    return SPACES.get(template.kind)(template, models, methods=methods)


def _import_methods() -> None:
    """Import the method package so that every built-in method has registered itself."""
    import importlib

    importlib.import_module("evomerge.merge.methods")
