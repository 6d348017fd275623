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
