"""Patterns every parallel command shares (transform, verify, convert, unify), over the `Comm` of
mpickpt/mpi.py: the coordinator prepares and every process gets the result or the coordinator's error;
work is dealt by size; a failing process ends the whole run with its message."""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn, TextIO, TypeVar

from .errors import MpickptError
from .mpi import Comm

T = TypeVar("T")


def broadcast_prepared(prepare: Callable[[], T], comm: Comm) -> T:
    """Rank 0 runs `prepare`; every rank returns its result, or raises rank 0's error (as a plain
    MpickptError of the same type, so it always pickles; an unexpected error names process 0, as in `agree`)."""
    result: T | None = None
    error: MpickptError | None = None
    if comm.rank == 0:
        try:
            result = prepare()
        except Exception as exc:
            if comm.size == 1:
                raise
            error = exc if isinstance(exc, MpickptError) else MpickptError(f"process 0: {type(exc).__name__}: {exc}")
            error = type(error)(str(error))
    result, error = comm.bcast((result, error), root=0)
    if error is not None:
        raise error
    return result  # type: ignore[return-value]  # rank 0 prepared it, or raised


def agree(work: Callable[[], T], comm: Comm) -> list[T]:
    """Every rank runs `work`; every rank returns all ranks' results, in rank order, or raises the error of
    the lowest failing rank (as a plain error of the same type; an error other than MpickptError becomes one
    naming that rank). Results travel pickled, so one that does not pickle fails like any error instead of
    leaving the others waiting."""
    mine: tuple[bytes, MpickptError | None]
    try:
        mine = (pickle.dumps(work()), None)
    except Exception as exc:
        if comm.size == 1:
            raise
        # An unexpected error (OSError, a bug) is often this process's alone (its host's files): name the process.
        error = exc if isinstance(exc, MpickptError) else MpickptError(f"process {comm.rank}: "
                                                                       f"{type(exc).__name__}: {exc}")
        mine = (b"", type(error)(str(error)))
    gathered = comm.allgather(mine)
    for _, failed in gathered:
        if failed is not None:
            raise failed
    return [pickle.loads(data) for data, _ in gathered]


def deal_by_size(items: Sequence[T], size: Callable[[T], int], processes: int,
                 allowed: Callable[[T], Sequence[int]] | None = None) -> list[list[T]]:
    """Items per process: largest first onto the process with the fewest bytes so far (ties: fewer items,
    lower process), among the processes `allowed(item)` names (None: any). Deterministic; extra processes get
    nothing."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    loads = [(0, 0, p) for p in range(processes)]
    shares: list[list[T]] = [[] for _ in range(processes)]
    for item in sorted(items, key=lambda i: -size(i)):
        load, count, process = min(loads) if allowed is None else min(loads[p] for p in allowed(item))
        loads[process] = (load + size(item), count + 1, process)
        shares[process].append(item)
    return shares


def fail(comm: Comm, exc: BaseException, where: str, stream: TextIO = sys.stderr, status: int = 1) -> NoReturn:
    """Raise in a one-process world; otherwise print `mpickpt: <where>: <message>` and abort every process
    with exit status `status`."""
    if comm.size == 1:
        raise exc
    text = str(exc) if isinstance(exc, MpickptError) else f"{type(exc).__name__}: {exc}"
    print(f"\nmpickpt: {where}: {text}", file=stream, flush=True)
    comm.abort(status)
