"""Destinations that differ per host or process (`--dst-dir 'out/{host}'`, `'out/p{process}'`): what each folder
holds that the run did not write into it is reported per folder, naming host and folder, every folder gets a
manifest, and reruns (the same command, another process count or another target strategy) stay right.

In-process worlds are threads (ThreadComm); the others run `mpiexec -n K` (MPICH and Open MPI), with hosts
simulated by mount namespaces where a plain path must be a different folder per host (`per_host_mounts`).
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from fixture_cases import Case
from test_driver import run_threads
from test_exchange import SPLIT, expected_bytes, options_for, per_host_mounts
from test_mpi import (  # noqa: F401
    FLAVORS,
    Serial,
    launcher,
    mpickpt,
    no_stale_segments,
    run,
    serial,
    transform_args,
)

from mpickpt.destination import DestinationLock
from mpickpt.driver import deal, earlier_folders, run_transform
from mpickpt.placement import Destinations, expansions_pattern
from mpickpt.transform import OutputTask

HOST = "h"  # MPICKPT_HOST of the runs on one machine


# --- pure parts and the survey of one folder -----------------------------------------------------------

def test_a_template_expands_to_the_folders_a_glob_finds() -> None:
    pattern, regex = expansions_pattern("/o[1]/{host}/p{process}")
    assert pattern == "/o[[]1]/*/p*"
    assert regex.fullmatch("/o[1]/node7/p12") and not regex.fullmatch("/o[1]/node7/px")
    assert not regex.fullmatch("/o[1]/a/b/p1")


def test_destinations_name_the_locker_and_the_writers_of_each_folder() -> None:
    where = Destinations("/o/{host}", ("/o/a", "/o/a", "/o/b", "/o/b"), ("a", "a", "b", "b"), ("t0", None, "t2", None))
    assert [where.locker(p) for p in range(4)] == [0, 0, 2, 2]
    assert where.writers(3) == (2, 3) and where.lockers == (0, 2) and where.per_process
    assert not Destinations.shared("/o", 3).per_process and Destinations.shared("/o", 3).lockers == (0,)


def test_every_process_deals_alike_whatever_its_expansion_of_the_paths() -> None:
    """Each process deals its own tasks (paths under its own folder): the targets per process must agree."""
    tasks = [OutputTask(t, f"/o/p0/rank_{t}/c.ckpt", (t,), (), 100 * (t % 3), 50) for t in range(7)]
    dealt = [[t.target_rank for t in share] for share in deal(tasks, 3)]
    for folder in ("p1", "p2"):
        moved = [replace(t, path=t.path.replace("/p0/", f"/{folder}/")) for t in reversed(tasks)]
        assert [[t.target_rank for t in share] for share in deal(moved, 3)] == dealt
    seen_by, hosts = {r: (r % 3,) for r in range(7)}, ["a", "a", "b"]
    reading = [replace(t, read_from=((t.target_rank, 100),)) for t in tasks]
    assert deal(reading, 3, seen_by, hosts) == deal(list(reversed(reading)), 3, seen_by, hosts)


def test_earlier_runs_folders_are_those_locked_with_another_token(tmp_path: Path) -> None:
    """p0 is this run's (its token), p5 an earlier run's (a lock file, rank folders), p6 never a destination
    (no lock file), p7 an earlier run's with no rank folder, px not of the template's form."""
    ours = DestinationLock.acquire(str(tmp_path / "p0"))
    for name in ("p5", "p7", "px"):
        DestinationLock.acquire(str(tmp_path / name)).release()
    for name in ("p0", "p5", "p6", "px"):
        (tmp_path / name / "rank_1").mkdir(parents=True)
    (tmp_path / "p5" / "rank_3").mkdir()
    try:
        where = Destinations(str(tmp_path / SPLIT), (str(tmp_path / "p0"),), (HOST,), (ours.token,))
        found = earlier_folders(where, 0)
    finally:
        ours.release()
    assert [(folder.folder, folder.entries, folder.processes) for _, folder in found] == \
        [(str(tmp_path / "p5"), ("rank_1/", "rank_3/"), ())]


# --- threads ---------------------------------------------------------------------------------------------

def written_into(manifest: dict) -> dict[int, list[int]]:
    """Process -> the targets it wrote, from a manifest's "processes"."""
    return {p["process"]: p["targets"] for p in manifest["processes"]}


def rank_folders(folder: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in folder.glob("rank_*"))


def stale_line(host: str, folder: Path, entries: list[str], written: bool = True) -> str:
    what = ("the destination" if written else
            "a destination no process of this run writes into (an earlier run's, matching --dst-dir)")
    return (f"mpickpt: host {host} ({folder}): {len(entries)} entries of {what} are not from this job and were "
            f"left as they are: {', '.join(entries)}")


def expected_stale(dst: Path, before: dict[int, list[int]], dealt: dict[int, list[int]]) -> dict[int, list[str]]:
    """Folder dst/p<p> -> its rank folders left by the first run that the second did not write into it."""
    return {p: [f"rank_{t}/" for t in targets if t not in dealt.get(p, [])] for p, targets in before.items()}


