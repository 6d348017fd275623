"""Strategy files: fixture round trips, resolved view, pipeline merge, bad input, random round trips."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from fixture_cases import Case, strategy_files
from hypothesis import given, settings
from hypothesis import strategies as st

from mpickpt._proto import node_strategy_pb2
from mpickpt.errors import DestinationError, SourceMissingError, StrategyFormatError
from mpickpt.strategy import (
    JSON,
    PROTOBUF,
    LayoutItem,
    Strategy,
    StrategyItem,
    describe_strategy,
    load_strategy,
    merge_pipeline_strategys,
    merge_strategies,
    parse_strategy_bytes,
    save_strategy,
    split_stage_prefix,
    strategy_to_bytes,
)


@pytest.fixture(scope="module")
def pipeline(mindspore_cases: dict[str, Case]) -> Path:
    """The MindSpore-made pipeline case's folder."""
    return mindspore_cases["pipeline_2x4_to_4"].root


@pytest.fixture(scope="module")
def stage_files(pipeline: Path) -> Path:
    """The pipeline case's per-rank stage strategy files."""
    return pipeline / "src_pipeline_strategys"


def _layout(name: str = "w", **changes: object) -> LayoutItem:
    base = LayoutItem(name=name, dev_matrix=(2, 4), tensor_map=((1, -1),), param_split_shape=((),), field=0)
    return replace(base, **changes)


def _items(strategy: Strategy) -> tuple[list[str], list[str]]:
    """Content as sorted lists (MindSpore's merge order depends on directory listing order)."""
    return sorted(map(repr, strategy.strategy_items)), sorted(map(repr, strategy.layout_items))


# --- fixtures -----------------------------------------------------------------------------------


def test_mindspore_files_round_trip(mindspore_root: Path, tmp_path: Path) -> None:
    paths = strategy_files(mindspore_root)
    assert len(paths) == 4 + 4 + 8  # source and target files (one merged) and the per-rank stage files
    for index, path in enumerate(paths):
        strategy = load_strategy(path)
        assert strategy.path == str(path)
        assert strategy.layout_items and strategy.strategy_items, path
        assert strategy_to_bytes(strategy, PROTOBUF) == path.read_bytes(), path
        assert parse_strategy_bytes(strategy_to_bytes(strategy, JSON), "s.json") == strategy, path
        for name in (f"copy{index}.ckpt", f"copy{index}.json"):
            save_strategy(strategy, tmp_path / name)
            assert load_strategy(tmp_path / name) == strategy, path
    assert len(os.listdir(tmp_path)) == 2 * len(paths)


def test_pipeline_fixture_resolved_view(pipeline: Path, stage_files: Path,
                                        mindspore_cases: dict[str, Case]) -> None:
    merged = load_strategy(pipeline / "src_strategy.ckpt")
    by_param = merged.layouts_by_param()
    assert by_param["layer1.weight"][0][0] == 0 and by_param["layer3.bias"][0][0] == 1
    assert all(len(entries) == 1 for entries in by_param.values())
    assert (merged.stage_count, merged.is_pipelined, merged.stage_device_count) == (2, True, 4)
    stage0 = load_strategy(stage_files / "src_strategy_0.ckpt")
    stage1 = load_strategy(stage_files / "src_strategy_7.ckpt")
    assert (stage0.stage, stage1.stage) == (0, 1)
    assert (stage1.stage_count, stage1.is_pipelined) == (1, False)
    params = {"layer2.weight", "layer2.bias", "layer3.weight", "layer3.bias"}
    assert set(stage1.layouts_by_param()) == params | {f"{kind}.{p}" for kind in ("accum", "stat") for p in params}
    assert {stage for entries in stage1.layouts_by_param().values() for stage, _ in entries} == {None}
    assert load_strategy(mindspore_cases["seed_8to4"].strategy("src")).stage_device_count == 8


