"""The command line, run as users run it (a subprocess without MPI)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mpickpt as api
from fixture_cases import Case, assert_same_content, checkpoint_content
from mpickpt.ckpt import save_checkpoint
from mpickpt.cli import BROKEN_PIPE, INTERRUPTED, build_parser
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, load_strategy, save_strategy

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_llama"


def clean_env() -> dict[str, str]:
    """This environment without launcher variables, with this repository first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def mpickpt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mpickpt", *args], capture_output=True, text=True,
                            env=clean_env(), check=False)
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


# --- as a new user tries it (no fixtures needed) ------------------------------------------------------------


def test_every_command_option_and_positional_has_help() -> None:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert all(choice.help for choice in commands._choices_actions)
    for name, command in commands.choices.items():
        for action in command._actions:
            assert action.help and action.help != argparse.SUPPRESS, f"mpickpt {name} {action.dest} has no help"


def test_output_format_offers_ckpt_and_safetensors() -> None:
    for command in ("transform", "plan", "verify"):
        assert "{ckpt,safetensors}" in mpickpt(command, "--help").stdout
    result = mpickpt("transform", "--src-dir", "s", "--dst-dir", "d", "--output-format", "npz", check=False)
    assert result.returncode == 2 and "invalid choice: 'npz'" in result.stderr


def test_plan_target_outside_the_target_ranks_names_the_range() -> None:
    result = mpickpt("plan", "--src-dir", str(EXAMPLE / "src"), "--src-strategy", str(EXAMPLE / "src_strategy.ckpt"),
                     "--dst-strategy", str(EXAMPLE / "dst_strategy_4.ckpt"), "--target", "1", "--target", "4",
                     check=False)
    assert result.returncode == 2 and result.stderr == "mpickpt: error: --target 4: the target ranks are 0..3\n"


def test_merge_strategies_says_what_it_wrote(tmp_path: Path) -> None:
    stages = tmp_path / "stages"
    stages.mkdir()
    for stage, names in enumerate([["embed", "layer0.w"], ["layer1.w", "head"]]):
        items = tuple(LayoutItem(name=n, dev_matrix=(2,), tensor_map=((0, -1),), param_split_shape=((),))
                      for n in names)
        save_strategy(Strategy(0, (StrategyItem(f"MatMul-op{stage}", stage, ((2, 1),)),), items),
                      stages / f"src_strategy_{2 * stage}.ckpt")
    merged = tmp_path / "merged.ckpt"
    assert mpickpt("merge-strategies", str(stages), str(merged)).stdout == (
        f"mpickpt: wrote {merged}: 2 pipeline stage(s), 4 parameters (4 layouts)\n")


def test_inspect_of_a_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    result = mpickpt("inspect", str(tmp_path / "nothing.ckpt"), check=False)
    assert result.returncode == 2 and result.stderr == f"mpickpt: error: {tmp_path / 'nothing.ckpt'} does not exist\n"


def test_verify_strategies_without_sources_is_an_error(tmp_path: Path) -> None:
    result = mpickpt("verify", "--dst-dir", str(tmp_path), "--dst-strategy", "x.ckpt", check=False)
    assert result.returncode == 2 and "--dst-strategy needs --src-dir" in result.stderr


def test_ctrl_c_ends_with_one_line_and_status_130() -> None:
    code = (
        "import sys, time\n"
        "import mpickpt.cli as cli, mpickpt.inspect as inspect\n"
        "def slow(*args, **kwargs):\n"
        "    print('started', flush=True)\n"
        "    time.sleep(60)\n"
        "inspect.describe_file = slow\n"
        f"sys.exit(cli.main(['inspect', {str(EXAMPLE / 'src_strategy.ckpt')!r}]))\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=clean_env()) as process:
        assert process.stdout is not None and process.stdout.readline() == "started\n"
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    assert (process.returncode, err) == (INTERRUPTED, "mpickpt: interrupted\n")


def test_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    path = tmp_path / "many.ckpt"
    save_checkpoint(path, [(f"layer{i}.weight", "Float32", (2,), np.zeros(2, np.float32)) for i in range(3000)])
    with subprocess.Popen([sys.executable, "-m", "mpickpt", "inspect", str(path)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=clean_env()) as process:
        assert process.stdout is not None and process.stdout.readline().startswith("name")
        process.stdout.close()  # as `| head -1` does
        err = process.stderr.read() if process.stderr else ""
        process.wait(timeout=30)
    assert err == "" and process.returncode in (0, BROKEN_PIPE)


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version(flag: str) -> None:
    assert "mpickpt" in mpickpt(flag).stdout


def test_inspect_lists_a_safetensors_file(tmp_path: Path) -> None:
    from mpickpt.formats import TensorSpec, open_writer

    path = tmp_path / "c.safetensors"
    with open_writer(path, "safetensors") as writer:
        writer.declare([TensorSpec("w", "BFloat16", (2, 2), 8)])
        writer.write_tensor("w", "BFloat16", (2, 2), np.zeros((2, 2), np.uint16))
    data = json.loads(mpickpt("inspect", "--json", str(path)).stdout)
    assert (data["format"], data["metadata"]) == ("safetensors", {"format": "ms"})
    assert [(p["name"], p["dtype"], p["shape"], p["bytes"]) for p in data["parameters"]] == [
        ("w", "BFloat16", [2, 2], 8)]
