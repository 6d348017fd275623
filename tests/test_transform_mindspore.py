"""Random cases converted by MindSpore's transform_checkpoints and by mpickpt give the same files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import mpickpt
from fixture_cases import assert_same_content, checkpoint_content
from mindspore_helpers import requires_mindspore, run_mindspore
from random_cases import make_case, target_slices, write_case

CASES = int(os.environ.get("MPICKPT_MS_CASES", "20"))

_MS_SCRIPT = """
import json, sys
import mindspore as ms
cases = json.loads(sys.argv[1]) if len(sys.argv) > 1 else json.load(open("cases.json"))
ranks = {}
for root in cases:
    ms.transform_checkpoints(root + "/src", root + "/ms", "checkpoint_",
                             root + "/src_strategy.ckpt", root + "/dst_strategy.ckpt")
    n = len([d for d in __import__("os").listdir(root + "/ms")])
    ranks[root] = [[int(r) for r in ms.rank_list_for_transform(t, root + "/src_strategy.ckpt", root + "/dst_strategy.ckpt")]
                   for t in range(n)]
json.dump(ranks, open("ranks.json", "w"))
"""


@requires_mindspore
@pytest.mark.mindspore
def test_random_cases_match_mindspore(tmp_path: Path) -> None:
    roots = []
    cases = {}
    for seed in range(CASES):
        root = tmp_path / f"case{seed}"
        case = make_case(seed)
        write_case(case, root)
        cases[str(root)] = case
        roots.append(str(root))
    (tmp_path / "cases.json").write_text(json.dumps(roots))
    run_mindspore(_MS_SCRIPT, tmp_path)
    ms_ranks = json.loads((tmp_path / "ranks.json").read_text())
    for root, case in cases.items():
        r = Path(root)
        mpickpt.transform_checkpoints(str(r / "src"), str(r / "ours"), "checkpoint_",
                                      str(r / "src_strategy.ckpt"), str(r / "dst_strategy.ckpt"))
        theirs = sorted((r / "ms").glob("rank_*/*.ckpt"))
        assert [p.relative_to(r / "ms") for p in theirs] == sorted(p.relative_to(r / "ours") for p in (r / "ours").glob("rank_*/*.ckpt"))
        for path in theirs:
            assert_same_content(r / "ours" / path.relative_to(r / "ms"), path)
        for target, ms_list in enumerate(ms_ranks[root]):
            ours = mpickpt.rank_list_for_transform(target, str(r / "src_strategy.ckpt"), str(r / "dst_strategy.ckpt"))
            assert set(ours) <= set(ms_list), f"{root} target {target}: ours {ours}, MindSpore {ms_list}"
        # Both agree with the ground truth: the full tensors split by the target layout.
        for target, expected in enumerate(target_slices(case)):
            content = {n: d for n, _, _, d in checkpoint_content(r / "ours" / f"rank_{target}" / f"checkpoint_{target}.ckpt")}
            for name, array in expected.items():
                assert content[name] == np.ascontiguousarray(array).tobytes(), f"{root} target {target} {name}"
