"""Execute one target plan: copy planned regions out of memory-mapped sources into one output file.

The executor only follows a plan: it opens each source file named there once, copies every planned
region once, and streams the output through the checkpoint writer. A parameter that is one contiguous
run of source bytes moves file to file; anything else is assembled in one buffer of the target slice.
Source ranks whose files another process holds come from a `Remote` (mpickpt/exchange.py), which yields
the same regions received over MPI, in the order `remote_pieces` lists them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .dtypes import dtype_itemsize
from .errors import CheckpointFormatError, PlanError
from .formats import (
    IndexCache,
    SourceIndex,
    TensorEntry,
    TensorSpec,
    TensorWriter,
    open_writer,
)
from .formats.offsets import byte_view
from .layout import Box
from .plan import Copy, ParamPlan, TargetPlan

Progress = Callable[[int], None]

# Source bytes are viewed in blocks of at most this many bytes when a tensor is split over pieces.
ROW_BLOCK_BYTES = 64 << 20
# A strided target is gathered, checksummed and written this many bytes at a time, so the bytes stay in
# the CPU cache between the three steps and one small buffer serves every parameter.
ASSEMBLY_BLOCK_BYTES = 1 << 20
TICK_BLOCKS = 8  # gathered blocks between two tick() calls (as often as copy windows)


@dataclass(frozen=True)
class Piece:
    """A region one target needs from a source rank's file: a box of the stored slice, or (box None) the
    whole stored content of a parameter copied through."""

    rank: int
    name: str
    box: Box | None
    nbytes: int


class Remote(Protocol):
    """Source ranks held by other processes: their headers, and the planned pieces in planned order."""

    def entries(self, rank: int) -> dict[str, TensorEntry]:
        """The parameters of a remote rank's file, in file order (pieces are not file offsets)."""
        ...

    def fill(self, piece: Piece, out: np.ndarray) -> None:
        """Receive the next piece (it must be `piece`) into `out` (box pieces: shape box + (itemsize,))."""
        ...

    def whole(self, piece: Piece) -> bytearray:
        """Receive the next piece (whole content) as bytes."""
        ...


class SourceFiles:
    """Lazily opened, cached indexes of the source files one target reads (a context manager); ranks
    not among `paths` come from `remote`. `indexes` lends indexes kept open across targets (default: its own,
    closed on exit)."""

    def __init__(self, paths: Mapping[int, str], remote: Remote | None = None,
                 indexes: IndexCache | None = None) -> None:
        self._paths = dict(paths)
        self._own = indexes is None
        self._indexes = IndexCache() if indexes is None else indexes
        self._open: dict[int, SourceIndex] = {}
        self._stack = ExitStack()
        self.remote = remote

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()
        if self._own:
            self._indexes.close()

    def check_unchanged(self) -> None:
        """Refuse (CheckpointFormatError) when a file read here changed since its headers were read."""
        self._indexes.check_unchanged(*(self._paths[rank] for rank in self._open))

    def is_remote(self, rank: int) -> bool:
        """Whether another process holds this rank's file."""
        return rank not in self._paths and self.remote is not None

    def path(self, rank: int) -> str:
        """The file of a source rank (PlanError if the caller gave none)."""
        if self.is_remote(rank):
            return f"the file of source rank {rank} (on another process)"
        try:
            return self._paths[rank]
        except KeyError:
            raise PlanError(f"the checkpoint file of source rank {rank} is needed but was not given") from None

    def entries(self, rank: int) -> Mapping[str, TensorEntry]:
        """The parameters of one source rank's file, in file order."""
        if self.is_remote(rank):
            assert self.remote is not None
            return self.remote.entries(rank)
        return self.index(rank).entries

    def index(self, rank: int) -> SourceIndex:
        """The index of one source rank's file, opened on first use."""
        if rank not in self._open:
            self._open[rank] = self._stack.enter_context(self._indexes.lease(self.path(rank)))
        return self._open[rank]

    def entry(self, rank: int, name: str) -> TensorEntry:
        """One parameter of one source file (CheckpointFormatError naming both if absent)."""
        try:
            return self.entries(rank)[name]
        except KeyError:
            raise CheckpointFormatError(
                f"{self.path(rank)}: parameter {name!r} is missing (source rank {rank} should hold it)"
            ) from None


