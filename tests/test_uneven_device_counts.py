"""Device counts that do not divide each other (MindSpore refuses them): checked against the full tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import mpickpt
from fixture_cases import checkpoint_content
from random_cases import make_case, target_slices, write_case


@pytest.mark.parametrize("devices", [(8, 6), (6, 4), (3, 5), (4, 6)])
@pytest.mark.parametrize("seed", range(3))
def test_conversion_equals_full_tensor_split_by_target(devices: tuple[int, int], seed: int, tmp_path: Path) -> None:
    case = make_case(seed, params=5, devices=devices, any_axis_order=True)
    write_case(case, tmp_path)
    mpickpt.transform_checkpoints(str(tmp_path / "src"), str(tmp_path / "out"), "checkpoint_",
                                  str(tmp_path / "src_strategy.ckpt"), str(tmp_path / "dst_strategy.ckpt"))
    expected = target_slices(case)
    assert len(list((tmp_path / "out").glob("rank_*"))) == devices[1] == len(expected)
    for target, slices in enumerate(expected):
        content = {n: (dims, data) for n, _, dims, data in checkpoint_content(tmp_path / "out" / f"rank_{target}" / f"checkpoint_{target}.ckpt")}
        for name, array in slices.items():
            dims, data = content[name]
            assert dims == array.shape and data == np.ascontiguousarray(array).tobytes(), (target, name)
        assert set(content) == set(slices) | {"global_step", "learning_rate"}
