"""The header-only checkpoint indexer against protobuf's own parse and hand-made edge cases."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from fixture_cases import strategy_files

from mpickpt._proto import checkpoint_pb2
from mpickpt.ckpt import MAPTENSOR_DTYPE, dtype_itemsize, index_checkpoint, numpy_dtype, save_checkpoint
from mpickpt.errors import CheckpointFormatError, SourceMissingError


def mindspore_checkpoints(root: Path) -> list[Path]:
    """Every checkpoint MindSpore wrote for the session's cases and format samples."""
    return sorted(p for p in root.rglob("*.ckpt") if p not in strategy_files(root))


def pb_entry(tag: str, dtype: str, dims: tuple[int, ...], content: bytes) -> bytes:
    """One serialized ``Checkpoint`` message holding one tensor, as MindSpore writes each entry."""
    ckpt = checkpoint_pb2.Checkpoint()
    value = ckpt.value.add()
    value.tag = tag
    value.tensor.dims.extend(dims)
    value.tensor.tensor_type = dtype
    value.tensor.tensor_content = content
    return ckpt.SerializeToString()


def pb_maptensor_entry(tag: str, tensors: list[tuple[str, tuple[int, ...], bytes]]) -> bytes:
    """One serialized ``Checkpoint`` message holding a MapTensor (keys, values, status)."""
    ckpt = checkpoint_pb2.Checkpoint()
    value = ckpt.value.add()
    value.tag = tag
    for dtype, dims, content in tensors:
        tensor = value.maptensor.tensor.add()
        tensor.dims.extend(dims)
        tensor.tensor_type = dtype
        tensor.tensor_content = content
    return ckpt.SerializeToString()


def parse_with_protobuf(path: Path) -> list[tuple[str, str, tuple[int, ...], bytes]]:
    """(name, dtype, dims, content) per parameter, pieces joined, by protobuf's whole-message parser."""
    data = path.read_bytes()
    if data[-17:-10] == b"crc_num":
        data = data[:-17]
    ckpt = checkpoint_pb2.Checkpoint()
    ckpt.ParseFromString(data)
    out: list[tuple[str, str, tuple[int, ...], bytes]] = []
    for value in ckpt.value:
        t = value.tensor
        if out and out[-1][0] == value.tag:
            out[-1] = (*out[-1][:3], out[-1][3] + t.tensor_content)
        else:
            out.append((value.tag, t.tensor_type, tuple(t.dims), t.tensor_content))
    return out


def test_mindspore_checkpoints_match_protobuf_parse(mindspore_root: Path, format_samples: Path) -> None:
    paths = mindspore_checkpoints(mindspore_root)
    # full + sources + targets: seed 1+8+4, dp_to_tp 1+8+4, pipeline 1+8+4+8 by stage, full_to_8 1+1+8,
    # 8_to_full 1+8+1, and the 3 format samples
    assert len(paths) == 70 and format_samples / "crc.ckpt" in paths
    for path in paths:
        expected = parse_with_protobuf(path)
        with index_checkpoint(path, verify_crc=True) as index:
            got = [(e.name, e.dtype, e.dims, b"".join(index.raw(e.name))) for e in index.entries.values()]
            assert got == expected, path
            for name, dtype, dims, content in expected:
                array = index.array(name)
                assert array.tobytes() == content, (path, name)
                if dtype != "str":
                    assert array.shape == dims and array.dtype == numpy_dtype(dtype), (path, name)


def test_strategy_file_is_refused(mindspore_root: Path) -> None:
    for path in strategy_files(mindspore_root):
        with pytest.raises(CheckpointFormatError, match="not a MindSpore checkpoint") as err:
            index_checkpoint(path)
        assert str(path) in str(err.value)


