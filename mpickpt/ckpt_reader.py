"""Index a MindSpore ``.ckpt`` without loading it, and map its tensors in place.

A ``.ckpt`` is a concatenation of serialized ``Checkpoint`` messages, each holding one ``Value``
(``tag`` = parameter name, then a ``TensorProto`` or ``MapTensorProto``), optionally followed by a
17-byte trailer ``b"crc_num"`` + the zlib CRC32 of everything before it as a 10-byte big-endian
integer. :func:`index_checkpoint` walks that wire format once with ``pread``, reading only the
headers and skipping over tensor content, so its cost grows with the number of entries, not the
bytes. Consecutive entries with the same tag (tensors over 512 MiB) are pieces of one parameter
whose contents concatenate in order.

Everything that can be wrong is refused while indexing, with a ``CheckpointFormatError`` naming
the file and the parameter, so that :meth:`CheckpointIndex.array` and friends cannot fail later:
broken wire format, lengths past the end, dims numpy cannot shape (over 64 of them, or a product
too large even beside a 0), content size disagreeing with dims and dtype, ``str`` values numpy
cannot hold (read at index time: they are small), malformed MapTensors, and pieces that are
scattered or disagree.
"""

from __future__ import annotations

import math
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np

from mpickpt.dtypes import DTYPES, MAX_DIMS, dtype_itemsize, numpy_dtype, shape_problem
from mpickpt.errors import CheckpointFormatError
from mpickpt.source_file import open_source_file

CRC_MARK = b"crc_num"
CRC_TRAILER_SIZE = len(CRC_MARK) + 10
MAPTENSOR_DTYPE = "MapTensor"
"""``TensorEntry.dtype`` of a MapTensor entry (its pieces are the raw ``MapTensorProto`` payloads)."""

_CIPHER_MAGIC = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
_WINDOW = 64 * 1024  # header bytes fetched per pread
_MAX_TEXT = 1 << 20  # longest parameter name or dtype string accepted
_CRC_CHUNK = 16 << 20
_MAX_STR_CHARS = ((1 << 31) - 1) // 4  # longest numpy "<U{n}" dtype (its itemsize is a C int)
_MAX_CODE_POINT = 0x10FFFF  # numpy refuses larger UTF-32 values when making a Python str
_MAP_DTYPES = {
    name: np.dtype(name).itemsize
    for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
    + ("float16", "float32", "float64")
} | {"bfloat16": 2}
"""``str(numpy dtype)`` names a MapTensor's tensors may carry (MindSpore writes ``str(array.dtype)``)."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one parameter's content lies in a checkpoint file."""

    name: str
    dtype: str  # MindSpore dtype string ("Float32", "BFloat16", "str", ...) or MAPTENSOR_DTYPE
    dims: tuple[int, ...]  # full dims of this slice as stored (() for 0-d)
    pieces: tuple[tuple[int, int], ...]  # (file offset, length) of each content piece, in order
    kind: str = "tensor"  # or "maptensor"

    @property
    def nbytes(self) -> int:
        """Total content bytes over all pieces."""
        return sum(length for _, length in self.pieces)


class _Malformed(Exception):
    """Internal: the wire format is broken at the current position."""


