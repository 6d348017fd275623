"""Checkpoints saved with redundancy removed (each rank holding only the share MindSpore's own
`remove_param_redundancy(get_parameter_redundancy(...))` gives it) convert to the same content as the
full-redundancy checkpoint. MindSpore 2.10's converter refuses such sources or silently loses parameters,
so the expected outputs are MindSpore's conversion of the full-redundancy sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixture_cases import Case, assert_same_content
from mindspore_cases import make_redundancy_removed
from mpickpt.errors import PlanError
from mpickpt.transform import TransformJob, TransformOptions


def _convert(case: Case, src: Path, dst: Path, output_format: str = "ckpt") -> TransformJob:
    options = TransformOptions(str(src), str(dst), case.prefix, case.strategy("src"), case.strategy("dst"),
                               output_format=output_format)
    job = TransformJob.prepare(options)
    for task in job.tasks:
        job.run_task(task, sync=False)
    return job


def test_redundancy_removed_sources_convert_like_the_full_checkpoint(redundancy_removed_case: tuple[Case, Path],
                                                                    tmp_path: Path) -> None:
    case, reduced = redundancy_removed_case
    job = _convert(case, reduced, tmp_path / "out")
    assert job.holders and any("redundancy-removed" in note for note in job.notes)
    for rank, theirs in case.expected_files().items():
        assert_same_content(tmp_path / "out" / f"rank_{rank}" / theirs.name, theirs)


def test_pipeline_redundancy_removed_sources(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    case = mindspore_cases["pipeline_2x4_to_4"]
    reduced = tmp_path / "reduced"
    make_redundancy_removed(case, reduced)
    _convert(case, reduced, tmp_path / "out")
    for rank, theirs in case.expected_files().items():
        assert_same_content(tmp_path / "out" / f"rank_{rank}" / theirs.name, theirs)


def test_a_lost_share_is_named(redundancy_removed_case: tuple[Case, Path], tmp_path: Path) -> None:
    case, reduced = redundancy_removed_case
    import shutil

    from mpickpt.ckpt import index_checkpoint, save_checkpoint

    src = tmp_path / "src"
    shutil.copytree(reduced, src)
    # drop one strategy parameter from the one rank that kept it
    victim, name = next((path, n) for path in sorted(src.rglob("*.ckpt"))
                        for n in _names(path) if n.startswith("layer"))
    with index_checkpoint(victim) as index:
        kept = [(n, e.dtype, e.dims, bytes(index.raw(n)[0])) for n, e in index.entries.items() if n != name]
    victim.chmod(0o600)
    victim.unlink()
    save_checkpoint(victim, kept)
    with pytest.raises(PlanError, match=rf"'{name}'"):
        _convert(case, src, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.ckpt"))


def _names(path: Path) -> list[str]:
    from mpickpt.ckpt import index_checkpoint

    with index_checkpoint(path) as index:
        return list(index.entries)
