"""The command line, run as users run it (a subprocess without MPI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import mpickpt as api
from fixture_cases import Case, assert_same_content, checkpoint_content
from mpickpt.ckpt import save_checkpoint
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, load_strategy, save_strategy


def mpickpt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "HYDRA_"))}
    result = subprocess.run([sys.executable, "-m", "mpickpt", *args], capture_output=True, text=True, env=env)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_inspect_checkpoint_table_and_json(tmp_path: Path) -> None:
    path = tmp_path / "c.ckpt"
    bf16 = np.array([[0x3F80, 0xC000], [0x4040, 0]], np.uint16)  # 1, -2, 3, 0
    save_checkpoint(path, [("w", "BFloat16", (2, 2), bf16), ("lr", "Float32", (), np.array(0.5, np.float32)),
                           ("step", "Int32", (1,), np.array([3], np.int32))])
    table = mpickpt("inspect", str(path)).stdout
    assert "BFloat16" in table and "3 parameters, 16 bytes of tensors" in table
    data = json.loads(mpickpt("inspect", "--json", str(path)).stdout)
    assert data["kind"] == "checkpoint"
    assert [(p["name"], p["dtype"], p["shape"], p["bytes"]) for p in data["parameters"]] == [
        ("w", "BFloat16", [2, 2], 8), ("lr", "Float32", [], 4), ("step", "Int32", [1], 4)]
    assert (data["total_parameters"], data["total_bytes"]) == (3, 16)


def test_inspect_strategy(tmp_path: Path) -> None:
    path = tmp_path / "s.ckpt"
    layer1 = LayoutItem("layer1.weight", (2, 2, 1), ((1, 0),), ((),), ((),), opt_weight_shard_step=2,
                        opt_weight_shard_size=-1)
    save_strategy(Strategy(0, (StrategyItem("MatMul-op0", 0, ((2, 2), (2, 1))),), (layer1,)), path)
    data = json.loads(mpickpt("inspect", "--json", str(path)).stdout)
    assert data["kind"] == "strategy"
    [shown] = data["parameters"]
    assert shown["name"] == "layer1.weight" and shown["dev_matrix"] == [2, 2, 1] and shown["tensor_map"] == [1, 0]
    assert shown["shards_per_dim"] == [2, 1]  # axis 1 (size 2) splits dim 0, axis 0 (size 1) dim 1
    assert (shown["opt_weight_shard_size"], shown["opt_weight_shard_step"]) == (-1, 2)
    assert "layer1.weight" in mpickpt("inspect", str(path)).stdout


def test_inspect_garbage_fails_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\xff" * 100)
    result = mpickpt("inspect", str(bad), check=False)
    assert result.returncode != 0 and "bad.ckpt" in result.stderr


def test_transform_serial_matches_mindspore(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    case = mindspore_cases["seed_8to4"]
    out = tmp_path / "out"
    mpickpt(
        "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(out),
        "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst"), "--quiet",
    )
    for rank, theirs in case.expected_files().items():
        assert_same_content(out / f"rank_{rank}" / theirs.name, theirs)


def test_transform_with_pipeline_strategy_folder(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    case = mindspore_cases["pipeline_2x4_to_4"]
    out = tmp_path / "out"
    mpickpt(
        "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(out),
        "--src-strategy-dir", str(case.root / "src_pipeline_strategys"), "--dst-strategy", case.strategy("dst"),
        "--quiet",
    )
    merged, theirs = load_strategy(out / "merged_src_strategy.ckpt"), load_strategy(case.strategy("src"))
    assert sorted(map(repr, merged.layout_items)) == sorted(map(repr, theirs.layout_items))  # MindSpore's merge
    for rank, theirs in case.expected_files().items():
        assert_same_content(out / f"rank_{rank}" / theirs.name, theirs)


def test_plan_json_lists_sources_and_bytes(mindspore_cases: dict[str, Case]) -> None:
    case = mindspore_cases["seed_8to4"]
    src, dst = case.strategy("src"), case.strategy("dst")
    data = json.loads(
        mpickpt("plan", "--json", "--src-dir", str(case.src_dir), "--src-strategy", src, "--dst-strategy", dst).stdout
    )
    assert [t["target_rank"] for t in data["targets"]] == [0, 1, 2, 3]
    for target in data["targets"]:
        rank = target["target_rank"]
        assert target["source_ranks"] == api.rank_list_for_transform(rank, src, dst)
        assert set(target["source_ranks"]) <= set(case.meta["ms_rank_list_for_transform"][str(rank)])
        assert target["source_files"] == [str(case.src_dir / f"rank_{r}" / f"checkpoint_{r}.ckpt")
                                          for r in target["source_ranks"]]
        written = sum(len(data) for *_, data in checkpoint_content(case.expected_files()[rank]))
        assert target["bytes_written"] == written
        assert target["bytes_read"] == written  # every target byte is read once


def test_rank_list_and_merge(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    seed, pipeline = mindspore_cases["seed_8to4"], mindspore_cases["pipeline_2x4_to_4"]
    for rank in range(4):
        ranks = mpickpt("rank-list", str(rank), "--src-strategy", seed.strategy("src"),
                        "--dst-strategy", seed.strategy("dst"))
        ours = [int(r) for r in ranks.stdout.split()]
        assert ours == api.rank_list_for_transform(rank, seed.strategy("src"), seed.strategy("dst"))
        assert set(ours) <= set(seed.meta["ms_rank_list_for_transform"][str(rank)])
    merged = tmp_path / "merged.ckpt"
    mpickpt("merge-strategies", str(pipeline.root / "src_pipeline_strategys"), str(merged))
    theirs = load_strategy(pipeline.strategy("src"))  # MindSpore's merge
    ours = load_strategy(merged)
    assert ours.current_stage == theirs.current_stage == 1
    assert sorted(map(repr, ours.layout_items)) == sorted(map(repr, theirs.layout_items))
    assert sorted(map(repr, ours.strategy_items)) == sorted(map(repr, theirs.strategy_items))


def test_transform_refuses_destination_inside_source(written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    result = mpickpt(
        "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(case.src_dir / "out"),
        "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst"), check=False,
    )
    assert result.returncode != 0 and "inside source folder" in result.stderr
    assert not (case.src_dir / "out").exists()
