"""The planner: exact copies for hand-checked conversions, parameters outside the strategies, device
counts MindSpore refuses, errors, and MindSpore's own fixtures (rank lists and the bytes it wrote)."""

from __future__ import annotations

import json
from dataclasses import replace
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from fixture_cases import Case, case_params
from mpickpt.catalog import build_catalog
from mpickpt.ckpt import index_checkpoint
from mpickpt.errors import LayoutError, PlanError
from mpickpt.layout import Box, Layouts
from mpickpt.plan import (
    Copy,
    Planner,
    TensorInfo,
    rank_list_for_transform,
)
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, load_strategy
from mpickpt.testing.strategies import Conversion
from test_plan_properties import check_conversion


def item(name: str, dev: tuple[int, ...], *tensor_map: tuple[int, ...], size: int = 0, step: int = 0) -> LayoutItem:
    return LayoutItem(name=name, dev_matrix=dev, tensor_map=tuple(tensor_map), param_split_shape=((),),
                      opt_weight_shard_size=size, opt_weight_shard_step=step)


def strategy(*items: LayoutItem, stages: int = 1) -> Strategy:
    nodes = tuple(StrategyItem(f"MatMul-op{s}", s, ((1, 1),)) for s in range(stages))
    return Strategy(current_stage=int(stages > 1), strategy_items=nodes, layout_items=items)


def box(start: tuple[int, ...], stop: tuple[int, ...]) -> Box:
    return Box(start, stop)


F32 = "Float32"
STEP = {"global_step": TensorInfo("Int32", (1,))}


# --- exact plans -----------------------------------------------------------------------------------


def test_data_parallel_8_to_tensor_parallel_4() -> None:
    src = strategy(item("w", (8, 1), (-1, -1)))
    dst = strategy(item("w", (1, 4), (-1, 0)))
    planner = Planner(src, dst, {"w": TensorInfo(F32, (4, 8)), **STEP})
    assert planner.target_ranks == range(4)
    for t in range(4):
        plan = planner.plan(t)
        assert plan.source_ranks == (t,)  # each target reads its own replica: reads spread over the files
        w, step = plan.params
        assert (w.name, w.dims, w.in_strategy) == ("w", (4, 2), True)
        assert w.copies == (Copy(t, box((0, 2 * t), (4, 2 * t + 2)), box((0, 0), (4, 2))),)
        assert (step.name, step.dims, step.in_strategy, step.copies[0].src_rank) == ("global_step", (1,), False, t)


def test_tensor_parallel_4_to_8() -> None:
    planner = Planner(strategy(item("w", (4,), (0, -1))), strategy(item("w", (8,), (0, -1))),
                      {"w": TensorInfo(F32, (16, 3))})
    plan = planner.plan(5)
    assert plan.params[0].copies == (Copy(2, box((2, 0), (4, 3)), box((0, 0), (2, 3))),)


