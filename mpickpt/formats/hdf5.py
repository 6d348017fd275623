"""HDF5 files of full tensors (a "unified" checkpoint), written by many processes at once with serial HDF5.

File structure (readable by any HDF5 >= 1.10 tool: metadata format bounds ``v110``; creation order kept):

- one dataset per parameter, in the root group, in declared order. The link name is the parameter name
  with ``%`` written ``%25``, ``/`` written ``%2F`` and NUL written ``%00``; the name ``.`` is written
  ``%2E``. Readers undo exactly these four sequences (also in files of other tools).
- every dataset: contiguous, allocated when created (no chunks, filters or fill write), aligned to 64
  bytes, no timestamps; attribute ``mindspore_dtype`` (``b"Float32"``, ``b"BFloat16"``...). Dtypes numpy or
  HDF5 lack are stored as bit patterns: ``BFloat16`` as little-endian uint16 (``ds[()]`` are the bits;
  ``(bits.astype(np.uint32) << 16).view(np.float32)`` the values), ``Int4`` as int8 bytes (two 4-bit
  values each). A 0-d tensor is a scalar dataset, an empty one a zero-size dataset.
- a ``str`` value of ``n`` characters: a scalar fixed-length UTF-8 string dataset of ``max(4 n, 1)``
  bytes, NUL-padded (``ds.asstr()[()]`` reads it), with attribute ``mindspore_dims`` (int64 array, the
  dims MindSpore stored, usually ``[0]``). NUL characters and lone surrogates cannot be stored.
- file attributes: ``mpickpt_version``, ``mpickpt_crc32`` (uint32) when written with a CRC (zlib CRC-32
  chained over the datasets in sorted parameter name order, each its UTF-8 name then its content
  bytes, a ``str`` as UTF-32-LE), and whatever the caller gives (e.g. ``source_layouts``, a JSON string).
- every text attribute is a fixed-length UTF-8 string (h5py reads it as ``bytes``): variable-length
  strings live in a global heap without checksums, which a damaged file can send HDF5 looping through;
  fixed-length ones live in the checksummed object headers.

Writing by many processes (:class:`H5Writer`): one process lays the file out under a temporary name
(:meth:`H5Writer.layout`, HDF5 closes it again) and learns each dataset's byte offset, the *region map*;
any process then writes tensor bytes straight at those offsets (:func:`open_regions`, ``pwrite`` or
``copy_file_range``; a ``str`` value as its padded UTF-8), and after a barrier one process adds the CRC
with h5py and renames the file into place (:meth:`H5Writer.finish`). Where h5py is built with MPI
(``h5py.get_config().mpi``) the ``mpio`` driver could write the same datasets collectively instead; the
region scheme needs only the PyPI wheel's serial HDF5 and gives the same file.

Reading (:func:`index_h5`): h5py reads the metadata once and is closed; contiguous datasets become byte
runs of a memory map (zero-copy views, kernel copies). Datasets whose bytes are not one stored run
(chunked, compressed, compact, big-endian: files of other tools) and ``str`` values are decoded by h5py
(``str`` values when indexing, the others when read): their entries (:class:`H5Entry`) have no
``pieces`` but the right ``nbytes``, and ``raw()`` gives a view of an in-memory copy. Nested groups name
parameters by their path (``group/name``); soft, external and virtual links are refused.
"""

from __future__ import annotations

import io
import json
import math
import operator
import os
import re
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mpickpt import __version__
from mpickpt.atomic import AtomicFile, CommitOnExit
from mpickpt.ckpt_reader import CheckpointIndex, TensorEntry
from mpickpt.dtypes import DTYPES, dtype_itemsize, numpy_dtype
from mpickpt.errors import CheckpointFormatError, DestinationError, MpickptError
from mpickpt.formats.base import TensorSpec
from mpickpt.formats.offsets import COPY_CHUNK, OffsetWriter, Region, RegionMap, Slot, byte_view, name_bytes
from mpickpt.formats.safetensors import crc32_combine
from mpickpt.source_file import open_source_file

__all__ = [
    "SIGNATURE",
    "H5Entry",
    "H5Index",
    "H5Layout",
    "H5Writer",
    "Part",
    "Region",
    "RegionWriter",
    "escape_name",
    "index_h5",
    "open_regions",
    "unescape_name",
]

