"""Layout geometry: exact boxes for hand-checked layouts, typed errors for impossible ones, and the
MindSpore-made cases (slicing the full model by a layout reproduces what MindSpore stored). Expected boxes
come from an independent reference model of FORMATS.md's layout rules (``reference_box``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fixture_cases import Case, case_params
from mpickpt.ckpt import index_checkpoint
from mpickpt.errors import LayoutError, StrategyFormatError
from mpickpt.layout import Box, Layouts, ParamLayout
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, load_strategy
from layout_reference import BoxBounds, reference_box, reference_slice
from random_cases import make_case


def item(name: str, dev: tuple[int, ...], *tensor_map: tuple[int, ...], size: int = 0, step: int = 0,
         split: tuple[int, ...] = ()) -> LayoutItem:
    return LayoutItem(name=name, dev_matrix=dev, tensor_map=tuple(tensor_map), param_split_shape=(split,),
                      opt_weight_shard_size=size, opt_weight_shard_step=step)


def strategy(*items: LayoutItem) -> Strategy:
    return Strategy(current_stage=0, strategy_items=(StrategyItem("MatMul-op0", 0, ((1, 1),)),), layout_items=items)


def boxes(layouts: Layouts, name: str, shape: tuple[int, ...]) -> list[BoxBounds | None]:
    """What mpickpt says each rank holds."""
    result = []
    for rank in range(layouts.device_count):
        box = layouts.slice_box(name, shape, rank)
        result.append(None if box is None else (box.start, box.stop))
    return result


def reference_boxes(layout: LayoutItem, shape: tuple[int, ...]) -> list[BoxBounds | None]:
    """``reference_box`` of every rank of one stage."""
    return [reference_box(layout, shape, rank) for rank in range(math.prod(layout.dev_matrix))]


def check(layout: LayoutItem, shape: tuple[int, ...], expected: list[BoxBounds]) -> None:
    """mpickpt's boxes equal the reference's, and the reference gives the hand-derived ``expected``."""
    assert reference_boxes(layout, shape) == expected
    assert boxes(Layouts.from_strategy(strategy(layout)), layout.name, shape) == expected


# --- Box -----------------------------------------------------------------------------------------


def test_box_arithmetic() -> None:
    a, b = Box((0, 4), (8, 12)), Box((6, 0), (10, 6))
    assert a.shape == (8, 8) and a.size == 64
    assert a.intersect(b) == Box((6, 4), (8, 6))
    assert a.intersect(Box((8, 0), (9, 4))) is None  # touching is not overlapping
    assert Box((6, 4), (8, 6)).relative_to(a) == Box((6, 0), (8, 2))
    assert Box.full((3, 5)) == Box((0, 0), (3, 5)) and Box.full(()).size == 1
    assert Box((1,), (3,)).to_dict() == {"start": [1], "stop": [3]}


# --- exact boxes ---------------------------------------------------------------------------------


def test_data_parallel_replicates_and_tensor_parallel_splits() -> None:
    check(item("w", (8, 1), (-1, -1)), (4, 8), [((0, 0), (4, 8))] * 8)
    check(item("w", (1, 4), (-1, 0)), (4, 8), [((0, 2 * r), (4, 2 * r + 2)) for r in range(4)])


def test_tutorial_layouts() -> None:
    """The tutorial's layer1: 8 cards ((2,1),(1,2)) and 4 cards ((2,2),(2,1)) with optimizer parallel."""
    check(item("layer1.weight", (2, 2, 1, 2), (1, 0)), (784, 512),
          [((0, 256 * (r % 2)), (784, 256 * (r % 2) + 256)) for r in range(8)])
    # dim 0: 2 model-parallel chunks (axis 1 = rank % 2), each cut into 2 optimizer pieces (replica rank // 2)
    rows = [(0, 196), (392, 588), (196, 392), (588, 784)]
    check(item("layer1.weight", (2, 2, 1), (1, 0), size=-1, step=2), (784, 512), [((a, 0), (b, 512)) for a, b in rows])


