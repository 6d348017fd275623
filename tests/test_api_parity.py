"""The Python API called as MindSpore 2.10's functions are called: same files read, same results, or a
typed error where MindSpore refuses; each case is also run through MindSpore itself when it is installed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mpickpt
from mindspore_helpers import requires_mindspore, run_mindspore
from mpickpt.ckpt import save_checkpoint
from mpickpt.convert import ckpt_to_safetensors
from mpickpt.errors import MpickptError, SourceMissingError
from mpickpt.sources import find_rank_files
from random_cases import make_case, write_case


def _segmented_folder(folder: Path) -> Path:
    """A rank folder as users leave it: the checkpoint, a safetensors file beside it holding other values
    (an earlier conversion), and a hidden `.ckpt` (a copy's leftover) that MindSpore's glob skips."""
    folder.mkdir(parents=True)
    save_checkpoint(folder / "a.ckpt", [("w", "Float32", (4,), np.arange(4, dtype=np.float32)),
                                        ("step", "Int32", (1,), np.array([3], np.int32)),
                                        ("tag", "str", (0,), np.array("abc").tobytes())])
    other = folder.parent / "other"
    other.mkdir()
    save_checkpoint(other / "b.ckpt", [("w", "Float32", (4,), np.full(4, 7, np.float32)),
                                       ("x", "Float32", (2,), np.zeros(2, np.float32))])
    ckpt_to_safetensors(str(other / "b.ckpt"), str(folder))
    save_checkpoint(folder / ".hidden.ckpt", [("w", "Float32", (4,), np.full(4, 9, np.float32)),
                                              ("h", "Float32", (2,), np.zeros(2, np.float32))])
    return folder


def _plain(values: dict[str, object]) -> dict[str, object]:
    """Names -> lists (or the str) for comparing with MindSpore's printout."""
    return {name: v if isinstance(v, str) else np.asarray(v).tolist() for name, v in values.items()}


def test_load_segmented_checkpoints_reads_the_ckpt_files_mindspore_reads(tmp_path: Path) -> None:
    folder = _segmented_folder(tmp_path / "rank_0")
    loaded = mpickpt.load_segmented_checkpoints(str(folder))
    assert _plain(loaded) == {"w": [0.0, 1.0, 2.0, 3.0], "step": [3], "tag": "abc"}
    assert isinstance(loaded["tag"], str)


def test_load_segmented_checkpoints_reads_safetensors_of_a_folder_without_ckpt(tmp_path: Path) -> None:
    folder = _segmented_folder(tmp_path / "rank_0")
    (folder / "a.ckpt").unlink()
    assert _plain(mpickpt.load_segmented_checkpoints(str(folder))) == {"w": [7.0] * 4, "x": [0.0, 0.0]}


_MS_SEGMENTED = """
import json, sys
import mindspore as ms
loaded = ms.parallel.load_segmented_checkpoints(sys.argv[1])
print(json.dumps({n: v if isinstance(v, str) else v.asnumpy().tolist() for n, v in loaded.items()}))
"""


@requires_mindspore
@pytest.mark.mindspore
def test_load_segmented_checkpoints_matches_mindspore(tmp_path: Path) -> None:
    folder = _segmented_folder(tmp_path / "rank_0")
    theirs = json.loads(run_mindspore(_MS_SEGMENTED, tmp_path, [str(folder)]).strip().splitlines()[-1])
    assert _plain(mpickpt.load_segmented_checkpoints(str(folder))) == theirs


def _case(root: Path) -> Path:
    """A 4-device checkpoint (src/rank_<r>/checkpoint_<r>.ckpt) and both strategies (4 -> 2 devices)."""
    write_case(make_case(3, devices=(4, 2)), root)
    return root


def _transform(root: Path, output_format: str = "ckpt") -> None:
    mpickpt.transform_checkpoints(str(root / "src"), str(root / "dst"), "checkpoint_", str(root / "src_strategy.ckpt"),
                                  str(root / "dst_strategy.ckpt"), output_format=output_format)


_MS_TRANSFORM = """
import sys
import mindspore as ms
root = sys.argv[1]
try:
    ms.transform_checkpoints(root + "/src", root + "/ms", "checkpoint_", root + "/src_strategy.ckpt",
                             root + "/dst_strategy.ckpt", output_format=sys.argv[2])
    print("converted")
except ValueError as error:
    print("ValueError:", error)
"""


def _mindspore_transform(root: Path, output_format: str = "ckpt") -> str:
    return run_mindspore(_MS_TRANSFORM, root, [str(root), output_format]).strip().splitlines()[-1]


def _hide_rank_file(root: Path) -> None:
    """Rank 3's only checkpoint is hidden (`.checkpoint_3.ckpt`): MindSpore's glob does not list it."""
    rank_file = root / "src" / "rank_3" / "checkpoint_3.ckpt"
    rank_file.rename(rank_file.with_name(".checkpoint_3.ckpt"))


def test_a_hidden_file_is_not_a_rank_checkpoint(tmp_path: Path) -> None:
    root = _case(tmp_path / "case")
    _hide_rank_file(root)
    with pytest.raises(SourceMissingError, match=r"checkpoint files of ranks \[3\] are missing"):
        _transform(root)
    assert not (root / "dst").exists() or not list((root / "dst").rglob("*.ckpt"))


def _mix_formats(root: Path) -> None:
    """Ranks 2 and 3 as safetensors, ranks 0 and 1 as .ckpt."""
    for rank in (2, 3):
        rank_file = root / "src" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        ckpt_to_safetensors(str(rank_file), str(rank_file.parent))
        rank_file.unlink()


@pytest.mark.parametrize("output_format", ["ckpt", "safetensors"])
def test_rank_folders_of_both_formats_are_refused(tmp_path: Path, output_format: str) -> None:
    root = _case(tmp_path / "case")
    _mix_formats(root)
    with pytest.raises(MpickptError, match=r"rank folders hold checkpoints of both formats, .*rank_0 \(ckpt\) and "
                                           r".*rank_2 \(safetensors\); choose one"):
        _transform(root, output_format)
    assert not (root / "dst").exists() or not list((root / "dst").rglob("rank_*/*"))
    assert sorted(find_rank_files(root / "src", "ckpt")) == [0, 1]


@requires_mindspore
@pytest.mark.mindspore
def test_mindspore_refuses_a_hidden_rank_file_and_mixed_formats_too(tmp_path: Path) -> None:
    hidden = _case(tmp_path / "hidden")
    _hide_rank_file(hidden)
    assert _mindspore_transform(hidden).startswith("ValueError: The checkpoint file of rank3 is needed")
    mixed = _case(tmp_path / "mixed")
    _mix_formats(mixed)
    for output_format in ("ckpt", "safetensors"):
        assert _mindspore_transform(mixed, output_format).startswith(
            "ValueError: For 'transform_checkpoints', the 'src_checkpoints_dir' cannot contain both ckpt file and "
            "safetensors file simultaneously")


@pytest.mark.parametrize("output_format", ["h5", "SafeTensors", "ckpt "])
def test_transform_checkpoints_refuses_an_output_format_mindspore_does_not_write(tmp_path: Path,
                                                                                  output_format: str) -> None:
    """MindSpore writes .ckpt for any other value from .ckpt sources and refuses it from safetensors
    sources; "h5" wrote rank_y/checkpoint_y.h5, files MindSpore never makes."""
    root = _case(tmp_path / "case")
    with pytest.raises(ValueError, match=rf"output_format must be 'safetensors' or 'ckpt', got '{output_format}'"):
        _transform(root, output_format)
    assert not (root / "dst").exists()


_MS_MERGED = """
import json, sys
import mindspore as ms
folder, ours_json, ours_ckpt, theirs_json, dst = sys.argv[1:]
ms.parallel.merge_pipeline_strategys(folder, theirs_json)
def lists(strategy):
    try:
        return [[int(r) for r in ms.parallel.rank_list_for_transform(t, strategy, dst)] for t in range(4)]
    except Exception as error:
        return type(error).__name__
print(json.dumps({name: lists(path) for name, path in
                  (("ours_json", ours_json), ("ours_ckpt", ours_ckpt), ("theirs_json", theirs_json))}))
"""


@requires_mindspore
@pytest.mark.mindspore
def test_mindspore_loads_a_merge_into_a_json_name(mindspore_cases: dict, tmp_path: Path) -> None:
    """Per-stage .ckpt files merged into merged.json: ours is JSON, which MindSpore loads (by the name's
    suffix) like the .ckpt merge; MindSpore's own is protobuf under a .json name, which it cannot load."""
    case = mindspore_cases["pipeline_2x4_to_4"].root
    stage_files = case / "src_pipeline_strategys"
    mpickpt.merge_pipeline_strategys(str(stage_files), str(tmp_path / "ours.json"))
    mpickpt.merge_pipeline_strategys(str(stage_files), str(tmp_path / "ours.ckpt"))
    args = [str(stage_files), *(str(tmp_path / n) for n in ("ours.json", "ours.ckpt", "theirs.json")),
            str(case / "dst_strategy.ckpt")]
    loaded = json.loads(run_mindspore(_MS_MERGED, tmp_path, args).strip().splitlines()[-1])
    assert isinstance(loaded["ours_json"], list) and loaded["ours_json"] == loaded["ours_ckpt"]
    assert loaded["theirs_json"] in ("JSONDecodeError", "UnicodeDecodeError")  # protobuf bytes read as JSON
    assert json.loads((tmp_path / "ours.json").read_text())["current_stage"] == 1


@pytest.mark.parametrize("prefix", ["", "  ", "ckpt~"])
def test_a_prefix_mindspore_finds_unsafe_is_refused_for_ckpt_sources(tmp_path: Path, prefix: str) -> None:
    """A blank prefix wrote rank_0/0.ckpt where MindSpore refuses the call (its path-safety check)."""
    root = _case(tmp_path / "case")
    with pytest.raises(ValueError, match=r"ckpt_prefix .* is not safe \(blank or holding '~'\)"):
        mpickpt.transform_checkpoints(str(root / "src"), str(root / "dst"), prefix, str(root / "src_strategy.ckpt"),
                                      str(root / "dst_strategy.ckpt"))
    assert not (root / "dst").exists() or not list((root / "dst").rglob("*.ckpt"))


def test_a_blank_prefix_is_taken_for_safetensors_sources_as_mindspore(tmp_path: Path) -> None:
    root = _case(tmp_path / "case")
    ckpt_to_safetensors(str(root / "src"), str(root / "st"))
    mpickpt.transform_checkpoints(str(root / "st"), str(root / "dst"), "", str(root / "src_strategy.ckpt"),
                                  str(root / "dst_strategy.ckpt"), output_format="safetensors")
    assert sorted(str(p.relative_to(root / "dst")) for p in (root / "dst").rglob("*.safetensors")) == [
        "rank_0/0.safetensors", "rank_1/1.safetensors"]


_MS_PREFIXES = """
import sys
import mindspore as ms
root = sys.argv[1]
for prefix in ("", "  ", "ckpt~"):
    try:
        ms.transform_checkpoints(root + "/src", root + "/ms", prefix, root + "/src_strategy.ckpt",
                                 root + "/dst_strategy.ckpt")
        print("converted")
    except ValueError as error:
        print("ValueError:", error)
"""


@requires_mindspore
@pytest.mark.mindspore
def test_mindspore_refuses_those_prefixes_for_ckpt_sources(tmp_path: Path) -> None:
    root = _case(tmp_path / "case")
    lines = run_mindspore(_MS_PREFIXES, root, [str(root)]).strip().splitlines()[-3:]
    assert lines == ["ValueError: ckpt_prefix contains '^s*$' is not safe, please use a safe one."] * 2 + [
        "ValueError: ckpt_prefix contains '~' is not safe, please use a safe one."], lines
