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
from mpickpt.errors import SourceMissingError
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


def test_last_stage_missing_with_its_rank_folders_is_said(pipeline: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Two of three stage files and the first two stages' rank folders: the outputs lack l2.w, which a target
    network with new parameters (LoRA) would expect too, so the job's notes (summary, manifest.json) say it
    (was silent)."""
    root, _ = pipeline
    for rank in (4, 5):
        (root / "src_strategys" / f"src_strategy_{rank}.ckpt").unlink()
        shutil.rmtree(root / "src" / f"rank_{rank}")
    options = TransformOptions(src_dir=str(root / "src"), dst_dir=str(root / "out"),
                               src_strategy_dir=str(root / "src_strategys"),
                               dst_strategy=str(root / "dst_strategy.ckpt"))
    job = TransformJob.prepare(options)
    job.close()
    lacking = [n for n in job.notes if "parameter(s) that no source holds" in n]
    assert len(lacking) == 1 and "1 parameter(s)" in lacking[0] and "['l2.w']" in lacking[0], job.notes
    assert "pipeline stages [0, 1] are not all of them, a stage's strategy file" in lacking[0]


PIPELINED_TARGET = merge_strategies([
    _stage(0, [_item("emb", [2], [0, -1]), _item("l0.w", [2], [0, -1])]),
    _stage(1, [_item("l1.w", [2], [-1, 0])]),
    _stage(2, [_item("l2.w", [2], [0, -1]), _item("emb", [2], [-1, 0])]),
])


def _by_rank(root: Path, target: int, ranks: list[int]) -> Path:
    files = {r: str(root / "src" / f"rank_{r}" / f"checkpoint_{r}.ckpt") for r in ranks}
    out = root / "by_rank" / f"checkpoint_{target}.ckpt"
    out.parent.mkdir(exist_ok=True)
    mpickpt.transform_checkpoint_by_rank(target, files, str(out), str(root / "merged.ckpt"), str(root / "d3.ckpt"))
    return out


def test_by_rank_to_a_pipelined_target_reads_the_listed_stages_only(
        pipeline: tuple[Path, dict[str, np.ndarray]]) -> None:
    """rank_list_for_transform names files of the stages a target needs: was a PlanError ("parameter 'l1.w' is in
    the source strategy but in no source file; source ranks [] should hold it"), MindSpore converts."""
    root, full = pipeline
    save_strategy(merge_strategies(STAGES), root / "merged.ckpt")
    save_strategy(PIPELINED_TARGET, root / "d3.ckpt")
    for target in range(6):
        ranks = mpickpt.rank_list_for_transform(target, str(root / "merged.ckpt"), str(root / "d3.ckpt"))
        got = mpickpt.load_segmented_checkpoints(str(_by_rank(root, target, ranks).parent))
        kept = {name: reference_slice(PIPELINED_TARGET, name, shape, target) for name, shape in SHAPES.items()}
        assert sorted(got) == sorted([*(n for n, bounds in kept.items() if bounds), "global_step"])
        for name, bounds in kept.items():
            if bounds is not None:
                np.testing.assert_array_equal(got[name], full[name][tuple(slice(a, b) for a, b in zip(*bounds))])
        (root / "by_rank" / f"checkpoint_{target}.ckpt").unlink()


def test_by_rank_without_a_needed_stage_is_refused(pipeline: tuple[Path, dict[str, np.ndarray]]) -> None:
    """Target 4 (stage 2: l2.w, emb) given stage 0's files only: l2.w, of source stage 2, is named."""
    root, _ = pipeline
    save_strategy(merge_strategies(STAGES), root / "merged.ckpt")
    save_strategy(PIPELINED_TARGET, root / "d3.ckpt")
    with pytest.raises(SourceMissingError, match=r"parameter 'l2.w', which target rank 4 needs, is in no source "
                                                 r"file given \(source pipeline stage 2: ranks 4..5 hold it\)"):
        _by_rank(root, 4, [0, 1])
    assert not (root / "by_rank" / "checkpoint_4.ckpt").exists()


def test_by_rank_to_one_full_checkpoint_needs_every_stage(pipeline: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = pipeline
    save_strategy(merge_strategies(STAGES), root / "merged.ckpt")
    files = {r: str(root / "src" / f"rank_{r}" / f"checkpoint_{r}.ckpt") for r in range(4)}
    with pytest.raises(SourceMissingError, match=r"parameter 'l2.w', which target rank 0 needs, is in no source "
                                                 r"file given \(source pipeline stage 2: ranks 4..5 hold it\)"):
        mpickpt.transform_checkpoint_by_rank(0, files, str(root / "full.ckpt"), str(root / "merged.ckpt"), None)
