"""safetensors: interoperability with the official package and with MindSpore, header checks, the writer's
layout, CRC and refusals."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy as official

from mindspore_helpers import requires_mindspore, run_mindspore
from mpickpt.errors import CheckpointFormatError, MpickptError
from mpickpt.formats import TensorSpec, format_of
from mpickpt.formats.safetensors import (
    SafetensorsWriter,
    crc32_combine,
    index_safetensors,
)

ROOT = Path(__file__).resolve().parent.parent
NUMPY_DTYPES = {"Bool": np.bool_, "UInt8": np.uint8, "Int8": np.int8, "Int16": np.int16, "UInt16": np.uint16,
                "Int32": np.int32, "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64,
                "Float16": np.float16, "Float32": np.float32, "Float64": np.float64}
ODD_NAMES = ("a", "b.c", "x\ny", "é", '"q"', "\\s", "z/1", "\x01", "\x7f", "\u2028", "Ω", "\t\b\f\r\x1f", "")


DUMP = """
import json, sys, mindspore as ms
out = {}
for path in sys.argv[2:]:
    params = ms.load_checkpoint(path, format=sys.argv[1].split(':')[0], crc_check=sys.argv[1].endswith(':crc'))
    out[path] = {k: [str(v.dtype), list(v.shape), v.asnumpy().tobytes().hex()] for k, v in params.items()}
