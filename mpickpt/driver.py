"""The run loop of `mpickpt transform`: one coordinator plans, every process writes its share of the outputs.

Called on all ranks with the same arguments. The communicator is a parameter (mpickpt/mpi.py), so the same
code runs under mpirun/srun and, with `SerialComm`, in one process with no MPI at all.

Flow: every process starts the job together (mpickpt/startup.py: destination checked and locked for the
whole run, dst_dir/.mpickpt.lock; strategies from rank 0; source headers indexed in shares and gathered;
targets planned in shares and gathered; any error raised alike everywhere) -> `deal` gives every process
its targets -> each process skips outputs whose completion record still matches this job, writes the rest
(record after each) and posts small progress messages to rank 0 (slices of files a process does not see
come over MPI, mpickpt/exchange.py, and every process serves the others until all are done) -> each process
posts its report to rank 0 -> once rank 0 has every report, the lowest process of each destination folder
(the one that locked it) removes temporaries of dead writers there and lists what the folder holds that
this run did not write into it (never deleting it; with `{host}`/`{process}` in --dst-dir also earlier
runs' folders of that form that no process writes into now) -> rank 0 gathers the lists and builds each
folder's manifest.json, which those processes write -> rank 0 prints the summary and broadcasts it, which
ends the run on every rank.

Any exception during the work makes the failing process print `mpickpt: process P (target rank T): ...`
(without repeating the target when the message already starts with it) and abort the MPI job, so no
process waits for a dead peer (in a one-process world it is simply raised). Writers abort on the way out,
so a raising process leaves no temporary; a killed one's are removed by the next run.

Test-only hook: MPICKPT_TEST_FAIL="process=P[,after_bytes=B][,action=kill|raise|stop]" makes process P send
itself SIGKILL (action=kill) or SIGSTOP (action=stop: it hangs until continued) or raise (default) once it has
written B bytes of tensor data in this run. A process stopped or hung before it reports ends the job from rank
0 once no process has sent anything for REPORT_STALL_SECONDS (test-only: MPICKPT_TEST_REPORT_STALL).
"""

from __future__ import annotations

import glob
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, NoReturn, Protocol, TextIO, cast

from . import __version__
from .atomic import remove_dead_temporaries, remove_dead_temporaries_in
from .collective import deal_by_size, fail
from .destination import (
    DestinationLock,
    check_destination,
    check_prefix,
    lock_for_run,
    lock_token,
    source_folders,
)
from .errors import MpickptError
from .formats import open_index
from .manifest import (
    CompletionRecord,
    SourceStamp,
    WrittenOutput,
    check_record,
    checksum,
    options_record,
    record_path,
    remove_manifest,
    remove_record,
    stamp_sources,
    strategy_hashes,
    write_manifest,
    write_record,
)
from .mpi import Comm
from .placement import Destinations, deal_near_sources, expansions_pattern
from .startup import start_job
from .transform import OutputTask, TransformJob, TransformOptions

PROGRESS_SEND_SECONDS = 0.5  # how often a process tells rank 0 its counters while it writes
PROGRESS_LINE_SECONDS = 2.0  # how often rank 0 prints a progress line when stderr is not a terminal
PROGRESS_BAR_SECONDS = 0.2  # how often rank 0 redraws the bar on a terminal
POLL_SECONDS = 0.002  # rank 0's sleep between checks for messages once its own work is done (0.02: ~10 ms later)
REPORT_STALL_SECONDS = 1800.0  # rank 0 ends the job when, while it waits for reports, no process sends anything
TEST_FAIL_VARIABLE = "MPICKPT_TEST_FAIL"
STALL_VARIABLE = "MPICKPT_TEST_REPORT_STALL"  # test-only: REPORT_STALL_SECONDS in seconds
MAX_LISTED = 10  # redone outputs and stale entries named in the summary (the manifest has them all)
OVERWRITTEN = "--overwrite"
_RANK_DIR = re.compile(r"rank_\d+")


class Job(Protocol):
    """What the driver needs of a job (TransformJob, or a stand-in in tests)."""

    tasks: tuple[OutputTask, ...]
    dst_dir: str
    options: TransformOptions | None  # recorded in manifest.json
    notes: tuple[str, ...]  # lines for the summary and manifest.json

    def run_task(self, task: OutputTask, *, sync: bool = True,
                 progress: Callable[[int], None] | None = None) -> WrittenOutput | None:
        """Write one output atomically; its checksum and parameter count if the writer knows them, else None
        (then both are read back from the file)."""
        ...


