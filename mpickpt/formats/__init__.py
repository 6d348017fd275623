"""Storage formats behind one interface (:mod:`mpickpt.formats.base`): a registry picks the reader of a
file by its suffix, else by its content, and the writer of an output by format name."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mpickpt.errors import CheckpointFormatError, MpickptError, SourceMissingError
from mpickpt.formats.base import SourceIndex, TensorEntry, TensorSpec, TensorWriter

__all__ = ["FORMATS", "IndexCache", "SourceIndex", "TensorEntry", "TensorSpec", "TensorWriter", "format_of", "index_stamp",
           "open_index", "open_writer", "refuse_if_changed", "suffix_of"]

FORMATS = ("ckpt", "safetensors", "h5")
_SUFFIXES = {"ckpt": ".ckpt", "safetensors": ".safetensors", "h5": ".h5"}


def suffix_of(fmt: str) -> str:
    """The file suffix of a format name (MpickptError for an unknown one)."""
    try:
        return _SUFFIXES[fmt]
    except KeyError:
        raise MpickptError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})") from None


def format_of(path: str | os.PathLike[str]) -> str:
    """The format of a file: by suffix, else by its first bytes (CheckpointFormatError if neither tells)."""
    path = Path(path)
    for fmt, suffix in _SUFFIXES.items():
        if path.name.endswith(suffix):
            return fmt
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except FileNotFoundError:
        raise SourceMissingError(f"{path}: file does not exist") from None
    except OSError as err:
        raise CheckpointFormatError(f"{path}: cannot read: {err.strerror or err}") from err
    from mpickpt.formats.hdf5 import SIGNATURE

    if head[:8] == SIGNATURE:
        return "h5"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 << 20:
        return "safetensors"
    if head[:1] == b"\x0a":
        return "ckpt"
    raise CheckpointFormatError(f"{path}: neither a MindSpore .ckpt, a safetensors nor an HDF5 file")


def open_index(path: str | os.PathLike[str], *, verify_crc: bool = False, fmt: str | None = None) -> SourceIndex:
    """Index a source file of any known format (headers only; ``verify_crc`` checks its stored checksum);
    a folder is a unified checkpoint (:mod:`mpickpt.unified`)."""
    if fmt is None and os.path.isdir(path):
        from mpickpt.unified import open_unified

        return open_unified(path, verify_crc=verify_crc)
    fmt = fmt or format_of(path)
    if fmt == "ckpt":
        from mpickpt.ckpt_reader import index_checkpoint

        return index_checkpoint(path, verify_crc=verify_crc)
    if fmt == "safetensors":
        from mpickpt.formats.safetensors import index_safetensors

        return index_safetensors(path, verify_crc=verify_crc)
    if fmt == "h5":
        from mpickpt.formats.hdf5 import index_h5

        return index_h5(path, verify_crc=verify_crc)
    raise MpickptError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


class IndexCache:
    """Indexes of source files kept open across a process's targets, so each file's headers are read once
    per run: `lease(path)` lends an index for a `with` block; up to `limit` indexes not on lease stay open
    (least recently used closed first), and `close()` closes them all. `check_unchanged(path)` refuses a file
    whose size or time moved since `expect` gave them, else since its index was first made in this run (its
    headers are what was read)."""

    def __init__(self, limit: int = 128) -> None:
        self._limit = limit
        self._open: OrderedDict[str, SourceIndex] = OrderedDict()
        self._leases: dict[str, int] = {}
        self._stamps: dict[str, tuple[int, int]] = {}  # (size, latest mtime_ns) when first indexed

    @contextmanager
    def lease(self, path: str | os.PathLike[str]) -> Iterator[SourceIndex]:
        """The index of `path` (opened on first use), open at least until the block ends."""
        key = os.fspath(path)
        if key not in self._open:
            self._open[key] = open_index(key)
            self._stamps.setdefault(key, index_stamp(self._open[key]))
        self._open.move_to_end(key)
        self._leases[key] = self._leases.get(key, 0) + 1
        try:
            yield self._open[key]
        finally:
            if key in self._leases:  # (not when close() came first)
                self._leases[key] -= 1
                self._evict()

    def _evict(self) -> None:
        idle = [key for key in self._open if not self._leases.get(key)]
        for key in idle[:max(len(self._open) - self._limit, 0)]:
            self._open.pop(key).close()
            self._leases.pop(key, None)

    def expect(self, path: str | os.PathLike[str], size: int, mtime_ns: int) -> None:
        """Take `path`'s size and time as seen before its headers are read here (at start-up, when another
        process read them): a change from then on is refused too."""
        self._stamps.setdefault(os.fspath(path), (size, mtime_ns))

    def check_unchanged(self, *paths: str | os.PathLike[str]) -> None:
        """CheckpointFormatError when one of `paths`, as open here, no longer has the size and time it had when
        first indexed: it was rewritten in place while being read (what was read may mix two versions)."""
        for path in paths:
            key = os.fspath(path)
            if key not in self._open or key not in self._stamps:
                continue
            refuse_if_changed(self._open[key], self._stamps[key])

    def close(self) -> None:
        """Close every index (also those on lease: the run is over or failing)."""
        while self._open:
            self._open.popitem()[1].close()
        self._leases.clear()


def index_stamp(index: SourceIndex) -> tuple[int, int]:
    """Total size and latest modification time of the files an index reads (a unified source: its shards)."""
    infos = [os.fstat(fd) for fd in {index.fd_of(name) for name in index.entries}]
    return sum(i.st_size for i in infos), max((i.st_mtime_ns for i in infos), default=0)


def refuse_if_changed(index: SourceIndex, before: tuple[int, int]) -> None:
    """CheckpointFormatError when the files of `index` no longer have the size and time `before` (its
    `index_stamp` when its headers were read): rewritten in place while being read, so what was read may mix
    two versions."""
    now = index_stamp(index)
    if now != before:
        raise CheckpointFormatError(
            f"{index.path}: the file changed while this run read it (size {before[0]} -> {now[0]} bytes, "
            f"modification time moved by {(now[1] - before[1]) / 1e9:+.3f} s): what was read may mix two "
            "versions, so nothing made from it is kept; run again once the file is final")


def open_writer(path: str | os.PathLike[str], fmt: str, *, crc: bool = False, sync: bool = True,
                forbidden_dirs: Iterable[str | os.PathLike[str]] = (), checksum: bool = False,
                tick: Callable[[], None] | None = None) -> TensorWriter:
    """A writer of one output file in format ``fmt`` (``crc``: the format's own integrity record; ``checksum``:
    the writer's ``file_crc`` gives the whole file's CRC-32 once committed, where the format can tell it
    without reading the file back: ``.ckpt`` always, safetensors when asked, HDF5 never; ``tick``: called
    between windows of long copies)."""
    if fmt == "ckpt":
        from mpickpt.ckpt_writer import CheckpointWriter

        return CheckpointWriter(path, crc=crc, sync=sync, forbidden_dirs=forbidden_dirs, tick=tick)
    if fmt == "safetensors":
        from mpickpt.formats.safetensors import SafetensorsWriter

        writer = SafetensorsWriter(path, crc=crc, sync=sync, forbidden_dirs=forbidden_dirs, checksum=checksum)
        writer.tick = tick
        return writer
    if fmt == "h5":
        from mpickpt.formats.hdf5 import H5Writer

        return H5Writer(path, crc=crc, sync=sync, forbidden_dirs=forbidden_dirs)
    raise MpickptError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