def output_order(plan: TargetPlan, sources: SourceFiles) -> list[ParamPlan]:
    """MindSpore's parameter order: first seen over the read files in descending rank order,
    strategy parameters first, then those absent from the strategies."""
    by_name = {param.name: param for param in plan.params}
    seen: dict[str, None] = {}
    for rank in sorted(plan.source_ranks, reverse=True):
        for name in sources.entries(rank):
            if name in by_name:
                seen.setdefault(name, None)
    ordered = list(seen) + [name for name in by_name if name not in seen]
    return [by_name[n] for n in ordered if by_name[n].in_strategy] + [
        by_name[n] for n in ordered if not by_name[n].in_strategy
    ]


def write_target(
    plan: TargetPlan,
    sources: SourceFiles,
    out_path: str | os.PathLike[str],
    *,
    fmt: str = "ckpt",
    crc: bool = False,
    sync: bool = True,
    forbidden_dirs: Iterable[str | os.PathLike[str]] = (),
    progress: Progress | None = None,
    on_file_crc: Callable[[int], None] | None = None,
    tick: Callable[[], None] | None = None,
) -> int:
    """Write one target rank's file in format `fmt` atomically; returns the bytes of tensor content written.
    `on_file_crc` is given the finished file's CRC-32 where the writer computed it on the way out; `tick()` is
    called every few MiB of a long parameter (an MPI process serves the others there)."""
    with open_writer(Path(out_path), fmt, crc=crc, sync=sync, forbidden_dirs=forbidden_dirs,
                     checksum=on_file_crc is not None, tick=tick) as writer:
        written = write_plan(plan, sources, writer, progress=progress, tick=tick)
    file_crc = getattr(writer, "file_crc", None)
    if on_file_crc is not None and file_crc is not None:
        on_file_crc(file_crc)
    return written


def write_plan(plan: TargetPlan, sources: SourceFiles, writer: TensorWriter, *,
               progress: Progress | None = None, tick: Callable[[], None] | None = None) -> int:
    """Declare and write every parameter of a plan into an opened writer (it commits on its own exit);
    returns the bytes of tensor content written. A source file that changed while being read refuses the
    output before the writer commits."""
    order = output_order(plan, sources)
    writer.declare([_spec(param, sources) for param in order])
    written = 0
    for param in order:
        written += _write_param(writer, param, sources, tick)
        if progress is not None:
            progress(written)
    sources.check_unchanged()  # before the writer commits: bytes of a file rewritten meanwhile may mix versions
    return written


def _spec(param: ParamPlan, sources: SourceFiles) -> TensorSpec:
    """What the writer is told in advance about one parameter (checked against the sources)."""
    if not param.in_strategy:
        entry = sources.entry(param.copies[0].src_rank, param.name)
        return TensorSpec(param.name, entry.dtype, tuple(entry.dims), entry.nbytes, entry.kind)
    _check_copies(param, sources)
    return TensorSpec(param.name, param.dtype, tuple(param.dims), param.nbytes)


def remote_pieces(plan: TargetPlan, sources: SourceFiles) -> list[Piece]:
    """The pieces `write_target` takes from remote ranks, in the order it takes them."""
    pieces = []
    for param in output_order(plan, sources):
        for copy in param.copies[:1] if not param.in_strategy else param.copies:
            if sources.is_remote(copy.src_rank):
                pieces.append(_piece(param, copy, sources))
    return pieces


def _piece(param: ParamPlan, copy: Copy, sources: SourceFiles) -> Piece:
    if not param.in_strategy:
        return Piece(copy.src_rank, param.name, None, sources.entry(copy.src_rank, param.name).nbytes)
    return Piece(copy.src_rank, param.name, copy.src_box, copy.src_box.size * dtype_itemsize(param.dtype))