@dataclass(frozen=True)
class FileOutcome:
    """One output of this run: its record, who handled it and whether it was already complete."""

    record: CompletionRecord
    file: str  # relative to dst_dir
    process: int
    skipped: bool
    read_bytes: int  # planned bytes read (0 when skipped)
    reason: str = ""  # why an output that was there was redone ("" when skipped or new)


@dataclass(frozen=True)
class ProcessReport:
    """What one process did."""

    process: int
    outcomes: tuple[FileOutcome, ...]
    seconds: float
    bytes_sent: int = 0  # source slices sent to other processes
    bytes_received: int = 0  # source slices received from other processes

    @property
    def bytes_read(self) -> int:
        """Source bytes this process read from files: its outputs' planned reads, less those received,
        plus those it read to send."""
        return sum(o.read_bytes for o in self.outcomes) - self.bytes_received + self.bytes_sent


@dataclass(frozen=True)
class Summary:
    """Figures of a whole run, the same on every rank."""

    files: int
    written: int
    skipped: int
    bytes_read: int
    bytes_written: int
    wall_seconds: float
    processes: int
    slowest_process: int
    slowest_seconds: float
    manifest: str
    redone: tuple[tuple[str, str], ...] = ()  # (file, why) of outputs that were there but redone
    # Entries of dst_dir this job does not produce, left as they are; with placeholders in --dst-dir, of every
    # folder, named "host a (/local/out/a): rank_3/", and listed per folder in stale_folders.
    stale: tuple[str, ...] = ()
    stale_folders: tuple[StaleFolder, ...] = ()
    notes: tuple[str, ...] = ()
    exchanged: tuple[tuple[int, int, int, int], ...] = ()  # (process, read, sent, received) when slices moved

    @property
    def gbps(self) -> float:
        """Bytes read plus bytes written per second of wall time, in GB/s."""
        return (self.bytes_read + self.bytes_written) / max(self.wall_seconds, 1e-9) / 1e9

    def line(self) -> str:
        """One human-readable line."""
        return (f"mpickpt: {self.files} files ({self.written} written, {self.skipped} already complete) by "
                f"{self.processes} process{'es' if self.processes != 1 else ''}: read {_size(self.bytes_read)}, "
                f"wrote {_size(self.bytes_written)} in {self.wall_seconds:.2f} s ({self.gbps:.3f} GB/s); "
                f"slowest process {self.slowest_process} ({self.slowest_seconds:.2f} s); manifest {self.manifest}")

    def lines(self) -> list[str]:
        """What rank 0 prints at the end: the job's notes, redone outputs and stale entries (one line per folder
        with placeholders in --dst-dir), then line()."""
        lines = [f"mpickpt: note: {note}" for note in self.notes]
        lines += [f"mpickpt: {file}: redone: {why}" for file, why in self.redone[:MAX_LISTED]]
        if len(self.redone) > MAX_LISTED:
            lines.append(f"mpickpt: ... and {len(self.redone) - MAX_LISTED} more redone (see {self.manifest})")
        if self.stale_folders:
            lines += [folder.line() for folder in self.stale_folders if folder.entries]
        elif self.stale:
            lines.append(f"mpickpt: {len(self.stale)} entries of the destination are not from this job and were "
                         f"left as they are: {_listed(self.stale)}")
        lines += [f"mpickpt: process {p}: read {_size(read)}, sent {_size(sent)}, received {_size(received)} "
                  f"over MPI" for p, read, sent, received in self.exchanged]
        return lines + [self.line()]


@dataclass(frozen=True)
class StaleFolder:
    """What one destination folder holds that this run did not write into it, left as it is. `processes`: those
    of this run writing there; none for an earlier run's folder of --dst-dir's form (it holds an mpickpt lock
    file) that no process of this run writes into."""

    host: str
    folder: str  # absolute
    entries: tuple[str, ...]  # relative to the folder: "rank_3/", "rank_0/old.ckpt"
    processes: tuple[int, ...] = ()

    def named(self) -> tuple[str, ...]:
        """The entries with host and folder: "host a (/local/out/a): rank_3/"."""
        return tuple(f"host {self.host} ({self.folder}): {entry}" for entry in self.entries)

    def line(self) -> str:
        """The summary's line about this folder."""
        what = ("the destination" if self.processes else
                "a destination no process of this run writes into (an earlier run's, matching --dst-dir)")
        return (f"mpickpt: host {self.host} ({self.folder}): {len(self.entries)} entries of {what} are not from "
                f"this job and were left as they are: {_listed(self.entries)}")