SIGNATURE = b"\x89HDF\r\n\x1a\n"
"""The first 8 bytes of an HDF5 file (without a user block)."""

DTYPE_ATTR = "mindspore_dtype"
DIMS_ATTR = "mindspore_dims"
VERSION_ATTR = "mpickpt_version"
CRC_ATTR = "mpickpt_crc32"
_RESERVED_FILE_ATTRS = (VERSION_ATTR, CRC_ATTR)
_RESERVED_DATASET_ATTRS = (DTYPE_ATTR, DIMS_ATTR)
_STORED = {ms: numpy_dtype(ms) for ms in DTYPES if ms not in ("str", "Int4")} | {"Int4": np.dtype("i1")}
"""The numpy dtype each MindSpore dtype is stored as (``str`` aside)."""
_ACCEPTED = {ms: {dt} for ms, dt in _STORED.items()} | {"Int4": {np.dtype("i1"), np.dtype("u1")}}
_BY_NUMPY = {dt: ms for ms, dt in _STORED.items() if ms not in ("BFloat16", "Int4")}
"""MindSpore dtype of a dataset without ``mindspore_dtype``."""
_MAX_RANK = 32  # HDF5's H5S_MAX_RANK
_MAX_DEPTH = 32  # nested groups followed when indexing (a group linked into itself would loop)
_ALIGNMENT = 64
_ESCAPES = {"%": "%25", "/": "%2F", "\0": "%00"}
_UNESCAPE = re.compile("%(25|2F|00|2E)")


def _h5py() -> Any:
    """h5py, imported on first use (CheckpointFormatError when it is missing)."""
    try:
        import h5py
    except ImportError as err:
        raise CheckpointFormatError(f"HDF5 files need h5py (pip install h5py): {err}") from None
    return h5py


# -- names ------------------------------------------------------------------------------------------


def escape_name(name: str) -> str:
    """The HDF5 link name of a parameter (``%`` -> ``%25``, ``/`` -> ``%2F``, NUL -> ``%00``, ``.`` -> ``%2E``)."""
    if name == ".":
        return "%2E"
    return "".join(_ESCAPES.get(ch, ch) for ch in name)


def unescape_name(link: str) -> str:
    """The parameter name of an HDF5 link name (inverse of :func:`escape_name`)."""
    return _UNESCAPE.sub(lambda m: chr(int(m.group(1), 16)), link)


# -- region map -------------------------------------------------------------------------------------
# A Region's ``offset`` is that of its dataset's bytes in the file (None for an empty tensor); a ``str`` value
# of ``nbytes`` (UTF-32) is stored in ``max(nbytes, 1)`` bytes, its UTF-8 text padded with NULs.


@dataclass(frozen=True)
class H5Layout:
    """A laid-out temporary file: where it is and where each tensor goes (picklable, for broadcasting)."""

    tmp: Path
    regions: RegionMap


@dataclass(frozen=True)
class Part:
    """What one process wrote into the file: tensor names and their CRC-32s (with ``crc``)."""

    written: tuple[str, ...]
    crcs: dict[str, int] = field(default_factory=dict)


# -- layout -----------------------------------------------------------------------------------------


def _checked_spec(path: Path, spec: TensorSpec) -> TensorSpec:
    """A spec this format can hold, with dims as ints (CheckpointFormatError naming the parameter)."""
    name = spec.name
    if spec.kind != "tensor":
        raise CheckpointFormatError(f"{path}: parameter {name!r} is a {spec.kind}; HDF5 files cannot hold it")
    if spec.dtype not in DTYPES:
        raise CheckpointFormatError(f"{path}: parameter {name!r} has unknown dtype {spec.dtype!r}")
    if not name:
        raise CheckpointFormatError(f"{path}: a parameter without a name cannot be an HDF5 dataset")
    name_bytes(path, name)
    dims = tuple(operator.index(d) for d in spec.dims)
    rank_ok = len(dims) <= (64 if spec.dtype == "str" else _MAX_RANK)
    size_ok = spec.nbytes % 4 == 0 if spec.dtype == "str" else spec.nbytes == math.prod(dims) * dtype_itemsize(
        spec.dtype)
    if not rank_ok or any(d < 0 for d in dims) or not size_ok:
        raise CheckpointFormatError(f"{path}: parameter {name!r} ({spec.dtype} {list(dims)}, {spec.nbytes} bytes) "
                                    f"cannot be an HDF5 dataset (at most {_MAX_RANK} dims)")
    return TensorSpec(name, spec.dtype, dims, spec.nbytes)


