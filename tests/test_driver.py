"""The driver's logic in-process: dealing, records, rerun skipping, manifest, progress, failures.

Jobs here are stand-ins that write small files; worlds are the serial communicator or a few threads that
play MPI processes (ThreadComm), so no MPI library is needed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import queue
import socket
import subprocess
import threading
import zlib
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fixture_cases import checkpoint_content
from mpickpt import driver, startup
from mpickpt.ckpt_writer import CheckpointWriter
from mpickpt.collective import agree, broadcast_prepared
from mpickpt.driver import deal, run_job, run_transform
from mpickpt.destination import DestinationLock
from mpickpt.errors import DestinationError, MpickptError
from mpickpt.manifest import (
    CompletionRecord,
    SourceStamp,
    check_record,
    checksum,
    read_record,
    record_path,
    stamp_sources,
    write_json_atomic,
)
from mpickpt.mpi import SerialComm, launched, launched_size, world
from mpickpt.transform import OutputTask, TransformOptions


def task(rank: int, read: int = 0, write: int = 0, path: str = "", sources: tuple[str, ...] = ()) -> OutputTask:
    return OutputTask(rank, path, (rank,), sources, read, write)


class FakeJob:
    """Writes `rank_<t>/out_<t>.ckpt`: `chunks` UInt8 parameters holding write_bytes deterministic bytes,
    atomically, reporting progress per parameter."""

    def __init__(self, root: Path, targets: int, *, fail_target: int | None = None, chunks: int = 3,
                 job_key: str = "key-1", prefix: str = "out_", notes: tuple[str, ...] = ()) -> None:
        self.dst_dir = str(root / "dst")
        src = root / "src"
        src.mkdir(parents=True, exist_ok=True)
        self.options = TransformOptions(src_dir=str(src), dst_dir=self.dst_dir, prefix=prefix)
        self.notes = notes
        tasks = []
        for t in range(targets):
            source = src / f"s{t}.bin"
            if not source.exists():
                source.write_bytes(bytes([t]) * 100)
            size = 1000 * (t % 3 + 1)
            tasks.append(OutputTask(t, os.path.join(self.dst_dir, f"rank_{t}", f"{prefix}{t}.ckpt"), (t,),
                                    (str(source),), 100, size, job_key))
        self.tasks = tuple(tasks)
        self.fail_target = fail_target
        self.chunks = chunks
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def content(self, task: OutputTask) -> bytes:
        return bytes([task.target_rank + 1]) * task.write_bytes

    def run_task(self, task: OutputTask, *, sync: bool = True,
                 progress: Callable[[int], None] | None = None) -> None:
        with self.lock:
            self.calls.append(task.target_rank)
        data = self.content(task)
        step = len(data) // self.chunks
        with CheckpointWriter(Path(task.path), sync=sync) as writer:
            for i in range(self.chunks):
                if task.target_rank == self.fail_target:
                    raise MpickptError(f"target rank {task.target_rank} ({task.path}): parameter 'w' is broken")
                end = len(data) if i == self.chunks - 1 else (i + 1) * step
                chunk = data[i * step:end]
                writer.write_tensor(f"p{i}", "UInt8", (len(chunk),), chunk)
                if progress is not None:
                    progress(end)


class ThreadWorld:
    """Shared state of a world whose processes are threads (messages are pickled, as MPI does)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.inboxes: dict[tuple[int, int], queue.SimpleQueue[tuple[int, Any]]] = {}
        self.streams: dict[tuple[int, int, int], queue.SimpleQueue[bytes]] = {}  # (source, dest, tag) -> buffers
        self.barrier = threading.Barrier(size, timeout=20)
        self.slot: bytes = b""
        self.slots: list[bytes] = [b""] * size
        self.entered = 0
        self.lock = threading.Lock()

    def inbox(self, rank: int, tag: int) -> queue.SimpleQueue[tuple[int, Any]]:
        with self.lock:
            return self.inboxes.setdefault((rank, tag), queue.SimpleQueue())

    def stream(self, source: int, dest: int, tag: int) -> queue.SimpleQueue[bytes]:
        with self.lock:
            return self.streams.setdefault((source, dest, tag), queue.SimpleQueue())


class _Done:
    def test(self) -> bool:
        return True