def _listed(entries: Sequence[str]) -> str:
    """The first MAX_LISTED entries, comma-separated, and how many more."""
    more = f" and {len(entries) - MAX_LISTED} more" if len(entries) > MAX_LISTED else ""
    return f"{', '.join(entries[:MAX_LISTED])}{more}"


@dataclass(frozen=True)
class RunInfo:
    """What manifest.json says about the run besides its files and processes."""

    started: str  # ISO 8601, UTC
    finished: str
    options: TransformOptions | None
    notes: tuple[str, ...]
    stale: tuple[str, ...]  # as Summary.stale


@dataclass(frozen=True)
class _Fault:
    """A failure injected by MPICKPT_TEST_FAIL (tests only)."""

    process: int
    after_bytes: int
    action: str


def deal(tasks: Sequence[OutputTask], processes: int, seen_by: Mapping[int, Sequence[int]] | None = None,
         hosts: Sequence[str] | None = None) -> tuple[tuple[OutputTask, ...], ...]:
    """Targets per process, balanced by planned bytes (read + write): largest first onto the least-loaded
    process (ties: lower target rank first; fewer tasks, then lower process). Given who sees which source
    file (`seen_by`, source rank -> processes) and each process's host, a process lacking files a target
    reads counts the bytes it would receive as extra load (placement.deal_near_sources), so targets go
    near their sources. Deterministic; extra processes get nothing."""
    ordered = sorted(tasks, key=lambda t: t.target_rank)
    if seen_by is None or hosts is None:
        shares = deal_by_size(ordered, _dealt_bytes, processes)
    else:
        if len(hosts) != processes:
            raise ValueError(f"{len(hosts)} hosts given for {processes} processes")
        shares = deal_near_sources(ordered, _dealt_bytes, lambda t: dict(t.read_from), seen_by, hosts)
    return tuple(tuple(share) for share in shares)


def _dealt_bytes(task: OutputTask) -> int:
    return task.read_bytes + task.write_bytes


def deal_job(job: Job, processes: int) -> tuple[tuple[OutputTask, ...], ...]:
    """How `run_job` deals a job's targets over `processes`: near their sources where some process lacks
    files (the job's exchange knows who sees what), else by size. Every process deals its own copy of the
    tasks (paths under its own expansion of --dst-dir); the dealing depends only on target ranks, planned
    bytes, who sees which source and each process's host, never on paths, so all processes agree, and a
    rerun of the same command on the same processes and hosts deals alike (finding its outputs where it
    wrote them)."""
    exchange = getattr(job, "exchange", None)
    near = (exchange.seen_by, exchange.hosts) if exchange is not None else (None, None)
    return deal(job.tasks, processes, *near)


def run_transform(options: TransformOptions, comm: Comm, *, sync: bool = True, overwrite: bool = False,
                  quiet: bool = False, stream: TextIO = sys.stderr) -> Summary:
    """Called on all ranks: the job starts on every process (mpickpt/startup.py; the lowest process of each
    destination folder locks it), every target runs once (see run_job), and the locks are kept until the end.

    If checking, locking or preparing fails on some process, every rank raises the lowest failing one's error.
    """
    started = time.monotonic()
    started_at = utc_now()
    job, lock = _start(options, comm, stream, sync)
    try:
        return run_job(job, comm, sync=sync, overwrite=overwrite, quiet=quiet, stream=stream, started=started,
                       started_at=started_at)
    finally:
        job.close()
        if lock is not None:
            lock.release()


def _start(options: TransformOptions, comm: Comm, stream: TextIO,
           sync: bool) -> tuple[TransformJob, DestinationLock | None]:
    """This process's job (and its destination lock, if it holds one), or the same error on every rank."""
    try:
        return start_job(options, comm, lambda local: lock_destination(local, stream), sync=sync)
    except MpickptError:
        raise
    except Exception as exc:  # a failure outside the collectives: the others would wait forever
        _fail(comm, exc, None, stream)


def lock_destination(options: TransformOptions, stream: TextIO) -> DestinationLock:
    """Check the prefix and the destination, then lock the destination (a warning if locks are unsupported)."""
    check_prefix(options.prefix)
    check_destination(options.dst_dir, source_folders(options))
    return lock_for_run(options.dst_dir, stream)


