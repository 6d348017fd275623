"""Every MindSpore-made case converts to MindSpore's own outputs, through every entry point."""

from __future__ import annotations

import filecmp
import stat
from pathlib import Path

import mpickpt
from fixture_cases import Case, assert_same_content, case_params


def _check_outputs(case: Case, out_dir: Path, byte_identical: set[str]) -> None:
    expected = case.expected_files()
    produced = sorted(p.relative_to(out_dir) for p in out_dir.glob("rank_*/*.ckpt"))
    assert produced == sorted(p.relative_to(case.expected_dir) for p in expected.values())
    for rank, theirs in expected.items():
        ours = out_dir / theirs.relative_to(case.expected_dir)
        assert_same_content(ours, theirs)
        if filecmp.cmp(ours, theirs, shallow=False):
            byte_identical.add(f"{case.name}/rank_{rank}")


@case_params
def test_transform_checkpoints_matches_mindspore(case: Case, tmp_path: Path) -> None:
    out = tmp_path / "out"
    mpickpt.transform_checkpoints(
        str(case.src_dir), str(out), case.prefix, case.strategy("src"), case.strategy("dst")
    )
    identical: set[str] = set()
    _check_outputs(case, out, identical)
    # MindSpore's parameter order is followed, so the files are byte-identical too.
    assert len(identical) == len(case.expected_files())
    for path in out.glob("rank_*/*.ckpt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o400


@case_params
def test_transform_checkpoint_by_rank_matches_mindspore(case: Case, tmp_path: Path) -> None:
    src, dst = case.strategy("src"), case.strategy("dst")
    for rank, theirs in case.expected_files().items():
        needed = mpickpt.rank_list_for_transform(rank, src, dst)
        files = {r: str(next((case.src_dir / f"rank_{r}").glob("*.ckpt"))) for r in needed}
        ours = tmp_path / f"rank_{rank}" / f"{case.prefix}{rank}.ckpt"
        ours.parent.mkdir()
        mpickpt.transform_checkpoint_by_rank(rank, files, str(ours), src, dst)
        assert_same_content(ours, theirs)


@case_params
def test_rank_list_never_longer_than_mindspore(case: Case) -> None:
    theirs = case.meta["ms_rank_list_for_transform"]
    assert sorted(map(int, theirs)) == list(range(case.meta["dst_ranks"]))
    for rank, ms_list in theirs.items():
        ours = mpickpt.rank_list_for_transform(int(rank), case.strategy("src"), case.strategy("dst"))
        assert set(ours) <= set(ms_list), f"target {rank}: ours {ours}, MindSpore {ms_list}"
        assert ours == sorted(ours, reverse=True)


def test_pipeline_subnetwork_transform_by_stage(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    pipeline = mindspore_cases["pipeline_2x4_to_4"].root
    out = tmp_path / "by_stage"
    for stage_file in ("src_strategy_0.ckpt", "src_strategy_4.ckpt"):
        mpickpt.transform_checkpoints(
            str(pipeline / "src_checkpoints"),
            str(out),
            "checkpoint_",
            str(pipeline / "src_pipeline_strategys" / stage_file),
            str(pipeline / "dst_strategy.ckpt"),
        )
    expected = sorted((pipeline / "expected_by_stage").glob("rank_*/*.ckpt"))
    produced = sorted(out.glob("rank_*/*.ckpt"))
    assert [p.relative_to(out) for p in produced] == [p.relative_to(pipeline / "expected_by_stage") for p in expected]
    for theirs in expected:
        assert_same_content(out / theirs.relative_to(pipeline / "expected_by_stage"), theirs)
    # The parts of one rank reassemble to the plain pipeline transform's output.
    for rank in range(4):
        merged = mpickpt.load_segmented_checkpoints(str(out / f"rank_{rank}"))
        whole = mpickpt.load_segmented_checkpoints(str(pipeline / "expected" / f"rank_{rank}"))
        assert sorted(merged) == sorted(whole)
        for name, array in whole.items():
            assert merged[name].dtype == array.dtype and merged[name].shape == array.shape
            assert merged[name].tobytes() == array.tobytes(), name


def test_process_num_gives_the_same_files(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    case = mindspore_cases["seed_8to4"]
    for n in (1, 2):
        mpickpt.transform_checkpoints(
            str(case.src_dir), str(tmp_path / f"p{n}"), case.prefix, case.strategy("src"), case.strategy("dst"),
            process_num=n,
        )
    produced = sorted((tmp_path / "p1").glob("rank_*/*.ckpt"))
    assert len(produced) == len(case.expected_files())
    for path in produced:
        assert filecmp.cmp(path, tmp_path / "p2" / path.relative_to(tmp_path / "p1"), shallow=False)