def test_merge_matches_mindspore_fixture_in_any_order(pipeline: Path, stage_files: Path) -> None:
    stages = [load_strategy(p) for p in sorted(stage_files.glob("*.ckpt"))]
    expected = load_strategy(pipeline / "src_strategy.ckpt")
    results = {strategy_to_bytes(merge_strategies(order), PROTOBUF) for order in itertools.permutations(stages[3:6])}
    assert len(results) == 1  # the order of the inputs does not matter
    merged = merge_strategies(stages)
    assert merged.current_stage == 1 and _items(merged) == _items(expected)
    assert [layout.name[:2] for layout in merged.layout_items] == ["0-"] * 6 + ["1-"] * 12  # ordered by stage


def test_merge_pipeline_strategys_is_reproducible(pipeline: Path, stage_files: Path, tmp_path: Path) -> None:
    merge_pipeline_strategys(stage_files, tmp_path / "a" / "merged.ckpt")
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for path in stage_files.glob("*.ckpt"):
        rank = int(path.stem.rsplit("_", 1)[1])
        shutil.copy(path, renamed / f"stage_file_{7 - rank}.ckpt")  # reversed listing
    merge_pipeline_strategys(str(renamed), str(renamed / "merged.ckpt"))
    merge_pipeline_strategys(renamed, renamed / "merged.ckpt")  # a rerun does not read its own output
    assert (tmp_path / "a" / "merged.ckpt").read_bytes() == (renamed / "merged.ckpt").read_bytes()
    assert _items(load_strategy(renamed / "merged.ckpt")) == _items(load_strategy(pipeline / "src_strategy.ckpt"))
    merge_pipeline_strategys(stage_files, tmp_path / "merged.json")
    assert load_strategy(tmp_path / "merged.json") == load_strategy(renamed / "merged.ckpt")


def test_merge_keeps_the_first_input_of_each_stage() -> None:
    def stage_strategy(stage: int, layout_name: str, node: str = "op") -> Strategy:
        return Strategy(0, (StrategyItem(f"{node}{stage}", stage, ((1,),)),), (_layout(layout_name),),
                        path=layout_name)

    merged = merge_strategies([stage_strategy(1, "b"), stage_strategy(0, "a"), stage_strategy(1, "b", "other")])
    assert [layout.name for layout in merged.layout_items] == ["0-a", "1-b"]
    assert [item.node_name for item in merged.strategy_items] == ["op0", "op1"]
    assert merge_strategies([]) == Strategy(current_stage=1)


@pytest.mark.parametrize(("second", "message"), [
    ((_layout("b", tensor_map=((-1, 1),)),), r"lay out parameter 'b' differently: dev_matrix=\[2, 4\], "
     r"tensor_map=\[\[1, -1\]\] in s1_a.ckpt, dev_matrix=\[2, 4\], tensor_map=\[\[-1, 1\]\] in s1_b.ckpt"),
    ((_layout("b"), _layout("c")), r"lay out parameter 'c' differently: none in s1_a.ckpt, dev_matrix=\[2, 4\]"),
    ((_layout("c"),), r"lay out parameter 'b' differently: dev_matrix=\[2, 4\], tensor_map=\[\[1, -1\]\] in "
     r"s1_a.ckpt, none in s1_b.ckpt"),
    ((_layout("b", opt_weight_shard_size=2, opt_weight_shard_step=1),), r"lay out parameter 'b' differently: .*, "
     r"opt_weight_shard_step=1, opt_weight_shard_size=2 in s1_b.ckpt: are they from one run"),
], ids=["layout", "extra parameter", "missing parameter", "optimizer shard"])
def test_merge_refuses_two_files_of_one_stage_that_disagree(second: tuple[LayoutItem, ...], message: str) -> None:
    """Per-stage files of one run are alike within a stage; files that differ (a stale file of another run in the
    folder) leave which one MindSpore keeps to the folder's listing order: refused, naming both."""
    first = Strategy(0, (StrategyItem("op", 1, ()),), (_layout("b"),), path="s1_a.ckpt")
    other = Strategy(0, (StrategyItem("op", 1, ()),), second, path="s1_b.ckpt")
    with pytest.raises(StrategyFormatError, match=r"s1_a.ckpt and s1_b.ckpt are strategy files of pipeline stage 1 "
                       r"but " + message):
        merge_strategies([first, other])


