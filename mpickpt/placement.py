"""Which process sees which source files (pure, no I/O or MPI).

`--src-dir` and `--dst-dir` may hold `{host}` (the short host name) and `{process}` (the MPI process rank),
expanded per process: hosts without a shared filesystem each give their own folder. Every process lists
the rank files it sees (a `ProcessView`); the views, gathered, say who holds what (`Placement`), and for a
slice a target needs from a file its own process does not see, `choose_holder` picks the process to send it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import MpickptError

_PLACEHOLDER = re.compile(r"\{(\w*)\}")
PLACEHOLDERS = ("host", "process")


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


@dataclass(frozen=True)
class ProcessView:
    """What one process sees: its host, its expansion of the source folder and the rank files found there."""

    process: int
    host: str
    src_dir: str
    rank_files: dict[int, str]

    def group_key(self, per_process: bool) -> tuple[object, ...]:
        """Processes with the same key see the same folder: same path and same rank files (with placeholders,
        on the same host too); a path that is node-local on several hosts lists different files."""
        files = tuple(sorted(self.rank_files.items()))
        return (self.host, self.src_dir, files) if per_process else (self.src_dir, files)


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


def _ranks(ranks: Sequence[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return f"ranks [{shown}{', ...' if len(ranks) > 16 else ''}]"
