"""`mpickpt verify`: good outputs pass; one flipped byte, a missing, extra or reshaped parameter fail naming the
file and the parameter, even with the completion records and manifest rewritten to match the damage."""

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
from fixture_cases import Case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from random_cases import make_case, target_slices, write_case
from test_driver import run_threads
from test_exchange import SPLIT, options_for, split_sources

from mpickpt.ckpt import index_checkpoint, save_checkpoint
from mpickpt.driver import run_transform
from mpickpt.errors import SourceMissingError
from mpickpt.layout import Layouts
from mpickpt.manifest import MANIFEST_NAME, checksum, read_record, write_record
from mpickpt.mpi import SerialComm
from mpickpt.strategy import (
    LayoutItem,
    Strategy,
    StrategyItem,
    save_strategy,
    split_stage_prefix,
)
from mpickpt.testing.strategies import Conversion, conversions
from mpickpt.transform import TransformOptions
from mpickpt.verify import (
    Check,
    ContentJob,
    Problem,
    RemoteSlices,
    Verdict,
    deal,
    output_checks,
    run,
    verify_outputs,
    verify_records,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny_llama"
MPIEXEC = Path(sys.executable).parent / "mpiexec"
TIMEOUT = 60
EXTRAS = [("global_step", "Int32", (1,), np.array([7], dtype=np.int32)),
          ("learning_rate", "Float32", (), np.array(0.01, dtype=np.float32))]


def example_options(target: str, out: Path) -> TransformOptions:
    return TransformOptions(src_dir=str(EXAMPLE / "src"), dst_dir=str(out),
                            src_strategy=str(EXAMPLE / "src_strategy.ckpt"),
                            dst_strategy=str(EXAMPLE / f"dst_strategy_{target}.ckpt"))


def case_options(root: Path, out: Path) -> TransformOptions:
    return TransformOptions(src_dir=str(root / "src"), dst_dir=str(out), src_strategy=str(root / "src_strategy.ckpt"),
                            dst_strategy=str(root / "dst_strategy.ckpt"))


def convert(options: TransformOptions) -> None:
    run_transform(options, SerialComm(), sync=False, quiet=True)


def verify(options: TransformOptions) -> Verdict:
    return verify_outputs(options, SerialComm())


def outputs(folder: Path) -> list[Path]:
    return sorted(folder.glob("rank_*/*.ckpt"))


def rerecord(path: Path) -> None:
    """Rewrite the completion record and the manifest entry of `path` to match the file as it is now."""
    record = read_record(str(path))
    size, crc = path.stat().st_size, checksum(path)
    if record is not None:
        write_record(str(path), replace(record, size=size, checksum=crc), sync=False)
    manifest = path.parents[1] / MANIFEST_NAME
    if manifest.exists():
        data = json.loads(manifest.read_text())
        for entry in data["files"]:
            if entry["file"] == str(path.relative_to(path.parents[1])):
                entry.update(size=size, checksum=crc)
        manifest.write_text(json.dumps(data))


def flip(path: Path, name: str, position: int) -> None:
    """Invert one byte of a parameter's content (`position` counted within the content)."""
    with index_checkpoint(path) as index:
        offset, length = index.entry(name).pieces[0]
    assert 0 <= position < length
    path.chmod(0o600)
    with open(path, "r+b") as f:
        f.seek(offset + position)
        byte = f.read(1)[0]
        f.seek(offset + position)
        f.write(bytes([byte ^ 0xFF]))


def contents(path: Path) -> list[tuple[str, str, tuple[int, ...], np.ndarray]]:
    with index_checkpoint(path) as index:
        return [(e.name, e.dtype, e.dims, np.array(index.array(e.name))) for e in index.entries.values()]


def rewrite(path: Path, tensors: list[tuple[str, str, tuple[int, ...], np.ndarray]]) -> None:
    path.chmod(0o600)
    save_checkpoint(path, tensors, sync=False)
    rerecord(path)


def assert_names(verdict: Verdict, path: Path, param: str) -> None:
    assert not verdict.ok
    assert [(p.file, p.param) for p in verdict.problems] == [(str(path), param)], verdict.lines()
    assert str(path) in verdict.lines()[0] and repr(param) in verdict.lines()[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The example converted to 4, 6 and 16 ranks (read-only: tests that damage copy it first)."""
    root = tmp_path_factory.mktemp("example")
    for target in ("4", "6", "16"):
        convert(example_options(target, root / target))
    return {target: root / target for target in ("4", "6", "16")}


def copy_of(converted: dict[str, Path], target: str, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(converted[target], out)
    return out


# --- the shipped example ---------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["4", "6", "16"])
def test_example_outputs_verify(converted: dict[str, Path], target: str) -> None:
    verdict = verify(example_options(target, converted[target]))
    assert verdict.ok, verdict.lines()
    assert verdict.files == int(target) and verdict.params == 38 * int(target)
    assert verify_records(str(converted[target]), SerialComm()).ok


def test_one_flipped_byte_in_any_parameter_is_named(converted: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(converted, "6", tmp_path)
    path = out / "rank_1" / "checkpoint_1.ckpt"
    options = example_options("6", out)
    rng = np.random.default_rng(0)
    with index_checkpoint(path) as index:
        sizes = {e.name: e.nbytes for e in index.entries.values()}
    first = next(iter(sizes))
    damage = [(first, 0), (first, sizes[first] - 1)] + [(n, int(rng.integers(size))) for n, size in sizes.items()]
    for name, position in damage:
        flip(path, name, position)
        rerecord(path)
        assert_names(verify(options), path, name)
        flip(path, name, position)
    flip(path, first, 0)
    rerecord(path)
    assert verify_records(str(out), SerialComm()).ok  # the records were rewritten to match the damage
    flip(path, first, 0)
    rerecord(path)
    assert verify(options).ok


def test_flipped_byte_names_the_first_differing_element(converted: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(converted, "4", tmp_path)
    path = out / "rank_2" / "checkpoint_2.ckpt"
    name, _, dims, data = next(t for t in contents(path) if len(t[2]) == 2)
    row, col = dims[0] // 2, dims[1] - 1
    flip(path, name, (row * dims[1] + col) * data.itemsize)
    verdict = verify(example_options("4", out))
    assert_names(verdict, path, name)
    assert f"element [{row}, {col}] of the slice" in verdict.problems[0].text
    for record in [out / MANIFEST_NAME, *out.glob("rank_*/*.done.json")]:
        record.unlink()
    assert_names(verify(example_options("4", out)), path, name)  # no records needed


def test_problem_lines_are_capped_but_counted() -> None:
    problems = tuple(Problem(f"rank_{i}/c.ckpt", "w", "differs") for i in range(5))
    lines = Verdict(files=5, params=10, problems=problems, seconds=1.0, processes=2).lines(limit=2)
    assert lines[:2] == ["mpickpt: verify: MISMATCH: rank_0/c.ckpt: parameter 'w': differs",
                         "mpickpt: verify: MISMATCH: rank_1/c.ckpt: parameter 'w': differs"]
    assert lines[2:] == ["mpickpt: verify: ... and 3 more problems",
                         ("mpickpt: verify: FAILED: 5 of 5 files, 10 parameters do not match (5 problems) "
                          "by 2 processes in 1.00 s")]


@pytest.mark.parametrize("damage", ["missing", "extra", "dims", "dtype"])
def test_wrong_parameter_set_dims_or_dtype_fail(converted: dict[str, Path], tmp_path: Path, damage: str) -> None:
    out = copy_of(converted, "4", tmp_path)
    path = out / "rank_3" / "checkpoint_3.ckpt"
    tensors = contents(path)
    name, dtype, dims, data = next(t for t in tensors if len(t[2]) == 2 and t[2][0] != t[2][1])
    index = [t[0] for t in tensors].index(name)
    if damage == "missing":
        del tensors[index]
    elif damage == "extra":
        name = "surplus.weight"
        tensors.append((name, "Float32", (2,), np.zeros(2, np.float32)))
    elif damage == "dims":
        tensors[index] = (name, dtype, dims[::-1], data.reshape(dims[::-1]))
    else:
        tensors[index] = (name, "UInt16" if dtype == "BFloat16" else "Int32", dims, data)
    rewrite(path, tensors)
    verdict = verify(example_options("4", out))
    assert_names(verdict, path, name)
    assert {"missing": "is missing", "extra": "not expected", "dims": "expected", "dtype": "expected"}[damage] \
        in verdict.problems[0].text


def test_missing_output_file_fails(converted: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(converted, "4", tmp_path)
    path = out / "rank_0" / "checkpoint_0.ckpt"
    path.unlink()
    verdict = verify(example_options("4", out))
    assert not verdict.ok and verdict.problems[0].file == str(path) and "missing" in verdict.problems[0].text


def damage_stored_checksum(path: Path) -> None:
    """Change the checksum an output stores of itself (its content stays right): the last digit of a `.ckpt`
    crc_num trailer, a digit of a safetensors header's crc_num (same length, so every offset stays)."""
    path.chmod(0o600)
    data = bytearray(path.read_bytes())
    if path.suffix == ".ckpt":
        data[-1] ^= 0x01
    else:
        at = data.index(b'"crc_num":"') + len(b'"crc_num":"')
        data[at] = ord("1") if data[at] != ord("1") else ord("2")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("output_format", ["ckpt", "safetensors"])
def test_a_wrong_stored_checksum_fails(tmp_path: Path, output_format: str) -> None:
    """Outputs written with --crc hold MindSpore's checksum of their content; MindSpore refuses to load one
    whose checksum does not match, so verify must not call it right (it did: only the content was compared)."""
    options = replace(example_options("4", tmp_path / "out"), crc=True, output_format=output_format)
    convert(options)
    assert verify(options).ok
    path = tmp_path / "out" / "rank_2" / f"checkpoint_2.{output_format}"
    damage_stored_checksum(path)
    rerecord(path)
    verdict = verify(options)
    assert [(p.file, p.param) for p in verdict.problems] == [(str(path), None)], verdict.lines()
    assert "CRC check failed" in verdict.problems[0].text


def test_records_alone_detect_changed_missing_and_unlisted_files(converted: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(converted, "4", tmp_path)
    changed, gone = out / "rank_1" / "checkpoint_1.ckpt", out / "rank_2" / "checkpoint_2.ckpt"
    with index_checkpoint(changed) as index:
        first = next(iter(index.entries))
    flip(changed, first, 3)
    gone.unlink()
    stray = out / "rank_3" / "stray.ckpt"
    shutil.copy(out / "rank_3" / "checkpoint_3.ckpt", stray)
    verdict = verify_records(str(out), SerialComm())
    found = {p.file: p.text for p in verdict.problems}
    assert set(found) == {str(changed), str(gone), str(stray)}
    assert "changed" in found[str(changed)] and "missing" in found[str(gone)] and "not listed" in found[str(stray)]


def test_records_alone_need_a_manifest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="manifest.json does not exist"):
        verify_records(str(tmp_path), SerialComm())


def test_records_of_a_unify_folder_are_refused_by_name(tmp_path: Path) -> None:
    """A unify folder's manifest.json holds no checksums: said plainly (was "not a readable manifest
    (KeyError: 'files')")."""
    from mpickpt.unify import UnifyOptions, run_unify

    out = tmp_path / "unified"
    run_unify(UnifyOptions(str(EXAMPLE / "src"), str(out), str(EXAMPLE / "src_strategy.ckpt")), SerialComm(),
              sync=False)
    with pytest.raises(ValueError, match=r"manifest.json: written by `mpickpt unify`, whose manifest holds no "
                                         r"checksums; verify --dst-dir checks the outputs of `mpickpt transform`"):
        verify_records(str(out), SerialComm())


def test_deal_balances_bytes() -> None:
    checks = [Check(f"f{i}", i, size) for i, size in enumerate([9, 1, 5, 5, 3])]
    shares = deal(checks, 2)
    assert sorted(c.path for share in shares for c in share) == sorted(c.path for c in checks)
    assert [sum(c.size for c in share) for share in shares] == [12, 11]


def test_checks_go_to_processes_that_see_the_outputs() -> None:
    # shared folder: process 1 lacks target 0's output, nobody has target 2's
    shared = [[(0, "/o/rank_0/c0", 9), (1, "/o/rank_1/c1", 5), (2, "/o/rank_2/c2", None)],
              [(0, "/o/rank_0/c0", None), (1, "/o/rank_1/c1", 5), (2, "/o/rank_2/c2", None)]]
    checks, seers, missing = output_checks(shared, False, "/o")
    assert checks == [Check("/o/rank_0/c0", 0, 9), Check("/o/rank_1/c1", 1, 5)] and seers == [(0,), (0, 1)]
    assert [(p.file, p.text) for p in missing] == [("/o/rank_2/c2", "output of target rank 2 is missing")]
    assert deal(checks, 2, seers) == [[checks[0]], [checks[1]]]
    # a folder per process: each output checked by its own process, a stale copy too
    own = [[(0, "/p0/rank_0/c0", 9), (1, "/p0/rank_1/c1", 2)], [(0, "/p1/rank_0/c0", 4), (1, "/p1/rank_1/c1", None)]]
    checks, seers, missing = output_checks(own, True, "/p{process}")
    assert checks == [Check("/p0/rank_0/c0", 0, 9), Check("/p0/rank_1/c1", 1, 2), Check("/p1/rank_0/c0", 0, 4)]
    assert seers == [(0,), (0,), (1,)] and not missing
    assert deal(checks, 2, seers) == [checks[:2], checks[2:]]
    _, _, alone = output_checks([own[0][:1]], True, "/p{process}")
    assert alone == [] and "verify under mpiexec" in output_checks([[(3, "/p0/c3", None)]], True, "/p{process}")[2][0].text


# --- random cases ------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), pick=st.integers(0, 2**32 - 1))
def test_random_conversions_verify_and_one_flipped_byte_fails(tmp_path_factory: pytest.TempPathFactory, seed: int,
                                                              pick: int) -> None:
    root = tmp_path_factory.mktemp("random")
    write_case(make_case(seed), root)
    options = case_options(root, root / "out")
    convert(options)
    assert verify(options).ok
    rng = np.random.default_rng(pick)
    path = outputs(root / "out")[int(rng.integers(len(outputs(root / "out"))))]
    with index_checkpoint(path) as index:
        entry = list(index.entries.values())[int(rng.integers(len(index.entries)))]
    flip(path, entry.name, int(rng.integers(entry.nbytes)))
    rerecord(path)
    assert_names(verify(options), path, entry.name)


def redundancy_removed(root: Path, strategy: Strategy) -> None:
    """Keep each distinct slice in one rank file only, rotating over its holders (as MindSpore's
    remove_redundancy saves); parameters outside the strategy stay in every file."""
    layouts = Layouts.from_strategy(strategy)
    files = {r: root / "src" / f"rank_{r}" / f"checkpoint_{r}.ckpt" for r in range(layouts.device_count)}
    kept: dict[int, list[str]] = {r: [] for r in files}
    for i, name in enumerate(layouts.names):
        layout = layouts.layout(name, 0)
        groups: dict[tuple[int, ...], list[int]] = {}
        for rank in files:
            groups.setdefault(layout.chunk(rank), []).append(rank)
        for holders in groups.values():
            kept[holders[i % len(holders)]].append(name)
    for rank, path in files.items():
        tensors = [t for t in contents(path) if t[0] in kept[rank] or t[0] not in layouts.names]
        path.chmod(0o600)
        save_checkpoint(path, tensors, sync=False)


def write_truth(root: Path, case: object, out: Path) -> None:
    """The target slices of the full tensors, written directly (not by the converter)."""
    for rank, slices in enumerate(target_slices(case)):
        tensors = [(n, case.tensors[n][0], a.shape, np.ascontiguousarray(a)) for n, a in slices.items()]
        path = out / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, tensors + EXTRAS, sync=False)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_redundancy_removed_sources(tmp_path_factory: pytest.TempPathFactory, seed: int) -> None:
    root = tmp_path_factory.mktemp("redundancy")
    case = make_case(seed)
    write_case(case, root)
    redundancy_removed(root, case.src)
    write_truth(root, case, root / "out")
    options = case_options(root, root / "out")
    assert verify(options).ok
    converted = case_options(root, root / "converted")
    convert(converted)
    assert verify(converted).ok
    path = outputs(root / "out")[-1]
    name = next(iter(case.tensors))
    flip(path, name, 0)
    assert_names(verify(options), path, name)


def test_a_slice_no_source_file_holds_fails(tmp_path: Path) -> None:
    """The checker's own coverage check (transform refuses such sources before verify gets this far)."""
    case = make_case(3, devices=(4, 2))
    write_case(case, tmp_path)
    write_truth(tmp_path, case, tmp_path / "out")
    name = next(iter(case.tensors))
    layouts = Layouts.from_strategy(case.src)
    shape = case.tensors[name][1].shape
    first = layouts.slice_box(name, shape, 0)
    for rank in range(layouts.device_count):
        if layouts.slice_box(name, shape, rank) == first:
            path = tmp_path / "src" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
            path.chmod(0o600)
            save_checkpoint(path, [t for t in contents(path) if t[0] != name], sync=False)
    files = {r: str(tmp_path / "src" / f"rank_{r}" / f"checkpoint_{r}.ckpt") for r in range(layouts.device_count)}
    checks = tuple(Check(str(p), int(p.parent.name.split("_")[1]), 0) for p in outputs(tmp_path / "out"))
    verdict = run(lambda: ContentJob(case.src, case.dst, None, files, checks), SerialComm())
    assert not verdict.ok and {p.param for p in verdict.problems} == {name}
    assert all("no source file holds region" in p.text for p in verdict.problems)


# --- pipeline sources -----------------------------------------------------------------------------------


def write_sources(conversion: Conversion, root: Path, seed: int) -> None:
    """Random full tensors split by the source strategy into one file per source rank (global_step too)."""
    rng = np.random.default_rng(seed)
    full = {n: rng.integers(-1000, 1000, size=s).astype(np.float32) for n, s in conversion.shapes.items()}
    layouts = Layouts.from_strategy(conversion.src)
    for rank in range(layouts.device_count):
        tensors = []
        for name, data in full.items():
            box = layouts.slice_box(name, data.shape, rank) if layouts.holds(name) else None
            if box is not None:
                piece = data[tuple(slice(a, b) for a, b in zip(box.start, box.stop))].copy()  # 0-d stays 0-d
                tensors.append((name, "Float32", box.shape, piece))
        path = root / "src" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, tensors + EXTRAS[:1], sync=False)


