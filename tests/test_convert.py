"""ckpt <-> safetensors conversion: MindSpore's names, layout, renaming and filtering, compared with
MindSpore's own converter; refusals where MindSpore would lose data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from mindspore_helpers import requires_mindspore, run_mindspore
from test_safetensors import header

import mpickpt.convert as convert_module
from mpickpt.ckpt import CheckpointWriter, index_checkpoint, save_checkpoint
from mpickpt.convert import (
    ckpt_to_safetensors,
    convert_file,
    output_folders,
    plan_conversion,
    safetensors_to_ckpt,
)
from mpickpt.errors import (
    CheckpointFormatError,
    DestinationError,
    MpickptError,
    SourceMissingError,
)
from mpickpt.formats import open_index
from mpickpt.formats.safetensors import index_safetensors


def params(seed: int, int4: bool = False) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, dims, content) of a small network, in a non-sorted order."""
    rng = np.random.default_rng(seed)
    out = [("layer.weight", "Float32", (3, 4), rng.standard_normal((3, 4)).astype(np.float32).tobytes()),
           ("emb", "BFloat16", (2, 3), rng.integers(0, 1 << 16, 6, dtype=np.uint16).tobytes()),
           ("bias", "Float16", (4,), rng.standard_normal(4).astype(np.float16).tobytes()),
           ("step", "Int64", (), np.int64(seed + 1).tobytes()),
           ("mask", "Bool", (2,), bytes([1, 0])),
           ("adam_m.layer.weight", "Float32", (3, 4), rng.standard_normal((3, 4)).astype(np.float32).tobytes())]
    if int4:
        out.append(("q", "Int4", (2, 2), bytes([1, 2, 3, 0xFC])))
    return out


def make_tree(root: Path) -> Path:
    """src/rank_0, rank_1 (several files, one not matching), rank_2 empty, a non-rank folder."""
    src = root / "src"
    save_checkpoint(src / "rank_0" / "net_0.ckpt", params(0))
    save_checkpoint(src / "rank_1" / "net_1.ckpt", params(1, int4=True))
    save_checkpoint(src / "rank_1" / "net_1.ckpt.ckpt", params(2))  # every ".ckpt" is replaced
    save_checkpoint(src / "rank_1" / "old.ckpt.bak", params(3))
    (src / "rank_2").mkdir()
    save_checkpoint(src / "other" / "x.ckpt", params(4))
    return src


