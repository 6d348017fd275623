"""Transforms with safetensors on either side, any combination, serially and under MPI: the same tensors
as the ckpt conversion; sources found as MindSpore finds them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fixture_cases import checkpoint_content, tensor_content
from mpickpt.convert import ckpt_to_safetensors
from mpickpt.errors import MpickptError
from mpickpt.formats import open_index
from mpickpt.sources import find_rank_files
from mpickpt.transform import TransformJob, TransformOptions

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama"
STRATEGIES = {"src_strategy": str(EXAMPLE / "src_strategy.ckpt"), "dst_strategy": str(EXAMPLE / "dst_strategy_6.ckpt")}


def _convert(src: Path, dst: Path, **options: object) -> None:
    job = TransformJob.prepare(TransformOptions(str(src), str(dst), **STRATEGIES, **options))  # type: ignore[arg-type]
    for task in job.tasks:
        job.run_task(task, sync=False)


def _tensors(folder: Path) -> dict[str, dict[str, tuple[str, tuple[int, ...], bytes]]]:
    """rank folder -> parameter -> (dtype, dims, bytes), whatever the format."""
    out = {}
    for path in sorted(p for p in folder.glob("rank_*/*") if p.suffix in (".ckpt", ".safetensors")):
        out[path.parent.name] = tensor_content(path)
    return out


@pytest.fixture(scope="module")
def safetensors_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("st") / "src"
    ckpt_to_safetensors(str(EXAMPLE / "src"), str(out))
    return out


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("clean")
    _convert(EXAMPLE / "src", out)
    return _tensors(out)


@pytest.mark.parametrize("source", ["ckpt", "safetensors"])
@pytest.mark.parametrize("output", ["ckpt", "safetensors"])
def test_every_format_combination_gives_the_same_tensors(source: str, output: str, tmp_path: Path,
                                                         safetensors_src: Path, clean: dict) -> None:
    src = EXAMPLE / "src" if source == "ckpt" else safetensors_src
    _convert(src, tmp_path / "dst", output_format=output)
    names = sorted(p.name for p in (tmp_path / "dst").glob("rank_*/*"))
    assert names == sorted(f"checkpoint_{r}.{output}" for r in range(6))
    assert _tensors(tmp_path / "dst") == clean


def test_safetensors_outputs_open_with_the_official_package(tmp_path: Path, clean: dict) -> None:
    safetensors = pytest.importorskip("safetensors")
    _convert(EXAMPLE / "src", tmp_path / "dst", output_format="safetensors", crc=True)
    for rank in range(6):
        path = tmp_path / "dst" / f"rank_{rank}" / f"checkpoint_{rank}.safetensors"
        loaded = dict(safetensors.deserialize(path.read_bytes()))  # raw bytes: numpy has no bfloat16
        assert {n: bytes(t["data"]) for n, t in loaded.items()} == {n: v[2] for n, v in clean[f"rank_{rank}"].items()}
        with open_index(path, verify_crc=True) as index:
            assert index.metadata["format"] == "ms" and index.crc is not None


def test_under_mpi_safetensors_to_safetensors_matches_serial(tmp_path: Path, safetensors_src: Path,
                                                             clean: dict) -> None:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    if not mpiexec.exists():
        pytest.skip("MPICH's mpiexec is not installed in this environment")
    args = [str(mpiexec), "-n", "2", sys.executable, "-m", "mpickpt", "transform", "--src-dir", str(safetensors_src),
            "--dst-dir", str(tmp_path / "dst"), "--src-strategy", STRATEGIES["src_strategy"], "--dst-strategy",
            STRATEGIES["dst_strategy"], "--output-format", "safetensors", "--no-sync", "--quiet"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _tensors(tmp_path / "dst") == clean


def test_rank_folders_pick_files_as_mindspore(tmp_path: Path, safetensors_src: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(safetensors_src, src)
    folder = src / "rank_0"
    original = next(folder.glob("*.safetensors"))
    shutil.copy(original, folder / "net-9_1875.safetensors")
    shutil.copy(original, folder / "net-10_1875.safetensors")
    assert find_rank_files(src)[0] == str(folder / "net-10_1875.safetensors")
    shutil.copy(EXAMPLE / "src" / "rank_0" / "checkpoint_0.ckpt", folder / "checkpoint_0.ckpt")
    with pytest.raises(MpickptError, match=r"rank_0 holds both ckpt and safetensors checkpoints; choose one with "
                                           r"--src-format"):
        find_rank_files(src)
    assert find_rank_files(src, "ckpt")[0] == str(folder / "checkpoint_0.ckpt")


def test_str_values_cannot_go_to_safetensors(tmp_path: Path) -> None:
    from mpickpt.ckpt import save_checkpoint
    import numpy as np

    src = tmp_path / "src" / "rank_0" / "a.ckpt"
    save_checkpoint(src, [("w", "Float32", (2,), np.zeros(2, np.float32)),
                          ("note", "str", (0,), np.array("hello").tobytes())])
    with pytest.raises(MpickptError, match=r"a.ckpt: parameter 'note' is a str value, which safetensors cannot hold"):
        TransformJob.prepare(TransformOptions(str(tmp_path / "src"), str(tmp_path / "dst"),
                                              output_format="safetensors"))
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").rglob("*.safetensors"))
    assert checkpoint_content(src)  # the source is untouched and readable


def test_a_parameter_named_like_a_metadata_key_cannot_go_to_safetensors(tmp_path: Path) -> None:
    """Refused while planning, before any file is written (the writer would refuse it only then)."""
    from mpickpt.ckpt import save_checkpoint

    save_checkpoint(tmp_path / "src" / "rank_0" / "a.ckpt", [("format", "Float32", (1,), bytes(4))])
    with pytest.raises(MpickptError, match=r"a.ckpt: parameter 'format' is named like a safetensors metadata key"):
        TransformJob.prepare(TransformOptions(str(tmp_path / "src"), str(tmp_path / "dst"),
                                              output_format="safetensors"))
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").rglob("rank_*"))


def test_pipeline_subnetwork_parts_from_safetensors_sources(mindspore_cases: dict, tmp_path: Path) -> None:
    import mpickpt

    pipeline = mindspore_cases["pipeline_2x4_to_4"].root
    sources = tmp_path / "st_src"
    ckpt_to_safetensors(str(pipeline / "src_checkpoints"), str(sources))
    out = tmp_path / "by_stage"
    for stage_file in ("src_strategy_0.ckpt", "src_strategy_4.ckpt"):
        mpickpt.transform_checkpoints(str(sources), str(out), "checkpoint_",
                                      str(pipeline / "src_pipeline_strategys" / stage_file),
                                      str(pipeline / "dst_strategy.ckpt"), output_format="safetensors")
    assert sorted(p.name for p in out.glob("rank_0/*")) == ["checkpoint_0_part0.safetensors",
                                                             "checkpoint_0_part1.safetensors"]
    for rank in range(4):
        merged = mpickpt.load_segmented_checkpoints(str(out / f"rank_{rank}"))
        whole = mpickpt.load_segmented_checkpoints(str(pipeline / "expected" / f"rank_{rank}"))
        assert sorted(merged) == sorted(whole)
        assert all(merged[n].tobytes() == a.tobytes() and merged[n].shape == a.shape for n, a in whole.items())


def test_verify_accepts_good_safetensors_outputs_and_names_a_flipped_byte(tmp_path: Path) -> None:
    from mpickpt.mpi import SerialComm
    from mpickpt.verify import verify_outputs

    _convert(EXAMPLE / "src", tmp_path / "dst", output_format="safetensors")
    options = TransformOptions(str(EXAMPLE / "src"), str(tmp_path / "dst"), output_format="safetensors",
                               **STRATEGIES)  # type: ignore[arg-type]
    assert verify_outputs(options, SerialComm()).ok
    victim = tmp_path / "dst" / "rank_2" / "checkpoint_2.safetensors"
    with open_index(victim) as index:
        name, entry = next(iter(index.entries.items()))
        offset = entry.pieces[0][0] + entry.nbytes // 2
    data = bytearray(victim.read_bytes())
    data[offset] ^= 0x40
    victim.chmod(0o600)
    victim.write_bytes(bytes(data))
    verdict = verify_outputs(options, SerialComm())
    assert not verdict.ok
    assert any("checkpoint_2.safetensors" in line and name in line for line in verdict.lines())


def test_a_parameter_named_crc_num_cannot_go_to_safetensors_with_crc(tmp_path: Path) -> None:
    """With --crc the outputs' metadata holds crc_num: a tensor of that name is refused while planning."""
    from mpickpt.ckpt import save_checkpoint

    save_checkpoint(tmp_path / "src" / "rank_0" / "a.ckpt", [("crc_num", "Float32", (1,), bytes(4))])
    options = dict(src_dir=str(tmp_path / "src"), dst_dir=str(tmp_path / "dst"), output_format="safetensors")
    with pytest.raises(MpickptError, match=r"a.ckpt: parameter 'crc_num' is named like a safetensors metadata key"):
        TransformJob.prepare(TransformOptions(**options, crc=True))
    assert not (tmp_path / "dst").exists() or not list((tmp_path / "dst").rglob("rank_*"))
    TransformJob.prepare(TransformOptions(**options))  # without a checksum the name is free
