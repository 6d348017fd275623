"""The headers of source files, read without their tensor bytes (any format)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .formats import open_index
from .manifest import SourceStamp, stamp_sources


@dataclass(frozen=True)
class SourceHeaders:
    """What one source file holds: (name, dtype, dims) per parameter in file order, each one's kind
    ("tensor", or "maptensor" for values only some formats can hold) and content bytes, and the file's
    stamp as it was when read (so processes that do not see the file can record it)."""

    path: str
    rows: tuple[tuple[str, str, tuple[int, ...]], ...]
    kinds: dict[str, str]
    nbytes: dict[str, int] = field(default_factory=dict)
    stamp: SourceStamp | None = None
    as_stored: frozenset[str] = frozenset()  # parameters holding rank 0's value whatever the layout (unified)


def read_headers(rank_files: Mapping[int, str]) -> dict[int, SourceHeaders]:
    """Index the headers of every source file (cheap: no tensor bytes are read)."""
    found = {}
    for rank, path in rank_files.items():
        (stamp,) = stamp_sources([path])
        with open_index(path) as index:
            entries = index.entries.values()
            found[rank] = SourceHeaders(path, tuple((e.name, e.dtype, tuple(e.dims)) for e in entries),
                                        {e.name: e.kind for e in entries}, {e.name: e.nbytes for e in entries},
                                        stamp, frozenset(getattr(index, "as_stored", ())))
    return found
