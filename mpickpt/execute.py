"""Execute one target plan: copy planned regions out of memory-mapped sources into one output file.

The executor only follows a plan: it opens each source file named there once, copies every planned
region once, and streams the output through the checkpoint writer. A parameter that is one contiguous
run of source bytes moves file to file; anything else is assembled in one buffer of the target slice.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from .dtypes import dtype_itemsize
from .errors import CheckpointFormatError, PlanError
from .formats import SourceIndex, TensorEntry, TensorSpec, TensorWriter, open_index, open_writer
from .layout import Box
from .plan import Copy, ParamPlan, TargetPlan

Progress = Callable[[int], None]

# Source bytes are viewed in blocks of at most this many bytes when a tensor is split over pieces.
ROW_BLOCK_BYTES = 64 << 20


class SourceFiles:
    """Lazily opened, cached indexes of the source files one target reads (a context manager)."""

    def __init__(self, paths: Mapping[int, str]) -> None:
        self._paths = dict(paths)
        self._open: dict[int, SourceIndex] = {}
        self._stack = ExitStack()

    def __enter__(self) -> SourceFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._open.clear()

    def path(self, rank: int) -> str:
        """The file of a source rank (PlanError if the caller gave none)."""
        try:
            return self._paths[rank]
        except KeyError:
            raise PlanError(f"the checkpoint file of source rank {rank} is needed but was not given") from None

    def index(self, rank: int) -> SourceIndex:
        """The index of one source rank's file, opened on first use."""
        if rank not in self._open:
            self._open[rank] = self._stack.enter_context(open_index(self.path(rank)))
        return self._open[rank]

    def entry(self, rank: int, name: str) -> TensorEntry:
        """One parameter of one source file (CheckpointFormatError naming both if absent)."""
        index = self.index(rank)
        try:
            return index.entries[name]
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
        for name in sources.index(rank).entries:
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
) -> int:
    """Write one target rank's file in format `fmt` atomically; returns the bytes of tensor content written."""
    with open_writer(Path(out_path), fmt, crc=crc, sync=sync, forbidden_dirs=forbidden_dirs) as writer:
        return write_plan(plan, sources, writer, progress=progress)


def write_plan(plan: TargetPlan, sources: SourceFiles, writer: TensorWriter, *,
               progress: Progress | None = None) -> int:
    """Declare and write every parameter of a plan into an opened writer (it commits on its own exit);
    returns the bytes of tensor content written."""
    order = output_order(plan, sources)
    writer.declare([_spec(param, sources) for param in order])
    written = 0
    for param in order:
        written += _write_param(writer, param, sources)
        if progress is not None:
            progress(written)
    return written


def _spec(param: ParamPlan, sources: SourceFiles) -> TensorSpec:
    """What the writer is told in advance about one parameter (checked against the sources)."""
    if not param.in_strategy:
        entry = sources.entry(param.copies[0].src_rank, param.name)
        return TensorSpec(param.name, entry.dtype, tuple(entry.dims), entry.nbytes, entry.kind)
    _check_copies(param, sources)
    return TensorSpec(param.name, param.dtype, tuple(param.dims), param.nbytes)


def _write_param(writer: TensorWriter, param: ParamPlan, sources: SourceFiles) -> int:
    """Write one parameter, by the cheapest route its plan allows."""
    if not param.in_strategy:
        rank = param.copies[0].src_rank
        source = sources.entry(rank, param.name)
        if source.kind == "maptensor":
            writer.write_maptensor(param.name, sources.index(rank).raw(param.name))
            return source.nbytes
        return _copy_whole(writer, source, sources.index(rank), source.dtype, source.dims)
    if _is_whole_source(param, sources):
        rank = param.copies[0].src_rank
        return _copy_whole(writer, sources.entry(rank, param.name), sources.index(rank), param.dtype, param.dims)
    segments = _file_segments(param, sources)
    if segments is not None:
        writer.copy_tensor_segments(param.name, param.dtype, param.dims, segments)
        return sum(length for _, _, length in segments)
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
        entry = sources.entry(copy.src_rank, param.name)
        index = sources.index(copy.src_rank)
        for source_rows, row_start in _row_blocks(index, entry, copy, itemsize):
            rows = _shifted(copy, row_start, source_rows.shape[0])
            target[_slices(rows.dst_box)] = source_rows[_slices(rows.src_box)]
        index.release(param.name)
    return target


def _row_blocks(
    index: SourceIndex, entry: TensorEntry, copy: Copy, itemsize: int
) -> Iterator[tuple[np.ndarray, int]]:
    """Views of the source slice covering the copy's rows: one zero-copy view when the tensor is one
    piece, else bounded blocks of rows copied across piece boundaries."""
    dims = tuple(entry.dims)
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