class _Cursor:
    """Reads header bytes of a file through a small ``pread`` window; skipped content is never read."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buf = b""
        self._base = 0

    def _fill(self, pos: int, need: int) -> None:
        if pos < self._base or pos + need > self._base + len(self._buf):
            self._buf = os.pread(self._fd, max(_WINDOW, need), pos)
            self._base = pos

    def varint(self, pos: int, limit: int) -> tuple[int, int]:
        """Decode the varint at ``pos`` (which must end before ``limit``); return (value, next pos)."""
        self._fill(pos, min(10, limit - pos))
        buf = self._buf
        i = pos - self._base
        stop = min(limit - self._base, len(buf))
        result = shift = 0
        while True:
            if i >= stop:
                raise _Malformed("truncated varint")
            byte = buf[i]
            i += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result, self._base + i
            shift += 7
            if shift >= 70:
                raise _Malformed("varint longer than 10 bytes")

    def text(self, pos: int, length: int, limit: int, what: str) -> str:
        """Decode ``length`` bytes of UTF-8 at ``pos``."""
        if length > _MAX_TEXT:
            raise _Malformed(f"{what} longer than {_MAX_TEXT} bytes")
        _span(pos, length, limit)
        self._fill(pos, length)
        start = pos - self._base
        try:
            return self._buf[start : start + length].decode("utf-8")
        except UnicodeDecodeError:
            raise _Malformed(f"{what} is not UTF-8") from None


def _span(pos: int, length: int, limit: int) -> int:
    """End of a length-delimited field, checked to lie inside its enclosing message."""
    if length > limit - pos:
        raise _Malformed("a length-delimited field runs past the end of its message")
    return pos + length


def _add_dim(dims: list[int], value: int) -> None:
    """Append one decoded dim, refusing negative ones and more than numpy allows."""
    if value >= 1 << 63:
        raise _Malformed("negative dimension")
    if len(dims) == MAX_DIMS:
        raise _Malformed(f"more than {MAX_DIMS} dims (numpy's limit)")
    dims.append(value)


def _parse_tensor(cur: _Cursor, pos: int, end: int) -> tuple[tuple[int, ...], str, tuple[int, int]]:
    """Parse a ``TensorProto`` in [pos, end): (dims, dtype string, (content offset, length))."""
    dims: list[int] = []
    dtype: str | None = None
    content: tuple[int, int] | None = None
    while pos < end:
        key, pos = cur.varint(pos, end)
        if key == 0x08:  # dims, unpacked (as MindSpore writes)
            value, pos = cur.varint(pos, end)
            _add_dim(dims, value)
        elif key == 0x0A:  # dims, packed
            length, pos = cur.varint(pos, end)
            stop = _span(pos, length, end)
            while pos < stop:
                value, pos = cur.varint(pos, stop)
                _add_dim(dims, value)
        elif key == 0x12 and dtype is None:
            length, pos = cur.varint(pos, end)
            dtype = cur.text(pos, length, end, "dtype string")
            pos += length
        elif key == 0x1A and content is None:
            length, pos = cur.varint(pos, end)
            content = (pos, length)
            pos = _span(pos, length, end)
        else:
            raise _Malformed(f"unexpected or repeated field {key >> 3} (wire type {key & 7}) in a tensor")
    if dtype is None or content is None:
        raise _Malformed("tensor without its dtype or content")
    return tuple(dims), dtype, content


_Signature = tuple[tuple[str, tuple[int, ...]], ...]
"""What consecutive pieces of one MapTensor must share: each tensor's dtype and dims after the first."""


def _check_map_tensor(dims: tuple[int, ...], dtype: str, length: int) -> None:
    """Refuse one tensor of a MapTensor whose dtype, dims and content length do not agree."""
    itemsize = _MAP_DTYPES.get(dtype)
    if itemsize is None:
        raise _Malformed(f"unknown dtype {dtype!r} in a MapTensor")
    if not dims:
        raise _Malformed("a MapTensor holds a 0-d tensor (MindSpore needs a first dim)")
    problem = shape_problem(dims, itemsize)
    if problem is not None:
        raise _Malformed(f"{problem} (in a MapTensor)")
    if math.prod(dims) * itemsize != length:
        raise _Malformed(f"a MapTensor tensor ({dtype} {list(dims)}) holds {length} bytes")


def _check_maptensor(cur: _Cursor, pos: int, end: int) -> _Signature:
    """Validate a ``MapTensorProto`` in [pos, end) (a non-empty list of tensors); return its signature."""
    signature: list[tuple[str, tuple[int, ...]]] = []
    while pos < end:
        key, pos = cur.varint(pos, end)
        if key != 0x0A:
            raise _Malformed(f"unexpected field {key >> 3} (wire type {key & 7}) in a MapTensor")
        length, pos = cur.varint(pos, end)
        stop = _span(pos, length, end)
        dims, dtype, (_, size) = _parse_tensor(cur, pos, stop)
        _check_map_tensor(dims, dtype, size)
        signature.append((dtype, dims[1:]))
        pos = stop
    if not signature:
        raise _Malformed("a MapTensor without tensors")
    return tuple(signature)