def utc_now() -> str:
    """The current time, ISO 8601 in UTC (seconds)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def run_job(job: Job, comm: Comm, *, sync: bool = True, overwrite: bool = False, quiet: bool = False,
            stream: TextIO = sys.stderr, started: float | None = None, started_at: str | None = None) -> Summary:
    """Called on all ranks with the same job: write this process's outputs, then the destination folders get
    their manifests and every rank returns the same Summary. `started` is the time.monotonic() the wall time
    counts from, `started_at` the same moment as utc_now()."""
    started = time.monotonic() if started is None else started
    started_at = utc_now() if started_at is None else started_at
    where = destinations(job, comm.size)
    if where.locker(comm.rank) == comm.rank:
        remove_manifest(job.dst_dir)  # written again only once every output of this run is complete
    view = _ProgressView(job.tasks, comm.size, stream, quiet) if comm.rank == 0 else None
    collector = _Collector(comm, view)
    tracker = _Tracker(comm, collector, _fault_from_env(os.environ))
    exchange = getattr(job, "exchange", None)
    try:
        shares = deal_job(job, comm.size)
        report = _work(job, shares[comm.rank], comm.rank, tracker, sync, overwrite)
        if exchange is not None:
            exchange.finish()
            report = replace(report, bytes_sent=exchange.bytes_sent, bytes_received=exchange.bytes_received)
        comm.send(("result", report), 0)
        summary = _finish(job, comm, collector, where, shares, (started, started_at), sync)
    except BaseException as exc:
        _fail(comm, exc, tracker.current, stream)
    comm.flush()
    return cast(Summary, comm.bcast(summary, root=0))  # rank 0 always has one here


def destinations(job: Job, processes: int) -> Destinations:
    """Where each process of the job writes (a job without that knowledge: dst_dir, for every process)."""
    return getattr(job, "destinations", None) or Destinations.shared(job.dst_dir, processes)


def _finish(job: Job, comm: Comm, collector: _Collector, where: Destinations,
            shares: Sequence[Sequence[OutputTask]], start: tuple[float, str], sync: bool) -> Summary | None:
    """Called on all ranks once this process's report is posted: rank 0 waits for every report, then the
    lowest process of each destination folder surveys it, rank 0 builds every folder's manifest, those
    processes write them, and rank 0 prints the summary (its Summary; None on the others)."""
    reports = collector.wait() if comm.rank == 0 else []
    comm.bcast(None, root=0)  # every output of the run is written: the folders can be surveyed
    found = _merged(comm.allgather(_survey(job, where, shares, comm.rank)))
    stale = tuple(e for f in found for e in f.named()) if where.per_process else found[0].entries
    wall = time.monotonic() - start[0]
    run = RunInfo(start[1], utc_now(), job.options, tuple(job.notes), stale)
    contents = comm.bcast(manifests(reports, wall, run, where, found) if comm.rank == 0 else {}, root=0)
    mine = contents.get(where.folders[comm.rank]) if where.locker(comm.rank) == comm.rank else None
    paths = comm.allgather(str(write_manifest(job.dst_dir, mine, sync=sync)) if mine is not None else None)
    if comm.rank != 0:
        return None
    summary = summarize(reports, wall, cast(str, paths[0]), stale=stale, notes=job.notes,
                        stale_folders=found if where.per_process else ())
    if collector.view is not None:
        collector.view.close(summary)
    return summary


def _work(job: Job, tasks: Sequence[OutputTask], process: int, tracker: _Tracker, sync: bool,
          overwrite: bool) -> ProcessReport:
    """Skip or write each of this process's tasks. A helper thread checksums and records each written
    output while the next one converts (CRC-32 releases the GIL); every record is on disk before this returns."""
    began = time.monotonic()
    entries: list[FileOutcome | tuple[OutputTask, str, Future[CompletionRecord]]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpickpt-record") as recorder:
        for task in tasks:
            tracker.current = task
            record, reason = _previous(task, overwrite)
            if record is not None:
                remove_dead_temporaries(task.path)
                remove_dead_temporaries(record_path(task.path))
                entries.append(FileOutcome(record, os.path.relpath(task.path, job.dst_dir), process, skipped=True,
                                           read_bytes=0))
            else:
                remove_record(task.path)
                sources = task.source_stamps or stamp_sources(task.source_files)  # as they were before being read
                start = time.monotonic()
                written = job.run_task(task, sync=sync, progress=tracker.task_progress)
                entries.append((task, reason, recorder.submit(_record, task, sources, time.monotonic() - start,
                                                              sync, written)))
            tracker.task_done(task)
        outcomes = []
        for entry in entries:
            if isinstance(entry, tuple):
                task, reason, future = entry
                tracker.current = task
                entry = FileOutcome(future.result(), os.path.relpath(task.path, job.dst_dir), process,
                                    skipped=False, read_bytes=task.read_bytes, reason=reason)
            outcomes.append(entry)
    tracker.current = None
    return ProcessReport(process, tuple(outcomes), time.monotonic() - began)


def _previous(task: OutputTask, overwrite: bool) -> tuple[CompletionRecord | None, str]:
    """The record of a complete, current output of `task` (None: write it) and why an existing one is redone."""
    if overwrite:
        return None, OVERWRITTEN if os.path.lexists(task.path) else ""
    check = check_record(task.path, task.target_rank, task.job_key, task.source_ranks, task.source_files,
                         task.source_stamps)
    return check.record, check.reason


def _record(task: OutputTask, sources: tuple[SourceStamp, ...], seconds: float, sync: bool,
            written: WrittenOutput | None = None) -> CompletionRecord:
    """Write a finished output's completion record beside it: its checksum and parameter count as its writer
    computed them from the bytes on their way out, else read back from the file."""
    if written is None:
        with open_index(task.path) as index:
            written = WrittenOutput(checksum(task.path), len(index.entries))
    record = CompletionRecord(file=os.path.basename(task.path), output=os.path.abspath(task.path),
                              target_rank=task.target_rank, job_key=task.job_key,
                              size=os.stat(task.path).st_size, checksum=written.checksum, params=written.params,
                              source_ranks=tuple(task.source_ranks), sources=sources, seconds=seconds)
    write_record(task.path, record, sync=sync)
    return record


def _fail(comm: Comm, exc: BaseException, task: OutputTask | None, stream: TextIO) -> NoReturn:
    """Raise in a one-process world; otherwise print the failure (naming the target once) and abort every process."""
    where = f"process {comm.rank}"
    if task is not None and not (isinstance(exc, MpickptError) and str(exc).startswith("target rank ")):
        where += f" (target rank {task.target_rank})"
    fail(comm, exc, where, stream)


class _Tracker:
    """This process's counters: done targets and bytes; passes them on to rank 0 and fires the test fault."""

    def __init__(self, comm: Comm, collector: _Collector, fault: _Fault | None) -> None:
        self.comm = comm
        self.collector = collector
        self.fault = fault if fault is not None and fault.process == comm.rank else None
        self.current: OutputTask | None = None
        self.done = 0
        self.finished_bytes = 0  # planned write bytes of finished tasks
        self.task_bytes = 0  # bytes written so far in the current task
        self.written_this_run = 0  # bytes actually written by run_task in this run
        self.last_sent = 0.0

    def task_progress(self, written: int) -> None:
        """run_task's callback: `written` bytes of the current task are written so far."""
        self.written_this_run += max(written - self.task_bytes, 0)
        self.task_bytes = written
        if self.fault is not None and self.written_this_run >= self.fault.after_bytes:
            fault, self.fault = self.fault, None  # fires once
            self._fire(fault)
        self._tell(force=False)

    def task_done(self, task: OutputTask) -> None:
        """One more target is complete (written or skipped)."""
        self.done += 1
        self.finished_bytes += task.write_bytes
        self.task_bytes = 0
        self._tell(force=True)

    def _tell(self, force: bool) -> None:
        counters = (self.done, self.finished_bytes + self.task_bytes)
        if self.comm.rank == 0:
            self.collector.update(0, counters)
            self.collector.receive()
            return
        now = time.monotonic()
        if force or now - self.last_sent >= PROGRESS_SEND_SECONDS:
            self.comm.send(("progress", counters), 0)
            self.last_sent = now

    def _fire(self, fault: _Fault) -> None:
        if fault.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault.action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        raise MpickptError(f"{TEST_FAIL_VARIABLE}: injected failure after {self.written_this_run} bytes")


