"""Stream a MindSpore ``.ckpt`` to disk, byte-identical to ``mindspore.save_checkpoint``.

Each piece of a tensor is its own ``Checkpoint`` message: a small header (tag, dims unpacked,
dtype, content length) followed by the raw content, so nothing is built in memory. Tensors over
``piece_size`` (512 MiB, as MindSpore) are cut into pieces of exactly ``piece_size`` bytes, the
last shorter, each repeating the tag, dims and dtype. One deliberate difference: MindSpore writes
no entry at all for an empty tensor (a dimension of 0); this writer writes one entry with empty
content, which ``mindspore.load_checkpoint`` loads with the right shape.

Output goes to a temporary file beside the target (:mod:`mpickpt.atomic`), which on success is
fsynced, made read-only (0400) and renamed over the target (replacing a read-only file), then the
folder is fsynced.
"""

from __future__ import annotations

import functools
import math
import operator
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mpickpt.atomic import AtomicFile, CommitOnExit
from mpickpt.ckpt_reader import CRC_MARK, CheckpointIndex
from mpickpt.dtypes import DTYPES, dtype_itemsize, shape_problem
from mpickpt.errors import CheckpointFormatError, DestinationError
from mpickpt.formats.base import TensorSpec
from mpickpt.formats.offsets import byte_view, copy_with_crc, crc32, name_bytes, write_all

PIECE_SIZE = 512 * 1024 * 1024
"""Largest content of one entry; MindSpore's save_checkpoint splits bigger tensors at this size."""

_SMALL = 64 * 1024  # writes below this are gathered in a buffer
_FLUSH_AT = 1 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tensor_header(name: bytes, dtype: bytes, dims: Sequence[int], nbytes: int) -> bytes:
    """Header of one ``Checkpoint{value: {tag, tensor: {dims..., tensor_type, tensor_content}}}``."""
    tensor = b"".join(b"\x08" + _varint(d) for d in dims) + b"\x12" + _varint(len(dtype)) + dtype
    tensor += b"\x1a" + _varint(nbytes)
    value = b"\x0a" + _varint(len(name)) + name + b"\x12" + _varint(len(tensor) + nbytes)
    return b"\x0a" + _varint(len(value) + len(tensor) + nbytes) + value + tensor


def _maptensor_header(name: bytes, nbytes: int) -> bytes:
    """Header of one ``Checkpoint{value: {tag, maptensor: <nbytes of MapTensorProto>}}``."""
    value = b"\x0a" + _varint(len(name)) + name + b"\x1a" + _varint(nbytes)
    return b"\x0a" + _varint(len(value) + nbytes) + value


@dataclass(frozen=True)
class _FileRange:
    """Content that lies in another file: ``length`` bytes at ``offset`` of descriptor ``fd``."""

    fd: int
    offset: int
    length: int


_Segment = memoryview | _FileRange


def _byte_view(path: Path, name: str, data: object) -> memoryview:
    try:
        return byte_view(data)
    except ValueError:
        raise CheckpointFormatError(f"{path}: data of parameter {name!r} is not C-contiguous") from None


# Dirty bytes after which a synced writer asks the kernel to start writing them back (so the final
# fsync waits for little, and disk writes overlap the copying).
WRITEBACK_CHUNK = 32 << 20
_SYNC_FILE_RANGE_WRITE = 2


