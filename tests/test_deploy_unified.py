"""Deploying unified checkpoints (MindSpore's and Hugging Face's layouts) to a strategy: equal to converting
the distributed sources directly, MindSpore's load_distributed_checkpoint, and every bad input refused
with a typed error naming the file and the parameter before any output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import mpickpt
from fixture_cases import tensor_content
from mindspore_helpers import requires_mindspore, run_mindspore
from mpickpt.api import transform_checkpoints
from mpickpt.convert import ckpt_to_safetensors
from mpickpt.errors import (
    CheckpointFormatError,
    LayoutError,
    MpickptError,
    SourceMissingError,
)
from mpickpt.formats import open_index
from mpickpt.mpi import SerialComm
from mpickpt.unify import UnifyOptions, run_unify

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny_llama"
DST = TINY / "dst_strategy_4.ckpt"


def transform(src: Path, dst: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mpickpt", "transform", "--src-dir", str(src), "--dst-strategy",
                           str(DST), "--dst-dir", str(dst), "--no-sync", "--quiet", *extra],
                          capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny example as safetensors, its direct conversion to 4 ranks, and its unified forms."""
    root = tmp_path_factory.mktemp("deploy")
    ckpt_to_safetensors(TINY / "src", root / "st")
    transform_checkpoints(str(root / "st"), str(root / "direct"), "checkpoint_", str(TINY / "src_strategy.ckpt"),
                          str(DST), output_format="safetensors")
    transform_checkpoints(str(TINY / "src"), str(root / "direct_ckpt"), "checkpoint_",
                          str(TINY / "src_strategy.ckpt"), str(DST))
    mpickpt.unified_safetensors(str(root / "st"), str(TINY / "src_strategy.ckpt"), str(root / "ms"))
    for name, limit in (("hf", 400_000), ("hf_one", 10**9)):
        run_unify(UnifyOptions(str(root / "st"), str(root / name), str(TINY / "src_strategy.ckpt"), layout="hf",
                               max_shard_size=limit), SerialComm(), sync=False, manifest=False)
    return {"root": root, "st": root / "st", "direct": root / "direct", "direct_ckpt": root / "direct_ckpt",
            "ms": root / "ms", "hf": root / "hf", "hf_one": root / "hf_one"}


@pytest.mark.parametrize("layout", ["ms", "hf"])
def test_deploy_equals_direct_conversion(cases: dict[str, Path], tmp_path: Path, layout: str) -> None:
    done = transform(cases[layout], tmp_path / "st", "--output-format", "safetensors")
    assert done.returncode == 0, done.stderr
    done = transform(cases[layout], tmp_path / "ckpt")
    assert done.returncode == 0, done.stderr
    for rank in range(4):
        name = f"rank_{rank}/checkpoint_{rank}"
        ours = (tmp_path / "st" / f"{name}.safetensors").read_bytes()
        if layout == "ms":  # same tensors, same names: byte-identical
            assert ours == (cases["direct"] / f"{name}.safetensors").read_bytes(), name
        st, ckpt = f"{name}.safetensors", f"{name}.ckpt"
        assert tensor_content(tmp_path / "st" / st) == tensor_content(cases["direct"] / st)
        assert tensor_content(tmp_path / "ckpt" / ckpt) == tensor_content(cases["direct_ckpt"] / ckpt)


def test_deploy_a_single_model_safetensors(cases: dict[str, Path], tmp_path: Path) -> None:
    shard = cases["hf_one"] / "model-00001-of-00001.safetensors"
    (tmp_path / "single").mkdir()
    shutil.copy(shard, tmp_path / "single" / "model.safetensors")
    done = transform(tmp_path / "single", tmp_path / "out", "--output-format", "safetensors")
    assert done.returncode == 0, done.stderr
    for rank in range(4):
        name = f"rank_{rank}/checkpoint_{rank}.safetensors"
        assert tensor_content(tmp_path / "out" / name) == tensor_content(cases["direct"] / name)