def test_tutorial_8_to_4_with_optimizer_parallel() -> None:
    """layer1 ((2,1),(1,2)) on 8 cards -> ((2,2),(2,1)) with optimizer parallel on 4 cards."""
    src = strategy(item("layer1.weight", (2, 2, 1, 2), (1, 0)))
    dst = strategy(item("layer1.weight", (2, 2, 1), (1, 0), size=-1, step=2))
    planner = Planner(src, dst, {"layer1.weight": TensorInfo(F32, (784, 512))})
    rows = {0: 0, 1: 392, 2: 196, 3: 588}
    for t, first in rows.items():
        (param,) = planner.plan(t).params
        base = 2 * (t // 2)  # targets 0, 1 read ranks 0, 1; targets 2, 3 read ranks 2, 3 (as MindSpore)
        assert param.dims == (196, 512)
        assert param.copies == (
            Copy(base, box((first, 0), (first + 196, 256)), box((0, 0), (196, 256))),
            Copy(base + 1, box((first, 0), (first + 196, 256)), box((0, 256), (196, 512))),
        )


def test_nested_map_to_optimizer_sharded_plain_map() -> None:
    src = strategy(item("w", (2, 2), (1, 0), (-1,)))  # dim 0 over both axes: 4 row blocks
    dst = strategy(item("w", (2, 2), (-1, 1), size=-1, step=1))  # dim 1 halves, rows in 2 optimizer pieces
    planner = Planner(src, dst, {"w": TensorInfo(F32, (8, 4))})
    (param,) = planner.plan(3).params  # column half 1, optimizer piece 1: rows 4..8
    assert param.dims == (4, 2)
    assert param.copies == (Copy(2, box((0, 2), (2, 4)), box((0, 0), (2, 2))),
                            Copy(3, box((0, 2), (2, 4)), box((2, 0), (4, 2))))


def test_fewer_files_than_mindspore_when_layouts_share_replicas() -> None:
    """Two layouts over [2, 2]: MindSpore lists [2, 1, 0] for the full merge; two files are enough."""
    src = strategy(item("a", (2, 2), (1, -1)), item("b", (2, 2), (0, -1)))
    assert rank_list_for_transform(0, src, None) == [2, 1]
    plan = Planner(src, None, {"a": TensorInfo(F32, (4, 2)), "b": TensorInfo(F32, (4, 2))}).plan(0)
    assert plan.source_ranks == (2, 1)
    assert [c.src_rank for p in plan.params for c in p.copies] == [1, 2, 2, 1]


def test_missing_source_strategy_reads_rank_0() -> None:
    planner = Planner(None, strategy(item("w", (4,), (-1, 0))), {"w": TensorInfo(F32, (2, 8)), **STEP})
    plan = planner.plan(3)
    assert plan.source_ranks == (0,)
    assert plan.params[0].copies == (Copy(0, box((0, 6), (2, 8)), box((0, 0), (2, 2))),)
    assert rank_list_for_transform(3, None, strategy(item("w", (4,), (-1, 0)))) == [0]


def test_missing_target_strategy_merges_into_one() -> None:
    src = strategy(item("w", (2, 2), (0, -1), size=-1, step=2))
    planner = Planner(src, None, {"w": TensorInfo(F32, (8, 1))})
    assert planner.target_ranks == range(1)
    (param,) = planner.plan(0).params
    assert param.dims == (8, 1)
    assert [(c.src_rank, c.dst_box.start[0]) for c in param.copies] == [(0, 0), (2, 2), (1, 4), (3, 6)]


def test_both_strategies_missing_copies_everything_from_rank_0() -> None:
    plan = Planner(None, None, {"w": TensorInfo(F32, (3,)), **STEP}).plan(0)
    assert [(p.name, p.dims, p.copies[0].src_rank) for p in plan.params] == [("w", (3,), 0), ("global_step", (1,), 0)]


# --- device counts MindSpore refuses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("src", "dst", "shapes"),
    [
        (  # 8 -> 6
            strategy(item("a", (2, 4), (1, 0)), item("b", (4, 2), (-1, 0), size=-1, step=2), item("c", (8,), (-1,))),
            strategy(item("a", (3, 2), (0, 1)), item("b", (6,), (0, -1)), item("c", (2, 3), (0,), size=-1, step=3)),
            {"a": (24, 24), "b": (48, 6), "c": (24,)},
        ),
        (  # 6 -> 4
            strategy(item("a", (2, 3), (0, 1)), item("b", (6,), (-1, 0)), item("c", (3, 2), (0,), size=-1, step=2)),
            strategy(item("a", (4,), (0, -1)), item("b", (2, 2), (1, -1), size=2, step=1), item("c", (4,), (-1,))),
            {"a": (12, 12), "b": (12, 12), "c": (12,)},
        ),
        (  # 3 -> 5
            strategy(item("a", (3,), (0, -1)), item("b", (3,), (-1,))),
            strategy(item("a", (5,), (-1, 0)), item("b", (5,), (0,))),
            {"a": (6, 10), "b": (15,)},
        ),
    ],
    ids=["8to6", "6to4", "3to5"],
)
def test_non_dividing_device_counts_rebuild_the_target_split(src: Strategy, dst: Strategy,
                                                             shapes: dict[str, tuple[int, ...]]) -> None:
    check_conversion(Conversion(src, dst, shapes))