def test_threads_rerun_with_fewer_processes_reports_what_other_folders_keep(
        tmp_path: Path, written_cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch) -> None:
    """3 processes into dst/p{process}, then 2: targets dealt elsewhere now stay in their old folder (rank_3
    in p0 with this dealing) and p2 is written by nobody; both are reported per folder, in the summary and
    in the manifest of each folder written, and every output of the second run is right."""
    monkeypatch.setenv("MPICKPT_HOST", HOST)
    case = written_cases["random_8to4"]
    dst = tmp_path / "dst"
    options = options_for(case, str(case.src_dir), str(dst / SPLIT))
    run_threads(3, lambda comm: run_transform(options, comm, quiet=True))
    before = {p: rank_folders(dst / f"p{p}") for p in range(3)}
    stream = io.StringIO()
    summary = run_threads(2, lambda comm: run_transform(options, comm, stream=stream))[0]
    manifest = json.loads((dst / "p0" / "manifest.json").read_text())
    dealt = written_into(manifest)
    stale = expected_stale(dst, before, dealt)
    assert stale[0] == ["rank_3/"] and stale[2] == ["rank_2/"]  # what makes this test bite
    named = [f"host {HOST} ({dst / f'p{p}'}): {entry}" for p in range(3) for entry in stale[p]]
    assert summary.stale == tuple(named)
    lines = stream.getvalue().splitlines()
    assert lines[:-1] == [*(stale_line(HOST, dst / f"p{p}", stale[p]) for p in (0, 1) if stale[p]),
                          stale_line(HOST, dst / "p2", stale[2], written=False)]
    expected = expected_bytes(case)
    for p, targets in dealt.items():
        for t in targets:
            assert (dst / f"p{p}" / f"rank_{t}" / f"checkpoint_{t}.ckpt").read_bytes() == expected[t]
    for p in (0, 1):
        mine = json.loads((dst / f"p{p}" / "manifest.json").read_text())
        assert (mine["folder"], mine["host"], mine["stale"]) == (str(dst / f"p{p}"), HOST, named)
        assert [f["file"] for f in mine["files"]] == [f"rank_{t}/checkpoint_{t}.ckpt" for t in dealt[p]]
        assert mine["destinations"] == [
            *({"folder": str(dst / f"p{q}"), "host": HOST, "processes": [q], "stale": stale[q],
               "outputs": [{"target_rank": t, "file": f"rank_{t}/checkpoint_{t}.ckpt"} for t in dealt[q]]}
              for q in (0, 1)),
            {"folder": str(dst / "p2"), "host": HOST, "processes": [], "outputs": [], "stale": stale[2]}]
        assert [(e["host"], e["dst_dir"]) for e in mine["processes"]] == [(HOST, str(dst / f"p{q}")) for q in (0, 1)]
    assert json.loads((dst / "p2" / "manifest.json").read_text())["world_size"] == 3  # the earlier run's, kept

    again = run_threads(2, lambda comm: run_transform(options, comm, quiet=True))[0]  # the same command
    assert (again.written, again.skipped, again.stale) == (0, 4, summary.stale)  # dealt the same way