class _Collector:
    """Rank 0's inbox: progress counters and the processes' reports."""

    def __init__(self, comm: Comm, view: _ProgressView | None) -> None:
        self.comm = comm
        self.view = view
        self.reports: dict[int, ProcessReport] = {}
        self.heard = time.monotonic()  # when a message last came

    def update(self, process: int, counters: tuple[int, int]) -> None:
        """New counters of one process."""
        if self.view is not None:
            self.view.update(process, counters)

    def receive(self) -> None:
        """Take in every message that has arrived, without waiting."""
        for source, (kind, payload) in self.comm.poll():
            self.heard = time.monotonic()
            if kind == "progress":
                self.update(source, payload)
            else:
                self.reports[source] = payload

    def wait(self) -> list[ProcessReport]:
        """Rank 0: every process's report, in process order, once all have come (showing progress). A process
        stopped or hung never reports: once no process has sent anything for the stall time (counted from
        the wait's start at the earliest), MpickptError naming the processes that have not reported."""
        stall = _report_stall(os.environ)
        self.heard = time.monotonic()
        while True:
            self.receive()
            if len(self.reports) == self.comm.size:
                break
            if time.monotonic() - self.heard > stall:
                silent = [p for p in range(self.comm.size) if p not in self.reports]
                raise MpickptError(f"process{'es' if len(silent) > 1 else ''} {', '.join(map(str, silent))} "
                                   f"{'have' if len(silent) > 1 else 'has'} not reported and no process has sent "
                                   f"anything for {stall:g} s (stopped or hung?): ending the job")
            time.sleep(POLL_SECONDS)
            if self.view is not None:
                self.view.show(force=False)
        return [self.reports[p] for p in range(self.comm.size)]


