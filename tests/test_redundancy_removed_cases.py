"""The redundancy-removed sources (``make_redundancy_removed``) are what MindSpore saves with
``CheckpointConfig(remove_redundancy=True)``: each rank keeps a subset of its full-redundancy file, byte for
byte and in order, parameters outside the strategy stay on every rank, and every distinct slice of every
strategy parameter is kept by exactly one of the ranks that hold it."""

from __future__ import annotations

from pathlib import Path

from fixture_cases import Case, checkpoint_content
from mindspore_cases import make_redundancy_removed
from mpickpt.layout import Layouts
from mpickpt.strategy import load_strategy


def _rank_file(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"


def _kept(case: Case, reduced: Path, layouts: Layouts) -> dict[int, set[str]]:
    """Strategy parameters each rank kept; checks each file is a filtered copy of the full-redundancy one."""
    kept = {}
    for rank in range(case.meta["src_ranks"]):
        original = checkpoint_content(_rank_file(case.src_dir, rank))
        mine = checkpoint_content(_rank_file(reduced, rank))
        names = {name for name, *_ in mine}
        assert mine == [entry for entry in original if entry[0] in names], f"rank {rank}: not a filtered copy"
        outside = {name for name, *_ in original if not layouts.holds(name)}
        assert outside <= names, f"rank {rank} dropped {sorted(outside - names)} (outside the strategy)"
        kept[rank] = names - outside
    return kept


def check_redundancy_removed(case: Case, reduced: Path) -> None:
    """Every distinct slice of every strategy parameter is on exactly one of the ranks holding it."""
    assert sorted(p.relative_to(reduced) for p in reduced.rglob("*.ckpt")) == \
        sorted(p.relative_to(case.src_dir) for p in case.src_dir.rglob("*.ckpt"))
    layouts = Layouts.from_strategy(load_strategy(str(case.strategy("src"))))
    kept = _kept(case, reduced, layouts)
    shapes = {name: dims for name, _, dims, _ in checkpoint_content(case.root / case.meta["full_checkpoint"])}
    for name in layouts.names:
        holders: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}
        for rank in range(layouts.device_count):
            box = layouts.slice_box(name, shapes[name], rank)
            if box is not None:
                holders.setdefault((box.start, box.stop), []).append(rank)
        for ranks in holders.values():
            assert len([r for r in ranks if name in kept[r]]) == 1, f"{name}: replicas {ranks}, kept by " \
                f"{[r for r in ranks if name in kept[r]]}"
    assert sum(map(len, kept.values())) < len(layouts.names) * layouts.device_count  # something was removed


def test_redundancy_removed_case(redundancy_removed_case: tuple[Case, Path]) -> None:
    check_redundancy_removed(*redundancy_removed_case)


def test_redundancy_removed_pipeline(mindspore_cases: dict[str, Case], tmp_path: Path) -> None:
    case = mindspore_cases["pipeline_2x4_to_4"]
    make_redundancy_removed(case, tmp_path / "src")
    check_redundancy_removed(case, tmp_path / "src")
