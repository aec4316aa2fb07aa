"""Resident sources: a worker loads its source models once and keeps them as reference + task vectors."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from evomerge.errors import MaterializeError
from evomerge.io.arch import TensorRole
from evomerge.io.folder import vocab_rows
from evomerge.merge.methods.sparsify import magnitude_order
from evomerge.merge.vocab import VocabPlan, depends_on_models, effective_source
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from evomerge.io import ModelFolder
    from evomerge.merge.materialize import MergePlan
    from evomerge.merge.placement import Placement

log = logging.getLogger(__name__)


#: One factored adapter tensor: ``(B, A, scale, transpose, fixed)`` in float32 on the device; its task vector is
#: ``fixed + B @ A * scale`` (transposed when ``transpose``); ``fixed`` (a stored full tensor minus the base) or
#: the factors may be None.
Factor = tuple[torch.Tensor | None, torch.Tensor | None, float, bool, torch.Tensor | None]


class TaskVectors(Mapping[str, torch.Tensor]):
    """Stacked task vectors by tensor name, with the rows of LoRA adapters kept factored.

    ``dense[name]`` holds the rows ``dense_rows`` (full sources) as ``(len(dense_rows), *S)``; ``factors[row]``
    maps each tensor an adapter changes to its :data:`Factor` (a tensor it leaves alone is a zero row). Reading
    ``vectors[name]`` (or :meth:`rows`) expands them into a new ``(N, *S)`` tensor in ``dtype``: the same values
    as the dense task vectors (bit for bit on the CPU), for the factors' bytes instead of a model's per adapter,
    and one expansion per tensor per merge (:mod:`evomerge.driver.plan` counts the transient).
    """

    def __init__(self, n: int, dense: dict[str, torch.Tensor], dense_rows: Sequence[int],
                 factors: dict[int, dict[str, Factor]], like: dict[str, torch.Tensor], device: torch.device,
                 all_dense: set[str] | None = None) -> None:
        self.n, self.dense, self.dense_rows, self.factors = n, dense, list(dense_rows), factors
        #: shape and dtype of each tensor (empty meta tensors), and the tensors held dense in every row
        self.like, self.device, self.all_dense = like, device, all_dense or set()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.rows(name, None)

    def __iter__(self):  # noqa: ANN204
        return iter(self.like)

    def __len__(self) -> int:
        return len(self.like)

    def rows(self, name: str, rows: Sequence[int] | None) -> torch.Tensor:
        """The task vectors of ``rows`` (None: all, in resident order) of tensor ``name``, expanded."""
        if name in self.all_dense:
            d = self.dense[name]
            return d if rows is None else d[list(rows)]
        rows = list(range(self.n)) if rows is None else list(rows)
        like = self.like[name]
        out = torch.empty((len(rows), *like.shape), dtype=like.dtype, device=self.device)
        for j, r in enumerate(rows):
            if r in self.factors:
                self.expand(name, r, out[j])
            else:
                out[j].copy_(self.dense[name][self.dense_rows.index(r)])
        return out

    def expand(self, name: str, row: int, out: torch.Tensor) -> None:
        f = self.factors[row].get(name)
        if f is None:
            out.zero_()
            return
        b, a, scale, transpose, fixed = f
        d = None
        if b is not None and a is not None:
            d = (b @ a) * scale
            d = d.T if transpose else d
        d = fixed if d is None else d if fixed is None else fixed + d
        out.copy_(d)

    @property
    def nbytes(self) -> int:
        tensors = [*self.dense.values(), *(t for fs in self.factors.values() for f in fs.values()
                                           for t in (f[0], f[1], f[4]) if t is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)


def _factor(folder: object, name: str, base: torch.Tensor, device: torch.device) -> Factor | None:
    """The :data:`Factor` of adapter ``folder``'s tensor ``name`` (None when it leaves it alone)."""
    factors, full = folder.factors, folder.full  # type: ignore[attr-defined]
    if name not in factors and name not in full:
        return None
    fixed = None
    if name in full:
        ref = folder.base.get(name, device=device, dtype=torch.float32)  # type: ignore[attr-defined]
        fixed = full[name].to(device=device, dtype=torch.float32) - ref  # as AdapterFolder.delta computes it
        if not bool(fixed.any()):  # a stored copy of the base's tensor (peft saves embeddings' base_layer)
            fixed = None
    if name not in factors:
        return None if fixed is None else (None, None, 1.0, False, fixed)
    b, a, scale, transpose = factors[name]
    return (b.to(device=device, dtype=torch.float32), a.to(device=device, dtype=torch.float32), scale, transpose,
            fixed)


