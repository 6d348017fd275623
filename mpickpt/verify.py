"""`mpickpt verify`: prove a conversion's outputs right, independently of the planner and the executor.

With sources (`verify_outputs`): for every output file and parameter, the target's box in the full tensor
comes from the target layout; every source file holding the parameter gives its own box from the source
layout; wherever the two overlap, the bytes must be equal (compared byte for byte, one bounded block of rows
of the overlap at a time, so memory stays within a few blocks however large the tensors).
Every target box must be covered by source files; parameters outside the strategies must equal the value
of a source file holding them; each output must hold exactly the expected parameters, dtypes and dims, and
match the checksum it stores of itself, if any (`--crc`).

Without sources (`verify_records`): every output listed in `manifest.json` must match its completion
record and its manifest entry (size, CRC-32), and every checkpoint file of the destination must be listed.

Under MPI, or with `{host}`/`{process}` in --src-dir or --dst-dir, every process takes part in the start-up
`transform` takes (mpickpt/startup.py: each expands the folders and lists what it sees; the views and headers
are gathered) without locking or writing anything. Each output is checked by a process that sees it (with a
per-process --dst-dir, the process whose folder holds it); the source rows it does not see come over MPI from a
process that does (mpickpt/exchange.py), so every overlap is compared whoever holds the file. Rank 0 gathers
what the processes found; an exception in any process aborts the whole run.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self, cast

import numpy as np

from .collective import agree, broadcast_prepared, deal_by_size, fail
from .dtypes import dtype_itemsize
from .errors import MpickptError
from .exchange import Exchange, RemoteSource, header_entries
from .execute import Piece
from .formats import SourceIndex, TensorEntry, open_index
from .inventory import SourceHeaders
from .layout import Box, Layouts, ParamLayout
from .manifest import MANIFEST_NAME, checksum, read_record
from .mpi import Comm
from .placement import has_placeholders
from .startup import survey_job
from .strategy import Strategy
from .transform import TransformJob, TransformOptions

BLOCK_BYTES = 1 << 20  # rows read per comparison step: at most this many bytes of each side (or one row)
OPEN_SOURCES = 32  # source files kept open per process
POLL_SECONDS = 0.02
NOT_RUN = 2  # exit status when the check could not run (1: an output does not match)
SHOWN_PROBLEMS = 100  # problems printed one per line; the summary counts them all
OUTPUT_SUFFIXES = (".ckpt", ".safetensors")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one output file (and parameter, where it concerns one)."""

    file: str
    param: str | None
    text: str

    def __str__(self) -> str:
        where = f"{self.file}: parameter {self.param!r}" if self.param is not None else self.file
        return f"{where}: {self.text}"


@dataclass(frozen=True)
class Check:
    """One output file to check: its path, the target rank it holds (None without sources), its size."""

    path: str
    target_rank: int | None
    size: int


@dataclass(frozen=True)
class Verdict:
    """What a whole verification found (the same on every process)."""

    files: int
    params: int
    problems: tuple[Problem, ...]
    seconds: float
    processes: int

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self, limit: int = SHOWN_PROBLEMS) -> list[str]:
        """One line per problem (the first `limit`), then a summary line."""
        what = f"{self.files} files" + (f", {self.params} parameters" if self.params else "")
        took = f"by {self.processes} process{'es' if self.processes != 1 else ''} in {self.seconds:.2f} s"
        if self.ok:
            return [f"mpickpt: verify: OK: {what} match {took}"]
        lines = [f"mpickpt: verify: MISMATCH: {p}" for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"mpickpt: verify: ... and {len(self.problems) - limit} more problems")
        bad = len({p.file for p in self.problems})
        count = f"{len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"
        summary = f"mpickpt: verify: FAILED: {bad} of {what} do not match ({count}) {took}"
        return [*lines, summary]