def test_nested_tensor_map_first_axis_outermost() -> None:
    check(item("w", (2, 2, 2), (2, 1), (0,)), (8, 4),
          [((2 * (r // 2), 2 * (r % 2)), (2 * (r // 2) + 2, 2 * (r % 2) + 2)) for r in range(8)])
    rows = [2 * (((r // 2) % 2) * 2 + r // 4) for r in range(8)]
    check(item("w", (2, 2, 2), (1, 2), (-1,)), (8, 4), [((a, 0), (a + 2, 4)) for a in rows])


@pytest.mark.parametrize(("size", "pieces"), [(-1, [0, 0, 1, 1, 2, 2, 3, 3]), (2, [0, 0, 1, 1, 0, 0, 1, 1]),
                                              (1, [0] * 8)])
def test_optimizer_sharding_cuts_dimension_0(size: int, pieces: list[int]) -> None:
    layout = item("w", (4, 2), (-1, 0), size=size, step=2)
    rows = 16 // (max(pieces) + 1)
    check(layout, (16, 6), [((p * rows, 3 * (r % 2)), (p * rows + rows, 3 * (r % 2) + 3)) for r, p in enumerate(pieces)])
    assert Layouts.from_strategy(strategy(layout)).full_shape("w", (rows, 3)) == (16, 6)


def test_optimizer_sharding_inside_the_model_parallel_slice() -> None:
    """Dimension 0 split by tensor parallel (axis 0) and then by optimizer pieces over the replicas."""
    check(item("w", (2, 2), (0,), size=-1, step=2), (8,), [((0,), (2,)), ((4,), (6,)), ((2,), (4,)), ((6,), (8,))])


def test_optimizer_sharding_over_one_replica_is_one_piece() -> None:
    check(item("w", (2,), (0,), size=-1, step=1), (4,), [((0,), (2,)), ((2,), (4,))])


def test_optimizer_sharding_needs_both_size_and_step() -> None:
    check(item("w", (4,), (-1,), size=0, step=1), (8,), [((0,), (8,))] * 4)
    check(item("w", (4,), (-1,), size=1, step=0), (8,), [((0,), (8,))] * 4)


def test_even_param_split_shape_is_accepted() -> None:
    check(item("w", (2,), (0, -1), split=(3, 3)), (6, 2), [((0, 0), (3, 2)), ((3, 0), (6, 2))])


def test_scalar_parameter() -> None:
    check(item("lr", (4,), ()), (), [((), ())] * 4)


@pytest.mark.parametrize("seed", range(40))
def test_random_layouts_agree_with_the_reference(seed: int) -> None:
    case = make_case(seed, params=6, any_axis_order=seed % 2 == 1)
    for which in (case.src, case.dst):
        layouts = Layouts.from_strategy(which)
        for layout in which.layout_items:
            shape = case.tensors[layout.name][1].shape
            assert boxes(layouts, layout.name, shape) == reference_boxes(layout, shape), (seed, layout)


def test_pipeline_merged_names_and_shared_parameters() -> None:
    merged = Strategy(
        current_stage=1,
        strategy_items=(StrategyItem("a", 0, ()), StrategyItem("b", 1, ())),
        layout_items=(
            item("0-embed", (2,), (0, -1)), item("0-w0", (2,), (-1, 0)),
            item("1-w1", (2,), (-1,)), item("1-embed", (2,), (-1, 0)),
        ),
    )
    layouts = Layouts.from_strategy(merged)
    assert (layouts.stage_count, layouts.stage_device_num, layouts.device_count) == (2, 2, 4)
    assert layouts.names == ("embed", "w0", "w1") and layouts.stages_of("embed") == (0, 1)
    assert boxes(layouts, "w0", (2, 4)) == [((0, 0), (2, 2)), ((0, 2), (2, 4)), None, None]
    assert boxes(layouts, "w1", (6,)) == [None, None, ((0,), (6,)), ((0,), (6,))]
    # each stage of a shared parameter uses its own layout
    assert boxes(layouts, "embed", (4, 6)) == [((0, 0), (2, 6)), ((2, 0), (4, 6)), ((0, 0), (4, 3)), ((0, 3), (4, 6))]
    assert layouts.full_shape("embed", (4, 3), rank=3) == (4, 6)
    assert layouts.full_shape("embed", (2, 6)) == (4, 6)


def test_unmerged_stage_file_numbers_ranks_from_its_stage() -> None:
    layouts = Layouts.from_strategy(strategy(item("w", (2,), (0,))), stage=1)
    assert layouts.stages == (1,) and layouts.device_count == 4
    assert boxes(layouts, "w", (4,)) == [None, None, ((0,), (2,)), ((2,), (4,))]


def test_missing_strategy_is_one_whole_device() -> None:
    layouts = Layouts.from_strategy(None)
    assert layouts.unsharded and layouts.device_count == 1 and layouts.holds("anything")
    assert layouts.slice_box("anything", (3, 4), 0) == Box((0, 0), (3, 4))
    assert layouts.full_shape("anything", (3, 4)) == (3, 4)
    with pytest.raises(LayoutError, match="rank 1 is outside"):
        layouts.slice_box("anything", (3, 4), 1)


# --- impossible layouts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "shape", "message"),
    [
        (item("w", (4,), (0, -1)), (6, 2), r"dimension 0 \(6\) does not divide into 4 shard\(s\)"),
        (item("w", (2, 2), (-1, 0), size=-1, step=2), (5, 2),
         r"dimension 0 \(5\) does not divide into 1 shard\(s\) x 2 optimizer pieces"),
        (item("w", (2, 2), (0, -1)), (4,), "the tensor map has 2 dimensions, the tensor 1"),
        (item("w", (2,), (0, -1), split=(2, 4)), (6, 2), "uneven split"),
        (item("w", (2,), (0, -1), split=(2, 2)), (6, 2), "param_split_shape .* is not an even split"),
    ],
)
def test_impossible_layout_names_parameter_layout_and_shape(layout: LayoutItem, shape: tuple[int, ...],
                                                             message: str) -> None:
    with pytest.raises(LayoutError, match=message) as error:
        Layouts.from_strategy(strategy(layout)).slice_box("w", shape, 0)
    text = str(error.value)
    assert "'w'" in text and "dev_matrix" in text


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (item("w", (2, 4), (-1, 0), size=3, step=4), "opt_weight_shard_size 3 does not divide the replica count 2"),
        (item("w", (2, 4), (-1, 0), size=-2, step=4), "must be -1 or positive"),
        (item("w", (2, 2), (0, 0)), "one device axis for several dimensions"),
        (item("w", (2, 2), (2, -1)), "device axis outside"),
        (item("w", (2,), (), size=-1, step=1), "optimizer sharding of a 0-d tensor"),
        # a size without a step: MindSpore's converter takes the stored slices for optimizer pieces, its layout not
        (item("w", (4,), (-1,), size=-1, step=0), "opt_weight_shard_size -1 with opt_weight_shard_step 0"),
        (item("w", (4, 2), (-1, 0), size=2, step=0), "opt_weight_shard_size 2 with opt_weight_shard_step 0"),
        # groups of consecutive replicas along axis 1 are 2 ranks apart; a step of 4 names other groups
        (item("w", (4, 2), (-1, 0), size=2, step=4), "opt_weight_shard_step 4 is not 2"),
        (item("w", (2, 2, 2, 1), (3, 0), (-1,), size=2, step=2), "opt_weight_shard_step 2 is not 1"),
    ],
)
def test_impossible_layout_whatever_the_shape(layout: LayoutItem, message: str) -> None:
    with pytest.raises(LayoutError, match=message) as error:
        ParamLayout.from_item(layout)
    assert "'w'" in str(error.value)


def test_impossible_layout_names_the_strategy_file() -> None:
    bad = Strategy(current_stage=0, layout_items=(item("w", (4, 2), (-1, 0), size=3, step=2),), path="/s/src.ckpt")
    with pytest.raises(LayoutError, match=r"^/s/src\.ckpt: parameter 'w': opt_weight_shard_size 3 does not divide"):
        Layouts.from_strategy(bad)


def test_strategy_level_errors() -> None:
    with pytest.raises(LayoutError, match="'b'.*covers 2 devices, other parameters 4"):
        Layouts.from_strategy(strategy(item("a", (4,), (0,)), item("b", (2,), (0,))))
    gap = Strategy(current_stage=1, layout_items=(item("0-a", (2,), (0,)), item("2-b", (2,), (0,))))
    with pytest.raises(StrategyFormatError, match=r"stages \[0, 2\]"):
        Layouts.from_strategy(gap)
    with pytest.raises(StrategyFormatError, match="merged pipeline name"):
        Layouts.from_strategy(Strategy(current_stage=1, layout_items=(item("0-a", (2,), (0,)),)), stage=0)
    with pytest.raises(StrategyFormatError, match="no parameter layouts"):
        Layouts.from_strategy(Strategy(current_stage=0))
    with pytest.raises(LayoutError, match="'c' is not in the strategy"):
        Layouts.from_strategy(strategy(item("a", (2,), (0,)))).slice_box("c", (2,), 0)


def test_full_shape_rejects_dims_of_the_wrong_rank() -> None:
    layouts = Layouts.from_strategy(strategy(item("w", (2,), (0, -1))))
    with pytest.raises(LayoutError, match=r"'w': a stored slice has 1 dimensions.*slice dims \[3\]"):
        layouts.full_shape("w", (3,))


# --- MindSpore-made cases ----------------------------------------------------------------------------


def _arrays(path: object) -> dict[str, np.ndarray]:
    with index_checkpoint(path) as index:
        return {name: np.array(index.array(name)) for name in index.entries}


def _check_sliced(case: Case, which: str, files: dict[int, Path]) -> None:
    """Each file holds exactly the parameters its rank holds, each the full tensor cut by the reference
    box, which is also mpickpt's box."""
    full = _arrays(case.root / case.meta["full_checkpoint"])
    path = case.strategy(which)
    strategy = None if path is None else load_strategy(path)
    layouts = Layouts.from_strategy(strategy)
    for rank, file in files.items():
        stored = _arrays(file)
        bounds = {name: reference_slice(strategy, name, array.shape, rank) for name, array in full.items()}
        assert sorted(stored) == sorted(name for name, box in bounds.items() if box is not None), (rank, file)
        for name, data in stored.items():
            start, stop = bounds[name]
            if layouts.holds(name):
                assert layouts.slice_box(name, full[name].shape, rank) == Box(start, stop), (rank, name)
            cut = full[name][(*(slice(a, b) for a, b in zip(start, stop)), ...)]
            np.testing.assert_array_equal(cut, data, err_msg=f"rank {rank} {name}")


@case_params
def test_full_model_sliced_by_source_layout_is_the_source_checkpoints(case: Case) -> None:
    files = {rank: next((case.src_dir / f"rank_{rank}").glob("*.ckpt")) for rank in range(case.meta["src_ranks"])}
    _check_sliced(case, "src", files)


@case_params
def test_full_model_sliced_by_target_layout_is_what_mindspore_wrote(case: Case) -> None:
    _check_sliced(case, "dst", case.expected_files())
