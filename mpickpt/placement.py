"""Which process sees which source files (pure, no I/O or MPI).

`--src-dir` and `--dst-dir` may hold `{host}` (the short host name) and `{process}` (the MPI process rank),
expanded per process: hosts without a shared filesystem each give their own folder. Every process lists
the rank files it sees (a `ProcessView`); the views, gathered, say who holds what (`Placement`), and for a
slice a target needs from a file its own process does not see, `choose_holder` picks the process to send it.
`deal_near_sources` gives each target to a process that sees the files it reads most from, keeping loads even.
`Destinations` says which process writes into which expansion of `--dst-dir` (and on which host).
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from .errors import MpickptError, SourceMissingError

_PLACEHOLDER = re.compile(r"\{(\w*)\}")
PLACEHOLDERS = ("host", "process")
SAME_HOST_WEIGHT = 1  # weight of a byte a writer would receive from a process of its own host
OTHER_HOST_WEIGHT = 4  # ... from another host (over the network: dearer than a copy within a host)
T = TypeVar("T")
FileStamp = tuple[tuple[str, int, int], ...]
"""What stands for one source rank's content: (file name, size, modification time in ns) of each of its files."""


def expand(template: str, host: str, process: int) -> str:
    """`template` with `{host}` and `{process}` replaced (MpickptError naming an unknown placeholder)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "host":
            return host
        if name == "process":
            return str(process)
        raise MpickptError(f"{template}: unknown placeholder {{{name}}} (known: "
                           f"{', '.join('{' + p + '}' for p in PLACEHOLDERS)})")
    return _PLACEHOLDER.sub(value, template)


def has_placeholders(template: str) -> bool:
    """Whether a folder differs between processes (then each process sees only its own expansion)."""
    return bool(_PLACEHOLDER.search(template))


def expansions_pattern(template: str) -> tuple[str, re.Pattern[str]]:
    """A glob pattern finding every folder `template` may expand to, and the regular expression an expansion
    fully matches (`{host}`: one path component, `{process}`: digits): "out/{process}" -> ("out/*", out/\\d+)."""
    parts = _PLACEHOLDER.split(template)  # literal, name, literal, name, ..., literal
    pattern = "".join(glob.escape(part) if i % 2 == 0 else "*" for i, part in enumerate(parts))
    regex = "".join(re.escape(part) if i % 2 == 0 else (r"\d+" if part == "process" else "[^/]+")
                    for i, part in enumerate(parts))
    return pattern, re.compile(regex)


@dataclass(frozen=True)
class Destinations:
    """Where the processes of a run write: `--dst-dir` as given and, per process, its expansion (absolute), its
    host and the token of the lock it took (None unless it is the lowest process of its folder, which locks it)."""

    template: str
    folders: tuple[str, ...]
    hosts: tuple[str, ...]
    tokens: tuple[str | None, ...]

    @classmethod
    def shared(cls, dst_dir: str, processes: int, host: str = "") -> Destinations:
        """One folder for every process (a plain `--dst-dir`), locked by process 0."""
        return cls(dst_dir, (os.path.abspath(dst_dir),) * processes, (host,) * processes,
                   (None,) * processes)

    @property
    def per_process(self) -> bool:
        """Whether `--dst-dir` has placeholders: folders are then named with their hosts and each gets a manifest."""
        return has_placeholders(self.template)

    def locker(self, process: int) -> int:
        """The lowest process writing into `process`'s folder (it locked it, and surveys it after the run)."""
        return self.folders.index(self.folders[process])

    def writers(self, process: int) -> tuple[int, ...]:
        """The processes writing into `process`'s folder."""
        return tuple(p for p, folder in enumerate(self.folders) if folder == self.folders[process])

    @property
    def lockers(self) -> tuple[int, ...]:
        """The lowest process of each folder, in process order."""
        return tuple(p for p in range(len(self.folders)) if self.locker(p) == p)


@dataclass(frozen=True)
class ProcessView:
    """What one process sees: its host, its expansion of the source folder, the rank files found there and
    their stamps (size and time of each file), and the checkpoint files of a folder that is no source
    (`strays`: no rank folders, no index; e.g. a part of a unified checkpoint)."""

    process: int
    host: str
    src_dir: str
    rank_files: dict[int, str]
    stamps: dict[int, FileStamp] = field(default_factory=dict)
    strays: tuple[str, ...] = ()

    @property
    def unified(self) -> bool:
        """Whether this process sees a unified checkpoint (the folder itself, or one file in it), not rank folders."""
        return any(path == self.src_dir or os.path.dirname(path) == self.src_dir for path in self.rank_files.values())

    def group_key(self, per_process: bool) -> tuple[object, ...]:
        """Processes with the same key see the same folder: same path and same rank files with the same stamps
        (with placeholders, on the same host too); a path that is node-local on several hosts lists different
        files, or files of other sizes or times."""
        files = tuple(sorted(self.rank_files.items())), tuple(sorted(self.stamps.items()))
        return (self.host, self.src_dir, files) if per_process else (self.src_dir, files)