def test_threads_into_one_folder_per_process_report_nothing_when_nothing_is_left(
        tmp_path: Path, written_cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPICKPT_HOST", HOST)
    case = written_cases["random_2to8"]
    dst = tmp_path / "dst"
    options = options_for(case, str(case.src_dir), str(dst / SPLIT))
    stream = io.StringIO()
    summary = run_threads(3, lambda comm: run_transform(options, comm, stream=stream))[0]
    assert summary.stale == () and len(stream.getvalue().splitlines()) == 1
    files = [f for p in range(3) for f in json.loads((dst / f"p{p}" / "manifest.json").read_text())["files"]]
    assert sorted(f["target_rank"] for f in files) == list(range(8))


# --- real MPI ----------------------------------------------------------------------------------------------

def folder_outputs(folder: Path, targets: list[int]) -> dict[str, bytes]:
    """The outputs of `targets` in one destination folder, named as the serial run's."""
    return {f"rank_{t}/checkpoint_{t}.ckpt": (folder / f"rank_{t}" / f"checkpoint_{t}.ckpt").read_bytes()
            for t in targets}


@pytest.mark.parametrize("flavor", FLAVORS)
def test_mpiexec_rerun_with_fewer_processes_reports_outputs_left_per_folder(
        flavor: str, tmp_path: Path, written_cases: dict[str, Case], serial: Serial) -> None:  # noqa: F811
    case = written_cases["random_8to4"]
    dst = tmp_path / "out"
    args = transform_args(case, Path(str(dst / SPLIT)))
    first = mpickpt(args, launcher(flavor) + ["-n", "3"], MPICKPT_HOST=HOST)
    assert first.returncode == 0, first.output
    before = {p: rank_folders(dst / f"p{p}") for p in range(3)}
    second = mpickpt(args, launcher(flavor) + ["-n", "2"], MPICKPT_HOST=HOST)
    assert second.returncode == 0, second.output
    dealt = written_into(json.loads((dst / "p0" / "manifest.json").read_text()))
    stale = expected_stale(dst, before, dealt)
    assert stale[2] and any(stale[p] for p in (0, 1)), (before, dealt)
    for p in (0, 1):
        if stale[p]:
            assert stale_line(HOST, dst / f"p{p}", stale[p]) in second.output.splitlines(), second.output
    assert stale_line(HOST, dst / "p2", stale[2], written=False) in second.output.splitlines(), second.output
    made = {name: data for p, targets in dealt.items() for name, data in folder_outputs(dst / f"p{p}", targets).items()}
    assert made == serial(case)
    named = [f"host {HOST} ({dst / f'p{p}'}): {entry}" for p in range(3) for entry in stale[p]]
    assert all(json.loads((dst / f"p{p}" / "manifest.json").read_text())["stale"] == named for p in (0, 1))

    again = mpickpt(args, launcher(flavor) + ["-n", "2"], MPICKPT_HOST=HOST)
    assert again.returncode == 0, again.output
    assert "(0 written, 4 already complete)" in again.output  # the same command deals the same way


@pytest.mark.parametrize("flavor", FLAVORS)
def test_mpiexec_killed_run_into_per_process_folders_is_finished_by_the_same_command(
        flavor: str, tmp_path: Path, written_cases: dict[str, Case], serial: Serial) -> None:  # noqa: F811
    case = written_cases["random_8to4"]
    dst = tmp_path / "out"
    args = transform_args(case, Path(str(dst / SPLIT)))
    prefix = launcher(flavor) + ["-n", "3"]
    killed = mpickpt(args, prefix, MPICKPT_HOST=HOST, MPICKPT_TEST_FAIL="process=1,after_bytes=1,action=kill")
    assert killed.returncode != 0, killed.output
    assert not any((dst / f"p{p}" / "manifest.json").exists() for p in range(3))
    rerun = mpickpt(args, prefix, MPICKPT_HOST=HOST)
    assert rerun.returncode == 0, rerun.output
    assert "not from this job" not in rerun.output, rerun.output
    dealt = written_into(json.loads((dst / "p0" / "manifest.json").read_text()))
    assert all(rank_folders(dst / f"p{p}") == dealt[p] for p in range(3))
    made = {name: data for p, targets in dealt.items() for name, data in folder_outputs(dst / f"p{p}", targets).items()}
    assert made == serial(case)
    assert all(json.loads((dst / f"p{p}" / "manifest.json").read_text())["folder"] == str(dst / f"p{p}")
               for p in range(3))


@pytest.mark.parametrize("flavor", FLAVORS)
def test_node_local_destinations_report_what_each_host_keeps_from_another_strategy(
        flavor: str, tmp_path: Path, written_cases: dict[str, Case], serial: Serial) -> None:  # noqa: F811
    """`--dst-dir 'out/{host}'` on hosts a and b (processes 0-1 and 2-3), node-local: 8 -> 8 targets first,
    then 8 -> 4. Each host's folder keeps the old outputs of targets the second run wrote on the other host
    or not at all: reported per host, and each host's folder gets a manifest listing its own outputs."""
    case = written_cases["random_8to4"]
    plain = tmp_path / "out"
    folders = {host: tmp_path / f"disk_{host}" for host in "ab"}
    for folder in [plain, *folders.values()]:
        folder.mkdir()
    args = transform_args(case, plain / "{host}")
    eight = [*args[:args.index("--dst-strategy")], "--dst-strategy", str(case.strategy("src"))]
    first = run(per_host_mounts(flavor, [sys.executable, "-m", "mpickpt", "transform", *eight], plain, folders))
    assert first.returncode == 0, first.output
    before = {host: rank_folders(folders[host] / host) for host in "ab"}
    assert sorted(before["a"] + before["b"]) == list(range(8))
    second = run(per_host_mounts(flavor, [sys.executable, "-m", "mpickpt", "transform", *args], plain, folders))
    assert second.returncode == 0, second.output
    manifests = {host: json.loads((folders[host] / host / "manifest.json").read_text()) for host in "ab"}
    dealt = written_into(manifests["a"])
    on = {"a": dealt[0] + dealt[1], "b": dealt[2] + dealt[3]}
    stale = {host: [f"rank_{t}/" for t in before[host] if t not in on[host]] for host in "ab"}
    assert stale["a"] and stale["b"], (before, on)
    lines = second.output.splitlines()
    for host in "ab":
        assert stale_line(host, plain / host, stale[host]) in lines, second.output
    named = [f"host {host} ({plain / host}): {entry}" for host in "ab" for entry in stale[host]]
    made = {}
    for host in "ab":
        mine = manifests[host]
        assert (mine["folder"], mine["host"], mine["stale"]) == (str(plain / host), host, named)
        assert sorted(f["target_rank"] for f in mine["files"]) == sorted(on[host])
        assert [(d["host"], d["folder"], d["processes"], d["stale"]) for d in mine["destinations"]] == \
            [("a", str(plain / "a"), [0, 1], stale["a"]), ("b", str(plain / "b"), [2, 3], stale["b"])]
        made.update(folder_outputs(folders[host] / host, on[host]))
    assert made == serial(case)
