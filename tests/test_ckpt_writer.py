"""The streaming checkpoint writer: byte identity with MindSpore's encoding, splitting, atomicity."""

from __future__ import annotations

import errno
import mmap
import socket
import stat
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_ckpt_reader import mindspore_checkpoints, pb_entry, pb_maptensor_entry

from mpickpt.ckpt import CheckpointWriter, index_checkpoint, save_checkpoint
from mpickpt.errors import CheckpointFormatError, DestinationError
from mpickpt.formats import offsets


def rewrite(src: Path, dst: Path, how: str) -> None:
    """Read every entry of ``src`` and write it to ``dst`` in the same order, in one of three ways."""
    with index_checkpoint(src) as index, CheckpointWriter(dst, crc=index.crc is not None) as writer:
        for entry in index.entries.values():
            if how == "buffer":
                writer.write_tensor(entry.name, entry.dtype, entry.dims, b"".join(index.raw(entry.name)))
            elif how == "chunks":
                data = b"".join(index.raw(entry.name))
                chunks = [data[i : i + 7] for i in range(0, len(data), 7)]
                writer.write_tensor_chunks(entry.name, entry.dtype, entry.dims, len(data), chunks)
            else:
                writer.copy_entry(index, entry.name)


def test_mindspore_checkpoints_rewrite_byte_identically(mindspore_root: Path, tmp_path: Path) -> None:
    for index, path in enumerate(mindspore_checkpoints(mindspore_root)):
        out = tmp_path / f"out{index}.ckpt"
        rewrite(path, out, "buffer")
        assert out.read_bytes() == path.read_bytes(), path
        assert stat.S_IMODE(out.stat().st_mode) == 0o400


@pytest.mark.parametrize("how", ["chunks", "copy"])
@pytest.mark.parametrize("name", ["crc.ckpt", "all_dtypes.ckpt", "append_info.ckpt"])
def test_sample_rewrites_byte_identically_streamed(format_samples: Path, tmp_path: Path, name: str, how: str) -> None:
    out = tmp_path / "out.ckpt"
    rewrite(format_samples / name, out, how)
    assert out.read_bytes() == (format_samples / name).read_bytes()


@pytest.mark.parametrize(
    ("dtype", "dims", "content"),
    [
        ("Float32", (), b"\0\0\x80\x3f"),
        ("Int8", (0, 5), b""),
        ("UInt8", (300, 1), bytes(range(256)) + bytes(44)),
        ("BFloat16", (2,), b"\x80\x3f\xc0\x3f"),
        ("Int4", (2, 2), b"\1\2\3\xfc"),
        ("str", (0,), "é€".encode("utf-32-le")),
        ("Float64", (1, 1, 1, 1, 1, 1, 1, 1), b"\0" * 8),
    ],
)
def test_entry_encoding_matches_protobuf(tmp_path: Path, dtype: str, dims: tuple[int, ...], content: bytes) -> None:
    name = "layer." + "x" * 200  # a name longer than one varint byte
    out = tmp_path / "one.ckpt"
    save_checkpoint(out, [(name, dtype, dims, content)], sync=False)
    assert out.read_bytes() == pb_entry(name, dtype, dims, content)


def test_large_dims_encode_as_multibyte_varints(tmp_path: Path) -> None:
    out = tmp_path / "big_dims.ckpt"
    with CheckpointWriter(out) as writer:
        writer.write_tensor_chunks("p", "UInt8", (0, 1 << 40), 0, [])
    assert out.read_bytes() == pb_entry("p", "UInt8", (0, 1 << 40), b"")