def test_merge_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceMissingError, match="not a directory"):
        merge_pipeline_strategys(tmp_path / "absent", tmp_path / "out.ckpt")
    with pytest.raises(SourceMissingError, match="no strategy files"):
        merge_pipeline_strategys(tmp_path, tmp_path / "out.ckpt")
    good = Strategy(0, (StrategyItem("op", 0, ()),), (_layout(),))
    save_strategy(good, tmp_path / "a.ckpt")
    save_strategy(good, tmp_path / "b.json")
    with pytest.raises(StrategyFormatError, match="all '.ckpt' or all '.json'"):
        merge_pipeline_strategys(tmp_path, tmp_path / "out.ckpt")
    (tmp_path / "b.json").unlink()
    save_strategy(Strategy(0, (), (_layout(),)), tmp_path / "empty_items.ckpt")
    with pytest.raises(StrategyFormatError, match="empty_items.ckpt: cannot merge"):
        merge_pipeline_strategys(tmp_path, tmp_path / "out.ckpt")


# --- resolved view ------------------------------------------------------------------------------


def test_split_stage_prefix() -> None:
    assert split_stage_prefix("1-layer.w") == (1, "layer.w")
    assert split_stage_prefix("12-a.b_c") == (12, "a.b_c")
    assert split_stage_prefix("layer.w") == (None, "layer.w")
    for bad in ("x-layer", "1-a-b", "-w", "١-w"):
        with pytest.raises(StrategyFormatError, match="'<stage>-<name>'"):
            split_stage_prefix(bad)


def test_layouts_by_param_and_stage_count() -> None:
    items = (StrategyItem("op", 1, ()),)
    strategy = Strategy(1, items, (_layout("1-w"), _layout("0-w", field=1), _layout("0-b"), _layout("0-w", field=2)))
    by_param = strategy.layouts_by_param()
    assert [(s, layout.field) for s, layout in by_param["w"]] == [(1, 0), (0, 2)]  # a repeated name keeps its last
    assert list(by_param) == ["w", "b"] and strategy.stage_count == 2 and strategy.stage == 1
    only_stage_1 = Strategy(1, items, (_layout("1-w"),), path="half.ckpt")
    with pytest.raises(StrategyFormatError, match=r"half.ckpt: layouts of pipeline stages \[1\]"):
        _ = only_stage_1.stage_count
    with pytest.raises(StrategyFormatError, match="p.ckpt: parameter 'a-b-c'"):
        Strategy(0, (), (_layout("a-b-c"),), path="p.ckpt").layouts_by_param()
    with pytest.raises(StrategyFormatError, match="p.ckpt: no parallel_strategy_item"):
        _ = Strategy(0, path="p.ckpt").stage
    with pytest.raises(StrategyFormatError, match="p.ckpt: parameter 'w' has an empty dev_matrix"):
        _ = Strategy(0, (), (_layout(dev_matrix=(), tensor_map=((-1,),)),), path="p.ckpt").stage_device_count
    assert Strategy(0).stage_count == 0


def test_dim_axes_and_device_count() -> None:
    assert _layout(tensor_map=((1, -1, 0),)).dim_axes() == ((1,), (), (0,))
    assert _layout(tensor_map=((),)).dim_axes() == ()
    nested = _layout(dev_matrix=(2, 2, 2), tensor_map=((2, 0), (-1,), (), (1, -1)))
    assert nested.dim_axes() == ((2, 0), (), (1,))  # empty messages dropped, -1 ignored, as MindSpore does
    assert nested.device_count == 8 and _layout(dev_matrix=()).device_count == 1


