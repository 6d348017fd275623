"""Sources on several hosts: `{host}`/`{process}` folders, the gathered inventory and slices sent over MPI.

Hosts are simulated on one machine by giving each process its own source folder (`--src-dir 'base/p{process}'`)
holding some of the rank folders, each rank folder in exactly one process's folder, so targets need data
that other processes hold. In-process tests run the driver on threads (ThreadComm); the others run
`mpiexec -n K` (MPICH and Open MPI) and compare with the serial run on one shared folder.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from fixture_cases import Case, assert_same_content
from hypothesis import given, settings
from hypothesis import strategies as st
from mindspore_cases import make_redundancy_removed
from test_driver import AbortingComm, ThreadComm, run_threads, transform_errors
from test_mpi import (  # noqa: F401
    ENDS_WITHIN,
    FLAVORS,
    REPO,
    Serial,
    launcher,
    mpickpt,
    no_stale_segments,
    outputs,
    run,
    serial,
    transform_args,
)
from written_cases import WRITTEN

from mpickpt import exchange as exchange_module
from mpickpt.destination import LOCK_NAME
from mpickpt.driver import deal, run_transform
from mpickpt.errors import CheckpointFormatError, MpickptError, SourceConflictError, SourceMissingError
from mpickpt.exchange import CONTROL_TAG, Exchange, ExchangeError, blocks
from mpickpt.execute import Piece
from mpickpt.formats import IndexCache, open_index
from mpickpt.inventory import read_headers
from mpickpt.layout import Box
from mpickpt.mpi import SerialComm
from mpickpt.placement import (
    ProcessView,
    SourceCopy,
    checksum_readers,
    choose_holder,
    differing_copies,
    expand,
    has_placeholders,
    header_share,
)
from mpickpt.transform import OutputTask, TransformOptions

SPLIT = "p{process}"


def split_sources(case: Case, base: Path, processes: int) -> Path:
    """Copy the case's rank folders into base/p<process>/, rank r into process (r + 1) % processes only
    (a process may get none: its folder is not created). Returns base."""
    for rank_dir in sorted(case.src_dir.glob("rank_*")):
        rank = int(rank_dir.name.split("_")[1])
        shutil.copytree(rank_dir, base / f"p{(rank + 1) % processes}" / rank_dir.name)
    return base


def options_for(case: Case, src_dir: str, dst_dir: str, **extra: object) -> TransformOptions:
    return TransformOptions(src_dir=src_dir, dst_dir=dst_dir, prefix=case.prefix,
                            src_strategy=case.strategy("src"), dst_strategy=case.strategy("dst"), **extra)  # type: ignore[arg-type]


def expected_bytes(case: Case) -> dict[int, bytes]:
    return {rank: path.read_bytes() for rank, path in case.expected_files().items()}


# --- pure parts ---------------------------------------------------------------------------------------

def test_placeholders_expand_per_process() -> None:
    assert expand("/data/{host}/ckpt_{process}", "node7", 3) == "/data/node7/ckpt_3"
    assert has_placeholders("a/{process}") and not has_placeholders("/plain/dir")
    with pytest.raises(MpickptError, match=r"unknown placeholder \{rank\}"):
        expand("a/{rank}", "h", 0)


def test_processes_seeing_one_folder_split_its_headers() -> None:
    files = {r: f"/s/rank_{r}/c.ckpt" for r in range(5)}
    views = [ProcessView(p, "h", "/s", files) for p in range(3)]
    shares = [header_share(views, p, per_process=False) for p in range(3)]
    assert sorted(r for share in shares for r in share) == list(range(5))
    host_views = [ProcessView(0, "a", "/s", files), ProcessView(1, "b", "/s", files)]
    assert header_share(host_views, 1, per_process=True) == list(range(5))  # another host: its own copy
    local = [ProcessView(0, "a", "/s", {0: "/s/rank_0/c.ckpt"}), ProcessView(1, "b", "/s", {1: "/s/rank_1/c.ckpt"})]
    assert [header_share(local, p, per_process=False) for p in (0, 1)] == [[0], [1]]  # same path, node-local


def test_copies_of_a_rank_with_other_sizes_or_times_are_found() -> None:
    """Copies agree when every process sees the same stamp (a shared folder, or copies with times kept);
    each distinct host, path and stamp is one copy, named by the lowest process seeing it."""
    files = {r: f"/s/rank_{r}/c.ckpt" for r in range(2)}
    stamp = {r: (("c.ckpt", 100 + r, 7),) for r in range(2)}
    shared = [ProcessView(p, "ab"[p // 2], "/s", files, stamp) for p in range(4)]
    assert differing_copies(shared) == {}
    stale = {**stamp, 1: (("c.ckpt", 101, 9),)}
    node_local = [*shared[:2], *(ProcessView(p, "b", "/s", files, stale) for p in (2, 3))]
    assert differing_copies(node_local) == {1: [SourceCopy(1, "a", files[1], stamp[1], (0, 1)),
                                                SourceCopy(1, "b", files[1], stale[1], (2, 3))]}
    everything_stale = [*shared[:2], *(ProcessView(p, "b", "/s", files, {**stale, 0: (("c.ckpt", 5, 9),)})
                                       for p in (2, 3))]
    readers = checksum_readers(differing_copies(everything_stale))  # each host's processes share the reading
    assert readers == {(0, "a", files[0], stamp[0]): 0, (0, "b", files[0], (("c.ckpt", 5, 9),)): 2,
                       (1, "a", files[1], stamp[1]): 1, (1, "b", files[1], stale[1]): 3}
    assert not shared[0].group_key(False) == node_local[2].group_key(False)  # headers read on each host
    assert SourceCopy(1, "b", files[1], stale[1], (2, 3)).describe() == \
        "process 2 (host b) /s/rank_1/c.ckpt: 101 bytes, modified 1970-01-01 00:00:00.000000009 UTC"


def test_holder_is_the_writer_itself_then_its_host_then_the_least_loaded() -> None:
    seen_by = {0: (0, 2), 1: (1, 3), 2: (2, 3)}
    hosts = ["a", "a", "b", "b"]
    assert choose_holder(0, target=5, process=0, seen_by=seen_by, hosts=hosts, load={}) == 0
    assert choose_holder(1, target=5, process=0, seen_by=seen_by, hosts=hosts, load={}) == 1  # same host
    assert choose_holder(2, target=0, process=0, seen_by=seen_by, hosts=hosts, load={2: 100}) == 3


def reading(target: int, reads: dict[int, int], write: int = 0) -> OutputTask:
    """A task reading `reads` (source rank -> bytes)."""
    return OutputTask(target, f"/d/rank_{target}/c.ckpt", tuple(sorted(reads)), (), sum(reads.values()), write,
                      read_from=tuple(sorted(reads.items())))


def received(shares: tuple[tuple[OutputTask, ...], ...], seen_by: Mapping[int, Sequence[int]]) -> int:
    """Bytes the writers would receive: what each target reads from files its process does not see."""
    return sum(n for p, share in enumerate(shares) for t in share for r, n in t.read_from if p not in seen_by[r])


def test_targets_go_to_the_processes_seeing_their_main_sources() -> None:
    """Target t reads most from ranks 2t and 2t+1, whose folder is process (t + 1) % 4's (as tiny_llama)."""
    tasks = [reading(t, {2 * t: 800, 2 * t + 1: 790, (2 * t + 2) % 8: 90}, write=1700 + t) for t in range(4)]
    seen_by = {r: ((r // 2 + 1) % 4,) for r in range(8)}
    plain = deal(tasks, 4)
    near = deal(tasks, 4, seen_by, ["h"] * 4)
    assert [[t.target_rank for t in share] for share in near] == [[3], [0], [1], [2]]
    assert received(near, seen_by) == 4 * 90 < received(plain, seen_by)


def test_a_target_rather_goes_to_the_host_of_its_sources() -> None:
    """Rank 0 is seen by process 1 only (host a): the target that cannot go there goes to process 0, on host a."""
    tasks = [reading(0, {0: 100}), reading(1, {0: 100})]
    near = deal(tasks, 4, {0: (1,)}, ["a", "a", "b", "b"])
    assert [[t.target_rank for t in share] for share in near] == [[1], [0], [], []]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.dictionaries(st.integers(0, 5), st.integers(0, 10**9), max_size=4), max_size=30),
       st.integers(1, 6), st.data())
def test_dealing_near_sources_keeps_every_target_once_within_the_size_bound(
        reads: list[dict[int, int]], processes: int, data: st.DataObject) -> None:
    tasks = [reading(t, r, write=sum(r.values()) // 3) for t, r in enumerate(reads)]
    everywhere = {r: tuple(range(processes)) for r in range(6)}
    hosts = data.draw(st.lists(st.sampled_from("ab"), min_size=processes, max_size=processes))
    assert deal(tasks, processes, everywhere, hosts) == deal(tasks, processes)  # a shared folder: as before
    seen_by = {r: tuple(sorted(data.draw(st.sets(st.integers(0, processes - 1), min_size=1)))) for r in range(6)}
    shares = deal(tasks, processes, seen_by, hosts)
    assert sorted(t.target_rank for s in shares for t in s) == list(range(len(tasks)))
    assert shares == deal(list(reversed(tasks)), processes, seen_by, hosts)
    sizes = [t.read_bytes + t.write_bytes for t in tasks]
    bound = sum(sizes) + (processes - 1) * max(sizes, default=0)  # the size-only dealing's worst case, x processes
    assert all(sum(t.read_bytes + t.write_bytes for t in s) * processes <= bound for s in shares)


def test_blocks_split_rows_within_the_message_size() -> None:
    piece = Piece(0, "w", Box((0, 0), (10, 4)), 10 * 4 * 4)
    assert blocks(piece, limit=48) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert blocks(Piece(0, "w", Box((0,), (10,)), 40), limit=1000) == [(0, 10)]
    assert blocks(Piece(0, "s", None, 10), limit=4) == [(0, 4), (4, 8), (8, 10)]
    assert blocks(Piece(0, "e", Box((0, 0), (0, 3)), 0)) == []
    assert blocks(Piece(0, "big", Box((0, 0), (2, 100)), 800), limit=10) == [(0, 1), (1, 2)]  # a row each


def test_a_receive_without_progress_fails_after_the_stall_deadline() -> None:
    class Never:
        def test(self) -> bool:
            return False

    exchange = Exchange(SerialComm(), lambda rank: None, {}, ["h"], {}, stall_seconds=0.05)  # type: ignore[arg-type, return-value]
    with pytest.raises(ExchangeError, match="process 1 sent nothing of parameter 'w' for 0 s"):
        exchange.wait(Never(), 1, "parameter 'w'")


def test_a_holder_refuses_a_parameter_changed_since_start_up(written_cases: dict[str, Case]) -> None:
    path = next((written_cases["random_8to4"].src_dir / "rank_0").glob("*.ckpt"))
    (found,) = read_headers({0: str(path)}).values()
    name, dtype, dims = found.rows[0]
    stale = replace(found, rows=((name, dtype, (dims[0] + 1, *dims[1:])), *found.rows[1:]))
    comm = SerialComm()
    exchange = Exchange(comm, lambda rank: open_index(path), {0: (0,)}, ["h"], {0: stale})
    comm.send([Piece(0, name, Box((0,) * len(dims), dims), found.nbytes[name])], 0, CONTROL_TAG)
    with pytest.raises(CheckpointFormatError, match=rf"{path}: parameter '{name}' changed since the job started"):
        exchange.serve()


def test_a_holder_refuses_to_send_rows_of_a_file_rewritten_since_it_was_indexed(tmp_path: Path,
                                                                              written_cases: dict[str, Case]) -> None:
    """Same shapes, other bytes written in place: the rows read may mix two versions, so none are sent."""
    path = tmp_path / "checkpoint_0.ckpt"
    shutil.copy2(next((written_cases["random_8to4"].src_dir / "rank_0").glob("*.ckpt")), path)
    cache, comm = IndexCache(), SerialComm()
    (found,) = read_headers({0: str(path)}, cache.lease).values()  # start-up indexes it
    name, _, dims = found.rows[0]
    exchange = Exchange(comm, lambda rank: cache.lease(path), {0: (0,)}, ["h"], {0: found},
                        check_unchanged=lambda rank: cache.check_unchanged(path))
    comm.send([Piece(0, name, Box((0,) * len(dims), dims), found.nbytes[name])], 0, CONTROL_TAG)
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 4)
        f.write(b"\0\0\0\0")
    os.utime(path, ns=(1, 1))
    with pytest.raises(CheckpointFormatError, match=rf"{path}: the file changed while this run read it"):
        exchange.serve()
    assert exchange.bytes_sent == 0
    cache.close()


# --- in-process worlds (threads) ----------------------------------------------------------------------

@pytest.mark.parametrize("name", WRITTEN)
@pytest.mark.parametrize("size", [2, 3])
def test_threads_with_split_sources_write_the_expected_bytes(name: str, size: int, tmp_path: Path,
                                                             written_cases: dict[str, Case],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exchange_module, "MESSAGE_BYTES", 256)  # many blocks per piece
    case = written_cases[name]
    base = split_sources(case, tmp_path / "src", size)
    options = options_for(case, str(base / SPLIT), str(tmp_path / "dst"), exchange_buffer=1024)
    summaries = run_threads(size, lambda comm: run_transform(options, comm, quiet=True))
    for rank, data in expected_bytes(case).items():
        path = tmp_path / "dst" / f"rank_{rank}" / f"{case.prefix}{rank}.ckpt"
        assert path.read_bytes() == data, f"target {rank} differs"
    manifest = json.loads((tmp_path / "dst" / "manifest.json").read_text())
    processes = manifest["processes"]
    assert sum(p["bytes_sent"] for p in processes) == sum(p["bytes_received"] for p in processes) > 0
    assert sum(p["bytes_read"] for p in processes) == summaries[0].bytes_read  # each slice read once, somewhere
    assert summaries[0].exchanged and all(s == summaries[0] for s in summaries)


def test_a_failing_thread_process_stops_the_others_mid_exchange(tmp_path: Path, written_cases: dict[str, Case],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Where aborting does not end the others at once (threads), they see the abort and stop waiting."""
    case = written_cases["random_8to4"]
    base = split_sources(case, tmp_path / "src", 3)
    options = options_for(case, str(base / SPLIT), str(tmp_path / "dst"))
    monkeypatch.setenv("MPICKPT_TEST_FAIL", "process=1,after_bytes=1")
    aborted: list[int] = []

    def body(comm: ThreadComm) -> None:
        with contextlib.suppress(SystemExit, threading.BrokenBarrierError):
            run_transform(options, AbortingComm(comm.shared, comm.rank, aborted), stream=io.StringIO())

    run_threads(3, body)  # fails if a thread is still running after 30 s
    assert aborted[0] == 1 and sorted(aborted) == [0, 1, 2]
    assert not (tmp_path / "dst" / "manifest.json").exists()


def test_threads_write_into_per_process_destinations(tmp_path: Path, written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    base = split_sources(case, tmp_path / "src", 2)
    options = options_for(case, str(base / SPLIT), str(tmp_path / "dst" / SPLIT))
    run_threads(2, lambda comm: run_transform(options, comm, quiet=True))
    made = {p.parent.name: p.read_bytes() for p in (tmp_path / "dst").glob("p*/rank_*/*.ckpt")}
    assert made == {f"rank_{r}": data for r, data in expected_bytes(case).items()}
    assert (tmp_path / "dst" / "p0" / "manifest.json").exists()


def test_a_rank_held_by_no_process_is_named_before_any_output(tmp_path: Path,
                                                              written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    base = split_sources(case, tmp_path / "src", 2)
    shutil.rmtree(base / "p1" / "rank_2")
    shutil.rmtree(base / "p0" / "rank_5")
    options = options_for(case, str(base / SPLIT), str(tmp_path / "dst"))

    errors = transform_errors(options, 2)
    assert all(isinstance(e, SourceMissingError) for e in errors) and len({str(e) for e in errors}) == 1
    text = str(errors[0])
    assert "the checkpoint files of ranks [2, 5] are missing" in text, text
    assert "process 0 (host " in text and f"{base / 'p0'}): ranks [1, 3, 7]" in text, text
    assert f"{base / 'p1'}): ranks [0, 4, 6]" in text, text
    assert not list((tmp_path / "dst").rglob("*.ckpt"))


def test_replicas_in_per_process_folders_that_differ_are_refused(tmp_path: Path,
                                                               written_cases: dict[str, Case]) -> None:
    """Both processes hold rank 1 in their own folders, process 1's copy with other bytes and time."""
    case = written_cases["random_8to4"]
    base = split_sources(case, tmp_path / "src", 2)
    held = base / "p1" / "rank_0"
    shutil.copytree(held, base / "p0" / "rank_0")
    copy = next((base / "p0" / "rank_0").glob("*.ckpt"))
    copy.write_bytes(copy.read_bytes()[:-1] + bytes([copy.read_bytes()[-1] ^ 1]))
    options = options_for(case, str(base / SPLIT), str(tmp_path / "dst"))

    errors = transform_errors(options, 2)
    assert all(isinstance(e, SourceConflictError) for e in errors) and len({str(e) for e in errors}) == 1
    text = str(errors[0])
    assert text.startswith("source rank 0: processes see different copies of its file, and their contents differ: "
                           "process 0 (host "), text
    assert f"{copy}: {copy.stat().st_size} bytes" in text and "process 1 (host " in text, text
    assert not list((tmp_path / "dst").rglob("*.ckpt"))


# --- real MPI -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("processes", [2, 3, 4])
@pytest.mark.parametrize("name", WRITTEN)
def test_mpiexec_with_split_sources_gives_the_serial_bytes(name: str, processes: int, flavor: str, tmp_path: Path,
                                                           written_cases: dict[str, Case], serial: Serial) -> None:  # noqa: F811
    case = written_cases[name]
    base = split_sources(case, tmp_path / "src", processes)
    dst = tmp_path / "dst"
    done = mpickpt(transform_args(case, dst, Path(str(base / SPLIT))), launcher(flavor) + ["-n", str(processes)])
    assert done.returncode == 0, done.output
    assert outputs(dst) == serial(case)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["world_size"] == processes
    sent = [p["bytes_sent"] for p in manifest["processes"]]
    received = [p["bytes_received"] for p in manifest["processes"]]
    assert sum(sent) == sum(received) > 0
    assert "over MPI" in done.output


def byte_matrix(case: Case) -> dict[tuple[int, int], int]:
    """(source rank, target rank) -> bytes planned, from `mpickpt plan --matrix --json`."""
    args = [sys.executable, "-m", "mpickpt", "plan", "--matrix", "--json", "--src-dir", str(case.src_dir)]
    for which in ("src", "dst"):
        if case.strategy(which):
            args += [f"--{which}-strategy", str(case.strategy(which))]
    done = run(args)
    assert done.returncode == 0, done.output
    return {(e["source_rank"], e["target_rank"]): e["bytes"] for e in json.loads(done.output)["matrix"]}


def writers(dst: Path) -> dict[int, int]:
    """Target rank -> the process that wrote it, from manifest.json."""
    return {t: p["process"] for p in json.loads((dst / "manifest.json").read_text())["processes"] for t in p["targets"]}


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("processes", [2, 4])
def test_mpiexec_deals_targets_near_their_sources(processes: int, flavor: str, tmp_path: Path,
                                                  written_cases: dict[str, Case], serial: Serial) -> None:  # noqa: F811
    """Each source rank's folder is on the process after the one the shared-folder run (dealing by size alone)
    gives the target reading most from it: the split run moves exactly the bytes its dealing implies, fewer."""
    case = written_cases["random_2to8"]
    prefix = launcher(flavor) + ["-n", str(processes)]
    shared = mpickpt(transform_args(case, tmp_path / "shared"), prefix)
    assert shared.returncode == 0, shared.output
    by_size = writers(tmp_path / "shared")
    matrix = byte_matrix(case)
    main = {s: max(sorted(t for r, t in matrix if r == s), key=lambda t: matrix[s, t]) for s, _ in matrix}
    owner = {s: (by_size[t] + 1) % processes for s, t in main.items()}
    for s, p in owner.items():
        shutil.copytree(case.src_dir / f"rank_{s}", tmp_path / "src" / f"p{p}" / f"rank_{s}")
    dst = tmp_path / "dst"
    done = mpickpt(transform_args(case, dst, tmp_path / "src" / SPLIT), prefix)
    assert done.returncode == 0, done.output
    assert outputs(dst) == serial(case)
    processes_done = json.loads((dst / "manifest.json").read_text())["processes"]
    sent, got = (sum(p[k] for p in processes_done) for k in ("bytes_sent", "bytes_received"))

    def crossing(writer: dict[int, int]) -> int:
        return sum(n for (s, t), n in matrix.items() if owner[s] != writer[t])

    assert sent == got == crossing(writers(dst)) < crossing(by_size)


@pytest.mark.parametrize("action", ["kill", "raise"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_process_killed_mid_exchange_ends_the_job_and_a_rerun_finishes_it(flavor: str, action: str, tmp_path: Path,
                                                                            written_cases: dict[str, Case],
                                                                            serial: Serial) -> None:  # noqa: F811
    case = written_cases["random_8to4"]
    base = split_sources(case, tmp_path / "src", 4)
    dst = tmp_path / "dst"
    args = transform_args(case, dst, Path(str(base / SPLIT)))
    prefix = launcher(flavor) + ["-n", "4"]
    killed = mpickpt(args, prefix, MPICKPT_TEST_FAIL=f"process=1,after_bytes=1,action={action}")
    assert killed.returncode != 0, killed.output
    if action == "raise":
        assert "mpickpt: process 1: target rank " in killed.output and "injected failure" in killed.output
    assert killed.seconds < ENDS_WITHIN, f"the job took {killed.seconds:.1f} s to end"
    expected = serial(case)
    for name in expected:
        if name.endswith(".ckpt") and (dst / name).exists():
            assert (dst / name).read_bytes() == expected[name], f"{name} is incomplete under its final name"
    assert not (dst / "manifest.json").exists()
    rerun = mpickpt(args, prefix)
    assert rerun.returncode == 0, rerun.output
    assert outputs(dst) == expected


@pytest.mark.parametrize("flavor", FLAVORS)
def test_exchange_inside_an_mpi_job(flavor: str, tmp_path: Path, written_cases: dict[str, Case]) -> None:
    """The pytest-mpi test below, run by `mpiexec -n 2 python -m pytest --with-mpi` (pytest-mpi loads mpi4py
    before mpickpt could choose its library, so Open MPI's is named)."""
    case = written_cases["random_2to8"]
    split_sources(case, tmp_path / "src", 2)
    abi = {"MPI4PY_MPIABI": "openmpi"} if flavor == "openmpi" else {}
    done = run(launcher(flavor) + ["-n", "2", sys.executable, "-m", "pytest", "--with-mpi", "-m", "mpi", "-q",
                                   "-p", "no:cacheprovider", str(Path(__file__))],
               MPICKPT_EXCHANGE_CASE=str(case.root), MPICKPT_EXCHANGE_DIR=str(tmp_path), **abi,
               PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]))
    assert done.returncode == 0, done.output
    assert "1 passed" in done.output, done.output


@pytest.mark.mpi(min_size=2)
def test_pieces_travel_between_mpi_processes() -> None:
    """Inside `mpiexec -n 2`: rank 1's folder holds rank_0, rank 0's rank_1; every target is written by one
    process from its own file and the other's, in blocks of 1 kB through a 4 kB budget."""
    from mpickpt.mpi import world

    root, work = Path(os.environ["MPICKPT_EXCHANGE_CASE"]), Path(os.environ["MPICKPT_EXCHANGE_DIR"])
    case = Case(root, json.loads((root / "case.json").read_text()))
    comm = world()
    exchange_module.MESSAGE_BYTES = 1024
    options = options_for(case, str(work / "src" / SPLIT), str(work / "dst"), exchange_buffer=4096)
    summary = run_transform(options, comm, quiet=True)
    for rank, data in expected_bytes(case).items():
        assert (work / "dst" / f"rank_{rank}" / f"{case.prefix}{rank}.ckpt").read_bytes() == data
    sent = {p: s for p, _, s, _ in summary.exchanged}
    received = {p: r for p, _, _, r in summary.exchanged}
    assert sent[0] == received[1] > 0 and sent[1] == received[0] > 0


def per_host_mounts(flavor: str, command: list[str], plain: Path, folders: dict[str, Path]) -> list[str]:
    """An MPMD mpiexec line of 2 processes per simulated host (MPICKPT_HOST), each host in its own mount
    namespace where the plain path `plain` is its own folder (a bind mount of folders[host])."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("simulating node-local folders under one path needs root and unshare (mount namespaces)")
    mpiexec = launcher(flavor)
    line: list[str] = [*mpiexec]
    for host, folder in folders.items():
        setting = ["-env", "MPICKPT_HOST", host] if flavor == "mpich" else ["-x", f"MPICKPT_HOST={host}"]
        mount = ["unshare", "-m", "--propagation", "private", "sh", "-c",
                 f'mount --bind "{folder}" "{plain}" && exec "$@"', "sh"]
        line += [*([":"] if line != mpiexec else []), "-n", "2", *setting, *mount, *command]
    return line


@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_plain_destination_that_is_a_different_folder_per_host_is_refused(flavor: str, tmp_path: Path,
                                                                             written_cases: dict[str, Case],
                                                                             serial: Serial) -> None:  # noqa: F811
    """`--dst-dir out` is node-local on hosts a and b: every process fails alike, asking for {host}, before any
    output; `--dst-dir 'out/{host}'` then writes each host's outputs to its own disk."""
    case = written_cases["random_8to4"]
    plain = tmp_path / "out"
    folders = {host: tmp_path / f"disk_{host}" for host in "ab"}
    for folder in [plain, *folders.values()]:
        folder.mkdir()
    command = [sys.executable, "-m", "mpickpt", "transform", *transform_args(case, plain)]
    done = run(per_host_mounts(flavor, command, plain, folders))
    assert done.returncode != 0, done.output
    refused = (f"mpickpt: error: dst_dir {plain}: process 2 (host b) does not see the folder that process 0 "
               f"(host a) locked there: the path is not one shared folder (a node-local disk on each host?). To "
               f"write each host's outputs to its own disk, put {{host}} in --dst-dir (e.g. --dst-dir "
               f"'{plain / '{host}'}'); otherwise give a folder every process shares")
    assert done.output.count("mpickpt: error:") == done.output.count(refused) == 4, done.output  # all alike
    assert [p.name for p in folders["a"].iterdir()] == [LOCK_NAME] and not any(folders["b"].iterdir())

    per_host = [sys.executable, "-m", "mpickpt", "transform", *transform_args(case, plain / "{host}")]
    done = run(per_host_mounts(flavor, per_host, plain, folders))
    assert done.returncode == 0, done.output
    made = {name: data for host, folder in folders.items() for name, data in outputs(folder / host).items()}
    assert made == serial(case)


def _node_local_sources(case: Case, tmp_path: Path, change: str) -> tuple[Path, dict[str, Path]]:
    """A plain source path that is a copy of the case on each of hosts a and b, host b's copy changed:
    "values" (every tensor byte flipped, same sizes), "size" (rank 0's file one byte longer) or "time" (same
    bytes, other modification times)."""
    plain, folders = tmp_path / "src", {host: tmp_path / f"disk_{host}" for host in "ab"}
    plain.mkdir()
    for folder in folders.values():
        shutil.copytree(case.src_dir, folder)  # copies times too
    for path in sorted(folders["b"].glob("rank_*/*.ckpt")):
        if change == "values":
            with open_index(path) as index:
                runs = [piece for entry in index.entries.values() for piece in entry.pieces]
            data = bytearray(path.read_bytes())
            for offset, length in runs:
                data[offset:offset + length] = bytes(byte ^ 0x5A for byte in data[offset:offset + length])
            path.write_bytes(bytes(data))
        elif change == "size" and path.parent.name == "rank_0":
            path.write_bytes(path.read_bytes() + b"\0")
        elif change == "time":
            os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    return plain, folders


@pytest.mark.parametrize(("flavor", "change"), [*((f, "values") for f in FLAVORS), ("mpich", "size")])
def test_node_local_copies_of_a_source_that_differ_are_refused(flavor: str, change: str, tmp_path: Path,
                                                               written_cases: dict[str, Case]) -> None:
    """`--src-dir src` is node-local on hosts a and b and b's copies hold other bytes: every process fails
    alike naming both copies, before any output (the run used to mix the two checkpoints and exit 0)."""
    case = written_cases["random_8to4"]
    plain, folders = _node_local_sources(case, tmp_path, change)
    dst = tmp_path / "out"
    command = [sys.executable, "-m", "mpickpt", "transform", *transform_args(case, dst, plain)]
    done = run(per_host_mounts(flavor, command, plain, folders))
    assert done.returncode != 0, done.output
    how = "their contents differ" if change == "values" else "their sizes differ"
    refused = f"mpickpt: error: source rank 0: processes see different copies of its file, and {how}: process 0 (host a) "
    assert done.output.count("mpickpt: error:") == done.output.count(refused) == 4, done.output  # all alike
    assert f"; process 2 (host b) {plain / 'rank_0'}" in done.output
    assert "mpickpt cannot tell which copy is current" in done.output
    assert sorted(p.name for p in dst.iterdir()) == [LOCK_NAME]


def test_node_local_copies_with_other_times_but_the_same_bytes_are_used(tmp_path: Path,
                                                                        written_cases: dict[str, Case],
                                                                        serial: Serial) -> None:  # noqa: F811
    """Copies made without keeping times are checksummed on their hosts, found equal and used (a note says so)."""
    case = written_cases["random_8to4"]
    plain, folders = _node_local_sources(case, tmp_path, "time")
    dst = tmp_path / "out"
    command = [sys.executable, "-m", "mpickpt", "transform", *transform_args(case, dst, plain)]
    done = run(per_host_mounts("mpich", command, plain, folders))
    assert done.returncode == 0, done.output
    assert outputs(dst) == serial(case)
    ranks = sorted(int(p.name.split("_")[1]) for p in case.src_dir.glob("rank_*"))
    assert (f"copies of source ranks {ranks} on several hosts have different times but the same contents "
            "(checksummed)") in json.loads((dst / "manifest.json").read_text())["notes"]


# --- MindSpore-made cases: a pipeline strategy folder (merged by rank 0), redundancy-removed sources -----

def test_redundancy_removed_pipeline_sources_split_over_processes(mindspore_cases: dict[str, Case],
                                                                  tmp_path: Path) -> None:
    """Each shared slice is in one rank's file only, so it comes from the process holding that file."""
    case = mindspore_cases["pipeline_2x4_to_4"]
    reduced = tmp_path / "reduced"
    make_redundancy_removed(case, reduced)
    base = split_sources(Case(case.root, {**case.meta, "src_checkpoints_dir": str(reduced)}), tmp_path / "src", 3)
    options = TransformOptions(str(base / SPLIT), str(tmp_path / "dst"), case.prefix,
                               src_strategy_dir=str(case.root / case.meta["src_pipeline_strategy_dir"]),
                               dst_strategy=case.strategy("dst"))
    summaries = run_threads(3, lambda comm: run_transform(options, comm, quiet=True))
    assert any("redundancy-removed" in note for note in summaries[0].notes)
    for rank, theirs in case.expected_files().items():
        assert_same_content(tmp_path / "dst" / f"rank_{rank}" / theirs.name, theirs)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_mpiexec_pipeline_case_with_split_sources(flavor: str, tmp_path: Path, mindspore_cases: dict[str, Case],
                                                  serial: Serial) -> None:  # noqa: F811
    case = mindspore_cases["pipeline_2x4_to_4"]
    base = split_sources(case, tmp_path / "src", 4)
    done = mpickpt(transform_args(case, tmp_path / "dst", Path(str(base / SPLIT))), launcher(flavor) + ["-n", "4"])
    assert done.returncode == 0, done.output
    assert outputs(tmp_path / "dst") == serial(case)


@pytest.mark.parametrize("flavor", FLAVORS)
def test_two_simulated_hosts_with_host_folders(flavor: str, tmp_path: Path, written_cases: dict[str, Case],
                                               serial: Serial) -> None:  # noqa: F811
    """`{host}` folders: processes 0-1 play host a (ranks 0-3), 2-3 host b (ranks 4-7), MPMD with MPICKPT_HOST."""
    case = written_cases["random_8to4"]
    for rank_dir in sorted(case.src_dir.glob("rank_*")):
        shutil.copytree(rank_dir, tmp_path / "src" / ("a" if int(rank_dir.name[5:]) < 4 else "b") / rank_dir.name)
    dst = tmp_path / "dst"
    command = [sys.executable, "-m", "mpickpt", "transform",
               *transform_args(case, dst, Path(str(tmp_path / "src" / "{host}")))]
    mpiexec = launcher(flavor)
    setting = (lambda host: ["-env", "MPICKPT_HOST", host]) if flavor == "mpich" else (
        lambda host: ["-x", f"MPICKPT_HOST={host}"])
    done = run([*mpiexec, "-n", "2", *setting("a"), *command, ":", "-n", "2", *setting("b"), *command])
    assert done.returncode == 0, done.output
    assert outputs(dst) == serial(case)
    assert f"process 1 (host a, {tmp_path / 'src' / 'a'}): ranks [0, 1, 2, 3]" in done.output, done.output
    assert f"process 2 (host b, {tmp_path / 'src' / 'b'}): ranks [4, 5, 6, 7]" in done.output, done.output
    processes = json.loads((dst / "manifest.json").read_text())["processes"]
    assert sum(p["bytes_received"] for p in processes) > 0
