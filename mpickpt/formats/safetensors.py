"""safetensors files as MindSpore 2.10 reads and writes them: a header-only indexer with zero-copy views,
and a streaming writer whose output is byte-identical to ``safetensors.numpy.save_file``.

Layout: an 8-byte little-endian header length ``n``, ``n`` bytes of JSON (padded with spaces to a
multiple of 8), then the tensor data, every byte of it belonging to exactly one tensor. The official
package lays tensors out by dtype (its enum order, descending: widest first, so every tensor is
aligned) then by name, and lists them in the header in that order, ``__metadata__`` first.

MindSpore's metadata: ``"format": "ms"``, ``"remove_redundancy": "True"|"False"`` when its save said
so, ``"<name>": "Int4"`` for each qint4x2 tensor (stored as I8), and with ``crc_check`` a
``"crc_num"``: the zlib CRC-32 chained over the tensors in sorted name order, each contributing its
UTF-8 name then ``bytes(array)`` (its bytes, except for a 0-d integer: see :func:`_crc_link`). MindSpore
writes no ``__metadata__`` at all for a file without tensors, and cannot save BFloat16 with a CRC.

The official package orders ``__metadata__`` keys as a Rust hash map does, randomly per process; this
writer keeps MindSpore's insertion order (format, remove_redundancy, Int4 names, crc_num). Files are
therefore byte-identical to the official ones whenever the metadata holds one key, and otherwise equal
up to that key order (same size, same offsets, same data).
"""

from __future__ import annotations

import json
import math
import operator
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from mpickpt.atomic import AtomicFile, CommitOnExit
from mpickpt.ckpt_reader import CheckpointIndex, TensorEntry
from mpickpt.dtypes import dtype_itemsize
from mpickpt.errors import CheckpointFormatError, DestinationError
from mpickpt.formats.base import TensorSpec
from mpickpt.formats.offsets import COPY_CHUNK, OffsetWriter, Region, Slot, byte_view, name_bytes, pwrite_all
from mpickpt.source_file import open_source_file

__all__ = ["MAX_HEADER_SIZE", "SafetensorsIndex", "SafetensorsWriter", "clashes_with_metadata", "crc32_combine",
           "index_safetensors"]

MAX_HEADER_SIZE = 100_000_000
"""Largest JSON header accepted (the official package's and MindSpore's limit)."""

DEFAULT_METADATA = {"format": "ms"}
"""The ``__metadata__`` MindSpore writes into every safetensors file (this writer's default)."""

_TO_MINDSPORE = {
    "BOOL": "Bool", "U8": "UInt8", "I8": "Int8", "I16": "Int16", "U16": "UInt16", "I32": "Int32",
    "U32": "UInt32", "I64": "Int64", "U64": "UInt64", "F16": "Float16", "BF16": "BFloat16",
    "F32": "Float32", "F64": "Float64",
}
_TO_SAFETENSORS = {ms: st for st, ms in _TO_MINDSPORE.items()} | {"Int4": "I8"}
# The official package's data order: its Dtype enum, descending (widest first).
_LAYOUT_RANK = {st: rank for rank, st in enumerate(
    ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "I8", "U8", "BOOL"))}
_INT4 = "Int4"
_CRC_KEY = "crc_num"
_CRC_PLACEHOLDER = "0" * 10  # widest decimal CRC-32; the real one may be shorter
_MAX_DIMS = 64
_MAX_BYTES = (1 << 63) - 1


def clashes_with_metadata(name: str, dtype: str, metadata: Iterable[str] = DEFAULT_METADATA, *,
                          crc: bool = False) -> bool:
    """Whether a file written with these ``metadata`` keys (and ``crc_num`` with ``crc``) cannot hold a tensor
    ``name``: the header's own key, a metadata key (MindSpore reads a metadata value under a tensor's name as
    its dtype), or ``crc_num`` when the file has one or the tensor is Int4 (its marker would take that key)."""
    return name == "__metadata__" or name in metadata or (name == _CRC_KEY and (crc or dtype == _INT4))


