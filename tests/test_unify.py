"""Unify: MindSpore's unified_safetensors layout (compared with MindSpore 2.10), the Hugging Face layout
(read back with the official safetensors package), parameter selection, and MPI runs equal to serial ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import safetensors

from fixture_cases import tensor_content
from mindspore_helpers import requires_mindspore, run_mindspore
from mpickpt.convert import ckpt_to_safetensors
from mpickpt.destination import LOCK_NAME, DestinationLock
from mpickpt.errors import DestinationError, MpickptError
from mpickpt.formats import open_index
from mpickpt.mpi import SerialComm
from mpickpt.strategy import describe_strategy, load_strategy
from mpickpt.unify import (
    UnifyOptions,
    _share,
    _split_by_size,
    parse_size,
    plan_unify,
    run_unify,
    unified_safetensors,
)

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny_llama"


def assert_same_folder(ours: Path, theirs: Path) -> None:
    """Same file names; same tensors and metadata in each safetensors file; equal JSON files."""
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    for name in os.listdir(theirs):
        if name.endswith(".json"):
            assert json.loads((ours / name).read_text()) == json.loads((theirs / name).read_text()), name
        else:
            assert tensor_content(ours / name) == tensor_content(theirs / name), name
            with open_index(ours / name) as a, open_index(theirs / name) as b:
                assert a.metadata == b.metadata, name


@pytest.fixture(scope="module")
def tiny_st(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama example (8 ranks tp2 x dp4, optimizer parallel) as safetensors."""
    out = tmp_path_factory.mktemp("tiny") / "st"
    ckpt_to_safetensors(TINY / "src", out)
    return out


@pytest.fixture(scope="module")
def tiny_full(tiny_st: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """The full tensors of the tiny example (a transform to one unsharded target)."""
    from mpickpt.api import transform_checkpoints

    out = tmp_path_factory.mktemp("full")
    transform_checkpoints(str(tiny_st), str(out), "c", str(TINY / "src_strategy.ckpt"), None,
                          output_format="safetensors")
    return tensor_content(out / "rank_0" / "c0.safetensors")


CHOICE = "lambda name: False if name.startswith('adam_v') else ('head.w' if name == 'lm_head.weight' else True)"


@requires_mindspore
@pytest.mark.parametrize("choice", [None, CHOICE])
def test_unified_safetensors_equals_mindspore(tiny_st: Path, tmp_path: Path, choice: str | None) -> None:
    strategy = TINY / "src_strategy.ckpt"
    run_mindspore(f"import mindspore as ms\nms.parallel.unified_safetensors({str(tiny_st)!r}, {str(strategy)!r}, "
                  f"'theirs', choice_func={choice})", tmp_path)
    unified_safetensors(str(tiny_st), str(strategy), str(tmp_path / "ours"),
                        choice_func=eval(choice) if choice else None)
    assert_same_folder(tmp_path / "ours", tmp_path / "theirs")
    names = json.loads((tmp_path / "ours" / "param_name_map.json").read_text())["weight_map"]
    assert ("head.w" in names) == (choice is not None)


def test_pipeline_ckpt_sources_equal_mindspore(mindspore_cases: dict, tmp_path: Path) -> None:
    """.ckpt sources of two pipeline stages with their per-stage strategy folder, against MindSpore on the
    same checkpoint as safetensors with the merged strategy."""
    case = mindspore_cases["pipeline_2x4_to_4"]
    ckpt_to_safetensors(case.src_dir, tmp_path / "st")
    run_mindspore(f"import mindspore as ms\nms.parallel.unified_safetensors('st', {case.strategy('src')!r}, "
                  f"'theirs')", tmp_path)
    unified_safetensors(str(case.src_dir), str(case.root / case.meta["src_pipeline_strategy_dir"]),
                        str(tmp_path / "ours"))
    assert_same_folder(tmp_path / "ours", tmp_path / "theirs")


def test_redundancy_removed_by_mindspore_equal_mindspore(redundancy_removed_case: tuple, tmp_path: Path) -> None:
    """Sources MindSpore's own functions made redundancy-removed (.ckpt), against MindSpore's unify of them
    as safetensors with merge_with_redundancy=False."""
    case, reduced = redundancy_removed_case
    ckpt_to_safetensors(reduced, tmp_path / "st")
    run_mindspore(f"import mindspore as ms\nms.parallel.unified_safetensors('st', {case.strategy('src')!r}, "
                  f"'theirs', merge_with_redundancy=False)", tmp_path)
    unified_safetensors(str(reduced), case.strategy("src"), str(tmp_path / "ours"))
    assert_same_folder(tmp_path / "ours", tmp_path / "theirs")


@requires_mindspore
def test_part_split_and_shares_equal_mindspore(tmp_path: Path) -> None:
    """The split into parts and the split_dst_file shares, against MindSpore's own functions."""
    rng = np.random.default_rng(0)
    sizes = {f"p{i}": int(s) for i, s in enumerate(rng.choice([4, 8, 8, 16, 100, 100, 3000], size=40))}
    script = (f"from mindspore.parallel.transform_safetensors import _split_weight_dict\n"
              f"import json\nsizes = {sizes!r}\n"
              f"print(json.dumps([_split_weight_dict(sizes, n) for n in (1, 3, 7, 40)]))")
    assert json.loads(run_mindspore(script, tmp_path)) == [_split_by_size(sizes, n) for n in (1, 3, 7, 40)]
    for parts, total in [(7, 3), (2, 5), (5, 5), (1, 1)]:
        covered = [i for share in range(1, total + 1) for i in range(*_share((share, total), parts))]
        assert covered == list(range(parts))
    assert _share((1, 3), 7) == (0, 3) and _share((2, 3), 7) == (3, 5) and _share((3, 3), 7) == (5, 7)


def test_split_dst_file_shares(tiny_st: Path, tmp_path: Path) -> None:
    """Share 1 of 1 writes everything; a bad share is refused."""
    unified_safetensors(str(tiny_st), str(TINY / "src_strategy.ckpt"), str(tmp_path / "a"), split_dst_file=(1, 1))
    unified_safetensors(str(tiny_st), str(TINY / "src_strategy.ckpt"), str(tmp_path / "b"))
    assert_same_folder(tmp_path / "a", tmp_path / "b")
    with pytest.raises(MpickptError, match="split_dst_file"):
        unified_safetensors(str(tiny_st), str(TINY / "src_strategy.ckpt"), str(tmp_path / "c"), split_dst_file=(2, 1))


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2MB", 2 * 10**6),
                                            ("2MiB", 2 << 20), ("1GiB", 1 << 30), ("1048576", 1 << 20),
                                            ("1.5kb", 1500), (7, 7)])
