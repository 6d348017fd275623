"""`unify` and `convert` under MPI need folders every process shares (mpickpt/shared_folders.py).

Node-local folders under one path are simulated with a mount namespace per host (`per_host_mounts`: two
processes per host, host a = processes 0-1, host b = 2-3): a source folder whose copy on host b holds one
file of the same size but other bytes and another modification time, and a destination that is another
folder on each host. Every process must fail alike, naming the file or folder, the process and the hosts,
before any output is written. The check itself is unit-tested without MPI, and shared folders still give
the serial run's bytes on threads (the mpiexec runs of tests/test_unify.py and tests/test_convert.py also
go through it).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from fixture_cases import Case
from test_driver import run_threads
from test_exchange import per_host_mounts
from test_mpi import FLAVORS, no_stale_segments, outputs, run  # noqa: F401

from mpickpt.convert import destination, run_convert
from mpickpt.errors import DestinationError, SourceConflictError
from mpickpt.manifest import SourceStamp
from mpickpt.mpi import SerialComm
from mpickpt.placement import format_ns
from mpickpt.shared_folders import (
    TOKEN_PREFIX,
    check_view,
    differences,
    leave_check,
)
from mpickpt.startup import HOST_VARIABLE
from mpickpt.unify import UnifyOptions, run_unify

CASE = "random_8to4"  # 8 source rank files with a source strategy
CHANGED = "rank_3/checkpoint_3.ckpt"  # the file host b's copy has other bytes in
UNIFY_SOURCE = ("mpickpt unify reads every source file by path on every process, so the source must be one folder "
                "every process shares (copies on node-local disks are not supported there)")
CONVERT_SOURCE = UNIFY_SOURCE.replace("unify", "convert")


# --- the comparison, without MPI ---------------------------------------------------------------

def stamp(size: int, mtime_ns: int) -> SourceStamp:
    return SourceStamp("/src/rank_0/a.ckpt", size, mtime_ns, 1, 2, 3)


def test_differences_name_size_and_time_with_both_values() -> None:
    planned = stamp(1000, 1_700_000_000_000_000_001)
    assert differences(planned, SourceStamp("/src/rank_0/a.ckpt", 1000, 1_700_000_000_000_000_001, 9, 9, 9)) == []
    assert differences(planned, stamp(1234, 1_700_000_000_000_000_001)) == [
        "size 1,234 bytes here, 1,000 bytes on process 0"]
    assert differences(planned, stamp(1000, 1_700_000_001_500_000_000)) == [
        "modification time 2023-11-14 22:13:21.500000000 UTC here, 2023-11-14 22:13:20.000000001 UTC on process 0"]
    assert len(differences(planned, stamp(1, 2))) == 2
    assert differences(planned, None) == ["the file is missing here"]
    assert format_ns(0) == "1970-01-01 00:00:00.000000000 UTC"


def test_one_process_leaves_nothing(tmp_path: Path) -> None:
    assert leave_check("unify", [], str(tmp_path / "out"), 1) is None
    assert not (tmp_path / "out").exists()


def test_check_view_refuses_another_file_or_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HOST_VARIABLE, "a")
    source = tmp_path / "src" / "rank_0" / "a.ckpt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"x" * 10)
    os.utime(source, ns=(10**18, 10**18))
    check = leave_check("convert", [str(source)], str(tmp_path / "out"), 2)
    assert check is not None and os.listdir(tmp_path / "out") == [TOKEN_PREFIX + check.token]
    check_view(check, 1, "b")  # the same file and folder

    os.utime(source, ns=(10**18, 10**18 + 5))
    with pytest.raises(SourceConflictError) as refused:
        check_view(check, 1, "b")
    assert str(refused.value) == (
        f"{source}: process 1 (host b) does not see the file that process 0 (host a) planned with: modification "
        f"time 2001-09-09 01:46:40.000000005 UTC here, 2001-09-09 01:46:40.000000000 UTC on process 0. "
        f"{CONVERT_SOURCE}")

    os.unlink(check.token_path)
    with pytest.raises(DestinationError) as refused:
        check_view(check, 3, "b")
    assert tokens_hidden(str(refused.value)) == destination_refused(tmp_path / "out", "convert", 3)


def test_convert_destination_is_the_folder_holding_the_outputs(tmp_path: Path) -> None:
    (tmp_path / "rank_0").mkdir()
    (tmp_path / "a.ckpt").write_bytes(b"")
    assert destination(tmp_path, tmp_path / "out") == str(tmp_path / "out")
    assert destination(tmp_path, None) == str(tmp_path)
    assert destination(tmp_path / "a.ckpt", None) == str(tmp_path)
    assert destination(tmp_path / "a.ckpt", tmp_path / "out") == str(tmp_path / "out")


def destination_refused(folder: Path, command: str, process: int = 2) -> str:
    """The error of a process on host b that does not see the destination process 0 (host a) wrote its check
    file into (the file's token as <token>: see `tokens_hidden`)."""
    return (f"{folder}: process {process} (host b) does not see the folder that process 0 (host a) writes into "
            f"(its check file {TOKEN_PREFIX}<token> is not there): the path is not one shared folder (a node-local "
            f"disk on each host?). mpickpt {command} writes every output by path from the process it is dealt to, "
            f"so the destination must be one folder every process shares")


def tokens_hidden(text: str) -> str:
    return re.sub(re.escape(TOKEN_PREFIX) + "[0-9a-f]{32}", TOKEN_PREFIX + "<token>", text)


# --- shared folders on threads: the serial run's bytes, nothing left behind --------------------

def test_shared_folders_on_two_threads_equal_serial(tmp_path: Path, written_cases: dict[str, Case]) -> None:
    case = written_cases[CASE]

    def unify(dst: Path) -> UnifyOptions:
        return UnifyOptions(str(case.src_dir), str(dst), case.strategy("src"), layout="hf", max_shard_size=20_000)

    run_unify(unify(tmp_path / "serial"), SerialComm(), sync=False, manifest=False)
    run_threads(2, lambda comm: run_unify(unify(tmp_path / "threads"), comm, sync=False, manifest=False))
    assert outputs(tmp_path / "threads") == outputs(tmp_path / "serial")
    assert sorted(os.listdir(tmp_path / "threads")) == sorted(os.listdir(tmp_path / "serial"))

    run_convert(case.src_dir, tmp_path / "st_serial", "safetensors", SerialComm(), sync=False)
    run_threads(2, lambda comm: run_convert(case.src_dir, tmp_path / "st_threads", "safetensors", comm, sync=False))
    assert outputs(tmp_path / "st_threads") == outputs(tmp_path / "st_serial")
    assert not list((tmp_path / "st_threads").glob(TOKEN_PREFIX + "*"))


# --- node-local folders on two simulated hosts under mpiexec ------------------------------------

def unify_command(case: Case, src: Path, dst: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "mpickpt", "unify", "--src-dir", str(src), "--src-strategy",
            str(case.strategy("src")), "--dst", str(dst), "--no-sync", *flags]


def convert_command(src: Path, dst: Path) -> list[str]:
    return [sys.executable, "-m", "mpickpt", "convert", str(src), str(dst), "--to", "safetensors", "--no-sync"]


def node_local(tmp_path: Path, name: str) -> tuple[Path, dict[str, Path]]:
    """The plain path `name` and the folder each host mounts there."""
    plain = tmp_path / name
    folders = {host: tmp_path / f"{name}_{host}" for host in "ab"}
    plain.mkdir()
    return plain, folders


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


def assert_every_process_fails_alike(output: str, message: str) -> None:
    """Each of the 4 processes prints `message` as its only error."""
    assert output.count("mpickpt: error:") == output.count(f"mpickpt: error: {message}") == 4, output


@pytest.mark.parametrize("command", ["unify", "convert"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_node_local_source_copy_that_differs_is_refused(flavor: str, command: str, tmp_path: Path,
                                                          written_cases: dict[str, Case]) -> None:
    """Host b's copy of one rank file has the same size but other bytes and another modification time: every
    process fails, naming the file, process 2 (host b) and both times, and nothing is written."""
    case = written_cases[CASE]
    plain, folders = node_local(tmp_path, "src")
    for folder in folders.values():
        shutil.copytree(case.src_dir, folder)  # sizes and times kept
    changed = folders["b"] / CHANGED
    original = changed.stat()
    data = bytearray(changed.read_bytes())
    data[-8:] = bytes(255 - b for b in data[-8:])
    changed.write_bytes(bytes(data))
    os.utime(changed, ns=(original.st_atime_ns, original.st_mtime_ns + 1_000_000_000))
    dst = tmp_path / "dst"
    line = (unify_command(case, plain, dst) if command == "unify" else convert_command(plain, dst))
    done = run(per_host_mounts(flavor, line, plain, folders))
    assert done.returncode != 0, done.output
    assert_every_process_fails_alike(done.output, (
        f"{plain / CHANGED}: process 2 (host b) does not see the file that process 0 (host a) planned with: "
        f"modification time {format_ns(original.st_mtime_ns + 1_000_000_000)} here, "
        f"{format_ns(original.st_mtime_ns)} on process 0. {UNIFY_SOURCE.replace('unify', command)}"))
    assert files_under(dst) == []


@pytest.mark.parametrize("command", ["unify", "unify_h5", "convert"])
@pytest.mark.parametrize("flavor", FLAVORS)
def test_a_node_local_destination_is_refused(flavor: str, command: str, tmp_path: Path,
                                             written_cases: dict[str, Case]) -> None:
    """The destination is another folder on each host: every process fails naming it and both hosts, before
    any output (the check file is removed: both hosts' folders hold no file)."""
    if command == "unify_h5":
        pytest.importorskip("h5py")
    case = written_cases[CASE]
    plain, folders = node_local(tmp_path, "dst")
    for folder in folders.values():
        folder.mkdir()
    line = {"unify": unify_command(case, case.src_dir, plain),
            "unify_h5": unify_command(case, case.src_dir, plain / "model.h5", "--format", "h5"),
            "convert": convert_command(case.src_dir, plain)}[command]
    done = run(per_host_mounts(flavor, line, plain, folders))
    assert done.returncode != 0, done.output
    assert_every_process_fails_alike(tokens_hidden(done.output),
                                     destination_refused(plain, command.removesuffix("_h5")))
    assert files_under(folders["a"]) == files_under(folders["b"]) == []