def tree(root: Path) -> dict[str, str]:
    """Relative path -> "dir" or a digest of the file's content (headers compared as JSON)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_dir():
            out[rel] = "dir"
        elif path.suffix == ".safetensors":
            data = path.read_bytes()
            out[rel] = json.dumps(header(path), sort_keys=True) + data[8 + int.from_bytes(data[:8], "little"):].hex()
        else:
            out[rel] = path.read_bytes().hex()
    return out


MS_CONVERT = """
import json, sys, mindspore as ms
kwargs = json.loads(sys.argv[2])
getattr(ms, sys.argv[1])(**kwargs)
"""


def mindspore_convert(cwd: Path, function: str, **kwargs: object) -> None:
    run_mindspore(MS_CONVERT, cwd, [function, json.dumps(kwargs)])


# -- against MindSpore --------------------------------------------------------------------------


@requires_mindspore
def test_folder_round_trip_matches_mindspore(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    mindspore_convert(tmp_path, "ckpt_to_safetensors", file_path=str(src), save_path=str(tmp_path / "ms_st"))
    ckpt_to_safetensors(src, tmp_path / "our_st")
    assert tree(tmp_path / "our_st") == tree(tmp_path / "ms_st")
    assert set(tree(tmp_path / "our_st")) == {"rank_0", "rank_0/net_0.safetensors", "rank_1",
                                              "rank_1/net_1.safetensors", "rank_1/net_1.safetensors.safetensors",
                                              "rank_2"}
    assert (tmp_path / "our_st/rank_0/net_0.safetensors").read_bytes() == (
        tmp_path / "ms_st/rank_0/net_0.safetensors").read_bytes()  # one metadata key: byte-identical
    mindspore_convert(tmp_path, "safetensors_to_ckpt", file_path=str(tmp_path / "ms_st"),
                      save_path=str(tmp_path / "ms_ckpt"))
    safetensors_to_ckpt(tmp_path / "our_st", tmp_path / "our_ckpt")
    assert tree(tmp_path / "our_ckpt") == tree(tmp_path / "ms_ckpt")


@requires_mindspore
def test_name_map_regex_and_files_beside_sources_match_mindspore(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "a")
    shutil.copytree(src, tmp_path / "b" / "src")
    name_map = {"layer.weight": "net.layer.weight", "q": "quant"}
    mindspore_convert(tmp_path, "ckpt_to_safetensors", file_path=str(src), name_map=name_map,
                      file_name_regex=r"net_\d\.ckpt$")
    ckpt_to_safetensors(tmp_path / "b" / "src", name_map=name_map, file_name_regex=r"net_\d\.ckpt$")
    assert tree(tmp_path / "b" / "src") == tree(src)
    assert "rank_1/net_1.ckpt.safetensors" not in tree(src) and "rank_1/net_1.safetensors" in tree(src)
    back = {"net.layer.weight": "w"}
    mindspore_convert(tmp_path, "safetensors_to_ckpt", file_path=str(src / "rank_1" / "net_1.safetensors"),
                      save_path=str(tmp_path / "ms_file"), name_map=back)
    safetensors_to_ckpt(tmp_path / "b" / "src" / "rank_1" / "net_1.safetensors", tmp_path / "our_file", back)
    assert tree(tmp_path / "our_file") == tree(tmp_path / "ms_file") != {}


@requires_mindspore
def test_our_outputs_load_in_mindspore(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    ckpt_to_safetensors(src / "rank_1" / "net_1.ckpt", tmp_path / "out", processes_num=2)
    out = run_mindspore("import sys, mindspore as ms; p = ms.load_checkpoint(sys.argv[1], format='safetensors');"
                        "print(sorted((k, str(v.dtype)) for k, v in p.items()))", tmp_path,
                        [str(tmp_path / "out" / "net_1.safetensors")])
    assert "('q', 'Int4')" in out and "('emb', 'BFloat16')" in out


# -- on our own -----------------------------------------------------------------------------------


def test_content_survives_a_round_trip(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    ckpt_to_safetensors(src, tmp_path / "st", processes_num=2)
    safetensors_to_ckpt(tmp_path / "st", tmp_path / "back")
    for name in ("rank_0/net_0.ckpt", "rank_1/net_1.ckpt"):
        with index_checkpoint(src / name) as a, index_checkpoint(tmp_path / "back" / name) as b:
            assert list(b.entries) == sorted(a.entries)  # MindSpore's order: sorted names
            for key, entry in a.entries.items():
                assert b.entries[key].dtype == entry.dtype and b.entries[key].dims == entry.dims
                assert b"".join(b.raw(key)) == b"".join(a.raw(key))
    with index_safetensors(tmp_path / "st/rank_1/net_1.safetensors") as index:
        assert index.metadata == {"format": "ms", "q": "Int4"}
        assert (tmp_path / "st/rank_1/net_1.safetensors").stat().st_mode & 0o777 == 0o400


def test_tensor_split_into_ckpt_pieces(tmp_path: Path) -> None:
    data = np.arange(1000, dtype=np.float32)
    with CheckpointWriter(tmp_path / "a.ckpt", sync=False, piece_size=1000) as writer:
        writer.write_tensor("w", "Float32", data.shape, data)
    assert len(index_checkpoint(tmp_path / "a.ckpt").entry("w").pieces) == 4
    ckpt_to_safetensors(tmp_path / "a.ckpt")
    with index_safetensors(tmp_path / "a.safetensors") as index:
        assert index.array("w").tobytes() == data.tobytes()


def test_plan_lists_sizes_and_folders(tmp_path: Path) -> None:
    src = make_tree(tmp_path)
    plan = plan_conversion(src, tmp_path / "out", "safetensors")
    assert [(s.relative_to(src), d.relative_to(tmp_path / "out"), n) for s, d, n in plan] == [
        (Path(p), Path(q), (src / p).stat().st_size) for p, q in [
            ("rank_0/net_0.ckpt", "rank_0/net_0.safetensors"), ("rank_1/net_1.ckpt", "rank_1/net_1.safetensors"),
            ("rank_1/net_1.ckpt.ckpt", "rank_1/net_1.safetensors.safetensors")]]
    assert output_folders(src, tmp_path / "out") == [tmp_path / "out" / r for r in ("rank_0", "rank_1", "rank_2")]
    assert not (tmp_path / "out").exists()


def test_copies_in_the_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """convert keeps no checksum, so tensors move file to file without passing through memory."""
    save_checkpoint(tmp_path / "a.ckpt", params(0))
    copied = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: copied.append(a[2]) or real(*a))
    convert_file(tmp_path / "a.ckpt", tmp_path / "a.safetensors", "safetensors", sync=False)
    with open_index(tmp_path / "a.ckpt") as index:
        assert sorted(copied) == sorted(e.nbytes for e in index.entries.values())


def test_str_and_maptensor_are_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "s.ckpt", [("w", "Float32", (1,), bytes(4)),
                                          ("note", "str", (), "hi".encode("utf-32-le"))])
    with pytest.raises(CheckpointFormatError, match="'note' is a str value") as err:
        ckpt_to_safetensors(tmp_path / "s.ckpt")
    assert str(tmp_path / "s.safetensors") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ckpt"]


def test_a_parameter_named_like_a_metadata_key_is_refused(tmp_path: Path) -> None:
    """MindSpore writes it, then fails to load its own file (it reads the metadata value 'ms' as the dtype)."""
    save_checkpoint(tmp_path / "s.ckpt", [("format", "Float32", (1,), bytes(4))])
    with pytest.raises(CheckpointFormatError, match="'format' clashes with a metadata key") as err:
        ckpt_to_safetensors(tmp_path / "s.ckpt")
    assert str(tmp_path / "s.safetensors") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ckpt"]


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda t: ckpt_to_safetensors(t / "missing"), SourceMissingError, "valid path or file"),
    (lambda t: ckpt_to_safetensors(t / "src", t / "out.st"), DestinationError, "must be a directory"),
    (lambda t: ckpt_to_safetensors(t / "src" / "other"), SourceMissingError, "no directories starting with 'rank'"),
    (lambda t: safetensors_to_ckpt(t / "src" / "rank_0" / "net_0.ckpt"), MpickptError, "must be a .safetensors"),
    (lambda t: ckpt_to_safetensors(t / "src" / "rank_0" / "net_0.ckpt", file_name_regex="zzz"), MpickptError,
     "does not match"),
    (lambda t: ckpt_to_safetensors(t / "src", name_map=[("a", "b")]), MpickptError, "name_map must be a dict"),
    (lambda t: ckpt_to_safetensors(t / "src", processes_num=0), MpickptError, "processes_num"),
    (lambda t: ckpt_to_safetensors(t / "src" / "rank_0" / "net_0.ckpt", t / "o", {"bias": "emb"}),
     CheckpointFormatError, "'emb' and 'bias' the same name 'emb'"),
])
def test_refusals(tmp_path: Path, call: object, error: type, message: str) -> None:
    make_tree(tmp_path)
    with pytest.raises(error, match=message):
        call(tmp_path)  # type: ignore[operator]
    assert not (tmp_path / "o").exists() or list((tmp_path / "o").iterdir()) == []


def test_output_never_replaces_a_source(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "a.ckpt", params(0))
    os.link(tmp_path / "a.ckpt", tmp_path / "a.safetensors")
    with pytest.raises(DestinationError, match="refusing to replace source file"):
        ckpt_to_safetensors(tmp_path / "a.ckpt")
    with pytest.raises(DestinationError, match="refusing to replace source file"):
        convert_file(tmp_path / "a.ckpt", tmp_path / "a.safetensors", "safetensors")
    assert index_checkpoint(tmp_path / "a.ckpt").entries


def test_two_sources_with_one_output_are_refused(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "rank_0" / "a.ckpt.ckpt", params(0))
    save_checkpoint(tmp_path / "rank_0" / "a.safetensors.ckpt", params(1))
    with pytest.raises(DestinationError, match="both"):
        ckpt_to_safetensors(tmp_path, tmp_path / "out")


def test_cli_convert_round_trip_under_mpi_keeps_every_tensor(tmp_path: Path) -> None:
    import subprocess
    import sys

    from fixture_cases import assert_same_content

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama" / "src"
    mpiexec = Path(sys.executable).parent / "mpiexec"
    launcher = [str(mpiexec), "-n", "2"] if mpiexec.exists() else []
    there, back = tmp_path / "st", tmp_path / "back"
    for src, dst, to in ((example, there, "safetensors"), (there, back, "ckpt")):
        done = subprocess.run([*launcher, sys.executable, "-m", "mpickpt", "convert", str(src), str(dst), "--to", to,
                               "--no-sync"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "converted 8 file(s)" in done.stderr
    assert sorted(p.name for p in there.glob("rank_*/*")) == sorted(f"checkpoint_{r}.safetensors" for r in range(8))
    for original in sorted(example.glob("rank_*/*.ckpt")):
        assert_same_content(back / original.relative_to(example), original)


@pytest.mark.parametrize("to, regex", [("safetensors", "nomatch"), ("ckpt", None)])
def test_cli_convert_finding_nothing_to_convert_fails(tmp_path: Path, to: str, regex: str | None) -> None:
    """A regex matching no file, or --to the format the sources already have: non-zero, nothing written
    (MindSpore's functions, and ours, silently convert nothing)."""
    from mpickpt.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "tiny_llama" / "src"
    args = ["convert", str(example), str(tmp_path / "out"), "--to", to, "--no-sync"]
    assert main(args + (["--file-name-regex", regex] if regex else [])) == 2
    assert not (tmp_path / "out").exists()


def test_a_source_rewritten_in_place_during_its_conversion_leaves_no_output(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A file saved over while it is converted would give an output of two versions: nothing is committed."""
    src = tmp_path / "model.ckpt"
    save_checkpoint(src, [(name, dtype, list(dims), data) for name, dtype, dims, data in params(3)])
    real_open_writer = convert_module.open_writer

    def saving_over_it(*args: object, **kwargs: object) -> object:
        with open(src, "r+b") as f:  # the first tensors are being copied: rewrite the end in place
            f.seek(src.stat().st_size - 4)
            f.write(b"\xff" * 4)
        os.utime(src, ns=(1, 1))
        return real_open_writer(*args, **kwargs)

    monkeypatch.setattr(convert_module, "open_writer", saving_over_it)
    out = tmp_path / "model.safetensors"
    with pytest.raises(CheckpointFormatError, match=rf"{src}: the file changed while this run read it"):
        convert_file(src, out, "safetensors", sync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_cli_convert_names_earlier_outputs_it_left_beside_its_own(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Found: a rerun converting fewer files into the same destination (a --file-name-regex, or sources since
    pruned) left the earlier run's outputs in the rank folders without a word, exit 0: a folder mixing two
    runs, where MindSpore's loaders (and mpickpt's sources) take the largest-numbered file, the stale one.
    They are still left as they are (as transform leaves them), and now named."""
    from mpickpt.cli import main

    src, out = tmp_path / "src", tmp_path / "out"
    save_checkpoint(src / "rank_0" / "net-1_10.ckpt", params(0))
    save_checkpoint(src / "rank_0" / "net-2_10.ckpt", params(1))
    assert main(["convert", str(src), str(out), "--to", "safetensors", "--no-sync"]) == 0
    capsys.readouterr()
    assert main(["convert", str(src), str(out), "--to", "safetensors", "--no-sync", "--file-name-regex", "net-1"]) == 0
    err = capsys.readouterr().err
    assert "converted 1 file(s)" in err
    assert "1 file(s) of the destination are not from this run and were left as they are: " \
           f"{out / 'rank_0' / 'net-2_10.safetensors'}" in err
    assert sorted(p.name for p in (out / "rank_0").iterdir()) == ["net-1_10.safetensors", "net-2_10.safetensors"]