def _byte_dcpl(h5py: Any) -> Any:
    """Creation properties of a tensor dataset: contiguous, allocated now, never filled, no timestamps."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)
    return dcpl


def _text_value(h5py: Any, text: str) -> np.ndarray:
    """A fixed-length UTF-8 string (stored in the checksummed object header, unlike variable-length
    strings, whose heap a damaged file can send HDF5 looping through)."""
    data = text.encode("utf-8")
    return np.array(data, dtype=h5py.string_dtype("utf-8", max(len(data), 1)))


def _str_capacity(nbytes: int) -> int:
    """Bytes of the fixed-length string holding a str value of ``nbytes`` UTF-32 bytes (UTF-8 is never longer)."""
    return max(nbytes, 1)


def _create_dataset(h5py: Any, root: Any, spec: TensorSpec) -> Any:
    """Create one dataset (a str value: a scalar fixed-length UTF-8 string)."""
    h5p, h5s, h5t = h5py.h5p, h5py.h5s, h5py.h5t
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_char_encoding(h5t.CSET_UTF8)
    if spec.dtype == "str":
        space = h5s.create(h5s.SCALAR)
        tid = h5t.py_create(h5py.string_dtype("utf-8", _str_capacity(spec.nbytes)), logical=True)
    else:
        space = h5s.create(h5s.SCALAR) if not spec.dims else h5s.create_simple(spec.dims)
        tid = h5t.py_create(_STORED[spec.dtype], logical=True)
    link = escape_name(spec.name).encode("utf-8")
    dataset = h5py.Dataset(h5py.h5d.create(root.id, link, tid, space, dcpl=_byte_dcpl(h5py), lcpl=lcpl))
    dataset.attrs[DTYPE_ATTR] = _text_value(h5py, spec.dtype)
    if spec.dtype == "str":
        dataset.attrs[DIMS_ATTR] = np.array(spec.dims, np.int64)
    return dataset


def _region(path: Path, dataset: Any, spec: TensorSpec) -> Region:
    size = _str_capacity(spec.nbytes) if spec.dtype == "str" else spec.nbytes
    if size == 0:
        return Region(spec.dtype, spec.dims, None, 0)
    offset = dataset.id.get_offset()
    if offset is None or dataset.id.get_storage_size() != size:
        raise CheckpointFormatError(f"{path}: HDF5 did not allocate parameter {spec.name!r} as one run of "
                                    f"{size} bytes")
    return Region(spec.dtype, spec.dims, offset, spec.nbytes)


def _set_attrs(h5py: Any, target: Any, attrs: Mapping[str, object], reserved: Sequence[str], what: str) -> None:
    for key, value in attrs.items():
        if key in reserved:
            raise CheckpointFormatError(f"{what}: attribute {key!r} is reserved by mpickpt")
        target.attrs[key] = _text_value(h5py, value) if isinstance(value, str) else value


def _lay_out(path: Path, tmp: Path, specs: Sequence[TensorSpec], attrs: Mapping[str, object],
             dataset_attrs: Mapping[str, Mapping[str, object]]) -> RegionMap:
    """Create the HDF5 file at ``tmp`` with every dataset allocated; its region map."""
    h5py = _h5py()
    regions: RegionMap = {}
    try:
        with h5py.File(tmp, "w", libver=("v110", "v110"), track_order=True, locking=False,
                       alignment_threshold=1, alignment_interval=_ALIGNMENT) as f:
            f.attrs[VERSION_ATTR] = _text_value(h5py, __version__)
            _set_attrs(h5py, f, attrs, _RESERVED_FILE_ATTRS, str(path))
            for spec in specs:
                dataset = _create_dataset(h5py, f, spec)
                _set_attrs(h5py, dataset, dataset_attrs.get(spec.name, {}), _RESERVED_DATASET_ATTRS,
                           f"{path}: parameter {spec.name!r}")
                regions[spec.name] = _region(path, dataset, spec)
    except MpickptError:
        raise
    except Exception as err:
        raise DestinationError(f"{path}: cannot lay out the HDF5 file: {err}") from err
    return regions


# -- writing at offsets -----------------------------------------------------------------------------


class _RegionFile(OffsetWriter):
    """Writes declared tensors at their offsets of an HDF5 file; a ``str`` value is kept until complete,
    then written as its padded UTF-8."""

    def _view(self, name: str, data: object) -> memoryview:
        try:
            return byte_view(data)
        except TypeError as err:
            raise CheckpointFormatError(f"{self.path}: data of parameter {name!r} is not a buffer: {err}") from None
        except ValueError:
            raise CheckpointFormatError(f"{self.path}: data of parameter {name!r} is not a contiguous buffer") \
                from None

    def write_maptensor(self, name: str, payloads: Sequence[object]) -> None:
        """Refused: HDF5 files of mpickpt hold no MapTensor."""
        raise CheckpointFormatError(f"{self.path}: parameter {name!r} is a MapTensor; HDF5 files cannot hold it")

    def part(self) -> Part:
        """What this process wrote (for :meth:`H5Writer.finish`)."""
        done = {name: slot for name, slot in self._slots.items() if slot.done}
        return Part(tuple(done), {name: slot.crc for name, slot in done.items()} if self._crc else {})

    def _through_buffer(self, slot: Slot) -> bool:
        return self._crc or slot.region.dtype == "str"

    def _put(self, slot: Slot, view: memoryview, offset: int) -> None:
        if slot.region.dtype == "str":
            slot.kept += view
        elif view:
            super()._put(slot, view, offset)

    def _complete(self, slot: Slot) -> None:
        if slot.region.dtype == "str":
            text = _utf8_text(self.path, slot.name, bytes(slot.kept))
            padded = text.ljust(_str_capacity(slot.region.nbytes), b"\0")
            self._pwrite(f"parameter {slot.name!r}", memoryview(padded), slot.region.offset or 0)


def _utf8_text(path: Path, name: str, data: bytes) -> bytes:
    """A ``str`` value's UTF-32-LE content as UTF-8 (refusing what an HDF5 string cannot hold exactly)."""
    try:
        text = data.decode("utf-32-le").encode("utf-8")
    except UnicodeError:
        raise CheckpointFormatError(f"{path}: str value {name!r} is not UTF-32 text HDF5 can store as UTF-8") \
            from None
    if b"\0" in text:
        raise CheckpointFormatError(f"{path}: str value {name!r} holds a NUL character; HDF5 strings cannot")
    return text