@pytest.mark.parametrize("other", ["model-00002-of-00002.safetensors", "model.h5"])
def test_a_single_model_safetensors_beside_another_checkpoint_file(cases: dict[str, Path], tmp_path: Path,
                                                                   other: str) -> None:
    """Without an index a folder is one checkpoint only if it holds one file (MindSpore refuses several too)."""
    folder = tmp_path / "single"
    folder.mkdir()
    shutil.copy(cases["hf_one"] / "model-00001-of-00001.safetensors", folder / "model.safetensors")
    shutil.copy(cases["hf_one"] / "model-00001-of-00001.safetensors", folder / other)
    refused(cases, folder, tmp_path, MpickptError, str(folder), "model.safetensors", other, "no index file")


@pytest.mark.skipif(not Path(sys.executable).with_name("mpiexec").exists(), reason="no mpiexec")
def test_deploy_under_mpi_equals_serial(cases: dict[str, Path], tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDRA_"))}
    done = subprocess.run([str(Path(sys.executable).with_name("mpiexec")), "-n", "2", sys.executable, "-m", "mpickpt",
                           "transform", "--src-dir", str(cases["hf"]), "--dst-strategy", str(DST), "--dst-dir",
                           str(tmp_path / "out"), "--no-sync", "--quiet", "--output-format", "safetensors"],
                          capture_output=True, text=True, check=False, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for rank in range(4):
        name = f"rank_{rank}/checkpoint_{rank}.safetensors"
        assert tensor_content(tmp_path / "out" / name) == tensor_content(cases["direct"] / name)


LOAD = """
import mindspore as ms
ms.load_distributed_checkpoint(None, predict_strategy={dst!r}, format="safetensors", unified_safetensors_dir={src!r},
                               dst_safetensors_dir="all", max_process_num=2)
ms.load_distributed_checkpoint(None, predict_strategy={dst!r}, format="safetensors", unified_safetensors_dir={src!r},
                               dst_safetensors_dir="one", rank_id=1, output_format="ckpt")
"""


@requires_mindspore
def test_load_distributed_checkpoint_equals_mindspore(cases: dict[str, Path], tmp_path: Path) -> None:
    run_mindspore(LOAD.format(dst=str(DST), src=str(cases["ms"])), tmp_path)
    ours = tmp_path / "ours"
    mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format="safetensors",
                                        unified_safetensors_dir=str(cases["ms"]), dst_safetensors_dir=str(ours / "all"))
    mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format="safetensors",
                                        unified_safetensors_dir=str(cases["ms"]), dst_safetensors_dir=str(ours / "one"),
                                        rank_id=1, output_format="ckpt")
    assert sorted(os.listdir(ours / "all")) == sorted(os.listdir(tmp_path / "all")) == [f"rank_{r}" for r in range(4)]
    for rank in range(4):
        name = f"all/rank_{rank}/net.safetensors"
        assert (ours / name).read_bytes() == (tmp_path / name).read_bytes(), name
    assert os.listdir(ours / "one") == ["rank_1"]
    assert tensor_content(ours / "one/rank_1/net.ckpt") == tensor_content(tmp_path / "one/rank_1/net.ckpt")


def test_load_distributed_checkpoint_refusals(cases: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MpickptError, match="no networks"):
        mpickpt.load_distributed_checkpoint(object(), predict_strategy=str(DST), format="safetensors",
                                            unified_safetensors_dir=str(cases["ms"]))
    with pytest.raises(MpickptError, match="format='safetensors'"):
        mpickpt.load_distributed_checkpoint(None, checkpoint_filenames=["a.ckpt"], predict_strategy=str(DST))
    with pytest.raises(MpickptError, match="dst_safetensors_dir"):
        mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format="safetensors",
                                            unified_safetensors_dir=str(cases["ms"]))
    assert not any(tmp_path.iterdir())


