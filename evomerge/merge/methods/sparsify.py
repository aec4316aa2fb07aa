"""Sparsification of stacked task vectors, shared by TIES, DARE, breadcrumbs and DELLA.

Same rules as mergekit's ``sparsify.py``, applied to each row ``deltas[i]`` of a stack with its own
density (and gamma / epsilon):

* ``magnitude`` keeps the ``max(1, int(density * numel))`` largest magnitudes;
* ``magnitude_outliers`` (breadcrumbs) sorts magnitudes ascending and keeps positions
  ``[n_bot, n_bot + int(density * numel))`` with ``n_bot = max(0, numel - int(density * numel) -
  int(gamma * numel))``: the ``gamma`` share of largest values goes first, then the smallest;
* ``random`` (DARE) keeps each element with probability ``density``;
* ``della_magprune`` keeps each element with probability ``density - epsilon + 2 * epsilon * r / (C - 1)``
  where ``r`` is its ascending magnitude rank within its row (dimension 1 of the tensor; a 1-D tensor is
  one row of ``C`` elements). A row of one element uses the midpoint, ``density``.

A density ``>= 1`` leaves a row untouched (no mask, no rescale). With ``rescale`` the kept values are
scaled so that the row keeps its L1 norm (mergekit's ``RescaleNorm.l1``), unless either norm is below
``1e-7``.

Ties: where mergekit's order among equal magnitudes is implementation-defined, ours is the order of a
stable sort (equal magnitudes rank by flat index: the lower index is the smaller one ascending and comes
first descending), so results never depend on the device or the sort algorithm.

Speed: thresholds come from an exact selection (:func:`kth_smallest`: a sorted strided sample brackets
the answer, one pass counts, and only the bracket is searched), not from a full sort; DELLA needs full
per-row ranks and uses one stable sort per row (on the magnitudes' bit patterns, which order like the
magnitudes). Random draws use only the given CPU generator, drawn as ``torch.rand(row shape)`` per
sparsified row in row order, then moved to the tensor's device. A caller that holds the rows' magnitude
order (:func:`magnitude_order` of resident task vectors) passes it as ``orders``: the
``magnitude`` threshold and the tie cut are then read from it in O(1) instead of selected, with the same
result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "SPARSIFICATIONS",
    "excluded_ties",
    "fitting_orders",
    "kth_smallest",
    "largest_mask",
    "magnitude_order",
    "smallest_mask",
    "sparsify",
    "top_k_threshold",
]

SPARSIFICATIONS = ("magnitude", "magnitude_outliers", "random", "della_magprune")

_DIRECT = 1 << 16  # below this many elements torch.kthvalue is used as is
_SAMPLE = 1 << 14  # target size of the strided sample that brackets a threshold
_EPS = 1e-7  # mergekit's rescale tolerance
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
         torch.bfloat16: torch.int16}


def _count(mask: torch.Tensor) -> int:
    return int(torch.count_nonzero(mask))


def magnitude_order(row: torch.Tensor) -> torch.Tensor:
    """Flat indices of ``row`` by descending magnitude, equal magnitudes by ascending index (int32, 1-D).

    Its first ``k`` entries are exactly :func:`largest_mask`'s ``k`` kept entries, for every ``k``.
    """
    if row.numel() >= 2**31:
        raise ValueError(f"a tensor of {row.numel()} elements is too large for an int32 magnitude order")
    return torch.sort(row.reshape(-1).abs(), descending=True, stable=True).indices.to(torch.int32)


def fitting_orders(
    orders: Sequence[torch.Tensor | None] | None, n: int, m: int
) -> Sequence[torch.Tensor | None] | None:
    """``orders`` if they describe ``n`` rows of ``m`` elements (one order or ``None`` per row), else None."""
    if orders is None or len(orders) != n or any(o is not None and o.numel() != m for o in orders):
        return None
    return orders


def _sample_index(m: int, device: torch.device) -> torch.Tensor:
    """``_SAMPLE`` flat indices into ``m`` entries, uniform with replacement, from a fixed seed.

    A strided sample ``x[::m // _SAMPLE]`` aliases with a matrix's row length when the stride is a multiple
    of it (for a 49152 x 576 embedding the stride is 3 x 576: every sampled entry lies in column 0); it then
    brackets the threshold of a few columns rather than of the tensor, and :func:`kth_smallest` falls back to
    a full ``torch.kthvalue``. Only the speed depends on the sample, never the result.
    """
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(m, (_SAMPLE,), generator=gen).to(device)


def kth_smallest(x: torch.Tensor, r: int) -> torch.Tensor:
    """The ``r``-th smallest value (1-based) of the 1-D tensor ``x``, exactly, as a 0-d tensor."""
    m = x.numel()
    if not 1 <= r <= m:
        raise ValueError(f"rank {r} outside 1..{m}")
    if m <= _DIRECT:
        return torch.kthvalue(x, r).values
    sample = torch.sort(x[_sample_index(m, x.device)]).values
    s = sample.numel()
    q = r / m
    margin = 4.0 * math.sqrt(s * q * (1.0 - q)) + 2.0
    lo_i, hi_i = math.floor(q * s - margin), math.ceil(q * s + margin)
    lo = sample[lo_i] if lo_i >= 0 else None
    hi = sample[hi_i] if hi_i < s else None
    if lo is None and hi is None:
        return torch.kthvalue(x, r).values
    below = x < lo if lo is not None else None
    n_below = _count(below) if below is not None else 0
    band = x <= hi if hi is not None else None
    n_upto = _count(band) if band is not None else m
    if not n_below < r <= n_upto:  # the sample missed: exact fallback
        return torch.kthvalue(x, r).values
    if lo is not None and hi is not None and bool(lo == hi):
        return lo
    if band is None:
        assert below is not None
        band = below.logical_not_()
    elif below is not None:
        band.logical_and_(below.logical_not_())
    return kth_smallest(x[band], r - n_below)


def _add_ties(mask: torch.Tensor, eq: torch.Tensor, need: int) -> None:
    """Add the ``need`` lowest-index elements of ``eq`` to ``mask`` (all of them when that is all)."""
    if need <= 0:
        return
    if _count(eq) > need:
        mask.index_fill_(0, torch.nonzero(eq).view(-1)[:need], True)
    else:
        mask |= eq


def smallest_mask(x: torch.Tensor, r: int, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the ``r`` smallest elements of 1-D ``x`` (equal values: lower index first)."""
    m = x.numel()
    if out is None:
        out = torch.empty(m, dtype=torch.bool, device=x.device)
    if r <= 0:
        return out.fill_(False)
    if r >= m:
        return out.fill_(True)
    thr = kth_smallest(x, r)
    if _count(torch.le(x, thr, out=out)) == r:  # no tie at the threshold (the usual case)
        return out
    torch.lt(x, thr, out=out)
    _add_ties(out, x == thr, r - _count(out))
    return out


def _order_threshold(x: torch.Tensor, k: int, order: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(``|x|`` of the ``k``-th kept entry as a 0-d tensor, its flat index) read from a magnitude order."""
    cut = int(order[k - 1])
    return x.reshape(-1)[cut].abs(), cut


def _tie_excluded(x: torch.Tensor, k: int, order: torch.Tensor, thr: torch.Tensor) -> bool:
    """True when an entry left out of the ``k`` largest has the threshold magnitude (a tie to split)."""
    return k < x.numel() and bool(x.reshape(-1)[int(order[k])].abs() == thr)


def largest_mask(
    x: torch.Tensor, k: int, *, out: torch.Tensor | None = None, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Boolean mask of the ``k`` largest elements of 1-D ``x`` (equal values: lower index first).

    ``order``, when given, is :func:`magnitude_order` of ``x``: the threshold and the last kept index
    are then read from it rather than selected.
    """
    m = x.numel()
    if out is None:
        out = torch.empty(m, dtype=torch.bool, device=x.device)
    if k <= 0:
        return out.fill_(False)
    if k >= m:
        return out.fill_(True)
    if order is not None:
        thr, cut = _order_threshold(x, k, order)
        thr = thr.to(x.dtype)
        torch.ge(x, thr, out=out)
        if not _tie_excluded(x, k, order, thr):
            return out
        torch.gt(x, thr, out=out)
        out[: cut + 1] |= x[: cut + 1] == thr
        return out
    thr = kth_smallest(x, m - k + 1)
    if _count(torch.ge(x, thr, out=out)) == k:  # no tie at the threshold (the usual case)
        return out
    torch.gt(x, thr, out=out)
    _add_ties(out, x == thr, k - _count(out))
    return out


def top_k_threshold(
    row: torch.Tensor, k: int, *, order: torch.Tensor | None = None
) -> tuple[float, int]:
    """``(thr, cut)`` describing :func:`largest_mask` of ``|row|`` (1-D) for ``k`` without building it.

    The ``k`` kept entries are those with ``|x| > thr``, plus those with ``|x| == thr`` at flat index
    ``<= cut`` (ties go to the lower index). ``k >= numel`` gives ``(-1.0, numel)``: everything is kept.
    ``order`` is :func:`magnitude_order` of ``row``: both are then read from it in O(1), not selected.
    """
    m = row.numel()
    if k >= m:
        return -1.0, m
    if order is not None:
        thr_t, cut = _order_threshold(row, k, order)
        return float(thr_t), cut
    magnitude = row.abs()
    thr_t = kth_smallest(magnitude, m - k + 1)
    thr = float(thr_t)
    ge = magnitude >= thr_t
    if _count(ge) == k:
        return thr, m
    n_gt = _count(torch.gt(magnitude, thr_t, out=ge))
    tied = torch.nonzero(torch.eq(magnitude, thr_t, out=ge)).view(-1)
    return thr, int(tied[k - n_gt - 1])


def excluded_ties(
    row: torch.Tensor, k: int, thr: float, cut: int, *, order: torch.Tensor | None = None
) -> torch.Tensor:
    """Flat indices (int64, ascending) of the entries with ``|x| == thr`` that the top-``k`` mask leaves out.

    ``(thr, cut)`` come from :func:`top_k_threshold`: those are the entries equal to ``thr`` past ``cut``.
    With ``order`` (:func:`magnitude_order`) they are read from it — they follow the ``k`` kept entries —
    touching only the tie run; without, one pass finds them.
    """
    flat = row.reshape(-1)
    m = flat.numel()
    if order is None:
        tied = torch.nonzero(flat[cut + 1 :].abs() == thr).view(-1)
        return tied.add_(cut + 1)
    stop, step = k, 64
    while stop < m:  # gallop to the end of the tie run (the run is ordered by index)
        hi = min(m, stop + step)
        differ = torch.nonzero(flat[order[stop:hi].long()].abs() != thr)
        if differ.numel():
            stop += int(differ[0])
            break
        stop, step = hi, step * 8
    return order[k:stop].long()  # the tie run of a stable order is by ascending index already


def _prune_to_largest(
    row: torch.Tensor, k: int, magnitude: torch.Tensor, order: torch.Tensor | None, *, out: torch.Tensor,
    signs: torch.Tensor,
) -> bool:
    """Write ``row * largest_mask(|row|, k)`` into ``out`` in two passes when no magnitude ties the threshold.

    Returns False, writing nothing, when entries equal to the threshold would have to be split by index
    (then the caller builds the mask). ``out`` may be ``row`` itself; ``signs`` is a tensor with the
    signs of ``row`` that ``out`` does not overlap (the row in its original dtype). ``order`` is the
    row's magnitude order, if known; otherwise ``magnitude`` receives ``|row|``. Bit-identical to the
    mask multiply: ``hardshrink`` by the largest value below the threshold zeroes exactly ``|x| < thr``,
    and ``copysign`` restores the ``-0.0`` that ``x * 0.0`` gives for negative ``x``.
    """
    m = row.numel()
    if k >= m:
        out.copy_(row)
        return True
    if order is not None:
        thr, _ = _order_threshold(row, k, order)
        if _tie_excluded(row, k, order, thr):
            return False
        thr = thr.to(row.dtype)
    else:
        torch.abs(row, out=magnitude)
        thr = kth_smallest(magnitude, m - k + 1)
        if _count(torch.ge(magnitude, thr, out=out.new_empty(m, dtype=torch.bool))) != k:
            return False
    below = float(torch.nextafter(thr, torch.zeros_like(thr)))
    torch.ops.aten.hardshrink.out(row, below, out=out)
    torch.copysign(out, signs, out=out)
    return True


def _della_probs(magnitude: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities of DELLA's magnitude-ranked pruning for one row tensor (any shape)."""
    x = magnitude.reshape(1, -1) if magnitude.dim() < 2 else magnitude
    c = x.shape[1]
    if c == 1:
        return torch.full_like(x, density)
    keys = x.view(_BITS[x.dtype]) if x.dtype in _BITS else x  # non-negative floats order like their bits
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.empty_like(x)
    shape = [1] * x.dim()
    shape[1] = c
    steps = torch.arange(c, dtype=x.dtype, device=x.device).view(shape).expand_as(x)
    ranks.scatter_(1, order, steps)
    del order
    # Same operations and order as mergekit: (density - epsilon) + rank / (C - 1) * 2 * epsilon.
    return ranks.div_(c - 1).mul_(2).mul_(epsilon).add_(density - epsilon)


def _row_mask(
    method: str, magnitude: torch.Tensor, shape: torch.Size, density: float, gamma: float, epsilon: float,
    generator: torch.Generator | None, keep: torch.Tensor, order: torch.Tensor | None = None,
) -> None:
    """Write the boolean keep mask of one flattened row into ``keep``."""
    m = magnitude.numel()
    if method == "magnitude":
        largest_mask(magnitude, max(1, int(density * m)), out=keep, order=order)
    elif method == "magnitude_outliers":
        target = int(density * m)
        n_bot = max(0, m - target - int(gamma * m))
        smallest_mask(magnitude, n_bot + target, out=keep)
        if n_bot > 0:
            keep.logical_and_(smallest_mask(magnitude, n_bot).logical_not_())
    elif method == "random":
        assert generator is not None
        draw = torch.rand(shape, generator=generator, dtype=torch.float32).reshape(-1)
        keep.copy_(draw < density)
    else:
        assert generator is not None
        probs = _della_probs(magnitude.view(shape), density, epsilon)
        draw = torch.rand(probs.shape, generator=generator, dtype=torch.float32)
        keep.copy_((draw.to(device=probs.device, dtype=probs.dtype) < probs).reshape(-1))


def sparsify(
    deltas: torch.Tensor,
    method: str,
    densities: Sequence[float],
    *,
    dtype: torch.dtype | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    rescale: bool = False,
    generator: torch.Generator | None = None,
    orders: Sequence[torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparsified copy of ``deltas`` (``(N, *S)``, left unchanged) and its per-row L1 rescale factors.

    Returns ``(masked, factors)``: ``masked`` a new ``(N, *S)`` tensor in ``dtype`` (default: the
    dtype of ``deltas``) with the dropped entries zeroed and *not* yet rescaled; ``factors`` an ``(N,)``
    tensor in that dtype (ones without ``rescale`` and for rows with density ``>= 1``). Densities must
    lie in ``(0, 1]``. ``orders`` (:func:`magnitude_order` of each row, or ``None`` per row) skip the
    selection pass of ``magnitude`` thresholds; the masks are the same with or without them.
    """
    if method not in SPARSIFICATIONS:
        raise ValueError(f"unknown sparsification {method!r}; valid: {', '.join(SPARSIFICATIONS)}")
    dtype = dtype or deltas.dtype
    n, shape = deltas.shape[0], deltas.shape[1:]
    if method in ("random", "della_magprune") and generator is None and any(d < 1 for d in densities):
        raise ValueError(f"{method} sparsification needs a generator")
    masked = torch.empty(deltas.shape, dtype=dtype, device=deltas.device)
    flat = masked.view(n, -1)
    src = deltas.reshape(n, -1)
    factors = torch.ones(n, dtype=dtype, device=deltas.device)
    m = flat.shape[1]
    hints = fitting_orders(orders, n, m)
    magnitude = torch.empty(m, dtype=dtype, device=deltas.device)
    keep = torch.empty(m, dtype=torch.bool, device=deltas.device)
    keep_f = torch.empty(m, dtype=dtype, device=deltas.device)
    for i in range(n):
        density = float(densities[i])
        if density >= 1.0 or deltas.dtype != dtype:
            flat[i].copy_(src[i])
            if density >= 1.0:
                continue
        row = flat[i] if deltas.dtype != dtype else src[i]
        order = hints[i] if hints is not None else None
        if method == "magnitude" and not rescale and _prune_to_largest(
            row, max(1, int(density * m)), magnitude, order, out=flat[i], signs=src[i]
        ):
            continue
        torch.abs(row, out=magnitude)
        gamma = float(gammas[i]) if gammas is not None else 0.0
        epsilon = float(epsilons[i]) if epsilons is not None else 0.0
        _row_mask(method, magnitude, shape, density, gamma, epsilon, generator, keep, order)
        keep_f.copy_(keep)
        torch.mul(row, keep_f, out=flat[i])
        if rescale:
            before = magnitude.sum()
            after = magnitude.mul_(keep_f).sum()
            if before >= _EPS and after >= _EPS:
                factors[i] = before / after
    return masked, factors