@pytest.mark.parametrize("how", ["buffer", "chunks", "copy", "copy-crc"])
def test_split_into_exact_pieces(tmp_path: Path, how: str) -> None:
    data = bytes(range(256)) * 4  # 1024 bytes, piece size 300 -> 300, 300, 300, 124
    expected = b"".join(pb_entry("w", "Int16", (512,), data[i : i + 300]) for i in range(0, 1024, 300))
    out = tmp_path / "split.ckpt"
    src = tmp_path / "src.bin"
    src.write_bytes(b"junk" + data)
    with CheckpointWriter(out, piece_size=300, crc=how == "copy-crc") as writer, src.open("rb") as f:
        if how == "buffer":
            writer.write_tensor("w", "Int16", (512,), np.frombuffer(data, np.int16))
        elif how == "chunks":
            writer.write_tensor_chunks("w", "Int16", [512], 1024, [data[:1], data[1:700], b"", data[700:]])
        else:
            writer.copy_tensor_from("w", "Int16", (512,), f.fileno(), 4, 1024)
    got = out.read_bytes()
    assert got[: len(expected)] == expected
    assert len(got) == len(expected) + (17 if how == "copy-crc" else 0)
    with index_checkpoint(out, verify_crc=True) as index:
        assert [n for _, n in index.entries["w"].pieces] == [300, 300, 300, 124]
    assert writer.file_crc == zlib.crc32(got)  # computed on the way out, kernel copies from their source


def test_file_crc_covers_every_route(tmp_path: Path) -> None:
    """The whole file's CRC-32, known to the writer once committed, for buffers, chunks, kernel copies of
    ranges that cross the mapping granularity, several sources, MapTensors and empty tensors."""
    data = np.random.default_rng(3).integers(0, 256, 3 * mmap.ALLOCATIONGRANULARITY + 999, np.uint8).tobytes()
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    out = tmp_path / "all.ckpt"
    with src.open("rb") as f, src.open("rb") as g:
        writer = CheckpointWriter(out, piece_size=5000)
        with writer:
            writer.write_tensor("a", "UInt8", (7,), data[:7])
            writer.write_tensor_chunks("b", "UInt8", (300,), 300, [data[9:100], data[100:309]])
            writer.copy_tensor_ranges("c", "UInt8", (len(data) - 4097,), f.fileno(), [(4097, len(data) - 4097)])
            writer.copy_tensor_segments("d", "UInt8", (20, 2), [(f.fileno(), 13, 30), (g.fileno(), 5001, 10)])
            writer.write_tensor("e", "Float32", (0, 3), np.empty((0, 3), np.float32))
            writer.write_maptensor("m", [data[:50]])
            assert writer.file_crc is None  # not before the file is complete
    assert writer.file_crc == zlib.crc32(out.read_bytes())


def test_copy_reads_through_pread_where_the_source_cannot_be_mapped(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def no_map(*args: object, **kwargs: object) -> object:
        raise OSError(errno.ENODEV, "no mmap here")

    src = tmp_path / "src.ckpt"
    save_checkpoint(src, [("w", "Float32", (64, 3), np.arange(192, dtype=np.float32)),
                          ("b", "BFloat16", (5,), np.arange(5, dtype=np.uint16)), ("s", "Int64", (), np.int64(3))])
    monkeypatch.setattr(offsets, "map_window", no_map)
    out = tmp_path / "copied.ckpt"
    rewrite(src, out, "copy")
    assert out.read_bytes() == src.read_bytes()


def test_maptensor_copies_through(tmp_path: Path) -> None:
    src = tmp_path / "map.ckpt"
    src.write_bytes(
        pb_maptensor_entry("m", [("int32", (1,), b"\1\0\0\0"), ("float32", (1, 2), b"\0" * 8)])
        + pb_maptensor_entry("m", [("int32", (1,), b"\2\0\0\0"), ("float32", (1, 2), b"\0" * 8)])
        + pb_entry("w", "Int8", (1,), b"\1")
    )
    out = tmp_path / "out.ckpt"
    rewrite(src, out, "copy")
    assert out.read_bytes() == src.read_bytes()


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "x.ckpt"
    with pytest.raises(RuntimeError), CheckpointWriter(out) as writer:
        writer.write_tensor("a", "Int8", (1,), b"\1")
        assert [p.name.endswith(".tmp") for p in tmp_path.iterdir()] == [True]
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_replaces_read_only_target_and_stale_tmp(tmp_path: Path) -> None:
    out = tmp_path / "x.ckpt"
    out.write_bytes(b"old")
    out.chmod(0o400)
    stale = tmp_path / f".x.ckpt.{socket.gethostname().split('.')[0]}.999999999.0000.tmp"  # a dead writer's
    stale.write_bytes(b"stale")
    stale.chmod(0o400)
    save_checkpoint(out, [("a", "Int8", (1,), b"\1")])
    assert out.read_bytes() == pb_entry("a", "Int8", (1,), b"\1")
    assert stat.S_IMODE(out.stat().st_mode) == 0o400
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]