def test_8_to_6_spreads_replicated_reads() -> None:
    planner = Planner(strategy(item("w", (8,), (-1, -1))), strategy(item("w", (6,), (-1, 0))),
                      {"w": TensorInfo(F32, (2, 12))})
    assert [planner.rank_list(t) for t in planner.target_ranks] == [[t] for t in range(6)]


# --- parameters outside the strategies and pipeline stages -------------------------------------------


def test_parameters_absent_from_the_source_strategy_come_from_a_file_read_anyway() -> None:
    """8 replicas -> 2 targets: target 1 reads rank 1 (MindSpore's choice), so global_step comes from there;
    with rank 4's slice wanted instead (tensor parallel 8), it still comes from a file read anyway."""
    catalog = {"w": TensorInfo(F32, (8,)), "global_step": TensorInfo("Int32", (1,)), "lr": TensorInfo(F32, ())}
    plan = Planner(strategy(item("w", (8,), (-1,))), strategy(item("w", (2,), (0,))), catalog).plan(1)
    assert plan.source_ranks == (1,)
    assert [(p.name, p.in_strategy, p.copies[0].src_rank) for p in plan.params] == [
        ("w", True, 1), ("global_step", False, 1), ("lr", False, 1)]
    tp = Planner(strategy(item("w", (8,), (0,))), strategy(item("w", (2,), (0,))), catalog).plan(1)
    assert tp.source_ranks == (7, 6, 5, 4)
    assert {p.copies[0].src_rank for p in tp.params if not p.in_strategy} == {4}


def test_a_target_reading_no_file_takes_absent_parameters_from_mindspores_choice() -> None:
    planner = Planner(strategy(item("w", (4,), (0,))), strategy(item("w", (2,), (0,))), STEP)
    assert [planner.rank_list(t) for t in planner.target_ranks] == [[0], [1]]


def test_source_only_parameter_is_copied_through_as_mindspore_does() -> None:
    """In the source strategy but not the target's: the source slice of local rank t % devices."""
    src = strategy(item("w", (4,), (0,)), item("adam_m", (4,), (0,)))
    catalog = {"w": TensorInfo(F32, (8,)), "adam_m": TensorInfo(F32, (8,))}
    planner = Planner(src, strategy(item("w", (2,), (-1,))), catalog)
    plan = planner.plan(1)
    adam = plan.params[1]
    assert (adam.name, adam.dims, adam.in_strategy) == ("adam_m", (2,), False)
    assert adam.copies == (Copy(1, box((0,), (2,)), box((0,), (2,))),)
    assert rank_list_for_transform(1, src, strategy(item("w", (2,), (-1,)))) == list(plan.source_ranks)


def test_target_only_parameter_in_the_sources_is_copied_through() -> None:
    planner = Planner(strategy(item("w", (2,), (0,))), strategy(item("w", (2,), (0,)), item("extra", (2,), (-1,))),
                      {"w": TensorInfo(F32, (4,)), "extra": TensorInfo(F32, (4,))})
    extra = planner.plan(1).params[1]
    assert (extra.dims, extra.in_strategy, extra.copies[0].src_rank) == ((4,), False, 1)


def test_target_only_parameter_the_target_splits_is_refused() -> None:
    """Copied whole (as MindSpore does), it would contradict the target layout, which gives each target half."""
    planner = Planner(strategy(item("w", (2,), (0,))), strategy(item("w", (2,), (0,)), item("extra", (2,), (0,))),
                      {"w": TensorInfo(F32, (4,)), "extra": TensorInfo(F32, (4,))})
    with pytest.raises(PlanError, match=r"parameter 'extra' is not in the source strategy \(strategy\), so its "
                       r"stored value \[4\] is copied whole, but the target strategy \(strategy\) gives target "
                       r"rank 0 a slice of \[2\] of it \(dev_matrix=\[2\], tensor_map=\[\[0\]\]\)"):
        planner.plan(0)


