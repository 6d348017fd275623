"""Convert checkpoints between ``.ckpt`` and safetensors as MindSpore 2.10's ``ckpt_to_safetensors`` and
``safetensors_to_ckpt`` do, streaming each tensor's bytes file to file.

What MindSpore does (``mindspore/train/serialization.py``, ``_convert_checkpoint_file``), and so this:

- ``file_path`` a file: it must end with the source suffix and, with ``file_name_regex``, match it
  (``re.findall`` on the whole path); the output is ``basename.replace(src_suffix, dst_suffix)`` in
  ``save_path`` (created if missing) or beside the source.
- ``file_path`` a folder: its immediate sub-folders whose names start with ``rank`` (an error if there
  is none); in each, the entries whose names end with the source suffix and, with ``file_name_regex``,
  match it (``re.search`` on the name). Each output is ``name.replace(src_suffix, dst_suffix)`` (every
  occurrence) in ``save_path/<rank folder>`` (every such folder created, even with nothing to convert)
  or beside its source.
- Content: the parameters of the source, renamed by ``name_map`` (``name_map.get(name, name)``); a
  safetensors output holds MindSpore's metadata (``{"format": "ms"}`` plus Int4 markers), a ``.ckpt``
  output lists the parameters in sorted source-name order (MindSpore's safetensors load order), neither
  has a CRC. Outputs are read-only (0400) and replace existing files atomically.

Deliberate differences, where MindSpore would lose data silently: a ``name_map`` sending two parameters
to one name, two sources with one output name, and an output that is one of the sources are refused;
a ``str`` value or a MapTensor cannot go into safetensors and is refused (CheckpointFormatError naming
the parameter); an empty tensor is kept in a ``.ckpt`` output (MindSpore's save drops it).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from mpickpt.errors import (
    CheckpointFormatError,
    DestinationError,
    MpickptError,
    SourceMissingError,
)
if TYPE_CHECKING:
    from mpickpt.mpi import Comm

from mpickpt.collective import broadcast_prepared, deal_by_size, fail
from mpickpt.formats import TensorEntry, TensorSpec, index_stamp, open_index, open_writer, refuse_if_changed, suffix_of
from mpickpt.shared_folders import SharedCheck, confirm_shared, leave_check

__all__ = ["ckpt_to_safetensors", "convert_file", "convert_files", "destination", "earlier_outputs",
           "output_folders", "plan_conversion", "run_convert", "safetensors_to_ckpt"]

_SOURCE_FORMAT = {"safetensors": "ckpt", "ckpt": "safetensors"}
_FUNCTION = {"safetensors": "ckpt_to_safetensors", "ckpt": "safetensors_to_ckpt"}

Pair = tuple[Path, Path, int]
"""(source file, output file, source bytes)."""


def ckpt_to_safetensors(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None = None,
                        name_map: Mapping[str, str] | None = None, file_name_regex: str | None = None,
                        processes_num: int = 1) -> None:
    """Convert a ``.ckpt`` file, or the ``rank*/`` folders of a checkpoint folder, to safetensors."""
    _convert(file_path, save_path, name_map, file_name_regex, processes_num, "safetensors")


def safetensors_to_ckpt(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None = None,
                        name_map: Mapping[str, str] | None = None, file_name_regex: str | None = None,
                        processes_num: int = 1) -> None:
    """Convert a safetensors file, or the ``rank*/`` folders of a checkpoint folder, to ``.ckpt``."""
    _convert(file_path, save_path, name_map, file_name_regex, processes_num, "ckpt")


def _convert(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None,
             name_map: Mapping[str, str] | None, file_name_regex: str | None, processes_num: int,
             to_format: str) -> None:
    if isinstance(processes_num, bool) or not isinstance(processes_num, int) or processes_num < 1:
        raise MpickptError(f"For {_FUNCTION[to_format]}, processes_num must be a positive integer, "
                           f"got {processes_num!r}")
    _check_name_map(name_map, to_format)
    pairs = plan_conversion(file_path, save_path, to_format, file_name_regex)
    for folder in output_folders(file_path, save_path):
        _make_folder(folder)
    convert_files(pairs, to_format, name_map=name_map, processes=processes_num)


def _check_name_map(name_map: object, to_format: str) -> None:
    if name_map is None:
        return
    if not isinstance(name_map, Mapping):
        raise MpickptError(f"For {_FUNCTION[to_format]}, name_map must be a dict, got {type(name_map).__name__}")
    bad = [key for key, value in name_map.items() if not isinstance(value, str)]
    if bad:
        raise MpickptError(f"For {_FUNCTION[to_format]}, name_map sends parameter {bad[0]!r} to a non-string name")


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DestinationError(f"{folder}: cannot create the output folder: {err.strerror or err}") from err


# -- planning -----------------------------------------------------------------------------------


def plan_conversion(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None, to_format: str,
                    file_name_regex: str | None = None) -> list[Pair]:
    """The (source, output, source bytes) of every file MindSpore would convert, checked (sources exist,
    outputs distinct and none of them a source); nothing is created."""
    if to_format not in _SOURCE_FORMAT:
        raise MpickptError(f"cannot convert to {to_format!r}")
    function = _FUNCTION[to_format]
    src = os.fspath(file_path)
    if save_path and os.path.splitext(os.fspath(save_path))[1]:
        raise DestinationError(f"For {function}, the save_path must be a directory, but got {os.fspath(save_path)!r}")
    if os.path.isdir(src):
        pairs = [(s, d) for folder, out in _rank_folders(src, save_path, function)
                 for s, d in _folder_pairs(folder, out, to_format, file_name_regex)]
    elif os.path.isfile(src):
        pairs = [_file_pair(src, save_path, to_format, file_name_regex)]
    else:
        raise SourceMissingError(f"For {function}, the input path must be a valid path or file, but got {src!r}")
    return _checked(pairs)


def output_folders(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None) -> list[Path]:
    """Folders MindSpore creates before converting: ``save_path`` for a file, every output rank folder
    for a folder (also those with nothing to convert)."""
    src = os.fspath(file_path)
    if os.path.isdir(src):
        return [out for _, out in _rank_folders(src, save_path, "conversion")]
    return [Path(save_path)] if save_path else []


def earlier_outputs(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None, to_format: str,
                    pairs: Sequence[Pair]) -> list[Path]:
    """Files of the output format in the output rank folders of a folder conversion that are not outputs of
    `pairs` (an earlier run's, left as they are)."""
    if not os.path.isdir(os.fspath(file_path)):
        return []
    ours = {os.path.abspath(dst) for _, dst, _ in pairs}
    return [path for folder in output_folders(file_path, save_path) if folder.is_dir()
            for path in sorted(folder.iterdir())
            if path.name.endswith(suffix_of(to_format)) and path.is_file() and os.path.abspath(path) not in ours]


def destination(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None) -> str:
    """The folder holding every output (or their rank folders): ``save_path``, else the source folder, or
    the source file's folder."""
    src = os.fspath(file_path)
    if os.path.isdir(src):
        return os.fspath(save_path) if save_path is not None else src
    return os.fspath(save_path) if save_path else os.path.dirname(os.path.abspath(src))


def _rank_folders(src: str, save_path: str | os.PathLike[str] | None, function: str) -> list[tuple[Path, Path]]:
    """(source rank folder, output folder) of each immediate sub-folder named ``rank*``."""
    with os.scandir(src) as found:
        names = sorted(e.name for e in found if e.is_dir() and e.name.startswith("rank"))
    if not names:
        raise SourceMissingError(f"For {function}, no directories starting with 'rank' found in {src}.")
    return [(Path(src, name), Path(save_path, name) if save_path is not None else Path(src, name))
            for name in names]


def _folder_pairs(folder: Path, out: Path, to_format: str, regex: str | None) -> list[tuple[Path, Path]]:
    src_suffix, dst_suffix = suffix_of(_SOURCE_FORMAT[to_format]), suffix_of(to_format)
    return [(folder / name, out / name.replace(src_suffix, dst_suffix)) for name in sorted(os.listdir(folder))
            if name.endswith(src_suffix) and (regex is None or re.search(regex, name))]


def _file_pair(src: str, save_path: str | os.PathLike[str] | None, to_format: str,
               regex: str | None) -> tuple[Path, Path]:
    src_suffix, dst_suffix = suffix_of(_SOURCE_FORMAT[to_format]), suffix_of(to_format)
    function = _FUNCTION[to_format]
    if not src.endswith(src_suffix):
        raise MpickptError(f"For {function}, the input file must be a {src_suffix} file, but got {src}")
    if regex is not None and not re.findall(regex, src):
        raise MpickptError(f"For {function}, the input file {src} does not match the regular expression {regex!r}")
    name = os.path.basename(src).replace(src_suffix, dst_suffix)
    return Path(src), Path(save_path if save_path else os.path.dirname(src), name)


def _checked(pairs: list[tuple[Path, Path]]) -> list[Pair]:
    """Sizes added; refuses two sources with one output, and an output that is (a link to) a source."""
    sources = {}
    for src, _ in pairs:
        try:
            info = src.stat()
        except OSError as err:
            raise SourceMissingError(f"{src}: cannot read the source: {err.strerror or err}") from err
        sources[(info.st_dev, info.st_ino)] = src
    seen: dict[str, Path] = {}
    out: list[Pair] = []
    for src, dst in pairs:
        key = os.path.realpath(dst)
        if key in seen:
            raise DestinationError(f"{dst}: both {seen[key]} and {src} would be converted to this file")
        seen[key] = src
        try:
            existing = dst.stat()
        except OSError:
            existing = None
        if existing is not None and (existing.st_dev, existing.st_ino) in sources:
            raise DestinationError(f"{dst}: refusing to replace source file "
                                   f"{sources[(existing.st_dev, existing.st_ino)]}")
        out.append((src, dst, src.stat().st_size))
    return out


# -- converting ---------------------------------------------------------------------------------


def convert_files(pairs: Sequence[Pair], to_format: str, *, name_map: Mapping[str, str] | None = None,
                  sync: bool = True, processes: int = 1) -> None:
    """Convert every (source, output, bytes) pair; with ``processes`` > 1 in a process pool, largest first."""
    jobs = sorted(pairs, key=lambda pair: -pair[2])
    if processes == 1 or len(jobs) < 2:
        for src, dst, _ in jobs:
            convert_file(src, dst, to_format, name_map=name_map, sync=sync)
        return
    with ProcessPoolExecutor(max_workers=min(processes, len(jobs))) as pool:
        futures = [pool.submit(convert_file, src, dst, to_format, name_map=name_map, sync=sync)
                   for src, dst, _ in jobs]
        for future in futures:
            future.result()


def convert_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], to_format: str, *,
                 name_map: Mapping[str, str] | None = None, sync: bool = True) -> None:
    """Convert one file to ``to_format`` (the source's format: the other one), copying each tensor's bytes
    in the kernel; ``dst`` appears atomically, read-only."""
    if to_format not in _SOURCE_FORMAT:
        raise MpickptError(f"cannot convert to {to_format!r}")
    if os.path.exists(dst) and os.path.samefile(src, dst):
        raise DestinationError(f"{dst}: refusing to replace source file {src}")
    with open_index(src, fmt=_SOURCE_FORMAT[to_format]) as index:
        opened = index_stamp(index)
        renamed = _renamed(index.path, index.entries, name_map, sort=to_format == "ckpt")
        with open_writer(dst, to_format, sync=sync) as writer:
            writer.declare([TensorSpec(new, e.dtype, e.dims, e.nbytes, e.kind) for new, e in renamed])
            for new, entry in renamed:
                if entry.kind != "tensor":
                    writer.write_maptensor(new, index.raw(entry.name))
                elif not entry.pieces:  # a value with no byte run in the file (e.g. an HDF5 string)
                    writer.write_tensor_chunks(new, entry.dtype, entry.dims, entry.nbytes, index.raw(entry.name))
                else:
                    writer.copy_tensor_segments(new, entry.dtype, entry.dims,
                                                [(index.fileno(), offset, length) for offset, length in entry.pieces])
            refuse_if_changed(index, opened)  # before the output commits