# -- CRC-32 of concatenations -----------------------------------------------------------------


def _gf2_apply(matrix: Sequence[int], vector: int) -> int:
    out = i = 0
    while vector:
        if vector & 1:
            out ^= matrix[i]
        vector >>= 1
        i += 1
    return out


def _zero_byte_powers() -> list[list[int]]:
    """Operators advancing a raw CRC-32 register over 2**k zero bytes, k = 0..63."""
    one_bit = [0xEDB88320] + [1 << (i - 1) for i in range(1, 32)]
    op = one_bit
    for _ in range(3):  # 8 bits
        op = [_gf2_apply(op, col) for col in op]
    powers = [op]
    for _ in range(63):
        op = [_gf2_apply(op, col) for col in op]
        powers.append(op)
    return powers


_POWERS: list[list[int]] = []


def _advance(crc: int, length: int) -> int:
    """A raw CRC-32 register after ``length`` more zero bytes."""
    if not _POWERS:
        _POWERS.extend(_zero_byte_powers())
    k = 0
    while length:
        if length & 1:
            crc = _gf2_apply(_POWERS[k], crc)
        length >>= 1
        k += 1
    return crc


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """``zlib.crc32(a + b)`` from ``crc1 = zlib.crc32(a)``, ``crc2 = zlib.crc32(b)`` and ``len(b)``."""
    return _advance(crc1, len2) ^ crc2


_SIGNED = {"Int8": True, "UInt8": False, "Int16": True, "UInt16": False, "Int32": True, "UInt32": False,
           "Int64": True, "UInt64": False, "Int4": True}


def _crc_link(crc: int, name: str, dtype: str, dims: tuple[int, ...], data_crc: int, nbytes: int,
              scalar: bytes) -> int:
    """Chain one tensor into MindSpore's ``crc_num``: its UTF-8 name, then ``bytes(array)`` of it.

    For a 0-d integer array (Int4 included: MindSpore sees int8) ``bytes(array)`` is ``value`` zero
    bytes, not the stored ones (Python's ``bytes(n)``); MindSpore cannot take a negative value at all, so
    its true bytes count then.
    """
    crc = zlib.crc32(name.encode("utf-8"), crc)
    if not dims and dtype in _SIGNED:
        value = int.from_bytes(scalar, "little", signed=_SIGNED[dtype])
        if value >= 0:
            return crc32_combine(crc, _advance(0xFFFFFFFF, value) ^ 0xFFFFFFFF, value)
    return crc32_combine(crc, data_crc, nbytes)


# -- reader -------------------------------------------------------------------------------------


class _Malformed(Exception):
    """Internal: the header is invalid (the message names the tensor where known)."""