class RegionWriter(_RegionFile):
    """Writes tensors into a laid-out HDF5 temporary file from another process (see :func:`open_regions`)."""

    def __init__(self, path: Path, tmp: Path, regions: RegionMap, *, crc: bool, sync: bool) -> None:
        super().__init__(path, crc)
        self._regions = regions
        self._sync = sync
        try:
            self._file: int | None = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as err:
            raise DestinationError(f"{path}: cannot open temporary file {tmp}: {err.strerror or err}") from err

    def _fd(self) -> int:
        if self._file is None:
            raise DestinationError(f"{self.path}: region writer is already closed")
        return self._file

    def close(self) -> Part:
        """fsync (unless sync is off), close, and return what was written."""
        fd = self._fd()
        try:
            if self._sync:
                os.fsync(fd)
        except OSError as err:
            raise DestinationError(f"{self.path}: cannot write: {err.strerror or err}") from err
        finally:
            self.abort()
        return self.part()

    def abort(self) -> None:
        """Close without syncing (the file is the laying-out process's to drop)."""
        if self._file is not None:
            os.close(self._file)
            self._file = None


def open_regions(path: str | os.PathLike[str], layout: H5Layout, *, crc: bool = False,
                 sync: bool = True) -> RegionWriter:
    """A writer of some tensors of a file laid out by :meth:`H5Writer.layout` in another process
    (``path`` is the final name, for messages; ``crc`` as the laying-out writer's)."""
    return RegionWriter(Path(path), layout.tmp, layout.regions, crc=crc, sync=sync)