@dataclass(frozen=True)
class ContentJob:
    """Outputs to re-derive from the sources (plain, picklable data)."""

    src: Strategy | None
    dst: Strategy | None
    src_stage: int | None  # set for the pipeline subnetwork transform (see mpickpt.transform)
    rank_files: dict[int, str]
    checks: tuple[Check, ...]
    found: tuple[Problem, ...] = ()
    remote_headers: dict[int, SourceHeaders] = field(default_factory=dict)  # of rank files other processes see


@dataclass(frozen=True)
class RecordsJob:
    """Outputs to compare with their completion records and the manifest."""

    manifest: dict[str, dict[str, object]]  # path -> its manifest entry
    checks: tuple[Check, ...]
    found: tuple[Problem, ...] = ()  # files on disk the manifest does not list


Job = ContentJob | RecordsJob


# --- running on every process -------------------------------------------------------------------------


def verify_outputs(options: TransformOptions, comm: Comm) -> Verdict:
    """Called on all ranks: check every output of `options` against the sources (gathered from every process
    under MPI or with {host}/{process} in a folder)."""
    if comm.size == 1 and not has_placeholders(options.src_dir) and not has_placeholders(options.dst_dir):
        return run(lambda: content_job(options), comm)
    started = time.monotonic()
    job, seers, exchange = gathered_job(options, comm)
    return _check(job, deal(job.checks, comm.size, seers)[comm.rank], comm, started, exchange)


def verify_records(dst_dir: str, comm: Comm) -> Verdict:
    """Called on all ranks: check every output of `dst_dir` against its record and `manifest.json`."""
    return run(lambda: records_job(dst_dir), comm)


def run(prepare: Callable[[], Job], comm: Comm) -> Verdict:
    """Rank 0 prepares the job; every process checks its share; rank 0 gathers; all return the verdict."""
    started = time.monotonic()
    job = broadcast_prepared(prepare, comm)
    return _check(job, deal(job.checks, comm.size)[comm.rank], comm, started)


def _check(job: Job, mine: Sequence[Check], comm: Comm, started: float, exchange: Exchange | None = None) -> Verdict:
    """Check this process's share (serving others' requests for source rows until every process is done);
    rank 0 gathers; all return the verdict."""
    try:
        params, problems = 0, []
        with _checker(job, exchange) as checker:
            for check in mine:
                count, found = checker(check)
                params += count
                problems += found
            if exchange is not None:
                exchange.finish()
        comm.send((params, problems), 0)
        verdict = _gather(job, comm, started) if comm.rank == 0 else None
    except BaseException as exc:
        fail(comm, exc, f"verify: process {comm.rank}", status=NOT_RUN)
    comm.flush()
    return cast(Verdict, comm.bcast(verdict, root=0))  # rank 0 always has one here


def _gather(job: Job, comm: Comm, started: float) -> Verdict:
    """Rank 0: wait for every process's findings."""
    reports: list[tuple[int, list[Problem]]] = []
    while len(reports) < comm.size:
        reports += [payload for _, payload in comm.poll()]
        if len(reports) < comm.size:
            time.sleep(POLL_SECONDS)
    problems = list(job.found) + [p for _, found in reports for p in found]
    problems.sort(key=lambda p: (p.file, p.param or ""))
    files = {c.path for c in job.checks} | {p.file for p in job.found}
    return Verdict(len(files), sum(count for count, _ in reports), tuple(problems), time.monotonic() - started,
                   comm.size)


def deal(checks: Sequence[Check], processes: int,
         seers: Sequence[Sequence[int]] | None = None) -> list[list[Check]]:
    """Checks per process: largest file first onto the process with the fewest bytes so far (ties: fewer
    checks, lower process), among the processes that see it (`seers[i]` for `checks[i]`; None: all)."""
    indexed = sorted(range(len(checks)), key=lambda i: checks[i].path)
    shares = deal_by_size(indexed, lambda i: checks[i].size, processes,
                          None if seers is None else lambda i: seers[i])
    return [[checks[i] for i in share] for share in shares]