@functools.cache
def _load_sync_file_range() -> Callable[[int, int, int], None] | None:
    """Linux's sync_file_range(SYNC_FILE_RANGE_WRITE) through libc: start writeback, don't wait,
    keep the pages cached (posix_fadvise would evict them). None where libc lacks it. Loaded on first
    use, by the symbols already in the process (ctypes.util.find_library would start a subprocess), so
    runs that never sync pay nothing."""
    import ctypes

    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int

    def start_writeback(fd: int, offset: int, count: int) -> None:
        call(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # advisory: a failure only loses the head start

    return start_writeback



class CheckpointWriter(CommitOnExit):
    """Streams parameters into ``path`` atomically; a context manager that commits on clean exit.

    ``crc`` appends MindSpore's ``crc_num`` trailer; ``sync=False`` skips the fsyncs; a target
    inside any of ``forbidden_dirs`` is refused with DestinationError before anything is created;
    missing parent folders are created (mode 0700, as MindSpore's converter); ``piece_size``
    overrides the 512 MiB split (for tests).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        crc: bool = False,
        sync: bool = True,
        forbidden_dirs: Iterable[str | os.PathLike[str]] = (),
        piece_size: int = PIECE_SIZE,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.path = Path(path)
        self.tick = tick  # called between copied windows (offsets.copy_with_crc)
        self._sync = sync
        self._piece_size = piece_size
        self._with_trailer = crc
        self._crc = 0  # CRC-32 of every byte emitted so far (the trailer's value, and the whole file's)
        self._done = False
        self._buf = bytearray()
        self._names: set[str] = set()
        self._written_back = 0  # file offset up to which writeback was started
        self._file = AtomicFile(self.path, sync=sync, mode=0o400, forbidden_dirs=forbidden_dirs)

    # -- public writing API -------------------------------------------------------------------

    def write_tensor(self, name: str, dtype: str, dims: Sequence[int], data: object) -> None:
        """Write one parameter whose content is the buffer ``data`` (exactly the content bytes)."""
        view = _byte_view(self.path, name, data)
        self._put_tensor(name, dtype, dims, len(view), [view])

    def write_tensor_chunks(
        self, name: str, dtype: str, dims: Sequence[int], nbytes: int, chunks: Iterable[object]
    ) -> None:
        """Write one parameter from buffers that concatenate to exactly ``nbytes`` bytes."""
        self._put_tensor(name, dtype, dims, nbytes, (_byte_view(self.path, name, chunk) for chunk in chunks))

    def copy_tensor_from(
        self, name: str, dtype: str, dims: Sequence[int], src_fd: int, src_offset: int, nbytes: int
    ) -> None:
        """Write one parameter whose content is ``nbytes`` at ``src_offset`` of file ``src_fd``."""
        self.copy_tensor_ranges(name, dtype, dims, src_fd, [(src_offset, nbytes)])

    def copy_tensor_ranges(
        self, name: str, dtype: str, dims: Sequence[int], src_fd: int, ranges: Sequence[tuple[int, int]]
    ) -> None:
        """Write one parameter whose content is the concatenation of (offset, length) ranges of ``src_fd``.

        The source is mapped a window at a time and each few hundred KiB checksummed, then written, while
        it is still in the CPU cache (``offsets.copy_with_crc``).
        """
        self.copy_tensor_segments(name, dtype, dims, [(src_fd, offset, length) for offset, length in ranges])

    def copy_tensor_segments(
        self, name: str, dtype: str, dims: Sequence[int], segments: Sequence[tuple[int, int, int]]
    ) -> None:
        """Write one parameter whose content is the concatenation of (fd, offset, length) ranges of
        several source files, copied like ``copy_tensor_ranges``."""
        ranges = [_FileRange(fd, offset, length) for fd, offset, length in segments]
        self._put_tensor(name, dtype, dims, sum(length for _, _, length in segments), ranges)

    def write_maptensor(self, name: str, payloads: Sequence[object]) -> None:
        """Copy a MapTensor through: one entry per serialized ``MapTensorProto`` payload, in order."""
        tag = self._claim(name)
        try:
            for payload in payloads:
                view = _byte_view(self.path, name, payload)
                self._emit(_maptensor_header(tag, len(view)))
                self._emit(view)
        except OSError as err:
            raise DestinationError(f"{self.path}: cannot write parameter {name!r}: {err}") from err

    def copy_entry(self, index: CheckpointIndex, name: str) -> None:
        """Copy parameter ``name`` of an indexed checkpoint (tensor or MapTensor) unchanged."""
        entry = index.entry(name)
        if entry.kind == "maptensor":
            self.write_maptensor(name, index.raw(name))
        else:
            self.copy_tensor_ranges(name, entry.dtype, entry.dims, index.fileno(), entry.pieces)

    @property
    def file_crc(self) -> int | None:
        """Once committed, the zlib CRC-32 of the whole file as written, computed from the bytes on their
        way out, so nobody needs to read the file back."""
        return self._crc if self._done else None

    def declare(self, tensors: Sequence[TensorSpec]) -> None:
        """Announce the tensors this file will hold (a ``.ckpt`` needs nothing in advance; names are
        checked as they are written)."""

    def commit(self) -> None:
        """Finish the file: trailer, fsync, mode 0400, rename over the target, fsync the folder."""
        try:
            if self._with_trailer:
                self._emit(CRC_MARK + self._crc.to_bytes(10, "big"))
            self._flush()
        except OSError as err:
            self.abort()
            raise DestinationError(f"{self.path}: cannot finish the checkpoint: {err}") from err
        self._file.commit()
        self._done = True

    def abort(self) -> None:
        """Drop the temporary file; the target is left as it was."""
        self._file.abort()

    # -- internals ----------------------------------------------------------------------------

    def _open_fd(self) -> int:
        return self._file.fd

    def _claim(self, name: str) -> bytes:
        """Reserve ``name`` (each parameter once) and return its UTF-8 tag."""
        self._open_fd()
        if name in self._names:
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} written twice")
        tag = name_bytes(self.path, name)
        self._names.add(name)
        return tag

    def _check_tensor(self, name: str, dtype: str, dims: Sequence[int], nbytes: int) -> tuple[int, ...]:
        if dtype not in DTYPES:
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} has unknown dtype {dtype!r}")
        checked = tuple(operator.index(d) for d in dims)
        if any(d < 0 or d >= 1 << 63 for d in checked):
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} has invalid dims {list(checked)}")
        problem = shape_problem(checked, dtype_itemsize(dtype))
        if problem is not None:  # a file no reader (this one, MindSpore's numpy) could load
            raise CheckpointFormatError(f"{self.path}: parameter {name!r}: {problem}")
        if dtype == "str":
            if nbytes % 4:
                raise CheckpointFormatError(f"{self.path}: str value {name!r} must be UTF-32 ({nbytes} bytes)")
        elif nbytes != math.prod(checked) * dtype_itemsize(dtype):
            raise CheckpointFormatError(
                f"{self.path}: parameter {name!r} ({dtype} {list(checked)}) needs "
                f"{math.prod(checked) * dtype_itemsize(dtype)} bytes, got {nbytes}"
            )
        return checked

    def _put_tensor(
        self, name: str, dtype: str, dims: Sequence[int], nbytes: int, segments: Iterable[_Segment]
    ) -> None:
        """Write a tensor's pieces, a header before every ``piece_size`` bytes of its content."""
        checked = self._check_tensor(name, dtype, dims, nbytes)
        tag = self._claim(name)
        type_bytes = dtype.encode("ascii")
        try:
            written = left_in_piece = 0
            for segment in segments:
                length = _segment_length(segment)
                if written + length > nbytes:
                    raise CheckpointFormatError(f"{self.path}: parameter {name!r} got more than {nbytes} bytes")
                start = 0
                while start < length:
                    if left_in_piece == 0:
                        left_in_piece = min(self._piece_size, nbytes - written)
                        self._emit(_tensor_header(tag, type_bytes, checked, left_in_piece))
                    count = min(left_in_piece, length - start)
                    self._put_segment(name, segment, start, count)
                    start += count
                    written += count
                    left_in_piece -= count
            if written != nbytes:
                raise CheckpointFormatError(f"{self.path}: parameter {name!r} got {written} bytes of {nbytes}")
            if nbytes == 0:
                self._emit(_tensor_header(tag, type_bytes, checked, 0))
            self._kick_writeback()
        except OSError as err:
            raise DestinationError(f"{self.path}: cannot write parameter {name!r}: {err}") from err

    def _put_segment(self, name: str, segment: _Segment, start: int, count: int) -> None:
        if isinstance(segment, memoryview):
            self._emit(segment[start : start + count])
            return
        self._flush()
        try:
            self._crc = copy_with_crc(segment.fd, segment.offset + start, self._open_fd(), count, self._crc,
                                      tick=self.tick)
        except ValueError:
            raise CheckpointFormatError(f"{self.path}: source of parameter {name!r} ends early") from None

    def _emit(self, data: memoryview | bytes) -> None:
        """Append bytes to the file (small ones gathered), feeding the CRC."""
        self._crc = crc32(data, self._crc)
        if len(data) < _SMALL:
            self._buf += data
            if len(self._buf) >= _FLUSH_AT:
                self._flush()
        else:
            self._flush()
            write_all(self._open_fd(), data)

    def _kick_writeback(self) -> None:
        """With sync on, start writing back what is dirty once WRITEBACK_CHUNK bytes have piled up."""
        start_writeback = _load_sync_file_range() if self._sync else None
        if start_writeback is None:
            return
        end = os.lseek(self._open_fd(), 0, os.SEEK_CUR) + len(self._buf)
        if end - self._written_back >= WRITEBACK_CHUNK:
            self._flush()
            start_writeback(self._open_fd(), self._written_back, end - self._written_back)
            self._written_back = end

    def _flush(self) -> None:
        if self._buf:
            write_all(self._open_fd(), self._buf)
            self._buf.clear()


def _segment_length(segment: _Segment) -> int:
    """Bytes in one content segment (buffer or file range)."""
    return len(segment) if isinstance(segment, memoryview) else segment.length


def save_checkpoint(
    path: str | os.PathLike[str],
    tensors: Iterable[tuple[str, str, Sequence[int], object]],
    **writer_kwargs: object,
) -> None:
    """Write (name, dtype, dims, data) parameters, in order, to ``path`` atomically."""
    with CheckpointWriter(path, **writer_kwargs) as writer:  # type: ignore[arg-type]
        for name, dtype, dims, data in tensors:
            writer.write_tensor(name, dtype, dims, data)
