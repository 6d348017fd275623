"""The conversion cases MindSpore made (../shared/fixtures), and content comparison of checkpoints."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

FIXTURES = Path(os.environ.get("MPICKPT_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
PIPELINE = FIXTURES / "pipeline_2x4_to_4"
STAGE_FILES = PIPELINE / "src_pipeline_strategys"  # per-rank strategy files of the two pipeline stages
STRATEGY_FILES = sorted(FIXTURES.glob("*/*strategy*.ckpt")) + sorted(STAGE_FILES.glob("*.ckpt"))


@dataclass(frozen=True)
class Case:
    """One fixture folder with its case.json."""

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


def conversion_cases() -> list[Case]:
    """Every fixture folder that is a conversion (has case.json and expected outputs)."""
    if not FIXTURES.is_dir():
        return []
    cases = []
    for folder in sorted(FIXTURES.iterdir()):
        meta_file = folder / "case.json"
        if meta_file.is_file() and (folder / "expected").is_dir():
            cases.append(Case(folder, json.loads(meta_file.read_text())))
    return cases


CASES = conversion_cases()
requires_fixtures = pytest.mark.skipif(not CASES, reason=f"no fixtures at {FIXTURES}")
case_params = pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])


def checkpoint_content(path: str | os.PathLike[str]) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, dims, content bytes) of every parameter, in file order."""
    from mpickpt.ckpt import index_checkpoint

    with index_checkpoint(path) as index:
        return [
            (e.name, e.dtype, tuple(e.dims), b"".join(bytes(v) for v in index.raw(e.name)))
            for e in index.entries.values()
        ]


def assert_same_content(ours: str | os.PathLike[str], theirs: str | os.PathLike[str]) -> None:
    """Same parameters with the same dtypes, dims and tensor bytes (order may differ)."""
    mine = {name: rest for name, *rest in checkpoint_content(ours)}
    expected = {name: rest for name, *rest in checkpoint_content(theirs)}
    assert sorted(mine) == sorted(expected), f"{ours}: parameter names differ from {theirs}"
    for name, (dtype, dims, data) in expected.items():
        got_dtype, got_dims, got_data = mine[name]
        assert (got_dtype, got_dims) == (dtype, dims), f"{ours}: {name} is {got_dtype}{list(got_dims)}, expected {dtype}{list(dims)}"
        assert got_data == data, f"{ours}: {name} tensor bytes differ from {theirs}"
