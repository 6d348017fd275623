"""Strategy files against MindSpore itself, run in subprocesses (its protobuf files share our names).

One MindSpore run (module fixture) merges the MindSpore-made pipeline case's per-stage files (protobuf, and JSON made by
us), dumps its schema descriptors, and reads every fixture file plus our JSON copies with its own
readers; the tests compare that with mpickpt's results.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fixture_cases import Case, strategy_files
from mindspore_helpers import requires_mindspore, run_mindspore

from mpickpt._proto import checkpoint_pb2, node_strategy_pb2
from mpickpt.strategy import (
    LayoutItem,
    Strategy,
    StrategyItem,
    load_strategy,
    merge_pipeline_strategys,
    save_strategy,
)


pytestmark = [pytest.mark.mindspore, requires_mindspore]

MINDSPORE_SCRIPT = r"""
import json
from mindspore.parallel import build_searched_strategy, merge_pipeline_strategys
from mindspore.parallel import _parallel_serialization as serialization
from mindspore.train import checkpoint_pb2, node_strategy_pb2

with open("job.json", encoding="utf-8") as f:
    job = json.load(f)
for module in (checkpoint_pb2, node_strategy_pb2):
    with open(module.DESCRIPTOR.name + ".desc", "wb") as f:
        f.write(module.DESCRIPTOR.serialized_pb)
for src, dst in job["merge"]:
    merge_pipeline_strategys(src, dst)

def messages(repeated):
    return [list(m.dim) for m in repeated]

read = {}
for path in job["read"]:
    layouts = build_searched_strategy(path)
    read[path] = {
        "layouts": [
            [name, {"dev_matrix": messages(l.dev_matrix), "tensor_map": messages(l.tensor_map),
                    "param_split_shape": messages(l.param_split_shape), "indices_offset": messages(l.indices_offset),
                    "field": l.field, "opt_weight_shard_step": l.opt_weight_shard_step,
                    "opt_weight_shard_size": l.opt_weight_shard_size}]
            for name, l in layouts.items()
        ],
        "stage_num": serialization._extract_pipeline_stage_num(path),
        "device_num": int(serialization._get_device_num_from_strategy(path)),
        "stages": {name: sorted(v[6]) for name, v in serialization._extract_layout_map(path).items()},
    }
with open("result.json", "w", encoding="utf-8") as f:
    json.dump(read, f)
"""


def _handmade(json_flavour: bool) -> Strategy:
    """Two stages, a shared parameter, split shapes, optimizer shard; nested map only where MindSpore reads it."""
    split = () if json_flavour else ((),)
    w_map = ((1, -1),) if json_flavour else ((1, 0), (-1,))
    return Strategy(
        current_stage=1,
        strategy_items=(StrategyItem("op0", 0, ((2, 2),)), StrategyItem("op1", 1, ((4,), (1,)))),
        layout_items=(
            LayoutItem("0-emb", (2, 2), ((1, -1),), ((4, 4),), ((0, 4),), field=2, opt_weight_shard_size=-1,
                       opt_weight_shard_step=1, tensor_shape=(8, 8) if json_flavour else None),
            LayoutItem("1-emb", (2, 2), ((-1, 0),), ((),), ((),)),
            LayoutItem("0-w", (2, 2, 1), w_map, split, split, opt_weight_shard_size=2, opt_weight_shard_step=2),
            LayoutItem("1-b", (4,), ((0,),), split, split, tensor_type="Float16" if json_flavour else None),
        ),
    )


@pytest.fixture(scope="module")
def pipeline(mindspore_cases: dict[str, Case]) -> Path:
    """The MindSpore-made pipeline case's folder."""
    return mindspore_cases["pipeline_2x4_to_4"].root


@pytest.fixture(scope="module")
def mindspore_run(tmp_path_factory: pytest.TempPathFactory, mindspore_root: Path,
                  pipeline: Path) -> tuple[Path, dict[str, Any]]:
    work = tmp_path_factory.mktemp("mindspore")
    stage_files = pipeline / "src_pipeline_strategys"
    (work / "json_stages").mkdir()
    for path in stage_files.glob("*.ckpt"):
        save_strategy(load_strategy(path), work / "json_stages" / f"{path.stem}.json")
    read = [str(p) for p in strategy_files(mindspore_root)]
    for path in strategy_files(mindspore_root):
        copy = work / f"{path.parent.name}__{path.stem}.json"
        save_strategy(load_strategy(path), copy)
        read.append(str(copy))
    save_strategy(_handmade(json_flavour=False), work / "handmade.ckpt")
    save_strategy(_handmade(json_flavour=True), work / "handmade.json")
    read += [str(work / "handmade.ckpt"), str(work / "handmade.json")]
    job = {
        "merge": [
            [str(stage_files), str(work / "ms_merged.ckpt")],
            [str(work / "json_stages"), str(work / "ms_merged.json")],
        ],
        "read": read,
    }
    (work / "job.json").write_text(json.dumps(job), encoding="utf-8")
    run_mindspore(MINDSPORE_SCRIPT, work)
    return work, json.loads((work / "result.json").read_text(encoding="utf-8"))


