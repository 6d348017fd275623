"""Property tests: for random layouts A -> B, simulating the plans' copies on a full tensor split by A
rebuilds exactly the full tensor split by B, covering each target element once."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mpickpt.layout import Box, Layouts
from mpickpt.catalog import build_catalog
from mpickpt.plan import Planner, TargetPlan, TensorInfo, rank_list_for_transform
from mpickpt.testing.strategies import Conversion, conversions

GLOBAL_STEP = np.array([7], dtype=np.int64)


def _full_tensors(case: Conversion) -> dict[str, np.ndarray]:
    return {name: np.arange(1, 1 + int(np.prod(shape)), dtype=np.int64).reshape(shape)
            for name, shape in case.shapes.items()}


def _cut(array: np.ndarray, box: Box) -> np.ndarray:
    return array[(*(slice(a, b) for a, b in zip(box.start, box.stop)), ...)]


def _source_slices(case: Conversion, full: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """What every source rank stores: its slice of each parameter it holds, and global_step."""
    layouts = Layouts.from_strategy(case.src)
    slices: dict[int, dict[str, np.ndarray]] = {}
    for rank in range(layouts.device_count):
        slices[rank] = {"global_step": GLOBAL_STEP}
        for name, array in full.items():
            if not layouts.holds(name):
                continue
            box = layouts.slice_box(name, array.shape, rank)
            if box is not None:
                slices[rank][name] = _cut(array, box)
    return slices


def _execute(plan: TargetPlan, slices: dict[int, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Run a plan in memory, checking every copy reads inside its source slice and every target
    element is written exactly once."""
    result = {}
    for param in plan.params:
        target = np.zeros(param.dims, dtype=np.int64)
        hits = np.zeros(param.dims, dtype=np.int64)
        for copy in param.copies:
            source = slices[copy.src_rank][param.name]
            assert all(0 <= a <= b <= n for a, b, n in zip(copy.src_box.start, copy.src_box.stop, source.shape))
            assert len(copy.src_box.start) == source.ndim and copy.src_box.shape == copy.dst_box.shape
            _cut(target, copy.dst_box)[...] = _cut(source, copy.src_box)
            _cut(hits, copy.dst_box)[...] += 1
        assert (hits == 1).all(), f"{param.name}: target elements covered {hits.min()}..{hits.max()} times"
        result[param.name] = target
    return result


def _expected(case: Conversion, full: dict[str, np.ndarray], target: int) -> dict[str, np.ndarray]:
    """The full tensors split by the target layout (parameters of other target stages left out); a
    parameter only the source strategy has: the source slice MindSpore copies through (local rank
    `target % source devices` of the lowest stage holding it)."""
    layouts = Layouts.from_strategy(case.dst)
    src_layouts = Layouts.from_strategy(case.src)
    expected = {"global_step": GLOBAL_STEP}
    for name, array in full.items():
        if src_layouts.holds(name) and layouts.holds(name):
            box = layouts.slice_box(name, array.shape, target)
        elif src_layouts.holds(name):
            local = target % layouts.stage_device_num % src_layouts.stage_device_num
            rank = src_layouts.stages_of(name)[0] * src_layouts.stage_device_num + local
            box = src_layouts.slice_box(name, array.shape, rank)
        else:
            continue
        if box is not None:
            expected[name] = _cut(array, box)
    return expected


def _catalog(case: Conversion, slices: dict[int, dict[str, np.ndarray]]) -> dict[str, TensorInfo]:
    return _source_catalog(case, slices).params


def _source_catalog(case: Conversion, slices: dict[int, dict[str, np.ndarray]]):  # type: ignore[no-untyped-def]
    headers = {r: [(n, "Int64", a.shape) for n, a in params.items()] for r, params in slices.items()}
    return build_catalog(case.src, headers)


