"""The error tree: every mistake a user can cause is an :class:`EvomergeError`.

Each error names what caused it (a config field path, a file, a tensor) so the CLI can print
one clear line and exit with code 2.
"""

from __future__ import annotations


class EvomergeError(Exception):
    """Base of all errors that a user can cause and fix."""


class ConfigError(EvomergeError, ValueError):
    """A malformed or inconsistent config, recipe, search space or task suite."""


class SourceError(EvomergeError):
    """A source model folder is missing, unreadable, corrupt or in a refused format."""


class SourceMismatchError(SourceError):
    """Source models cannot be merged with each other (architecture, tensor names or shapes)."""


class MaterializeError(EvomergeError):
    """A recipe could not be turned into tensors (non-finite weights, bad routing, …)."""


class TaskDataError(ConfigError):
    """A task file is missing, malformed or inconsistent (names the file and line)."""


class ScoreError(EvomergeError):
    """A candidate could not be scored (non-finite logits, backend failure)."""


class RunFailedError(ScoreError):
    """Every evaluation of a run failed, so there is nothing to report or export (names the first error)."""


class OptimizerError(EvomergeError):
    """An optimizer was misused or its state cannot be restored."""


class CheckpointError(EvomergeError):
    """A checkpoint or archive is missing, corrupt or from an incompatible version."""


class BackendUnavailableError(EvomergeError):
    """An optional backend (ray, vllm, lm-eval) is not installed or not in the supported range."""


class RunStopped(EvomergeError):
    """A run stopped before its end on request (Ctrl-C, SIGTERM); it resumes with ``evomerge resume``."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class RunFolderError(EvomergeError):
    """The run folder cannot be written (disk full, read-only) or is held by another live driver."""