class H5Writer(_RegionFile, CommitOnExit):
    """An HDF5 file of full tensors, committed atomically (mode 0400): a TensorWriter, and the laying-out
    and finishing side of the many-process scheme (module doc).

    Single process: ``declare`` (lays the file out), the write calls, ``commit``. Many processes: one
    runs ``layout = w.layout(specs)`` and shares ``layout``; the others write through
    ``open_regions(path, layout)`` and return ``close()``'s :class:`Part`; after a barrier the first runs
    ``w.finish(parts)`` (or ``w.abort()``); only a CRC makes ``finish`` open the file with h5py again.
    ``attrs`` become file attributes and ``dataset_attrs[name]`` attributes of that parameter's dataset
    (``mpickpt_version``, ``mpickpt_crc32``, ``mindspore_dtype`` and ``mindspore_dims`` are reserved).
    """

    def __init__(self, path: str | os.PathLike[str], *, crc: bool = False, sync: bool = True,
                 forbidden_dirs: Iterable[str | os.PathLike[str]] = (), attrs: Mapping[str, object] | None = None,
                 dataset_attrs: Mapping[str, Mapping[str, object]] | None = None) -> None:
        super().__init__(Path(path), crc)
        self._attrs = dict(attrs or {})
        self._dataset_attrs = dict(dataset_attrs or {})
        self._file = AtomicFile(self.path, sync=sync, mode=0o400, forbidden_dirs=forbidden_dirs)

    def _fd(self) -> int:
        return self._file.fd

    def declare(self, tensors: Sequence[TensorSpec]) -> None:
        """Lay the file out with these tensors, in this order."""
        self.layout(tensors)

    def layout(self, tensors: Sequence[TensorSpec]) -> H5Layout:
        """Create the temporary file with every dataset allocated; where it is and where tensors go."""
        if self._regions is not None:
            raise CheckpointFormatError(f"{self.path}: tensors were already declared")
        specs = [_checked_spec(self.path, spec) for spec in tensors]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            raise CheckpointFormatError(f"{self.path}: tensor {min(n for n in names if names.count(n) > 1)!r} "
                                        f"is declared twice")
        unknown = sorted(set(self._dataset_attrs) - set(names))
        if unknown:
            raise CheckpointFormatError(f"{self.path}: attributes given for undeclared parameter {unknown[0]!r}")
        _ = self._file.fd  # DestinationError once committed or aborted (h5py would create the file again)
        self._regions = _lay_out(self.path, self._file.tmp, specs, self._attrs, self._dataset_attrs)
        return H5Layout(self._file.tmp, dict(self._regions))

    def commit(self) -> None:
        """Finish with this process's writes only."""
        self.finish(())

    def finish(self, parts: Iterable[Part]) -> None:
        """Check every declared tensor was written once (here or in ``parts``), store the CRC, and rename
        the file into place; aborts on failure."""
        try:
            if self._regions is None:
                raise CheckpointFormatError(f"{self.path}: nothing was declared")
            merged = _merge(self.path, self._regions, [self.part(), *parts])
            if self._crc:
                self._store_crc(_content_crc(self.path, self._regions, merged.crcs))
        except BaseException:
            self.abort()
            raise
        self._file.commit()

    def _store_crc(self, crc: int) -> None:
        try:
            with _h5py().File(self._file.tmp, "r+", locking=False) as f:
                f.attrs[CRC_ATTR] = np.uint32(crc)
        except Exception as err:
            raise DestinationError(f"{self.path}: cannot finish the HDF5 file: {err}") from err

    def abort(self) -> None:
        """Drop the temporary file; the target is left as it was."""
        self._file.abort()


def _merge(path: Path, regions: RegionMap, parts: Sequence[Part]) -> Part:
    """The parts of all processes as one, checked to write each declared tensor exactly once."""
    written: dict[str, None] = {}
    crcs: dict[str, int] = {}
    for part in parts:
        for name in part.written:
            if name in written:
                raise CheckpointFormatError(f"{path}: parameter {name!r} written twice")
            written[name] = None
        crcs.update(part.crcs)
    missing = [name for name in regions if name not in written]
    if missing:
        raise CheckpointFormatError(f"{path}: declared parameter {missing[0]!r} was not written "
                                    f"({len(missing)} missing)")
    return Part(tuple(written), crcs)


def _content_crc(path: Path, regions: RegionMap, crcs: Mapping[str, int]) -> int:
    """The file's CRC-32 from each tensor's (module doc)."""
    crc = 0
    for name in sorted(regions):
        if name not in crcs:
            raise CheckpointFormatError(f"{path}: parameter {name!r} was written without a CRC")
        crc = zlib.crc32(name.encode("utf-8"), crc)
        crc = crc32_combine(crc, crcs[name], regions[name].nbytes)
    return crc


