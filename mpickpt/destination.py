"""Where outputs may go: never into a folder that is read from, and only one run at a time.

Folders are compared by identity, (st_dev, st_ino), not by name: a destination reached through a symlink,
a bind mount or a hard-linked folder is still recognised as the source folder it is. The run's lock is an
advisory `flock` on `dst_dir/.mpickpt.lock`; the kernel drops it when the holding process ends, so the
file a killed run leaves never blocks the next one. The lock file also holds a random token of the run
(`lock_token`): a process that reads back another token, or none, under the same path is not seeing the
folder that was locked (a node-local path on several hosts).
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterable, Iterator
from typing import Protocol, TextIO

from .errors import DestinationError

LOCK_NAME = ".mpickpt.lock"
_NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)  # filesystems without flock

Identity = tuple[int, int]


class _Options(Protocol):
    """The TransformOptions fields that name folders read from."""

    @property
    def src_dir(self) -> str: ...
    @property
    def src_strategy_dir(self) -> str | None: ...
    @property
    def dst_strategy_dir(self) -> str | None: ...


def source_folders(options: _Options) -> list[str]:
    """The folders a transform reads from (the source checkpoints and any per-stage strategy folders)."""
    return [options.src_dir] + [d for d in (options.src_strategy_dir, options.dst_strategy_dir) if d]


def check_prefix(prefix: str) -> None:
    """Refuse an output name prefix that is not a plain file-name prefix."""
    if "\0" in prefix or "/" in prefix or os.sep in prefix or ".." in prefix or os.path.isabs(prefix):
        raise DestinationError(f"prefix {prefix!r}: must be a plain file-name prefix (no '/', '..' or NUL)")


def check_destination(dst_dir: str | os.PathLike[str], read_dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse a destination that is or lies inside a folder read from (or one of its subfolders, which
    catches a bind mount of a rank folder), that exists as a non-folder, or that cannot be written."""
    if not os.fspath(dst_dir):
        raise DestinationError("dst_dir: no destination folder given")
    _refuse_inside(dst_dir, read_dirs, depth=1)
    _refuse_unwritable_folder(os.fspath(dst_dir), f"dst_dir {os.fspath(dst_dir)}")


def refuse_unwritable_outputs(outputs: Iterable[str]) -> None:
    """Refuse, before anything is written, outputs that could not be written: a folder of theirs that exists
    as a non-folder or cannot be written (a read-only mount), or a folder under an output's name."""
    outputs = list(outputs)
    for folder in sorted({os.path.dirname(os.path.abspath(output)) for output in outputs}):
        _refuse_unwritable_folder(folder, folder)
    for output in outputs:
        if os.path.isdir(output):
            raise DestinationError(f"{output}: a folder has this output's name")