def _checker(job: Job, exchange: Exchange | None = None
             ) -> AbstractContextManager[Callable[[Check], tuple[int, list[Problem]]]]:
    """What checks one output of this job: (parameters checked, problems found)."""
    if isinstance(job, RecordsJob):
        return nullcontext(lambda check: (0, check_record(check, job.manifest[check.path])))
    return ContentChecker(job, exchange)


# --- preparing (rank 0) ----------------------------------------------------------------------------


def content_job(options: TransformOptions) -> ContentJob:
    """Strategies, source files and output paths as `transform` would find them (nothing is written)."""
    job = TransformJob.prepare(options, write_merged=False)
    checks, missing = [], []
    for task in job.tasks:
        if os.path.isfile(task.path):
            checks.append(Check(task.path, task.target_rank, os.path.getsize(task.path)))
        else:
            missing.append(Problem(task.path, None, f"output of target rank {task.target_rank} is missing"))
    return ContentJob(job.src, job.dst, job.src_stage, dict(job.rank_files), tuple(checks), tuple(missing))


def gathered_job(options: TransformOptions,
                 comm: Comm) -> tuple[ContentJob, list[tuple[int, ...]], Exchange | None]:
    """Called on all ranks: the outputs to check, gathered from what every process sees (as `transform` starts,
    but locking and writing nothing), the processes that see each, and the exchange of source rows when some
    process lacks a source file."""
    survey = survey_job(options, comm)
    job = survey.job
    seen = agree(lambda: [(t.target_rank, t.path, os.path.getsize(t.path) if os.path.isfile(t.path) else None)
                          for t in job.tasks], comm)
    checks, seers, missing = output_checks(seen, has_placeholders(options.dst_dir), options.dst_dir)
    local = job.local_files if job.local_files is not None else {}
    content = ContentJob(job.src, job.dst, job.src_stage, {**job.rank_files, **local}, tuple(checks),
                         tuple(missing), dict(job.remote_headers))
    return content, seers, job.exchange


def output_checks(seen: Sequence[Sequence[tuple[int, str, int | None]]], per_process: bool, template: str
                  ) -> tuple[list[Check], list[tuple[int, ...]], list[Problem]]:
    """From each process's (target, output path, size or None when absent): the checks, the processes that
    see each, and the outputs no process sees. One shared folder: one check per target, by any process seeing
    it; a folder per process (`per_process`): every output each process holds, checked by that process."""
    checks: list[Check] = []
    seers: list[tuple[int, ...]] = []
    found: dict[int, list[int]] = {}
    for process, outputs in enumerate(seen):
        for target, path, size in outputs:
            if size is None:
                continue
            found.setdefault(target, []).append(process)
            if per_process:
                checks.append(Check(path, target, size))
                seers.append((process,))
    if not per_process:
        for target, path, size in seen[0]:
            holders = tuple(found.get(target, ()))
            if holders:
                size = next(s for t, _, s in seen[holders[0]] if t == target)
                checks.append(Check(path, target, cast(int, size)))
                seers.append(holders)
    missing = []
    for target, path, _ in seen[0]:
        if target not in found:
            text = f"output of target rank {target} is missing"
            if per_process:
                text += (f" (in no process's expansion of {template}" +
                         ("; serially only process 0's: verify under mpiexec with the processes that wrote the "
                          "outputs)" if len(seen) == 1 else ")"))
            missing.append(Problem(path, None, text))
    return checks, seers, missing


