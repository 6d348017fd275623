"""Node-local (`{process}`) sources in the less common forms: a unified checkpoint on some processes only,
or split over them, and rank folders of both formats; compared with the same job on one shared folder
(driver on threads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_driver import run_threads, transform_errors

from mpickpt.convert import ckpt_to_safetensors
from mpickpt.driver import run_transform
from mpickpt.errors import MpickptError, SourceMissingError
from mpickpt.mpi import SerialComm
from mpickpt.transform import TransformOptions
from mpickpt.unify import UnifyOptions, run_unify

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny_llama"
DST = TINY / "dst_strategy_4.ckpt"


@pytest.fixture(scope="module")
def unified(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny example unified in MindSpore's layout (part0, hyper_param, param_name_map.json)."""
    folder = tmp_path_factory.mktemp("unified") / "ms"
    run_unify(UnifyOptions(str(TINY / "src"), str(folder), str(TINY / "src_strategy.ckpt")), SerialComm(),
              sync=False, manifest=False)
    return folder


def options(src_dir: Path | str, dst_dir: Path, **extra: object) -> TransformOptions:
    return TransformOptions(src_dir=str(src_dir), dst_dir=str(dst_dir), prefix="checkpoint_", dst_strategy=str(DST),
                            **extra)  # type: ignore[arg-type]


def outputs(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.glob("rank_*/*.ckpt"))}


def test_a_unified_folder_on_one_process_gives_the_shared_bytes(unified: Path, tmp_path: Path) -> None:
    shutil.copytree(unified, tmp_path / "src" / "p1" / "unified")
    run_threads(1, lambda comm: run_transform(options(unified, tmp_path / "shared"), comm, quiet=True))
    run_threads(3, lambda comm: run_transform(options(tmp_path / "src" / "p{process}" / "unified", tmp_path / "dst"),
                                              comm, quiet=True))
    assert outputs(tmp_path / "dst") == outputs(tmp_path / "shared") != {}


def test_a_unified_folder_split_over_processes_is_refused(unified: Path, tmp_path: Path) -> None:
    """Process 0 holds the index and part0, process 1 hyper_param.safetensors: the job used to exit 0 without
    the hyper-parameters the shared folder gives; now every process fails alike naming the file left out."""
    mine, other = tmp_path / "src" / "p0" / "unified", tmp_path / "src" / "p1" / "unified"
    shutil.copytree(unified, mine)
    other.mkdir(parents=True)
    shutil.move(mine / "hyper_param.safetensors", other / "hyper_param.safetensors")
    errors = transform_errors(options(tmp_path / "src" / "p{process}" / "unified", tmp_path / "dst"), 3)
    assert all(isinstance(e, SourceMissingError) for e in errors) and len({str(e) for e in errors}) == 1
    assert "process 1 (host " in str(errors[0]) and f"{other}: hyper_param.safetensors" in str(errors[0])
    assert not list((tmp_path / "dst").rglob("*.ckpt"))


def test_rank_folders_of_both_formats_on_different_processes_are_refused(tmp_path: Path) -> None:
    """Process 0 holds ranks 0-3 as .ckpt, process 1 ranks 4-7 as safetensors: the shared folder refuses the mix
    (as MindSpore), the split job used to convert it and exit 0; now it is refused alike, naming both folders."""
    ckpt_to_safetensors(TINY / "src", tmp_path / "st")
    for rank in range(8):
        folder = (TINY / "src") if rank < 4 else tmp_path / "st"
        shutil.copytree(folder / f"rank_{rank}", tmp_path / "src" / f"p{rank // 4}" / f"rank_{rank}")
    split = options(tmp_path / "src" / "p{process}", tmp_path / "dst", src_strategy=str(TINY / "src_strategy.ckpt"))
    errors = transform_errors(split, 2)
    assert all(isinstance(e, MpickptError) for e in errors) and len({str(e) for e in errors}) == 1
    assert (f"rank folders hold checkpoints of both formats, {tmp_path / 'src' / 'p0' / 'rank_0'} (ckpt) and "
            f"{tmp_path / 'src' / 'p1' / 'rank_4'} (safetensors)") in str(errors[0])
    assert not list((tmp_path / "dst").rglob("*.ckpt"))