def test_pipelined_target_keeps_only_its_stage() -> None:
    src = strategy(item("a", (2,), (0,)), item("b", (2,), (0,)))
    dst = strategy(item("0-a", (1,), (-1,)), item("1-b", (1,), (-1,)), stages=2)
    planner = Planner(src, dst, {"a": TensorInfo(F32, (4,)), "b": TensorInfo(F32, (4,)), **STEP})
    assert planner.target_ranks == range(2)
    assert [[p.name for p in planner.plan(t).params] for t in range(2)] == [["a", "global_step"], ["b", "global_step"]]


def test_pipelined_source_reads_the_stage_holding_each_parameter() -> None:
    src = strategy(item("0-a", (2,), (0,)), item("1-b", (2,), (0,)), item("1-a", (2,), (0,)), stages=2)
    planner = Planner(src, strategy(item("a", (1,), (-1,)), item("b", (1,), (-1,))),
                      {"a": TensorInfo(F32, (4,)), "b": TensorInfo(F32, (4,)), **STEP})
    plan = planner.plan(0)
    a, b, step = plan.params
    assert [c.src_rank for c in a.copies] == [0, 1]  # shared by both stages: read from the lowest, as MindSpore
    assert [c.src_rank for c in b.copies] == [2, 3]
    assert step.copies[0].src_rank == 0 and plan.source_ranks == (3, 2, 1, 0)


def test_stage_subnetwork_transform_numbers_sources_from_the_stage() -> None:
    stage_file = strategy(item("b", (2,), (0,)))
    dst = strategy(item("a", (4,), (0,)), item("b", (4,), (0,)))
    planner = Planner(stage_file, dst, {"b": TensorInfo(F32, (8,)), **STEP}, src_stage=1)
    assert planner.target_ranks == range(4)
    plan = planner.plan(3)
    assert [p.name for p in plan.params] == ["b", "global_step"]
    assert plan.params[0].copies == (Copy(3, box((2,), (4,)), box((0,), (2,))),)
    assert plan.source_ranks == (3,)


# --- errors ------------------------------------------------------------------------------------------


def test_plan_errors() -> None:
    planner = Planner(strategy(item("w", (2,), (0, -1))), strategy(item("w", (4,), (-1, 0))),
                      {"w": TensorInfo(F32, (4, 6))})
    with pytest.raises(LayoutError, match=r"'w': dimension 1 \(6\) does not divide into 4 shard.*dev_matrix.*\[4, 6\]"):
        planner.plan(0)
    with pytest.raises(PlanError, match="target rank 4 is outside 0..3"):
        planner.plan(4)
    mismatch = Planner(strategy(item("w", (2,), (0, -1))), strategy(item("w", (2,), (0,))),
                       {"w": TensorInfo(F32, (4, 4))})
    with pytest.raises(PlanError, match="'w': the source layout .* has 2 dimensions, the target layout .* 1"):
        mismatch.plan(0)



def test_a_target_layout_wrong_for_the_shape_names_the_target_file_from_one_unsharded_source() -> None:
    """Not the unsharded layout made for the source (named by no file) from the target's map."""
    dst = replace(strategy(item("c", (2,), (0,))), path="dst_strategy.ckpt")
    planner = Planner(None, dst, {"c": TensorInfo(F32, ())})
    with pytest.raises(LayoutError, match=r"^dst_strategy.ckpt: parameter 'c': the tensor map has 1 dimensions, "
                                          r"the tensor 0 \(layout dev_matrix=\[2\]"):
        planner.plan(0)

# --- output helpers ----------------------------------------------------------------------------------


def test_plans_are_json_and_count_bytes() -> None:
    planner = Planner(strategy(item("w", (2,), (0,))), None, {"w": TensorInfo("Float16", (6,)), **STEP})
    plan = planner.plan(0)
    assert (plan.bytes_read(), plan.bytes_written()) == (16, 16)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["source_ranks"] == [1, 0] and data["bytes_written"] == 16
    assert data["params"][0]["copies"][1] == {"src_rank": 1, "src_box": {"start": [0], "stop": [3]},
                                              "dst_box": {"start": [3], "stop": [6]}}
    info = TensorInfo(F32, (2,), (0,)).to_dict()
    assert json.loads(json.dumps(info)) == info == {"dtype": "Float32", "shape": [2], "stages": [0]}