class ResidentSources:
    """The reference model's tensors and the other models' task vectors, resident on one device.

    For every floating-point tensor name: ``base[name]`` (shape S) and ``deltas[name]`` (shape (N, *S),
    rows in ``order``), computed once as ``theta - reference`` in ``dtype``. Recipes whose delta models are a
    subset or a permutation of ``order`` are served by selecting rows; a recipe with another reference model
    needs another ``ResidentSources``.

    ``ordered[name]`` (only when loaded with ``sorted_magnitudes=True``): for each row ``i``, its magnitude
    order (:func:`~evomerge.merge.methods.sparsify.magnitude_order`: flat indices by descending ``|delta|``,
    ties by ascending index, int32), from which TIES-style top-k thresholds and their tie cut are read in
    O(1) instead of selected on every merge (same masks, bit for bit). Memory cost: one int32 per task-vector
    entry (for float32 task vectors the resident size grows from ``(N + 1)`` to ``(2N + 1)`` model sizes)
    and one sort per task vector at load.
    """

    def __init__(
        self,
        reference: str,
        order: Sequence[str],
        base: dict[str, torch.Tensor],
        deltas: dict[str, torch.Tensor],
        roles: dict[str, TensorRole],
        num_layers: int,
        device: torch.device,
        ordered: dict[str, torch.Tensor] | None = None,
        vocab: VocabPlan | None = None,
    ) -> None:
        self.reference = reference
        self.order = tuple(order)
        self.base = base
        self.deltas = deltas
        self.roles = roles
        self.num_layers = num_layers
        self.device = device
        self.names = list(base)
        self.ordered = ordered
        #: The output vocabulary the vocabulary tensors are laid out in (see :mod:`evomerge.merge.vocab`).
        self.vocab = vocab
        #: Where the tensors live (see :meth:`load`) and every tensor's shape (without reading an mmap'd one).
        self.placement: Placement = "device"
        self.shapes = getattr(base, "shapes", None) or {n: tuple(t.shape) for n, t in base.items()}

    @classmethod
    def load(
        cls,
        paths: Mapping[str, str | Path],
        reference: str,
        order: Sequence[str] | None = None,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        sorted_magnitudes: bool = False,
        tokenizer_source: str | None = None,
        pad_to_multiple_of: int | None = None,
        placement: Placement = "device",
        factored_adapters: bool = False,
    ) -> ResidentSources:
        """Read every source once (lazily, tensor by tensor) and keep reference + task vectors resident.

        ``placement`` (:mod:`evomerge.merge.placement`): ``device`` keeps them on ``device``; ``host`` in host
        memory (pinned when ``device`` is a GPU), streamed to ``device`` tensor by tensor at each merge; ``mmap``
        keeps nothing and reads the safetensors files at each merge (no magnitude orders then). Every placement
        gives the same tensors, bit for bit.

        ``sorted_magnitudes`` also keeps each task vector's sorted magnitudes (see the class docstring):
        faster magnitude-sparsified merges (TIES) for one int32 per task-vector entry in memory.
        ``tokenizer_source`` / ``pad_to_multiple_of``: the output vocabulary of every recipe served, over all
        the sources (:func:`~evomerge.merge.vocab.plan_vocab`); vocabulary tensors are kept laid out in it.
        ``factored_adapters``: keep the task vectors of LoRA adapters on the reference as their factors
        (:class:`TaskVectors`; vocabulary tensors laid out by token stay dense); default: dense, like full
        sources.
        """
        from evomerge.io import ModelFolder, check_mergeable, tensor_role
        from evomerge.io.adapter import AdapterFolder
        from evomerge.merge.vocab import plan_vocab, vocab_tensors

        t0 = time.perf_counter()
        device = torch.device(device)
        order = [m for m in (order if order is not None else paths) if m != reference]
        folders = {m: ModelFolder.open(Path(paths[m]).expanduser()) for m in [reference, *order]}
        check_mergeable(folders, vocab=True)
        ref = folders[reference]
        vocab = plan_vocab(folders, reference, tokenizer_source, pad_to_multiple_of)
        by_token = set(vocab_tensors(ref)) if vocab.aligns else set()
        base: dict[str, torch.Tensor] = {}
        deltas: dict[str, torch.Tensor] = {}
        roles: dict[str, TensorRole] = {}
        ordered: dict[str, torch.Tensor] | None = {} if sorted_magnitudes and placement != "mmap" else None
        # where the tensors are kept: on the device, in host memory (pinned for a CUDA device), or nowhere (mmap:
        # read again from the files at each merge; read once here all the same, to refuse non-finite weights)
        store = device if placement == "device" else torch.device("cpu")
        pin = placement == "host" and device.type == "cuda"
        shapes: dict[str, tuple[int, ...]] = {}
        # rows kept factored: adapters on the reference itself (device placement only)
        factored = [i for i, m in enumerate(order) if factored_adapters and isinstance(folders[m], AdapterFolder)
                    and folders[m].base.path.resolve() == ref.path.resolve()]
        if factored and placement != "device":
            raise MaterializeError(f"resources.adapter_residency factored needs resources.placement device, not "
                                   f"{placement}")
        factors: dict[int, dict[str, Factor]] = {i: {} for i in factored}
        dense_part: dict[str, torch.Tensor] = {}
        like: dict[str, torch.Tensor] = {}
        all_dense: set[str] = set()
        for name in ref.tensor_names:
            group = read_group(folders, name, reference, order, vocab, by_token, device=store, dtype=dtype, pin=pin)
            if group is None:
                continue
            b, d = group
            shapes[name], roles[name] = tuple(b.shape), tensor_role(name, ref.model_type)
            if placement == "mmap":
                continue
            if factored:
                if name not in by_token:
                    for i in factored:
                        f = _factor(folders[order[i]], name, b, device)
                        if f is not None:
                            factors[i][name] = f
                    dense_part[name] = d[[i for i in range(len(order)) if i not in factors]]
                else:  # laid out by token: every row dense
                    dense_part[name] = d
                    all_dense.add(name)
                like[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")
            base[name], deltas[name] = b, d
            if ordered is not None:
                ordered[name] = torch.stack([magnitude_order(row) for row in d]) if len(order) else d.new_empty(
                    (0, b.numel()), dtype=torch.int32)
                if pin:
                    ordered[name] = ordered[name].pin_memory()
            if factored:
                del deltas[name], d  # kept as dense_part + factors
        if factored:
            dense_rows = [i for i in range(len(order)) if i not in factors]
            deltas = TaskVectors(len(order), dense_part, dense_rows, factors, like,  # type: ignore[assignment]
                                 device, all_dense)
        if placement == "mmap":
            from evomerge.merge.placement import FolderGroups

            reader = FolderGroups(folders, reference, order, vocab, by_token, dtype, shapes)
            base, deltas = reader.base, reader.deltas
        self = cls(reference, order, base, deltas, roles, ref.num_layers, device, ordered, vocab)
        self.rows = {m: vocab_rows(f) for m, f in folders.items()}
        self.placement, self.shapes = placement, shapes
        if placement != "mmap":  # mmap reads the open folders at each merge
            for f in folders.values():
                f.close()
        log.info(
            "resident sources: %d tensors, %d task vectors, %.1f MB %s in %.2fs",
            len(shapes), len(order), self.nbytes / 1e6, describe_placement(placement, device), time.perf_counter() - t0,
        )
        return self

    @property
    def nbytes(self) -> int:
        """Bytes kept resident (0 with the ``mmap`` placement)."""
        if self.placement == "mmap":
            return 0
        deltas = self.deltas
        if isinstance(deltas, TaskVectors):
            tensors = (*self.base.values(), *(self.ordered or {}).values())
            return sum(t.numel() * t.element_size() for t in tensors) + deltas.nbytes
        tensors = (*self.base.values(), *deltas.values(), *(self.ordered or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def stream(self, names: Sequence[str], rows: torch.Tensor | None):  # -> Iterator[tuple[name, base, deltas, orders]]
        """``(name, base, deltas, orders)`` on the device for each of ``names`` in turn, as :meth:`group` and
        :meth:`sorted_rows` give them; the ``host`` placement copies tensor i + 1 while the caller merges tensor i
        (:func:`~evomerge.merge.placement.stream_groups`)."""
        from evomerge.merge.placement import stream_groups

        return stream_groups(self, names, rows)

    def row_index(self, plan: MergePlan) -> torch.Tensor | None:
        """Rows of the stacked deltas a plan needs (None = all rows in resident order)."""
        if plan.reference != self.reference:
            raise MaterializeError(
                f"recipe's reference model is {plan.reference!r} but the worker holds task vectors relative to "
                f"{self.reference!r}; set base_model: {self.reference}"
            )
        self.check_vocab(plan.recipe)
        if plan.order == self.order:
            return None
        unknown = [m for m in plan.order if m not in self.order]
        if unknown:
            raise MaterializeError(f"recipe uses model(s) {unknown} that this worker does not hold")
        return torch.tensor([self.order.index(m) for m in plan.order], device=self.device)

    def check_vocab(self, recipe: Recipe) -> None:
        """:class:`MaterializeError` unless ``recipe`` asks for the vocabulary these sources are laid out in."""
        held = self.vocab
        if held is None:
            return
        names = recipe.model_names
        rows = getattr(self, "rows", {})
        want = effective_source(recipe.tokenizer_source, [rows.get(m) for m in names])
        if want is None and recipe.pad_to_multiple_of and held.source == "base":
            want = "base"  # padding lays the base's vocabulary out by token too
        norm = {None: None, self.reference: "base"}
        if (norm.get(want, want), recipe.pad_to_multiple_of) != (norm.get(held.source, held.source), held.pad):
            raise MaterializeError(
                f"recipe's tokenizer_source {recipe.tokenizer_source!r} / pad_to_multiple_of "
                f"{recipe.pad_to_multiple_of} differ from the vocabulary the worker's sources are laid out in "
                f"(tokenizer_source {held.source!r}, pad_to_multiple_of {held.pad})"
            )
        if held.aligns and depends_on_models(held.source, self.reference) and set(names) != set(held.models):
            raise MaterializeError(
                f"tokenizer_source {held.source!r}: the vocabulary depends on the models merged; the worker's is "
                f"built over {sorted(held.models)} but the recipe reads {sorted(names)}"
            )

    def group(self, name: str, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(self.deltas, TaskVectors):  # factored adapters: only the rows asked for are expanded
            return self.base[name], self.deltas.rows(name, None if rows is None else rows.tolist())
        d = self.deltas[name]
        return self.base[name], (d if rows is None else d.index_select(0, rows.to(d.device)))

    def sorted_rows(self, name: str, rows: torch.Tensor | None) -> list[torch.Tensor] | None:
        """The magnitude orders of the rows :meth:`group` returns (None without ``sorted_magnitudes``)."""
        if self.ordered is None:
            return None
        o = self.ordered[name]
        return list(o) if rows is None else [o[i] for i in rows.tolist()]


def read_group(
    folders: Mapping[str, ModelFolder], name: str, reference: str, order: Sequence[str], vocab: VocabPlan,
    by_token: set[str], *, device: torch.device, dtype: torch.dtype | None, pin: bool = False, check: bool = True,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Tensor ``name`` of the reference and its stacked task vectors ``theta - reference`` (rows in ``order``) in
    ``dtype`` on ``device`` (in pinned memory with ``pin``), vocabulary tensors laid out in ``vocab``; None for a
    tensor that is not floating point. ``check``: refuse NaN/inf weights (:func:`check_finite`)."""
    ref = folders[reference]
    dt = dtype or ref.dtype(name)
    b = ref.get(name, device=device, dtype=dt)
    if not b.is_floating_point():
        return None
    if check:
        check_finite(name, reference, b)
    if name in by_token:
        raw = {reference: b}
        for m in order:
            raw[m] = folders[m].get(name, device=device, dtype=dt)
            if check:
                check_finite(name, m, raw[m])
        laid = vocab.align(raw)
        b = laid[reference]
        d = torch.empty((len(order), *b.shape), dtype=b.dtype, device=device, pin_memory=pin)
        for i, m in enumerate(order):
            torch.sub(laid[m], b, out=d[i])
        del raw, laid
    else:
        from evomerge.io.adapter import exact_delta

        d = torch.empty((len(order), *b.shape), dtype=b.dtype, device=device, pin_memory=pin)
        for i, m in enumerate(order):
            if exact_delta(folders[m], ref, name, d[i]):  # an adapter on the reference: B·A·scale
                if check:
                    check_finite(name, m, d[i])
                continue
            t = folders[m].get(name, device=device, dtype=dt)
            if check:
                check_finite(name, m, t)
            torch.sub(t, b, out=d[i])
    return (b.pin_memory() if pin else b), d


def describe_placement(placement: str, device: torch.device) -> str:
    return {"device": f"on {device}", "host": f"in host memory, streamed to {device}",
            "mmap": f"memory-mapped from the files, read to {device} at each merge"}[placement]


def check_finite(name: str, model: str, tensor: torch.Tensor) -> None:
    """:class:`MaterializeError` naming source ``model`` and tensor ``name`` if a float tensor holds NaN/inf.

    A finite sum proves every entry finite (a NaN or an inf makes the sum NaN or inf) in one pass without
    allocating; only a non-finite sum (also a finite tensor whose sum overflows) is checked entry by entry.
    """
    if (tensor.is_floating_point() and not bool(torch.isfinite(tensor.sum()))
            and not bool(torch.isfinite(tensor).all())):
        raise MaterializeError(f"source {model!r}, tensor {name}: contains NaN or inf weights")
