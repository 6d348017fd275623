"""`mpickpt verify`: prove a conversion's outputs right, independently of the planner and the executor.

With sources (`verify_outputs`): for every output file and parameter, the target's box in the full tensor
comes from the target layout; every source file holding the parameter gives its own box from the source
layout; wherever the two overlap, the bytes must be equal (compared byte for byte, one bounded block of rows
of the overlap at a time, so memory stays within a few blocks however large the tensors).
Every target box must be covered by source files; parameters outside the strategies must equal the value
of a source file holding them; each output must hold exactly the expected parameters, dtypes and dims.

Without sources (`verify_records`): every output listed in `manifest.json` must match its completion
record and its manifest entry (size, CRC-32), and every checkpoint file of the destination must be listed.

Under MPI the output files are dealt to the processes and rank 0 gathers what they found; an exception in
any process aborts the whole run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Self, cast

import numpy as np

from .dtypes import dtype_itemsize
from .errors import MpickptError
from .formats import SourceIndex, TensorEntry, open_index
from .layout import Box, Layouts, ParamLayout
from .manifest import MANIFEST_NAME, checksum, read_record
from .mpi import Comm
from .strategy import Strategy
from .transform import TransformJob, TransformOptions

BLOCK_BYTES = 1 << 20  # rows read per comparison step: at most this many bytes of each side (or one row)
OPEN_SOURCES = 32  # source files kept open per process
POLL_SECONDS = 0.02
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


@dataclass(frozen=True)
class RecordsJob:
    """Outputs to compare with their completion records and the manifest."""

    manifest: dict[str, dict[str, object]]  # path -> its manifest entry
    checks: tuple[Check, ...]
    found: tuple[Problem, ...] = ()  # files on disk the manifest does not list


Job = ContentJob | RecordsJob


# --- running on every process -------------------------------------------------------------------------


def verify_outputs(options: TransformOptions, comm: Comm) -> Verdict:
    """Called on all ranks: check every output of `options` against the sources."""
    return run(lambda: content_job(options), comm)


def verify_records(dst_dir: str, comm: Comm) -> Verdict:
    """Called on all ranks: check every output of `dst_dir` against its record and `manifest.json`."""
    return run(lambda: records_job(dst_dir), comm)


def run(prepare: Callable[[], Job], comm: Comm) -> Verdict:
    """Rank 0 prepares the job; every process checks its share; rank 0 gathers; all return the verdict."""
    started = time.monotonic()
    job = _broadcast_job(prepare, comm)
    try:
        params, problems = 0, []
        with _checker(job) as checker:
            for check in deal(job.checks, comm.size)[comm.rank]:
                count, found = checker(check)
                params += count
                problems += found
        comm.send((params, problems), 0)
        verdict = _gather(job, comm, started) if comm.rank == 0 else None
    except BaseException as exc:
        _fail(comm, exc)
    comm.flush()
    return cast(Verdict, comm.bcast(verdict, root=0))  # rank 0 always has one here


def _broadcast_job(prepare: Callable[[], Job], comm: Comm) -> Job:
    """Rank 0's job on every rank, or rank 0's error raised on every rank."""
    job, error = None, None
    if comm.rank == 0:
        try:
            job = prepare()
        except Exception as exc:
            if comm.size == 1:
                raise
            error = exc if isinstance(exc, MpickptError) else MpickptError(f"{type(exc).__name__}: {exc}")
            error = type(error)(str(error))
    job, error = comm.bcast((job, error), root=0)
    if error is not None:
        raise error
    return cast(Job, job)  # rank 0 prepared it, or raised


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


def _fail(comm: Comm, exc: BaseException) -> NoReturn:
    """Raise in a one-process world; otherwise print the failure and abort every process."""
    if comm.size == 1:
        raise exc
    text = str(exc) if isinstance(exc, MpickptError) else f"{type(exc).__name__}: {exc}"
    print(f"mpickpt: verify: process {comm.rank}: {text}", file=sys.stderr, flush=True)
    comm.abort(1)


def deal(checks: Sequence[Check], processes: int) -> list[list[Check]]:
    """Checks per process: largest file first onto the process with the fewest bytes so far."""
    loads = [(0, p) for p in range(processes)]
    shares: list[list[Check]] = [[] for _ in range(processes)]
    for check in sorted(checks, key=lambda c: (-c.size, c.path)):
        load, process = min(loads)
        loads[process] = (load + check.size, process)
        shares[process].append(check)
    return shares


def _checker(job: Job) -> AbstractContextManager[Callable[[Check], tuple[int, list[Problem]]]]:
    """What checks one output of this job: (parameters checked, problems found)."""
    if isinstance(job, RecordsJob):
        return nullcontext(lambda check: (0, check_record(check, job.manifest[check.path])))
    return ContentChecker(job)


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


def records_job(dst_dir: str) -> RecordsJob:
    """The outputs `dst_dir/manifest.json` lists, and the output files on disk it does not list."""
    root = Path(dst_dir)
    if not root.is_dir():
        raise MpickptError(f"{dst_dir}: the output folder does not exist")
    path = root / MANIFEST_NAME
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        listed = {str(root / entry["file"]): entry for entry in files}
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

    def __init__(self, job: ContentJob) -> None:
        self.src = Layouts.from_strategy(job.src, stage=job.src_stage)
        self.dst = Layouts.from_strategy(job.dst)
        self.rank_files = {r: p for r, p in job.rank_files.items() if self._is_source(r)}
        self.headers: dict[int, dict[str, TensorEntry]] = {}
        for rank, path in sorted(self.rank_files.items()):
            with open_index(path) as index:
                self.headers[rank] = dict(index.entries)
        self.holders: dict[str, list[int]] = {}  # parameter -> source ranks whose files hold it, ascending
        for rank, entries in sorted(self.headers.items()):
            for name in entries:
                self.holders.setdefault(name, []).append(rank)
        self._open: OrderedDict[int, SourceIndex] = OrderedDict()
        self._boxes: dict[tuple[ParamLayout, tuple[int, ...]], dict[Box, list[int]]] = {}

    def __call__(self, check: Check) -> tuple[int, list[Problem]]:
        """Parameters checked in one output file, and what is wrong with it."""
        assert check.target_rank is not None
        try:
            index = open_index(check.path)
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
        for rank in holders:
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

    def _source(self, rank: int) -> SourceIndex:
        """Source file of `rank`, opened (at most OPEN_SOURCES stay open)."""
        if rank in self._open:
            self._open.move_to_end(rank)
        else:
            if len(self._open) >= OPEN_SOURCES:
                self._open.popitem(last=False)[1].close()
            self._open[rank] = open_index(self.rank_files[rank])
        return self._open[rank]


# --- bounded block comparison ------------------------------------------------------------------------------


def _first_difference(ours: SourceIndex, name: str, our_dims: Sequence[int], our_box: Box, theirs: SourceIndex,
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


def _blocks(index: SourceIndex, name: str, dims: Sequence[int], box: Box, itemsize: int,
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
