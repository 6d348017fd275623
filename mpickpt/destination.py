"""Where outputs may go: never into a folder that is read from."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from .errors import DestinationError


def refuse_destination_inside(dst: str | os.PathLike[str], read_dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Raise DestinationError when dst equals or lies inside a folder that is read from."""
    target = Path(os.path.realpath(dst))
    for folder in read_dirs:
        source = Path(os.path.realpath(folder))
        if target == source or source in target.parents:
            raise DestinationError(
                f"{dst}: refusing to write inside source folder {folder}: mpickpt never writes into its sources"
            )


def check_destination(dst_dir: str | os.PathLike[str], read_dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse a destination inside a source folder, or one that exists and is not a folder."""
    if os.path.exists(dst_dir) and not os.path.isdir(dst_dir):
        raise DestinationError(f"{dst_dir}: the destination exists and is not a folder")
    refuse_destination_inside(dst_dir, read_dirs)


def check_prefix(prefix: str) -> None:
    """An output name prefix is a plain file-name prefix: no folders, no '..'."""
    if "/" in prefix or os.sep in prefix or ".." in prefix or "\0" in prefix:
        raise DestinationError(f"--prefix {prefix!r}: a prefix is the start of a file name: no '/', '..' or NUL")
