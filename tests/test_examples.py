"""The shipped example converts, and converting there and back gives the sources byte for byte."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

import mpickpt

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama"


@pytest.mark.parametrize("target", ["4", "6", "16"])
def test_round_trip_reproduces_the_sources(target: str, tmp_path: Path) -> None:
    there, back = tmp_path / "there", tmp_path / "back"
    src_strategy = str(EXAMPLE / "src_strategy.ckpt")
    dst_strategy = str(EXAMPLE / f"dst_strategy_{target}.ckpt")
    mpickpt.transform_checkpoints(str(EXAMPLE / "src"), str(there), "checkpoint_", src_strategy, dst_strategy)
    assert len(list(there.glob("rank_*/*.ckpt"))) == int(target)
    mpickpt.transform_checkpoints(str(there), str(back), "checkpoint_", dst_strategy, src_strategy)
    for original in sorted((EXAMPLE / "src").glob("rank_*/*.ckpt")):
        assert filecmp.cmp(original, back / original.relative_to(EXAMPLE / "src"), shallow=False), original