def test_forbidden_dirs_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "rank_0").mkdir(parents=True)
    (tmp_path / "link").symlink_to(src / "rank_0")
    for target in [src / "x.ckpt", src / "rank_0" / "x.ckpt", tmp_path / "link" / "x.ckpt"]:
        with pytest.raises(DestinationError, match="refusing to write inside") as err:
            CheckpointWriter(target, forbidden_dirs=[str(src)])
        assert str(target) in str(err.value)
    assert sorted(p.name for p in (src / "rank_0").iterdir()) == []
    save_checkpoint(tmp_path / "ok.ckpt", [], forbidden_dirs=[src])
    assert (tmp_path / "ok.ckpt").read_bytes() == b""


def test_missing_folders_are_created(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "out" / "rank_0" / "x.ckpt", [("a", "Int8", (1,), b"\1")])
    assert stat.S_IMODE((tmp_path / "out" / "rank_0").stat().st_mode) == 0o700
    assert (tmp_path / "out" / "rank_0" / "x.ckpt").read_bytes() == pb_entry("a", "Int8", (1,), b"\1")


def test_unwritable_destination_is_a_destination_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(DestinationError, match="x.ckpt: cannot create a file here"):
        CheckpointWriter(tmp_path / "file" / "x.ckpt")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda w: w.write_tensor("p", "Float32", (2,), b"\0" * 7), r"'p' \(Float32 \[2\]\) needs 8 bytes, got 7"),
        (lambda w: w.write_tensor("p", "Complex64", (1,), b"\0" * 8), "'p' has unknown dtype 'Complex64'"),
        (lambda w: w.write_tensor("p", "Int8", (-1,), b""), r"'p' has invalid dims \[-1\]"),
        (lambda w: w.write_tensor("p", "str", (0,), b"abc"), "'p' must be UTF-32"),
        (lambda w: w.write_tensor("p", "Int8", (2, 2), np.zeros((2, 4), np.int8)[:, :2]), "'p' is not C-contiguous"),
        (lambda w: w.write_tensor_chunks("p", "Int8", (4,), 4, [b"ab", b"c"]), "'p' got 3 bytes of 4"),
        (lambda w: w.write_tensor_chunks("p", "Int8", (4,), 4, [b"abc", b"de"]), "'p' got more than 4 bytes"),
        (lambda w: (w.write_tensor("p", "Int8", (1,), b"1"), w.write_tensor("p", "Int8", (1,), b"1")),
         "'p' written twice"),
    ],
    ids=["size", "dtype", "dims", "str", "strided", "short-chunks", "long-chunks", "twice"],
)
def test_bad_input_names_file_and_parameter(tmp_path: Path, call: object, message: str) -> None:
    out = tmp_path / "bad.ckpt"
    with pytest.raises(CheckpointFormatError, match=message) as err, CheckpointWriter(out) as writer:
        call(writer)  # type: ignore[operator]
    assert str(out) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_copy_from_short_source_fails(tmp_path: Path) -> None:
    src = tmp_path / "short.bin"
    src.write_bytes(b"12345")
    with src.open("rb") as f, pytest.raises(CheckpointFormatError, match="'p' ends early"):
        with CheckpointWriter(tmp_path / "x.ckpt") as writer:
            writer.copy_tensor_from("p", "Int8", (8,), f.fileno(), 0, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.bin"]


def test_use_after_commit_is_refused(tmp_path: Path) -> None:
    writer = CheckpointWriter(tmp_path / "x.ckpt", sync=False)
    writer.commit()
    with pytest.raises(DestinationError, match="already closed"):
        writer.write_tensor("p", "Int8", (1,), b"1")


@pytest.mark.parametrize(("dims", "problem"), [((1,) * 65, "65 dims, more than numpy's 64"),
                                                ((0, 1 << 62), r"dims \[0, 4611686018427387904\] are too large")])
def test_refuses_dims_no_reader_could_load(tmp_path: Path, dims: tuple[int, ...], problem: str) -> None:
    with pytest.raises(CheckpointFormatError, match=problem), CheckpointWriter(tmp_path / "x.ckpt") as writer:
        writer.write_tensor("w", "Float32", dims, b"")
    assert not list(tmp_path.iterdir())