def read_piece_rows(index: SourceIndex, piece: Piece, lo: int, hi: int) -> np.ndarray | memoryview | bytearray:
    """Units [lo, hi) of a piece read from its file: rows of the box (bytes for whole pieces, and for
    boxes of no dimension); a zero-copy view where the region is one run of one stored piece."""
    entry = index.entry(piece.name)
    if piece.box is None or not piece.box.start:
        if len(entry.pieces) == 1:
            return index.raw(piece.name)[0][lo:hi]
        content = bytearray(hi - lo)
        index.read_into(piece.name, lo, memoryview(content))
        return content
    box = piece.box
    rows = Box((box.start[0] + lo, *box.start[1:]), (box.start[0] + hi, *box.stop[1:]))
    itemsize = dtype_itemsize(entry.dtype)
    run = _contiguous_run(rows, entry.dims, itemsize)
    if run is not None and len(entry.pieces) == 1:
        return index.raw(piece.name)[0][run[0]:run[0] + run[1]]
    out = np.empty((*rows.shape, itemsize), dtype=np.uint8)
    copy = Copy(piece.rank, rows, Box((0,) * len(rows.shape), rows.shape))
    for source_rows, row_start in _row_blocks(index, entry, copy, itemsize):
        part = _shifted(copy, row_start, source_rows.shape[0])
        out[_slices(part.dst_box)] = source_rows[_slices(part.src_box)]
    return out


def _write_param(writer: TensorWriter, param: ParamPlan, sources: SourceFiles,
                 tick: Callable[[], None] | None = None) -> int:
    """Write one parameter, by the cheapest route its plan allows."""
    if not param.in_strategy:
        rank = param.copies[0].src_rank
        source = sources.entry(rank, param.name)
        if sources.is_remote(rank):
            assert sources.remote is not None
            if source.kind == "maptensor":
                raise CheckpointFormatError(f"parameter {param.name!r}: a MapTensor held only by another process "
                                            f"(source rank {rank}) cannot be sent")
            data = sources.remote.whole(_piece(param, param.copies[0], sources))
            writer.write_tensor_chunks(param.name, source.dtype, source.dims, source.nbytes, [data])
            return source.nbytes
        if source.kind == "maptensor":
            writer.write_maptensor(param.name, sources.index(rank).raw(param.name))
            return source.nbytes
        return _copy_whole(writer, source, sources.index(rank), source.dtype, source.dims)
    if any(sources.is_remote(c.src_rank) for c in param.copies):
        target = _assemble(param, sources)
        writer.write_tensor(param.name, param.dtype, param.dims, target)
        return target.nbytes
    if _is_whole_source(param, sources):
        rank = param.copies[0].src_rank
        return _copy_whole(writer, sources.entry(rank, param.name), sources.index(rank), param.dtype, param.dims)
    segments = _file_segments(param, sources)
    if segments is not None:
        writer.copy_tensor_segments(param.name, param.dtype, param.dims, segments)
        return sum(length for _, _, length in segments)
    if param.dims and all(len(sources.entry(c.src_rank, param.name).pieces) == 1 for c in param.copies):
        writer.write_tensor_chunks(param.name, param.dtype, param.dims, param.nbytes,
                                   _gathered_blocks(param, sources, tick))
        return param.nbytes
    target = _assemble(param, sources)
    writer.write_tensor(param.name, param.dtype, param.dims, target)
    return target.nbytes


def _copy_whole(
    writer: TensorWriter, source: TensorEntry, index: SourceIndex, dtype: str, dims: Sequence[int]
) -> int:
    """Copy one stored tensor unchanged (file to file where it is one piece)."""
    if len(source.pieces) == 1:
        offset, length = source.pieces[0]
        writer.copy_tensor_from(source.name, dtype, dims, index.fd_of(source.name), offset, length)
    else:
        writer.write_tensor_chunks(source.name, dtype, dims, source.nbytes, index.raw(source.name))
    return source.nbytes