def _refuse_unwritable_folder(folder: str, named: str) -> None:
    """Raise DestinationError (message starting with `named`) unless `folder`, or the nearest existing folder
    above it, is a folder this process can create files in."""
    existing = next(p for p in _ancestors(os.path.abspath(folder)) if os.path.lexists(p))
    if not os.path.isdir(existing):
        raise DestinationError(f"{named}: {existing} exists and is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DestinationError(f"{named}: folder {existing} is not writable")


def refuse_destination_inside(dst: str | os.PathLike[str], read_dirs: Iterable[str | os.PathLike[str]]) -> None:
    """Raise DestinationError when dst is, or lies inside, a folder that is read from (by device and inode)."""
    _refuse_inside(dst, read_dirs, depth=0)


def refuse_outputs_beside_sources(outputs: Iterable[str], sources: Iterable[str]) -> None:
    """Refuse an output that would go into the folder of a source file (compared by device and inode:
    e.g. a source rank folder that is a symlink into the destination), where it could replace a source."""
    folders: dict[Identity, str] = {}
    for source in sources:
        identity = _identity(os.path.dirname(os.path.abspath(source)))
        if identity is not None:
            folders.setdefault(identity, source)
    for output in outputs:
        beside = folders.get(_identity(os.path.dirname(os.path.abspath(output))) or (-1, -1))
        if beside is not None:
            raise DestinationError(f"{output}: refusing to write into the folder of source file {beside}: "
                                   "mpickpt never writes into its sources")


def _refuse_inside(dst: str | os.PathLike[str], read_dirs: Iterable[str | os.PathLike[str]], depth: int) -> None:
    containing = _containing_identities(dst)
    for folder in read_dirs:
        for sub, identity in _folder_identities(folder, depth):
            if identity in containing:
                seen_as = "" if sub == os.fspath(folder) else f" (as {sub})"
                raise DestinationError(f"{dst}: refusing to write inside source folder {folder}{seen_as}: "
                                       "mpickpt never writes into its sources")


def _ancestors(path: str) -> Iterator[str]:
    """`path` and every folder above it, up to the root."""
    while True:
        yield path
        parent = os.path.dirname(path)
        if parent == path:
            return
        path = parent


def _containing_identities(path: str | os.PathLike[str]) -> set[Identity]:
    """Identities of the existing folders holding `path` (itself included), along both its written and its
    resolved path (symlinks followed)."""
    identities = set()
    for spelling in {os.path.abspath(path), os.path.realpath(path)}:
        for folder in _ancestors(spelling):
            identity = _identity(folder)
            if identity is not None:
                identities.add(identity)
    return identities


def _folder_identities(folder: str | os.PathLike[str], depth: int) -> list[tuple[str, Identity]]:
    """(path, identity) of `folder` and of its subfolders down to `depth` levels."""
    identity = _identity(folder)
    if identity is None:
        return []
    found = [(os.fspath(folder), identity)]
    if depth > 0:
        try:
            with os.scandir(folder) as entries:
                subfolders = [e.path for e in entries if e.is_dir()]
        except OSError:
            subfolders = []
        for sub in subfolders:
            found += _folder_identities(sub, depth - 1)
    return found


def _identity(path: str | os.PathLike[str]) -> Identity | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DestinationLock:
    """The advisory lock of one run on its destination folder (see the module docstring)."""

    def __init__(self, path: str, fd: int | None, token: str = "") -> None:
        self.path = path
        self._fd = fd
        self.token = token  # written into the lock file (see lock_token)

    @property
    def held(self) -> bool:
        """False when the filesystem does not support locks (the run goes on unlocked)."""
        return self._fd is not None

    @classmethod
    def acquire(cls, dst_dir: str) -> DestinationLock:
        """Create dst_dir if needed and lock it, or raise DestinationError naming the run that holds it."""
        path = os.path.join(dst_dir, LOCK_NAME)
        try:
            os.makedirs(dst_dir, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise DestinationError(f"dst_dir {dst_dir}: cannot create {LOCK_NAME}: {err.strerror or err}") from err
        token = os.urandom(16).hex()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in _NO_LOCKS:
                _write_holder(fd, token)
                os.close(fd)
                return cls(path, None, token)
            holder = _read_holder(fd)
            os.close(fd)
            raise DestinationError(f"dst_dir {dst_dir}: another mpickpt run is writing here ({holder}, lock "
                                   f"{path}); wait for it to end or choose another dst_dir") from None
        _write_holder(fd, token)
        return cls(path, fd, token)

    def release(self) -> None:
        """Drop the lock (the file stays: removing it could let two runs lock different files)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_for_run(dst_dir: str, stream: TextIO) -> DestinationLock:
    """Lock dst_dir for a run (DestinationLock.acquire), with a warning on `stream` where locks are unsupported."""
    lock = DestinationLock.acquire(dst_dir)
    if not lock.held:
        print(f"mpickpt: warning: {dst_dir}: the filesystem does not support locks; "
              "a concurrent run into the same folder would not be noticed", file=stream, flush=True)
    return lock


def lock_token(dst_dir: str) -> str | None:
    """The token in dst_dir's lock file as this process sees it (None: no lock file, or none in it)."""
    try:
        with open(os.path.join(dst_dir, LOCK_NAME), encoding="utf-8", errors="replace") as file:
            text = file.read(400)
    except OSError:
        return None
    return next((line.removeprefix("token=") for line in text.splitlines() if line.startswith("token=")), None)


def _write_holder(fd: int, token: str) -> None:
    """Write "host=H pid=P" and the run's token into the lock file, synced: other hosts read it back."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"host={os.uname().nodename} pid={os.getpid()}\ntoken={token}\n".encode(), 0)
    os.fsync(fd)


def _read_holder(fd: int) -> str:
    """The holder's "host=H pid=P" as written in the lock file."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text.split("\n", 1)[0] or "host and pid not yet written"