def _remove_redundancy(case: Conversion, slices: dict[int, dict[str, np.ndarray]], keep: st.DataObject) -> None:
    """Drop parameters from rank files as a redundancy-removed save does: of the ranks of one pipeline stage
    whose slices are byte-equal (replicas, found from the data, not from the layouts), only a random
    non-empty subset keeps it."""
    per_stage = Layouts.from_strategy(case.src).stage_device_num
    names = {n for params in slices.values() for n in params}
    for name in sorted(names):
        groups: dict[tuple[int, bytes], list[int]] = {}
        for rank, params in sorted(slices.items()):
            if name in params:
                content = params[name].tobytes() + repr(params[name].shape).encode()
                groups.setdefault((rank // per_stage, content), []).append(rank)
        for ranks in groups.values():
            kept = keep.draw(st.sets(st.sampled_from(ranks), min_size=1))
            for rank in ranks:
                if rank not in kept:
                    del slices[rank][name]


def check_conversion(case: Conversion, redundancy: st.DataObject | None = None) -> None:
    """Plan every target of `case` and check it against the full tensors split by the target layout;
    the layout-only rank list must be the plan's files (global_step never opens one of its own). With
    `redundancy`, rank files hold only random shares of the replicated data; plans read only what files hold."""
    full = _full_tensors(case)
    slices = _source_slices(case, full)
    if redundancy is not None:
        _remove_redundancy(case, slices, redundancy)
    source = _source_catalog(case, slices)
    catalog = source.params
    assert {n: i.shape for n, i in catalog.items() if n in full} == {n: a.shape for n, a in full.items()
                                                                     if n in catalog}
    planner = Planner(case.src, case.dst, catalog, holders=source.holders)
    assert len(planner.target_ranks) == Layouts.from_strategy(case.dst).device_count
    for target in planner.target_ranks:
        plan = planner.plan(target)
        got = _execute(plan, slices)
        expected = _expected(case, full, target)
        assert sorted(got) == sorted(expected)
        for name, array in expected.items():
            np.testing.assert_array_equal(got[name], array, err_msg=f"target {target} {name}")
        assert list(plan.source_ranks) == sorted(plan.source_ranks, reverse=True)
        if redundancy is not None:
            continue  # the layout-only rank list knows nothing of what files hold
        listed = rank_list_for_transform(target, case.src, case.dst)
        strategy_ranks = {c.src_rank for p in plan.params if p.name != "global_step" for c in p.copies}
        assert set(listed) == (strategy_ranks if case.src is not None else {0})
        if strategy_ranks:
            assert set(plan.source_ranks) == strategy_ranks


@settings(max_examples=200, deadline=None)
@given(conversions())
def test_plans_rebuild_the_target_split(case: Conversion) -> None:
    check_conversion(case)


@settings(max_examples=100, deadline=None)
@given(conversions(), st.data())
def test_redundancy_removed_sources_rebuild_the_target_split(case: Conversion, data: st.DataObject) -> None:
    check_conversion(case, data)


@settings(max_examples=100, deadline=None)
@given(conversions(pipeline=False, missing=False, max_params=2))
def test_every_target_box_is_tiled_by_source_pieces(case: Conversion) -> None:
    """Plans are shape-independent: doubling every dimension doubles every box."""
    full = _full_tensors(case)
    catalog = _catalog(case, _source_slices(case, full))
    doubled = {n: TensorInfo(i.dtype, tuple(2 * d for d in i.shape), i.stages) if n in full else i
               for n, i in catalog.items()}
    small, large = Planner(case.src, case.dst, catalog), Planner(case.src, case.dst, doubled)
    for target in small.target_ranks:
        for a, b in zip(small.plan(target).params, large.plan(target).params):
            assert [c.src_rank for c in a.copies] == [c.src_rank for c in b.copies]
            if a.name in full:
                assert [tuple(2 * x for x in c.dst_box.stop) for c in a.copies] == \
                    [c.dst_box.stop for c in b.copies]
