"""The command line, run as users run it (a subprocess without MPI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fixture_cases import CASES, FIXTURES, assert_same_content, requires_fixtures

pytestmark = requires_fixtures


def mpickpt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "HYDRA_"))}
    result = subprocess.run([sys.executable, "-m", "mpickpt", *args], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_inspect_checkpoint_table_and_json() -> None:
    path = FIXTURES / "format_samples" / "all_dtypes.ckpt"
    table = mpickpt("inspect", str(path)).stdout
    assert "BFloat16" in table and "parameters" in table
    data = json.loads(mpickpt("inspect", "--json", str(path)).stdout)
    assert data["kind"] == "checkpoint"
    assert data["total_bytes"] == sum(p["bytes"] for p in data["parameters"])


def test_inspect_strategy() -> None:
    path = FIXTURES / "seed_8to4" / "dst_strategy.ckpt"
    data = json.loads(mpickpt("inspect", "--json", str(path)).stdout)
    assert data["kind"] == "strategy"
    layer1 = next(p for p in data["parameters"] if p["name"] == "layer1.weight")
    assert layer1["shards_per_dim"] == [2, 2] or layer1["shards_per_dim"] == [2, 1]
    assert "layer1.weight" in mpickpt("inspect", str(path)).stdout


def test_inspect_garbage_fails_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\xff" * 100)
    result = mpickpt("inspect", str(bad), check=False)
    assert result.returncode != 0 and "bad.ckpt" in result.stderr


def test_transform_serial_matches_mindspore(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "seed_8to4")
    out = tmp_path / "out"
    mpickpt(
        "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(out),
        "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst"), "--quiet",
    )
    for rank, theirs in case.expected_files().items():
        assert_same_content(out / f"rank_{rank}" / theirs.name, theirs)


def test_transform_with_pipeline_strategy_folder(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "pipeline_2x4_to_4")
    out = tmp_path / "out"
    mpickpt(
        "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(out),
        "--src-strategy-dir", str(case.root / "src_pipeline_strategys"), "--dst-strategy", case.strategy("dst"),
        "--quiet",
    )
    assert (out / "merged_src_strategy.ckpt").is_file()
    for rank, theirs in case.expected_files().items():
        assert_same_content(out / f"rank_{rank}" / theirs.name, theirs)


def test_plan_json_lists_sources_and_bytes() -> None:
    case = next(c for c in CASES if c.name == "seed_8to4")
    data = json.loads(
        mpickpt(
            "plan", "--json", "--src-dir", str(case.src_dir),
            "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst"),
        ).stdout
    )
    assert [t["target_rank"] for t in data["targets"]] == [0, 1, 2, 3]
    for target in data["targets"]:
        ms_list = case.meta["ms_rank_list_for_transform"][str(target["target_rank"])]
        assert set(target["source_ranks"]) <= set(ms_list)
        assert target["bytes_written"] > 0 and target["bytes_read"] >= target["bytes_written"] // 2


def test_rank_list_and_merge(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "seed_8to4")
    ranks = mpickpt("rank-list", "0", "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst"))
    assert set(map(int, ranks.stdout.split())) <= set(case.meta["ms_rank_list_for_transform"]["0"])
    merged = tmp_path / "merged.ckpt"
    mpickpt("merge-strategies", str(FIXTURES / "pipeline_2x4_to_4" / "src_pipeline_strategys"), str(merged))
    assert merged.is_file()


def test_transform_refuses_destination_inside_source(tmp_path: Path) -> None:
    case = next(c for c in CASES if c.name == "seed_8to4")
    result = mpickpt(
        "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(case.src_dir / "out"),
        "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst"), check=False,
    )
    assert result.returncode != 0 and "inside source folder" in result.stderr
    assert not (case.src_dir / "out").exists()
