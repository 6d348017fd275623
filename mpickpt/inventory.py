"""The headers of source files, read without their tensor bytes (any format)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from .formats import SourceIndex, open_index
from .manifest import SourceStamp, stamp_sources
from .sources import stamped_files


@dataclass(frozen=True)
class SourceHeaders:
    """What one source file holds: (name, dtype, dims) per parameter in file order, each one's kind
    ("tensor", or "maptensor" for values only some formats can hold) and content bytes, the values kept as
    some rank stored them (a unified folder's hyper_param.safetensors), which may be copied whole but never
    laid out, and the stamps of its files as they were when read (so processes that do not see them can
    record them)."""

    path: str
    rows: tuple[tuple[str, str, tuple[int, ...]], ...]
    kinds: dict[str, str]
    as_stored: frozenset[str] = frozenset()
    nbytes: dict[str, int] = field(default_factory=dict)
    stamps: tuple[SourceStamp, ...] = ()


def read_headers(rank_files: Mapping[int, str],
                 opener: Callable[[str], AbstractContextManager[SourceIndex]] = open_index) -> dict[int, SourceHeaders]:
    """Index the headers of every source file (cheap: no tensor bytes are read); `opener` may lend indexes
    kept open for later (formats.IndexCache.lease)."""
    found = {}
    for rank, path in rank_files.items():
        stamps = stamp_sources(stamped_files(path))
        with opener(path) as index:
            entries = index.entries.values()
            found[rank] = SourceHeaders(path, tuple((e.name, e.dtype, tuple(e.dims)) for e in entries),
                                        {e.name: e.kind for e in entries}, index.as_stored,
                                        {e.name: e.nbytes for e in entries}, stamps)
    return found