def _renamed(path: Path, entries: Mapping[str, TensorEntry], name_map: Mapping[str, str] | None,
             sort: bool) -> list[tuple[str, TensorEntry]]:
    """(output name, entry) in MindSpore's order: file order, or sorted source names (safetensors load)."""
    names = sorted(entries) if sort else list(entries)
    owner: dict[str, str] = {}
    out = []
    for name in names:
        new = name_map.get(name, name) if name_map is not None else name
        if new in owner:
            raise CheckpointFormatError(f"{path}: name_map gives parameters {owner[new]!r} and {name!r} the same "
                                        f"name {new!r}")
        owner[new] = name
        out.append((new, entries[name]))
    return out


def run_convert(file_path: str | os.PathLike[str], save_path: str | os.PathLike[str] | None, to_format: str,
                comm: Comm, *, file_name_regex: str | None = None, sync: bool = True) -> list[Pair]:
    """Called on every process (`mpickpt convert`): rank 0 plans and makes the output folders, every process
    confirms it sees the sources and the destination rank 0 planned with (mpickpt.shared_folders), the files
    are dealt to processes by size, each converts its share; returns every pair converted, on every rank.
    Finding no file to convert is an error (the Python functions, like MindSpore's, then do nothing)."""

    def prepare() -> tuple[list[Pair], SharedCheck | None]:
        pairs = plan_conversion(file_path, save_path, to_format, file_name_regex)
        if not pairs:  # MindSpore's functions then do nothing; a command that converts nothing is a mistake
            matching = f" matching {file_name_regex!r}" if file_name_regex else ""
            raise SourceMissingError(f"{file_path}: no {suffix_of(_SOURCE_FORMAT[to_format])} file{matching} in "
                                     f"its rank folders, nothing to convert to {to_format}")
        for folder in output_folders(file_path, save_path):
            _make_folder(folder)
        return pairs, leave_check("convert", [str(src) for src, _, _ in pairs], destination(file_path, save_path),
                                  comm.size)

    pairs, check = broadcast_prepared(prepare, comm)
    confirm_shared(check, comm)
    current: Pair | None = None
    try:
        for current in deal_by_size(pairs, lambda pair: pair[2], comm.size)[comm.rank]:
            convert_file(current[0], current[1], to_format, sync=sync)
        comm.send(None, 0)
        if comm.rank == 0:
            done = 0
            while done < comm.size:  # every process has finished its share
                done += len(comm.poll())
                time.sleep(0.02)
    except BaseException as exc:
        fail(comm, exc, f"process {comm.rank}" + (f" ({current[0]})" if current else ""))
    comm.flush()
    return comm.bcast(pairs, root=0)  # every rank already has rank 0's list: the bcast is the end barrier