class _ThreadReceive:
    """A posted receive: matched in posting order against one (source, tag) stream."""

    def __init__(self, comm: ThreadComm, out: Any, source: int, tag: int) -> None:
        self.comm, self.out, self.key = comm, out, (source, comm.rank, tag)
        self.done = False
        comm.posted.setdefault(self.key, []).append(self)

    def test(self) -> bool:
        posted = self.comm.posted[self.key]
        stream = self.comm.shared.stream(*self.key)
        while posted and not stream.empty():
            head = posted.pop(0)
            data = stream.get()
            view = memoryview(head.out).cast("B")
            assert len(data) == len(view), f"message of {len(data)} bytes into a buffer of {len(view)}"
            view[:] = data
            head.done = True
        return self.done


class _ThreadBarrier:
    def __init__(self, shared: ThreadWorld) -> None:
        self.shared = shared
        with shared.lock:
            shared.entered += 1
            self.generation = (shared.entered - 1) // shared.size

    def test(self) -> bool:
        with self.shared.lock:
            return self.shared.entered >= (self.generation + 1) * self.shared.size


class ThreadComm:
    """The driver's Comm for one thread of a ThreadWorld."""

    def __init__(self, shared: ThreadWorld, rank: int) -> None:
        self.shared = shared
        self.rank = rank
        self.size = shared.size
        self.posted: dict[tuple[int, int, int], list[_ThreadReceive]] = {}

    def bcast(self, obj: Any, root: int = 0) -> Any:
        if self.rank == root:
            self.shared.slot = pickle.dumps(obj)
        self.shared.barrier.wait()
        value = pickle.loads(self.shared.slot)
        self.shared.barrier.wait()
        return value

    def allgather(self, obj: Any) -> list[Any]:
        self.shared.slots[self.rank] = pickle.dumps(obj)
        self.shared.barrier.wait()
        values = [pickle.loads(s) for s in self.shared.slots]
        self.shared.barrier.wait()
        return values

    def send(self, obj: Any, dest: int, tag: int = 7) -> None:
        self.shared.inbox(dest, tag).put((self.rank, pickle.loads(pickle.dumps(obj))))

    def poll(self, tag: int = 7) -> list[tuple[int, Any]]:
        inbox = self.shared.inbox(self.rank, tag)
        messages = []
        while not inbox.empty():
            messages.append(inbox.get())
        return messages

    def isend_bytes(self, data: Any, dest: int, tag: int) -> _Done:
        self.shared.stream(self.rank, dest, tag).put(bytes(memoryview(data).cast("B")))
        return _Done()

    def irecv_bytes(self, out: Any, source: int, tag: int) -> _ThreadReceive:
        return _ThreadReceive(self, out, source, tag)

    def ibarrier(self) -> _ThreadBarrier:
        return _ThreadBarrier(self.shared)

    def aborted(self) -> bool:
        return self.shared.barrier.broken

    def flush(self) -> None:
        pass

    def abort(self, code: int) -> None:
        raise AssertionError(f"abort({code}) called")


def run_threads(size: int, body: Callable[[ThreadComm], Any]) -> list[Any]:
    """Run body(comm) on `size` threads; return each rank's result (re-raising the first exception)."""
    shared = ThreadWorld(size)
    results: list[Any] = [None] * size
    raised: list[BaseException] = []

    def main(rank: int) -> None:
        try:
            results[rank] = body(ThreadComm(shared, rank))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            raised.append(exc)
            shared.barrier.abort()

    threads = [threading.Thread(target=main, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if raised:
        raise raised[0]
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results


def transform_errors(options: TransformOptions, size: int) -> list[MpickptError | None]:
    """Run `transform` on `size` threads; each rank's MpickptError, or None where it finished."""

    def body(comm: ThreadComm) -> MpickptError | None:
        try:
            run_transform(options, comm, quiet=True)
        except MpickptError as exc:
            return exc
        return None

    return run_threads(size, body)


# --- dealing -------------------------------------------------------------------------------------------

def test_deal_one_target_each_when_counts_match() -> None:
    tasks = [task(r, read=100 * (r + 1), write=10) for r in range(4)]
    shares = deal(tasks, 4)
    assert sorted(len(s) for s in shares) == [1, 1, 1, 1]
    assert [s[0].target_rank for s in shares] == [3, 2, 1, 0]  # largest first onto the least-loaded


def test_deal_balances_bytes_with_fewer_processes() -> None:
    tasks = [task(0, read=90), task(1, read=50), task(2, read=40), task(3, read=10), task(4, read=10)]
    shares = deal(tasks, 2)
    assert [[t.target_rank for t in s] for s in shares] == [[0, 3], [1, 2, 4]]
    assert [sum(t.read_bytes for t in s) for s in shares] == [100, 100]


def test_deal_leaves_extra_processes_idle_and_spreads_empty_tasks() -> None:
    shares = deal([task(r) for r in range(3)], 5)
    assert [len(s) for s in shares] == [1, 1, 1, 0, 0]
    with pytest.raises(ValueError, match="processes"):
        deal([], 0)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 10**9), max_size=40), st.integers(1, 12))