def test_describe_strategy() -> None:
    strategy = Strategy(1, (), (_layout("0-w", opt_weight_shard_size=-1, opt_weight_shard_step=2),))
    nested = _layout("b", dev_matrix=(2, 2), tensor_map=((1, 0), (-1,)))
    assert describe_strategy(strategy) + describe_strategy(Strategy(0, (), (nested,))) == [
        {"name": "w", "stage": 0, "dev_matrix": [2, 4], "tensor_map": [1, -1], "opt_weight_shard_size": -1,
         "opt_weight_shard_step": 2},
        {"name": "b", "stage": None, "dev_matrix": [2, 2], "tensor_map": [[1, 0], [-1]], "opt_weight_shard_size": 0,
         "opt_weight_shard_step": 0},
    ]


# --- bad input ----------------------------------------------------------------------------------


def _protobuf_with_layout(**layouts: object) -> bytes:
    message = node_strategy_pb2.ParallelStrategyMap(current_stage=0)
    item = message.parallel_layout_item.add(param_name="layer.w").parallel_layouts
    for key, value in layouts.items():
        if key in ("field", "opt_weight_shard_step", "opt_weight_shard_size"):
            setattr(item, key, value)
        else:
            for dims in value:
                getattr(item, key).add(dim=dims)
    return message.SerializePartialToString()


REQUIRED = {"field": 0, "opt_weight_shard_step": 0, "opt_weight_shard_size": 0}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "bad.ckpt: the strategy file is empty"),
        (b"\xff\xff\xff", "bad.ckpt: not a protobuf strategy file"),
        (b"hello world", "bad.ckpt: not a protobuf strategy file"),
        (b"\x1a\x02\x0a\x00", "bad.ckpt: missing required field current_stage"),
        (_protobuf_with_layout(dev_matrix=[[2]], tensor_map=[[0]]), "parameter 'layer.w': missing required field"),
        (_protobuf_with_layout(dev_matrix=[[2], [2]], tensor_map=[[0]], **REQUIRED), "'layer.w': expected one dev_m"),
        (_protobuf_with_layout(dev_matrix=[[2]], tensor_map=[], **REQUIRED), "'layer.w': no tensor_map"),
        (_protobuf_with_layout(dev_matrix=[[2]], tensor_map=[[1]], **REQUIRED), "'layer.w': tensor_map names device"),
        (_protobuf_with_layout(dev_matrix=[[2, 0]], tensor_map=[[0]], **REQUIRED), "'layer.w': dev_matrix .* zero"),
    ],
)
def test_bad_protobuf(data: bytes, message: str) -> None:
    with pytest.raises(StrategyFormatError, match=message):
        parse_strategy_bytes(data, "bad.ckpt")


def test_truncated_protobuf_names_file(written_cases: dict[str, Case], tmp_path: Path) -> None:
    data = Path(str(written_cases["random_8to4"].strategy("src"))).read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:-5])
    with pytest.raises(StrategyFormatError, match="cut.ckpt: not a protobuf strategy file"):
        load_strategy(tmp_path / "cut.ckpt")
    for end in range(1, len(data), 7):  # any cut either parses (a message boundary) or is refused
        try:
            parse_strategy_bytes(data[:end], "cut.ckpt")
        except StrategyFormatError as exc:
            assert "cut.ckpt" in str(exc)


LAYOUT_JSON = {"dev_matrix": [2, 4], "tensor_map": [1, -1], "field": 0, "opt_weight_shard_step": 0,
               "opt_weight_shard_size": 0}


def _json_strategy(layout: object = None, **top: object) -> bytes:
    document = {"current_stage": 0, "parallel_strategy_item": {"op": {"stage": 0, "parallel_strategy": [[2, 1]]}},
                "parallel_layout_item": {"layer.w": LAYOUT_JSON if layout is None else layout}}
    document.update(top)
    return json.dumps(document).encode()


