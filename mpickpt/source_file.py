"""Opening a source file of any format: read-only, and a regular file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mpickpt.errors import CheckpointFormatError, SourceMissingError


def open_source_file(path: Path, noun: str) -> tuple[int, int]:
    """A read-only descriptor of ``path`` and its size: SourceMissingError when it does not exist,
    CheckpointFormatError when it cannot be opened or is not a regular file (messages name the ``noun``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceMissingError(f"{path}: {noun} does not exist") from None
    except OSError as err:
        raise CheckpointFormatError(f"{path}: cannot open {noun}: {err.strerror or err}") from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointFormatError(f"{path}: cannot open {noun}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info.st_size
