"""Destination safety: folders compared by device and inode, prefixes, unwritable destinations, the run lock.

Bind mounts and immutable folders need root (and a kernel that lets this container mount); those tests skip
with the reason otherwise. Every test checks that the source folder is left byte for byte as it was.
"""

from __future__ import annotations

import errno
import fcntl
import io
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixture_cases import Case

from mpickpt.atomic import write_bytes_atomic
from mpickpt.destination import (
    LOCK_NAME,
    DestinationLock,
    check_destination,
    check_prefix,
    lock_token,
    refuse_destination_inside,
)
from mpickpt.driver import lock_destination, run_transform
from mpickpt.errors import DestinationError, MpickptError
from mpickpt.manifest import remove_manifest, remove_record
from mpickpt.mpi import SerialComm
from mpickpt.startup import _check_one_folder
from mpickpt.transform import TransformOptions


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under root: its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """A source folder with two rank folders."""
    root = tmp_path / "src"
    for rank in range(2):
        (root / f"rank_{rank}").mkdir(parents=True)
        (root / f"rank_{rank}" / f"checkpoint_{rank}.ckpt").write_bytes(bytes([rank]) * 64)
    return root


def bind_mount(source: Path, target: Path, *, read_only: bool = False) -> None:
    """mount --bind source target (skips the test when this process may not mount)."""
    target.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("bind mounts need root and mount(8)")
    done = subprocess.run(["mount", "--bind", str(source), str(target)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    if read_only:
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(target)], capture_output=True, text=True,
                              check=False)
        if done.returncode != 0:
            unmount(target)
            pytest.skip(f"cannot remount read-only here: {done.stderr.strip()}")


def unmount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    """Mount points to unmount after the test, whatever happens."""
    points: list[Path] = []
    yield points
    for point in reversed(points):
        unmount(point)


# --- inside a source folder -----------------------------------------------------------------------------

@pytest.mark.parametrize("inside", [".", "rank_0", "rank_0/new/deeper"])
def test_destination_in_a_source_is_refused(src: Path, inside: str) -> None:
    before = snapshot(src)
    with pytest.raises(DestinationError, match="refusing to write inside source folder"):
        check_destination(src / inside, [src])
    assert snapshot(src) == before


