"""The bad-input matrix, end to end on the shipped example: every case either fails with a typed error
naming the file and parameter before any output is written, or converts to exactly the clean result.
Sources are never modified."""

from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from dataclasses import replace
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from fixture_cases import checkpoint_content
from mpickpt.catalog import Fingerprint
from mpickpt.ckpt import index_checkpoint, save_checkpoint
from mpickpt.errors import (
    CheckpointFormatError,
    LayoutError,
    MpickptError,
    PlanError,
    SourceDisagreementError,
    SourceMissingError,
)
from mpickpt.inventory import SAMPLE, read_headers
from mpickpt.sources import find_rank_files
from mpickpt.strategy import load_strategy, save_strategy
from mpickpt.cli import main
from mpickpt.transform import TransformJob, TransformOptions

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama"
SRC_STRATEGY = EXAMPLE / "src_strategy.ckpt"
DST_STRATEGY = EXAMPLE / "dst_strategy_4.ckpt"


def _convert(src: Path, dst: Path, **options: object) -> None:
    job = TransformJob.prepare(TransformOptions(str(src), str(dst), src_strategy=str(options.pop("src_strategy",
                                                SRC_STRATEGY)), dst_strategy=str(DST_STRATEGY), **options))
    for task in job.tasks:
        job.run_task(task, sync=False)


def _content(folder: Path) -> dict[str, list[tuple[str, str, tuple[int, ...], bytes]]]:
    return {str(p.relative_to(folder)): sorted(checkpoint_content(p)) for p in sorted(folder.glob("rank_*/*.ckpt"))}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[str, str, tuple[int, ...], bytes]]]:
    out = tmp_path_factory.mktemp("clean")
    _convert(EXAMPLE / "src", out)
    return _content(out)


def _rewrite(path: Path, keep: Callable[[str], bool], change: Callable[[str, np.ndarray], np.ndarray] | None = None
             ) -> None:
    """Rewrite one source file keeping only some parameters (optionally changing their arrays)."""
    with index_checkpoint(path) as index:
        params = [(n, e.dtype, e.dims, np.array(index.array(n))) for n, e in index.entries.items() if keep(n)]
    if change is not None:
        params = [(n, d, b.shape, b) for n, d, _, a in params for b in [change(n, a)]]
    path.unlink()
    save_checkpoint(path, [(n, d, dims, np.ascontiguousarray(a)) for n, d, dims, a in params])


def _copy_src(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE / "src", src)
    for p in src.rglob("*.ckpt"):
        p.chmod(0o600)
    return src


def _rank0(src: Path) -> Path:
    return next((src / "rank_0").glob("*.ckpt"))


