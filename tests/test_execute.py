"""The executor's choice of copy route, and its byte arithmetic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mpickpt.ckpt import save_checkpoint
from mpickpt.execute import SourceFiles, _contiguous_run, write_target
from mpickpt.layout import Box
from mpickpt.plan import Copy, ParamPlan, TargetPlan
from fixture_cases import checkpoint_content


@pytest.mark.parametrize(
    ("box", "dims", "run"),
    [
        (Box((0, 0), (4, 8)), (4, 8), (0, 128)),  # whole array
        (Box((2, 0), (4, 8)), (4, 8), (64, 64)),  # whole rows
        (Box((1, 2), (2, 6)), (4, 8), (40, 16)),  # part of one row
        (Box((0, 2), (2, 6)), (4, 8), None),  # a column block: strided
        (Box((1, 0, 0), (2, 2, 3)), (3, 2, 3), (24, 24)),
        (Box((), ()), (), (0, 4)),  # 0-d
    ],
)
def test_contiguous_run(box: Box, dims: tuple[int, ...], run: tuple[int, int] | None) -> None:
    assert _contiguous_run(box, dims, 4) == run


def _source(tmp_path: Path, rank: int, array: np.ndarray) -> str:
    path = tmp_path / f"src{rank}.ckpt"
    save_checkpoint(path, [("w", "Float32", array.shape, array)])
    return str(path)


@pytest.mark.parametrize("split", ["rows", "columns"])
def test_every_route_writes_the_same_bytes(tmp_path: Path, split: str) -> None:
    full = np.arange(8 * 6, dtype=np.float32).reshape(8, 6)
    if split == "rows":  # contiguous runs: file-to-file segments
        halves = [full[:4], full[4:]]
        copies = (Copy(1, Box((0, 0), (4, 6)), Box((4, 0), (8, 6))), Copy(0, Box((0, 0), (4, 6)), Box((0, 0), (4, 6))))
    else:  # strided: assembled in memory
        halves = [np.ascontiguousarray(full[:, :3]), np.ascontiguousarray(full[:, 3:])]
        copies = (Copy(0, Box((0, 0), (8, 3)), Box((0, 0), (8, 3))), Copy(1, Box((0, 0), (8, 3)), Box((0, 3), (8, 6))))
    files = {r: _source(tmp_path, r, h) for r, h in enumerate(halves)}
    plan = TargetPlan(0, (ParamPlan("w", "Float32", (8, 6), copies, True),), (1, 0))
    with SourceFiles(files) as sources:
        write_target(plan, sources, tmp_path / "out.ckpt", sync=False)
    [(name, dtype, dims, data)] = checkpoint_content(tmp_path / "out.ckpt")
    assert (name, dtype, dims, data) == ("w", "Float32", (8, 6), full.tobytes())
