"""The headers of source files, read without their tensor bytes (any format)."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

from .catalog import Fingerprint
from .formats import SourceIndex, open_index
from .manifest import SourceStamp, stamp_sources
from .sources import stamped_files


@dataclass(frozen=True)
class SourceHeaders:
    """What one source file holds: (name, dtype, dims) per parameter in file order, each one's kind
    ("tensor", or "maptensor" for values only some formats can hold) and content bytes, the values kept as
    some rank stored them (a unified folder's hyper_param.safetensors), which may be copied whole but never
    laid out, the stamps of its files as they were when read (so processes that do not see them can
    record them), and fingerprints of the values asked for (those copied through whole from one rank's file,
    which every rank file must hold alike)."""

    path: str
    rows: tuple[tuple[str, str, tuple[int, ...]], ...]
    kinds: dict[str, str]
    as_stored: frozenset[str] = frozenset()
    nbytes: dict[str, int] = field(default_factory=dict)
    stamps: tuple[SourceStamp, ...] = ()
    fingerprints: dict[str, Fingerprint] = field(default_factory=dict)


SAMPLE = 32 << 10  # a value larger than twice this is fingerprinted by its first and last SAMPLE bytes
SHOWN = 32  # a tensor of at most this many bytes is also shown by its elements


def read_headers(rank_files: Mapping[int, str],
                 opener: Callable[[str], AbstractContextManager[SourceIndex]] = open_index,
                 fingerprinted: Callable[[str], bool] = lambda name: False) -> dict[int, SourceHeaders]:
    """Index the headers of every source file (cheap: of the tensor bytes, only those of the values
    `fingerprinted` names are read, at most 2 * SAMPLE each); `opener` may lend indexes kept open for later
    (formats.IndexCache.lease)."""
    found = {}
    for rank, path in rank_files.items():
        stamps = stamp_sources(stamped_files(path))
        with opener(path) as index:
            entries = index.entries.values()
            found[rank] = SourceHeaders(path, tuple((e.name, e.dtype, tuple(e.dims)) for e in entries),
                                        {e.name: e.kind for e in entries}, index.as_stored,
                                        {e.name: e.nbytes for e in entries}, stamps,
                                        {e.name: fingerprint(index, e.name) for e in entries if fingerprinted(e.name)})
    return found


def fingerprint(index: SourceIndex, name: str) -> Fingerprint:
    """A CRC-32 of one value's bytes (of its first and last SAMPLE bytes when larger), and a small tensor's
    elements as text."""
    entry = index.entry(name)
    size = entry.nbytes
    spans = [(0, size)] if size <= 2 * SAMPLE else [(0, SAMPLE), (size - SAMPLE, SAMPLE)]
    crc = 0
    for start, length in spans:
        chunk = bytearray(length)
        index.read_into(name, start, memoryview(chunk))
        crc = zlib.crc32(chunk, crc)
    shown = str(index.array(name).tolist()) if entry.kind == "tensor" and size <= SHOWN else None
    index.release(name)
    return Fingerprint(crc, size > 2 * SAMPLE, shown)