def test_all_dtypes_sample(format_samples: Path) -> None:
    with index_checkpoint(format_samples / "all_dtypes.ckpt") as index:
        bf16 = index.array("p_BFloat16")
        assert bf16.dtype == np.dtype("<u2") and bf16.shape == (4, 6)
        as_f32 = (bf16.astype(np.uint32) << 16).view(np.float32)
        assert np.all(np.isfinite(as_f32)) and np.all(np.abs(as_f32) < 4)
        scalar = index.array("scalar_f32")
        assert scalar.shape == () and scalar == np.float32(0.125)
        assert index.entries["scalar_f32"].dims == ()
        assert index.array("p_Bool").dtype == np.bool_
        assert index.array("p_Int64").dtype == np.dtype("<i8")


def test_views_are_zero_copy_and_read_only(format_samples: Path) -> None:
    path = format_samples / "crc.ckpt"
    with index_checkpoint(path) as index:
        entry = index.entries["w"]
        view = index.array("w")
        assert not view.flags.writeable and not view.flags.owndata
        offset, length = entry.pieces[0]
        assert view.tobytes() == path.read_bytes()[offset : offset + length]
        with pytest.raises(ValueError):
            view[0, 0] = 1
        raw = index.raw("w")
        assert raw[0].readonly and len(raw[0]) == length
    assert float(view[0, 0]) == float(np.frombuffer(path.read_bytes()[offset : offset + 4], "<f4")[0])


def test_append_info_str_and_int_values(format_samples: Path) -> None:
    with index_checkpoint(format_samples / "append_info.ckpt") as index:
        note = index.entries["note"]
        assert note.dtype == "str" and note.dims == (0,)
        value = index.array("note")
        assert value.shape == () and value.dtype == np.dtype("<U14") and str(value) == "a string value"
        assert int(index.array("epoch_num")) == 3 and index.entries["epoch_num"].dims == ()


def test_crc_trailer_read_and_verified(format_samples: Path, tmp_path: Path) -> None:
    data = (format_samples / "crc.ckpt").read_bytes()
    with index_checkpoint(format_samples / "crc.ckpt", verify_crc=True) as index:
        assert index.crc == zlib.crc32(data[:-17]) == int.from_bytes(data[-10:], "big")
    damaged = bytearray(data)
    damaged[100] ^= 0xFF  # inside the content of "w"
    path = tmp_path / "damaged.ckpt"
    path.write_bytes(damaged)
    index_checkpoint(path).close()  # not verified: indexes fine
    with pytest.raises(CheckpointFormatError, match="CRC check failed") as err:
        index_checkpoint(path, verify_crc=True)
    assert str(path) in str(err.value)


def test_split_tensor_pieces_concatenate(tmp_path: Path) -> None:
    content = np.arange(24, dtype=np.float32).tobytes()
    path = tmp_path / "split.ckpt"
    path.write_bytes(
        pb_entry("a", "Int32", (2,), b"\1\0\0\0\2\0\0\0")
        + pb_entry("big", "Float32", (4, 6), content[:40])
        + pb_entry("big", "Float32", (4, 6), content[40:64])
        + pb_entry("big", "Float32", (4, 6), content[64:])
        + pb_entry("z", "UInt8", (), b"\7")
    )
    with index_checkpoint(path) as index:
        assert list(index.entries) == ["a", "big", "z"]
        entry = index.entries["big"]
        assert [length for _, length in entry.pieces] == [40, 24, 32] and entry.nbytes == 96
        assert b"".join(index.raw("big")) == content
        array = index.array("big")
        assert array.flags.owndata and np.array_equal(array, np.arange(24, dtype=np.float32).reshape(4, 6))
        out = bytearray(30)
        index.read_into("big", 35, memoryview(out))  # spans all three pieces
        assert bytes(out) == content[35:65]
        with pytest.raises(IndexError, match="'big'"):
            index.read_into("big", 90, memoryview(bytearray(7)))
        with pytest.raises(CheckpointFormatError, match="no parameter 'nope'"):
            index.array("nope")


def test_async_axis0_split_is_accepted(tmp_path: Path) -> None:
    """MindSpore's asynchronous save splits along axis 0 with full dims in each piece."""
    rows = np.arange(12, dtype=np.int16).reshape(3, 4)
    path = tmp_path / "async.ckpt"
    path.write_bytes(b"".join(pb_entry("p", "Int16", (3, 4), part.tobytes()) for part in np.array_split(rows, 2)))
    with index_checkpoint(path) as index:
        assert np.array_equal(index.array("p"), rows)