# --- MindSpore fixtures ------------------------------------------------------------------------------


def _strategy(case: Case, which: str) -> Strategy | None:
    path = case.strategy(which)
    return None if path is None else load_strategy(path)


@cache
def _arrays(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    with index_checkpoint(path) as index:
        return {n: (e.dtype, np.array(index.array(n))) for n, e in index.entries.items()}


def _rank_file(case: Case, rank: int) -> Path:
    return next((case.src_dir / f"rank_{rank}").glob("*.ckpt"))


def _catalog(case: Case, src: Strategy | None, ranks: range, src_stage: int | None = None) -> dict[str, TensorInfo]:
    headers = {r: [(n, d, a.shape) for n, (d, a) in _arrays(_rank_file(case, r)).items()] for r in ranks}
    return build_catalog(src, headers, path_of=lambda r: str(_rank_file(case, r)), src_stage=src_stage).params


def _all_ranks(src: Strategy | None) -> range:
    return range(Layouts.from_strategy(src).device_count)


def _check_against(case: Case, planner: Planner, expected: dict[int, Path]) -> None:
    """Run every plan in memory over the fixture's sources; compare with MindSpore's outputs."""
    assert sorted(expected) == list(planner.target_ranks)
    for target, path in expected.items():
        plan = planner.plan(target)
        theirs = _arrays(path)
        assert sorted(p.name for p in plan.params) == sorted(theirs), target
        for param in plan.params:
            dtype, want = theirs[param.name]
            got = np.empty(param.dims, want.dtype)
            for copy in param.copies:
                source = _arrays(_rank_file(case, copy.src_rank))[param.name][1]
                got[(*(slice(a, b) for a, b in zip(copy.dst_box.start, copy.dst_box.stop)), ...)] = \
                    source[(*(slice(a, b) for a, b in zip(copy.src_box.start, copy.src_box.stop)), ...)]
            assert (param.dtype, param.dims) == (dtype, want.shape), (target, param.name)
            assert got.tobytes() == want.tobytes(), (target, param.name)


@case_params
def test_rank_lists_never_exceed_mindspores(case: Case) -> None:
    src, dst = _strategy(case, "src"), _strategy(case, "dst")
    theirs = case.meta["ms_rank_list_for_transform"]
    planner = Planner(src, dst, _catalog(case, src, _all_ranks(src)))
    for target, listed in theirs.items():
        ours = rank_list_for_transform(int(target), src, dst)
        assert set(ours) <= set(listed) and len(ours) <= len(listed), \
            f"target {target}: ours {ours}, MindSpore {listed}"
        assert ours == sorted(ours, reverse=True) == planner.rank_list(int(target))


@case_params
def test_plans_rebuild_what_mindspore_wrote(case: Case) -> None:
    src, dst = _strategy(case, "src"), _strategy(case, "dst")
    planner = Planner(src, dst, _catalog(case, src, _all_ranks(src)))
    _check_against(case, planner, case.expected_files())


@pytest.mark.parametrize("stage", [0, 1])
def test_stage_subnetwork_plans_rebuild_what_mindspore_wrote(stage: int, mindspore_cases: dict[str, Case]) -> None:
    case = mindspore_cases["pipeline_2x4_to_4"]
    src = load_strategy(case.root / "src_pipeline_strategys" / f"src_strategy_{4 * stage}.ckpt")
    planner = Planner(src, _strategy(case, "dst"), _catalog(case, src, range(4 * stage, 4 * stage + 4), stage), src_stage=stage)
    expected = {t: case.root / "expected_by_stage" / f"rank_{t}" / f"checkpoint_{t}_part{stage}.ckpt" for t in range(4)}
    _check_against(case, planner, expected)
