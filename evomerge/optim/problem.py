"""What an optimizer searches and what it is told: :class:`Problem` (the box, the start point, the
objectives and an optional :class:`SegmentStructure`), :class:`Observation` (one evaluation's scores)
and :class:`Told` (a validated observation joined with its candidate).

Scores are higher-is-better, one per task (``Problem.task_names``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from evomerge.errors import ConfigError
from evomerge.evaluation import Candidate

__all__ = ["Observation", "Problem", "SegmentStructure", "Told"]


@dataclass(frozen=True)
class SegmentStructure:
    """Recipes as per-segment linear combinations of ``n_seeds`` seed models.

    An individual is a coefficient matrix ``C`` of shape ``[n_segments, n_seeds]`` (genome ``C.ravel()``,
    segment-major); the merged weights of segment ``s`` are ``sum_m C[s, m] * seed_m[s]``.
    ``gram[s]`` is the Gram matrix ``<seed_a[s], seed_b[s]>`` of the seeds' flattened parameters in
    segment ``s`` (full weights or task vectors: interpolation angles are measured in that space) and
    ``sizes[s]`` its number of parameters.
    """

    n_seeds: int
    n_segments: int
    gram: npt.NDArray[np.float64]
    sizes: npt.NDArray[np.int64] = None  # type: ignore[assignment]  # None: one parameter per segment

    def __post_init__(self) -> None:
        m, s = int(self.n_seeds), int(self.n_segments)
        if m < 1 or s < 1:
            raise ConfigError(f"segments: n_seeds and n_segments must be >= 1, got {m} and {s}")
        gram = np.array(self.gram, dtype=np.float64)
        if gram.shape != (s, m, m) or not np.all(np.isfinite(gram)):
            raise ConfigError(f"segments.gram: expected finite array of shape {(s, m, m)}, got {gram.shape}")
        if not np.allclose(
            gram, gram.transpose(0, 2, 1), rtol=1e-6, atol=1e-12 * max(1.0, np.abs(gram).max())
        ):
            raise ConfigError("segments.gram: Gram matrices must be symmetric")
        sizes = np.ones(s, dtype=np.int64) if self.sizes is None else np.array(self.sizes, dtype=np.int64)
        if sizes.shape != (s,) or np.any(sizes < 1):
            raise ConfigError(f"segments.sizes: expected {s} positive integers, got {self.sizes!r}")
        gram.setflags(write=False)
        sizes.setflags(write=False)
        object.__setattr__(self, "n_seeds", m)
        object.__setattr__(self, "n_segments", s)
        object.__setattr__(self, "gram", gram)
        object.__setattr__(self, "sizes", sizes)


@dataclass(frozen=True)
class Problem:
    """What is searched: a box ``[lower, upper]`` of dimension ``dim`` (search spaces use ``[0, 1]^dim``),
    a default start ``x0`` (the hand-set merge; the box centre when omitted), the objectives
    ``task_names`` (all higher-is-better) and, for optimizers with the ``segments`` capability, the
    optional :class:`SegmentStructure` (then ``dim == n_segments * n_seeds``).
    """

    dim: int
    lower: npt.NDArray[np.float64]
    upper: npt.NDArray[np.float64]
    x0: npt.NDArray[np.float64] = None  # type: ignore[assignment]  # None: the box centre
    task_names: tuple[str, ...] = ("score",)
    segments: SegmentStructure | None = None

    def __post_init__(self) -> None:
        d = int(self.dim)
        if d < 1:
            raise ConfigError(f"problem.dim must be >= 1, got {self.dim}")
        lower = np.broadcast_to(np.asarray(self.lower, dtype=np.float64), (d,)).copy()
        upper = np.broadcast_to(np.asarray(self.upper, dtype=np.float64), (d,)).copy()
        if not (np.all(np.isfinite(lower)) and np.all(np.isfinite(upper)) and np.all(lower < upper)):
            raise ConfigError("problem bounds: lower and upper must be finite with lower < upper")
        x0 = (lower + upper) / 2 if self.x0 is None else np.array(self.x0, dtype=np.float64)
        if x0.shape != (d,) or not np.all((x0 >= lower) & (x0 <= upper)):
            raise ConfigError(f"problem.x0: expected {d} values within the bounds")
        names = (self.task_names,) if isinstance(self.task_names, str) else tuple(self.task_names)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"problem.task_names: expected distinct task names, got {names!r}")
        seg = self.segments
        if seg is not None and seg.n_segments * seg.n_seeds != d:
            raise ConfigError(f"problem.segments: {seg.n_segments} segments x {seg.n_seeds} seeds != dim {d}")
        for arr in (lower, upper, x0):
            arr.setflags(write=False)
        object.__setattr__(self, "dim", d)
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "x0", x0)
        object.__setattr__(self, "task_names", names)

    @classmethod
    def unit_cube(
        cls,
        dim: int,
        task_names: Sequence[str] = ("score",),
        *,
        x0: npt.ArrayLike | None = None,
        segments: SegmentStructure | None = None,
    ) -> Problem:
        """The usual search-space problem: the box ``[0, 1]^dim``."""
        x = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=np.float64)
        return cls(dim, np.zeros(dim), np.ones(dim), x, tuple(task_names), segments)


@dataclass(frozen=True)
class Observation:
    """The result of evaluating one candidate, as told to an optimizer.

    ``objectives`` holds one higher-is-better score per task (ordered like ``Problem.task_names``);
    ``per_example`` the concatenated per-example scores of all tasks (higher is better), used by
    optimizers with the ``per_example`` capability. A failure has ``ok=False`` and needs neither.
    """

    candidate_id: int
    ok: bool = True
    objectives: npt.NDArray[np.float64] | None = None
    per_example: npt.NDArray[np.float64] | None = None

    def __post_init__(self) -> None:
        if self.objectives is not None:
            object.__setattr__(
                self, "objectives", np.atleast_1d(np.asarray(self.objectives, dtype=np.float64))
            )
        if self.per_example is not None:
            object.__setattr__(self, "per_example", np.asarray(self.per_example, dtype=np.float64))

    @classmethod
    def failure(cls, candidate_id: int) -> Observation:
        return cls(candidate_id=candidate_id, ok=False)



@dataclass(frozen=True)
class Told:
    """A validated observation joined with the candidate it belongs to (what subclasses receive)."""

    candidate: Candidate
    ok: bool
    objectives: npt.NDArray[np.float64] | None = None
    per_example: npt.NDArray[np.float64] | None = None
    error: str | None = field(default=None, compare=False)