BAD = {
    "empty rank_0 file": (lambda src: _rank0(src).write_bytes(b""), PlanError, r"no source file holds the slice"),
    "rank_0 cut at an entry boundary": (lambda src: _rewrite(_rank0(src), lambda n: not n.startswith("adam")),
                                        PlanError, r"no source file holds the slice"),
    "rank_0 truncated mid-entry": (lambda src: _rank0(src).write_bytes(_rank0(src).read_bytes()[:5000]),
                                   CheckpointFormatError, r"rank_0/checkpoint_0.ckpt"),
    "a shard stored larger than its slice": (
        lambda src: _rewrite(_rank0(src), lambda n: True,
                             lambda n, a: np.concatenate([a, a]) if n == "model.norm_out.weight" else a),
        LayoutError, r"rank_0/checkpoint_0.ckpt: parameter 'model.norm_out.weight' is stored as"),
    "a dtype that disagrees": (
        lambda src: _rewrite(_rank0(src), lambda n: True,
                             lambda n, a: a.view(np.int16) if a.dtype == np.uint16 else a),
        None, None),  # BFloat16 stays BFloat16 in the header: same bytes, converts cleanly
    "a missing rank folder": (lambda src: shutil.rmtree(src / "rank_5"), SourceMissingError,
                              r"checkpoint files of ranks \[5\] are missing"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_sources_fail_before_writing_or_convert_cleanly(kind: str, tmp_path: Path, clean: dict) -> None:
    src = _copy_src(tmp_path)
    damage, error, message = BAD[kind]
    damage(src)
    before = _digest(src)
    dst = tmp_path / "dst"
    if error is None:
        _convert(src, dst)
        assert _content(dst) == clean
    else:
        with pytest.raises(error, match=message):
            _convert(src, dst)
        assert not list(dst.rglob("*.ckpt"))
    assert _digest(src) == before


def test_a_rank_file_lacking_a_replicated_parameter_reads_it_from_a_replica(tmp_path: Path, clean: dict) -> None:
    src = _copy_src(tmp_path)
    _rewrite(_rank0(src), lambda n: n != "model.norm_out.weight")  # replicated: rank 1.. hold the same data
    dst = tmp_path / "dst"
    _convert(src, dst)
    assert _content(dst) == clean


def test_extra_rank_folders_are_refused(tmp_path: Path) -> None:
    src = _copy_src(tmp_path)
    shutil.copytree(src / "rank_7", src / "rank_8")
    with pytest.raises(PlanError, match=r"rank folders \[8\] beyond the 8 ranks of the source strategy"):
        _convert(src, tmp_path / "dst")


def test_several_rank_folders_without_a_source_strategy_ask_for_one(tmp_path: Path) -> None:
    with pytest.raises(MpickptError, match="no source strategy was given: a source strategy file"):
        TransformJob.prepare(TransformOptions(str(EXAMPLE / "src"), str(tmp_path / "dst"),
                                              dst_strategy=str(DST_STRATEGY)))


def test_a_source_strategy_for_fewer_devices_is_refused(tmp_path: Path) -> None:
    # the target strategy of 4 ranks given as the source strategy of the 8-rank sources
    with pytest.raises(PlanError, match=r"rank folders \[4, 5, 6, 7\] beyond the 4 ranks"):
        _convert(EXAMPLE / "src", tmp_path / "dst", src_strategy=DST_STRATEGY)


def test_an_incomplete_source_strategy_is_an_error_not_a_mode_switch(tmp_path: Path) -> None:
    strategy = load_strategy(SRC_STRATEGY)
    dropped = strategy.layout_items[0].name
    incomplete = tmp_path / "incomplete.ckpt"
    save_strategy(type(strategy)(strategy.current_stage, strategy.strategy_items, strategy.layout_items[1:]),
                  incomplete)
    with pytest.raises(PlanError, match=rf"parameter '{dropped}' is in the target strategy and in this source file "
                                        r"but not in the source strategy"):
        _convert(EXAMPLE / "src", tmp_path / "dst", src_strategy=incomplete)
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").rglob("*.ckpt"))


def test_verify_crc_catches_a_flipped_tensor_byte(tmp_path: Path, clean: dict) -> None:
    src = _copy_src(tmp_path)
    path = _rank0(src)
    _rewrite(path, lambda n: True)
    with index_checkpoint(path) as index:
        params = [(n, e.dtype, e.dims, np.array(index.array(n))) for n, e in index.entries.items()]
    path.unlink()
    save_checkpoint(path, params, crc=True)
    _convert(src, tmp_path / "ok", verify_crc=True)
    assert _content(tmp_path / "ok") == clean
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=r"rank_0/checkpoint_0.ckpt: CRC check failed"):
        _convert(src, tmp_path / "bad", verify_crc=True)


def test_crc_outputs_carry_mindspores_trailer(tmp_path: Path, clean: dict) -> None:
    _convert(EXAMPLE / "src", tmp_path / "dst", crc=True)
    assert _content(tmp_path / "dst") == clean
    for path in (tmp_path / "dst").glob("rank_*/*.ckpt"):
        with index_checkpoint(path, verify_crc=True) as index:
            assert index.crc is not None


def test_a_source_rewritten_in_place_while_read_leaves_no_output(tmp_path: Path, clean: dict) -> None:
    """A file changed while a target reads it (a training job saving over it, say) would give an output mixing
    two versions: the target is refused before it is committed; once the file is final a rerun writes it."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE / "src", src)
    job = TransformJob.prepare(TransformOptions(str(src), str(tmp_path / "dst"), src_strategy=str(SRC_STRATEGY),
                                                dst_strategy=str(DST_STRATEGY)))
    task = job.tasks[0]
    victim = Path(job.rank_files[task.source_ranks[0]])

    def save_over_it(_written: int) -> None:
        if victim.stat().st_mtime_ns != 0:  # once: rewrite a few bytes in place, as an overwriting save would
            with open(victim, "r+b") as f:
                f.seek(victim.stat().st_size // 2)
                f.write(b"\xff" * 8)
            os.utime(victim, ns=(0, 0))

    with pytest.raises(CheckpointFormatError, match=rf"{victim}: the file changed while this run read it \(size "
                       r"\d+ -> \d+ bytes, modification time moved by -\d+\.\d{3} s\): what was read may mix two "
                       "versions, so nothing made from it is kept; run again once the file is final"):
        job.run_task(task, sync=False, progress=save_over_it)
    assert not Path(task.path).exists() and not list(Path(task.path).parent.glob(".*tmp"))
    job.close()

    shutil.copy2(EXAMPLE / "src" / victim.parent.name / victim.name, victim)  # the file is final again
    _convert(src, tmp_path / "dst")
    assert _content(tmp_path / "dst") == clean


def test_a_copied_through_value_that_differs_between_rank_files_is_refused(tmp_path: Path) -> None:
    """global_step is outside the strategy, so one rank's copy is written to every target: rank files from
    different saves (rank_1's from step 999) would convert to outputs mixing steps, and which rank's value
    lands where is arbitrary (MindSpore's target 1 takes rank 1's, ours took rank 0's). Refused, naming both."""
    src = _copy_src(tmp_path)
    rank1 = next((src / "rank_1").glob("*.ckpt"))
    _rewrite(rank1, lambda n: True, lambda n, a: np.full_like(a, 999) if n == "global_step" else a)
    with pytest.raises(SourceDisagreementError, match=r"parameter 'global_step' is outside the source strategy, so "
                       r"every rank file should hold the same value, but .*rank_1/checkpoint_1.ckpt holds \[999\], "
                       r".*rank_0/checkpoint_0.ckpt holds \[1000\]"):
        _convert(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").rglob("*.ckpt"))


def test_a_sharded_parameter_missing_from_both_strategies_is_refused(tmp_path: Path) -> None:
    """Strategies of another run that lack a tensor-parallel weight: the ranks' slices all have the same dims,
    so the weight looked replicated and one rank's slice went to every target. Its copies differ: refused."""
    name = "model.layers.0.attention.wq.weight"
    strategies = {}
    for kind, path in (("src", SRC_STRATEGY), ("dst", DST_STRATEGY)):
        strategy = load_strategy(path)
        strategies[kind] = tmp_path / f"{kind}.ckpt"
        save_strategy(type(strategy)(strategy.current_stage, strategy.strategy_items,
                                     tuple(item for item in strategy.layout_items if item.name != name)),
                      strategies[kind])
    job = TransformOptions(str(EXAMPLE / "src"), str(tmp_path / "dst"), src_strategy=str(strategies["src"]),
                           dst_strategy=str(strategies["dst"]))
    with pytest.raises(SourceDisagreementError, match=rf"parameter '{name}' is outside the source strategy"):
        TransformJob.prepare(job)


def test_large_copied_values_are_fingerprinted_by_their_ends(tmp_path: Path) -> None:
    values = np.arange(40_000, dtype=np.float32)  # 160,000 bytes: fingerprinted by its first and last 32 KiB
    path = tmp_path / "rank_0" / "a.ckpt"
    path.parent.mkdir()
    save_checkpoint(path, [("big", "Float32", values.shape, values), ("step", "Int32", (1,), np.array([3], np.int32))])
    found = read_headers({0: str(path)}, fingerprinted=lambda name: True)[0].fingerprints
    raw = values.tobytes()
    assert found["big"] == Fingerprint(zlib.crc32(raw[-SAMPLE:], zlib.crc32(raw[:SAMPLE])), sampled=True)
    assert found["step"] == Fingerprint(zlib.crc32(np.int32(3).tobytes()), shown="[3]")
    assert not read_headers({0: str(path)})[0].fingerprints


def test_a_parameter_only_the_target_strategy_splits_is_refused(tmp_path: Path) -> None:
    """model.norm_out.weight left out of the source strategy is copied whole ([192]) as MindSpore copies it, but
    the target strategy cuts it in 4: both wrote [192] where the target expects [48] and exited 0. Refused;
    a target layout keeping it whole still converts."""
    name = "model.norm_out.weight"
    src = load_strategy(SRC_STRATEGY)
    save_strategy(replace(src, layout_items=tuple(i for i in src.layout_items if i.name != name)),
                  tmp_path / "src.ckpt")
    dst = load_strategy(DST_STRATEGY)
    for split, tensor_map in ((True, ((0,),)), (False, ((-1,),))):
        items = tuple(replace(i, tensor_map=tensor_map) if i.name == name else i
                      for i in dst.layout_items if i.name != "lm_head.weight")  # not a superset of the source
        save_strategy(replace(dst, layout_items=items), tmp_path / f"dst_{split}.ckpt")
        options = TransformOptions(str(EXAMPLE / "src"), str(tmp_path / f"out_{split}"),
                                   src_strategy=str(tmp_path / "src.ckpt"), dst_strategy=str(tmp_path / f"dst_{split}.ckpt"))
        if not split:
            job = TransformJob.prepare(options, write_merged=False)
            assert {p.dims for plan in job._plans.values() for p in plan.params if p.name == name} == {(192,)}
            job.close()
            continue
        with pytest.raises(PlanError, match=rf"parameter '{name}' is not in the source strategy \(.*src.ckpt\), so "
                           r"its stored value \[192\] is copied whole, but the target strategy \(.*dst_True.ckpt\) "
                           r"gives target rank 0 a slice of \[48\] of it"):
            TransformJob.prepare(options, write_merged=False)


def test_transform_checkpoint_by_rank_refuses_files_disagreeing_on_a_copied_value(tmp_path: Path) -> None:
    import mpickpt as ms

    src = _copy_src(tmp_path)
    rank3 = next((src / "rank_3").glob("*.ckpt"))
    _rewrite(rank3, lambda n: True, lambda n, a: np.full_like(a, 999) if n == "global_step" else a)
    files = {r: str(next((src / f"rank_{r}").glob("*.ckpt"))) for r in (7, 5, 3, 1)}  # what target 2 reads
    out = tmp_path / "out" / "checkpoint_2.ckpt"
    with pytest.raises(SourceDisagreementError, match=r"parameter 'global_step' .*rank_3/checkpoint_3.ckpt holds "
                       r"\[999\], .*rank_1/checkpoint_1.ckpt holds \[1000\]"):
        ms.transform_checkpoint_by_rank(2, files, str(out), str(SRC_STRATEGY), str(DST_STRATEGY))
    assert not out.exists()


def test_two_rank_folders_of_one_rank_are_refused(tmp_path: Path) -> None:
    """rank_1 and rank_01 both name source rank 1: which one a listing gives last decided (MindSpore too)."""
    src = _copy_src(tmp_path)
    shutil.copytree(src / "rank_1", src / "rank_01")
    with pytest.raises(SourceDisagreementError, match=r"rank folders .*rank_01 and .*rank_1 both hold checkpoint "
                       r"files of source rank 1"):
        find_rank_files(src)
    with pytest.raises(SourceDisagreementError):
        _convert(src, tmp_path / "dst")
    for p in (src / "rank_01").iterdir():
        p.unlink()  # an empty folder claims nothing
    assert find_rank_files(src)[1] == str(src / "rank_1" / "checkpoint_1.ckpt")



@pytest.mark.parametrize("entry", ["cli", "prepare"])
def test_a_refused_job_leaves_no_merged_strategy_in_the_destination(tmp_path: Path, entry: str) -> None:
    """Strategies merged from a per-stage folder are kept in dst_dir only once the whole job is validated."""
    stages, src, out = tmp_path / "stages", tmp_path / "src", tmp_path / "out"
    stages.mkdir()
    shutil.copy(SRC_STRATEGY, stages / "src_strategy_0.ckpt")
    shutil.copytree(EXAMPLE / "src", src)
    shutil.rmtree(src / "rank_5")

    def run() -> None:
        if entry == "cli":
            status = main(["transform", "--src-dir", str(src), "--src-strategy-dir", str(stages), "--dst-strategy",
                           str(DST_STRATEGY), "--dst-dir", str(out), "--no-sync", "--quiet"])
            if status:
                raise SourceMissingError(f"exit status {status}")
        else:
            TransformJob.prepare(TransformOptions(str(src), str(out), src_strategy_dir=str(stages),
                                                  dst_strategy=str(DST_STRATEGY)), sync=False).close()

    with pytest.raises(SourceMissingError):
        run()
    assert not (out / "merged_src_strategy.ckpt").exists()
    shutil.copytree(EXAMPLE / "src" / "rank_5", src / "rank_5")
    run()
    assert load_strategy(out / "merged_src_strategy.ckpt").layout_items


def test_errors_name_the_folder_a_strategy_was_merged_from(tmp_path: Path) -> None:
    stages, src = tmp_path / "stages", tmp_path / "src"
    stages.mkdir()
    shutil.copy(SRC_STRATEGY, stages / "src_strategy_0.ckpt")
    shutil.copytree(EXAMPLE / "src", src)
    shutil.rmtree(src / "rank_5")
    with pytest.raises(SourceMissingError, match=rf"source strategy \({stages}\) covers ranks 0\.\.7.*\[5\]"):
        TransformJob.prepare(TransformOptions(str(src), str(tmp_path / "out"), src_strategy_dir=str(stages),
                                              dst_strategy=str(DST_STRATEGY)), write_merged=False)