def test_packed_dims_are_accepted(tmp_path: Path) -> None:
    tensor = b"\x0a\x02\x02\x03" + b"\x12\x04Int8" + b"\x1a\x06" + bytes(range(6))
    value = b"\x0a\x01p" + b"\x12" + bytes([len(tensor)]) + tensor
    path = tmp_path / "packed.ckpt"
    path.write_bytes(b"\x0a" + bytes([len(value)]) + value)
    with index_checkpoint(path) as index:
        assert index.entries["p"].dims == (2, 3)
        assert index.array("p").tolist() == [[0, 1, 2], [3, 4, 5]]


def test_maptensor_is_indexed_and_array_refused(tmp_path: Path) -> None:
    parts = [
        pb_maptensor_entry("m", [("int32", (2,), b"\1\0\0\0\2\0\0\0"), ("float32", (2, 1), b"\0" * 8)]),
        pb_maptensor_entry("m", [("int32", (1,), b"\3\0\0\0"), ("float32", (1, 1), b"\0" * 4)]),
    ]
    path = tmp_path / "map.ckpt"
    path.write_bytes(pb_entry("w", "Float16", (1,), b"\0\0") + b"".join(parts))
    with index_checkpoint(path) as index:
        entry = index.entries["m"]
        assert entry.kind == "maptensor" and entry.dtype == MAPTENSOR_DTYPE and len(entry.pieces) == 2
        for part, raw in zip(parts, index.raw("m"), strict=True):
            assert part.endswith(bytes(raw))
        with pytest.raises(CheckpointFormatError, match="MapTensor"):
            index.array("m")


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (pb_entry("p", "Float32", (2,), b"\0" * 7), r"'p' \(Float32 \[2\]\) should hold 8 bytes, holds 7"),
        (pb_entry("p", "Complex64", (1,), b"\0" * 8), "'p' has unknown dtype 'Complex64'"),
        (pb_entry("s", "str", (0,), b"abc"), "'s' is not UTF-32"),
        (pb_entry("p", "Int8", (1,), b"\0") + pb_entry("q", "Int8", (1,), b"\0") + pb_entry("p", "Int8", (1,), b"\0"),
         "'p' appears twice"),
        (pb_entry("p", "Int8", (2,), b"\0") + pb_entry("p", "Int16", (2,), b"\0" * 3), "'p' is split into pieces"),
        (pb_entry("p", "Int8", (1,), b"\0")[:-1], "entry #0 at byte 0"),
        (pb_entry("p", "Int8", (1,), b"\0") + b"\x0a\x05\x0a\x01q\x12\x00", "after parameter 'p'"),
    ],
    ids=["size", "dtype", "str", "scattered", "inconsistent", "truncated", "no-content"],
)
def test_bad_content_is_refused_naming_file_and_parameter(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(blob)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        index_checkpoint(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (bytes.fromhex("d85e3a7f3f01d10a"), r"encrypted \(AES-GCM\)"),
        (bytes.fromhex("d95e3a7f78000000"), r"encrypted \(AES-CBC\)"),
        (bytes.fromhex("da5e3a7f78000000"), r"encrypted \(SM4-CBC\)"),
        (b"hello world, not protobuf", "not a MindSpore checkpoint"),
    ],
)
def test_foreign_files_are_refused(tmp_path: Path, head: bytes, message: str) -> None:
    path = tmp_path / "foreign.ckpt"
    path.write_bytes(head + os.urandom(64))
    with pytest.raises(CheckpointFormatError, match=message):
        index_checkpoint(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with index_checkpoint(empty) as index:
        assert index.entries == {} and index.crc is None
    with pytest.raises(SourceMissingError, match="missing.ckpt"):
        index_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointFormatError, match="cannot open"):
        index_checkpoint(tmp_path)