print(json.dumps(out))
"""


def mindspore_load(paths: list[Path], fmt: str = "safetensors", crc: bool = False) -> dict[str, dict[str, list]]:
    """name -> [dtype, shape, content hex] of each file as MindSpore loads it."""
    cwd = paths[0].parent
    out = run_mindspore(DUMP, cwd, [fmt + (":crc" if crc else ""), *map(str, paths)])
    return json.loads(out.strip().splitlines()[-1])


def our_dump(path: Path) -> dict[str, list]:
    with index_safetensors(path) as index:
        return {name: [e.dtype, list(e.dims), b"".join(index.raw(name)).hex()] for name, e in index.entries.items()}


def random_tensors(seed: int, names: tuple[str, ...] = ("w", "b", "emb.table")) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for i, (dtype, np_dtype) in enumerate(NUMPY_DTYPES.items()):
        for name in names:
            shape = [(), (0, 3), (2, 3), (5,), (1, 2, 2)][int(rng.integers(5))]
            raw = rng.integers(0, 256, size=(*shape, np.dtype(np_dtype).itemsize), dtype=np.uint8)
            out[f"{name}{i}{dtype}"] = raw.view(np_dtype).reshape(shape) if dtype != "Bool" else np.asarray(raw[..., 0] % 2 == 1)
    return out


def dtype_of(arr: np.ndarray) -> str:
    return next(ms for ms, np_dtype in NUMPY_DTYPES.items() if np.dtype(np_dtype) == arr.dtype)


def write_ours(path: Path, tensors: dict[str, np.ndarray], order: list[str] | None = None, **kwargs: object) -> Path:
    with SafetensorsWriter(path, sync=False, **kwargs) as writer:  # type: ignore[arg-type]
        writer.declare([TensorSpec(n, dtype_of(a), a.shape, a.nbytes) for n, a in tensors.items()])
        for name in order or list(tensors):
            arr = tensors[name]
            writer.write_tensor(name, dtype_of(arr), arr.shape, arr if arr.size else b"")
    return path


def header(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])


# -- the official package ---------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_byte_identical_to_official_save_file(tmp_path: Path, seed: int) -> None:
    tensors = random_tensors(seed, ODD_NAMES)
    names = list(tensors)
    np.random.default_rng(seed).shuffle(names)
    ours = write_ours(tmp_path / "ours.safetensors", tensors, names)
    official.save_file(tensors, tmp_path / "official.safetensors", metadata={"format": "ms"})
    assert ours.read_bytes() == (tmp_path / "official.safetensors").read_bytes()
    assert (ours.stat().st_mode & 0o777) == 0o400


def test_several_metadata_keys_equal_up_to_their_order(tmp_path: Path) -> None:
    tensors = random_tensors(7)
    ours = tmp_path / "ours.safetensors"
    with SafetensorsWriter(ours, sync=False, crc=True,
                           metadata={"format": "ms", "remove_redundancy": "True"}) as writer:
        writer.declare([TensorSpec(n, dtype_of(a), a.shape, a.nbytes) for n, a in tensors.items()])
        for name, arr in tensors.items():
            writer.write_tensor(name, dtype_of(arr), arr.shape, arr if arr.size else b"")
    metadata = header(ours)["__metadata__"]
    assert list(metadata) == ["format", "remove_redundancy", "crc_num"]  # MindSpore's insertion order
    official.save_file(tensors, tmp_path / "official.safetensors", metadata=metadata)
    theirs = (tmp_path / "official.safetensors").read_bytes()
    data = ours.read_bytes()
    assert len(data) == len(theirs) and header(ours) == header(tmp_path / "official.safetensors")
    start = 8 + int.from_bytes(data[:8], "little")
    assert data[:8] == theirs[:8] and data[start:] == theirs[start:]


def test_our_files_load_with_the_official_package(tmp_path: Path) -> None:
    tensors = random_tensors(1, ODD_NAMES)
    path = write_ours(tmp_path / "ours.safetensors", tensors)
    loaded = official.load_file(path)
    assert set(loaded) == set(tensors)
    for name, arr in tensors.items():
        assert loaded[name].dtype == arr.dtype and loaded[name].tobytes() == arr.tobytes()
    with safetensors.safe_open(path, framework="np") as f:
        assert f.metadata() == {"format": "ms"}
        assert f.get_tensor("a3Int16").tobytes() == tensors["a3Int16"].tobytes()


def test_official_files_index_correctly(tmp_path: Path) -> None:
    tensors = random_tensors(2, ODD_NAMES)
    path = tmp_path / "official.safetensors"
    official.save_file(tensors, path, metadata={"k": "v", "format": "pt"})
    with index_safetensors(path) as index:
        assert index.metadata == {"k": "v", "format": "pt"} and index.crc is None
        assert format_of(path) == "safetensors"
        offsets = [e.pieces[0][0] for e in index.entries.values()]
        assert offsets == sorted(offsets)
        for name, arr in tensors.items():
            assert index.entries[name].dtype == dtype_of(arr)
            assert index.array(name).tobytes() == arr.tobytes() and index.array(name).shape == arr.shape


def test_bfloat16_and_int4(tmp_path: Path) -> None:
    bits = np.array([[0x3F80, 0xFFC1], [0x7F80, 0x0001]], dtype="<u2")  # 1.0, a NaN payload, inf, subnormal
    packed = np.array([0x12, 0xF0, 0x7F], dtype=np.uint8)
    path = tmp_path / "b.safetensors"
    with SafetensorsWriter(path, sync=False) as writer:
        writer.declare([TensorSpec("q", "Int4", (3,), 3), TensorSpec("h", "BFloat16", (2, 2), 8)])
        writer.write_tensor("q", "Int4", (3,), packed)
        writer.write_tensor("h", "BFloat16", (2, 2), bits)
    head = header(path)
    assert head["__metadata__"] == {"format": "ms", "q": "Int4"}
    assert head["q"]["dtype"] == "I8" and head["h"]["dtype"] == "BF16"
    with index_safetensors(path) as index:
        assert index.entry("h").dtype == "BFloat16" and index.array("h").tobytes() == bits.tobytes()
        assert index.entry("q").dtype == "Int4" and index.array("q").tobytes() == packed.tobytes()
    with safetensors.safe_open(path, framework="np") as f:  # the official reader agrees on the layout
        assert f.get_slice("h").get_dtype() == "BF16" and f.get_tensor("q").tobytes() == packed.tobytes()


def test_empty_file_has_no_metadata_as_mindspore_writes_it(tmp_path: Path) -> None:
    path = write_ours(tmp_path / "e.safetensors", {})
    official.save_file({}, tmp_path / "o.safetensors")
    assert path.read_bytes() == (tmp_path / "o.safetensors").read_bytes() == b"\x08" + bytes(7) + b"{}      "


# -- CRC ----------------------------------------------------------------------------------------


def test_crc32_combine() -> None:
    rng = np.random.default_rng(0)
    for length in (0, 1, 7, 1000, 70000):
        a, b = rng.bytes(13), rng.bytes(length)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), length) == zlib.crc32(a + b)


def mindspore_crc(tensors: dict[str, np.ndarray]) -> int:
    """crc_num as MindSpore's save computes it: names sorted, each UTF-8 name then ``bytes(array)``."""
    crc = 0
    for name in sorted(tensors):
        crc = zlib.crc32(bytes(tensors[name]), zlib.crc32(name.encode("utf-8"), crc))
    return crc