def records_job(dst_dir: str) -> RecordsJob:
    """The outputs `dst_dir/manifest.json` lists, and the output files on disk it does not list."""
    root = Path(dst_dir)
    if not root.is_dir():
        raise MpickptError(f"{dst_dir}: the output folder does not exist")
    path = root / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        command = manifest.get("command", "transform") if isinstance(manifest, dict) else "transform"
        if command != "transform":
            raise MpickptError(f"{path}: written by `mpickpt {command}`, whose manifest holds no checksums; "
                               f"verify --dst-dir checks the outputs of `mpickpt transform` only")
        listed = {str(root / entry["file"]): entry for entry in manifest["files"]}
    except FileNotFoundError:
        raise MpickptError(f"{path} does not exist: without it only a check against the sources can verify "
                           f"{dst_dir} (give --src-dir and the strategies)") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MpickptError(f"{path}: not a readable manifest ({type(exc).__name__}: {exc})") from None
    checks = tuple(Check(p, None, os.path.getsize(p) if os.path.isfile(p) else 0) for p in listed)
    unlisted = tuple(Problem(str(p), None, f"is not listed in {path}") for p in _output_files(root)
                     if str(p) not in listed)
    return RecordsJob(listed, checks, unlisted)


def _output_files(root: Path) -> list[Path]:
    """Checkpoint files in the rank folders of an output folder."""
    return sorted(p for p in root.glob("rank_*/*") if p.is_file() and p.name.endswith(OUTPUT_SUFFIXES))


# --- without sources: records and manifest ------------------------------------------------------------


def check_record(check: Check, entry: dict[str, object]) -> list[Problem]:
    """An output against its completion record and its manifest entry."""
    path = check.path
    if not os.path.isfile(path):
        return [Problem(path, None, "is listed in manifest.json but missing")]
    record = read_record(path)
    if record is None:
        return [Problem(path, None, "has no readable completion record")]
    problems = []
    size, crc = os.path.getsize(path), checksum(path)
    for what, recorded_size, recorded_crc in (("its completion record", record.size, record.checksum),
                                              ("manifest.json", entry.get("size"), entry.get("checksum"))):
        if (size, crc) != (recorded_size, recorded_crc):
            problems.append(Problem(path, None, f"changed: {size} bytes, {crc} on disk, but {what} says "
                                                f"{recorded_size} bytes, {recorded_crc}"))
    return problems