def _without(key: str) -> dict[str, object]:
    return {k: v for k, v in LAYOUT_JSON.items() if k != key}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"{not json", "bad.json: not a JSON strategy file"),
        (b"\xff\xfe", "bad.json: not a JSON strategy file"),
        (b"[1, 2]", "bad.json: expected a JSON object"),
        (_json_strategy(current_stage="0"), "bad.json: current_stage: expected an integer"),
        (_json_strategy(current_stage=-1), r"bad.json: current_stage: -1 is outside"),
        (_json_strategy(parallel_layout_item=[]), "bad.json: parallel_layout_item: expected an object"),
        (_json_strategy(parallel_strategy_item={"op": {"parallel_strategy": []}}), "node 'op': missing key 'stage'"),
        (_json_strategy(parallel_strategy_item={"op": {"stage": 0, "parallel_strategy": 2}}), "node 'op': parallel_s"),
        (_json_strategy(parallel_strategy_item={"op": {"stage": 0, "parallel_strategy": [2]}}), "node 'op'"),
        (_json_strategy([1]), "parameter 'layer.w': expected an object"),
        (_json_strategy(_without("dev_matrix")), "parameter 'layer.w': missing key 'dev_matrix'"),
        (_json_strategy(_without("tensor_map")), "parameter 'layer.w': missing key 'tensor_map'"),
        (_json_strategy(_without("opt_weight_shard_size")), "'layer.w': missing key 'opt_weight_shard_size'"),
        (_json_strategy({**LAYOUT_JSON, "dev_matrix": ["2", 4]}), "'layer.w': dev_matrix: expected an integer"),
        (_json_strategy({**LAYOUT_JSON, "dev_matrix": 8}), "'layer.w': dev_matrix: expected a list"),
        (_json_strategy({**LAYOUT_JSON, "tensor_map": [1.0, -1]}), "'layer.w': tensor_map: expected an integer"),
        (_json_strategy({**LAYOUT_JSON, "field": True}), "'layer.w': field: expected an integer"),
        (_json_strategy({**LAYOUT_JSON, "field": 2**31}), "'layer.w': field: 2147483648 is outside"),
        (_json_strategy({**LAYOUT_JSON, "dev_matrix": [-2, 4]}), "'layer.w': dev_matrix: -2 is outside"),
        (_json_strategy({**LAYOUT_JSON, "tensor_type": 3}), "'layer.w': tensor_type: expected a string"),
        (_json_strategy({**LAYOUT_JSON, "tensor_shape": "8,8"}), "'layer.w': tensor_shape: expected a list"),
        (_json_strategy({**LAYOUT_JSON, "tensor_map": [2, -1]}), "'layer.w': tensor_map names device axis 2"),
    ],
)
def test_bad_json(data: bytes, message: str) -> None:
    with pytest.raises(StrategyFormatError, match=message):
        parse_strategy_bytes(data, "bad.json")


def test_json_forms_mindspore_writes_are_read() -> None:
    extras = {**LAYOUT_JSON, "tensor_shape": [8, 8], "tensor_type": "Float32", "future_key": {"x": 1},
              "param_split_shape": [4, 4], "indices_offset": [0, 4]}
    strategy = parse_strategy_bytes(_json_strategy(extras, future_top=1), "ok.json")
    layout = strategy.layout_items[0]
    assert (layout.tensor_shape, layout.tensor_type) == ((8, 8), "Float32")
    assert (layout.param_split_shape, layout.indices_offset, layout.tensor_map) == (((4, 4),), ((0, 4),), ((1, -1),))
    nested = parse_strategy_bytes(_json_strategy({**LAYOUT_JSON, "tensor_map": [[1, 0], -1]}), "n.json")
    assert nested.layout_items[0].tensor_map == ((1, 0), (-1,))  # Layout-API style: a bare axis is a one-axis list
    bare = parse_strategy_bytes(json.dumps({"parallel_strategy_item": {"op": {"stage": 1}}}).encode(), "bare.json")
    assert bare == Strategy(current_stage=0, strategy_items=(StrategyItem("op", 1, ()),))  # MindSpore reads no more


