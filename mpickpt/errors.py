"""One error hierarchy for mpickpt: every failure users can cause is one of these."""

from __future__ import annotations


class MpickptError(ValueError):
    """Root of all mpickpt errors (also a ValueError, as MindSpore raises for bad input)."""


class CheckpointFormatError(MpickptError):
    """A checkpoint file is not a readable MindSpore checkpoint (names the file and, where known, the parameter)."""


class StrategyFormatError(MpickptError):
    """A strategy file cannot be read or written (names the file and, where known, the parameter)."""


class LayoutError(MpickptError):
    """A parameter's layout is impossible for its shape (names the parameter, the layout and the shape)."""


class PlanError(MpickptError):
    """Source and target strategies cannot be reconciled (names the parameter and the ranks)."""


class SourceMissingError(MpickptError, FileNotFoundError):
    """A source checkpoint or strategy file that a conversion needs does not exist."""


class DestinationError(MpickptError):
    """The destination is unsafe (inside a source folder) or cannot be written."""


class LaunchError(MpickptError):
    """The process was started by an MPI launcher but cannot join its MPI world (mpi4py missing, wrong MPI)."""


class SourceConflictError(MpickptError):
    """Processes see different contents under one source file: node-local copies that differ, or a file other
    than the one the job was planned with (names the file, the processes and their hosts)."""


class SourceDisagreementError(MpickptError):
    """Source files disagree on what must be one value: a parameter outside the source strategy (copied
    through whole from one rank's file) whose copies differ between rank files (names the files and the
    parameter), or two rank folders (`rank_1`, `rank_01`) claim one source rank (names both)."""
