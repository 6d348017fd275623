"""The only module that imports mpi4py: a small communicator and its one-process stand-in.

`world()` returns an MPI communicator when the process was started by mpirun/mpiexec (MPICH's Hydra, Open MPI)
or by Slurm's srun, and a `SerialComm` otherwise, so plain serial use never loads an MPI library.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any, NoReturn, Protocol, TypeVar

from .errors import LaunchError, MpickptError

T = TypeVar("T")

# Launcher variables that carry the number of processes started, most specific first: Open MPI, PMI-1/PMI-2
# launchers (MPICH's Hydra, Intel MPI, srun --mpi=pmi2), MVAPICH. Hydra and Open MPI started inside a Slurm
# allocation set Slurm's step variables for their proxies too, so Slurm's come last.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
# Variables that show a launcher started the process even when the size is not among them (PMIx servers).
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMI_FD", "PMI_PORT", "PMIX_RANK", "MV2_COMM_WORLD_RANK")

MESSAGE_TAG = 7  # the driver's point-to-point messages (progress, results)
ABORT_GRACE_SECONDS = 0.3  # between printing a failure and MPI_Abort
INTERRUPTED = 130  # 128 + SIGINT: the status of a job ended by Ctrl-C


class Request(Protocol):
    """A nonblocking operation in flight."""

    def test(self) -> bool:
        """True once the operation has finished (never waits)."""
        ...


class Comm(Protocol):
    """What the driver needs from a communicator. All methods are called by the process that owns it."""

    rank: int
    size: int

    def bcast(self, obj: T, root: int = 0) -> T:
        """Called on all ranks: root's `obj` on every rank."""
        ...

    def allgather(self, obj: T) -> list[T]:
        """Called on all ranks: every rank's `obj`, in rank order."""
        ...

    def send(self, obj: Any, dest: int, tag: int = MESSAGE_TAG) -> None:
        """Post a small message to `dest` and return at once (delivery finishes in flush())."""
        ...

    def poll(self, tag: int = MESSAGE_TAG) -> list[tuple[int, Any]]:
        """Messages with `tag` that have arrived, as (source rank, object), without waiting."""
        ...

    def isend_bytes(self, data: Any, dest: int, tag: int) -> Request:
        """Start sending a buffer to `dest` (keep it unchanged until the request has finished)."""
        ...

    def irecv_bytes(self, out: Any, source: int, tag: int) -> Request:
        """Start receiving exactly len(out) bytes from `source` into the writable buffer `out`; receives
        from one source with one tag match that source's sends in order."""
        ...

    def ibarrier(self) -> Request:
        """Called on all ranks: a barrier that finishes once every rank has entered it."""
        ...

    def flush(self) -> None:
        """Wait until every posted message has left this process."""
        ...

    def abort(self, code: int) -> NoReturn:
        """End every process of the world with exit code `code`."""
        ...

    def aborted(self) -> bool:
        """Whether another process has aborted the world (where aborting does not end this process at once)."""
        ...


class SerialComm:
    """A world of one process: collectives return at once; messages to self are queued."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self._inbox: dict[int, list[tuple[int, Any]]] = {}

    def bcast(self, obj: T, root: int = 0) -> T:
        """Return `obj`."""
        return obj

    def allgather(self, obj: T) -> list[T]:
        """[obj]."""
        return [obj]

    def send(self, obj: Any, dest: int, tag: int = MESSAGE_TAG) -> None:
        """Queue `obj` for this process's next poll(tag)."""
        if dest != 0:
            raise ValueError(f"serial world has no process {dest}")
        self._inbox.setdefault(tag, []).append((0, obj))

    def poll(self, tag: int = MESSAGE_TAG) -> list[tuple[int, Any]]:
        """Return and clear the queued messages of `tag`."""
        return self._inbox.pop(tag, [])

    def isend_bytes(self, data: Any, dest: int, tag: int) -> Request:
        """A serial world has no peer to send buffers to."""
        raise ValueError("serial world: no other process to send buffers to")

    def irecv_bytes(self, out: Any, source: int, tag: int) -> Request:
        """A serial world has no peer to receive buffers from."""
        raise ValueError("serial world: no other process to receive buffers from")

    def ibarrier(self) -> Request:
        """Finished at once."""
        return _Done()

    def flush(self) -> None:
        """Nothing is ever in flight."""

    def abort(self, code: int) -> NoReturn:
        """Exit this (only) process."""
        sys.exit(code)

    def aborted(self) -> bool:
        """No other process to abort."""
        return False


class _Done:
    """A request that has already finished."""

    def test(self) -> bool:
        return True


class _MpiRequest:
    """An mpi4py request, holding on to its buffer until it finishes; a receive checks it got `expect` bytes."""

    def __init__(self, request: Any, buffer: Any = None, expect: int | None = None) -> None:
        self._request = request
        self._buffer = buffer
        self._expect = expect

    def test(self) -> bool:
        from mpi4py import MPI

        if self._request is None:
            return True
        status = MPI.Status()
        if not self._request.Test(status):
            return False
        self._request = self._buffer = None
        if self._expect is not None and status.Get_count(MPI.BYTE) != self._expect:
            raise MpickptError(f"a message from process {status.Get_source()} had {status.Get_count(MPI.BYTE)} "
                               f"bytes, {self._expect} were expected")
        return True


