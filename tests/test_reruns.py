"""Reruns of real conversions into a folder an earlier run wrote: what is redone, and why; what is kept; what
is only listed (never deleted); two runs at once; a killed run finished by the next.

Serial runs go through `run_transform` in this process; the ones about working folders, locks and killed
processes run `python -m mpickpt transform` as subprocesses.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_cases import Case

from mpickpt.destination import LOCK_NAME
from mpickpt.driver import Summary, run_transform
from mpickpt.errors import DestinationError
from mpickpt.manifest import JOB_CHANGED, SOURCES_CHANGED
from mpickpt.mpi import SerialComm
from mpickpt.transform import TransformOptions

REPO = Path(__file__).resolve().parents[1]
CASE: dict[str, Case] = {}  # the cases mpickpt writes itself (tests/written_cases.py), filled per test


@pytest.fixture(autouse=True)
def _written(written_cases: dict[str, Case]) -> None:
    CASE.update(written_cases)
TIMEOUT = 120


def options(case: Case, dst: Path, *, src_dir: Path | None = None, dst_strategy: str | None = "case") -> TransformOptions:
    """The options of a fixture case into dst (dst_strategy "case": the case's own target strategy)."""
    return TransformOptions(src_dir=str(src_dir or case.src_dir), dst_dir=str(dst), prefix=case.prefix,
                            src_strategy=case.strategy("src"),
                            dst_strategy=case.strategy("dst") if dst_strategy == "case" else dst_strategy)


def run(opts: TransformOptions) -> Summary:
    return run_transform(opts, SerialComm(), sync=False, quiet=True)


def outputs(root: Path) -> dict[str, bytes]:
    """Output checkpoints under root, by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.ckpt"))
            if p.parent != root}  # not the merged strategies


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "SLURM_", "MPICKPT_TEST"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "mpickpt", "transform", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


def test_changed_target_strategy_redoes_outputs_as_a_fresh_run_and_lists_the_rest(tmp_path: Path) -> None:
    case = CASE["random_8to4"]
    dst = tmp_path / "dst"
    run(options(case, dst, dst_strategy=case.strategy("src")))  # 8 -> 8 first
    eight = outputs(dst)
    summary = run(options(case, dst))  # then 8 -> 4 into the same folder
    fresh = tmp_path / "fresh"
    run(options(case, fresh))
    assert (summary.written, summary.skipped) == (4, 0)
    assert summary.redone == tuple((f"rank_{r}/checkpoint_{r}.ckpt", JOB_CHANGED) for r in range(4))
    assert {n: d for n, d in outputs(dst).items() if n in outputs(fresh)} == outputs(fresh)
    assert summary.stale == ("rank_4/", "rank_5/", "rank_6/", "rank_7/")
    assert manifest(dst)["stale"] == list(summary.stale)
    assert all(outputs(dst)[n] == eight[n] for n in eight if n.startswith(("rank_4", "rank_5", "rank_6", "rank_7")))


def test_changed_target_strategy_with_the_same_source_files_is_redone(tmp_path: Path) -> None:
    case = CASE["random_8to4"]
    dst = tmp_path / "dst"
    run(options(case, dst))  # 4-way tensor parallel
    summary = run(options(case, dst, dst_strategy=None))  # one full checkpoint, rank_0 again
    fresh = tmp_path / "fresh"
    run(options(case, fresh, dst_strategy=None))
    assert summary.redone == (("rank_0/checkpoint_0.ckpt", JOB_CHANGED),)
    assert outputs(dst)["rank_0/checkpoint_0.ckpt"] == outputs(fresh)["rank_0/checkpoint_0.ckpt"]
    assert summary.stale == ("rank_1/", "rank_2/", "rank_3/")


def test_touched_source_redoes_only_the_targets_that_read_it(tmp_path: Path) -> None:
    case = CASE["random_8to4"]
    src = tmp_path / "src"
    shutil.copytree(case.src_dir, src)
    dst = tmp_path / "dst"
    first = run(options(case, dst, src_dir=src))
    before = outputs(dst)
    touched = next((src / "rank_2").glob("*.ckpt"))
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns + 10**9))
    again = run(options(case, dst, src_dir=src))
    readers = [f["file"] for f in manifest(dst)["files"] if 2 in f["source_ranks"]]
    assert readers and again.written == len(readers) and again.skipped == first.files - len(readers)
    assert again.redone == tuple((name, SOURCES_CHANGED) for name in readers)
    assert outputs(dst) == before


def test_source_rewritten_in_place_with_its_size_and_time_kept_is_noticed(tmp_path: Path) -> None:
    """Found: a source file overwritten in place with other bytes of the same size and its modification time
    set back (`cp -p`, `rsync --inplace -t` of another save) kept path, size, time, device and inode, so a
    rerun reused every output made from the old bytes, exit 0. Its change time (ctime) cannot be set back."""
    case = CASE["random_8to4"]
    src = tmp_path / "src"
    shutil.copytree(case.src_dir, src)
    dst = tmp_path / "dst"
    run(options(case, dst, src_dir=src))
    source = next((src / "rank_2").glob("*.ckpt"))
    before = source.stat()
    data = bytearray(source.read_bytes())
    data[-100] ^= 0xFF  # some other bytes, the same size
    with open(source, "r+b") as file:
        file.write(data)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (source.stat().st_size, source.stat().st_mtime_ns, source.stat().st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)
    again = run(options(case, dst, src_dir=src))
    readers = [f["file"] for f in manifest(dst)["files"] if 2 in f["source_ranks"]]
    assert readers and again.redone == tuple((name, SOURCES_CHANGED) for name in readers)


def test_same_job_from_another_working_folder_redoes_nothing(tmp_path: Path) -> None:
    case = CASE["random_full_to_4"]
    (tmp_path / "a" / "b").mkdir(parents=True)
    dst = tmp_path / "out"
    args = ["--dst-strategy", str(case.strategy("dst"))]
    first = cli(["--src-dir", os.path.relpath(case.src_dir, tmp_path / "a"), "--dst-dir", "../out", *args,
                 "--no-sync"], cwd=tmp_path / "a")
    assert first.returncode == 0, first.stderr
    records = {p: p.read_bytes() for p in dst.rglob("*.done.json")}
    second = cli(["--src-dir", os.path.relpath(case.src_dir, tmp_path / "a" / "b"), "--dst-dir", "../../out", *args,
                  "--no-sync"], cwd=tmp_path / "a" / "b")
    assert second.returncode == 0, second.stderr
    assert "(0 written, 4 already complete)" in second.stderr
    assert "redone" not in second.stderr
    assert all(f["skipped"] for f in manifest(dst)["files"])
    assert {p: p.read_bytes() for p in dst.rglob("*.done.json")} == records
    assert (manifest(dst)["options"]["dst_dir"], manifest(dst)["source_folder"]) == (str(dst), str(case.src_dir))


def test_second_run_into_a_locked_destination_fails_naming_the_holder(tmp_path: Path) -> None:
    case = CASE["random_full_to_4"]
    dst = tmp_path / "dst"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time; from mpickpt.destination import DestinationLock; "
        f"DestinationLock.acquire({str(dst)!r}); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        args = ["--src-dir", str(case.src_dir), "--dst-dir", str(dst), "--dst-strategy", str(case.strategy("dst"))]
        refused = cli(args, cwd=tmp_path)
        assert refused.returncode != 0
        assert refused.stderr.startswith(f"mpickpt: error: dst_dir {dst}: another mpickpt run is writing here")
        assert f"pid={holder.pid}" in refused.stderr
        assert sorted(p.name for p in dst.iterdir()) == [LOCK_NAME]
        with pytest.raises(DestinationError, match=f"pid={holder.pid}"):
            run(options(case, dst))
    finally:
        holder.kill()
        holder.wait()
    done = cli(args, cwd=tmp_path)  # the holder is gone: its lock file does not block
    assert done.returncode == 0, done.stderr


def test_killed_serial_run_leaves_no_partial_output_and_the_rerun_cleans_up(tmp_path: Path) -> None:
    case = CASE["random_8to4"]
    dst = tmp_path / "dst"
    args = ["--src-dir", str(case.src_dir), "--dst-dir", str(dst), "--src-strategy", str(case.strategy("src")),
            "--dst-strategy", str(case.strategy("dst")), "--no-sync", "--quiet"]
    env_fail = {"MPICKPT_TEST_FAIL": "process=0,after_bytes=1,action=kill"}
    killed = subprocess.run([sys.executable, "-m", "mpickpt", "transform", *args], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO), **env_fail}, capture_output=True, text=True,
                            timeout=TIMEOUT, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    temporaries = [p for p in dst.rglob(".*.tmp")]
    assert temporaries, "the killed writer should have left its temporary"
    fresh = tmp_path / "fresh"
    run(options(case, fresh))
    for name, data in outputs(dst).items():
        assert data == outputs(fresh)[name], f"{name} stands incomplete under its final name"
    assert not (dst / "manifest.json").exists()
    rerun = cli(args, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert outputs(dst) == outputs(fresh)
    assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]


def test_source_rank_folder_linked_into_the_destination_is_refused(tmp_path: Path) -> None:
    case = CASE["random_full_to_4"]
    dst = tmp_path / "dst"
    shutil.copytree(case.src_dir / "rank_0", dst / "rank_0")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "rank_0").symlink_to(dst / "rank_0")
    source = dst / "rank_0" / "checkpoint_0.ckpt"
    before = (source.read_bytes(), source.stat().st_mtime_ns, source.stat().st_ino)
    with pytest.raises(DestinationError, match="refusing to write into the folder of source file"):
        run(options(case, dst, src_dir=tmp_path / "src"))
    assert (source.read_bytes(), source.stat().st_mtime_ns, source.stat().st_ino) == before
    assert sorted(p.name for p in (dst / "rank_0").iterdir()) == ["checkpoint_0.ckpt"]


def test_records_computed_while_writing_match_the_files_and_catch_a_changed_byte(tmp_path: Path) -> None:
    """The writer's checksum (no read-back) is the file's CRC-32, and a rerun still reads the file to
    find one flipped byte."""
    from mpickpt.manifest import OUTPUT_CHANGED, checksum, read_record

    case = CASE["random_8to4"]
    dst = tmp_path / "out"
    run(options(case, dst))
    files = sorted(p for p in dst.rglob("*.ckpt") if p.parent != dst)
    assert files
    for path in files:
        record = read_record(str(path))
        assert record is not None and record.checksum == checksum(path)
    victim = files[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.chmod(0o600)
    victim.write_bytes(bytes(data))
    summary = run(options(case, dst))
    assert summary.redone == ((str(victim.relative_to(dst)), OUTPUT_CHANGED),)


def test_full_disk_fails_typed_leaves_no_partial_output_and_the_rerun_after_freeing_space_completes(
        tmp_path: Path) -> None:
    """ENOSPC mid-run (a 64 KiB tmpfs; the outputs need about 90 kB): a DestinationError naming the output, only
    whole outputs under final names, no temporary left, sources untouched; once the filesystem has room, a
    rerun keeps what was complete and finishes the rest, equal to a fresh run."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tmpfs mount needs root and mount(8)")
    case = CASE["random_8to4"]
    small = tmp_path / "small"
    small.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        sources = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in case.src_dir.rglob("*") if p.is_file()}
        dst = small / "dst"
        with pytest.raises(DestinationError, match=r"rank_\d/checkpoint_\d\.ckpt.*No space left on device"):
            run(options(case, dst))
        fresh = tmp_path / "fresh"
        run(options(case, fresh))
        partial = outputs(dst)
        assert partial and len(partial) < len(outputs(fresh))
        assert all(data == outputs(fresh)[name] for name, data in partial.items())
        assert not [p for p in dst.rglob("*") if p.name.endswith(".tmp")]
        assert not (dst / "manifest.json").exists()
        subprocess.run(["mount", "-o", "remount,size=1m", str(small)], check=True)
        summary = run(options(case, dst))
        assert outputs(dst) == outputs(fresh) and summary.written == len(outputs(fresh)) - summary.skipped
        assert summary.skipped >= 1
        assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in case.src_dir.rglob("*") if p.is_file()} == sources
    finally:
        subprocess.run(["umount", "-l", str(small)], capture_output=True, check=False)
