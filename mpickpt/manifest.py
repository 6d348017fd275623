"""Completion records beside each output (`<file>.done.json`) and the run's `manifest.json`.

A completion record is written, atomically, only after its output was renamed into place. It covers the
whole job that made the file: the output's absolute path, size, checksum and parameter count, the task's
job key (a digest of everything but the sources that decides the content) and every source file by
absolute path, size, modification time, change time (ctime: unlike the modification time, no tool sets it back,
so a file rewritten in place with its size and time kept is noticed), device and inode. A rerun trusts an output only when all of these
still hold; otherwise `check_record` says why it is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from .atomic import write_bytes_atomic
from .errors import DestinationError
from .formats.offsets import crc32

RECORD_SUFFIX = ".done.json"
MANIFEST_NAME = "manifest.json"
CHUNK_BYTES = 1 << 20  # 1 MiB: stays in cache; measured fastest for both CRC-32 implementations here
RECORD_VERSION = 3
PATH_OPTIONS = ("src_dir", "dst_dir", "src_strategy", "dst_strategy", "src_strategy_dir", "dst_strategy_dir")

JOB_CHANGED = "the job changed (strategies, prefix, format, options or output path)"
SOURCES_CHANGED = "the sources changed"
OUTPUT_CHANGED = "the output changed"
OUTPUT_MISSING = "the output is missing"
NO_RECORD = "no valid completion record"


@dataclass(frozen=True)
class SourceStamp:
    """A source file as it was when an output was made from it."""

    path: str  # absolute
    size: int
    mtime_ns: int
    device: int
    inode: int
    ctime_ns: int


@dataclass(frozen=True)
class CompletionRecord:
    """What is known about one finished output file."""

    file: str  # the output's name, relative to the folder holding it and the record
    output: str  # the output's absolute path when it was made
    target_rank: int
    job_key: str
    size: int
    checksum: str  # "crc32:<8 hex digits>"
    params: int  # parameters (tensors) in the file
    source_ranks: tuple[int, ...]
    sources: tuple[SourceStamp, ...]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"version": RECORD_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompletionRecord:
        """Inverse of to_dict; KeyError/TypeError/ValueError on a malformed record."""
        if data.get("version") != RECORD_VERSION:
            raise ValueError(f"unknown record version {data.get('version')!r}")
        return cls(file=str(data["file"]), output=str(data["output"]), target_rank=int(data["target_rank"]),
                   job_key=str(data["job_key"]), size=int(data["size"]), checksum=str(data["checksum"]),
                   params=int(data["params"]), source_ranks=tuple(int(r) for r in data["source_ranks"]),
                   sources=tuple(SourceStamp(str(s["path"]), int(s["size"]), int(s["mtime_ns"]),
                                             int(s["device"]), int(s["inode"]), int(s["ctime_ns"]))
                                 for s in data["sources"]),
                   seconds=float(data["seconds"]))


@dataclass(frozen=True)
class RecordCheck:
    """What a rerun finds for one output: its record when the output is complete and current, else why
    it must be written ("" when neither the output nor a record is there: a new output)."""

    record: CompletionRecord | None
    reason: str


def checksum(path: str | os.PathLike[str]) -> str:
    """CRC-32 (zlib's polynomial) of a whole file, read in 1 MiB chunks, as "crc32:xxxxxxxx"."""
    crc = 0
    buf = bytearray(CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            crc = crc32(view[:n], crc)
    return checksum_text(crc)


class WrittenOutput(NamedTuple):
    """What the writer of an output knows of it once committed, so its record needs no read-back."""

    checksum: str  # as checksum() gives it
    params: int  # parameters written


def checksum_text(crc: int) -> str:
    """A file's CRC-32 as records hold it: "crc32:xxxxxxxx"."""
    return f"crc32:{crc:08x}"


def stamp_sources(paths: Iterable[str]) -> tuple[SourceStamp, ...]:
    """Absolute path, size, modification time, device, inode and change time of each source file now."""
    stamps = []
    for path in paths:
        st = os.stat(path)
        stamps.append(SourceStamp(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino,
                                  st.st_ctime_ns))
    return tuple(stamps)


def record_path(output: str | os.PathLike[str]) -> Path:
    """Where the completion record of `output` lives."""
    return Path(f"{os.fspath(output)}{RECORD_SUFFIX}")


def write_json_atomic(path: Path, data: Any, *, sync: bool) -> None:
    """Write JSON atomically (see mpickpt.atomic)."""
    write_bytes_atomic(path, (json.dumps(data, indent=1) + "\n").encode("utf-8"), sync=sync)


def write_record(output: str, record: CompletionRecord, *, sync: bool) -> None:
    """Write the completion record beside `output` (call only after `output` is complete under its name)."""
    write_json_atomic(record_path(output), record.to_dict(), sync=sync)


def read_record(output: str) -> CompletionRecord | None:
    """The completion record beside `output`, or None if it is missing or unreadable."""
    try:
        with open(record_path(output), encoding="utf-8") as f:
            return CompletionRecord.from_dict(json.load(f))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def remove_record(output: str) -> None:
    """Forget that `output` was complete (before it is rewritten)."""
    _remove(record_path(output), "completion record")


def _remove(path: Path, what: str) -> None:
    """Remove a file if it is there; DestinationError naming it when it cannot be (a read-only folder)."""
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise DestinationError(f"{path}: cannot remove the earlier {what}: {err.strerror or err}") from err


def check_record(output: str, target_rank: int, job_key: str, source_ranks: Iterable[int],
                 source_files: Iterable[str], stamps: tuple[SourceStamp, ...] = ()) -> RecordCheck:
    """Whether `output` is complete for this job: its record names the same output path, target rank, job
    key and source ranks, the same unchanged source files (as `stamps` gives them, else as they are now),
    and matches the file on disk (size, checksum)."""
    record = read_record(output)
    if record is None:
        return RecordCheck(None, NO_RECORD if os.path.lexists(output) else "")
    if (record.file, record.output, record.target_rank, record.job_key, record.source_ranks) != (
            os.path.basename(output), os.path.abspath(output), target_rank, job_key, tuple(source_ranks)):
        return RecordCheck(None, JOB_CHANGED)
    try:
        if record.sources != (stamps or stamp_sources(source_files)):
            return RecordCheck(None, SOURCES_CHANGED)
    except OSError:
        return RecordCheck(None, SOURCES_CHANGED)
    try:
        if os.stat(output).st_size != record.size or checksum(output) != record.checksum:
            return RecordCheck(None, OUTPUT_CHANGED)
    except OSError:
        return RecordCheck(None, OUTPUT_MISSING)
    return RecordCheck(record, "")


def options_record(options: object) -> dict[str, Any]:
    """Every field of a TransformOptions, its paths made absolute."""
    record = {f.name: getattr(options, f.name) for f in fields(options)}  # type: ignore[arg-type]
    for name in PATH_OPTIONS:
        if record.get(name):
            record[name] = os.path.abspath(record[name])
    return record


def content_hash(path: str) -> str:
    """"sha256:<hex>" of a file, or of a folder's files (names and contents, in name order)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for name in sorted(os.listdir(path)):
            if os.path.isfile(os.path.join(path, name)):
                digest.update(f"{name}\0{content_hash(os.path.join(path, name))}\0".encode())
    else:
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def strategy_hashes(options: object) -> dict[str, str | None]:
    """Content hashes of the source and target strategies given (a file, else a folder; None: none given)."""
    hashes: dict[str, str | None] = {}
    for side in ("src", "dst"):
        given = getattr(options, f"{side}_strategy", None) or getattr(options, f"{side}_strategy_dir", None)
        hashes[side] = content_hash(given) if given else None
    return hashes


def remove_manifest(dst_dir: str, name: str = MANIFEST_NAME) -> None:
    """Forget that dst_dir was complete (at the start of a run, which may change what it holds): remove its
    manifest (`name`)."""
    _remove(Path(dst_dir) / name, "run's manifest")


def write_manifest(dst_dir: str, manifest: dict[str, Any], *, sync: bool) -> Path:
    """Write `dst_dir/manifest.json` atomically; return its path."""
    path = Path(dst_dir) / MANIFEST_NAME
    write_json_atomic(path, manifest, sync=sync)
    return path
