"""Bad input gets a clear error naming the file and parameter, and nothing half-written is left."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

import mpickpt
from mpickpt.errors import CheckpointFormatError, DestinationError, MpickptError, SourceMissingError
from fixture_cases import Case


@pytest.fixture()
def seed(written_cases: dict[str, Case], tmp_path: Path) -> Path:
    """A private copy of an 8 -> 4 case written by mpickpt (so tests may damage it)."""
    case = written_cases["random_8to4"]
    root = tmp_path / "case"
    shutil.copytree(case.src_dir, root / "src")
    for which in ("src", "dst"):
        shutil.copy(case.strategy(which), root / f"{which}_strategy.ckpt")
    for f in (root / "src").rglob("*.ckpt"):
        f.chmod(0o644)
    return root


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


def _convert(root: Path, out: Path) -> None:
    mpickpt.transform_checkpoints(
        str(root / "src"), str(out), "checkpoint_", str(root / "src_strategy.ckpt"), str(root / "dst_strategy.ckpt")
    )


def test_sources_are_never_modified(seed: Path) -> None:
    before = _digest(seed / "src")
    _convert(seed, seed / "out")
    assert _digest(seed / "src") == before


@pytest.mark.parametrize("inside", [".", "rank_0", "rank_0/deeper"])
def test_destination_inside_a_source_folder_is_refused(seed: Path, inside: str) -> None:
    before = _digest(seed / "src")
    with pytest.raises(DestinationError, match="inside source folder"):
        _convert(seed, seed / "src" / inside)
    assert _digest(seed / "src") == before


def test_missing_source_rank_is_named(seed: Path) -> None:
    shutil.rmtree(seed / "src" / "rank_1")
    with pytest.raises(SourceMissingError, match=r"covers ranks 0..7, but the checkpoint files of ranks \[1\] are "
                                                 r"missing"):
        _convert(seed, seed / "out")


def test_corrupt_source_names_the_file_and_leaves_no_output(seed: Path) -> None:
    victim = seed / "src" / "rank_0" / "checkpoint_0.ckpt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="checkpoint_0.ckpt"):
        _convert(seed, seed / "out")
    leftovers = [p for p in (seed / "out").rglob("*") if p.is_file()] if (seed / "out").exists() else []
    assert all(not p.name.endswith(".tmp") for p in leftovers)
    # Whatever was finished is complete; a rerun after repairing the source completes the job.
    victim.write_bytes(data)
    _convert(seed, seed / "out")
    assert len(list((seed / "out").glob("rank_*/*.ckpt"))) == 4


def test_rerun_replaces_read_only_outputs(seed: Path) -> None:
    _convert(seed, seed / "out")
    first = _digest(seed / "out")
    _convert(seed, seed / "out")
    assert _digest(seed / "out") == first


def test_safetensors_output_is_refused_clearly(seed: Path) -> None:
    with pytest.raises(MpickptError, match="safetensors"):
        mpickpt.transform_checkpoints(str(seed / "src"), str(seed / "out"), "c_", output_format="safetensors")


def test_by_rank_output_name_must_end_with_ckpt(seed: Path) -> None:
    with pytest.raises(ValueError, match=r"\.ckpt"):
        mpickpt.transform_checkpoint_by_rank(0, {0: str(seed / "src/rank_0/checkpoint_0.ckpt")}, str(seed / "x.bin"))


def test_by_rank_missing_file_is_named(seed: Path) -> None:
    with pytest.raises(SourceMissingError, match="nowhere.ckpt"):
        mpickpt.transform_checkpoint_by_rank(0, {0: str(seed / "nowhere.ckpt")}, str(seed / "x.ckpt"))


def test_by_rank_missing_needed_rank_is_named(seed: Path) -> None:
    files = {0: str(seed / "src/rank_0/checkpoint_0.ckpt")}
    needed = mpickpt.rank_list_for_transform(0, str(seed / "src_strategy.ckpt"), str(seed / "dst_strategy.ckpt"))
    missing = sorted(set(needed) - {0})
    assert missing
    with pytest.raises(SourceMissingError, match=rf"source ranks \[{', '.join(map(str, missing))}\] are needed for "
                                                 r"target rank 0 but are missing"):
        mpickpt.transform_checkpoint_by_rank(
            0, files, str(seed / "x.ckpt"), str(seed / "src_strategy.ckpt"), str(seed / "dst_strategy.ckpt")
        )
    assert not (seed / "x.ckpt").exists()


def test_a_sliced_parameter_the_target_strategy_lacks_is_said(tmp_path: Path) -> None:
    """Copied as one rank's stored slice (MindSpore's rule), which is not the full tensor: the job's notes say
    so (a target strategy folder missing a pipeline stage gives this silently otherwise)."""
    from dataclasses import replace

    from mpickpt.ckpt import index_checkpoint
    from mpickpt.strategy import load_strategy, save_strategy
    from mpickpt.transform import TransformJob, TransformOptions

    example = Path(__file__).resolve().parent.parent / "examples" / "tiny_llama"
    dropped = "model.layers.0.attention.wq.weight"
    target = load_strategy(example / "dst_strategy_4.ckpt")
    target = replace(target, layout_items=tuple(i for i in target.layout_items if i.name != dropped))
    save_strategy(target, tmp_path / "dst_strategy.ckpt")
    job = TransformJob.prepare(TransformOptions(str(example / "src"), str(tmp_path / "out"),
                                                src_strategy=str(example / "src_strategy.ckpt"),
                                                dst_strategy=str(tmp_path / "dst_strategy.ckpt")))
    try:
        notes = [n for n in job.notes if "the source strategy slices are not in the target strategy" in n]
        assert len(notes) == 1 and notes[0].startswith("1 parameter(s)") and repr(dropped) in notes[0], job.notes
        plan = job.planner().plan(0)
    finally:
        job.close()
    kept = next(p for p in plan.params if p.name == dropped)
    with index_checkpoint(example / "src" / "rank_0" / "checkpoint_0.ckpt") as source:
        assert kept.dims == tuple(source.entries[dropped].dims)  # a stored slice, not the full tensor


@pytest.mark.parametrize("option", ["src_strategy", "src_strategy_dir"])
def test_a_placeholder_in_a_strategy_path_is_refused_saying_where_they_expand(tmp_path: Path, option: str) -> None:
    """Was "p{process}/strategies: src_strategy_dirs is not a directory" (taken literally)."""
    from mpickpt.transform import TransformJob, TransformOptions

    example = Path(__file__).resolve().parent.parent / "examples" / "tiny_llama"
    options = TransformOptions(str(example / "src"), str(tmp_path / "out"), dst_strategy=str(example /
                               "dst_strategy_4.ckpt"), **{option: str(tmp_path / "p{process}" / "strategy")})
    with pytest.raises(MpickptError, match=r"p\{process\}/strategy: placeholders \(\{host\}, \{process\}\) are "
                                           r"expanded in the source and destination folders only"):
        TransformJob.prepare(options)
    assert not (tmp_path / "out").exists()
