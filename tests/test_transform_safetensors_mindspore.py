"""Distributed safetensors made by MindSpore, converted to another strategy as safetensors and as ckpt,
equal MindSpore's own conversion (MindSpore in its own numpy<2 interpreter, in a subprocess).

MindSpore 2.10's safetensors output is wrong for slices that are not contiguous in the full tensor when
every source rank holds the whole tensor (its ckpt output of the same conversion is right), so every
output of ours is compared with MindSpore's ckpt output, and with its safetensors output wherever that
agrees with its own ckpt output; where it does not, ours must equal the ckpt output (checked above)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixture_cases import Case, tensor_content
from mindspore_helpers import requires_mindspore, run_mindspore
from mpickpt.transform import TransformJob, TransformOptions

pytestmark = [requires_mindspore, pytest.mark.mindspore]

_MS_SCRIPT = """
import json, sys
import mindspore as ms
job = json.loads(sys.argv[1])
ms.ckpt_to_safetensors(job["src"], job["st_src"])
for fmt in ("safetensors", "ckpt"):
    ms.transform_checkpoints(job["st_src"], job["out"] + "_" + fmt, job["prefix"], job["src_strategy"],
                             job["dst_strategy"], output_format=fmt)
"""


@pytest.mark.parametrize("name", ["seed_8to4", "dp_to_tp_8to4"])
def test_mindspore_safetensors_sources_convert_as_mindspore_converts_them(
        name: str, mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    case = mindspore_cases[name]
    job = {"src": str(case.src_dir), "st_src": str(tmp_path / "st_src"), "out": str(tmp_path / "ms"),
           "prefix": case.prefix, "src_strategy": case.strategy("src"), "dst_strategy": case.strategy("dst")}
    run_mindspore(_MS_SCRIPT, tmp_path, [json.dumps(job)])
    right = {p.parent.name: tensor_content(p) for p in (tmp_path / "ms_ckpt").glob("rank_*/*.ckpt")}
    for fmt in ("safetensors", "ckpt"):
        ours = tmp_path / f"ours_{fmt}"
        plan = TransformJob.prepare(TransformOptions(job["st_src"], str(ours), case.prefix, job["src_strategy"],
                                                     job["dst_strategy"], output_format=fmt))
        for task in plan.tasks:
            plan.run_task(task, sync=False)
        theirs = sorted((tmp_path / f"ms_{fmt}").glob("rank_*/*"))
        assert [p.relative_to(tmp_path / f"ms_{fmt}") for p in theirs] == \
            [p.relative_to(ours) for p in sorted(ours.glob("rank_*/*")) if not p.name.endswith(".done.json")]
        for path in theirs:
            mine, mindspore = tensor_content(ours / path.relative_to(tmp_path / f"ms_{fmt}")), tensor_content(path)
            assert mine == right[path.parent.name], path
            agreeing = {n for n in mindspore if mindspore[n] == right[path.parent.name][n]}
            assert {n: mine[n] for n in agreeing} == {n: mindspore[n] for n in agreeing}
            if fmt == "ckpt" or name == "seed_8to4":
                assert agreeing == set(mindspore), f"{path}: MindSpore's outputs disagree"
