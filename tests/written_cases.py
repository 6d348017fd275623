"""Conversion cases written by mpickpt itself (no MindSpore needed), in the folder layout of ``Case``.

Each case is a random model (``tests/random_cases.py``): strategy files, source checkpoints cut from the
full tensors by the source layout, and ``expected/``: the full tensors split by the target layout as the
independent model ``tests/layout_reference.py`` cuts them. Tests of MPI, Slurm, the CLI and error handling
use them as data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fixture_cases import Case
from mpickpt.ckpt import save_checkpoint
from random_cases import EXTRAS, RandomCase, make_case, target_slices, write_case

PREFIX = "checkpoint_"
# name -> (seed, source devices or None for one unsharded file, target devices or None for one full file)
WRITTEN = {"random_8to4": (5, 8, 4), "random_full_to_4": (6, None, 4), "random_4_to_full": (7, 4, None),
           "random_2to8": (8, 2, 8)}


def _write_expected(case: RandomCase, root: Path) -> int:
    """The target files (the full tensors split by the target layout); returns the target count."""
    slices = target_slices(case)
    for rank, tensors in enumerate(slices):
        path = root / "expected" / f"rank_{rank}" / f"{PREFIX}{rank}.ckpt"
        path.parent.mkdir(parents=True)
        pieces = [(name, case.tensors[name][0], piece.shape, np.ascontiguousarray(piece))
                  for name, piece in tensors.items()]
        save_checkpoint(path, pieces + EXTRAS)
    return len(slices)


def write_written_case(root: Path, name: str) -> Case:
    """Write one case of ``WRITTEN`` into ``root/name``."""
    seed, src_devices, dst_devices = WRITTEN[name]
    case = make_case(seed, devices=(src_devices or 1, dst_devices or 1))
    folder = root / name
    write_case(case, folder)
    for which, devices in (("src", src_devices), ("dst", dst_devices)):
        if devices is None:  # one device holds the full tensors: drop its strategy file
            (folder / f"{which}_strategy.ckpt").unlink()
    meta = {
        "name": name,
        "prefix": PREFIX,
        "src_strategy_file": "src_strategy.ckpt" if src_devices else None,
        "dst_strategy_file": "dst_strategy.ckpt" if dst_devices else None,
        "src_pipeline_strategy_dir": None,
        "src_ranks": src_devices or 1,
        "dst_ranks": _write_expected(case, folder),
        "src_checkpoints_dir": "src",
        "expected_dir": "expected",
    }
    (folder / "case.json").write_text(json.dumps(meta, indent=1))
    return Case(folder, meta)


def write_written_cases(root: Path) -> dict[str, Case]:
    """Every case of ``WRITTEN``, by name."""
    return {name: write_written_case(root, name) for name in WRITTEN}
