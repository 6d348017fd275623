"""Start-up of `mpickpt transform` on every process at once, with no serial phase.

1. Every process expands `{host}`/`{process}` in --src-dir and --dst-dir; the lowest process of each
   distinct destination checks and locks it, and every other process of that destination reads the lock
   file's token back: a path that is not one folder for all of them (node-local on several hosts) is an
   error asking for `{host}` in --dst-dir.
2. Rank 0 loads the strategies (merging per-stage folders, kept in its destination) and broadcasts them.
3. Every process lists the rank files it sees, with their sizes and times; the views are gathered (who holds
   what). Copies of one rank's file whose sizes or times differ (node-local copies on several hosts) must
   hold the same bytes: other sizes are an error, other times have each copy checksummed by a process
   seeing it (the processes of one host share the reading) and differing contents are an error naming every
   copy (mpickpt cannot tell which is current).
4. Processes seeing the same folder split the reading of its headers; the headers are gathered.
5. Every process checks and catalogs the sources (a rank held by no process is an error naming who
   holds what) and plans its share of the targets; the tasks are gathered, so every process has them all.

Every step ends in a collective that raises the lowest failing process's error on every process, so all
processes fail alike before any output is written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from .catalog import copied_through
from .collective import agree, broadcast_prepared
from .destination import (
    DestinationLock,
    check_prefix,
    lock_token,
    refuse_outputs_beside_sources,
    refuse_unwritable_outputs,
)
from .errors import DestinationError, SourceConflictError, SourceMissingError
from .exchange import Exchange
from .formats import IndexCache, suffix_of
from .inventory import SourceHeaders, read_headers
from .layout import Layouts
from .manifest import checksum, stamp_sources
from .mpi import Comm
from .placement import (
    Destinations,
    FileStamp,
    Placement,
    ProcessView,
    SourceCopy,
    checksum_readers,
    differing_copies,
    expand,
    has_placeholders,
    header_share,
)
from .sources import RANK_FORMATS, find_rank_files, refuse_mixed_formats, stamped_files, stray_checkpoints
from .strategy import Strategy
from .transform import (
    Sources,
    TransformJob,
    TransformOptions,
    check_values_kept_as_stored,
    keep_merged,
    load_strategies,
    output_path,
    source_dirs,
)

HOST_VARIABLE = "MPICKPT_HOST"  # overrides the host name ({host}, and which processes count as one host)


def host_name() -> str:
    """This host's short name."""
    return os.environ.get(HOST_VARIABLE) or os.uname().nodename.split(".")[0]


def start_job(options: TransformOptions, comm: Comm,
              lock_destination: Callable[[TransformOptions], DestinationLock], *,
              sync: bool = True) -> tuple[TransformJob, DestinationLock | None]:
    """Called on all ranks: this process's job (its own expansions; every task of the run; where every
    process writes) and the destination lock when this process holds one. `lock_destination(options)` checks
    and locks; `sync` fsyncs the merged strategy files."""
    host, local = _expanded(options, comm)
    per_process = has_placeholders(options.src_dir)
    lock: DestinationLock | None = None
    indexes = IndexCache()  # headers read here stay open for this process's targets

    def check_and_lock() -> str | None:
        nonlocal lock
        check_prefix(options.prefix)
        suffix_of(options.output_format)
        if os.path.abspath(local.dst_dir) not in dst_dirs[:comm.rank]:
            lock = lock_destination(local)
            return lock.token
        return None

    try:
        dst_dirs, hosts = zip(*comm.allgather((os.path.abspath(local.dst_dir), host)), strict=True)
        tokens = agree(check_and_lock, comm)
        agree(lambda: _check_one_folder(options.dst_dir, comm.rank, dst_dirs, hosts, tokens), comm)
        src, dst = broadcast_prepared(lambda: load_strategies(local), comm)
        placement, headers, notes = _survey_sources(local, comm, host, per_process, indexes, src)
        job = _plan(local, src, dst, placement, headers, comm, options.src_dir, per_process, indexes, notes)
        job.src, job.dst = broadcast_prepared(lambda: keep_merged(local, src, dst, local.dst_dir, sync), comm)
    except BaseException:
        indexes.close()
        if lock is not None:
            lock.release()
        raise
    job.destinations = Destinations(options.dst_dir, tuple(dst_dirs), tuple(hosts), tuple(tokens))
    return job, lock


@dataclass
class Survey:
    """A job as every process sees it, for `plan` and `verify`: the planned job (this process's expansions of
    the folders, every target; the headers of files it does not see) and who sees which rank file."""

    job: TransformJob
    placement: Placement