def _parse_value(cur: _Cursor, pos: int, end: int) -> tuple[TensorEntry, _Signature]:
    """Parse one ``Checkpoint.Value`` in [pos, end) into a one-piece entry and its piece signature."""
    name: str | None = None
    body: tuple[int, int, int] | None = None
    while pos < end:
        key, pos = cur.varint(pos, end)
        if key == 0x0A and name is None:
            length, pos = cur.varint(pos, end)
            name = cur.text(pos, length, end, "parameter name")
            pos += length
        elif key in (0x12, 0x1A) and body is None:
            length, pos = cur.varint(pos, end)
            stop = _span(pos, length, end)
            body = (key, pos, stop)
            pos = stop
        else:
            raise _Malformed(f"unexpected or repeated field {key >> 3} (wire type {key & 7}) in an entry")
    if name is None or body is None:
        raise _Malformed("entry without a parameter name or without a value")
    key, start, stop = body
    try:
        if key == 0x1A:
            signature = _check_maptensor(cur, start, stop)
            return TensorEntry(name, MAPTENSOR_DTYPE, (), ((start, stop - start),), "maptensor"), signature
        dims, dtype, content = _parse_tensor(cur, start, stop)
    except _Malformed as err:
        raise _Malformed(f"parameter {name!r}: {err}") from None
    return TensorEntry(name, dtype, dims, (content,)), ()


def _walk(fd: int, data_end: int) -> list[tuple[TensorEntry, _Signature]]:
    """Every ``Value`` in [0, data_end) in file order, one piece each, with its piece signature."""
    cur = _Cursor(fd)
    found: list[tuple[TensorEntry, _Signature]] = []
    pos = 0
    while pos < data_end:
        try:
            key, body = cur.varint(pos, data_end)
            if key != 0x0A:
                raise _Malformed(f"expected a Checkpoint entry (field 1), found field {key >> 3}")
            length, body = cur.varint(body, data_end)
            stop = _span(body, length, data_end)
            found.append(_parse_value(cur, body, stop))
        except _Malformed as err:
            after = f" after parameter {found[-1][0].name!r}" if found else ""
            raise _Malformed(f"{err} (entry #{len(found)} at byte {pos}{after})") from None
        pos = stop
    return found


def _describe(entry: TensorEntry, signature: _Signature) -> str:
    """Dtype and dims of one piece, for messages (a MapTensor's first dims vary: ``*``)."""
    if entry.kind == "maptensor":
        return "MapTensor of " + ", ".join(f"{dtype} {['*', *rest]}" for dtype, rest in signature)
    return f"{entry.dtype} {list(entry.dims)}"


def _group(path: Path, found: list[tuple[TensorEntry, _Signature]]) -> dict[str, TensorEntry]:
    """Join consecutive pieces of one parameter; refuse inconsistent or scattered repeats."""
    runs: dict[str, tuple[TensorEntry, _Signature, list[tuple[int, int]]]] = {}
    last = ""
    for entry, signature in found:
        run = runs.get(entry.name)
        if run is None:
            runs[entry.name] = (entry, signature, list(entry.pieces))
        elif entry.name != last:
            raise CheckpointFormatError(f"{path}: parameter {entry.name!r} appears twice, not in consecutive entries")
        elif (entry.kind, entry.dtype, entry.dims, signature) != (run[0].kind, run[0].dtype, run[0].dims, run[1]):
            raise CheckpointFormatError(
                f"{path}: parameter {entry.name!r} is split into pieces of different dtype or dims "
                f"({_describe(run[0], run[1])} then {_describe(entry, signature)})"
            )
        else:
            run[2].extend(entry.pieces)
        last = entry.name
    return {
        name: TensorEntry(name, first.dtype, first.dims, tuple(pieces), first.kind)
        for name, (first, _, pieces) in runs.items()
    }


def _check_entry(path: Path, fd: int, entry: TensorEntry) -> None:
    """Refuse an entry numpy could not turn into an array, so ``array()`` never fails later."""
    if entry.kind == "maptensor":
        return
    if entry.dtype not in DTYPES:
        raise CheckpointFormatError(f"{path}: parameter {entry.name!r} has unknown dtype {entry.dtype!r}")
    problem = shape_problem(entry.dims, dtype_itemsize(entry.dtype))
    if problem is not None:
        raise CheckpointFormatError(f"{path}: parameter {entry.name!r}: {problem}")
    if entry.dtype == "str":
        _check_text(path, fd, entry)
        return
    expected = math.prod(entry.dims) * dtype_itemsize(entry.dtype)
    if entry.nbytes != expected:
        raise CheckpointFormatError(
            f"{path}: parameter {entry.name!r} ({entry.dtype} {list(entry.dims)}) should hold {expected} bytes, "
            f"holds {entry.nbytes}"
        )