def _check_copies(param: ParamPlan, sources: SourceFiles) -> None:
    """Every copy must read inside its source slice as stored on disk (the catalog checked every
    file's shapes before planning; this guards files changed since)."""
    for copy in param.copies:
        entry = sources.entry(copy.src_rank, param.name)
        if entry.dtype != param.dtype:
            raise CheckpointFormatError(
                f"{sources.path(copy.src_rank)}: parameter {param.name!r} has dtype {entry.dtype}, "
                f"expected {param.dtype}"
            )
        if any(stop > dim for stop, dim in zip(copy.src_box.stop, entry.dims)) or len(entry.dims) != len(
            copy.src_box.stop
        ):
            raise CheckpointFormatError(
                f"{sources.path(copy.src_rank)}: parameter {param.name!r} has dims {list(entry.dims)}, "
                f"too small for the strategy (needs region {copy.src_box})"
            )


def _is_whole_source(param: ParamPlan, sources: SourceFiles) -> bool:
    """Whether the target is exactly one whole source slice."""
    if len(param.copies) != 1:
        return False
    copy = param.copies[0]
    dims = tuple(sources.entry(copy.src_rank, param.name).dims)
    return copy.src_box == Box((0,) * len(dims), dims) and dims == tuple(param.dims)


def _file_segments(param: ParamPlan, sources: SourceFiles) -> list[tuple[int, int, int]] | None:
    """When every copy is one contiguous byte run in both its (single-piece) source and the target,
    the target is those runs in target order: (fd, offset, length) each, for a file-to-file copy."""
    itemsize = dtype_itemsize(param.dtype)
    runs = []
    for copy in param.copies:
        entry = sources.entry(copy.src_rank, param.name)
        src_run = _contiguous_run(copy.src_box, entry.dims, itemsize)
        dst_run = _contiguous_run(copy.dst_box, param.dims, itemsize)
        if len(entry.pieces) != 1 or src_run is None or dst_run is None:
            return None
        fd = sources.index(copy.src_rank).fd_of(param.name)
        runs.append((dst_run[0], fd, entry.pieces[0][0] + src_run[0], src_run[1]))
    runs.sort()
    return [(fd, offset, length) for _, fd, offset, length in runs]


def _contiguous_run(box: Box, dims: Sequence[int], itemsize: int) -> tuple[int, int] | None:
    """(byte offset, byte length) of a box inside a C-order array of `dims`, if it is one run."""
    shape = box.shape
    # Innermost dims must be whole; outside the first partial dim, extents must be one.
    k = len(dims)
    while k > 0 and shape[k - 1] == dims[k - 1]:
        k -= 1
    if any(extent != 1 for extent in shape[: max(k - 1, 0)]):
        return None
    strides = [itemsize] * len(dims)
    for i in range(len(dims) - 2, -1, -1):
        strides[i] = strides[i + 1] * dims[i + 1]
    offset = sum(start * stride for start, stride in zip(box.start, strides))
    return offset, box.size * itemsize


def _assemble(param: ParamPlan, sources: SourceFiles) -> np.ndarray:
    """Build the target slice in memory: one numpy assignment per copy (per row block if split)."""
    itemsize = dtype_itemsize(param.dtype)
    target = np.empty((*param.dims, itemsize), dtype=np.uint8)
    for copy in param.copies:
        if sources.is_remote(copy.src_rank):
            assert sources.remote is not None
            sources.remote.fill(_piece(param, copy, sources), target[_slices(copy.dst_box)])
            continue
        entry = sources.entry(copy.src_rank, param.name)
        index = sources.index(copy.src_rank)
        for source_rows, row_start in _row_blocks(index, entry, copy, itemsize):
            rows = _shifted(copy, row_start, source_rows.shape[0])
            target[_slices(rows.dst_box)] = source_rows[_slices(rows.src_box)]
        index.release(param.name)
    return target