def test_deal_gives_every_task_once_deterministically(sizes: list[int], processes: int) -> None:
    tasks = [task(r, read=s, write=s // 3) for r, s in enumerate(sizes)]
    shares = deal(tasks, processes)
    assert len(shares) == processes
    assert sorted(t.target_rank for s in shares for t in s) == list(range(len(tasks)))
    assert shares == deal(list(reversed(tasks)), processes)
    if len(tasks) >= processes:
        assert all(shares)  # nobody idles while targets are left
    loads = [sum(t.read_bytes + t.write_bytes for t in s) for s in shares]
    biggest = max((t.read_bytes + t.write_bytes for t in tasks), default=0)
    assert max(loads, default=0) - min(loads, default=0) <= biggest  # greedy bound


# --- serial runs ---------------------------------------------------------------------------------------

def test_serial_run_writes_outputs_records_and_manifest(tmp_path: Path) -> None:
    job = FakeJob(tmp_path, 3)
    stream = io.StringIO()
    summary = run_job(job, SerialComm(), stream=stream)
    for t in job.tasks:
        data = Path(t.path).read_bytes()
        assert b"".join(content for *_, content in checkpoint_content(t.path)) == job.content(t)
        record = read_record(t.path)
        assert record is not None
        assert (record.size, record.checksum) == (len(data), f"crc32:{zlib.crc32(data):08x}")
        assert record.source_ranks == t.source_ranks and record.target_rank == t.target_rank
        assert record.sources == stamp_sources(t.source_files)
        assert (record.output, record.job_key, record.params) == (os.path.abspath(t.path), "key-1", 3)
    sizes = [Path(t.path).stat().st_size for t in job.tasks]
    manifest = json.loads((Path(job.dst_dir) / "manifest.json").read_text())
    assert manifest["world_size"] == 1
    assert [f["file"] for f in manifest["files"]] == [f"rank_{t}/out_{t}.ckpt" for t in range(3)]
    assert [f["size"] for f in manifest["files"]] == sizes
    assert all(f["process"] == 0 and not f["skipped"] and f["redone"] is None for f in manifest["files"])
    assert all(f["params"] == 3 for f in manifest["files"])
    assert manifest["processes"][0]["bytes_written"] == sum(sizes)
    assert (summary.files, summary.written, summary.skipped) == (3, 3, 0)
    assert (summary.bytes_read, summary.bytes_written, summary.processes) == (300, sum(sizes), 1)
    assert summary.manifest == str(Path(job.dst_dir) / "manifest.json")
    assert stream.getvalue().strip() == summary.line()
    assert "3 files (3 written, 0 already complete) by 1 process:" in summary.line()
    assert not list(Path(job.dst_dir).rglob("*.tmp"))


def test_rerun_skips_matching_outputs_and_redoes_changed_ones(tmp_path: Path) -> None:
    job = FakeJob(tmp_path, 4)
    run_job(job, SerialComm(), quiet=True)
    job.calls.clear()
    again = run_job(job, SerialComm(), quiet=True)
    assert job.calls == [] and (again.written, again.skipped) == (0, 4)
    assert all(f["skipped"] for f in json.loads(Path(again.manifest).read_text())["files"])

    fresh = {t.path: Path(t.path).read_bytes() for t in job.tasks}
    t0, t1, t2, t3 = job.tasks
    Path(t0.path).chmod(0o600)
    Path(t0.path).write_bytes(b"x" * len(fresh[t0.path]))  # same size, other content
    Path(t1.path).unlink()  # output gone, record left
    os.utime(t2.source_files[0], ns=(1, 1))  # a source changed
    record_path(t3.path).write_text("{not json")  # record damaged
    third = run_job(job, SerialComm(), quiet=True)
    assert sorted(job.calls) == [0, 1, 2, 3] and third.written == 4
    assert all(Path(t.path).read_bytes() == fresh[t.path] for t in job.tasks)
    assert third.redone == (("rank_0/out_0.ckpt", "the output changed"), ("rank_1/out_1.ckpt", "the output is missing"),
                            ("rank_2/out_2.ckpt", "the sources changed"),
                            ("rank_3/out_3.ckpt", "no valid completion record"))
    assert [f["redone"] for f in json.loads(Path(third.manifest).read_text())["files"]] == [r for _, r in third.redone]

    job.calls.clear()
    forced = run_job(job, SerialComm(), overwrite=True, quiet=True)
    assert sorted(job.calls) == [0, 1, 2, 3] and forced.skipped == 0
    assert {why for _, why in forced.redone} == {"--overwrite"}


def test_rerun_of_another_job_redoes_everything_and_says_why(tmp_path: Path) -> None:
    run_job(FakeJob(tmp_path, 2), SerialComm(), quiet=True)
    other = FakeJob(tmp_path, 2, job_key="key-2")
    stream = io.StringIO()
    summary = run_job(other, SerialComm(), stream=stream)
    assert sorted(other.calls) == [0, 1] and summary.written == 2
    assert [line for line in stream.getvalue().splitlines() if "redone" in line] == [
        "mpickpt: rank_0/out_0.ckpt: redone: the job changed (strategies, prefix, format, options or output path)",
        "mpickpt: rank_1/out_1.ckpt: redone: the job changed (strategies, prefix, format, options or output path)"]
    assert all(read_record(t.path).job_key == "key-2" for t in other.tasks)  # type: ignore[union-attr]


def test_stale_outputs_and_folders_are_listed_never_deleted(tmp_path: Path) -> None:
    run_job(FakeJob(tmp_path, 4), SerialComm(), quiet=True)
    before = sorted(p for p in (tmp_path / "dst").rglob("*") if p.is_file())
    smaller = FakeJob(tmp_path, 2, prefix="new_")
    stream = io.StringIO()
    summary = run_job(smaller, SerialComm(), stream=stream)
    stale = ("rank_0/out_0.ckpt", "rank_0/out_0.ckpt.done.json", "rank_1/out_1.ckpt", "rank_1/out_1.ckpt.done.json",
             "rank_2/", "rank_3/")
    assert summary.stale == stale
    assert json.loads(Path(summary.manifest).read_text())["stale"] == list(stale)
    assert f"mpickpt: 6 entries of the destination are not from this job and were left as they are: " \
           f"{', '.join(stale)}" in stream.getvalue().splitlines()
    assert all(p.exists() for p in before)


def test_many_redone_outputs_are_summed_up_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "MAX_LISTED", 2)
    run_job(FakeJob(tmp_path, 5), SerialComm(), quiet=True)
    stream = io.StringIO()
    summary = run_job(FakeJob(tmp_path, 5, job_key="key-2"), SerialComm(), stream=stream)
    lines = stream.getvalue().splitlines()
    assert sum("redone:" in line for line in lines) == 2
    assert f"mpickpt: ... and 3 more redone (see {summary.manifest})" in lines
    assert lines[-1] == summary.line()


def test_temporaries_of_dead_writers_are_removed_and_others_listed(tmp_path: Path) -> None:
    job = FakeJob(tmp_path, 2)
    run_job(job, SerialComm(), quiet=True)
    dead = subprocess.Popen(["true"])  # a pid that has ended
    dead.wait()
    zombie = subprocess.Popen(["true"])  # ended but not reaped yet (as aborted MPI ranks may stay a while)
    for _ in range(1000):
        if Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        threading.Event().wait(0.01)
    host = socket.gethostname().split(".")[0]
    dst = Path(job.dst_dir)
    removed = [dst / "rank_0" / f".out_0.ckpt.{host}.{dead.pid}.0badc0de.tmp",  # a skipped output's
               dst / "rank_0" / f".out_0.ckpt.{host}.{zombie.pid}.0badc0de.tmp",  # a zombie's
               dst / "rank_1" / f".out_1.ckpt.done.json.{host}.{dead.pid}.0badc0de.tmp",  # a record's
               dst / "rank_1" / f".old_1.ckpt.{host}.{dead.pid}.0badc0de.tmp",  # another job's
               dst / f".manifest.json.{host}.{dead.pid}.0badc0de.tmp"]
    kept = [dst / "rank_0" / f".out_0.ckpt.{host}.{os.getpid()}.0badc0de.tmp",  # a live writer's
            dst / "rank_0" / f".out_0.ckpt.otherhost.{dead.pid}.0badc0de.tmp"]  # another host's: unknown
    for path in removed + kept:
        path.write_bytes(b"partial")
    summary = run_job(job, SerialComm(), quiet=True)
    zombie.wait()
    assert summary.skipped == 2
    assert not any(p.exists() for p in removed) and all(p.exists() for p in kept)
    assert summary.stale == tuple(sorted(str(p.relative_to(dst)) for p in kept))


def test_a_rerun_removes_the_old_manifest_until_it_is_complete(tmp_path: Path) -> None:
    run_job(FakeJob(tmp_path, 2), SerialComm(), quiet=True)
    with pytest.raises(MpickptError, match="broken"):
        run_job(FakeJob(tmp_path, 2, job_key="key-2", fail_target=1), SerialComm(), quiet=True)
    assert not (tmp_path / "dst" / "manifest.json").exists()


def test_manifest_records_options_strategies_times_and_notes(tmp_path: Path) -> None:
    strategy = tmp_path / "dst_strategy.ckpt"
    strategy.write_bytes(b"strategy bytes")
    job = FakeJob(tmp_path, 2, notes=("pipeline subnetwork mode: stage 1",))
    job.options = TransformOptions(src_dir=os.path.relpath(tmp_path / "src"), dst_dir=job.dst_dir,
                                   dst_strategy=str(strategy), prefix="out_")
    stream = io.StringIO()
    summary = run_job(job, SerialComm(), stream=stream)
    manifest = json.loads(Path(summary.manifest).read_text())
    assert manifest["version"] == 2 and manifest["mpickpt_version"] == driver.__version__
    assert manifest["options"] == {**dataclasses.asdict(job.options), "src_dir": str(tmp_path / "src")}
    assert manifest["source_folder"] == str(tmp_path / "src")
    assert manifest["strategies"] == {"src": None, "dst": "sha256:" + hashlib.sha256(b"strategy bytes").hexdigest()}
    assert manifest["notes"] == ["pipeline subnetwork mode: stage 1"]
    started, finished = (datetime.fromisoformat(manifest[k]) for k in ("started", "finished"))
    assert started.utcoffset() == timedelta(0) and started <= finished
    assert manifest["stale"] == []
    assert stream.getvalue().splitlines() == ["mpickpt: note: pipeline subnetwork mode: stage 1", summary.line()]


def test_serial_failure_raises_and_leaves_only_complete_outputs(tmp_path: Path) -> None:
    job = FakeJob(tmp_path, 3, fail_target=1)
    with pytest.raises(MpickptError, match=r"target rank 1 .*out_1\.ckpt.*parameter 'w'"):
        run_job(job, SerialComm(), quiet=True)
    done = [t for t in job.tasks if Path(t.path).exists()]
    assert all(read_record(t.path) is not None for t in done)
    assert not Path(job.tasks[1].path).exists() and read_record(job.tasks[1].path) is None
    assert not (Path(job.dst_dir) / "manifest.json").exists()
    assert not [p for p in Path(job.dst_dir).rglob("*") if p.name.endswith(".tmp")]  # the writer aborted


def test_injected_failure_raises_after_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(driver.TEST_FAIL_VARIABLE, "process=0,after_bytes=1500,action=raise")
    job = FakeJob(tmp_path, 3)
    with pytest.raises(MpickptError, match="MPICKPT_TEST_FAIL: injected failure after 2000 bytes"):
        run_job(job, SerialComm(), quiet=True)
    monkeypatch.setenv(driver.TEST_FAIL_VARIABLE, "process=1,after_bytes=0")  # another process: no effect
    assert run_job(job, SerialComm(), quiet=True).written == 3


@pytest.mark.parametrize("text", ["after_bytes=3", "process=x", "process=0,action=explode", "process=0,when=now"])
def test_bad_test_fail_variable_is_named(text: str) -> None:
    with pytest.raises(MpickptError, match="MPICKPT_TEST_FAIL="):
        driver._fault_from_env({driver.TEST_FAIL_VARIABLE: text})


def test_prepare_error_is_raised_serially(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "rank_0").mkdir(parents=True)
    options = TransformOptions(src_dir=str(src), dst_dir=str(src / "out"))
    with pytest.raises(DestinationError, match="out"):
        run_transform(options, SerialComm(), quiet=True)


# --- worlds of several processes (threads) -------------------------------------------------------------

@pytest.mark.parametrize("size", [2, 3, 5])
def test_threads_split_the_work_and_agree_on_the_summary(tmp_path: Path, size: int) -> None:
    job = FakeJob(tmp_path, 4)
    summaries = run_threads(size, lambda comm: run_job(job, comm, quiet=True))
    assert all(s == summaries[0] for s in summaries)
    assert sorted(job.calls) == [0, 1, 2, 3]  # each target written exactly once
    manifest = json.loads(Path(summaries[0].manifest).read_text())
    assert manifest["world_size"] == size and summaries[0].processes == size
    shares = deal(job.tasks, size)
    assert {f["target_rank"]: f["process"] for f in manifest["files"]} == {
        t.target_rank: p for p, share in enumerate(shares) for t in share}
    assert [p["targets"] for p in manifest["processes"]] == [[t.target_rank for t in s] for s in shares]
    for entry in manifest["files"]:
        assert entry["checksum"] == checksum(Path(job.dst_dir) / entry["file"])


def test_prepare_error_on_rank_0_reaches_every_rank(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "rank_0").mkdir(parents=True)
    options = TransformOptions(src_dir=str(src), dst_dir=str(src))

    errors = transform_errors(options, 3)
    assert all(isinstance(e, DestinationError) for e in errors)
    assert len({str(e) for e in errors}) == 1


class AbortingComm(ThreadComm):
    """A thread communicator whose abort records the rank and breaks every barrier, as MPI_Abort would."""

    def __init__(self, shared: ThreadWorld, rank: int, aborted: list[int]) -> None:
        super().__init__(shared, rank)
        self.aborted_ranks = aborted

    def abort(self, code: int) -> None:
        self.aborted_ranks.append(self.rank)
        self.shared.barrier.abort()
        raise SystemExit(code)


def test_failure_in_a_process_prints_its_name_and_aborts(tmp_path: Path) -> None:
    job = FakeJob(tmp_path, 4, fail_target=2)
    streams = [io.StringIO() for _ in range(2)]
    aborted: list[int] = []

    def body(comm: ThreadComm) -> None:
        try:
            run_job(job, AbortingComm(comm.shared, comm.rank, aborted), quiet=True, stream=streams[comm.rank])
        except (SystemExit, threading.BrokenBarrierError):
            pass

    run_threads(2, body)
    failing = next(p for p, share in enumerate(deal(job.tasks, 2)) if any(t.target_rank == 2 for t in share))
    assert aborted[0] == failing
    text = streams[failing].getvalue()
    assert f"mpickpt: process {failing}: target rank 2 ({job.tasks[2].path}): parameter 'w'" in text
    assert text.count("target rank 2") == 1


def test_a_process_that_stops_before_reporting_ends_the_job_naming_it(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A stopped or hung process (SIGSTOP, a hung file system) never reports: rank 0 waited for it forever."""
    job = FakeJob(tmp_path, 4)
    streams = [io.StringIO() for _ in range(2)]
    aborted: list[int] = []
    stopped = threading.Event()
    real = driver._work

    def work(job: FakeJob, tasks: Any, process: int, *args: Any) -> Any:
        if process == 1:
            stopped.wait(30)
        return real(job, tasks, process, *args)

    monkeypatch.setattr(driver, "_work", work)
    monkeypatch.setattr(driver, "REPORT_STALL_SECONDS", 0.5)

    def body(comm: ThreadComm) -> None:
        try:
            run_job(job, AbortingComm(comm.shared, comm.rank, aborted), quiet=True, stream=streams[comm.rank])
        except (SystemExit, threading.BrokenBarrierError):
            pass
        finally:
            stopped.set()

    run_threads(2, body)
    assert aborted[0] == 0
    assert "mpickpt: process 0: process 1 has not reported and no process has sent anything for 0.5 s" \
        in streams[0].getvalue()


def test_strategies_that_cannot_be_broadcast_abort_instead_of_hanging(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    job = FakeJob(tmp_path, 2)
    monkeypatch.setattr(startup, "load_strategies", lambda options: (lambda: None, None))
    stream = io.StringIO()
    aborted: list[int] = []

    def body(comm: ThreadComm) -> None:
        try:
            run_transform(job.options, AbortingComm(comm.shared, comm.rank, aborted), stream=stream)
        except (SystemExit, threading.BrokenBarrierError):
            pass

    run_threads(2, body)
    assert aborted[0] == 0  # rank 0 first (the others only see the broken barrier afterwards)
    assert "mpickpt: process 0: " in stream.getvalue() and "pickle" in stream.getvalue().lower()
    DestinationLock.acquire(job.dst_dir).release()  # rank 0 let go of the destination


def test_start_up_result_that_does_not_pickle_is_an_error_on_every_rank(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    job = FakeJob(tmp_path, 2)
    (tmp_path / "src" / "rank_0").mkdir()
    (tmp_path / "src" / "rank_0" / "c.ckpt").write_bytes(b"")
    monkeypatch.setattr(startup, "read_headers", lambda files: {0: lambda: None})

    def body(comm: ThreadComm) -> Exception | None:
        try:
            run_transform(job.options, comm, quiet=True)
        except MpickptError as exc:
            return exc
        return None

    errors = run_threads(3, body)
    assert len({str(e) for e in errors}) == 1 and "pickle" in str(errors[0]).lower(), errors
    DestinationLock.acquire(job.dst_dir).release()  # every rank let go of the destination


def test_progress_lines_count_every_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "PROGRESS_LINE_SECONDS", 0.0)
    monkeypatch.setattr(driver, "PROGRESS_SEND_SECONDS", 0.0)
    job = FakeJob(tmp_path, 4)
    stream = io.StringIO()
    run_threads(2, lambda comm: run_job(job, comm, stream=stream if comm.rank == 0 else io.StringIO()))
    lines = stream.getvalue().splitlines()
    progress = [line for line in lines if line.startswith("mpickpt: progress ")]
    assert progress and all("targets" in line and "written" in line for line in progress)
    assert any(line.startswith("mpickpt: progress 4/4 targets, 7.0 kB / 7.0 kB written") for line in progress)
    assert lines[-1].startswith("mpickpt: 4 files (4 written")


def test_progress_bar_on_a_terminal_and_silence_when_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(driver, "PROGRESS_BAR_SECONDS", 0.0)
    terminal = Terminal()
    run_job(FakeJob(tmp_path / "a", 2), SerialComm(), stream=terminal)
    assert "\rmpickpt: [" in terminal.getvalue() and "2/2 targets" in terminal.getvalue()
    assert "#" * 30 in terminal.getvalue()
    quiet = Terminal()
    run_job(FakeJob(tmp_path / "b", 2), SerialComm(), stream=quiet, quiet=True)
    assert quiet.getvalue() == ""


# --- records and manifest files ------------------------------------------------------------------------

def test_checksum_is_crc32_of_the_whole_file(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 123)
    (tmp_path / "f").write_bytes(data)
    assert checksum(tmp_path / "f") == f"crc32:{zlib.crc32(data):08x}"
    (tmp_path / "empty").write_bytes(b"")
    assert checksum(tmp_path / "empty") == "crc32:00000000"


def test_record_must_match_the_whole_job(tmp_path: Path) -> None:
    job = FakeJob(tmp_path, 1)
    run_job(job, SerialComm(), quiet=True)
    t = job.tasks[0]
    assert check_record(t.path, 0, "key-1", (0,), t.source_files).record == read_record(t.path)
    changed = "the job changed (strategies, prefix, format, options or output path)"
    assert check_record(t.path, 1, "key-1", (0,), t.source_files).reason == changed
    assert check_record(t.path, 0, "key-2", (0,), t.source_files).reason == changed
    assert check_record(t.path, 0, "key-1", (0, 1), t.source_files).reason == changed
    assert check_record(t.path, 0, "key-1", (0,), ()).reason == "the sources changed"
    assert check_record(t.path, 0, "key-1", (0,), ["/no/such/file"]).reason == "the sources changed"
    other = os.path.join(os.path.dirname(t.path), "renamed.ckpt")
    os.replace(t.path, other)
    os.replace(record_path(t.path), record_path(other))
    assert check_record(other, 0, "key-1", (0,), t.source_files).reason == changed
    assert check_record(t.path, 0, "key-1", (0,), t.source_files).reason == ""  # nothing there: a new output


def test_record_keeps_absolute_source_paths_with_device_and_inode(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "s.bin").write_bytes(b"abc")
    monkeypatch.chdir(tmp_path)
    stamp, = stamp_sources(["s.bin"])
    st = os.stat(tmp_path / "s.bin")
    assert stamp == SourceStamp(str(tmp_path / "s.bin"), 3, st.st_mtime_ns, st.st_dev, st.st_ino, st.st_ctime_ns)


def test_record_round_trip_and_version_check() -> None:
    record = CompletionRecord("a.ckpt", "/d/a.ckpt", 3, "k", 10, "crc32:0000000a", 2, (1, 2),
                              (SourceStamp("/s/x", 1, 2, 3, 4, 5),), 0.5)
    assert CompletionRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    with pytest.raises(ValueError, match="version"):
        CompletionRecord.from_dict({**record.to_dict(), "version": 99})


def test_unwritable_destination_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "blocker").write_text("a file where a folder should be")
    with pytest.raises(DestinationError, match=r"blocker/manifest\.json: cannot create a file here"):
        write_json_atomic(tmp_path / "blocker" / "manifest.json", {}, sync=True)


# --- launcher detection --------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "is_launched", "size"), [
    ({}, False, None),
    ({"PMI_RANK": "1", "PMI_SIZE": "4", "PMI_FD": "9"}, True, 4),  # MPICH Hydra, srun --mpi=pmi2
    ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "3"}, True, 3),  # Open MPI
    ({"PMIX_RANK": "2", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4"}, True, 4),  # srun --mpi=pmix
    ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}, True, 2),  # srun, no PMI
    ({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, False, None),  # the sbatch script itself
    ({"PMI_RANK": "0", "PMI_SIZE": "4", "SLURM_STEP_ID": "2", "SLURM_STEP_NUM_TASKS": "1"}, True, 4),  # Hydra in Slurm
    ({"PMIX_RANK": "0"}, True, None),
])
def test_launcher_detection(env: dict[str, str], is_launched: bool, size: int | None) -> None:
    assert launched(env) is is_launched
    assert launched_size(env) == size


def test_world_without_a_launcher_is_serial() -> None:
    comm = world({})
    assert isinstance(comm, SerialComm) and (comm.rank, comm.size) == (0, 1)
    assert comm.bcast("x") == "x"
    comm.send({"a": 1}, 0)
    assert comm.poll() == [(0, {"a": 1})] and comm.poll() == []
    with pytest.raises(ValueError, match="no process 1"):
        comm.send(1, 1)
    with pytest.raises(SystemExit):
        comm.abort(3)


def test_an_unexpected_error_on_one_process_is_raised_on_every_process_naming_it() -> None:
    def body(comm: ThreadComm) -> str:
        def work() -> int:
            if comm.rank == 1:
                raise PermissionError(13, "Permission denied", "/local/src/rank_3/checkpoint_3.ckpt")
            return comm.rank
        try:
            agree(work, comm)
        except MpickptError as exc:
            return str(exc)
        return "no error"

    assert run_threads(3, body) == ["process 1: PermissionError: [Errno 13] Permission denied: "
                                    "'/local/src/rank_3/checkpoint_3.ckpt'"] * 3


def test_an_unexpected_error_while_rank_0_prepares_names_process_0_on_every_process() -> None:
    def body(comm: ThreadComm) -> str:
        def prepare() -> int:
            raise RuntimeError("merge failed")
        try:
            broadcast_prepared(prepare, comm)
        except MpickptError as exc:
            return str(exc)
        return "no error"

    assert run_threads(2, body) == ["process 0: RuntimeError: merge failed"] * 2