def test_symlink_to_a_source_is_refused(src: Path, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(src / "rank_1")
    (tmp_path / "link_to_root").symlink_to(src)
    for dst in [tmp_path / "link", tmp_path / "link" / "out", tmp_path / "link_to_root" / "out"]:
        with pytest.raises(DestinationError, match=f"{dst}: refusing to write inside source folder {src}"):
            check_destination(dst, [src])
    with pytest.raises(DestinationError, match="refusing"):
        refuse_destination_inside(tmp_path / "link" / "x.ckpt", [src])


def test_relative_and_dotted_spellings_are_refused(src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(src / "rank_0")
    for dst in [".", "..", "../rank_1/../out", "./x"]:
        with pytest.raises(DestinationError, match="refusing"):
            check_destination(dst, [src])


def test_bind_mount_of_a_source_is_refused(src: Path, tmp_path: Path, mounts: list[Path]) -> None:
    before = snapshot(src)
    bind_mount(src, tmp_path / "bound")
    mounts.append(tmp_path / "bound")
    with pytest.raises(DestinationError, match="refusing to write inside source folder"):
        check_destination(tmp_path / "bound" / "out", [src])
    with pytest.raises(DestinationError, match="refusing"):
        write_bytes_atomic(tmp_path / "bound" / "rank_0" / "x.ckpt", b"x", forbidden_dirs=[src])
    assert snapshot(src) == before


def test_bind_mount_of_a_rank_folder_is_refused(src: Path, tmp_path: Path, mounts: list[Path]) -> None:
    before = snapshot(src)
    bind_mount(src / "rank_1", tmp_path / "bound_rank")
    mounts.append(tmp_path / "bound_rank")
    with pytest.raises(DestinationError, match=f"inside source folder {src} \\(as {src / 'rank_1'}\\)"):
        check_destination(tmp_path / "bound_rank", [src])
    assert snapshot(src) == before


def test_source_reached_through_a_bind_mount_is_refused(src: Path, tmp_path: Path, mounts: list[Path]) -> None:
    bind_mount(src, tmp_path / "bound")
    mounts.append(tmp_path / "bound")
    with pytest.raises(DestinationError, match="refusing"):
        check_destination(src / "out", [tmp_path / "bound"])


def test_hard_linked_folder_is_refused(src: Path, tmp_path: Path) -> None:
    try:
        os.link(src / "rank_0", tmp_path / "hard")
    except OSError as err:
        pytest.skip(f"this filesystem does not hard-link folders ({err.strerror}); the same (st_dev, st_ino) "
                    "check is exercised by the bind-mount tests")
    with pytest.raises(DestinationError, match="refusing"):
        check_destination(tmp_path / "hard", [src])


def test_sibling_and_parent_folders_are_allowed(src: Path, tmp_path: Path) -> None:
    check_destination(tmp_path / "dst", [src])
    check_destination(tmp_path / "src_other", [src])  # a name prefix is not a parent
    check_destination(tmp_path, [src / "rank_0"])


# --- files, permissions ---------------------------------------------------------------------------------

def test_destination_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DestinationError, match=r"dst_dir .*afile: .*afile exists and is not a folder"):
        check_destination(tmp_path / "afile", [])
    with pytest.raises(DestinationError, match="afile exists and is not a folder"):
        check_destination(tmp_path / "afile" / "below", [])
    with pytest.raises(DestinationError, match="no destination folder"):
        check_destination("", [])


def test_unwritable_destination_is_refused_as_a_user(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through permission bits; see the read-only mount and immutable tests")
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(DestinationError, match="is not writable"):
        check_destination(tmp_path / "ro" / "dst", [])


def test_read_only_mount_is_refused(tmp_path: Path, mounts: list[Path]) -> None:
    (tmp_path / "folder").mkdir()
    bind_mount(tmp_path / "folder", tmp_path / "ro", read_only=True)
    mounts.append(tmp_path / "ro")
    with pytest.raises(DestinationError, match=r"folder .*ro is not writable"):
        check_destination(tmp_path / "ro" / "dst", [])
    with pytest.raises(DestinationError, match="cannot create"):
        DestinationLock.acquire(str(tmp_path / "ro"))


def transform_case(case: Case, dst: Path) -> None:
    """A serial transform of one of the cases mpickpt writes itself into dst."""
    run_transform(TransformOptions(src_dir=str(case.src_dir), dst_dir=str(dst), prefix=case.prefix,
                                   src_strategy=case.strategy("src"), dst_strategy=case.strategy("dst")),
                  SerialComm(), sync=False, quiet=True)


def test_read_only_output_rank_folder_is_refused_before_anything_is_written(
        tmp_path: Path, mounts: list[Path], written_cases: dict[str, Case]) -> None:
    """Found: a destination whose rank_2 folder is a read-only mount (or a file) was written up to rank_2, then
    failed with an untyped OSError from removing rank_2's old completion record."""
    case = written_cases["random_8to4"]
    dst = tmp_path / "dst"
    (tmp_path / "folder").mkdir()
    bind_mount(tmp_path / "folder", dst / "rank_2", read_only=True)
    mounts.append(dst / "rank_2")
    before = snapshot(case.src_dir)
    with pytest.raises(DestinationError, match=r"rank_2: folder .*rank_2 is not writable"):
        transform_case(case, dst)
    assert not [p for p in dst.rglob("*") if p.is_file() and p.name != LOCK_NAME]
    assert snapshot(case.src_dir) == before


def test_records_and_manifests_that_cannot_be_removed_give_a_typed_error(tmp_path: Path,
                                                                        mounts: list[Path]) -> None:
    """A destination made read-only during a run: removing an output's old record (or the old manifest) fails
    with a DestinationError naming it, not a bare OSError."""
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "out.ckpt.done.json").write_text("{}")
    (tmp_path / "folder" / "manifest.json").write_text("{}")
    bind_mount(tmp_path / "folder", tmp_path / "ro", read_only=True)
    mounts.append(tmp_path / "ro")
    with pytest.raises(DestinationError, match=r"out.ckpt.done.json: cannot remove the earlier completion record"):
        remove_record(str(tmp_path / "ro" / "out.ckpt"))
    with pytest.raises(DestinationError, match=r"manifest.json: cannot remove the earlier run's manifest"):
        remove_manifest(str(tmp_path / "ro"))


@pytest.mark.parametrize("taken", ["file", "folder"])
def test_output_path_taken_by_another_kind_of_entry_is_refused_before_anything_is_written(
        tmp_path: Path, taken: str, written_cases: dict[str, Case]) -> None:
    """A file where an output's rank folder goes, or a folder under an output's name: refused up front, naming
    it, instead of after writing the outputs before it (and, for the folder, the output itself)."""
    case = written_cases["random_8to4"]
    dst = tmp_path / "dst"
    dst.mkdir()
    if taken == "file":
        (dst / "rank_2").write_text("not a folder")
        expected = r"rank_2 exists and is not a folder"
    else:
        (dst / "rank_2" / f"{case.prefix}2.ckpt").mkdir(parents=True)
        expected = rf"rank_2/{case.prefix}2.ckpt: a folder has this output's name"
    with pytest.raises(DestinationError, match=expected):
        transform_case(case, dst)
    assert not list(dst.rglob("*.ckpt*")) or taken == "folder" and [p.name for p in dst.rglob("*.ckpt*")] == \
        [f"{case.prefix}2.ckpt"]


def test_immutable_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "frozen"
    folder.mkdir()
    if shutil.which("chattr") is None:
        pytest.skip("chattr is not installed")
    done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot make a folder immutable here: {done.stderr.strip()}")
    try:
        with pytest.raises(DestinationError, match="is not writable"):
            check_destination(folder, [])
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


# --- prefixes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["a/b", "../x", "/abs", "x\0y", "..", "ok..no"])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(DestinationError, match="prefix .*plain file-name prefix") as err:
        check_prefix(prefix)
    assert isinstance(err.value, MpickptError)


@pytest.mark.parametrize("prefix", ["checkpoint_", "", "net-v1.", "a b"])
def test_plain_prefixes_are_accepted(prefix: str) -> None:
    check_prefix(prefix)


# --- the run lock ---------------------------------------------------------------------------------------

def test_lock_is_exclusive_and_names_its_holder(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    first = DestinationLock.acquire(str(dst))
    holder = f"host={socket.gethostname()} pid={os.getpid()}"
    assert first.held and (dst / LOCK_NAME).read_text() == f"{holder}\ntoken={first.token}\n"
    assert lock_token(str(dst)) == first.token and len(first.token) == 32
    with pytest.raises(DestinationError, match=f"another mpickpt run is writing here \\(host={socket.gethostname()} "
                                               f"pid={os.getpid()}, lock .*{LOCK_NAME}\\)"):
        DestinationLock.acquire(str(dst))
    first.release()
    first.release()  # twice is harmless
    DestinationLock.acquire(str(dst)).release()


def test_lock_of_a_killed_process_does_not_block(tmp_path: Path) -> None:
    dst = tmp_path / "dst"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from mpickpt.destination import DestinationLock; "
        f"DestinationLock.acquire({str(dst)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(DestinationError, match=f"pid={holder.pid}"):
            DestinationLock.acquire(str(dst))
    finally:
        holder.kill()
        holder.wait()
    assert f"pid={holder.pid}" in (dst / LOCK_NAME).read_text()  # the file stays, the lock does not
    lock = DestinationLock.acquire(str(dst))
    assert (dst / LOCK_NAME).read_text() == f"host={socket.gethostname()} pid={os.getpid()}\ntoken={lock.token}\n"
    lock.release()


def test_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    stream = io.StringIO()
    lock = lock_destination(TransformOptions(src_dir=str(tmp_path / "src"), dst_dir=str(tmp_path / "dst")), stream)
    assert not lock.held and lock_token(str(tmp_path / "dst")) == lock.token  # unlocked, still told apart
    assert stream.getvalue() == (f"mpickpt: warning: {tmp_path / 'dst'}: the filesystem does not support locks; "
                                 "a concurrent run into the same folder would not be noticed\n")
    lock.release()


def test_a_process_reading_back_another_token_is_not_in_the_locked_folder(tmp_path: Path) -> None:
    """One path, node-local on hosts a and b: host b's processes find another lock file (or none) there."""
    lock = DestinationLock.acquire(str(tmp_path / "out"))
    dirs, hosts = [str(tmp_path / "out")] * 3, ["a", "a", "b"]
    _check_one_folder("out", 1, dirs, hosts, [lock.token, None, None])  # the folder process 0 locked
    with pytest.raises(DestinationError, match=r"process 2 \(host b\) does not see the folder that process 0 \(host "
                                               r"a\) locked there: .* put \{host\} in --dst-dir \(e.g. --dst-dir "
                                               r"'out/\{host\}'\)"):
        _check_one_folder("out", 2, dirs, hosts, ["another run's token", None, None])
    with pytest.raises(DestinationError, match="process 1"):
        _check_one_folder("out", 1, [str(tmp_path / "elsewhere")] * 2, hosts, [lock.token, None])  # no lock file
    lock.release()