def _output_folders(job: Job) -> list[str]:
    """dst_dir and every folder this job writes outputs into (absolute)."""
    return sorted({os.path.abspath(job.dst_dir)} | {os.path.dirname(os.path.abspath(t.path)) for t in job.tasks})


def _survey(job: Job, where: Destinations, shares: Sequence[Sequence[OutputTask]],
            process: int) -> list[tuple[str, StaleFolder]]:
    """The lowest process of a destination folder, once every output is written: remove dead writers'
    temporaries there and list what it holds that this run did not write into it (the targets dealt to the
    processes writing there), then earlier runs' folders of --dst-dir's form it sees. Each list is keyed by
    its folder's lock token. Other processes: nothing."""
    if where.locker(process) != process:
        return []
    remove_dead_temporaries_in(_output_folders(job))
    writers = where.writers(process)
    made = [task for p in writers for task in shares[p]]
    mine = StaleFolder(where.hosts[process], where.folders[process], stale_entries(job.dst_dir, made), writers)
    return [(str(where.tokens[process]), mine), *(earlier_folders(where, process) if where.per_process else [])]


def stale_entries(dst_dir: str, made: Sequence[OutputTask]) -> tuple[str, ...]:
    """What dst_dir holds that the outputs `made` into it do not account for, relative to it: `rank_*` folders
    none is written into ("rank_9/") and files in their folders that are neither those outputs nor their
    records."""
    root = os.path.abspath(dst_dir)
    paths = {os.path.abspath(t.path) for t in made}
    known = paths | {str(record_path(p)) for p in paths}
    folders = {os.path.dirname(p) for p in paths} - {root}
    stale = [f"{e.name}/" for e in _entries(root)
             if _RANK_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False) and e.path not in folders]
    for folder in sorted(folders):
        stale += [os.path.relpath(e.path, root) for e in _entries(folder)
                  if e.path not in known and not e.is_dir(follow_symlinks=False)]
    return tuple(sorted(stale))


def earlier_folders(where: Destinations, process: int) -> list[tuple[str, StaleFolder]]:
    """Folders `process` sees that --dst-dir's template may expand to (`{process}`: any number, `{host}`: any
    name) and that an earlier mpickpt run locked but no process of this run writes into (their lock file holds
    none of this run's tokens): their `rank_*` folders, keyed by that lock token. A rerun with fewer processes
    or other hosts leaves such folders behind."""
    pattern, expansion = expansions_pattern(os.path.abspath(where.template))
    ours = {token for token in where.tokens if token is not None}
    found = []
    for folder in sorted(glob.glob(pattern)):
        token = lock_token(folder) if expansion.fullmatch(folder) and os.path.isdir(folder) else None
        if token is None or token in ours:
            continue
        ranks = tuple(sorted(f"{e.name}/" for e in _entries(folder)
                             if _RANK_DIR.fullmatch(e.name) and e.is_dir(follow_symlinks=False)))
        if ranks:
            found.append((token, StaleFolder(where.hosts[process], folder, ranks)))
    return found


