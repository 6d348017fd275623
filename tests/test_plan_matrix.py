"""`mpickpt plan --matrix`: bytes per (source, target) from the plans, the text table, the SVG heat map."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from fixture_cases import Case
from test_cli import EXAMPLE, clean_env, mpickpt
from test_exchange import SPLIT, split_sources

from mpickpt.errors import MpickptError
from mpickpt.matrix import (
    Grid,
    Route,
    crossing_totals,
    format_grid,
    grid_svg,
    make_grid,
    route_transfers,
    transfer_bytes,
    write_image,
)
from mpickpt.plan import Planner, TensorInfo
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem

SVG = "{http://www.w3.org/2000/svg}"


def split_rows(devices: int) -> Strategy:
    """Tensor parallel over `devices`: the rows of "w" split, one block per rank."""
    item = LayoutItem(name="w", dev_matrix=(devices,), tensor_map=((0,), (-1,)), param_split_shape=((),),
                      opt_weight_shard_size=0, opt_weight_shard_step=0)
    return Strategy(current_stage=0, strategy_items=(StrategyItem("MatMul-op0", 0, ((1, 1),)),),
                    layout_items=(item,))


def plans(src: int, dst: int | None, **catalog: TensorInfo) -> list:
    planner = Planner(split_rows(src), split_rows(dst) if dst else None, catalog)
    return [planner.plan(t) for t in planner.target_ranks]


def test_two_to_one_reads_half_from_each_source() -> None:
    # w float32 (4, 3): each source holds 2 rows = 24 bytes, the one target reads both
    assert transfer_bytes(plans(2, None, w=TensorInfo("Float32", (4, 3)))) == {(0, 0): 24, (1, 0): 24}


def test_four_to_two_tensor_parallel_with_a_step_copied_through() -> None:
    # w float32 (8, 3): each source 2 rows (24 bytes); target t holds rows 4t..4t+3, from sources 2t and 2t+1;
    # global_step int32 (1,) is outside the strategy: 4 bytes copied through whole, MindSpore's source t when
    # the target reads it anyway (target 0: source 0), else the lowest source it reads (target 1: source 2)
    got = plans(4, 2, w=TensorInfo("Float32", (8, 3)), global_step=TensorInfo("Int32", (1,)))
    assert transfer_bytes(got) == {(0, 0): 24 + 4, (1, 0): 24, (2, 1): 24 + 4, (3, 1): 24}
    for plan in got:
        assert sum(v for (_, t), v in transfer_bytes(got).items() if t == plan.target_rank) == plan.bytes_read()


def test_grid_lays_out_every_rank_and_groups_beyond_the_limit() -> None:
    transfers = {(s, t): 10 * s + t for s in range(4) for t in range(6) if (s + t) % 2}
    grid = make_grid(transfers, range(4), range(6))
    assert (grid.sources, grid.targets, grid.note) == (("0", "1", "2", "3"), tuple(map(str, range(6))), "")
    assert grid.cells[1] == (10, 0, 12, 0, 14, 0)
    grouped = make_grid(transfers, range(4), range(6), max_sources=2, max_targets=4)
    assert grouped.sources == ("0-1", "2-3") and grouped.targets == ("0-1", "2-3", "4-5")
    assert grouped.cells[0] == (1 + 10, 3 + 12, 5 + 14)
    assert sum(map(sum, grouped.cells)) == sum(transfers.values())
    assert grouped.note == "source ranks grouped 2 to a row; target ranks grouped 2 to a column (cells summed)"


def test_text_table() -> None:
    grid = Grid(("0", "1"), ("0", "1"), ((3 << 20, 0), (0, 1 << 19)))
    assert format_grid(grid).splitlines() == [
        "bytes read by each target rank (columns) from each source rank's file (rows), in MiB",
        "src\\tgt   0   1",
        "      0 3.0   .",
        "      1   . 0.5",
    ]
    assert format_grid(Grid(("0",), ("0",), ((7,),))).splitlines()[-1] == "      0 7"


# Three processes: 0 and 1 on host a, 2 on host b; process p writes target p. Source 3's file is seen by 0 and 2.
SEEN_BY = {0: (0,), 1: (1,), 2: (2,), 3: (0, 2)}
HOSTS = ["a", "a", "b"]
TRANSFERS = {(0, 0): 10, (1, 0): 20, (2, 1): 30, (3, 1): 5, (3, 2): 7, (0, 2): 4}


def test_routes_mark_what_crosses_processes_and_hosts() -> None:
    routes = route_transfers(TRANSFERS, [[0], [1], [2]], SEEN_BY, HOSTS)
    assert routes == {
        (0, 0): Route(0, 0, "none"),  # the writer sees the file
        (1, 0): Route(1, 0, "process"),  # only process 1 sees it, on the writer's host
        (2, 1): Route(2, 1, "host"),  # only process 2 sees it, on host b
        (3, 1): Route(0, 1, "process"),  # seen by 0 (host a) and 2 (host b): the writer's host first
        (3, 2): Route(2, 2, "none"),
        (0, 2): Route(0, 2, "host"),
    }
    assert crossing_totals(TRANSFERS, routes) == {"none": 10 + 7, "process": 20 + 5, "host": 30 + 4}


def test_routes_spread_over_replicas_as_the_exchange_does() -> None:
    # process 0 writes targets 0, 1, 2 (in that order) from source 0, which processes 1 and 2 see:
    # target 0: both unloaded, rotation (p - 0) % 3 prefers 1; target 1: 2 is less loaded; target 2: equal
    # loads, rotation (p - 2) % 3 prefers 2
    transfers = {(0, 0): 10, (0, 1): 10, (0, 2): 10}
    routes = route_transfers(transfers, [[0, 1, 2], [], []], {0: (1, 2)}, ["a"] * 3)
    assert [routes[0, t].reader for t in range(3)] == [1, 2, 2]
    assert {r.crosses for r in routes.values()} == {"process"}


def test_the_table_marks_crossing_cells_and_totals_them() -> None:
    routes = route_transfers(TRANSFERS, [[0], [1], [2]], SEEN_BY, HOSTS)
    grid = make_grid(TRANSFERS, range(4), range(3), routes=routes)
    assert format_grid(grid).splitlines() == [
        "bytes read by each target rank (columns) from each source rank's file (rows), in B",
        "src\\tgt  0   1   2",
        "      0 10   .   4*",
        "      1 20+  .   .",
        "      2  .  30*  .",
        "      3  .   5+  7",
        "* crosses hosts, + crosses processes on one host; bytes local 17, across processes 25, across hosts 34",
    ]
    grouped = make_grid(TRANSFERS, range(4), range(3), max_sources=2, routes=routes)
    assert grouped.crosses == (("process", "none", "host"), ("none", "host", "none"))
    assert grouped.legend.startswith("* crosses hosts, + crosses processes on one host (a grouped cell: its farthest)")
    only = make_grid({k: v for k, v in TRANSFERS.items() if k[1] == 0}, range(4), [0], routes=routes)
    assert only.legend.endswith("bytes local 10, across processes 20, across hosts 0")
    local = make_grid({(0, 0): 5}, [0], [0], routes={(0, 0): Route(0, 0, "none")})
    assert format_grid(local).splitlines()[-2:] == [
        "      0 5", "nothing crosses processes or hosts: each target's process reads all 5 bytes from files it sees"]


def test_svg_hatches_cells_that_cross_hosts_and_outlines_those_crossing_processes() -> None:
    grid = make_grid(TRANSFERS, range(4), range(3), routes=route_transfers(TRANSFERS, [[0], [1], [2]], SEEN_BY, HOSTS))
    root = ET.fromstring(grid_svg(grid))
    cells = {(e.get("x"), e.get("y")): e.get("data-crosses") for e in root.iter(f"{SVG}rect") if e.get("class") == "cell"}
    marks = [e for e in root.iter(f"{SVG}rect") if e.get("class") == "crossing"]
    assert sorted(cells.values()) == ["host", "host", "none", "none", "process", "process"]
    assert sorted(e.get("fill") for e in marks) == ["none", "none", "url(#crosses-host)", "url(#crosses-host)"]
    assert root.find(f"{SVG}defs/{SVG}pattern").get("id") == "crosses-host"
    assert grid.legend in [e.text for e in root.iter(f"{SVG}text")]


def test_svg_is_xml_with_one_cell_per_nonzero_entry() -> None:
    transfers = transfer_bytes(plans(4, 2, w=TensorInfo("Float32", (8, 3)), global_step=TensorInfo("Int32", (1,))))
    grid = make_grid(transfers, range(4), range(2))
    root = ET.fromstring(grid_svg(grid, "4 -> 2 <tp>"))
    cells = [e for e in root.iter(f"{SVG}rect") if e.get("class") == "cell"]
    assert sorted(int(e.get("data-bytes")) for e in cells) == sorted(transfers.values())
    titles = {e.find(f"{SVG}title").text: int(e.get("data-bytes")) for e in cells}
    assert titles["source 0 -> target 0: 28 bytes"] == 28
    texts = [e.text for e in root.iter(f"{SVG}text")]
    assert {"target rank", "source rank", "4 -> 2 <tp>"} <= set(texts)


def test_image_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    grid = Grid(("0",), ("0",), ((1,),))
    write_image(grid, str(tmp_path / "m.svg"))
    ET.parse(tmp_path / "m.svg")
    with pytest.raises(MpickptError, match=r"write \.svg"):
        write_image(grid, str(tmp_path / "m.pdf"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    with pytest.raises(MpickptError, match="PNG needs matplotlib.*write .svg instead"):
        write_image(grid, str(tmp_path / "m.png"))


def test_cli_prints_the_matrix_and_draws_it(tmp_path: Path) -> None:
    flags = ["--src-dir", str(EXAMPLE / "src"), "--src-strategy", str(EXAMPLE / "src_strategy.ckpt"),
             "--dst-strategy", str(EXAMPLE / "dst_strategy_4.ckpt")]
    totals = {t["target_rank"]: t["bytes_read"] for t in json.loads(
        mpickpt("plan", "--json", *flags).stdout)["targets"]}
    out = tmp_path / "m.svg"
    lines = mpickpt("plan", "--matrix", "--out", str(out), *flags).stdout.splitlines()
    assert lines[1].split() == ["src\\tgt", "0", "1", "2", "3"] and len(lines) == 2 + 8 + 1
    assert lines[-1] == (f"nothing crosses processes or hosts: each target's process reads all "
                         f"{sum(totals.values()):,} bytes from files it sees")
    cells = [e for e in ET.parse(out).getroot().iter(f"{SVG}rect") if e.get("class") == "cell"]
    assert sum(int(e.get("data-bytes")) for e in cells) == sum(totals.values())
    entries = json.loads(mpickpt("plan", "--matrix", "--json", "--target", "1", *flags).stdout)["matrix"]
    assert {e["target_rank"] for e in entries} == {1}
    assert sum(e["bytes"] for e in entries) == totals[1]
    for wrong, message in ((["--out", str(out)], "add --matrix"), (["--matrix", "--copies"], "drop --copies")):
        refused = mpickpt("plan", *wrong, *flags, check=False)
        assert refused.returncode == 2 and message in refused.stderr


MPIEXEC = Path(sys.executable).parent / "mpiexec"  # MPICH's (pip install mpich)


def on_two_hosts(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`mpickpt args` under MPICH's mpiexec as process 0 on host a and process 1 on host b."""
    command = [sys.executable, "-m", "mpickpt", *args]
    return subprocess.run([str(MPIEXEC), "-n", "1", "-env", "MPICKPT_HOST", "a", *command, ":",
                           "-n", "1", "-env", "MPICKPT_HOST", "b", *command], capture_output=True, text=True,
                          env=clean_env(), timeout=120, check=False)


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"MPICH's mpiexec is not at {MPIEXEC}")
def test_mpiexec_plan_marks_the_bytes_crossing_hosts(tmp_path: Path, written_cases: dict[str, Case]) -> None:
    """Rank r's folder is on process (r + 1) % 2 only, so its bytes cross hosts exactly for the targets the
    other process writes; the bytes per cell are the serial plan's."""
    case = written_cases["random_8to4"]
    split_sources(case, tmp_path / "src", 2)
    flags = ["--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst")]
    serial = json.loads(mpickpt("plan", "--matrix", "--json", "--src-dir", str(case.src_dir), *flags).stdout)
    planned = {(e["source_rank"], e["target_rank"]): e["bytes"] for e in serial["matrix"]}
    assert {e["crosses"] for e in serial["matrix"]} == {"none"}
    holder = {rank: (rank + 1) % 2 for rank in range(8)}
    before = sorted(tmp_path.rglob("*"))

    args = ["plan", "--matrix", "--src-dir", str(tmp_path / "src" / SPLIT), *flags]
    done = on_two_hosts([*args, "--json"])
    assert done.returncode == 0, done.stderr
    entries = {(e["source_rank"], e["target_rank"]): e for e in json.loads(done.stdout)["matrix"]}
    assert {key: e["bytes"] for key, e in entries.items()} == planned
    writers = {t: e["writer_process"] for (_, t), e in entries.items()}
    assert set(writers.values()) == {0, 1}
    for (s, t), e in entries.items():
        assert e["writer_process"] == writers[t] and e["reader_process"] == holder[s]
        assert e["crosses"] == ("none" if holder[s] == writers[t] else "host")
    across = sum(size for (s, t), size in planned.items() if holder[s] != writers[t])
    local = sum(planned.values()) - across
    assert across > 0 and json.loads(done.stdout)["bytes_by_crossing"] == {"none": local, "process": 0, "host": across}

    text = on_two_hosts([*args, "--out", str(tmp_path / "m.svg")])
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[-1] == (f"* crosses hosts, + crosses processes on one host; bytes local {local:,}, "
                         f"across processes 0, across hosts {across:,}")
    assert sum(row.count("*") for row in lines[2:10]) == sum(holder[s] != writers[t] for s, t in planned)
    cells = [e for e in ET.parse(tmp_path / "m.svg").getroot().iter(f"{SVG}rect") if e.get("class") == "cell"]
    assert sum(int(e.get("data-bytes")) for e in cells if e.get("data-crosses") == "host") == across
    assert sorted(tmp_path.rglob("*")) == sorted([*before, tmp_path / "m.svg"])  # the plan wrote only the image


def test_serial_plan_with_other_processes_folders_is_an_error(tmp_path: Path, written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    split_sources(case, tmp_path / "src", 2)
    refused = mpickpt("plan", "--matrix", "--src-dir", str(tmp_path / "src" / SPLIT), "--src-strategy",
                      case.strategy("src"), "--dst-strategy", case.strategy("dst"), check=False)
    assert refused.returncode == 2 and not refused.stdout
    assert f"{tmp_path / 'src' / SPLIT} (seen as process 0 (host " in refused.stderr, refused.stderr
    assert "ranks [0, 2, 4, 6] are missing" in refused.stderr and "run under mpiexec" in refused.stderr