_MS_LOAD_FORMATS = """
import sys
import mindspore as ms
for fmt, out in (("safetensors", "h5"), ("h5", "safetensors")):
    try:
        ms.load_distributed_checkpoint(None, predict_strategy=sys.argv[1], format=fmt, unified_safetensors_dir=sys.argv[2],
                                       dst_safetensors_dir="out", rank_id=0, output_format=out)
        print("written")
    except ValueError as error:
        print("ValueError:", error)
"""


@pytest.mark.parametrize("fmt,output_format", [("safetensors", "h5"), ("h5", "safetensors")])
def test_load_distributed_checkpoint_refuses_formats_mindspore_refuses(cases: dict[str, Path], tmp_path: Path,
                                                                       fmt: str, output_format: str) -> None:
    """output_format="h5" wrote rank_0/net.h5, a file MindSpore never writes: it refuses both values."""
    with pytest.raises(ValueError, match="'format' and 'output_format' must be 'ckpt' or 'safetensors'"):
        mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format=fmt,
                                            unified_safetensors_dir=str(cases["ms"]),
                                            dst_safetensors_dir=str(tmp_path / "out"), rank_id=0,
                                            output_format=output_format)
    assert not (tmp_path / "out").exists()


@requires_mindspore
@pytest.mark.mindspore
def test_mindspore_refuses_those_formats_too(cases: dict[str, Path], tmp_path: Path) -> None:
    lines = run_mindspore(_MS_LOAD_FORMATS, tmp_path, [str(DST), str(cases["ms"])]).strip().splitlines()[-2:]
    assert all(line.startswith("ValueError: For 'load_distributed_checkpoint', 'format' and 'output_format' must be")
               for line in lines), lines
    assert not (tmp_path / "out").exists()


def test_load_distributed_checkpoint_name_map_is_not_ignored(cases: dict[str, Path], tmp_path: Path) -> None:
    """MindSpore reads each parameter under its name_map name; mpickpt says it cannot."""
    with pytest.raises(NotImplementedError, match="name_map"):
        mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format="safetensors",
                                            unified_safetensors_dir=str(cases["ms"]),
                                            dst_safetensors_dir=str(tmp_path / "out"), name_map={"a": "b"})
    assert not (tmp_path / "out").exists()


def test_load_distributed_checkpoint_refuses_one_rank_folder(cases: dict[str, Path], tmp_path: Path) -> None:
    """A folder holding only rank_0/ is a sharded checkpoint's rank file, not full tensors: its slices would be
    laid out again as if whole (MindSpore finds no weight file there and refuses too)."""
    shutil.copytree(cases["st"] / "rank_0", tmp_path / "one" / "rank_0")
    with pytest.raises(MpickptError, match="is not a unified checkpoint"):
        mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format="safetensors",
                                            unified_safetensors_dir=str(tmp_path / "one"),
                                            dst_safetensors_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- bad unified folders ------------------------------------------------------------------------------