def test_missing_unreadable_and_unwritable(tmp_path: Path) -> None:
    with pytest.raises(SourceMissingError, match="absent.ckpt: strategy file not found"):
        load_strategy(tmp_path / "absent.ckpt")
    with pytest.raises(StrategyFormatError, match="cannot read"):
        load_strategy(tmp_path)
    (tmp_path / "blocker").write_bytes(b"a file where a folder should be")
    with pytest.raises(DestinationError, match="blocker/s.ckpt: cannot create a file here"):
        save_strategy(Strategy(0), tmp_path / "blocker" / "s.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["blocker"]


def test_writing_refuses_what_cannot_be_read_back() -> None:
    twice = Strategy(0, (), (_layout("w"), _layout("w")), path="two.ckpt")
    assert parse_strategy_bytes(strategy_to_bytes(twice, PROTOBUF), "two.ckpt") == twice
    with pytest.raises(StrategyFormatError, match="two.ckpt: JSON cannot hold parameter 'w' twice"):
        strategy_to_bytes(twice, JSON)
    with pytest.raises(StrategyFormatError, match="parameter 'w': opt_weight_shard_size: 2147483648 is outside"):
        strategy_to_bytes(Strategy(0, (), (_layout(opt_weight_shard_size=2**31),)), PROTOBUF)
    with pytest.raises(StrategyFormatError, match="parameter 'w': no tensor_map"):
        strategy_to_bytes(Strategy(0, (), (_layout(tensor_map=()),)), JSON)
    with pytest.raises(StrategyFormatError, match="unknown strategy format 'yaml'"):
        strategy_to_bytes(Strategy(0), "yaml")


# --- random strategies --------------------------------------------------------------------------

U32 = st.integers(0, 2**32 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
I64 = st.integers(-(2**63), 2**63 - 1)


@st.composite
def layout_items(draw: st.DrawFn, name: str) -> LayoutItem:
    dev_matrix = tuple(draw(st.lists(st.integers(1, 2**32 - 1), max_size=4)))
    axis = st.integers(-1, len(dev_matrix) - 1)
    if draw(st.booleans()):
        tensor_map = (tuple(draw(st.lists(axis, max_size=4))),)
    else:
        tensor_map = tuple(tuple(m) for m in draw(st.lists(st.lists(axis, max_size=3), min_size=2, max_size=4)))
    messages = st.lists(st.lists(I64, max_size=3).map(tuple), max_size=3).map(tuple)
    return LayoutItem(
        name=name,
        dev_matrix=dev_matrix,
        tensor_map=tensor_map,
        param_split_shape=draw(messages),
        indices_offset=draw(messages),
        field=draw(I32),
        opt_weight_shard_step=draw(I32),
        opt_weight_shard_size=draw(I32),
        tensor_shape=draw(st.none() | st.lists(I64, max_size=4).map(tuple)),
        tensor_type=draw(st.none() | st.text(max_size=8)),
    )


@st.composite
def strategies(draw: st.DrawFn) -> Strategy:
    names = draw(st.lists(st.text(max_size=10), unique=True, max_size=5))
    nodes = draw(st.lists(st.text(max_size=10), unique=True, max_size=3))
    return Strategy(
        current_stage=draw(U32),
        strategy_items=tuple(
            StrategyItem(node, draw(U32), tuple(map(tuple, draw(st.lists(st.lists(U32, max_size=3), max_size=3)))))
            for node in nodes
        ),
        layout_items=tuple(draw(layout_items(name)) for name in names),
    )


@settings(max_examples=150, deadline=None)
@given(strategies())
def test_random_strategies_round_trip(strategy: Strategy) -> None:
    assert parse_strategy_bytes(strategy_to_bytes(strategy, JSON), "r.json") == strategy
    protobuf_only = replace(
        strategy, layout_items=tuple(replace(x, tensor_shape=None, tensor_type=None) for x in strategy.layout_items)
    )
    data = strategy_to_bytes(strategy, PROTOBUF)
    assert parse_strategy_bytes(data, "r.ckpt") == protobuf_only
    assert strategy_to_bytes(protobuf_only, PROTOBUF) == data


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=120), st.sampled_from(["f.ckpt", "f.json"]))
def test_arbitrary_bytes_parse_or_raise_strategy_format_error(data: bytes, name: str) -> None:
    try:
        parse_strategy_bytes(data, name)
    except StrategyFormatError as exc:
        assert name in str(exc)