@dataclass(frozen=True)
class SourceCopy:
    """One copy of a source rank's file: where it is, its stamp, and every process seeing it (lowest first)."""

    rank: int
    host: str
    path: str
    stamp: FileStamp
    seen_by: tuple[int, ...]

    @property
    def process(self) -> int:
        """The lowest process seeing this copy (named in messages)."""
        return self.seen_by[0]

    @property
    def size(self) -> int:
        return sum(size for _, size, _ in self.stamp)

    def describe(self) -> str:
        """"process 2 (host b) /x/rank_3/c.ckpt: 1234 bytes, modified 2026-12-01 10:00:00.123456789 UTC"."""
        latest = max((mtime for _, _, mtime in self.stamp), default=0)
        return f"process {self.process} (host {self.host}) {self.path}: {self.size} bytes, modified {format_ns(latest)}"


def format_ns(ns: int) -> str:
    """A time in nanoseconds since the epoch, in UTC to the nanosecond."""
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(ns // 10**9))}.{ns % 10**9:09d} UTC"


def differing_copies(views: Sequence[ProcessView]) -> dict[int, list[SourceCopy]]:
    """Source rank -> its copies (one per host, path and stamp), for every rank whose copies do not all have
    the same stamp: node-local copies that may hold different checkpoints (copies on a shared folder, or
    node-local ones made with their times kept, agree)."""
    seen: dict[int, dict[tuple[str, str, FileStamp], list[int]]] = {}
    for view in views:
        for rank, path in view.rank_files.items():
            seen.setdefault(rank, {}).setdefault((view.host, path, view.stamps.get(rank, ())), []).append(view.process)
    return {rank: [SourceCopy(rank, host, path, stamp, tuple(processes))
                   for (host, path, stamp), processes in found.items()]
            for rank, found in sorted(seen.items()) if len({stamp for _, _, stamp in found}) > 1}


def checksum_readers(differing: Mapping[int, Sequence[SourceCopy]]) -> dict[tuple[int, str, str, FileStamp], int]:
    """Which process checksums each copy: the copies a process group sees dealt round-robin over the group, so
    the processes of one host share the reading."""
    readers: dict[tuple[int, str, str, FileStamp], int] = {}
    dealt: dict[tuple[int, ...], int] = {}
    for copies in differing.values():
        for copy in copies:
            turn = dealt.get(copy.seen_by, 0)
            readers[copy.rank, copy.host, copy.path, copy.stamp] = copy.seen_by[turn % len(copy.seen_by)]
            dealt[copy.seen_by] = turn + 1
    return readers


def header_share(views: Sequence[ProcessView], process: int, per_process: bool) -> list[int]:
    """The ranks whose headers `process` reads: the rank files of its folder dealt round-robin over the
    processes seeing the same folder (each file once per folder)."""
    mine = views[process]
    group = [v.process for v in views if v.group_key(per_process) == mine.group_key(per_process)]
    return sorted(mine.rank_files)[group.index(process)::len(group)]


@dataclass(frozen=True)
class Placement:
    """Who sees which rank file, gathered from every process's view."""

    views: tuple[ProcessView, ...]

    @property
    def seen_by(self) -> dict[int, tuple[int, ...]]:
        """Source rank -> the processes that see its file."""
        found: dict[int, list[int]] = {}
        for view in self.views:
            for rank in view.rank_files:
                found.setdefault(rank, []).append(view.process)
        return {rank: tuple(found[rank]) for rank in sorted(found)}

    @property
    def rank_files(self) -> dict[int, str]:
        """Source rank -> its file, as the lowest process seeing it names it."""
        files: dict[int, str] = {}
        for view in self.views:
            for rank, path in view.rank_files.items():
                files.setdefault(rank, path)
        return dict(sorted(files.items()))

    def refuse_partial_unified(self, template: str) -> None:
        """A unified source some process sees whole while another process's folder holds checkpoint files that
        are no source (shards or hyper_param.safetensors without the index): the shared folder would read them,
        the job would not (SourceMissingError naming them)."""
        seen = next((v for v in self.views if v.unified), None)
        strays = [v for v in self.views if v.strays]
        if seen is None or not strays:
            return
        held = "; ".join(f"process {v.process} (host {v.host}) {v.src_dir}: {', '.join(v.strays)}" for v in strays)
        raise SourceMissingError(
            f"{template}: process {seen.process} (host {seen.host}) sees the unified checkpoint "
            f"{seen.rank_files[0]}, but other processes' folders hold checkpoint files that are no source on their "
            f"own ({held}): a unified checkpoint split over processes is read from one folder only. Put all its "
            "files, with its index, in each folder holding any of them")

    def describe(self, limit: int = 16) -> str:
        """Who holds what, for messages: "process 0 (host a, /x/p0): ranks [0, 1]; ..." (`limit` processes)."""
        shown = "; ".join(f"process {v.process} (host {v.host}, {v.src_dir}): "
                          f"{_ranks(sorted(v.rank_files)) if v.rank_files else 'no rank files'}"
                          for v in self.views[:limit])
        more = len(self.views) - limit
        return shown + (f"; and {more} more process{'es' if more > 1 else ''}" if more > 0 else "")


def choose_holder(rank: int, target: int, process: int, seen_by: Mapping[int, Sequence[int]],
                  hosts: Sequence[str], load: Mapping[int, int]) -> int:
    """The process to read source rank `rank`'s slices for target `target` written by `process`: itself when
    it sees the file, else one on its host, else any; among those the one least loaded so far (`load`: bytes
    already asked of each), ties rotating with the target so different targets spread over replicas."""
    candidates = list(seen_by[rank])
    if process in candidates:
        return process
    near = [p for p in candidates if hosts[p] == hosts[process]] or candidates
    return min(near, key=lambda p: (load.get(p, 0), (p - target) % len(hosts)))


def transfer_weights(seen_by: Mapping[int, Sequence[int]], hosts: Sequence[str]) -> dict[int, np.ndarray]:
    """Source rank -> per process, the cost of a byte of its file written there: 0 where the process sees
    the file, SAME_HOST_WEIGHT where a process of its host does (`choose_holder` asks that one), else
    OTHER_HOST_WEIGHT."""
    host_ids = np.unique(np.asarray(hosts, dtype=object), return_inverse=True)[1]
    weights = {}
    for rank, holders in seen_by.items():
        cost = np.where(np.isin(host_ids, host_ids[list(holders)]), SAME_HOST_WEIGHT, OTHER_HOST_WEIGHT)
        cost[list(holders)] = 0
        weights[rank] = cost.astype(np.int64)
    return weights


def deal_near_sources(items: Sequence[T], size: Callable[[T], int], reads: Callable[[T], Mapping[int, int]],
                      seen_by: Mapping[int, Sequence[int]], hosts: Sequence[str]) -> list[list[T]]:
    """Items per process (one process per entry of `hosts`), largest first (ties: earlier item), each onto
    the process that would receive the fewest bytes of it (`reads`: source rank -> bytes, weighted by
    `transfer_weights`) among those it leaves within the worst case of dealing by size alone (average load
    plus (1 - 1/processes) x the largest item; the least-loaded process always is); ties: least loaded,
    fewer items, lower process. Where every process sees every file this is `deal_by_size`. Deterministic."""
    processes = len(hosts)
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    ordered = sorted(items, key=lambda i: -size(i))
    bound = sum(map(size, ordered)) + (processes - 1) * max(map(size, ordered), default=0)  # x processes
    weights = transfer_weights(seen_by, hosts)
    nobody = np.full(processes, OTHER_HOST_WEIGHT, dtype=np.int64)  # a file no process sees (never planned)
    loads = np.zeros(processes, dtype=np.int64)
    counts = np.zeros(processes, dtype=np.int64)
    shares: list[list[T]] = [[] for _ in range(processes)]
    for item in ordered:
        moved = np.zeros(processes, dtype=np.int64)
        for rank, nbytes in reads(item).items():
            moved += nbytes * weights.get(rank, nobody)
        fits = np.flatnonzero((loads + size(item)) * processes <= bound)
        process = int(fits[np.lexsort((fits, counts[fits], loads[fits], moved[fits]))[0]])
        loads[process] += size(item)
        counts[process] += 1
        shares[process].append(item)
    return shares


def _ranks(ranks: Sequence[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return f"ranks [{shown}{', ...' if len(ranks) > 16 else ''}]"
