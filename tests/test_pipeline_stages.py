"""Pipelined sources of three stages (a tied embedding in the first and last): stages missing or extra are
refused by name; what is converted matches the independent layout model."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest

import mpickpt
from layout_reference import reference_slice
from mpickpt.ckpt import save_checkpoint
from mpickpt.errors import PlanError
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, merge_strategies, save_strategy
from mpickpt.transform import TransformJob, TransformOptions

SHAPES = {"emb": (16, 8), "l0.w": (8, 8), "l1.w": (8, 8), "l2.w": (8, 8)}


def _item(name: str, dev: list[int], tensor_map: list[int]) -> LayoutItem:
    return LayoutItem(name, tuple(dev), (tuple(tensor_map),))


def _stage(stage: int, items: list[LayoutItem]) -> Strategy:
    """A per-stage strategy file as each rank of the stage saves it."""
    node = StrategyItem(f"Default/network/stage{stage}/MatMul-op{stage}", stage, ((1, 1),))
    return Strategy(current_stage=stage, strategy_items=(node,), layout_items=tuple(items))


STAGES = [
    _stage(0, [_item("emb", [2, 1], [1, 0]), _item("l0.w", [2, 1], [-1, 1])]),
    _stage(1, [_item("l1.w", [1, 2], [0, -1])]),
    _stage(2, [_item("l2.w", [2, 1], [1, -1]), _item("emb", [1, 2], [-1, 0])]),
]
TARGET = _stage(0, [_item(name, [2, 2], [1, 0]) for name in SHAPES])


@pytest.fixture()
def pipeline(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """Three stages of two ranks: src_strategys/src_strategy_<r>.ckpt, src/rank_<r>, dst_strategy.ckpt."""
    rng = np.random.default_rng(3)
    full = {name: rng.integers(-1000, 1000, size=shape).astype(np.float32) for name, shape in SHAPES.items()}
    merged = merge_strategies(STAGES)
    (tmp_path / "src_strategys").mkdir()
    for rank in range(6):
        stage = STAGES[rank // 2]
        save_strategy(stage, tmp_path / "src_strategys" / f"src_strategy_{rank}.ckpt")
        tensors = []
        for layout in stage.layout_items:
            bounds = reference_slice(merged, layout.name, SHAPES[layout.name], rank)
            assert bounds is not None
            piece = np.ascontiguousarray(full[layout.name][tuple(slice(a, b) for a, b in zip(*bounds))])
            tensors.append((layout.name, "Float32", piece.shape, piece))
        path = tmp_path / "src" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, [*tensors, ("global_step", "Int32", (1,), np.array([7], np.int32))])
    save_strategy(TARGET, tmp_path / "dst_strategy.ckpt")
    return tmp_path, full


def _transform(root: Path, strategy_dir: Path, out: Path) -> None:
    options = TransformOptions(src_dir=str(root / "src"), dst_dir=str(out), src_strategy_dir=str(strategy_dir),
                               dst_strategy=str(root / "dst_strategy.ckpt"))
    job = TransformJob.prepare(options)
    try:
        for task in job.tasks:
            job.run_task(task)
    finally:
        job.close()


def test_all_stages_convert_as_the_layout_model_cuts(pipeline: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, full = pipeline
    _transform(root, root / "src_strategys", root / "out")
    for rank in range(math.prod(TARGET.layout_items[0].dev_matrix)):
        got = mpickpt.load_segmented_checkpoints(str(root / "out" / f"rank_{rank}"))
        assert sorted(got) == sorted([*SHAPES, "global_step"])
        for name, tensor in full.items():
            bounds = reference_slice(TARGET, name, tensor.shape, rank)
            assert bounds is not None
            np.testing.assert_array_equal(got[name], tensor[tuple(slice(a, b) for a, b in zip(*bounds))])


def test_last_stage_missing_with_its_rank_folders_is_refused(pipeline: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Two of three stage files and the first two stages' rank folders: was exit 0, outputs without l2.w."""
    root, _ = pipeline
    for rank in (4, 5):
        (root / "src_strategys" / f"src_strategy_{rank}.ckpt").unlink()
        shutil.rmtree(root / "src" / f"rank_{rank}")
    with pytest.raises(PlanError, match=r"lays out 1 parameter\(s\) that neither the pipeline stages \[0, 1\] .* "
                                        r"\['l2.w'\]: is the strategy file of a pipeline stage"):
        _transform(root, root / "src_strategys", root / "out")
    assert not (root / "out" / "rank_0").exists()