def _check_text(path: Path, fd: int, entry: TensorEntry) -> None:
    """Refuse a ``str`` value numpy cannot hold: not whole UTF-32 units, too long, or past U+10FFFF.

    Lone surrogates pass: numpy (and so MindSpore, which writes ``np.array(text).tobytes()``) keeps them.
    """
    if entry.nbytes % 4:
        raise CheckpointFormatError(f"{path}: str value {entry.name!r} is not UTF-32 ({entry.nbytes} bytes)")
    if entry.nbytes // 4 > _MAX_STR_CHARS:
        raise CheckpointFormatError(f"{path}: str value {entry.name!r} is longer than numpy allows")
    carry = b""
    for offset, length in entry.pieces:
        for start in range(offset, offset + length, _CRC_CHUNK):
            data = carry + os.pread(fd, min(_CRC_CHUNK, offset + length - start), start)
            whole = len(data) // 4
            codes = np.frombuffer(data, "<u4", count=whole)
            if whole and int(codes.max()) > _MAX_CODE_POINT:
                raise CheckpointFormatError(
                    f"{path}: str value {entry.name!r} is not UTF-32 (code point {int(codes.max()):#x})"
                )
            carry = data[whole * 4 :]


def _refuse_foreign(path: Path, fd: int, data_end: int) -> None:
    """Refuse encrypted and other non-protobuf files with a clear message."""
    head = os.pread(fd, 4, 0)
    mode = _CIPHER_MAGIC.get(int.from_bytes(head, "little")) if len(head) == 4 else None
    if mode is not None:
        raise CheckpointFormatError(f"{path}: checkpoint is encrypted ({mode}); decrypt it with MindSpore first")
    if data_end and head[:1] != b"\x0a":
        raise CheckpointFormatError(f"{path}: not a MindSpore checkpoint (does not start with a protobuf entry)")


def _crc_trailer(fd: int, size: int) -> int | None:
    """The stored CRC32 when the file ends with a ``crc_num`` trailer (MindSpore's own test), else None."""
    if size < CRC_TRAILER_SIZE:
        return None
    tail = os.pread(fd, CRC_TRAILER_SIZE, size - CRC_TRAILER_SIZE)
    if tail[: len(CRC_MARK)] != CRC_MARK:
        return None
    return int.from_bytes(tail[len(CRC_MARK) :], "big")


def _crc32(path: Path, fd: int, end: int) -> int:
    """CRC32 (zlib) of bytes [0, end), read through one reused buffer (no mapping)."""
    buf = bytearray(min(_CRC_CHUNK, max(end, 1)))
    view = memoryview(buf)
    crc = pos = 0
    while pos < end:
        got = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
        if got == 0:
            raise CheckpointFormatError(f"{path}: file shrank while its CRC was being checked")
        crc = zlib.crc32(view[:got], crc)
        pos += got
    return crc