def survey_job(options: TransformOptions, comm: Comm) -> Survey:
    """Called on all ranks: the job as `start_job` builds it (folders expanded per process, views and headers
    gathered, every target planned, an `Exchange` where some process lacks a file), but no destination is
    checked or locked and nothing is written (per-stage strategy folders are merged in memory only)."""
    host, local = _expanded(options, comm)
    per_process = has_placeholders(options.src_dir)

    def check_names() -> None:
        check_prefix(options.prefix)
        suffix_of(options.output_format)

    agree(check_names, comm)
    src, dst = broadcast_prepared(lambda: load_strategies(local), comm)
    indexes = IndexCache()
    try:
        placement, headers, notes = _survey_sources(local, comm, host, per_process, indexes, src)
        job = _plan(local, src, dst, placement, headers, comm, options.src_dir, per_process, indexes, notes)
    except BaseException as error:
        indexes.close()
        if not isinstance(error, SourceMissingError) or comm.size > 1 or not per_process:
            raise
        raise SourceMissingError(f"{error}; one process sees only its own expansion of {options.src_dir}: run "
                                 "under mpiexec with a process for each folder holding the other ranks") from None
    return Survey(job, placement)


def _expanded(options: TransformOptions, comm: Comm) -> tuple[str, TransformOptions]:
    """This process's host and the options with `{host}`/`{process}` expanded in both folders."""
    host = host_name()
    return host, replace(options, src_dir=expand(options.src_dir, host, comm.rank),
                         dst_dir=expand(options.dst_dir, host, comm.rank))


def _survey_sources(local: TransformOptions, comm: Comm, host: str, per_process: bool, indexes: IndexCache,
                    src: Strategy | None) -> tuple[Placement, dict[int, SourceHeaders], tuple[str, ...]]:
    """Who sees which rank file, every source file's headers (each folder's files read once, split over
    the processes seeing it; the indexes stay open in `indexes`; the values `src` copies through whole
    fingerprinted) and notes for the summary."""
    views = agree(lambda: _view(local, comm.rank, host, per_process), comm)
    if local.src_format is None:
        refuse_mixed_formats(path for _, _, path in sorted((r, v.process, path) for v in views
                                                           for r, path in v.rank_files.items()))
    notes = _check_copies(views, comm)
    _expect_as_seen(views[comm.rank], indexes)
    found = agree(lambda: read_headers({r: views[comm.rank].rank_files[r]
                                        for r in header_share(views, comm.rank, per_process)},
                                       indexes.lease, copied_through(src)), comm)
    headers: dict[int, SourceHeaders] = {}
    for share in found:
        for rank, h in share.items():
            headers.setdefault(rank, h)
    return Placement(tuple(views)), headers, notes


def _expect_as_seen(view: ProcessView, indexes: IndexCache) -> None:
    """Hand `indexes` the size and time of each rank file as this process saw it now (when the copies were
    compared, before any header is read), so a file rewritten from now on refuses what is made from it. A
    unified folder is left to its index's own stamp when opened."""
    for rank, path in view.rank_files.items():
        if len(view.stamps[rank]) == 1 and os.path.isfile(path):
            (_, size, mtime_ns), = view.stamps[rank]
            indexes.expect(path, size, mtime_ns)


def _check_copies(views: Sequence[ProcessView], comm: Comm) -> tuple[str, ...]:
    """Refuse copies of one rank's file that hold different bytes (SourceConflictError naming every copy);
    copies of the same size whose times differ are checksummed first, each by one process seeing it.
    A note when copies were compared and found equal."""
    differing = differing_copies(views)
    if not differing:
        return ()
    for rank, copies in differing.items():
        if len({copy.size for copy in copies}) > 1:
            raise _conflict(rank, copies, "their sizes differ")
    readers = checksum_readers(differing)
    digests = agree(lambda: {key: _content_checksum(key[2]) for key, reader in readers.items()
                             if reader == comm.rank}, comm)
    found = {key: digest for share in digests for key, digest in share.items()}
    for rank, copies in differing.items():
        if len({found[rank, c.host, c.path, c.stamp] for c in copies}) > 1:
            raise _conflict(rank, copies, "their contents differ")
    return (f"copies of source ranks {sorted(differing)} on several hosts have different times but the same "
            "contents (checksummed)",)


def _conflict(rank: int, copies: Sequence[SourceCopy], how: str) -> SourceConflictError:
    return SourceConflictError(
        f"source rank {rank}: processes see different copies of its file, and {how}: "
        f"{'; '.join(copy.describe() for copy in copies)}. mpickpt cannot tell which copy is current: make "
        "every copy the same (e.g. rsync -a from one place) or remove the stale ones")


def _content_checksum(source: str) -> tuple[str, ...]:
    """The CRC-32 of each file standing for one source."""
    return tuple(checksum(path) for path in stamped_files(source))