def _items(strategy: Strategy) -> tuple[list[str], list[str]]:
    """Content as sorted lists (MindSpore's merge order depends on directory listing order)."""
    return sorted(map(repr, strategy.strategy_items)), sorted(map(repr, strategy.layout_items))


def test_schema_equals_mindspore(mindspore_run: tuple[Path, dict[str, Any]]) -> None:
    work, _ = mindspore_run
    for module in (checkpoint_pb2, node_strategy_pb2):
        assert module.DESCRIPTOR.serialized_pb == (work / f"{module.DESCRIPTOR.name}.desc").read_bytes()


def test_protobuf_merge_equals_mindspore(mindspore_run: tuple[Path, dict[str, Any]], pipeline: Path,
                                        tmp_path: Path) -> None:
    work, _ = mindspore_run
    merge_pipeline_strategys(pipeline / "src_pipeline_strategys", tmp_path / "ours.ckpt")
    ours, theirs = load_strategy(tmp_path / "ours.ckpt"), load_strategy(work / "ms_merged.ckpt")
    assert ours.current_stage == theirs.current_stage == 1
    assert _items(ours) == _items(theirs) == _items(load_strategy(pipeline / "src_strategy.ckpt"))


def test_json_merge_equals_mindspore(mindspore_run: tuple[Path, dict[str, Any]], pipeline: Path,
                                    tmp_path: Path) -> None:
    work, _ = mindspore_run
    merge_pipeline_strategys(work / "json_stages", tmp_path / "ours.json")
    ours, theirs = load_strategy(tmp_path / "ours.json"), load_strategy(work / "ms_merged.json")
    assert ours.current_stage == theirs.current_stage == 1
    assert _items(ours) == _items(theirs) == _items(load_strategy(pipeline / "src_strategy.ckpt"))


def _as_mindspore_reads(layout: LayoutItem, from_json: bool) -> dict[str, Any]:
    """Our layout as MindSpore's readers hold it (its JSON reader always adds one split-shape/offset message)."""

    def messages(values: tuple[tuple[int, ...], ...]) -> list[list[int]]:
        return [list(m) for m in values] or ([[]] if from_json else [])

    return {
        "dev_matrix": [list(layout.dev_matrix)],
        "tensor_map": [list(m) for m in layout.tensor_map],
        "param_split_shape": messages(layout.param_split_shape),
        "indices_offset": messages(layout.indices_offset),
        "field": layout.field,
        "opt_weight_shard_step": layout.opt_weight_shard_step,
        "opt_weight_shard_size": layout.opt_weight_shard_size,
    }


def test_mindspore_reads_our_files_as_we_do(mindspore_run: tuple[Path, dict[str, Any]], mindspore_root: Path) -> None:
    _, read = mindspore_run
    assert len(read) == 2 * len(strategy_files(mindspore_root)) + 2
    for path, theirs in read.items():
        ours = load_strategy(path)
        from_json = path.endswith(".json")
        assert theirs["layouts"] == [[x.name, _as_mindspore_reads(x, from_json)] for x in ours.layout_items], path
        assert theirs["stage_num"] == ours.stage_count, path
        assert theirs["device_num"] == ours.stage_device_count, path
        stages = {name: sorted(s or 0 for s, _ in entries) for name, entries in ours.layouts_by_param().items()}
        assert theirs["stages"] == stages, path


IMPORT_CHECK = """
from mindspore.train import checkpoint_pb2 as their_ckpt, node_strategy_pb2 as theirs
from mpickpt._proto import checkpoint_pb2 as our_ckpt, node_strategy_pb2 as ours
mine, other = ours.ParallelStrategyMap(current_stage=3), theirs.ParallelStrategyMap(current_stage=4)
assert theirs.ParallelStrategyMap.FromString(mine.SerializeToString()).current_stage == 3
assert ours.ParallelStrategyMap.FromString(other.SerializeToString()).current_stage == 4
value = their_ckpt.Checkpoint(value=[their_ckpt.Checkpoint.Value(tag="w")]).SerializePartialToString()
assert our_ckpt.Checkpoint.FromString(value).value[0].tag == "w"
print("both pools work")
"""


@pytest.mark.parametrize(
    "imports", ["import mpickpt.strategy\nimport mindspore\n", "import mindspore\nimport mpickpt.strategy\n"]
)
def test_mpickpt_and_mindspore_import_in_either_order(imports: str, tmp_path: Path) -> None:
    assert "both pools work" in run_mindspore(imports + IMPORT_CHECK, tmp_path)
