"""One way to write any file mpickpt produces: stream it under a temporary name unique to this writer,
then fsync, rename into place and fsync the folder (the fsyncs skipped with ``sync=False``).

Temporary names carry the host, the process id and a random token (``.<name>.<host>.<pid>.<token>.tmp``),
so two writers never share one, even two runs into the same folder; a reader never sees a partial file
under a final name. A writer removes the temporaries of its target left by dead processes of its host, and
the driver sweeps its output folders the same way at the end of a run.
"""

from __future__ import annotations

import glob
import os
from abc import abstractmethod
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from .errors import DestinationError

TMP_SUFFIX = ".tmp"


def tmp_path_for(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary name beside ``path``, unique to this call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{_host()}.{os.getpid()}.{os.urandom(4).hex()}{TMP_SUFFIX}")


def _host() -> str:
    return os.uname().nodename.split(".")[0] or "host"


def stray_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Temporaries that writers of ``path`` left beside it (crashed, or still running)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}") if p.is_file())


def remove_dead_temporaries(path: str | os.PathLike[str]) -> None:
    """Remove the temporaries of ``path`` left by processes of this host that no longer run."""
    for tmp in stray_temporaries(path):
        _remove_if_dead(tmp)


def remove_dead_temporaries_in(folders: Iterable[str | os.PathLike[str]]) -> None:
    """Remove every temporary in ``folders`` (not below) left by a process of this host that no longer runs."""
    for folder in folders:
        for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
            _remove_if_dead(tmp)


def _writer_of(name: str) -> tuple[str, int] | None:
    """(host, pid) of the writer of a temporary named ``.<name>.<host>.<pid>.<token>.tmp``, else None."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    parts = name[1:-len(TMP_SUFFIX)].rsplit(".", 3)
    if len(parts) != 4 or not parts[2].isdigit() or not parts[0]:
        return None
    return parts[1], int(parts[2])


def _remove_if_dead(tmp: Path) -> None:
    writer = _writer_of(tmp.name)
    if writer is not None and writer[0] == _host() and not _alive(writer[1]) and tmp.is_file():
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not: an aborted MPI rank whose parent has not reaped it,
    common in containers whose init does not reap orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CommitOnExit:
    """A context manager that commits on a clean exit and aborts on an exception."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    @abstractmethod
    def commit(self) -> None:
        """Put the result in place."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written."""


class AtomicFile(CommitOnExit):
    """A file being written under a temporary name; :meth:`commit` puts it in place, :meth:`abort` drops it.

    ``mode`` is applied before the rename (0o400 for checkpoints, as MindSpore); a read-only file already
    under the final name is replaced. Missing parent folders are created (mode 0700). ``forbidden_dirs``
    are source folders: a target inside one is refused before anything is created.
    """

    def __init__(self, path: str | os.PathLike[str], *, sync: bool = True, mode: int = 0o644,
                 forbidden_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
        from .destination import refuse_destination_inside

        self.path = Path(path)
        self.sync = sync
        self._mode = mode
        refuse_destination_inside(self.path, forbidden_dirs)
        self.tmp = tmp_path_for(self.path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            remove_dead_temporaries(self.path)
            self._fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise DestinationError(f"{self.path}: cannot create a file here: {err.strerror or err}") from err

    @property
    def fd(self) -> int:
        """The descriptor of the temporary file (DestinationError once committed or aborted)."""
        if self._fd is None:
            raise DestinationError(f"{self.path}: writer is already closed")
        return self._fd

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append all of ``data``."""
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as err:
            raise DestinationError(f"{self.path}: cannot write: {err.strerror or err}") from err

    def commit(self) -> None:
        """fsync (unless sync is off), set the mode, rename over the target, fsync the folder."""
        fd = self.fd
        try:
            os.fchmod(fd, self._mode)
            if self.sync:
                os.fsync(fd)
            os.close(fd)
            self._fd = None
            os.replace(self.tmp, self.path)
            if self.sync:
                fsync_dir(self.path.parent)
        except OSError as err:
            self.abort()
            raise DestinationError(f"{self.path}: cannot finish the file: {err.strerror or err}") from err

    def abort(self) -> None:
        """Drop the temporary file; the target is left as it was."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, sync: bool = True, mode: int = 0o644,
                       forbidden_dirs: Iterable[str | os.PathLike[str]] = ()) -> None:
    """Write a small file in one go, atomically."""
    with AtomicFile(path, sync=sync, mode=mode, forbidden_dirs=forbidden_dirs) as out:
        out.write(data)
