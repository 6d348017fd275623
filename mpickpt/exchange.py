"""Source slices sent over MPI to the process that writes the target needing them.

Protocol (over the `Comm` of mpickpt/mpi.py, tags CONTROL_TAG and DATA_TAG):

- Before writing a target whose plan reads ranks it does not see, the writing process lists the pieces
  it will take from them in the order the executor takes them (`execute.remote_pieces`), picks a holder
  process per rank (`placement.choose_holder`) and sends each holder one small request (its pieces).
- A holder queues the requests it receives and, whenever it `serve`s (every few MiB while it writes its own
  targets, while it waits for pieces itself, and after its own targets), reads each piece in blocks of
  whole rows of at most `MESSAGE_BYTES` and sends every block as one message, keeping at most a quarter
  of the exchange budget in flight (`COPIES_IN_FLIGHT`).
- The writer receives each block with a nonblocking receive into the target buffer (or a block buffer),
  serving others while it waits; messages from one holder arrive in the order sent, so both sides only
  need the same block split (`blocks`). A receive that makes no progress for `stall_seconds` fails.
- After its own targets every process enters a nonblocking barrier and keeps serving until it finishes:
  by then every request has been served, since a process enters only once it received all its pieces.

A process that dies ends the job through the launcher (MPI_Abort or its exit), so nothing waits forever.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager

import numpy as np

from .errors import CheckpointFormatError, MpickptError
from .execute import Piece, SourceFiles, read_piece_rows, remote_pieces
from .formats import SourceIndex, TensorEntry
from .inventory import SourceHeaders
from .mpi import Comm, Request
from .placement import choose_holder
from .plan import TargetPlan

CONTROL_TAG = 8
DATA_TAG = 9
MESSAGE_BYTES = 64 << 20
DEFAULT_BUDGET = 256 << 20
# Each byte in flight was measured to cost a process about 3.8 bytes of resident memory at the peak (its
# staged copy of strided rows, MPI's copies, the receiving side's staging of what others send it: every
# process both sends and receives), so sends in flight are held to a quarter of the exchange budget.
COPIES_IN_FLIGHT = 4
STALL_SECONDS = 600.0  # a receive with no progress for this long fails the job
IDLE_SLEEP = 0.0005
# MPI moves a large message between processes only while both call into it, so a process waiting for one
# of its receives, or with sends of its own in flight, polls without sleeping, only yielding the CPU to any
# other runnable process (measured on 8 GB, one process holding every file: 14.5 s with a 0.5 ms sleep
# between polls, 13.1 s sleeping once a receive had waited 50 ms, 7.5 s without sleeping); it sleeps
# between polls only when nothing of its own is in flight.


class ExchangeError(MpickptError):
    """A peer stopped sending the pieces asked of it."""


def blocks(piece: Piece, limit: int = MESSAGE_BYTES) -> list[tuple[int, int]]:
    """The messages of one piece: [lo, hi) rows of its box (bytes for whole pieces and 0-d boxes),
    each at most `limit` bytes unless one row is larger. Empty pieces send nothing."""
    if piece.nbytes == 0:
        return []
    if piece.box is None or not piece.box.start:
        units, unit_bytes = piece.nbytes, 1
    else:
        units = piece.box.shape[0]
        unit_bytes = max(1, piece.nbytes // units)
    step = max(1, limit // unit_bytes)
    return [(lo, min(lo + step, units)) for lo in range(0, units, step)]


class Exchange:
    """One process's side of the exchange: serves pieces of the files it sees, fetches those it lacks."""

    def __init__(self, comm: Comm, open_index: Callable[[int], AbstractContextManager[SourceIndex]],
                 seen_by: Mapping[int, Sequence[int]], hosts: Sequence[str], headers: Mapping[int, SourceHeaders],
                 *, budget: int = DEFAULT_BUDGET, message_bytes: int | None = None,
                 stall_seconds: float | None = None, check_unchanged: Callable[[int], None] | None = None) -> None:
        self.comm = comm
        self._open_index = open_index
        self._check_unchanged = check_unchanged  # raises when a rank's file changed while being read
        self.seen_by = {r: tuple(p) for r, p in seen_by.items()}
        self.hosts = tuple(hosts)
        self.headers = dict(headers)
        self.budget = max(1, budget // COPIES_IN_FLIGHT)  # bytes of sends in flight
        self.message_bytes = min(MESSAGE_BYTES, max(self.budget, 1 << 20)) if message_bytes is None else message_bytes
        self.stall_seconds = STALL_SECONDS if stall_seconds is None else stall_seconds
        self.bytes_sent = 0
        self.bytes_received = 0
        self._queue: deque[tuple[int, Piece, int, int]] = deque()  # (dest, piece, lo, hi) still to send
        self._sending: list[tuple[Request, int, Piece]] = []
        self._indexes: dict[int, SourceIndex] = {}
        self._contexts: list[AbstractContextManager[SourceIndex]] = []
        self._load: dict[int, int] = {}
        self._checked_params: set[tuple[int, str]] = set()

    # --- serving ----------------------------------------------------------------------------------

    def serve(self) -> None:
        """Take in requests and send what the budget allows, without waiting."""
        for source, pieces in self.comm.poll(CONTROL_TAG):
            for piece in pieces:
                self._queue.extend((source, piece, lo, hi) for lo, hi in blocks(piece, self.message_bytes))
        self._prune()
        in_flight = sum(n for _, n, _ in self._sending)
        while self._queue and (in_flight < self.budget or not self._sending):
            dest, piece, lo, hi = self._queue.popleft()
            data = read_piece_rows(self._checked(piece), piece, lo, hi)
            if self._check_unchanged is not None:
                self._check_unchanged(piece.rank)  # the rows just read are of the file the job was planned on
            size = memoryview(data).nbytes  # type: ignore[arg-type]  # ndarray, memoryview or bytearray
            self._sending.append((self.comm.isend_bytes(data, dest, DATA_TAG), size, piece))
            in_flight += size
            self.bytes_sent += size

    def _prune(self) -> None:
        """Forget finished sends; drop the mapped pages of pieces no longer being sent from the resident set."""
        sending, done = [], set()
        for request, size, piece in self._sending:
            if request.test():
                done.add((piece.rank, piece.name))
            else:
                sending.append((request, size, piece))
        self._sending = sending
        busy = {(p.rank, p.name) for _, _, p in sending} | {(p.rank, p.name) for _, p, _, _ in self._queue}
        for rank, name in done - busy:
            self._indexes[rank].release(name)

    def _checked(self, piece: Piece) -> SourceIndex:
        """The index of a piece's file, whose parameter must still be as the gathered headers say."""
        index = self._index(piece.rank)
        if (piece.rank, piece.name) in self._checked_params:
            return index
        found = self.headers[piece.rank]
        entry = index.entries.get(piece.name)
        expected = next(((dtype, tuple(dims)) for name, dtype, dims in found.rows if name == piece.name), None)
        if entry is None or expected != (entry.dtype, tuple(entry.dims)) or entry.nbytes != found.nbytes[piece.name]:
            raise CheckpointFormatError(f"{index.path}: parameter {piece.name!r} changed since the job started "
                                        f"(now {entry.dtype + str(list(entry.dims)) if entry else 'missing'}, "
                                        f"was {expected})")
        self._checked_params.add((piece.rank, piece.name))
        return index

    def _index(self, rank: int) -> SourceIndex:
        if rank not in self._indexes:
            context = self._open_index(rank)
            self._indexes[rank] = context.__enter__()
            self._contexts.append(context)
        return self._indexes[rank]

    def finish(self) -> None:
        """Called on every process after its own targets: serve until every process is done."""
        barrier = self.comm.ibarrier()
        while True:
            self._check_aborted()
            self.serve()
            if barrier.test() and not self._queue and all(req.test() for req, _, _ in self._sending):
                break
            if self._sending:
                os.sched_yield()
            else:
                time.sleep(IDLE_SLEEP)
        self._sending = []
        for context in self._contexts:
            context.__exit__(None, None, None)
        self._contexts, self._indexes = [], {}

    def _check_aborted(self) -> None:
        if self.comm.aborted():
            raise ExchangeError("another process failed; stopping the exchange")

    # --- fetching ---------------------------------------------------------------------------------

    def remote(self, plan: TargetPlan, local: Mapping[int, str]) -> RemoteSource:
        """The remote source of one target: asks the holders for every piece its plan reads elsewhere."""
        source = RemoteSource(self, {r: self.headers[r] for r in plan.source_ranks if r not in local})
        with SourceFiles(local, source) as files:
            pieces = remote_pieces(plan, files)
        source.ask(pieces, plan.target_rank)
        return source

    def holder(self, rank: int, target: int, nbytes: int) -> int:
        """The process asked for a rank's pieces (balanced by bytes asked so far)."""
        process = choose_holder(rank, target, self.comm.rank, self.seen_by, self.hosts, self._load)
        self._load[process] = self._load.get(process, 0) + nbytes
        return process

    def wait(self, request: Request, holder: int, what: str) -> None:
        """Wait for one receive, serving others meanwhile; ExchangeError after `stall_seconds` idle."""
        deadline = time.monotonic() + self.stall_seconds
        while not request.test():
            self._check_aborted()
            self.serve()
            if time.monotonic() > deadline:
                raise ExchangeError(f"process {holder} sent nothing of {what} for {self.stall_seconds:.0f} s")
            os.sched_yield()


class RemoteSource:
    """The pieces of one target held by other processes, received in the order they were asked."""

    def __init__(self, exchange: Exchange, headers: Mapping[int, SourceHeaders]) -> None:
        self.exchange = exchange
        self._entries = {rank: header_entries(found) for rank, found in headers.items()}
        self._holders: dict[int, int] = {}
        self._expected: deque[Piece] = deque()

    def entries(self, rank: int) -> dict[str, TensorEntry]:
        """A remote rank's parameters from its gathered headers."""
        return self._entries[rank]

    def ask(self, pieces: Sequence[Piece], target: int) -> None:
        """Send each holder the list of pieces asked of it."""
        by_rank: dict[int, int] = {}
        for piece in pieces:
            by_rank[piece.rank] = by_rank.get(piece.rank, 0) + piece.nbytes
        self._holders = {rank: self.exchange.holder(rank, target, n) for rank, n in sorted(by_rank.items())}
        asked: dict[int, list[Piece]] = {}
        for piece in pieces:
            asked.setdefault(self._holders[piece.rank], []).append(piece)
        for process, listed in sorted(asked.items()):
            self.exchange.comm.send(listed, process, CONTROL_TAG)
        self._expected = deque(pieces)

    def fill(self, piece: Piece, out: np.ndarray) -> None:
        """Receive a box piece into `out` (shape box + (itemsize,)), block by block."""
        holder = self._next(piece)
        by_rows = piece.box is not None and bool(piece.box.start)
        for lo, hi in blocks(piece, self.exchange.message_bytes):
            if not by_rows:  # a scalar: its bytes
                self._receive(out.reshape(-1)[lo:hi], holder, piece)
                continue
            rows = out[lo:hi]
            if rows.flags.c_contiguous:
                self._receive(rows, holder, piece)
            else:
                buffer = np.empty(rows.shape, dtype=np.uint8)
                self._receive(buffer, holder, piece)
                rows[...] = buffer

    def whole(self, piece: Piece) -> bytearray:
        """Receive a whole-content piece."""
        holder = self._next(piece)
        data = bytearray(piece.nbytes)
        view = memoryview(data)
        for lo, hi in blocks(piece, self.exchange.message_bytes):
            self._receive(view[lo:hi], holder, piece)
        return data

    def _next(self, piece: Piece) -> int:
        if not self._expected or self._expected[0] != piece:
            raise MpickptError(f"exchange out of order: the executor took {piece}, "
                               f"but {self._expected[0] if self._expected else 'nothing'} was asked next")
        self._expected.popleft()
        return self._holders[piece.rank]

    def _receive(self, buffer: object, holder: int, piece: Piece) -> None:
        request = self.exchange.comm.irecv_bytes(buffer, holder, DATA_TAG)
        self.exchange.wait(request, holder, f"parameter {piece.name!r} of source rank {piece.rank}")
        self.exchange.bytes_received += memoryview(buffer).nbytes  # type: ignore[arg-type]


def header_entries(found: SourceHeaders) -> dict[str, TensorEntry]:
    """Stand-in entries of a file another process sees (one pseudo piece carrying the content size)."""
    return {name: TensorEntry(name, dtype, tuple(dims), ((0, found.nbytes.get(name, 0)),),
                              found.kinds.get(name, "tensor"))
            for name, dtype, dims in found.rows}

