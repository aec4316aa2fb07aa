"""Where a worker keeps its sources (``resources.placement``), and how a merge reads them from there.

* ``device``: the reference and the stacked task vectors live on the worker's device (the fastest; needs
  ``(N + 1)`` model sizes of device memory besides the live model);
* ``host``: they live in host memory (pinned when the device is a GPU) and each merge streams them to the device
  tensor by tensor, double-buffered: the copy of tensor ``i + 1`` runs on a side CUDA stream while tensor ``i``
  merges, so the merge costs about the larger of the copy and the compute. On a CPU device the tensors already
  are where the merge runs and the copy is a no-op: the same code path, nothing copied;
* ``mmap``: nothing is resident; each merge reads tensor ``i``'s reference and source tensors from the
  memory-mapped safetensors files and forms the task vectors again (the last resort: the page cache holds what
  the host can spare, and the files are read again at each merge). Magnitude orders are not kept.

Every placement hands the merge the same tensors: task vectors are formed by the one function
:func:`~evomerge.merge.sources.read_group`, in the same dtype, and subtraction is exactly rounded on every device,
so the same recipe gives the same bits in every placement.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from evomerge.merge.sources import ResidentSources

Placement = Literal["device", "host", "mmap"]
#: The placements a worker can use, the first fastest.
PLACEMENTS: tuple[Placement, ...] = ("device", "host", "mmap")

__all__ = ["PLACEMENTS", "FolderGroups", "Placement", "stream_groups"]


class _Lazy(Mapping[str, torch.Tensor]):
    def __init__(self, groups: FolderGroups, part: int) -> None:
        self._groups, self._part = groups, part
        self.shapes = groups.shapes

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        return self._groups.read(name)[self._part]

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


class FolderGroups:
    """The ``mmap`` placement's sources: ``base[name]`` and ``deltas[name]`` read from the open folders on access
    (the last tensor read is kept, so reading a name's base and then its task vectors reads the files once)."""

    def __init__(self, folders: Mapping[str, Any], reference: str, order: Sequence[str], vocab: Any,
                 by_token: set[str], dtype: torch.dtype | None, shapes: dict[str, tuple[int, ...]]) -> None:
        self.folders, self.reference, self.order = folders, reference, tuple(order)
        self.vocab, self.by_token, self.dtype, self.shapes = vocab, by_token, dtype, shapes
        self.device = torch.device("cpu")
        self._last: tuple[str, tuple[torch.Tensor, torch.Tensor]] | None = None
        self.base, self.deltas = _Lazy(self, 0), _Lazy(self, 1)

    def read(self, name: str, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(base, deltas)`` of ``name`` on ``device`` (default: the host), read from the files."""
        from evomerge.merge.sources import read_group

        device = device or self.device
        if self._last is not None and self._last[0] == name and self._last[1][0].device == device:
            return self._last[1]
        group = read_group(self.folders, name, self.reference, self.order, self.vocab, self.by_token,
                           device=device, dtype=self.dtype, check=False)
        assert group is not None  # only floating-point names are listed
        self._last = (name, group)
        return group


def stream_groups(
    sources: ResidentSources, names: Sequence[str], rows: torch.Tensor | None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, list[torch.Tensor] | None]]:
    """``(name, base, deltas, orders)`` on ``sources.device`` for each name in turn (see the module docstring).

    ``deltas`` holds the rows ``rows`` selects (all, in resident order, for None) and ``orders`` their magnitude
    orders (None when not kept). A yielded tensor may be a buffer that is reused two names later: merge it before
    asking for the next but one.
    """
    device = sources.device
    if sources.placement == "mmap":
        reader: FolderGroups = sources.deltas._groups  # type: ignore[attr-defined]
        for name in names:
            base, deltas = reader.read(name, device)
            yield name, base, deltas if rows is None else deltas.index_select(0, rows), None
        return
    ordered = sources.ordered
    copy = torch.cuda.Stream(device) if device.type == "cuda" and sources.placement == "host" else None

    def issue(name: str) -> tuple[list[torch.Tensor], Any]:
        held = [sources.base[name], sources.deltas[name], *([ordered[name]] if ordered is not None else [])]
        if copy is None:  # already where the merge runs: nothing to copy
            return held, None
        with torch.cuda.stream(copy):
            moved = [t.to(device, non_blocking=True) for t in held]
            done = torch.cuda.Event()
            done.record(copy)
        return moved, done

    pending = issue(names[0]) if names else None
    for i, name in enumerate(names):
        assert pending is not None
        tensors, done = pending
        if i + 1 < len(names):
            pending = issue(names[i + 1])  # its copy overlaps this tensor's merge
        if done is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            for t in tensors:  # the allocator must not reuse these before the merge stream is done with them
                t.record_stream(current)
        base, deltas, *order = tensors
        if rows is not None:
            deltas = deltas.index_select(0, rows)
        orders = None
        if order:
            orders = list(order[0]) if rows is None else [order[0][j] for j in rows.tolist()]
        yield name, base, deltas, orders
