"""The headers of source files, read without their tensor bytes (any format)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .formats import open_index


@dataclass(frozen=True)
class SourceHeaders:
    """What one source file holds: (name, dtype, dims) per parameter in file order, each one's kind
    ("tensor", or "maptensor" for values only some formats can hold), and the values kept as some rank
    stored them (a unified folder's hyper_param.safetensors), which may be copied whole but never laid out."""

    path: str
    rows: tuple[tuple[str, str, tuple[int, ...]], ...]
    kinds: dict[str, str]
    as_stored: frozenset[str] = frozenset()


def read_headers(rank_files: Mapping[int, str]) -> dict[int, SourceHeaders]:
    """Index the headers of every source file (cheap: no tensor bytes are read)."""
    found = {}
    for rank, path in rank_files.items():
        with open_index(path) as index:
            entries = index.entries.values()
            found[rank] = SourceHeaders(path, tuple((e.name, e.dtype, tuple(e.dims)) for e in entries),
                                        {e.name: e.kind for e in entries}, index.as_stored)
    return found