# -- reading ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class H5Entry(TensorEntry):
    """A tensor h5py must decode (``str``, chunked, compressed...): no byte runs, ``size`` content bytes."""

    size: int = 0
    link: str = ""  # its path in the file

    @property
    def nbytes(self) -> int:
        """Content bytes (as the array's ``tobytes()``)."""
        return self.size


class _Bad(Exception):
    """Internal: a dataset or attribute is invalid (the message says why)."""


def _text_attr(value: object, what: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not UTF-8") from None
    if not isinstance(value, str):
        raise _Bad(f"{what} is not a string")
    return value


def _ms_dtype(dataset: Any, h5py: Any) -> str:
    """The MindSpore dtype of a dataset (its ``mindspore_dtype``, else from its numpy dtype)."""
    is_text = h5py.check_string_dtype(dataset.dtype) is not None
    if DTYPE_ATTR in dataset.attrs:
        ms = _text_attr(dataset.attrs[DTYPE_ATTR], DTYPE_ATTR)
        if ms not in DTYPES:
            raise _Bad(f"unknown {DTYPE_ATTR} {ms!r}")
        if (ms == "str") != is_text or (ms != "str" and dataset.dtype.newbyteorder("<") not in _ACCEPTED[ms]):
            raise _Bad(f"{DTYPE_ATTR} {ms} does not match its HDF5 type ({dataset.dtype})")
        return ms
    if is_text:
        return "str"
    native = _BY_NUMPY.get(dataset.dtype.newbyteorder("<"))
    if native is None:
        raise _Bad(f"HDF5 type {dataset.dtype} has no MindSpore dtype")
    return native


def _str_entry(name: str, link: str, dataset: Any, h5py: Any) -> tuple[H5Entry, np.ndarray]:
    """A str value (decoded now: it is small) and its array."""
    if dataset.shape != ():
        raise _Bad(f"string dataset of shape {dataset.shape} (a str value is a scalar)")
    encoding: str = h5py.check_string_dtype(dataset.dtype).encoding or "utf-8"
    raw = dataset[()]
    try:
        text = raw.decode(encoding) if isinstance(raw, bytes) else str(raw)
    except UnicodeDecodeError:
        raise _Bad(f"string is not {encoding}") from None
    dims: tuple[int, ...] = ()
    if DIMS_ATTR in dataset.attrs:
        found = np.asarray(dataset.attrs[DIMS_ATTR])
        if found.ndim != 1 or found.dtype.kind not in "iu" or len(found) > 64 or (found < 0).any():
            raise _Bad(f"{DIMS_ATTR} is not a list of dims")
        dims = tuple(int(d) for d in found)
    data = text.encode("utf-32-le")
    value = np.ndarray((), np.dtype(f"<U{len(text)}"), buffer=data) if data else np.ndarray((), "<U0", buffer=b"")
    return H5Entry(name, "str", dims, (), size=len(data), link=link), value


def _tensor_entry(name: str, link: str, dataset: Any, ms: str, h5py: Any, size: int) -> TensorEntry:
    """A byte run when the dataset is stored as one contiguous native run; else an h5py-decoded entry."""
    dims = tuple(dataset.shape)
    nbytes = math.prod(dims) * dtype_itemsize(ms)
    if nbytes == 0:
        return TensorEntry(name, ms, dims, ())
    dcpl = dataset.id.get_create_plist()
    layout = dcpl.get_layout()
    if layout not in (h5py.h5d.CONTIGUOUS, h5py.h5d.CHUNKED, h5py.h5d.COMPACT) or dcpl.get_external_count():
        raise _Bad("stored in other files (virtual or external dataset); not supported")
    _check_written(dataset, layout, h5py)
    offset = dataset.id.get_offset()
    if layout != h5py.h5d.CONTIGUOUS or offset is None or dataset.dtype not in _ACCEPTED[ms]:  # e.g. big-endian
        return H5Entry(name, ms, dims, (), size=nbytes, link=link)
    if dataset.id.get_storage_size() != nbytes:
        raise _Bad(f"stores {dataset.id.get_storage_size()} bytes, {ms} {list(dims)} needs {nbytes}")
    if offset + nbytes > size:
        raise _Bad(f"data [{offset}, {offset + nbytes}) runs past the end of the file ({size} bytes)")
    return TensorEntry(name, ms, dims, ((offset, nbytes),))


def _check_written(dataset: Any, layout: int, h5py: Any) -> None:
    """Refuse a non-empty dataset whose data was never (fully) written: HDF5 reads fill values there."""
    if layout == h5py.h5d.CONTIGUOUS and dataset.id.get_storage_size() == 0:
        raise _Bad("holds no data (never written; HDF5 would read its fill value): the file is incomplete")
    if layout == h5py.h5d.CHUNKED:
        needed = math.prod(-(-dim // chunk) for dim, chunk in zip(dataset.shape, dataset.chunks, strict=True))
        written = dataset.id.get_num_chunks()
        if written < needed:
            raise _Bad(f"only {written} of its {needed} chunks were written (HDF5 would read the fill value for "
                       f"the rest): the file is incomplete")


def _walk(h5py: Any, group: Any, prefix: str, depth: int) -> Iterator[tuple[str, str]]:
    """(parameter name, link path) of every dataset under ``group``, in its link order."""
    if depth > _MAX_DEPTH:
        raise _Bad(f"groups nested deeper than {_MAX_DEPTH} levels at {prefix!r}")
    for link in group:
        if isinstance(link, bytes):  # h5py gives a name that is not UTF-8 as bytes
            raise _Bad(f"link name {link!r} in group {prefix!r} is not UTF-8 text, so it names no parameter")
        name = prefix + unescape_name(link)
        kind = group.get(link, getlink=True)
        if not isinstance(kind, h5py.HardLink):
            raise _Bad(f"link {name!r} is a {type(kind).__name__}; only plain datasets and groups are read")
        cls = group.get(link, getclass=True)
        if cls is h5py.Group:
            yield from _walk(h5py, group[link], name + "/", depth + 1)
        elif cls is h5py.Dataset:
            yield name, f"{group.name.rstrip('/')}/{link}"


def _attr_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return json.dumps(np.asarray(value).tolist(), default=str)


def _read_metadata(f: Any) -> tuple[dict[str, str], int | None]:
    """File attributes as strings, and the stored CRC."""
    metadata = {key: _attr_text(f.attrs[key]) for key in f.attrs}
    if CRC_ATTR not in f.attrs:
        return metadata, None
    crc = np.asarray(f.attrs[CRC_ATTR])
    if crc.shape != () or crc.dtype.kind not in "iu" or not 0 <= int(crc) < 1 << 32:
        raise _Bad(f"file attribute {CRC_ATTR} is not a CRC-32")
    return metadata, int(crc)


def _open_h5(fd: int) -> Any:
    """h5py's view of the file behind ``fd`` (the same inode, whatever happens to its name)."""
    return _h5py().File(io.FileIO(fd, "rb", closefd=False), "r", locking=False)


def _read_index(path: Path, fd: int, size: int) -> tuple[dict[str, TensorEntry], dict[str, np.ndarray],
                                                            dict[str, str], int | None]:
    h5py = _h5py()
    entries: dict[str, TensorEntry] = {}
    strings: dict[str, np.ndarray] = {}
    name = None
    try:
        with _open_h5(fd) as f:
            metadata, crc = _read_metadata(f)
            for name, link in _walk(h5py, f, "", 0):
                dataset = f[link]
                if name in entries:
                    raise _Bad("appears twice")
                ms = _ms_dtype(dataset, h5py)
                if ms == "str":
                    entries[name], strings[name] = _str_entry(name, link, dataset, h5py)
                else:
                    entries[name] = _tensor_entry(name, link, dataset, ms, h5py, size)
    except MpickptError:
        raise
    except Exception as err:  # h5py's errors (OSError, KeyError, ValueError...) and ours
        where = f"dataset {name!r}" if name is not None else "file"
        raise CheckpointFormatError(f"{path}: not a readable HDF5 checkpoint ({where}: {err})") from None
    return entries, strings, metadata, crc


class H5Index(CheckpointIndex):
    """An indexed HDF5 file: the API of :class:`~mpickpt.ckpt_reader.CheckpointIndex` (byte runs memory
    mapped) plus its file attributes as ``metadata``; :class:`H5Entry` tensors are decoded by h5py on use
    (the last one kept until :meth:`release`)."""

    def __init__(self, path: Path, fd: int, size: int, entries: dict[str, TensorEntry],
                 strings: dict[str, np.ndarray], metadata: dict[str, str], crc: int | None) -> None:
        super().__init__(path, fd, size, entries, crc)
        self.metadata = metadata
        self._strings = strings
        self._loaded: tuple[str, np.ndarray] | None = None

    def _decoded(self, name: str) -> np.ndarray:
        """The content of an h5py-decoded tensor, as its stored numpy dtype."""
        if name in self._strings:
            return self._strings[name]
        if self._loaded is None or self._loaded[0] != name:
            self._loaded = None
            self._loaded = (name, self._load(self.entry(name)))
        return self._loaded[1]

    def _load(self, entry: TensorEntry) -> np.ndarray:
        assert isinstance(entry, H5Entry)
        try:
            with _open_h5(self.fileno()) as f:
                data = np.asarray(f[entry.link][()])
        except MpickptError:
            raise
        except Exception as err:
            raise CheckpointFormatError(f"{self.path}: cannot read dataset {entry.name!r}: {err}") from None
        data = data.astype(data.dtype.newbyteorder("<"), copy=False)
        out = np.ascontiguousarray(data).view(numpy_dtype(entry.dtype))
        if out.shape != entry.dims:
            raise CheckpointFormatError(f"{self.path}: dataset {entry.name!r} read as shape {out.shape}")
        out.flags.writeable = False
        return out

    def array(self, name: str) -> np.ndarray:
        """The parameter as a numpy array (see :meth:`CheckpointIndex.array`; read-only either way)."""
        if isinstance(self.entry(name), H5Entry):
            return self._decoded(name)
        return super().array(name)

    def raw(self, name: str) -> list[memoryview]:
        """Views of the content: the mapped byte runs, or one view of the decoded tensor."""
        if isinstance(self.entry(name), H5Entry):
            data = self._decoded(name)
            return [data.reshape(-1).view(np.uint8).data] if data.nbytes else []
        return super().raw(name)

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        """Copy bytes [byte_offset, byte_offset + len(out)) of the parameter's content."""
        entry = self.entry(name)
        if not isinstance(entry, H5Entry):
            super().read_into(name, byte_offset, out)
            return
        target = memoryview(out).cast("B")
        if byte_offset < 0 or byte_offset + len(target) > entry.nbytes:
            raise IndexError(f"{self.path}: bytes [{byte_offset}, {byte_offset + len(target)}) outside parameter "
                             f"{name!r} ({entry.nbytes} bytes)")
        flat = self._decoded(name).reshape(-1).view(np.uint8)
        target[:] = flat[byte_offset : byte_offset + len(target)].data

    def release(self, name: str) -> None:
        """Drop the tensor's mapped pages, or its decoded copy."""
        if self._loaded is not None and self._loaded[0] == name:
            self._loaded = None
        super().release(name)

    def computed_crc(self) -> int:
        """The CRC-32 of the content as the writer computes it (module doc)."""
        crc = 0
        for name in sorted(self.entries):
            crc = zlib.crc32(name.encode("utf-8"), crc)
            for view in self.raw(name):
                for start in range(0, len(view), COPY_CHUNK):
                    crc = zlib.crc32(view[start : start + COPY_CHUNK], crc)
            self.release(name)
        return crc


def index_h5(path: str | os.PathLike[str], verify_crc: bool = False) -> H5Index:
    """Index an HDF5 file (h5py reads its metadata, then the file is memory-mapped); ``verify_crc``
    checks ``mpickpt_crc32`` when the file has one (the whole file is read once)."""
    path = Path(path)
    fd, size = open_source_file(path, "HDF5 file")
    try:
        if os.pread(fd, len(SIGNATURE), 0) != SIGNATURE:
            raise CheckpointFormatError(f"{path}: not an HDF5 file (no HDF5 signature at its start)")
        index = H5Index(path, fd, size, *_read_index(path, fd, size))
    except BaseException:
        os.close(fd)
        raise
    if verify_crc and index.crc is not None and index.computed_crc() != index.crc:
        index.close()
        raise CheckpointFormatError(f"{path}: CRC check failed ({CRC_ATTR} {index.crc}); the file is damaged")
    return index