def _check_text(text: str) -> None:
    """Refuse a JSON string escaping a lone surrogate (``"\\ud800"``): no UTF-8 file or tool can hold it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Malformed(f"string {text!r} in the header escapes a lone surrogate: not Unicode text") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _Malformed(f"key {key!r} appears twice in one JSON object of the header")
        _check_text(key)
        if isinstance(value, str):
            _check_text(value)
        out[key] = value
    return out


def _load_json(raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise _Malformed("header is not UTF-8") from None
    except (ValueError, RecursionError) as err:
        raise _Malformed(f"header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise _Malformed("header is not a JSON object")
    return header


def _metadata(header: dict[str, object]) -> dict[str, str]:
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise _Malformed("__metadata__ is not a JSON object")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise _Malformed(f"__metadata__ value of {key!r} is not a string")
    return metadata


def _is_int(value: object) -> bool:
    return type(value) is int  # bool is not a dimension


def _dims(shape: object, itemsize: int) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > _MAX_DIMS:
        raise _Malformed(f"shape is not a list of at most {_MAX_DIMS} dimensions")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise _Malformed(f"shape {shape} is not a list of non-negative integers")
    if math.prod(max(d, 1) for d in shape) * itemsize > _MAX_BYTES:
        raise _Malformed(f"shape {shape} is too large")
    return tuple(shape)


def _tensor(name: str, info: object, metadata: dict[str, str], data_start: int) -> TensorEntry:
    """One header entry as a TensorEntry with absolute offsets (checked for itself only)."""
    if not isinstance(info, dict):
        raise _Malformed("entry is not a JSON object")
    st_dtype = info.get("dtype")
    if st_dtype not in _TO_MINDSPORE:
        raise _Malformed(f"unknown or unsupported dtype {st_dtype!r}")
    dtype = _TO_MINDSPORE[st_dtype]  # type: ignore[index]
    marker = metadata.get(name)
    if marker is not None and marker != _INT4:
        raise _Malformed(f"__metadata__ gives it {marker!r}: MindSpore reads a metadata value under a tensor's name "
                         f"as that tensor's dtype and knows only {_INT4!r} (rename the tensor or drop the key)")
    if marker == _INT4:
        if st_dtype != "I8":
            raise _Malformed(f"marked Int4 in __metadata__ but stored as {st_dtype}, not I8")
        dtype = _INT4
    dims = _dims(info.get("shape"), dtype_itemsize(dtype))
    offsets = info.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _Malformed(f"data_offsets {offsets!r} are not two integers 0 <= begin <= end")
    begin, end = offsets
    expected = math.prod(dims) * dtype_itemsize(dtype)
    if end - begin != expected:
        raise _Malformed(f"holds {end - begin} bytes, but {st_dtype} {list(dims)} needs {expected}")
    return TensorEntry(name, dtype, dims, ((data_start + begin, end - begin),))


def _in_data_order(entries: list[TensorEntry], data_start: int, size: int) -> dict[str, TensorEntry]:
    """Entries sorted by offset, checked to tile the data exactly (no gap, no overlap, nothing after)."""
    ordered = sorted(entries, key=lambda e: (e.pieces[0][0], e.pieces[0][1]))
    pos, previous = data_start, None
    for entry in ordered:
        begin, length = entry.pieces[0]
        where = f"tensor {entry.name!r}"
        if begin + length > size:
            raise _Malformed(f"{where}: data [{begin - data_start}, {begin + length - data_start}) runs past "
                             f"the end of the file ({size - data_start} data bytes)")
        if begin < pos:
            raise _Malformed(f"{where} overlaps tensor {previous!r}")
        if begin > pos:
            raise _Malformed(f"{where}: {begin - pos} bytes before it belong to no tensor")
        pos, previous = begin + length, entry.name
    if pos != size:
        raise _Malformed(f"{size - pos} bytes after the last tensor belong to no tensor")
    return {entry.name: entry for entry in ordered}


def _parse_header(raw: bytes, data_start: int, size: int) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    header = _load_json(raw)
    metadata = _metadata(header)
    found = []
    for name, info in header.items():
        try:
            found.append(_tensor(name, info, metadata, data_start))
        except _Malformed as err:
            raise _Malformed(f"tensor {name!r}: {err}") from None
    return _in_data_order(found, data_start, size), metadata


def _stored_crc(metadata: dict[str, str]) -> int | None:
    text = metadata.get(_CRC_KEY)
    if text is None:
        return None
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < 1 << 32):
        raise _Malformed(f"__metadata__ crc_num {text!r} is not a decimal CRC-32")
    return int(text)


def _read_header(fd: int, size: int) -> tuple[bytes, int]:
    """The JSON header bytes and the absolute offset where the data begins."""
    if size < 8:
        raise _Malformed(f"file of {size} bytes is too short for a safetensors header")
    length = int.from_bytes(os.pread(fd, 8, 0), "little")
    if length > MAX_HEADER_SIZE:
        raise _Malformed(f"header length {length} exceeds the {MAX_HEADER_SIZE}-byte limit")
    if 8 + length > size:
        raise _Malformed(f"header length {length} runs past the end of the file ({size} bytes)")
    raw = os.pread(fd, length, 8)
    if len(raw) != length:
        raise _Malformed("file shrank while its header was being read")
    return raw, 8 + length


class SafetensorsIndex(CheckpointIndex):
    """An indexed safetensors file: the same API as :class:`~mpickpt.ckpt_reader.CheckpointIndex`
    (entries in data order, zero-copy views, ``fileno`` for kernel copies), plus its ``__metadata__``."""

    def __init__(self, path: Path, fd: int, size: int, entries: dict[str, TensorEntry], metadata: dict[str, str],
                 crc: int | None) -> None:
        super().__init__(path, fd, size, entries, crc)
        self.metadata = metadata

    def computed_crc(self) -> int:
        """MindSpore's ``crc_num`` of the content: CRC-32 over sorted names, each name then its bytes."""
        crc = 0
        for name in sorted(self.entries):
            entry = self.entries[name]
            (view,) = self.raw(name)
            data_crc = 0
            for start in range(0, len(view), COPY_CHUNK):
                data_crc = zlib.crc32(view[start : start + COPY_CHUNK], data_crc)
            crc = _crc_link(crc, name, entry.dtype, entry.dims, data_crc, len(view), bytes(view[:8]))
            self.release(name)
        return crc