def test_index_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 64 MiB sparse content is skipped: far less than 1 MiB is read while indexing."""
    path = tmp_path / "sparse.ckpt"
    size = 64 << 20
    header = pb_entry("big", "UInt8", (size,), b"x" * size)[:40]
    head_len = header.index(b"UInt8") + 5 + 1 + len(_varint(size))  # ... tensor_type, content key, length
    with path.open("wb") as f:
        f.write(header[:head_len])
        f.truncate(head_len + size)
        f.seek(head_len + size)
        f.write(pb_entry("small", "Int8", (1,), b"\1"))
    read = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        data = real_pread(fd, n, offset)
        read.append(len(data))
        return data

    monkeypatch.setattr(os, "pread", counting_pread)
    with index_checkpoint(path) as index:
        assert index.entries["big"].nbytes == size and index.array("small").tolist() == [1]
    assert sum(read) < 1 << 20


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def test_views_outlive_close(format_samples: Path) -> None:
    index = index_checkpoint(format_samples / "append_info.ckpt")
    view = index.array("w")
    expected = view.copy()
    index.close()
    assert np.array_equal(view, expected)
    with pytest.raises(CheckpointFormatError, match="closed"):
        index.array("w")


def test_dtype_table() -> None:
    assert numpy_dtype("BFloat16") == np.dtype("<u2") and dtype_itemsize("BFloat16") == 2
    assert numpy_dtype("Int4") == np.dtype("u1") and dtype_itemsize("Int4") == 1
    assert numpy_dtype("str") == np.dtype("<U") and dtype_itemsize("str") == 4
    assert {dtype_itemsize(d) for d in ("Bool", "Int8", "UInt8")} == {1}
    with pytest.raises(CheckpointFormatError, match="unknown MindSpore dtype 'Float8'"):
        numpy_dtype("Float8")


def test_release_keeps_views_valid(tmp_path: Path) -> None:
    data = np.arange(5000, dtype=np.float32)
    path = tmp_path / "r.ckpt"
    save_checkpoint(path, [("a", "Float32", data.shape, data), ("b", "Float32", data.shape, data[::-1].copy())])
    with index_checkpoint(path) as index:
        view = index.array("a")
        assert view.sum() == data.sum()
        index.release("a")
        index.release("b")
        assert np.array_equal(view, data) and np.array_equal(index.array("b"), data[::-1])


def _raw_entry(tag: bytes, tensor: bytes, content: int = 0) -> bytes:
    """Header of one ``Checkpoint`` message around hand-encoded ``TensorProto`` bytes, the last
    ``content`` bytes of that tensor left to follow in the file."""
    value = b"\x0a" + _varint(len(tag)) + tag + b"\x12" + _varint(len(tensor) + content) + tensor
    return b"\x0a" + _varint(len(value) + content) + value


MAP_OK = [("int32", (2,), b"\0" * 8), ("float32", (2, 1), b"\0" * 8)]


@pytest.mark.parametrize(
    ("blob", "message"),
    [
        (pb_entry("p", "Float32", (0, 1 << 61), b""), r"'p': dims \[0, 2305843009213693952\] are too large for numpy"),
        (pb_entry("p", "Int8", (1 << 62, 0, 2), b""), r"'p': dims .* too large for numpy"),
        (pb_entry("p", "Int8", (1,) * 65, b"\0"), "'p': more than 64 dims"),
        (pb_entry("p", "Int8", (-1,), b""), "'p': negative dimension"),
        (pb_entry("s", "str", (0,), (0x110000).to_bytes(4, "little")), r"'s' is not UTF-32 \(code point 0x110000\)"),
        (pb_entry("s", "str", (0,), b"a\0\0\0\0\0") + pb_entry("s", "str", (0,), b"\x11\0"), "code point 0x110000"),
        (_raw_entry(b"p", b"\x08\x01\x12\x04Int8\x1a" + _varint(1 << 62) + b"\0"), "'p': a length-delimited field runs"),
        (pb_maptensor_entry("m", [("complex64", (1,), b"\0" * 8)]), "'m': unknown dtype 'complex64' in a MapTensor"),
        (pb_maptensor_entry("m", [("int32", (2,), b"\0" * 7)]), r"'m': a MapTensor tensor \(int32 \[2\]\) holds 7"),
        (pb_maptensor_entry("m", [("int32", (), b"\0" * 4)]), "'m': a MapTensor holds a 0-d tensor"),
        (pb_maptensor_entry("m", [("int8", (0, 1 << 63 - 1, 2), b"")]), "'m': dims .* too large for numpy"),
        (b"\x0a\x05\x0a\x01m\x1a\x00", "'m': a MapTensor without tensors"),
        (pb_maptensor_entry("m", MAP_OK) + pb_maptensor_entry("m", [("int32", (1,), b"\0" * 4), ("float32", (1, 2), b"\0" * 8)]),
         r"'m' is split into pieces .*float32 \['\*', 1\] then .*float32 \['\*', 2\]"),
        (pb_maptensor_entry("m", MAP_OK) + pb_entry("m", "Int32", (2,), b"\0" * 8), "'m' is split into pieces"),
        (pb_entry("m", "Int32", (2,), b"\0" * 8) + pb_maptensor_entry("m", MAP_OK), "'m' is split into pieces"),
    ],
    ids=[
        "zero-beside-huge", "product-too-big", "65-dims", "negative-dim", "str-code-point", "str-code-point-split",
        "length-past-end", "map-dtype", "map-size", "map-0d", "map-too-big", "map-empty", "map-pieces-differ",
        "map-then-tensor", "tensor-then-map",
    ],
)
def test_entries_numpy_cannot_map_are_refused_at_index_time(tmp_path: Path, blob: bytes, message: str) -> None:
    path = tmp_path / "bad.ckpt"
    path.write_bytes(blob)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        index_checkpoint(path)
    assert str(path) in str(err.value)


def test_str_longer_than_numpy_allows_is_refused_without_reading_it(tmp_path: Path) -> None:
    """A 2 GiB str value (sparse file) exceeds numpy's largest "<U" dtype; refused from its header."""
    size = 1 << 31
    header = _raw_entry(b"s", b"\x08\x00\x12\x03str\x1a" + _varint(size), size)
    path = tmp_path / "long.ckpt"
    with path.open("wb") as f:
        f.write(header)
        f.truncate(len(header) + size)
    with pytest.raises(CheckpointFormatError, match="str value 's' is longer than numpy allows"):
        index_checkpoint(path)


