"""The interface every storage format offers: a source index (metadata from headers, zero-copy access to
tensor bytes, byte runs for kernel copies) and a writer (tensors declared up front, bytes streamed or
copied file to file, atomic commit).

Dtypes are MindSpore's names everywhere (``Float32``, ``BFloat16``, ``Int4``, ``str``...): a format maps
its own names at its edge, so the layouts, the planner and the executor never know which format they move.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

import numpy as np

from mpickpt.ckpt_reader import TensorEntry

__all__ = ["SourceIndex", "TensorEntry", "TensorSpec", "TensorWriter"]


@dataclass(frozen=True)
class TensorSpec:
    """A tensor a writer will be given: name, MindSpore dtype, dims and content bytes; ``kind`` is
    ``"tensor"`` or an opaque kind (``"maptensor"``) that only some formats can hold."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    nbytes: int
    kind: str = "tensor"


class SourceIndex(Protocol):
    """An opened, indexed source file (a context manager; closing keeps handed-out views valid)."""

    path: Path
    entries: dict[str, TensorEntry]  # in file order; pieces are (file offset, length) runs of the content
    metadata: dict[str, str]  # format-level key/values (safetensors ``__metadata__``; empty for .ckpt)
    crc: int | None  # stored checksum, where the format has one
    as_stored: frozenset[str]  # values kept as some rank stored them (maybe a slice): copy whole, never lay out

    def __enter__(self) -> Self: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> None: ...
    def close(self) -> None: ...
    def fileno(self) -> int:
        """Read-only descriptor of the file, for kernel copies of ``TensorEntry.pieces``."""
        ...
    def fd_of(self, name: str) -> int:
        """Read-only descriptor of the file holding ``name``'s pieces (a unified source is several files)."""
        ...
    def entry(self, name: str) -> TensorEntry: ...
    def array(self, name: str) -> np.ndarray: ...
    def raw(self, name: str) -> list[memoryview]:
        """Zero-copy views of the content pieces, in order."""
        ...
    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None: ...
    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages from the resident set (the data stays cached)."""
        ...


class TensorWriter(Protocol):
    """An output file being written; commits atomically on a clean ``with`` exit, aborts otherwise.

    ``declare`` comes first, with every tensor in output order; then each declared tensor is given once,
    in any order, by one of the write/copy calls. ``write_tensor_chunks`` is done with each chunk before it
    takes the next (a caller may refill one buffer).
    """

    path: Path

    def __enter__(self) -> Self: ...
    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None, /) -> None: ...
    def declare(self, tensors: Sequence[TensorSpec]) -> None: ...
    def write_tensor(self, name: str, dtype: str, dims: Sequence[int], data: object) -> None: ...
    def write_tensor_chunks(self, name: str, dtype: str, dims: Sequence[int], nbytes: int,
                            chunks: Iterable[object]) -> None: ...
    def copy_tensor_from(self, name: str, dtype: str, dims: Sequence[int], src_fd: int, src_offset: int,
                         nbytes: int) -> None: ...
    def copy_tensor_segments(self, name: str, dtype: str, dims: Sequence[int],
                             segments: Sequence[tuple[int, int, int]]) -> None: ...
    def write_maptensor(self, name: str, payloads: Sequence[object]) -> None: ...
    def commit(self) -> None: ...
    def abort(self) -> None: ...
