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