# --- with sources: re-deriving every slice --------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What one output holds for one parameter. `box` and `layout` set: the box of the full tensor
    (`shape`) made from the sources of `layout` in source stage `stage`; unset: a value copied whole."""

    dtype: str
    dims: tuple[int, ...]
    shape: tuple[int, ...] = ()
    box: Box | None = None
    layout: ParamLayout | None = None
    stage: int = 0


class ContentChecker:
    """Checks output files of one process against the sources; keeps source headers and a few files open."""

    def __init__(self, job: ContentJob, exchange: Exchange | None = None) -> None:
        self.src = Layouts.from_strategy(job.src, stage=job.src_stage)
        self.dst = Layouts.from_strategy(job.dst)
        self.rank_files = {r: p for r, p in job.rank_files.items() if self._is_source(r)}
        self.remote = {r: h for r, h in job.remote_headers.items() if r in self.rank_files}
        if self.remote and exchange is None:
            raise MpickptError(f"the files of source ranks {sorted(self.remote)} are on other processes, "
                               "but no exchange brings their rows")
        self.exchange = exchange
        self.headers: dict[int, dict[str, TensorEntry]] = {}
        for rank, path in sorted(self.rank_files.items()):
            if rank in self.remote:
                self.headers[rank] = header_entries(self.remote[rank])
                continue
            with open_index(path) as index:
                self.headers[rank] = dict(index.entries)
        self.holders: dict[str, list[int]] = {}  # parameter -> source ranks holding it: seen here first, ascending
        for rank, entries in sorted(self.headers.items(), key=lambda item: (item[0] in self.remote, item[0])):
            for name in entries:
                self.holders.setdefault(name, []).append(rank)
        self._target = 0  # the target rank being checked (spreads requests for remote rows over replicas)
        self._open: OrderedDict[int, SourceIndex] = OrderedDict()
        self._boxes: dict[tuple[ParamLayout, tuple[int, ...]], dict[Box, list[int]]] = {}

    def __call__(self, check: Check) -> tuple[int, list[Problem]]:
        """Parameters checked in one output file, and what is wrong with it."""
        assert check.target_rank is not None
        self._target = check.target_rank
        try:
            index = open_index(check.path, verify_crc=True)  # MindSpore refuses a file whose checksum is wrong
        except MpickptError as exc:
            return 0, [Problem(check.path, None, f"cannot be read: {exc}")]
        with index:
            expected, problems = {}, []
            for name in self.holders:
                try:
                    found = self.expected(name, check.target_rank)
                except MpickptError as exc:
                    problems.append(Problem(check.path, name, f"cannot be derived from the sources: {exc}"))
                    continue
                if found is not None:
                    expected[name] = found
            derived = {p.param for p in problems}
            problems += [Problem(check.path, name, "is in the output but not expected (the sources and strategies "
                                                   f"give target rank {check.target_rank} no such parameter)")
                         for name in index.entries if name not in expected and name not in derived]
            for name, want in expected.items():
                if self.exchange is not None:
                    self.exchange.serve()  # other processes may wait for rows of the files this one sees
                text = self.compare(index, name, want)
                if text:
                    problems.append(Problem(check.path, name, text))
        return len(expected), problems

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _is_source(self, rank: int) -> bool:
        """Whether the source layouts have this rank (an unsharded source is rank 0; an unmerged stage
        file of the pipeline subnetwork transform has the ranks of its stage)."""
        return rank < self.src.device_count and self.src.stage_of(rank) in self.src.stages

    def close(self) -> None:
        """Close the source files kept open."""
        for index in self._open.values():
            index.close()
        self._open.clear()

    # -- what a target holds --

    def expected(self, name: str, target: int) -> Expected | None:
        """What target rank `target` holds of source parameter `name` (None: nothing), by MindSpore's rules:
        laid out by both strategies (a missing strategy lays out everything whole): the target's box, if
        the target's pipeline stage holds it; laid out by the source only: the slice of source rank
        `local % source devices per stage` in the lowest source stage holding it; absent from the source
        strategy: the stored value, whole. Sources shared by stages are read from the lowest stage."""
        src, dst = self.src, self.dst
        holders = self.holders[name]
        if not src.unsharded and name not in src.names:
            entry = self.headers[holders[0]][name]
            return Expected(entry.dtype, entry.dims)
        stage = src.stages_of(name)[0]
        ref = self._reference(name, holders, stage)
        entry = self.headers[ref][name]
        layout = src.layout(name, stage, len(entry.dims))
        shape = src.full_shape(name, entry.dims, ref)
        if dst.unsharded or (src.unsharded and not dst.holds(name)):
            box: Box | None = Box.full(shape)
        elif dst.holds(name):
            box = dst.slice_box(name, shape, target)
        else:
            local = target % dst.stage_device_num % src.stage_device_num
            box = src.slice_box(name, shape, stage * src.stage_device_num + local)
        if box is None:
            return None
        return Expected(entry.dtype, box.shape, shape, box, layout, stage)

    def _reference(self, name: str, holders: list[int], stage: int) -> int:
        """The lowest source rank of `stage` whose file holds `name`."""
        for rank in sorted(holders):
            if self.src.stage_of(rank) == stage:
                return rank
        raise MpickptError(f"no source file of pipeline stage {stage} holds it (files holding it: "
                           f"{[self.rank_files[r] for r in holders]})")

    # -- comparing --

    def compare(self, index: SourceIndex, name: str, want: Expected) -> str | None:
        """What is wrong with one parameter of an output, or None."""
        entry = index.entries.get(name)
        if entry is None:
            return f"is missing (expected {want.dtype}{list(want.dims)})"
        if (entry.dtype, tuple(entry.dims)) != (want.dtype, want.dims):
            return f"is {entry.dtype}{list(entry.dims)}, expected {want.dtype}{list(want.dims)}"
        if want.box is None:
            return self._compare_whole(index, entry)
        return self._compare_box(index, entry, want)

    def _compare_whole(self, index: SourceIndex, entry: TensorEntry) -> str | None:
        """A value copied whole: equal to that of at least one source file holding it."""
        compared = []
        for rank in self.holders[entry.name]:
            theirs = self.headers[rank][entry.name]
            if (theirs.dtype, theirs.dims, theirs.nbytes) != (entry.dtype, entry.dims, entry.nbytes):
                continue
            flat = (entry.nbytes,)
            difference = _first_difference(index, entry.name, flat, Box.full(flat), self._source(rank), flat,
                                           Box.full(flat), 1)
            if difference is None:
                return None
            compared.append(f"{self.rank_files[rank]} (first at byte {difference[0]})")
        if not compared:
            return "no source file holds a value of this dtype and dims"
        return f"differs from the value in every source file holding it: {', '.join(compared)}"

    def _compare_box(self, index: SourceIndex, entry: TensorEntry, want: Expected) -> str | None:
        """A box of the full tensor: equal to every source slice overlapping it, and covered by them."""
        assert want.box is not None and want.layout is not None
        target = want.box
        if target.size == 0:
            return None
        itemsize = dtype_itemsize(entry.dtype)
        covered = 0
        for piece, local_ranks in self._slices(want.layout, want.shape).items():
            part = target.intersect(piece)
            if part is None:
                continue
            ranks = [want.stage * self.src.stage_device_num + r for r in local_ranks]
            files = [r for r in ranks if r in self.headers and entry.name in self.headers[r]]
            if not files:
                return (f"no source file holds region {part} of the full tensor (source ranks {ranks} should: "
                        "their files are missing or lack the parameter)")
            covered += part.size
            for rank in files:
                theirs = self.headers[rank][entry.name]
                if (theirs.dtype, theirs.dims) != (entry.dtype, piece.shape):
                    return (f"source file {self.rank_files[rank]} holds {theirs.dtype}{list(theirs.dims)}, but the "
                            f"source layout gives rank {rank} {entry.dtype}{list(piece.shape)}")
                ours = part.relative_to(target)
                difference = _first_difference(index, entry.name, entry.dims, ours, self._source(rank), theirs.dims,
                                               part.relative_to(piece), itemsize)
                if difference is not None:
                    at = [d + a for d, a in zip(difference, ours.start)]
                    full = [d + a for d, a in zip(difference, part.start)]
                    return (f"element {at} of the slice (element {full} of the full tensor, box {target}) "
                            f"differs from source file {self.rank_files[rank]}")
        if covered != target.size:
            return f"the source slices cover {covered} of the {target.size} elements of box {target}"
        return None

    def _slices(self, layout: ParamLayout, shape: tuple[int, ...]) -> dict[Box, list[int]]:
        """Each distinct box of the full tensor the layout gives, with the stage-local ranks holding it."""
        key = (layout, shape)
        if key not in self._boxes:
            boxes: dict[Box, list[int]] = {}
            for rank in range(layout.device_num):
                boxes.setdefault(layout.box(shape, rank), []).append(rank)
            self._boxes[key] = boxes
        return self._boxes[key]

    def _source(self, rank: int) -> SourceIndex | RemoteSlices:
        """Source file of `rank`, opened (at most OPEN_SOURCES stay open), or its rows over MPI."""
        if rank in self.remote:
            assert self.exchange is not None
            return RemoteSlices(self.exchange, rank, self.remote[rank], self._target)
        if rank in self._open:
            self._open.move_to_end(rank)
        else:
            if len(self._open) >= OPEN_SOURCES:
                self._open.popitem(last=False)[1].close()
            self._open[rank] = open_index(self.rank_files[rank])
        return self._open[rank]


class RemoteSlices:
    """A source file another process sees, as `_blocks` reads it: each run of whole rows of a stored slice is
    asked of a process seeing the file and received over MPI (mpickpt/exchange.py)."""

    def __init__(self, exchange: Exchange, rank: int, headers: SourceHeaders, target: int) -> None:
        self.exchange = exchange
        self.rank = rank
        self.headers = headers
        self.entries = header_entries(headers)
        self.target = target
        self._whole: tuple[str, bytearray] | None = None  # the last parameter received whole

    def read_into(self, name: str, offset: int, out: memoryview) -> None:
        """Bytes [offset, offset + len(out)) of parameter `name`'s stored content into `out`: whole rows of the
        stored slice as asked, else (a value compared byte by byte, a 0-d one) from its whole content."""
        entry = self.entries[name]
        source = RemoteSource(self.exchange, {self.rank: self.headers})
        itemsize = dtype_itemsize(entry.dtype)
        row = _row_bytes(entry.dims, itemsize) if entry.dims else 0
        if not row or offset % row or len(out) % row:
            if self._whole is None or self._whole[0] != name:
                piece = Piece(self.rank, name, None, entry.nbytes)
                source.ask([piece], self.target)
                self._whole = (name, source.whole(piece))
            out[:] = self._whole[1][offset:offset + len(out)]
            return
        first, count = offset // row, len(out) // row
        piece = Piece(self.rank, name, Box((first, *[0] * (len(entry.dims) - 1)), (first + count, *entry.dims[1:])),
                      len(out))
        source.ask([piece], self.target)
        source.fill(piece, np.frombuffer(out, np.uint8).reshape(count, *entry.dims[1:], itemsize))

    def release(self, name: str) -> None:
        """Nothing is mapped here."""

    def close(self) -> None:
        """Nothing is open here."""


# --- bounded block comparison ------------------------------------------------------------------------------


def _first_difference(ours: SourceIndex, name: str, our_dims: Sequence[int], our_box: Box,
                      theirs: SourceIndex | RemoteSlices,
                      their_dims: Sequence[int], their_box: Box, itemsize: int) -> tuple[int, ...] | None:
    """Index (relative to the boxes) of the first element where equally shaped boxes of two stored slices of
    parameter `name` differ, or None; read and compared a block of at most BLOCK_BYTES per side at a time."""
    rows = max(1, BLOCK_BYTES // max(_row_bytes(our_dims, itemsize), _row_bytes(their_dims, itemsize), 1))
    blocks = zip(_blocks(ours, name, our_dims, our_box, itemsize, rows),
                 _blocks(theirs, name, their_dims, their_box, itemsize, rows))
    for (first, mine), (_, other) in blocks:
        if np.array_equal(mine, other):
            continue
        index = np.argwhere(mine != other)[0][:-1]
        index[0] += first
        return tuple(int(i) for i in index[: len(our_box.shape)])
    return None


def _row_bytes(dims: Sequence[int], itemsize: int) -> int:
    return math.prod(dims[1:]) * itemsize


def _blocks(index: SourceIndex | RemoteSlices, name: str, dims: Sequence[int], box: Box, itemsize: int,
            rows: int) -> Iterator[tuple[int, np.ndarray]]:
    """A box of a stored slice of dims `dims`, `rows` rows at a time: (first row, relative to the box; the
    rows as bytes shaped (rows, *box.shape[1:], itemsize)). A 0-d slice is one row of one element."""
    dims = tuple(dims) or (1,)
    if not box.shape:
        box = Box((0,), (1,))
    row = _row_bytes(dims, itemsize)
    inner = tuple(slice(a, b) for a, b in zip(box.start[1:], box.stop[1:]))
    for first in range(box.start[0], box.stop[0], rows):
        count = min(rows, box.stop[0] - first)
        data = np.empty(count * row, np.uint8)
        index.read_into(name, first * row, data.data)
        index.release(name)  # the block is a copy: drop the mapped pages it came from
        yield first - box.start[0], data.reshape(count, *dims[1:], itemsize)[(slice(None), *inner)]