def test_crc_of_0d_integers_follows_mindspore(tmp_path: Path) -> None:
    """``bytes()`` of a 0-d integer array is that many zero bytes: MindSpore's crc_num counts those."""
    tensors = {"i": np.array(5, np.int64), "u": np.array(300, np.uint16), "f": np.array(2.5, np.float32),
               "b": np.array(True), "z": np.array(0, np.int8), "v": np.arange(3, dtype=np.int32)}
    path = write_ours(tmp_path / "c.safetensors", tensors, crc=True)
    assert header(path)["__metadata__"]["crc_num"] == str(mindspore_crc(tensors))
    with index_safetensors(path, verify_crc=True) as index:
        assert index.computed_crc() == mindspore_crc(tensors)
    negative = write_ours(tmp_path / "n.safetensors", {"n": np.array(-3, np.int8)}, crc=True)
    with index_safetensors(negative, verify_crc=True) as index:  # MindSpore cannot CRC it; true bytes count
        assert index.crc == zlib.crc32(b"\xfd", zlib.crc32(b"n"))


@pytest.mark.parametrize("seed", range(40))
def test_crc_header_matches_mindspore_and_official_layout(tmp_path: Path, seed: int) -> None:
    """Over many seeds the CRC's decimal width varies, so the reserved header is sometimes too long and
    the data is moved down; the file must still match the official layout exactly."""
    rng = np.random.default_rng(seed)
    tensors = {f"p{i}": rng.integers(0, 256, size=int(rng.integers(0, 9)), dtype=np.uint8) for i in range(3)}
    path = write_ours(tmp_path / "c.safetensors", tensors, list(reversed(tensors)), crc=True)
    metadata = header(path)["__metadata__"]
    assert metadata["crc_num"] == str(mindspore_crc(tensors))
    official.save_file(tensors, tmp_path / "o.safetensors", metadata=metadata)
    data, theirs = path.read_bytes(), (tmp_path / "o.safetensors").read_bytes()
    assert len(data) == len(theirs) and header(path) == header(tmp_path / "o.safetensors")
    assert data[-sum(a.nbytes for a in tensors.values()) or len(data):] == theirs[-sum(
        a.nbytes for a in tensors.values()) or len(theirs):]
    with index_safetensors(path, verify_crc=True) as index:
        assert index.crc == mindspore_crc(tensors)