def _merged(surveys: Sequence[Sequence[tuple[str, StaleFolder]]]) -> tuple[StaleFolder, ...]:
    """This run's folders in the order of their lowest processes, then earlier runs' folders by path, each
    once (one seen by several processes, on a shared filesystem, is named with the lowest one's host)."""
    found: dict[tuple[str, str], StaleFolder] = {}
    for survey in surveys:
        for token, folder in survey:
            found.setdefault((folder.folder, token), folder)
    ours = [f for f in found.values() if f.processes]
    return tuple(ours + sorted((f for f in found.values() if not f.processes), key=lambda f: (f.folder, f.host)))


def _entries(folder: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def manifest(reports: Sequence[ProcessReport], wall_seconds: float, run: RunInfo) -> dict[str, Any]:
    """The JSON content of manifest.json."""
    outcomes = sorted((o for r in reports for o in r.outcomes), key=lambda o: o.record.target_rank)
    options = run.options
    return {
        "version": 2,
        "tool": f"mpickpt {__version__}",
        "mpickpt_version": __version__,
        "started": run.started,
        "finished": run.finished,
        "world_size": len(reports),
        "wall_seconds": round(wall_seconds, 6),
        "options": options_record(options) if options is not None else None,
        "source_folder": os.path.abspath(options.src_dir) if options is not None else None,
        "strategies": strategy_hashes(options) if options is not None else None,
        "notes": list(run.notes),
        "files": [{"file": o.file, "target_rank": o.record.target_rank, "size": o.record.size,
                   "checksum": o.record.checksum, "params": o.record.params,
                   "source_ranks": list(o.record.source_ranks), "seconds": round(o.record.seconds, 6),
                   "process": o.process, "skipped": o.skipped, "redone": o.reason or None}
                  for o in outcomes],
        "stale": list(run.stale),
        "processes": [{"process": r.process, "targets": [o.record.target_rank for o in r.outcomes],
                       "written": sum(not o.skipped for o in r.outcomes),
                       "skipped": sum(o.skipped for o in r.outcomes),
                       "bytes_read": r.bytes_read,
                       "bytes_sent": r.bytes_sent, "bytes_received": r.bytes_received,
                       "bytes_written": sum(o.record.size for o in r.outcomes if not o.skipped),
                       "seconds": round(r.seconds, 6)} for r in reports],
    }


def manifests(reports: Sequence[ProcessReport], wall_seconds: float, run: RunInfo, where: Destinations,
              found: Sequence[StaleFolder]) -> dict[str, dict[str, Any]]:
    """The manifest.json of each destination folder, by folder. A plain --dst-dir: `manifest`. With placeholders,
    each folder's lists under "files" only the outputs written into it, so that each folder, wherever it is
    copied, verifies on its own (`mpickpt verify` without sources flags listed files that are missing and
    output files not listed); every one of them says where every output of the run was written and what each
    folder holds that is not from this run ("destinations", and "stale" named by host and folder), and each
    process's host and folder."""
    content = manifest(reports, wall_seconds, run)
    if not where.per_process:
        return {where.folders[0]: content}
    outputs = {f.folder: [{"target_rank": o.record.target_rank, "file": o.file}
                          for o in sorted((o for r in reports for o in r.outcomes if o.process in f.processes),
                                          key=lambda o: o.record.target_rank)] for f in found}
    content["processes"] = [{**entry, "host": where.hosts[p], "dst_dir": where.folders[p]}
                            for p, entry in enumerate(content["processes"])]
    content["destinations"] = [{"folder": f.folder, "host": f.host, "processes": list(f.processes),
                                "outputs": outputs[f.folder], "stale": list(f.entries)} for f in found]
    return {where.folders[p]: {**content, "folder": where.folders[p], "host": where.hosts[p],
                               "files": [e for e in content["files"] if e["process"] in where.writers(p)]}
            for p in where.lockers}


def summarize(reports: Sequence[ProcessReport], wall_seconds: float, manifest_path: str, *,
              stale: Sequence[str] = (), notes: Sequence[str] = (),
              stale_folders: Sequence[StaleFolder] = ()) -> Summary:
    """Whole-run figures from every process's report."""
    outcomes = sorted((o for r in reports for o in r.outcomes), key=lambda o: o.record.target_rank)
    slowest = max(reports, key=lambda r: (r.seconds, -r.process))
    return Summary(files=len(outcomes), written=sum(not o.skipped for o in outcomes),
                   skipped=sum(o.skipped for o in outcomes), bytes_read=sum(o.read_bytes for o in outcomes),
                   bytes_written=sum(o.record.size for o in outcomes if not o.skipped),
                   wall_seconds=wall_seconds, processes=len(reports), slowest_process=slowest.process,
                   slowest_seconds=slowest.seconds, manifest=manifest_path,
                   redone=tuple((o.file, o.reason) for o in outcomes if o.reason), stale=tuple(stale),
                   stale_folders=tuple(stale_folders), notes=tuple(notes), exchanged=_exchanged(reports))


def _exchanged(reports: Sequence[ProcessReport]) -> tuple[tuple[int, int, int, int], ...]:
    """Per process: bytes read from files, sent and received over MPI (nothing when no slice moved)."""
    if not any(r.bytes_sent or r.bytes_received for r in reports):
        return ()
    return tuple((r.process, r.bytes_read, r.bytes_sent, r.bytes_received) for r in reports)


class _ProgressView:
    """Rank 0's display: a bar when the stream is a terminal, else a line every 2 s; nothing when quiet."""

    def __init__(self, tasks: Sequence[OutputTask], processes: int, stream: TextIO, quiet: bool) -> None:
        self.total_targets = len(tasks)
        self.total_bytes = sum(t.write_bytes for t in tasks)
        self.counters = [(0, 0)] * processes
        self.stream = stream
        self.quiet = quiet
        self.tty = _isatty(stream)
        self.interval = PROGRESS_BAR_SECONDS if self.tty else PROGRESS_LINE_SECONDS
        self.last_shown = time.monotonic()
        self.drawn = False

    def update(self, process: int, counters: tuple[int, int]) -> None:
        """New counters of one process; redraw if it is time."""
        self.counters[process] = counters
        self.show(force=False)

    def text(self) -> str:
        """Targets done / total and bytes written / planned."""
        done = sum(c[0] for c in self.counters)
        written = sum(c[1] for c in self.counters)
        return (f"{done}/{self.total_targets} targets, {_size(written)} / {_size(self.total_bytes)} written")

    def show(self, force: bool) -> None:
        """Print the progress if due (or forced)."""
        now = time.monotonic()
        if self.quiet or not (force or now - self.last_shown >= self.interval):
            return
        self.last_shown = now
        if self.tty:
            done = sum(c[1] for c in self.counters) / max(self.total_bytes, 1)
            filled = int(30 * min(done, 1.0))
            self.stream.write(f"\rmpickpt: [{'#' * filled}{'.' * (30 - filled)}] {self.text()}\x1b[K")
            self.drawn = True
        else:
            self.stream.write(f"mpickpt: progress {self.text()}\n")
        self.stream.flush()

    def close(self, summary: Summary) -> None:
        """End the bar and print the summary line."""
        if self.quiet:
            return
        if self.drawn:
            self.stream.write("\n")
        self.stream.write("".join(line + "\n" for line in summary.lines()))
        self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _size(n: float) -> str:
    """Bytes in decimal units: "512 B", "44.8 MB"."""
    if n < 1000:
        return f"{n:.0f} B"
    for unit in ("kB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            break
    else:
        unit, n = "TB", n / 1000
    return f"{n:.1f} {unit}"


def _report_stall(env: Mapping[str, str]) -> float:
    """How long rank 0 waits for reports while no process sends anything (MPICKPT_TEST_REPORT_STALL, test-only,
    else REPORT_STALL_SECONDS)."""
    text = env.get(STALL_VARIABLE)
    if not text:
        return REPORT_STALL_SECONDS
    try:
        return float(text)
    except ValueError:
        raise MpickptError(f"{STALL_VARIABLE}={text!r}: expected seconds") from None


def _fault_from_env(env: Mapping[str, str]) -> _Fault | None:
    """Parse MPICKPT_TEST_FAIL (test-only): "process=P[,after_bytes=B][,action=kill|raise|stop]"."""
    text = env.get(TEST_FAIL_VARIABLE)
    if not text:
        return None
    try:
        fields = dict(item.split("=", 1) for item in text.split(","))
        fault = _Fault(process=int(fields.pop("process")), after_bytes=int(fields.pop("after_bytes", "0")),
                       action=fields.pop("action", "raise"))
    except (KeyError, ValueError) as exc:
        raise MpickptError(f"{TEST_FAIL_VARIABLE}={text!r}: expected process=P[,after_bytes=B]"
                           f"[,action=kill|raise|stop] ({exc})") from None
    if fields or fault.action not in ("kill", "raise", "stop"):
        raise MpickptError(f"{TEST_FAIL_VARIABLE}={text!r}: unknown field or action")
    return fault