class MpiComm:
    """Thin wrapper over an mpi4py communicator (a private duplicate, so our tags meet nobody else's)."""

    def __init__(self, comm: Any) -> None:
        self._mpi = comm.Dup()
        self._world = comm
        self.rank: int = self._mpi.Get_rank()
        self.size: int = self._mpi.Get_size()
        self._pending: list[Any] = []

    def bcast(self, obj: T, root: int = 0) -> T:
        """Called on all ranks: root's `obj` on every rank (pickled)."""
        return self._mpi.bcast(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        """Called on all ranks: every rank's `obj` (pickled), in rank order."""
        return self._mpi.allgather(obj)

    def send(self, obj: Any, dest: int, tag: int = MESSAGE_TAG) -> None:
        """Non-blocking pickled send; finished sends are pruned as new ones are posted."""
        self._pending = [req for req in self._pending if not req.Test()]
        self._pending.append(self._mpi.isend(obj, dest=dest, tag=tag))

    def poll(self, tag: int = MESSAGE_TAG) -> list[tuple[int, Any]]:
        """Receive every message of `tag` already matched by a probe, without waiting."""
        from mpi4py import MPI

        messages = []
        status = MPI.Status()
        while (message := self._mpi.improbe(source=MPI.ANY_SOURCE, tag=tag, status=status)) is not None:
            messages.append((status.Get_source(), message.recv()))
        return messages

    def isend_bytes(self, data: Any, dest: int, tag: int) -> Request:
        """MPI_Isend of raw bytes."""
        from mpi4py import MPI

        return _MpiRequest(self._mpi.Isend([data, MPI.BYTE], dest=dest, tag=tag), data)

    def irecv_bytes(self, out: Any, source: int, tag: int) -> Request:
        """MPI_Irecv of raw bytes."""
        from mpi4py import MPI

        return _MpiRequest(self._mpi.Irecv([out, MPI.BYTE], source=source, tag=tag), out, memoryview(out).nbytes)

    def ibarrier(self) -> Request:
        """MPI_Ibarrier."""
        return _MpiRequest(self._mpi.Ibarrier())

    def flush(self) -> None:
        """Wait for every posted send."""
        for req in self._pending:
            req.Wait()
        self._pending = []

    def abort(self, code: int) -> NoReturn:
        """MPI_Abort on COMM_WORLD: the launcher ends every process (after a short grace, so it has forwarded
        this process's last lines: without it a loaded machine once lost the failing process's message)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE_SECONDS)
        self._world.Abort(code)
        os._exit(code)  # Abort does not return; this only satisfies NoReturn

    def aborted(self) -> bool:
        """Never seen: MPI_Abort anywhere ends this process through the launcher."""
        return False


def launched(env: Mapping[str, str]) -> bool:
    """True when a launcher (mpiexec/mpirun or srun, not an sbatch script itself) started this process."""
    return (any(name in env for name in SIZE_VARIABLES + RANK_VARIABLES)
            or ("SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env))


def launched_size(env: Mapping[str, str]) -> int | None:
    """How many processes the launcher says it started, or None when it does not say."""
    for name in SIZE_VARIABLES:
        if name in env:
            return _int_variable(env, name)
    if "SLURM_STEP_ID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return _int_variable(env, "SLURM_STEP_NUM_TASKS")
    return None


def _int_variable(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except ValueError:
        return None


def world(env: Mapping[str, str] | None = None) -> Comm:
    """COMM_WORLD wrapped when launched by mpirun/mpiexec/srun, else a SerialComm.

    Open MPI's launcher is recognised and, unless the user chose otherwise, mpi4py's wheel is told to use the
    Open MPI library (MPI4PY_MPIABI=openmpi). Raises LaunchError when mpi4py cannot be imported under a
    launcher, or when MPI's world size differs from what the launcher started (for example srun without
    --mpi=pmi2, which would give N one-process worlds each converting everything).
    """
    env = os.environ if env is None else env
    if not launched(env):
        return SerialComm()
    if "OMPI_COMM_WORLD_SIZE" in env and not env.get("MPI4PY_MPIABI") and not env.get("MPI4PY_LIBMPI"):
        os.environ["MPI4PY_MPIABI"] = "openmpi"
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise LaunchError(f"started by an MPI launcher but mpi4py cannot be imported: {exc}") from exc
    comm = MpiComm(MPI.COMM_WORLD)
    expected = launched_size(env)
    if expected is not None and expected != comm.size:
        raise LaunchError(
            f"the launcher started {expected} processes but MPI formed a world of {comm.size}: "
            "mpi4py uses another MPI library than the launcher, or srun lacks --mpi=pmi2/pmix "
            "(see launch/README.md)")
    if comm.size > 1:
        _end_job_on_interrupt(comm)
    return comm


def _end_job_on_interrupt(comm: Comm) -> None:
    """Make SIGINT (Ctrl-C) reaching any one process end the whole job (status 130), naming the process. A
    KeyboardInterrupt raised on one process between collectives (while reading headers, say) ended only that
    process, and the others waited for it in the next collective forever. Left alone where the program set
    its own handler, and off the main thread (where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return

    def interrupted(signum: int, frame: object) -> None:
        print(f"\nmpickpt: process {comm.rank}: interrupted", file=sys.stderr, flush=True)
        comm.abort(INTERRUPTED)

    signal.signal(signal.SIGINT, interrupted)