def _stamps(files: dict[int, str]) -> dict[int, FileStamp]:
    """(file name, size, time in ns) of each file standing for each rank's source."""
    return {rank: tuple((os.path.basename(s.path), s.size, s.mtime_ns) for s in stamp_sources(stamped_files(source)))
            for rank, source in files.items()}


def _check_one_folder(template: str, process: int, dst_dirs: Sequence[str], hosts: Sequence[str],
                      tokens: Sequence[str | None]) -> None:
    """Refuse a destination that is not, for this process, the folder the first process of its path locked
    (whose lock file holds that process's token)."""
    locker = dst_dirs.index(dst_dirs[process])
    if locker == process or lock_token(dst_dirs[process]) == tokens[locker]:
        return
    raise DestinationError(
        f"dst_dir {dst_dirs[process]}: process {process} (host {hosts[process]}) does not see the folder that "
        f"process {locker} (host {hosts[locker]}) locked there: the path is not one shared folder (a node-local "
        f"disk on each host?). To write each host's outputs to its own disk, put {{host}} in --dst-dir (e.g. "
        f"--dst-dir '{os.path.join(template, '{host}')}'); otherwise give a folder every process shares")


def _view(options: TransformOptions, process: int, host: str, per_process: bool) -> ProcessView:
    """The rank files this process sees (with placeholders, a missing or empty folder sees none, and a folder
    holding checkpoint files that are no source names them as strays)."""
    folder = os.path.abspath(options.src_dir)
    if per_process and not os.path.exists(folder):
        return ProcessView(process, host, folder, {})
    try:
        files = find_rank_files(folder, options.src_format)
    except SourceMissingError:
        if not per_process:
            raise
        return ProcessView(process, host, folder, {}, strays=stray_checkpoints(folder))
    return ProcessView(process, host, folder, files, _stamps(files))


def _plan(options: TransformOptions, src: Strategy | None, dst: Strategy | None, placement: Placement,
          headers: dict[int, SourceHeaders], comm: Comm, template: str, per_process: bool,
          indexes: IndexCache, notes: tuple[str, ...]) -> TransformJob:
    """Check the sources, plan this process's share of targets, gather every task (`notes` join the job's)."""
    rank_files = placement.rank_files
    if not rank_files:
        looked = " or ".join(f"rank_<r>/*{suffix_of(f)}" for f in
                             ([options.src_format] if options.src_format else RANK_FORMATS))
        raise SourceMissingError(f"{template}: no process sees any {looked} checkpoint files "
                                 f"({placement.describe()})")
    placement.refuse_partial_unified(template)
    where = f"{template} (seen as {placement.describe()})" if per_process else options.src_dir
    sources = Sources.check(src, dst, rank_files, headers, options, where)
    stamps = {r: h.stamps for r, h in sources.headers.items()}
    mine = placement.views[comm.rank].rank_files
    read_dirs = source_dirs(options)

    planned: list[TransformJob] = []

    def plan_share() -> TransformJob:
        """Plan this process's share of the targets (kept: its plans serve the targets it is dealt)."""
        targets = range(Layouts.from_strategy(dst).device_count)[comm.rank::comm.size]
        planned.append(TransformJob.plan(src, dst, sources.rank_files, options.dst_dir, options.prefix,
                                         read_dirs, sources.src_stage, catalog=sources.catalog, options=options,
                                         notes=sources.notes, targets=targets, stamps=stamps))
        check_values_kept_as_stored(planned[0]._plans.values(), sources.headers)
        return planned[0]

    shares = agree(lambda: plan_share().tasks, comm)
    job = planned[0]
    job.indexes = indexes
    tasks = sorted((t for share in shares for t in share), key=lambda t: t.target_rank)
    job.tasks = tuple(replace(t, path=output_path(options.dst_dir, options.prefix, t.target_rank, sources.src_stage,
                                                  options.output_format)) for t in tasks)
    local_files = job.local_files = {r: mine[r] for r in sources.rank_files if r in mine}
    job.remote_headers = {r: h for r, h in sources.headers.items() if r not in mine}
    agree(lambda: refuse_outputs_beside_sources([t.path for t in job.tasks], local_files.values()), comm)
    agree(lambda: refuse_unwritable_outputs(t.path for t in job.tasks), comm)
    seen_by = placement.seen_by
    if comm.size > 1 and any(len(seen_by.get(r, ())) < comm.size for r in sources.rank_files):
        job.exchange = Exchange(comm, lambda r: indexes.lease(mine[r]), seen_by, [v.host for v in placement.views],
                                sources.headers, budget=options.exchange_buffer,
                                check_unchanged=lambda r: indexes.check_unchanged(mine[r]))
    job.notes = job.notes + notes
    if has_placeholders(template):
        job.notes = job.notes + (f"sources per process: {placement.describe()}",)
    return job

