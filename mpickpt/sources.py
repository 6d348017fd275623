"""Where source checkpoints are, and where outputs may not go."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import SourceMissingError

_RANK_DIR = re.compile(r"rank_(\d+)")


def find_rank_files(src_dir: str | os.PathLike[str], suffix: str = ".ckpt") -> dict[int, str]:
    """Map source rank -> its checkpoint file: `src_dir/rank_<r>/`, the last `*.ckpt` in lexicographic
    order when a folder holds several (as MindSpore does)."""
    root = Path(src_dir)
    if not root.is_dir():
        raise SourceMissingError(f"source checkpoint folder {root} is not a directory")
    files: dict[int, str] = {}
    for folder in root.iterdir():
        match = _RANK_DIR.fullmatch(folder.name)
        if not match or not folder.is_dir():
            continue
        candidates = sorted(str(p) for p in folder.glob(f"*{suffix}") if p.is_file())
        if candidates:
            files[int(match.group(1))] = candidates[-1]
    if not files:
        raise SourceMissingError(f"{root} holds no rank_<r>/*{suffix} checkpoint files")
    return dict(sorted(files.items()))
