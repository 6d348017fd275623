"""The checked-in protobuf modules equal a fresh `tools/gen_proto.py` run and use mpickpt's private pool."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pool

from mpickpt._proto import _pool, checkpoint_pb2, node_strategy_pb2

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_modules_match_a_fresh_generation(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--out", str(tmp_path)], check=True, capture_output=True
    )
    for module in (checkpoint_pb2, node_strategy_pb2):
        name = Path(module.__file__).name
        fresh = (tmp_path / name).read_text(encoding="utf-8")
        assert fresh == Path(module.__file__).read_text(encoding="utf-8"), f"{name} is stale: python tools/gen_proto.py"


def test_modules_live_in_the_private_pool_only() -> None:
    for module in (checkpoint_pb2, node_strategy_pb2):
        assert module.DESCRIPTOR.pool is _pool.POOL
        with pytest.raises(KeyError):
            descriptor_pool.Default().FindFileByName(module.DESCRIPTOR.name)


def test_private_pool_messages_serialize_and_parse() -> None:
    strategy = node_strategy_pb2.ParallelStrategyMap(current_stage=1)
    strategy.parallel_layout_item.add(param_name="w").parallel_layouts.tensor_map.add(dim=[1, -1])
    parsed = node_strategy_pb2.ParallelStrategyMap.FromString(strategy.SerializePartialToString())
    assert list(parsed.parallel_layout_item[0].parallel_layouts.tensor_map[0].dim) == [1, -1]
    checkpoint = checkpoint_pb2.Checkpoint()
    checkpoint.value.add(tag="w").tensor.CopyFrom(
        checkpoint_pb2.TensorProto(dims=[2], tensor_type="Float32", tensor_content=b"\0" * 8)
    )
    assert checkpoint_pb2.Checkpoint.FromString(checkpoint.SerializeToString()) == checkpoint