def stage_files(merged: Strategy, folder: Path) -> None:
    """Split a merged pipeline strategy into one file per stage, as each stage's ranks save them."""
    folder.mkdir()
    for node in merged.strategy_items:
        items = tuple(replace(i, name=split_stage_prefix(i.name)[1]) for i in merged.layout_items
                      if split_stage_prefix(i.name)[0] == node.stage)
        save_strategy(Strategy(current_stage=0, strategy_items=(node,), layout_items=items),
                      folder / f"src_strategy_{node.stage}.ckpt")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversion=conversions(max_params=3, missing=True), seed=st.integers(0, 2**16))
def test_converted_random_layouts_and_pipelines_verify(tmp_path_factory: pytest.TempPathFactory,
                                                       conversion: Conversion, seed: int) -> None:
    root = tmp_path_factory.mktemp("pipeline")
    write_sources(conversion, root, seed)
    names = {}
    for which, strategy in (("src", conversion.src), ("dst", conversion.dst)):
        if strategy is not None:
            names[which] = str(root / f"{which}_strategy.ckpt")
            save_strategy(strategy, names[which])
    options = TransformOptions(src_dir=str(root / "src"), dst_dir=str(root / "out"),
                               src_strategy=names.get("src"), dst_strategy=names.get("dst"))
    convert(options)
    verdict = verify(options)
    assert verdict.ok, verdict.lines()
    if conversion.src is not None and conversion.src.stage_count > 1:
        stage_files(conversion.src, root / "stages")
        by_folder = replace(options, src_strategy=None, src_strategy_dir=str(root / "stages"))
        assert verify(by_folder).ok
    path = outputs(root / "out")[0]
    with index_checkpoint(path) as index:
        entry = next((e for e in index.entries.values() if e.nbytes), None)
    if entry is not None:
        flip(path, entry.name, entry.nbytes - 1)
        assert_names(verify(options), path, entry.name)