def index_safetensors(path: str | os.PathLike[str], verify_crc: bool = False) -> SafetensorsIndex:
    """Index a safetensors file reading only its header; ``verify_crc`` checks MindSpore's ``crc_num``
    when the metadata holds one (the whole file is read once)."""
    path = Path(path)
    fd, size = open_source_file(path, "safetensors file")
    try:
        try:
            raw, data_start = _read_header(fd, size)
            entries, metadata = _parse_header(raw, data_start, size)
            crc = _stored_crc(metadata)
        except _Malformed as err:
            raise CheckpointFormatError(f"{path}: {err}") from None
        index = SafetensorsIndex(path, fd, size, entries, metadata, crc)
    except BaseException:
        os.close(fd)
        raise
    if verify_crc and crc is not None and index.computed_crc() != crc:
        index.close()
        raise CheckpointFormatError(f"{path}: CRC check failed (crc_num {crc}); the file is damaged")
    return index


# -- writer -------------------------------------------------------------------------------------


def _header_json(regions: Mapping[str, Region], metadata: Mapping[str, str] | None) -> bytes:
    """The JSON header padded with spaces to a multiple of 8 bytes, as the official package writes it."""
    header: dict[str, object] = {} if metadata is None else {"__metadata__": dict(metadata)}
    for name, region in regions.items():
        offset = region.offset or 0
        header[name] = {"dtype": _TO_SAFETENSORS[region.dtype], "shape": list(region.dims),
                        "data_offsets": [offset, offset + region.nbytes]}
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)


