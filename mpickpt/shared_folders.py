"""Under MPI, `unify` and `convert` read every source file and write every output by path on each process,
from the plan rank 0 made from its own view: their folders must be ones every process shares.

Rank 0 notes what it planned with (`leave_check`: its host, the size and modification time of every source
file, a token file in the destination folder); every process then checks its own view (`confirm_shared`),
and all fail alike before any output is written when one of them sees another file or another folder
under the same path (node-local copies on several hosts). The token file is removed once read: output
folders are left as they would be otherwise. A one-process run does neither step.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from .collective import agree
from .errors import DestinationError, SourceConflictError
from .manifest import SourceStamp, stamp_sources
from .mpi import Comm
from .placement import format_ns
from .sources import stamped_files

TOKEN_PREFIX = ".mpickpt.shared."  # + the run's token: the file rank 0 leaves in the destination


@dataclass(frozen=True)
class SharedCheck:
    """What rank 0 planned with, broadcast with the plan (see the module docstring)."""

    command: str  # "unify" or "convert", for messages
    host: str  # rank 0's
    sources: tuple[SourceStamp, ...]
    destination: str  # absolute folder
    token: str

    @property
    def token_path(self) -> str:
        """The token file rank 0 left in the destination."""
        return os.path.join(self.destination, TOKEN_PREFIX + self.token)


def leave_check(command: str, sources: Iterable[str], destination: str, processes: int) -> SharedCheck | None:
    """Coordinator only, once planned: stamp the source files and leave a token file in `destination`
    (created if missing); None for one process."""
    if processes == 1:
        return None
    from .startup import host_name  # only under MPI: startup imports most of mpickpt

    stamps = stamp_sources(f for source in sources for f in stamped_files(source))
    check = SharedCheck(command, host_name(), stamps, os.path.abspath(destination), os.urandom(16).hex())
    try:
        os.makedirs(check.destination, exist_ok=True)
        with open(check.token_path, "x", encoding="utf-8") as file:
            file.write(check.token)
    except OSError as err:
        raise DestinationError(f"{check.destination}: cannot write in the destination folder: "
                               f"{err.strerror or err}") from err
    return check


def confirm_shared(check: SharedCheck | None, comm: Comm) -> None:
    """Called on all ranks, before any output is written: every process checks its view (`check_view`);
    raises the lowest failing process's error on every process. Rank 0 then removes its token file."""
    if check is None:
        return
    from .startup import host_name

    try:
        agree(lambda: check_view(check, comm.rank, host_name()), comm)
    finally:
        if comm.rank == 0:
            with contextlib.suppress(OSError):
                os.unlink(check.token_path)


def check_view(check: SharedCheck, process: int, host: str) -> None:
    """Raise when this process does not see rank 0's token file, or sees a source file other than the one
    rank 0 stamped."""
    if process != 0 and _read_token(check.token_path) != check.token:
        raise DestinationError(
            f"{check.destination}: process {process} (host {host}) does not see the folder that process 0 (host "
            f"{check.host}) writes into (its check file {os.path.basename(check.token_path)} is not there): the "
            f"path is not one shared folder (a node-local disk on each host?). mpickpt {check.command} writes "
            f"every output by path from the process it is dealt to, so the destination must be one folder every "
            f"process shares")
    for planned in check.sources:
        differs = differences(planned, _stamp(planned.path))
        if differs:
            raise SourceConflictError(
                f"{planned.path}: process {process} (host {host}) does not see the file that process 0 (host "
                f"{check.host}) planned with: {'; '.join(differs)}. mpickpt {check.command} reads every source "
                f"file by path on every process, so the source must be one folder every process shares (copies "
                f"on node-local disks are not supported there)")


def differences(planned: SourceStamp, here: SourceStamp | None) -> list[str]:
    """What differs between a source file as process 0 planned with it and as this process sees it (empty:
    the same file as far as size and modification time tell; device and inode differ between hosts)."""
    if here is None:
        return ["the file is missing here"]
    found = []
    if here.size != planned.size:
        found.append(f"size {here.size:,} bytes here, {planned.size:,} bytes on process 0")
    if here.mtime_ns != planned.mtime_ns:
        found.append(f"modification time {format_ns(here.mtime_ns)} here, {format_ns(planned.mtime_ns)} on "
                     f"process 0")
    return found


def _stamp(path: str) -> SourceStamp | None:
    try:
        return stamp_sources([path])[0]
    except OSError:
        return None


def _read_token(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            return file.read(100)
    except OSError:
        return None