def test_numpy_limits_are_met_exactly(tmp_path: Path) -> None:
    """64 dims, a dim of 2**62 beside a 0 for 1-byte items, and lone surrogates are what numpy accepts."""
    path = tmp_path / "edge.ckpt"
    path.write_bytes(
        pb_entry("d64", "Int8", (1,) * 64, b"\7")
        + pb_entry("wide", "Int8", (0, 1 << 62), b"")
        + pb_entry("sur", "str", (0,), (0xD800).to_bytes(4, "little") + (0x10FFFF).to_bytes(4, "little"))
    )
    with index_checkpoint(path) as index:
        assert index.array("d64").shape == (1,) * 64 and int(index.array("d64").reshape(-1)[0]) == 7
        assert index.array("wide").shape == (0, 1 << 62)
        assert index.array("sur").item() == "\ud800\U0010ffff"


def test_multi_piece_str_values(tmp_path: Path) -> None:
    """Pieces of a str value may cut a character; an empty value in two pieces reads as ''."""
    path = tmp_path / "strs.ckpt"
    path.write_bytes(
        pb_entry("a", "str", (0,), b"a\0") + pb_entry("a", "str", (0,), b"\0\0b\0\0\0")
        + pb_entry("e", "str", (0,), b"") + pb_entry("e", "str", (0,), b"")
        + pb_entry("z", "Int8", (0,), b"") + pb_entry("z", "Int8", (0,), b"")
    )
    with index_checkpoint(path) as index:
        assert index.array("a").item() == "ab"
        empty = index.array("e")
        assert empty.item() == "" and empty.tobytes() == b""
        assert index.array("z").shape == (0,)