class SafetensorsWriter(OffsetWriter, CommitOnExit):
    """Streams declared tensors into a safetensors file at ``path``, committed atomically (mode 0400).

    :meth:`declare` fixes the layout and the header; each tensor is then given once, in any order,
    and lands at its offset (``pwrite``, or ``copy_file_range`` from a source file). ``metadata`` is the
    base ``__metadata__`` (default MindSpore's ``{"format": "ms"}``; pass ``remove_redundancy`` here);
    Int4 markers and, with ``crc``, ``crc_num`` are added. With ``crc`` the header is written at commit:
    its length depends on the CRC's decimal width, so the data goes after room for the widest and is
    moved down in place in the rare case the real header is shorter.
    """

    def __init__(self, path: str | os.PathLike[str], *, crc: bool = False, sync: bool = True,
                 forbidden_dirs: Iterable[str | os.PathLike[str]] = (),
                 metadata: Mapping[str, str] | None = None, checksum: bool = False) -> None:
        super().__init__(Path(path), crc)
        self._tensor_crcs = checksum  # keep every tensor's CRC-32 as it is written, for file_crc
        self._base_metadata = dict(metadata) if metadata is not None else dict(DEFAULT_METADATA)
        self._file = AtomicFile(self.path, sync=sync, mode=0o400, forbidden_dirs=forbidden_dirs)
        self._head = b""  # the length field and header as last written
        self._done = False

    def _fd(self) -> int:
        return self._file.fd

    # -- declaring ----------------------------------------------------------------------------

    def declare(self, tensors: Sequence[TensorSpec]) -> None:
        """Fix the file's tensors (any order; laid out as the official package does) and its header."""
        if self._regions is not None:
            raise CheckpointFormatError(f"{self.path}: tensors were already declared")
        specs = [self._checked_spec(spec) for spec in tensors]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise CheckpointFormatError(f"{self.path}: tensor {twice[0]!r} is declared twice")
        specs.sort(key=lambda s: (_LAYOUT_RANK[_TO_SAFETENSORS[s.dtype]], s.name))
        offset, regions = 0, {}
        for spec in specs:
            regions[spec.name] = Region(spec.dtype, spec.dims, offset, spec.nbytes)
            offset += spec.nbytes
        self._regions = regions
        header = self._header(_CRC_PLACEHOLDER)
        if len(header) > MAX_HEADER_SIZE:
            raise CheckpointFormatError(f"{self.path}: the header of {len(regions)} tensors would take "
                                        f"{len(header)} bytes, over the {MAX_HEADER_SIZE}-byte limit of "
                                        f"safetensors readers")
        self._data_start = 8 + len(header)
        if not self._crc:
            self._put_header(header)

    def _checked_spec(self, spec: TensorSpec) -> TensorSpec:
        name = spec.name
        if spec.kind != "tensor":
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} is a {spec.kind}; safetensors cannot "
                                        f"hold it")
        if spec.dtype == "str":
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} is a str value; safetensors cannot "
                                        f"hold it")
        if spec.dtype not in _TO_SAFETENSORS:
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} has unknown dtype {spec.dtype!r}")
        if clashes_with_metadata(name, spec.dtype, self._base_metadata, crc=self._crc):
            raise CheckpointFormatError(f"{self.path}: parameter name {name!r} clashes with a metadata key (MindSpore "
                                        f"would read that key's value as the tensor's dtype); rename the parameter")
        name_bytes(self.path, name)
        dims = tuple(operator.index(d) for d in spec.dims)
        if len(dims) > _MAX_DIMS or any(d < 0 for d in dims) or spec.nbytes != math.prod(dims) * dtype_itemsize(
                spec.dtype):
            raise CheckpointFormatError(f"{self.path}: parameter {name!r} ({spec.dtype} {list(dims)}) cannot hold "
                                        f"{spec.nbytes} bytes")
        return TensorSpec(name, spec.dtype, dims, spec.nbytes, spec.kind)

    def _header(self, crc_text: str) -> bytes:
        assert self._regions is not None
        if not self._regions:
            return _header_json(self._regions, None)  # MindSpore saves an empty dict without metadata
        metadata = dict(self._base_metadata)
        metadata.update((name, _INT4) for name in sorted(self._regions) if self._regions[name].dtype == _INT4)
        if self._crc:
            metadata[_CRC_KEY] = crc_text
        return _header_json(self._regions, metadata)

    def _put_header(self, header: bytes) -> None:
        self._head = len(header).to_bytes(8, "little") + header
        self._pwrite("the header", memoryview(self._head), 0)

    # -- writing ------------------------------------------------------------------------------

    def _view(self, name: str, data: object) -> memoryview:
        try:
            return byte_view(data)
        except (TypeError, ValueError) as err:
            raise CheckpointFormatError(f"{self.path}: data of parameter {name!r} is not a contiguous buffer: "
                                        f"{err}") from None

    def copy_tensor_ranges(self, name: str, dtype: str, dims: Sequence[int], src_fd: int,
                           ranges: Sequence[tuple[int, int]]) -> None:
        """Write a declared tensor from (offset, length) ranges of one file, concatenated."""
        self.copy_tensor_segments(name, dtype, dims, [(src_fd, offset, length) for offset, length in ranges])

    def write_maptensor(self, name: str, payloads: Sequence[object]) -> None:
        """Refused: safetensors has no MapTensor."""
        raise CheckpointFormatError(f"{self.path}: parameter {name!r} is a MapTensor; safetensors cannot hold it")

    def _append(self, slot: Slot, view: memoryview) -> None:
        super()._append(slot, view)
        if self._crc and not slot.region.dims:
            slot.kept += view  # the content of a 0-d tensor (MindSpore's CRC reads integer ones as a count)

    # -- finishing ----------------------------------------------------------------------------

    def commit(self) -> None:
        """Check every declared tensor arrived, write the CRC header if any, and commit atomically."""
        try:
            if self._regions is None:
                raise CheckpointFormatError(f"{self.path}: nothing was declared")
            missing = [name for name, region in self._regions.items()
                       if name not in self._slots or self._slots[name].written != region.nbytes]
            if missing:
                raise CheckpointFormatError(f"{self.path}: declared parameter {missing[0]!r} was not (fully) "
                                            f"written ({len(missing)} incomplete)")
            if self._crc:
                self._put_crc_header()
        except BaseException:
            self.abort()
            raise
        self._file.commit()
        self._done = True

    @property
    def file_crc(self) -> int | None:
        """Once committed and with ``checksum``, the zlib CRC-32 of the whole file, combined from the header's
        and each tensor's CRC-32 taken as their bytes were written (tensors lie back to back after the
        header), so nobody needs to read the file back."""
        if not self._done or self._regions is None or not (self._tensor_crcs or self._crc):
            return None
        crc = zlib.crc32(self._head)
        for name, region in sorted(self._regions.items(), key=lambda item: item[1].offset or 0):
            if region.nbytes:
                crc = crc32_combine(crc, self._slots[name].crc, region.nbytes)
        return crc

    def abort(self) -> None:
        """Drop the temporary file; the target is left as it was."""
        self._file.abort()

    def _content_crc(self) -> int:
        crc = 0
        for name in sorted(self._slots):
            slot = self._slots[name]
            dtype, dims, _, nbytes = slot.region
            crc = _crc_link(crc, name, dtype, dims, slot.crc, nbytes, bytes(slot.kept))
        return crc

    def _put_crc_header(self) -> None:
        header = self._header(str(self._content_crc()))
        shift = self._data_start - (8 + len(header))
        if shift:
            self._move_data_down(shift)
        self._put_header(header)

    def _move_data_down(self, shift: int) -> None:
        """Move the data ``shift`` bytes toward the start (the real header is shorter than reserved)."""
        assert self._regions is not None
        src = self._data_start
        end = src + sum(region.nbytes for region in self._regions.values())
        try:
            reader = os.open(self._file.tmp, os.O_RDONLY | os.O_CLOEXEC)  # the temporary is write-only
            try:
                while src < end:
                    data = os.pread(reader, min(COPY_CHUNK, end - src), src)
                    if not data:
                        raise CheckpointFormatError(f"{self.path}: temporary file shrank while being written")
                    pwrite_all(self._file.fd, memoryview(data), src - shift)
                    src += len(data)
            finally:
                os.close(reader)
            os.ftruncate(self._file.fd, end - shift)
        except OSError as err:
            raise DestinationError(f"{self.path}: cannot finish the file: {err.strerror or err}") from err
        self._data_start -= shift
