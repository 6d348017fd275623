"""Edge dtypes and shapes end to end: empty tensors (a dim of 0) sliced by a strategy, through transform in
both formats, unify (safetensors and HDF5) and deploying what unify wrote."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fixture_cases import tensor_content
from mpickpt.ckpt import save_checkpoint
from mpickpt.cli import main
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, save_strategy

EMPTY = (4, 0, 2)  # split on its last dim: each rank's slice is not one run of the full tensor


def _empty_case(root: Path) -> tuple[Path, Path]:
    """Two source ranks of one Float32 tensor of EMPTY dims split on its last dim; (src dir, strategy)."""
    strategy = root / "src_strategy.ckpt"
    save_strategy(Strategy(1, (StrategyItem("op", 0, ((1, 1, 2),)),), (LayoutItem("w", (2,), ((-1, -1, 0),)),)),
                  strategy)
    for rank in range(2):
        folder = root / "src" / f"rank_{rank}"
        folder.mkdir(parents=True)
        save_checkpoint(folder / f"ckpt_{rank}.ckpt", [("w", "Float32", (4, 0, 1), np.zeros((4, 0, 1), np.float32)),
                                                      ("step", "Int32", (1,), np.array([3], np.int32))])
    return root / "src", strategy


def _only_file(folder: Path) -> Path:
    (found,) = [p for p in folder.iterdir() if p.suffix in (".ckpt", ".safetensors")]
    return found


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_empty_tensor_split_off_row_boundaries_merges(tmp_path: Path, fmt: str) -> None:
    src, strategy = _empty_case(tmp_path)
    assert main(["transform", "--quiet", "--no-sync", "--src-dir", str(src), "--src-strategy", str(strategy),
                 "--dst-dir", str(tmp_path / "dst"), "--output-format", fmt]) == 0
    content = tensor_content(_only_file(tmp_path / "dst" / "rank_0"))
    assert content["w"] == ("Float32", EMPTY, b"")
    assert content["step"] == ("Int32", (1,), np.array([3], np.int32).tobytes())


@pytest.mark.parametrize("fmt", ["safetensors", "h5"])
def test_unify_and_deploy_empty_tensors(tmp_path: Path, fmt: str) -> None:
    """unify of a strategy holding only empty tensors writes one part (MindSpore 2.10 fails: min() of no
    parts); deploying it, or an HDF5 file of them (which stores no bytes for them), gives the empty slices."""
    src, strategy = _empty_case(tmp_path)
    unified = tmp_path / "unified"
    dst = unified / "model.h5" if fmt == "h5" else unified
    assert main(["unify", "--src-dir", str(src), "--src-strategy", str(strategy), "--dst", str(dst),
                 "--format", fmt]) == 0
    assert main(["transform", "--quiet", "--no-sync", "--src-dir", str(unified), "--dst-strategy", str(strategy),
                 "--dst-dir", str(tmp_path / "deployed")]) == 0
    for rank in range(2):
        assert tensor_content(_only_file(tmp_path / "deployed" / f"rank_{rank}"))["w"] == ("Float32", (4, 0, 1), b"")