def test_crc_copies_from_files(tmp_path: Path) -> None:
    tensors = random_tensors(3)
    src = write_ours(tmp_path / "src.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    with index_safetensors(src) as index, SafetensorsWriter(out, sync=False, crc=True) as writer:
        writer.declare([TensorSpec(n, e.dtype, e.dims, e.nbytes) for n, e in index.entries.items()])
        for name, entry in reversed(index.entries.items()):
            writer.copy_tensor_from(name, entry.dtype, entry.dims, index.fileno(), *entry.pieces[0])
    with index_safetensors(out, verify_crc=True) as index:
        assert index.crc == mindspore_crc(tensors)


def test_bad_crc_text_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    official.save_file({"a": np.zeros(2, np.uint8)}, path, metadata={"crc_num": "12x"})
    with pytest.raises(CheckpointFormatError, match="crc_num"):
        index_safetensors(path)


# -- kernel copies ------------------------------------------------------------------------------


@pytest.mark.parametrize("checksum", [False, True])
def test_copies_between_files(tmp_path: Path, checksum: bool) -> None:
    tensors = random_tensors(4)
    src = write_ours(tmp_path / "src.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    with index_safetensors(src) as index, SafetensorsWriter(out, sync=False, checksum=checksum) as writer:
        writer.declare([TensorSpec(n, e.dtype, e.dims, e.nbytes) for n, e in index.entries.items()])
        for name, entry in index.entries.items():
            offset, length = entry.pieces[0]
            half = length // 2
            writer.copy_tensor_segments(name, entry.dtype, entry.dims,
                                        [(index.fileno(), offset, half), (index.fileno(), offset + half, length - half)])
    assert out.read_bytes() == src.read_bytes()
    assert writer.file_crc == (zlib.crc32(src.read_bytes()) if checksum else None)


@pytest.mark.parametrize("crc", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_file_crc_is_the_crc_of_the_file_as_written(tmp_path: Path, seed: int, crc: bool) -> None:
    """Buffers, chunks and file ranges in any order, with and without MindSpore's crc_num (whose header
    is written last, sometimes after moving the data down): file_crc equals the CRC-32 of the file."""
    rng = np.random.default_rng(seed)
    tensors = {f"p{i}": rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8) for i in range(5)}
    src = write_ours(tmp_path / "src.safetensors", tensors)
    out = tmp_path / "out.safetensors"
    with index_safetensors(src) as index, SafetensorsWriter(out, sync=False, crc=crc, checksum=True) as writer:
        writer.declare([TensorSpec(n, e.dtype, e.dims, e.nbytes) for n, e in index.entries.items()])
        for i, (name, entry) in enumerate(reversed(index.entries.items())):
            data = bytes(index.raw(name)[0])
            if i % 3 == 0:
                writer.write_tensor(name, entry.dtype, entry.dims, data)
            elif i % 3 == 1:
                writer.write_tensor_chunks(name, entry.dtype, entry.dims, len(data), [data[:7], data[7:]])
            else:
                writer.copy_tensor_from(name, entry.dtype, entry.dims, index.fileno(), *entry.pieces[0])
        assert writer.file_crc is None  # not before the file is complete
    assert writer.file_crc == zlib.crc32(out.read_bytes())


def test_copy_from_short_source_fails(tmp_path: Path) -> None:
    src = tmp_path / "short"
    src.write_bytes(b"1234")
    fd = os.open(src, os.O_RDONLY)
    with (pytest.raises(CheckpointFormatError, match="'a'.*ends early"),
          SafetensorsWriter(tmp_path / "x.safetensors", sync=False) as writer):
        writer.declare([TensorSpec("a", "Float32", (2,), 8)])
        writer.copy_tensor_from("a", "Float32", (2,), fd, 0, 8)
    os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short"]


# -- the writer's refusals ----------------------------------------------------------------------


@pytest.mark.parametrize(("specs", "message"), [
    ([TensorSpec("m", "MapTensor", (), 10, "maptensor")], "'m' is a maptensor"),
    ([TensorSpec("s", "str", (), 8)], "'s' is a str value"),
    ([TensorSpec("u", "Complex64", (1,), 8)], "'u' has unknown dtype"),
    ([TensorSpec("a", "Float32", (2,), 4)], r"'a' \(Float32 \[2\]\) cannot hold 4 bytes"),
    ([TensorSpec("a", "Float32", (-1,), 4)], "'a'"),
    ([TensorSpec("a", "Int8", (1,), 1), TensorSpec("a", "Int8", (1,), 1)], "'a' is declared twice"),
    ([TensorSpec("__metadata__", "Int8", (1,), 1)], "clashes with a metadata key"),
    ([TensorSpec("format", "Int4", (1,), 1)], "clashes with a metadata key"),
    ([TensorSpec("format", "Float32", (1,), 4)], "'format' clashes with a metadata key"),
    ([TensorSpec("bad\udc80", "Int8", (1,), 1)], "not valid UTF-8"),
])
def test_declare_refusals_name_file_and_parameter(tmp_path: Path, specs: list[TensorSpec], message: str) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointFormatError, match=message) as err, SafetensorsWriter(path, sync=False) as writer:
        writer.declare(specs)
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_header_over_the_limit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("mpickpt.formats.safetensors.MAX_HEADER_SIZE", 100)
    with pytest.raises(CheckpointFormatError, match="over the 100-byte limit"), \
            SafetensorsWriter(tmp_path / "x.safetensors", sync=False) as writer:
        writer.declare([TensorSpec(f"t{i}", "Int8", (0,), 0) for i in range(5)])


def attempt(path: Path, action: str) -> None:
    with SafetensorsWriter(path, sync=False) as writer:
        if action == "write before declare":
            writer.write_tensor("a", "Float32", (1,), b"1234")
        writer.declare([TensorSpec("a", "Float32", (1,), 4), TensorSpec("b", "Int8", (2,), 2)])
        if action == "undeclared":
            writer.write_tensor("c", "Float32", (1,), b"1234")
        elif action == "other dims":
            writer.write_tensor("a", "Float32", (1, 1), b"1234")
        elif action == "too many bytes":
            writer.write_tensor_chunks("b", "Int8", (2,), 2, [b"12", b"3"])
        elif action == "maptensor":
            writer.write_maptensor("b", [b"xx"])
        elif action == "declare twice":
            writer.declare([])
        else:
            writer.write_tensor("a", "Float32", (1,), b"1234")


@pytest.mark.parametrize(("action", "message"), [
    ("write before declare", "declare.*'a'"),
    ("undeclared", "'c' was not declared"),
    ("other dims", "'a' is given as Float32 \\[1, 1\\]"),
    ("too many bytes", "'b' got more than 2 bytes"),
    ("maptensor", "'b' is a MapTensor"),
    ("declare twice", "already declared"),
    ("missing", "'b' was not \\(fully\\) written"),
])
def test_write_refusals_leave_nothing(tmp_path: Path, action: str, message: str) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(CheckpointFormatError, match=message) as err:
        attempt(path, action)
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


# -- the reader's header checks -----------------------------------------------------------------


def raw_file(path: Path, head: bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    head = head.encode() if isinstance(head, str) else head
    path.write_bytes((len(head) if length is None else length).to_bytes(8, "little") + head + data)
    return path


def info(dtype: str = "F32", shape: object = (2,), offsets: object = (0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape,
            "data_offsets": list(offsets) if isinstance(offsets, tuple) else offsets}


@pytest.mark.parametrize(("head", "data", "message"), [
    ("", b"", "not valid JSON"),
    ("{}", b"", "header length 4096 runs past the end"),
    ("[1]", b"", "not a JSON object"),
    ("{\"a\":", b"", "not valid JSON"),
    (b"{\"\xff\":1}", b"", "not UTF-8"),
    ("{" * 100000, b"", "not valid JSON"),
    (json.dumps({"a": info(dtype="F8_E5M2")}), bytes(8), "'a'.*unknown or unsupported dtype 'F8_E5M2'"),
    (json.dumps({"a": info(shape=[2.0])}), bytes(8), "'a'.*not a list of non-negative integers"),
    (json.dumps({"a": info(shape=[True, 2])}), bytes(8), "'a'.*not a list of non-negative integers"),
    (json.dumps({"a": info(shape=[-2])}), bytes(8), "'a'.*non-negative"),
    (json.dumps({"a": info(shape="2")}), bytes(8), "'a'.*shape is not a list"),
    (json.dumps({"a": info(shape=[1] * 65, offsets=(0, 4))}), bytes(4), "'a'.*at most 64"),
    (json.dumps({"a": info(shape=[0, 2 ** 62, 4], offsets=(0, 0))}), b"", "'a'.*too large"),
    (json.dumps({"a": info(offsets=[0])}), bytes(8), "'a'.*data_offsets"),
    (json.dumps({"a": info(offsets=[8, 0])}), bytes(8), "'a'.*begin <= end"),
    (json.dumps({"a": info(offsets=["0", 8])}), bytes(8), "'a'.*data_offsets"),
    (json.dumps({"a": info(offsets=(0, 12))}), bytes(12), "'a'.*holds 12 bytes, but F32 \\[2\\] needs 8"),
    (json.dumps({"a": info(offsets=(4, 12))}), bytes(8), "'a'.*runs past the end"),
    (json.dumps({"a": info(), "b": info(offsets=(4, 12))}), bytes(12), "'b' overlaps tensor 'a'"),
    (json.dumps({"a": info(offsets=(4, 12))}), bytes(12), "4 bytes before it belong to no tensor"),
    (json.dumps({"a": info()}), bytes(9), "1 bytes after the last tensor"),
    ('{"a":' + json.dumps(info()) + ',"a":' + json.dumps(info()) + "}", bytes(8), "'a' appears twice"),
    ('{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), "'dtype' appears twice"),
    (json.dumps({"a": "x"}), b"", "'a'.*not a JSON object"),
    # a lone surrogate escape (the official package refuses it; a .ckpt or HDF5 output could not hold the name)
    ('{"a\\ud800":' + json.dumps(info()) + "}", bytes(8), "'a\\\\ud800'.*lone surrogate"),
    (json.dumps({"__metadata__": {"k": "\udc80"}}), b"", "lone surrogate"),
    (json.dumps({"__metadata__": [1]}), b"", "__metadata__ is not a JSON object"),
    (json.dumps({"__metadata__": {"k": 1}}), b"", "value of 'k' is not a string"),
    (json.dumps({"__metadata__": {"a": "Int4"}, "a": info()}), bytes(8), "'a'.*Int4.*F32"),
    # MindSpore reads a metadata value under a tensor's name as its dtype, and fails on any but Int4
    (json.dumps({"__metadata__": {"a": "int4"}, "a": info("I8", (8,))}), bytes(8), "'a'.*gives it 'int4'"),
    (json.dumps({"__metadata__": {"a": "BFloat16"}, "a": info()}), bytes(8), "'a'.*gives it 'BFloat16'"),
    (json.dumps({"__metadata__": {"format": "ms"}, "format": info()}), bytes(8), "'format'.*gives it 'ms'"),
])
def test_header_checks_name_file_and_tensor(tmp_path: Path, head: str | bytes, data: bytes, message: str) -> None:
    length = 4096 if head == "{}" else None
    path = raw_file(tmp_path / "x.safetensors", head, data, length)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        index_safetensors(path)
    assert str(path) in str(err.value)


def test_short_absurd_and_missing_files(tmp_path: Path) -> None:
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x02\0\0")
    with pytest.raises(CheckpointFormatError, match="too short"):
        index_safetensors(short)
    absurd = raw_file(tmp_path / "absurd.safetensors", "{}", length=1 << 40)
    with pytest.raises(CheckpointFormatError, match="exceeds"):
        index_safetensors(absurd)
    with pytest.raises(MpickptError, match="does not exist"):
        index_safetensors(tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointFormatError, match="not a regular file"):
        index_safetensors(tmp_path)


def test_index_reads_only_the_header(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    official.save_file({"w": np.zeros(1 << 20, np.float32)}, path)
    reads: list[int] = []
    real = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real(fd, n, off))
    with index_safetensors(path) as index:
        assert index.entry("w").nbytes == 4 << 20
    assert sum(reads) < 200


# -- MindSpore ----------------------------------------------------------------------------------


SAVE = """
import numpy as np, mindspore as ms
from mindspore import Tensor, Parameter
import mindspore.common.dtype as mstype
rng = np.random.default_rng(0)
def params(bf16):
    d = {'q': Parameter(Tensor(np.array([[1, 2], [3, -4]], dtype=np.int8), dtype=mstype.qint4x2)),
         'b': Parameter(Tensor(np.array([True, False]))),
         's': Parameter(Tensor(np.float64(3.5))),
         'e': Parameter(Tensor(np.zeros((0, 3), np.float16))),
         'layer.w': Parameter(Tensor(rng.standard_normal((3, 4)).astype(np.float32))),
         'i64': Parameter(Tensor(np.arange(5, dtype=np.int64)))}
    if bf16:
        d['h'] = Parameter(Tensor(rng.standard_normal((2, 3)).astype(np.float32)).astype(mstype.bfloat16))
    return d
ms.save_checkpoint(params(True), 'ms.safetensors', format='safetensors')
ms.save_checkpoint(params(False), 'ms_crc.safetensors', format='safetensors', crc_check=True)
ms.save_checkpoint({'w': Parameter(Tensor(np.ones((2, 2), np.float32))), 'h': params(True)['h']},
                   'ms_plain.safetensors', format='safetensors')
"""


@requires_mindspore
def test_mindspore_files_index_with_equal_content(tmp_path: Path) -> None:
    run_mindspore(SAVE, tmp_path)
    files = [tmp_path / "ms.safetensors", tmp_path / "ms_crc.safetensors"]
    loaded = mindspore_load(files)
    for path in files:
        assert our_dump(path) == loaded[str(path)]
    with index_safetensors(files[1], verify_crc=True) as index:
        assert index.crc is not None and index.entry("q").dtype == "Int4"
    assert index_safetensors(files[0]).entry("h").dtype == "BFloat16"


@requires_mindspore
def test_rewritten_mindspore_files_are_byte_identical_or_metadata_reordered(tmp_path: Path) -> None:
    run_mindspore(SAVE, tmp_path)
    for name, crc in (("ms_plain", False), ("ms", False), ("ms_crc", True)):
        src = tmp_path / f"{name}.safetensors"
        out = tmp_path / f"{name}.ours.safetensors"
        with index_safetensors(src) as index, SafetensorsWriter(out, sync=False, crc=crc) as writer:
            writer.declare([TensorSpec(n, e.dtype, e.dims, e.nbytes) for n, e in index.entries.items()])
            for n, e in index.entries.items():
                writer.copy_tensor_from(n, e.dtype, e.dims, index.fileno(), *e.pieces[0])
        if name == "ms_plain":
            assert out.read_bytes() == src.read_bytes()
        else:
            assert header(out) == header(src) and out.stat().st_size == src.stat().st_size


@requires_mindspore
def test_our_files_load_in_mindspore(tmp_path: Path) -> None:
    bits = np.array([0x3F80, 0xC000, 0x0001], dtype="<u2")
    tensors = random_tensors(5)
    for name, arr in tensors.items():  # MindSpore's CRC reads a 0-d integer n as n zero bytes: keep n small
        if arr.ndim == 0 and arr.dtype.kind in "iu":
            tensors[name] = np.array(7, arr.dtype)
    for crc in (False, True):
        path = tmp_path / f"ours{int(crc)}.safetensors"
        with SafetensorsWriter(path, sync=False, crc=crc) as writer:
            extra = [TensorSpec("q", "Int4", (2, 2), 4)] + ([] if crc else [TensorSpec("h", "BFloat16", (3,), 6)])
            writer.declare(extra + [TensorSpec(n, dtype_of(a), a.shape, a.nbytes) for n, a in tensors.items()])
            writer.write_tensor("q", "Int4", (2, 2), b"\x01\x02\x03\xfc")
            if not crc:  # MindSpore 2.10 cannot CRC a BFloat16 tensor (bytes() of an ml_dtypes array fails)
                writer.write_tensor("h", "BFloat16", (3,), bits)
            for name, arr in tensors.items():
                writer.write_tensor(name, dtype_of(arr), arr.shape, arr if arr.size else b"")
        assert mindspore_load([path], crc=crc)[str(path)] == our_dump(path)