def test_parse_size(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "5 parsecs", "-1MB", "0", "GB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(MpickptError, match="max-shard-size"):
        parse_size(text)


def hf_options(src: Path, dst: Path, **kw: object) -> UnifyOptions:
    return UnifyOptions(src_dir=str(src), dst=str(dst), src_strategy=str(TINY / "src_strategy.ckpt"), layout="hf",
                        **kw)  # type: ignore[arg-type]


def test_hf_layout_loads_with_the_official_package(tiny_st: Path, tiny_full: dict, tmp_path: Path) -> None:
    limit = 300_000
    summary = run_unify(hf_options(tiny_st, tmp_path / "hf", max_shard_size=limit), SerialComm())
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    count = len(shards)
    assert count > 2 and summary.files == count
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert index["metadata"]["total_size"] == sum(len(v[2]) for v in tiny_full.values())
    loaded = {}
    for shard in shards:  # file by file, with the official package (numpy has no bfloat16: raw bytes)
        tensors = {name: (tuple(t["shape"]), bytes(t["data"]))
                   for name, t in safetensors.deserialize((tmp_path / "hf" / shard).read_bytes())}
        data = sum(len(t[1]) for t in tensors.values())
        assert data <= limit or len(tensors) == 1, f"{shard}: {data} bytes in {len(tensors)} tensors"
        loaded.update(tensors)
    for name, shard in index["weight_map"].items():  # through the index
        with safetensors.safe_open(str(tmp_path / "hf" / shard), framework="np") as f:
            assert name in f.keys()  # noqa: SIM118 - safe_open is no dict
    assert sorted(loaded) == sorted(tiny_full) == sorted(index["weight_map"])
    for name, (_, dims, data) in tiny_full.items():
        assert loaded[name] == (dims, data), name
    assert tensor_content(tmp_path / "hf") == tiny_full  # through the index, as a deploy source reads it


def test_hf_one_shard_still_numbered_with_index(tiny_st: Path, tmp_path: Path) -> None:
    run_unify(hf_options(tiny_st, tmp_path / "hf"), SerialComm())
    files = sorted(os.listdir(tmp_path / "hf"))
    assert files == [LOCK_NAME, "manifest.json", "model-00001-of-00001.safetensors", "model.safetensors.index.json"]


def test_cli_params_and_exclude(tiny_st: Path, tiny_full: dict, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    proc = subprocess.run([sys.executable, "-m", "mpickpt", "unify", "--src-dir", str(tiny_st), "--src-strategy",
                           str(TINY / "src_strategy.ckpt"), "--dst", str(out), "--layout", "hf", "--no-sync",
                           "--params", "*", "--exclude", "adam_*", "--exclude", "*norm*"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    kept = {n for n in tiny_full if not n.startswith("adam_") and "norm" not in n}
    assert set(tensor_content(out)) == kept
    left = sorted(set(tiny_full) - kept)
    assert f"left out {len(left)}: {left[0]}" in proc.stderr
    assert json.loads((out / "manifest.json").read_text())["left_out"] == [n for n in tiny_full if n in left]


def test_mindspore_layout_exclude_leaves_hyper_params_out_too(tiny_st: Path, tmp_path: Path) -> None:
    options = UnifyOptions(str(tiny_st), str(tmp_path / "u"), str(TINY / "src_strategy.ckpt"),
                           exclude=("adam_*", "global_step"))
    run_unify(options, SerialComm(), manifest=False)
    names = set(tensor_content(tmp_path / "u"))
    assert names and not any(n.startswith("adam_") or n == "global_step" for n in names)


MPIEXEC = Path(sys.executable).with_name("mpiexec")


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables."""
    drop = ("PMI_", "PMIX_", "OMPI_", "MPI4PY_", "SLURM_", "HYDRA_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def unify_serial_and_mpi(src: Path, flags: list[str], serial: Path, mpi: Path) -> None:
    """`mpickpt unify` of `src` with `flags` once serially into `serial`, once under `mpiexec -n 2` into `mpi`."""
    args = ["unify", "--src-dir", str(src), "--src-strategy", str(TINY / "src_strategy.ckpt"), *flags, "--no-sync"]
    for launcher, dst, env in (([], serial, None), ([str(MPIEXEC), "-n", "2"], mpi, clean_env())):
        done = subprocess.run([*launcher, sys.executable, "-m", "mpickpt", *args, "--dst", str(dst)],
                              capture_output=True, text=True, check=False, timeout=300, env=env)
        assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec at {MPIEXEC}")
@pytest.mark.parametrize("layout", ["hf", "mindspore"])
def test_mpi_two_processes_equal_serial(tiny_st: Path, tmp_path: Path, layout: str) -> None:
    unify_serial_and_mpi(tiny_st, ["--layout", layout, "--max-shard-size", "400kB"], tmp_path / "serial",
                         tmp_path / "mpi")
    for name in os.listdir(tmp_path / "serial"):
        if name not in ("manifest.json", LOCK_NAME):
            assert (tmp_path / "serial" / name).read_bytes() == (tmp_path / "mpi" / name).read_bytes(), name
    manifest = json.loads((tmp_path / "mpi" / "manifest.json").read_text())
    assert [p["process"] for p in manifest["processes"]] == [0, 1]
    if layout == "hf":  # several shards: both processes write a share
        assert all(p["files"] and p["bytes_written"] > 0 for p in manifest["processes"])


def test_refusals(tiny_st: Path, tmp_path: Path) -> None:
    with pytest.raises(MpickptError, match="source strategy"):
        plan_unify(UnifyOptions(str(tiny_st / "rank_0" / ".."), str(tmp_path / "o")))
    with pytest.raises(DestinationError):
        plan_unify(UnifyOptions(str(tiny_st), str(tiny_st / "inside"), str(TINY / "src_strategy.ckpt")))
    with pytest.raises(MpickptError, match="unknown layout"):
        plan_unify(UnifyOptions(str(tiny_st), str(tmp_path / "o"), layout="flat"))
    with pytest.raises(MpickptError, match="no parameter"):
        plan_unify(hf_options(tiny_st, tmp_path / "o", params=("nothing*",)))
    with pytest.raises(MpickptError, match="max_process_num"):
        unified_safetensors(str(tiny_st), str(TINY / "src_strategy.ckpt"), str(tmp_path / "o"), max_process_num=0)
    with pytest.raises(MpickptError, match="file_suffix"):
        unified_safetensors(str(tiny_st), str(TINY / "src_strategy.ckpt"), str(tmp_path / "o"), file_suffix="_1")
    assert not (tmp_path / "o").exists()


def remove_redundancy(src: Path, dst: Path) -> None:
    """Keep each distinct slice of a strategy parameter in one rank file only, rotating over its holders, with
    MindSpore's ``remove_redundancy`` marker; parameters outside the strategy stay in every file."""
    from mpickpt.formats import TensorSpec
    from mpickpt.formats.safetensors import SafetensorsWriter
    from mpickpt.layout import Layouts
    from mpickpt.strategy import load_strategy

    layouts = Layouts.from_strategy(load_strategy(TINY / "src_strategy.ckpt"))
    kept: dict[int, set[str]] = {r: set() for r in range(layouts.device_count)}
    for i, name in enumerate(layouts.names):
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in kept:
            groups.setdefault(layouts.layout(name, 0).chunk(rank), []).append(rank)
        for holders in groups.values():
            kept[holders[i % len(holders)]].add(name)
    for rank, names in kept.items():
        path = next((src / f"rank_{rank}").glob("*.safetensors"))
        tensors = {n: v for n, v in tensor_content(path).items() if n in names or not layouts.holds(n)}
        out = dst / f"rank_{rank}" / path.name
        with SafetensorsWriter(out, sync=False, metadata={"format": "ms", "remove_redundancy": "True"}) as writer:
            writer.declare([TensorSpec(n, d, dims, len(data)) for n, (d, dims, data) in tensors.items()])
            for name, (dtype, dims, data) in tensors.items():
                writer.write_tensor(name, dtype, dims, data)


@requires_mindspore
def test_redundancy_removed_sources_equal_mindspore(tiny_st: Path, tiny_full: dict, tmp_path: Path) -> None:
    remove_redundancy(tiny_st, tmp_path / "src")
    strategy = TINY / "src_strategy.ckpt"
    run_mindspore(f"import mindspore as ms\nms.parallel.unified_safetensors('src', {str(strategy)!r}, 'theirs', "
                  f"merge_with_redundancy=False)", tmp_path)
    unified_safetensors(str(tmp_path / "src"), str(strategy), str(tmp_path / "ours"))
    assert_same_folder(tmp_path / "ours", tmp_path / "theirs")
    with open_index(tmp_path / "ours" / "part0.safetensors") as part:
        assert part.metadata == {"format": "ms", "remove_redundancy": "False"}
    parts = tensor_content(tmp_path / "ours" / "part0.safetensors")
    assert parts == {n: v for n, v in tiny_full.items() if n in parts}


def test_a_rerun_leaves_no_file_of_the_earlier_run(tiny_st: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    run_unify(hf_options(tiny_st, out, max_shard_size=300_000), SerialComm(), sync=False)
    (out / "param_name_map.json").write_text("{}")
    (out / "notes.txt").write_text("kept")
    run_unify(hf_options(tiny_st, out), SerialComm(), sync=False)
    assert sorted(os.listdir(out)) == [LOCK_NAME, "manifest.json", "model-00001-of-00001.safetensors",
                                       "model.safetensors.index.json", "notes.txt"]


def folder_bytes(root: Path) -> dict[str, bytes]:
    """Every file directly in root, by name."""
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_unify_into_a_folder_another_run_is_writing_fails_and_leaves_it_alone(tiny_st: Path, tmp_path: Path) -> None:
    """Found: `unify` took no lock, so a second run into a folder a first one was writing removed the first
    one's shards and wrote its own among them: a folder mixing two runs, both exiting 0."""
    out = tmp_path / "hf"
    run_unify(hf_options(tiny_st, out, max_shard_size=300_000), SerialComm(), sync=False)
    holder = DestinationLock.acquire(str(out))  # another run (a transform or a unify) writing there now
    before = folder_bytes(out)
    try:
        with pytest.raises(DestinationError, match=f"another mpickpt run is writing here .*{LOCK_NAME}"):
            run_unify(hf_options(tiny_st, out), SerialComm(), sync=False)
    finally:
        holder.release()
    assert folder_bytes(out) == before
    run_unify(hf_options(tiny_st, out), SerialComm(), sync=False)  # once it has ended
    assert "model-00001-of-00001.safetensors" in os.listdir(out)


def test_a_failed_rerun_leaves_no_manifest_of_the_earlier_run(tiny_st: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: a rerun that failed after writing some shards left the earlier run's manifest.json beside them,
    as if the folder were the complete output of a run."""
    import mpickpt.unify as unify

    out = tmp_path / "hf"
    run_unify(hf_options(tiny_st, out, max_shard_size=300_000), SerialComm(), sync=False)
    assert (out / "manifest.json").exists()
    real_write_file = unify.write_file
    written: list[str] = []

    def failing_after_one(plan: object, file: unify.OutputFile, **kwargs: object) -> tuple[int, int]:
        if written:
            raise DestinationError(f"{file.path}: no space left (injected)")
        written.append(file.path)
        return real_write_file(plan, file, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(unify, "write_file", failing_after_one)
    with pytest.raises(DestinationError, match="injected"):
        run_unify(hf_options(tiny_st, out, max_shard_size=300_000), SerialComm(), sync=False)
    assert len(written) == 1
    assert not (out / "manifest.json").exists() and not (out / "model.safetensors.index.json").exists()


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"no mpiexec at {MPIEXEC}")
def test_h5_by_two_processes_equals_serial(tiny_st: Path, tiny_full: dict, tmp_path: Path) -> None:
    h5py = pytest.importorskip("h5py")
    unify_serial_and_mpi(tiny_st, ["--format", "h5"], tmp_path / "serial.h5", tmp_path / "mpi.h5")
    assert (tmp_path / "serial.h5").read_bytes() == (tmp_path / "mpi.h5").read_bytes()
    manifest = json.loads((tmp_path / "mpi.h5.manifest.json").read_text())
    assert [p["process"] for p in manifest["processes"]] == [0, 1]
    assert all(p["bytes_written"] > 0 for p in manifest["processes"])  # both wrote a share of the file
    assert tensor_content(tmp_path / "mpi.h5") == tiny_full
    with h5py.File(tmp_path / "mpi.h5", "r") as f:  # an ordinary HDF5 file
        name = "model.norm_out.weight"
        assert f[name][()].tobytes() == tiny_full[name][2]
        assert f[name].attrs["mindspore_dtype"] in (b"BFloat16", "BFloat16")
        layouts = json.loads(f.attrs["source_layouts"])
        assert {row["name"] for row in layouts} == {row["name"] for row in
                                                    describe_strategy(load_strategy(TINY / "src_strategy.ckpt"))}
        assert "mpickpt_version" in f.attrs
    dump = subprocess.run(["h5dump", "-H", str(tmp_path / "mpi.h5")], capture_output=True, text=True, check=False) \
        if shutil.which("h5dump") else None
    if dump is not None:
        assert dump.returncode == 0 and f'DATASET "{name}"' in dump.stdout


def test_h5_selection_and_refusals(tiny_st: Path, tiny_full: dict, tmp_path: Path) -> None:
    pytest.importorskip("h5py")
    options = UnifyOptions(str(tiny_st), str(tmp_path / "w.h5"), str(TINY / "src_strategy.ckpt"), fmt="h5",
                           exclude=("adam_*",))
    summary = run_unify(options, SerialComm(), sync=False)
    assert set(tensor_content(tmp_path / "w.h5")) == {n for n in tiny_full if not n.startswith("adam_")}
    assert summary.left_out and all(n.startswith("adam_") for n in summary.left_out)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DestinationError, match="is a file"):
        plan_unify(UnifyOptions(str(tiny_st), str(tmp_path / "folder"), str(TINY / "src_strategy.ckpt"), fmt="h5"))
    with pytest.raises(DestinationError):
        plan_unify(UnifyOptions(str(tiny_st), str(tiny_st / "x.h5"), str(TINY / "src_strategy.ckpt"), fmt="h5"))


def test_h5_into_a_folder_another_run_is_writing_fails_and_a_failed_rerun_leaves_no_manifest(
        tiny_st: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found: `unify --format h5` took no lock (a second run replaced the file another was writing, each
    manifest possibly describing the other's file, both exiting 0) and a failed rerun left the earlier
    run's manifest beside the file."""
    pytest.importorskip("h5py")
    import mpickpt.unify_h5 as unify_h5

    out = tmp_path / "h5" / "model.h5"
    options = UnifyOptions(str(tiny_st), str(out), str(TINY / "src_strategy.ckpt"), fmt="h5")
    run_unify(options, SerialComm(), sync=False)
    holder = DestinationLock.acquire(str(out.parent))  # another run (a transform or a unify) writing there now
    before = folder_bytes(out.parent)
    try:
        with pytest.raises(DestinationError, match=f"another mpickpt run is writing here .*{LOCK_NAME}"):
            run_unify(replace(options, exclude=("adam_*",)), SerialComm(), sync=False)
    finally:
        holder.release()
    assert folder_bytes(out.parent) == before

    def failing(*args: object, **kwargs: object) -> None:
        raise DestinationError(f"{out}: no space left (injected)")

    monkeypatch.setattr(unify_h5, "write_plan", failing)
    with pytest.raises(DestinationError, match="injected"):
        run_unify(replace(options, exclude=("adam_*",)), SerialComm(), sync=False)
    assert not (out.parent / "model.h5.manifest.json").exists()
    monkeypatch.undo()
    run_unify(options, SerialComm(), sync=False)  # the lock of the failed run is gone
    assert (out.parent / "model.h5.manifest.json").exists()


def test_h5_holds_str_values_and_refuses_maptensors_before_writing(tmp_path: Path) -> None:
    """An HDF5 file holds a str value (safetensors cannot): unify --format h5 keeps it, a deploy gives it back."""
    pytest.importorskip("h5py")
    from test_ckpt_reader import pb_entry, pb_maptensor_entry

    from mpickpt.api import transform_checkpoints
    from mpickpt.ckpt import save_checkpoint

    note = "héllo".encode("utf-32-le")
    save_checkpoint(tmp_path / "src" / "rank_0" / "a.ckpt", [("w", "Float32", (2,), np.ones(2, np.float32)),
                                                             ("note", "str", (0,), note)])
    run_unify(UnifyOptions(str(tmp_path / "src"), str(tmp_path / "h5" / "m.h5"), fmt="h5"), SerialComm(),
              sync=False, manifest=False)
    assert tensor_content(tmp_path / "h5" / "m.h5")["note"] == ("str", (0,), note)
    transform_checkpoints(str(tmp_path / "h5" / "m.h5"), str(tmp_path / "back"), "net_", None, None)
    assert tensor_content(tmp_path / "back" / "rank_0" / "net_0.ckpt")["note"] == ("str", (0,), note)
    mapped = tmp_path / "map" / "rank_0" / "a.ckpt"
    mapped.parent.mkdir(parents=True)
    mapped.write_bytes(pb_entry("w", "Float32", (1,), bytes(4))
                       + pb_maptensor_entry("m", [("int32", (1,), bytes(4)), ("float32", (1, 2), bytes(8))]))
    with pytest.raises(MpickptError, match=r"a.ckpt: parameter 'm' is a MapTensor value, which h5 cannot hold"):
        plan_unify(UnifyOptions(str(tmp_path / "map"), str(tmp_path / "out" / "m.h5"), fmt="h5"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("count, new_name", [(1, "format"), (1, "__metadata__"), (1, "remove_redundancy"),
                                             (2, "twice"), (1, "global_step")])
def test_names_a_part_cannot_hold_are_refused_before_writing(tiny_st: Path, tmp_path: Path, count: int,
                                                             new_name: str) -> None:
    """choice_func's new names: a metadata key of the part (remove_redundancy with redundancy-removed
    sources), one name for two parameters of a part, or the name of a parameter that hyper_param.safetensors
    keeps (two files would hold it: the index names one), are refused while planning; nothing is written."""
    from mpickpt.layout import Layouts

    remove_redundancy(tiny_st, tmp_path / "src")
    renamed = sorted(Layouts.from_strategy(load_strategy(TINY / "src_strategy.ckpt")).names)[:count]
    out = tmp_path / "out"
    with pytest.raises(MpickptError, match=rf"\.safetensors: parameters? .* stored as '{new_name}'"):
        unified_safetensors(str(tmp_path / "src"), str(TINY / "src_strategy.ckpt"), str(out),
                            choice_func=lambda n: new_name if n in renamed else True)
    assert not out.exists() or not list(out.iterdir())
