"""Conversion cases (folders with case.json, sources, strategies, expected outputs) and content comparison.

MindSpore-made cases are generated once per session (``tests/mindspore_cases.py``, fixture
``mindspore_cases``); cases written by mpickpt itself come from ``tests/written_cases.py`` (fixture
``written_cases``). Tests parametrized with ``case_params`` get the MindSpore-made case as ``case``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

CASE_NAMES = ("8_to_full", "dp_to_tp_8to4", "full_to_8", "pipeline_2x4_to_4", "seed_8to4")
case_params = pytest.mark.parametrize("case", CASE_NAMES, indirect=True)


@dataclass(frozen=True)
class Case:
    """One case folder with its case.json."""

    root: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def src_dir(self) -> Path:
        return self.root / self.meta["src_checkpoints_dir"]

    @property
    def expected_dir(self) -> Path:
        return self.root / self.meta["expected_dir"]

    @property
    def prefix(self) -> str:
        return self.meta["prefix"]

    def strategy(self, which: str) -> str | None:
        name = self.meta[f"{which}_strategy_file"]
        return None if name is None else str(self.root / name)

    def expected_files(self) -> dict[int, Path]:
        return {
            int(d.name.split("_")[1]): next(d.glob("*.ckpt"))
            for d in self.expected_dir.iterdir()
            if d.is_dir() and d.name.startswith("rank_")
        }


def strategy_files(root: Path) -> list[Path]:
    """Every strategy file of the cases under ``root`` (per-stage pipeline files too)."""
    return sorted(root.glob("*/*strategy*.ckpt")) + sorted(root.glob("*/src_pipeline_strategys/*.ckpt"))


def checkpoint_content(path: str | os.PathLike[str]) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, dims, content bytes) of every parameter, in file order (any format, or a unified folder)."""
    from mpickpt.formats import open_index

    with open_index(path) as index:
        return [
            (e.name, e.dtype, tuple(e.dims), b"".join(bytes(v) for v in index.raw(e.name)))
            for e in index.entries.values()
        ]


def tensor_content(path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, dims, content bytes) of a checkpoint file of any format, or a unified folder."""
    return {name: (dtype, dims, data) for name, dtype, dims, data in checkpoint_content(path)}


def assert_same_content(ours: str | os.PathLike[str], theirs: str | os.PathLike[str]) -> None:
    """Same parameters with the same dtypes, dims and tensor bytes (order may differ)."""
    mine = {name: rest for name, *rest in checkpoint_content(ours)}
    expected = {name: rest for name, *rest in checkpoint_content(theirs)}
    assert sorted(mine) == sorted(expected), f"{ours}: parameter names differ from {theirs}"
    for name, (dtype, dims, data) in expected.items():
        got_dtype, got_dims, got_data = mine[name]
        assert (got_dtype, got_dims) == (dtype, dims), f"{ours}: {name} is {got_dtype}{list(got_dims)}, expected {dtype}{list(dims)}"
        assert got_data == data, f"{ours}: {name} tensor bytes differ from {theirs}"