class CheckpointIndex:
    """An indexed checkpoint: entries in file order and zero-copy access to their bytes.

    The file stays open (read-only memory map plus a descriptor, see :meth:`fileno`) until
    :meth:`close` or the end of a ``with`` block. Arrays and memoryviews handed out keep the map
    alive after ``close``; it is unmapped when the last of them is gone.
    """

    def __init__(self, path: Path, fd: int, size: int, entries: dict[str, TensorEntry], crc: int | None) -> None:
        self.path = path
        self.entries = entries
        self.size = size
        self.crc = crc  # stored CRC32 of the trailer, None when the file has none
        self.metadata: dict[str, str] = {}  # a .ckpt has no file-level metadata
        self.as_stored: frozenset[str] = frozenset()
        self._fd: int | None = fd
        self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if size else None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the descriptor and the map (the map lives on while views of it exist)."""
        # Never mm.close(): numpy arrays reference the map object without a buffer export, so
        # closing it under them would crash. Dropping our reference unmaps it once no view is left.
        self._mm = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def fileno(self) -> int:
        """Read-only descriptor of the file (for ``CheckpointWriter.copy_tensor_ranges``)."""
        if self._fd is None:
            raise CheckpointFormatError(f"{self.path}: index is closed")
        return self._fd

    def fd_of(self, name: str) -> int:
        """Read-only descriptor of the file holding ``name``'s pieces: this file's (see :meth:`fileno`)."""
        return self.fileno()

    def entry(self, name: str) -> TensorEntry:
        """The entry of ``name``; CheckpointFormatError naming the file when it is absent."""
        try:
            return self.entries[name]
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: no parameter {name!r} in this checkpoint") from None

    def _buffer(self) -> mmap.mmap | bytes:
        if self._fd is None:
            raise CheckpointFormatError(f"{self.path}: index is closed")
        return self._mm if self._mm is not None else b""

    def array(self, name: str) -> np.ndarray:
        """The parameter as a numpy array shaped by its dims (dtypes as in :mod:`mpickpt.dtypes`).

        One piece: a read-only zero-copy view of the map. Several pieces (a tensor over 512 MiB):
        a new array, copied from the pieces; use :meth:`read_into` to copy only a region. A ``str``
        value is a 0-d ``<U{n}`` array. MapTensor entries are refused (copy them with :meth:`raw`).
        """
        entry = self.entry(name)
        if entry.kind == "maptensor":
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} is a MapTensor; copy it through raw()")
        shape: tuple[int, ...] = entry.dims
        dtype = numpy_dtype(entry.dtype)
        if entry.dtype == "str":
            dtype, shape = np.dtype(f"<U{entry.nbytes // 4}"), ()
        if len(entry.pieces) == 1:
            return np.ndarray(shape, dtype, buffer=self._buffer(), offset=entry.pieces[0][0])
        if entry.nbytes == 0:  # np.empty would widen an empty str to "<U1"
            return np.ndarray(shape, dtype, buffer=b"")
        out = np.empty(shape, dtype)
        self.read_into(name, 0, out.reshape(-1).view(np.uint8).data)
        return out

    def raw(self, name: str) -> list[memoryview]:
        """Zero-copy read-only views of the parameter's content pieces, in order."""
        entry = self.entry(name)
        whole = memoryview(self._buffer())
        return [whole[offset : offset + length] for offset, length in entry.pieces]

    def release(self, name: str) -> None:
        """Drop the parameter's mapped pages from this process's resident set (MADV_DONTNEED).

        The data stays in the page cache and views stay valid (touching them maps the pages again),
        so resident memory stays bounded by what is being copied now, not by what was read before.
        """
        entry = self.entry(name)
        if self._mm is None or not entry.pieces:
            return
        start = entry.pieces[0][0] // mmap.PAGESIZE * mmap.PAGESIZE
        end = entry.pieces[-1][0] + entry.pieces[-1][1]
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        """Copy bytes [byte_offset, byte_offset + len(out)) of the parameter's content, across pieces."""
        entry = self.entry(name)
        target = memoryview(out).cast("B")
        if byte_offset < 0 or byte_offset + len(target) > entry.nbytes:
            raise IndexError(
                f"{self.path}: bytes [{byte_offset}, {byte_offset + len(target)}) outside parameter "
                f"{name!r} ({entry.nbytes} bytes)"
            )
        done, skip = 0, byte_offset
        with memoryview(self._buffer()) as whole:
            for offset, length in entry.pieces:
                if done == len(target):
                    break
                if skip >= length:
                    skip -= length
                    continue
                count = min(length - skip, len(target) - done)
                target[done : done + count] = whole[offset + skip : offset + skip + count]
                done += count
                skip = 0


def index_checkpoint(path: str | os.PathLike[str], verify_crc: bool = False) -> CheckpointIndex:
    """Index a ``.ckpt`` file reading only its headers.

    With ``verify_crc`` and a ``crc_num`` trailer present, the whole file is read once to check
    the CRC32 (as MindSpore's ``load_checkpoint(crc_check=True)``); without a trailer there is
    nothing to verify and ``CheckpointIndex.crc`` is None.
    """
    path = Path(path)
    fd, size = open_source_file(path, "checkpoint file")
    try:
        crc = _crc_trailer(fd, size)
        data_end = size if crc is None else size - CRC_TRAILER_SIZE
        _refuse_foreign(path, fd, data_end)
        try:
            found = _walk(fd, data_end)
        except _Malformed as err:
            raise CheckpointFormatError(f"{path}: {err}") from None
        entries = _group(path, found)
        for entry in entries.values():
            _check_entry(path, fd, entry)
        if verify_crc and crc is not None and _crc32(path, fd, data_end) != crc:
            raise CheckpointFormatError(f"{path}: CRC check failed; the file is damaged")
        return CheckpointIndex(path, fd, size, entries, crc)
    except BaseException:
        os.close(fd)
        raise