def broken(cases: dict[str, Path], tmp_path: Path) -> tuple[Path, dict]:
    """A writable copy of the hf folder and its index."""
    folder = tmp_path / "hf"
    shutil.copytree(cases["hf"], folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder, json.loads((folder / "model.safetensors.index.json").read_text())


def save_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def rewrite_shard(folder: Path, shard: str, change: dict[str, np.ndarray], drop: str | None = None) -> None:
    """Rewrite one shard with some float32 tensors added or replaced and one tensor dropped."""
    from mpickpt.formats import TensorSpec
    from mpickpt.formats.safetensors import SafetensorsWriter

    tensors = {name: value for name, value in tensor_content(folder / shard).items() if name != drop}
    tensors.update({name: ("Float32", tuple(a.shape), a.astype(np.float32).tobytes()) for name, a in change.items()})
    with SafetensorsWriter(folder / shard, sync=False) as writer:
        writer.declare([TensorSpec(n, d, dims, len(data)) for n, (d, dims, data) in tensors.items()])
        for name, (dtype, dims, data) in tensors.items():
            writer.write_tensor(name, dtype, dims, data)


def first_two(index: dict) -> tuple[str, str, str, str]:
    """Two parameters in two different shards: (name a, shard a, name b, shard b)."""
    items = list(index["weight_map"].items())
    a, shard_a = items[0]
    b, shard_b = next((n, s) for n, s in items if s != shard_a)
    return a, shard_a, b, shard_b


def refused(cases: dict[str, Path], folder: Path, tmp_path: Path, error: type[Exception], *needles: str) -> None:
    """transform refuses the folder with a typed error naming each needle, and writes nothing."""
    from mpickpt.transform import TransformJob, TransformOptions

    with pytest.raises(error) as caught:
        TransformJob.prepare(TransformOptions(src_dir=str(folder), dst_dir=str(tmp_path / "out"),
                                              dst_strategy=str(DST)))
    for needle in needles:
        assert needle in str(caught.value)
    done = transform(folder, tmp_path / "out")
    assert done.returncode == 2 and "mpickpt: error:" in done.stderr
    assert not (tmp_path / "out" / "rank_0").exists()


def test_index_naming_a_missing_shard(cases: dict[str, Path], tmp_path: Path) -> None:
    folder, index = broken(cases, tmp_path)
    a, shard_a, _, _ = first_two(index)
    (folder / shard_a).unlink()
    refused(cases, folder, tmp_path, SourceMissingError, shard_a, repr(a))


def test_tensor_in_two_shards(cases: dict[str, Path], tmp_path: Path) -> None:
    folder, index = broken(cases, tmp_path)
    a, _, _, shard_b = first_two(index)
    rewrite_shard(folder, shard_b, {a: np.zeros(4, np.float32)})
    refused(cases, folder, tmp_path, CheckpointFormatError, shard_b, repr(a))


def test_shard_missing_a_tensor_the_index_names(cases: dict[str, Path], tmp_path: Path) -> None:
    folder, index = broken(cases, tmp_path)
    a, shard_a, _, _ = first_two(index)
    rewrite_shard(folder, shard_a, {}, drop=a)
    refused(cases, folder, tmp_path, CheckpointFormatError, shard_a, repr(a), "missing")


def test_shard_holding_a_tensor_the_index_does_not_name(cases: dict[str, Path], tmp_path: Path) -> None:
    folder, index = broken(cases, tmp_path)
    _, shard_a, _, _ = first_two(index)
    rewrite_shard(folder, shard_a, {"stray.weight": np.zeros(3, np.float32)})
    refused(cases, folder, tmp_path, CheckpointFormatError, shard_a, "'stray.weight'", "does not name")


def test_shard_file_the_index_does_not_name(cases: dict[str, Path], tmp_path: Path) -> None:
    """MindSpore and Hugging Face read only the shards the index names: the others' tensors would be lost."""
    folder, index = broken(cases, tmp_path)
    _, _, _, shard_b = first_two(index)
    save_index(folder, {**index, "weight_map": {n: s for n, s in index["weight_map"].items() if s != shard_b}})
    refused(cases, folder, tmp_path, CheckpointFormatError, str(folder / shard_b), "names no parameter")


def test_index_naming_no_parameter(cases: dict[str, Path], tmp_path: Path) -> None:
    """A folder holding only an empty index (a failed download) would deploy empty checkpoints."""
    folder = tmp_path / "empty"
    folder.mkdir()
    save_index(folder, {"metadata": {"total_size": 0}, "weight_map": {}})
    refused(cases, folder, tmp_path, CheckpointFormatError, "model.safetensors.index.json", "names no parameter")


def test_index_leaving_out_a_numbered_shard_that_is_gone(cases: dict[str, Path], tmp_path: Path) -> None:
    folder, index = broken(cases, tmp_path)
    _, _, _, shard_b = first_two(index)
    save_index(folder, {**index, "weight_map": {n: s for n, s in index["weight_map"].items() if s != shard_b}})
    (folder / shard_b).unlink()
    refused(cases, folder, tmp_path, CheckpointFormatError, "model.safetensors.index.json", shard_b, "incomplete")


def test_both_index_files_must_agree(cases: dict[str, Path], tmp_path: Path) -> None:
    """MindSpore reads param_name_map.json, Hugging Face model.safetensors.index.json: equal ones are fine."""
    folder, index = broken(cases, tmp_path)
    (folder / "param_name_map.json").write_text(json.dumps(index))
    done = transform(folder, tmp_path / "same")
    assert done.returncode == 0, done.stderr
    a, _, _, _ = first_two(index)
    (folder / "param_name_map.json").write_text(json.dumps({n: s for n, s in index["weight_map"].items() if n != a}))
    refused(cases, folder, tmp_path, CheckpointFormatError, "param_name_map.json", "list different shards")


def test_unified_folder_holding_rank_folders(cases: dict[str, Path], tmp_path: Path) -> None:
    """Rank folders beside an index are two checkpoints in one folder: neither is picked silently."""
    folder, _ = broken(cases, tmp_path)
    shutil.copytree(cases["st"] / "rank_0", folder / "rank_0")
    refused(cases, folder, tmp_path, MpickptError, "rank_<r> folders", "model.safetensors.index.json")


@pytest.mark.parametrize("unified", ["model.safetensors", "model.h5"])
def test_single_unified_file_beside_rank_folders(cases: dict[str, Path], tmp_path: Path, unified: str) -> None:
    folder = tmp_path / "both"
    shutil.copytree(cases["st"], folder)
    shutil.copy(cases["hf_one"] / "model-00001-of-00001.safetensors", folder / unified)
    refused(cases, folder, tmp_path, MpickptError, "rank_<r> folders", unified)


def test_mindspore_folder_with_a_hyper_param_also_in_a_part(cases: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "ms"
    shutil.copytree(cases["ms"], folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    name = next(iter(json.loads((folder / "param_name_map.json").read_text())["weight_map"]))
    rewrite_shard(folder, "hyper_param.safetensors", {name: np.zeros(2, np.float32)})
    refused(cases, folder, tmp_path, CheckpointFormatError, repr(name), "two shards")


def test_shape_disagreeing_with_the_target_strategy(cases: dict[str, Path], tmp_path: Path) -> None:
    folder, index = broken(cases, tmp_path)
    name = "model.layers.0.attention.wq.weight"
    shard = index["weight_map"][name]
    with open_index(folder / shard) as source:
        rows, cols = source.entries[name].dims
    rewrite_shard(folder, shard, {name: np.zeros((rows - 1, cols), np.float32)})
    with pytest.raises(LayoutError) as caught:
        from mpickpt.transform import TransformJob, TransformOptions

        TransformJob.prepare(TransformOptions(src_dir=str(folder), dst_dir=str(tmp_path / "out"),
                                              dst_strategy=str(DST)))
    assert repr(name) in str(caught.value) and str(DST) in str(caught.value)
    assert not (tmp_path / "out" / "rank_0").exists()


@requires_mindspore
def test_load_distributed_checkpoint_to_a_pipeline_strategy_equals_mindspore(mindspore_cases: dict,
                                                                               tmp_path: Path) -> None:
    """Each rank holds the parameters of its pipeline stage only (plus hyper_param.safetensors)."""
    case = mindspore_cases["pipeline_2x4_to_4"]
    ckpt_to_safetensors(case.src_dir, tmp_path / "st")
    mpickpt.unified_safetensors(str(tmp_path / "st"), case.strategy("src"), str(tmp_path / "u"))
    script = (f"import mindspore as ms\nms.load_distributed_checkpoint(None, predict_strategy="
              f"{case.strategy('src')!r}, format='safetensors', unified_safetensors_dir='u', "
              f"dst_safetensors_dir='theirs', max_process_num=2)")
    run_mindspore(script, tmp_path)
    mpickpt.load_distributed_checkpoint(None, predict_strategy=case.strategy("src"), format="safetensors",
                                        unified_safetensors_dir=str(tmp_path / "u"),
                                        dst_safetensors_dir=str(tmp_path / "ours"))
    ranks = sorted(os.listdir(tmp_path / "theirs"))
    assert ranks == sorted(os.listdir(tmp_path / "ours")) and len(ranks) == 8
    sizes = set()
    for rank in ranks:
        ours = tensor_content(tmp_path / "ours" / rank / "net.safetensors")
        assert ours == tensor_content(tmp_path / "theirs" / rank / "net.safetensors"), rank
        sizes.add(len(ours))
    assert len(sizes) == 2  # the two stages hold different parameters


def test_a_hyper_param_the_target_strategy_lays_out_is_refused(cases: dict[str, Path], tmp_path: Path) -> None:
    """MindSpore's hyper_param.safetensors holds rank 0's stored value (for accu_grads*, a slice): a target
    strategy laying it out would slice a slice, so the deploy refuses it; load_distributed_checkpoint copies
    it whole, as MindSpore does."""
    folder = tmp_path / "ms"
    shutil.copytree(cases["ms"], folder)
    for file in folder.iterdir():
        file.chmod(0o644)
    index = json.loads((folder / "param_name_map.json").read_text())
    name = "model.layers.0.attention.wq.weight"
    part = folder / index["weight_map"].pop(name)
    kept = tensor_content(part)[name]
    rewrite_shard(folder, part.name, {}, drop=name)
    (folder / "param_name_map.json").write_text(json.dumps(index))
    from mpickpt.formats import TensorSpec
    from mpickpt.formats.safetensors import SafetensorsWriter

    hyper = tensor_content(folder / "hyper_param.safetensors") | {name: kept}
    with SafetensorsWriter(folder / "hyper_param.safetensors", sync=False) as writer:
        writer.declare([TensorSpec(n, d, dims, len(data)) for n, (d, dims, data) in hyper.items()])
        for n, (d, dims, data) in hyper.items():
            writer.write_tensor(n, d, dims, data)
    done = transform(folder, tmp_path / "out")
    assert done.returncode == 2 and "hyper_param.safetensors" in done.stderr and repr(name) in done.stderr
    assert not list((tmp_path / "out").glob("rank_*/*.ckpt"))
    mpickpt.load_distributed_checkpoint(None, predict_strategy=str(DST), format="safetensors",
                                        unified_safetensors_dir=str(folder), dst_safetensors_dir=str(tmp_path / "l"),
                                        rank_id=2)
    assert tensor_content(tmp_path / "l" / "rank_2" / "net.safetensors")[name] == kept


def test_unify_a_unified_folder_into_the_other_layout(cases: dict[str, Path], tmp_path: Path) -> None:
    """A MindSpore unified folder (its hyper_param.safetensors included) re-laid out as Hugging Face shards."""
    run_unify(UnifyOptions(str(cases["ms"]), str(tmp_path / "hf"), layout="hf", max_shard_size=2 << 20),
              SerialComm(), sync=False)
    assert tensor_content(tmp_path / "hf") == tensor_content(cases["ms"])
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1


def test_deploy_an_h5_file(cases: dict[str, Path], tmp_path: Path) -> None:
    """A folder holding one HDF5 file of full tensors (from unify --format h5), or the file itself, deploys
    like the sources."""
    pytest.importorskip("h5py")
    run_unify(UnifyOptions(str(cases["st"]), str(tmp_path / "h5" / "model.h5"), str(TINY / "src_strategy.ckpt"),
                           fmt="h5"), SerialComm(), sync=False, manifest=False)
    for source, out in ((tmp_path / "h5", "out"), (tmp_path / "h5" / "model.h5", "out_from_file")):
        done = transform(source, tmp_path / out, "--output-format", "safetensors")
        assert done.returncode == 0, done.stderr
        for rank in range(4):
            name = f"rank_{rank}/checkpoint_{rank}.safetensors"
            assert (tmp_path / out / name).read_bytes() == (cases["direct"] / name).read_bytes()