def test_pipeline_subnetwork_outputs_verify(tmp_path: Path) -> None:
    """One stage's unmerged strategy file as the source: outputs `<prefix>t_part<stage>.ckpt` hold its part."""
    def layout(name: str, dev: tuple[int, ...], tensor_map: tuple[int, ...]) -> LayoutItem:
        return LayoutItem(name=name, dev_matrix=dev, tensor_map=(tensor_map,), param_split_shape=((),))

    stages = [["a", "b"], ["c", "d"]]
    full = {n: np.arange(64, dtype=np.float32).reshape(8, 8) * (i + 1) for i, n in enumerate("abcd")}
    for stage, names in enumerate(stages):
        items = tuple(layout(n, (2,), (0, -1)) for n in names)
        save_strategy(Strategy(0, (StrategyItem(f"MatMul-op{stage}", stage, ((2, 1),)),), items),
                      tmp_path / f"stage_{stage}.ckpt")
        for local in range(2):
            rank = 2 * stage + local
            tensors = [(n, "Float32", (4, 8), full[n][4 * local:4 * local + 4]) for n in names]
            (tmp_path / "src" / f"rank_{rank}").mkdir(parents=True)
            save_checkpoint(tmp_path / "src" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt", tensors + EXTRAS[:1])
    dst = Strategy(0, (StrategyItem("MatMul-op0", 0, ((1, 4),)),), tuple(layout(n, (4,), (-1, 0)) for n in "abcd"))
    save_strategy(dst, tmp_path / "dst.ckpt")
    options = TransformOptions(src_dir=str(tmp_path / "src"), dst_dir=str(tmp_path / "out"),
                               src_strategy=str(tmp_path / "stage_1.ckpt"), dst_strategy=str(tmp_path / "dst.ckpt"))
    convert(options)
    assert [p.name for p in outputs(tmp_path / "out")] == [f"checkpoint_{t}_part1.ckpt" for t in range(4)]
    verdict = verify(options)
    assert verdict.ok and verdict.params == 4 * 3, verdict.lines()
    path = outputs(tmp_path / "out")[2]
    flip(path, "d", 5)
    assert_names(verify(options), path, "d")


# --- under MPI ----------------------------------------------------------------------------------------------


def mpickpt(*args: str, processes: int = 0) -> subprocess.CompletedProcess[str]:
    """`mpickpt` as a subprocess, under `mpiexec -n processes` when given (a clean launcher environment)."""
    drop = ("PMI_", "PMIX_", "OMPI_", "MPI4PY_", "SLURM_", "HYDRA_", "MPICKPT_TEST")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    launcher = [str(MPIEXEC), "-n", str(processes)] if processes else []
    return subprocess.run([*launcher, sys.executable, "-m", "mpickpt", *args], capture_output=True, text=True,
                          env=env, timeout=TIMEOUT, cwd=REPO, check=False)


def example_args(target: str, out: Path) -> list[str]:
    return ["verify", "--src-dir", str(EXAMPLE / "src"), "--src-strategy", str(EXAMPLE / "src_strategy.ckpt"),
            "--dst-strategy", str(EXAMPLE / f"dst_strategy_{target}.ckpt"), "--dst-dir", str(out)]


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"MPICH's mpiexec is not at {MPIEXEC}")
def test_mpiexec_gives_the_same_verdict(converted: dict[str, Path], tmp_path: Path) -> None:
    out = copy_of(converted, "6", tmp_path)
    good = [mpickpt(*example_args("6", out), processes=n) for n in (0, 2)]
    assert [r.returncode for r in good] == [0, 0], [r.stdout + r.stderr for r in good]
    assert all("OK: 6 files, 228 parameters" in r.stdout for r in good)
    path = out / "rank_5" / "checkpoint_5.ckpt"
    with index_checkpoint(path) as index:
        name = list(index.entries)[-3]
    flip(path, name, 1)
    bad = [mpickpt(*example_args("6", out), processes=n) for n in (0, 2)]
    assert [r.returncode for r in bad] == [1, 1]
    assert bad[0].stdout.splitlines()[:-1] == bad[1].stdout.splitlines()[:-1]
    assert str(path) in bad[1].stdout
    records = [mpickpt("verify", "--dst-dir", str(out), processes=n) for n in (0, 2)]
    assert [r.returncode for r in records] == [1, 1] and all(str(path) in r.stdout for r in records)


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"MPICH's mpiexec is not at {MPIEXEC}")
def test_mpiexec_failure_in_one_process_ends_the_run(converted: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(EXAMPLE / "src", src)
    bad = src / "rank_5" / "checkpoint_5.ckpt"
    bad.chmod(0o600)
    bad.write_bytes(b"\xff" * 64)
    args = example_args("4", converted["4"])
    args[args.index("--src-dir") + 1] = str(src)
    result = mpickpt(*args, processes=2)
    assert result.returncode != 0 and str(bad) in result.stdout + result.stderr


# --- sources and outputs split over processes ({process} folders) ----------------------------------------


def split_args(case: Case, base: Path, command: str) -> list[str]:
    """`command` over base/src/p{process} sources and base/out/p{process} outputs."""
    return [command, "--src-dir", str(base / "src" / SPLIT), "--dst-dir", str(base / "out" / SPLIT),
            "--src-strategy", case.strategy("src"), "--dst-strategy", case.strategy("dst")]


def split_outputs(base: Path) -> list[Path]:
    return sorted((base / "out").glob("p*/rank_*/*.ckpt"))


def test_threads_verify_split_sources_and_per_process_outputs(tmp_path: Path, written_cases: dict[str, Case],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process checks the outputs in its own folder; rows of source files it lacks come over MPI."""
    case = written_cases["random_8to4"]
    split_sources(case, tmp_path / "src", 2)
    options = options_for(case, str(tmp_path / "src" / SPLIT), str(tmp_path / "out" / SPLIT))
    run_threads(2, lambda comm: run_transform(options, comm, quiet=True))
    received: list[int] = []
    real = RemoteSlices.read_into
    monkeypatch.setattr(RemoteSlices, "read_into",
                        lambda self, name, offset, out: received.append(len(out)) or real(self, name, offset, out))
    verdicts = run_threads(2, lambda comm: verify_outputs(options, comm))
    assert verdicts[0].ok and verdicts[0].files == 4 and verdicts[1] == verdicts[0], verdicts[0].lines()
    assert sum(received) > 0
    path = split_outputs(tmp_path)[-1]
    with index_checkpoint(path) as index:
        names = [e.name for e in index.entries.values() if e.nbytes]
    for name in names:
        flip(path, name, 0)
        assert_names(run_threads(2, lambda comm: verify_outputs(options, comm))[0], path, name)
        flip(path, name, 0)


@pytest.mark.skipif(not MPIEXEC.exists(), reason=f"MPICH's mpiexec is not at {MPIEXEC}")
def test_mpiexec_verifies_split_sources_and_outputs(tmp_path: Path, written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    split_sources(case, tmp_path / "src", 2)
    made = mpickpt(*split_args(case, tmp_path, "transform"), processes=2)
    assert made.returncode == 0, made.stdout + made.stderr
    assert {p.parent.parent.name for p in split_outputs(tmp_path)} == {"p0", "p1"}
    good = mpickpt(*split_args(case, tmp_path, "verify"), processes=2)
    assert good.returncode == 0 and "OK: 4 files" in good.stdout, good.stdout + good.stderr
    path = split_outputs(tmp_path)[-1]
    with index_checkpoint(path) as index:
        name = next(e.name for e in reversed(index.entries.values()) if e.nbytes)
    flip(path, name, 0)
    bad = mpickpt(*split_args(case, tmp_path, "verify"), processes=2)
    assert bad.returncode == 1 and f"MISMATCH: {path}: parameter {name!r}" in bad.stdout, bad.stdout + bad.stderr


def test_serially_a_template_naming_other_processes_folders_is_an_error(tmp_path: Path,
                                                                       written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    split_sources(case, tmp_path / "src", 2)
    options = options_for(case, str(tmp_path / "src" / SPLIT), str(tmp_path / "out"))
    with pytest.raises(SourceMissingError, match=r"ranks \[0, 2, 4, 6\] are missing.*run under mpiexec"):
        verify(options)
    refused = mpickpt(*split_args(case, tmp_path, "verify"))
    assert refused.returncode == 2 and str(tmp_path / "src" / SPLIT) in refused.stderr, refused.stderr
    assert "mpickpt: error:" in refused.stderr and "run under mpiexec" in refused.stderr


def test_serially_outputs_in_other_processes_folders_are_missing(tmp_path: Path,
                                                                 written_cases: dict[str, Case]) -> None:
    case = written_cases["random_8to4"]
    options = options_for(case, str(case.src_dir), str(tmp_path / "out" / SPLIT))
    run_threads(2, lambda comm: run_transform(options, comm, quiet=True))
    verdict = verify(options)
    theirs = sorted(str(tmp_path / "out" / "p0" / p.relative_to(tmp_path / "out" / "p1"))
                    for p in (tmp_path / "out" / "p1").glob("rank_*/*.ckpt"))
    assert theirs and sorted(p.file for p in verdict.problems) == theirs
    assert all("verify under mpiexec" in p.text for p in verdict.problems)