def _gathered_blocks(param: ParamPlan, sources: SourceFiles,
                     tick: Callable[[], None] | None = None) -> Iterator[memoryview]:
    """The target slice, a block of whole rows at a time, gathered into one reused buffer from sources
    stored in one piece each (each block is handed out before the next overwrites it; `tick()` every
    TICK_BLOCKS blocks)."""
    itemsize = dtype_itemsize(param.dtype)
    dims = tuple(param.dims)
    row_bytes = math.prod(dims[1:]) * itemsize
    rows_per_block = max(1, ASSEMBLY_BLOCK_BYTES // max(row_bytes, 1))
    buffer = np.empty((min(rows_per_block, dims[0]), *dims[1:], itemsize), dtype=np.uint8)
    views = {}
    for copy in param.copies:
        entry = sources.entry(copy.src_rank, param.name)
        raw = sources.index(copy.src_rank).raw(param.name)[0]
        views[copy.src_rank] = np.frombuffer(raw, dtype=np.uint8).reshape(*entry.dims, itemsize)
    for first in range(0, dims[0], rows_per_block):
        last = min(first + rows_per_block, dims[0])
        for copy in param.copies:
            lo, hi = max(first, copy.dst_box.start[0]), min(last, copy.dst_box.stop[0])
            if lo >= hi:
                continue
            shift = copy.src_box.start[0] - copy.dst_box.start[0]
            inner_dst = _slices(Box(copy.dst_box.start[1:], copy.dst_box.stop[1:]))
            inner_src = _slices(Box(copy.src_box.start[1:], copy.src_box.stop[1:]))
            buffer[(slice(lo - first, hi - first), *inner_dst)] = \
                views[copy.src_rank][(slice(lo + shift, hi + shift), *inner_src)]
        yield byte_view(buffer[:last - first])  # an empty block of several dims cannot be cast
        if tick is not None and (first // rows_per_block) % TICK_BLOCKS == TICK_BLOCKS - 1:
            tick()
    views.clear()
    for rank in {copy.src_rank for copy in param.copies}:
        sources.index(rank).release(param.name)


def _row_blocks(
    index: SourceIndex, entry: TensorEntry, copy: Copy, itemsize: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Views of the source slice covering the copy's rows: one zero-copy view when the tensor is one
    piece, else bounded blocks of rows copied across piece boundaries."""
    dims = tuple(entry.dims)
    if entry.nbytes == 0:  # nothing to read (an HDF5 source stores no byte run for an empty tensor)
        yield np.empty((*dims, itemsize), dtype=np.uint8), 0
        return
    if len(entry.pieces) == 1:
        yield np.frombuffer(index.raw(entry.name)[0], dtype=np.uint8).reshape(*dims, itemsize), 0
        return
    row_bytes = int(np.prod(dims[1:], dtype=np.int64)) * itemsize
    rows_per_block = max(1, ROW_BLOCK_BYTES // max(row_bytes, 1))
    start, stop = copy.src_box.start[0], copy.src_box.stop[0]
    for row in range(start, stop, rows_per_block):
        count = min(rows_per_block, stop - row)
        block = np.empty((count, *dims[1:], itemsize), dtype=np.uint8)
        index.read_into(entry.name, row * row_bytes, block.data.cast("B"))
        yield block, row


def _shifted(copy: Copy, row_start: int, row_count: int) -> Copy:
    """The part of a copy that lies in source rows [row_start, row_start + row_count), with its
    source box made relative to that block."""
    if not copy.src_box.start:
        return copy
    lo = max(copy.src_box.start[0], row_start)
    hi = min(copy.src_box.stop[0], row_start + row_count)
    shift = lo - copy.src_box.start[0]
    src = Box((lo - row_start, *copy.src_box.start[1:]), (hi - row_start, *copy.src_box.stop[1:]))
    dst = Box(
        (copy.dst_box.start[0] + shift, *copy.dst_box.start[1:]),
        (copy.dst_box.start[0] + shift + hi - lo, *copy.dst_box.stop[1:]),
    )
    return Copy(copy.src_rank, src, dst)


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in zip(box.start, box.stop))
