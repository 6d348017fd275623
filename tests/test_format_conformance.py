"""Every storage format behaves the same through ``open_writer``/``open_index``: round trips of every dtype,
zero-copy views and byte runs, any write order, atomic commits, damaged files and CRC checks."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mpickpt.dtypes import numpy_dtype
from mpickpt.errors import CheckpointFormatError, MpickptError
from mpickpt.formats import FORMATS, TensorSpec, open_index, open_writer, suffix_of

pytestmark = pytest.mark.parametrize("fmt", FORMATS)

NUMERIC = ("Bool", "Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float16",
           "Float32", "Float64", "BFloat16", "Int4")
SHAPES = ((), (0,), (3, 0, 2), (5,), (2, 3), (3, 1, 4))


def sample(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random content of a dtype as its stored numpy dtype (every bit pattern for BFloat16 and Int4)."""
    dt = numpy_dtype(dtype)
    if dtype == "Bool":
        return rng.integers(0, 2, size=shape).astype(dt)
    raw = rng.integers(0, 256, size=(*shape, dt.itemsize), dtype=np.uint8)
    return raw.view(dt).reshape(shape)


def tensors(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype, array): every dtype in several shapes, 0-d and empty included."""
    rng = np.random.default_rng(seed)
    return {f"{dtype.lower()}.{i}": (dtype, sample(dtype, shape, rng))
            for dtype in NUMERIC for i, shape in enumerate(SHAPES)}


def specs(content: dict[str, tuple[str, np.ndarray]]) -> list[TensorSpec]:
    return [TensorSpec(name, dtype, arr.shape, arr.nbytes) for name, (dtype, arr) in content.items()]


def write(path: Path, fmt: str, content: dict[str, tuple[str, np.ndarray]], order: list[str] | None = None,
          crc: bool = False) -> Path:
    """Declare ``content`` in its order and write it in ``order`` (default: the same)."""
    with open_writer(path, fmt, crc=crc, sync=False) as writer:
        writer.declare(specs(content))
        for name in order or list(content):
            dtype, arr = content[name]
            writer.write_tensor(name, dtype, arr.shape, arr if arr.size else b"")
    return path


@pytest.fixture
def written(tmp_path: Path, fmt: str) -> Iterator[tuple[Path, dict[str, tuple[str, np.ndarray]]]]:
    content = tensors()
    yield write(tmp_path / f"all{suffix_of(fmt)}", fmt, content), content


def test_round_trip_of_every_dtype(fmt: str, written: tuple[Path, dict]) -> None:
    path, content = written
    with open_index(path) as index:
        assert set(index.entries) == set(content)
        for name, (dtype, arr) in content.items():
            entry = index.entry(name)
            assert (entry.dtype, entry.dims, entry.kind) == (dtype, arr.shape, "tensor")
            got = index.array(name)
            assert got.dtype == arr.dtype and got.shape == arr.shape
            assert got.tobytes() == arr.tobytes()  # bit-exact: NaN payloads, BFloat16, Int4 bytes


def test_open_index_detects_format_without_suffix(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / "no_suffix", fmt, {"w": ("Float32", np.arange(3, dtype=np.float32))})
    with open_index(path) as index:
        assert index.array("w").tolist() == [0.0, 1.0, 2.0]


def test_empty_numpy_array_as_data(tmp_path: Path, fmt: str) -> None:
    arr = np.zeros((3, 0, 2), np.float32)
    with open_writer(tmp_path / f"e{suffix_of(fmt)}", fmt, sync=False) as writer:
        writer.declare([TensorSpec("e", "Float32", arr.shape, 0)])
        writer.write_tensor("e", "Float32", arr.shape, arr)


def test_boxes_of_views_match_numpy_slicing(fmt: str, written: tuple[Path, dict]) -> None:
    path, content = written
    rng = random.Random(1)
    with open_index(path) as index:
        for name, (_, arr) in content.items():
            view = index.array(name)
            assert not view.flags.writeable
            for _ in range(5):
                box = tuple(slice(a, b) for a, b in (sorted(rng.sample(range(d + 1), 2)) if d else (0, 0)
                                                      for d in arr.shape))
                assert view[box].tobytes() == arr[box].tobytes()
            flat = arr.reshape(-1).view(np.uint8)
            if flat.size:
                start = rng.randrange(flat.size)
                out = bytearray(rng.randrange(flat.size - start + 1))
                index.read_into(name, start, memoryview(out))
                assert bytes(out) == flat[start : start + len(out)].tobytes()


def test_pieces_are_byte_runs_of_the_tensor(fmt: str, written: tuple[Path, dict]) -> None:
    path, content = written
    with open_index(path) as index:
        fd = index.fileno()
        for name, (_, arr) in content.items():
            entry = index.entry(name)
            runs = b"".join(os.pread(fd, length, offset) for offset, length in entry.pieces)
            assert runs == arr.tobytes() == b"".join(index.raw(name))
            assert entry.nbytes == arr.nbytes
            index.release(name)
            assert index.array(name).tobytes() == arr.tobytes()  # views survive release


def test_writes_in_another_order_than_declared(tmp_path: Path, fmt: str) -> None:
    content = tensors(2)
    order = list(content)
    random.Random(3).shuffle(order)
    shuffled = write(tmp_path / f"a{suffix_of(fmt)}", fmt, content, order)
    with open_index(shuffled) as index:
        for name, (_, arr) in content.items():
            assert index.array(name).tobytes() == arr.tobytes()


def test_empty_file(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path / f"e{suffix_of(fmt)}", fmt, {})
    with open_index(path) as index:
        assert index.entries == {}


def test_commit_is_atomic(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x{suffix_of(fmt)}"
    content = tensors()
    first = open_writer(path, fmt, sync=False)
    second = open_writer(path, fmt, sync=False)
    temporaries = [p for p in tmp_path.iterdir()]
    assert len(temporaries) == 2 and path not in temporaries  # one unique temporary per writer
    for writer in (first, second):
        writer.declare(specs(content))
        for name, (dtype, arr) in content.items():
            writer.write_tensor(name, dtype, arr.shape, arr if arr.size else b"")
    assert not path.exists()
    first.commit()
    assert path.exists() and (path.stat().st_mode & 0o777) == 0o400
    second.abort()
    assert list(tmp_path.iterdir()) == [path]


def test_abort_and_exception_leave_nothing(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x{suffix_of(fmt)}"
    writer = open_writer(path, fmt, sync=False)
    writer.declare([TensorSpec("a", "Float32", (2,), 8)])
    writer.write_tensor("a", "Float32", (2,), np.zeros(2, np.float32))
    writer.abort()
    with pytest.raises(RuntimeError, match="boom"), open_writer(path, fmt, sync=False) as writer:
        writer.declare([TensorSpec("a", "Float32", (2,), 8)])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_crc_round_trip_and_flipped_data_byte(tmp_path: Path, fmt: str) -> None:
    content = tensors(4)
    path = write(tmp_path / f"c{suffix_of(fmt)}", fmt, content, list(reversed(content)), crc=True)
    with open_index(path, verify_crc=True) as index:
        assert index.crc is not None
    victim = index.entries["float32.4"].pieces[0]
    data = bytearray(path.read_bytes())
    data[victim[0] + 3] ^= 0x10
    path.chmod(0o600)
    path.write_bytes(bytes(data))
    with open_index(path) as index:  # without the check the file still opens
        assert index.array("float32.4").tobytes() != content["float32.4"][1].tobytes()
    with pytest.raises(CheckpointFormatError, match="CRC") as err:
        open_index(path, verify_crc=True)
    assert str(path) in str(err.value)


def small_file(tmp_path: Path, fmt: str) -> bytes:
    rng = np.random.default_rng(5)
    content = {f"p{i}.{dtype}": (dtype, sample(dtype, (2, i), rng))
               for i, dtype in enumerate(("Float32", "Int4", "BFloat16", "Int64", "Bool"))}
    return write(tmp_path / f"s{suffix_of(fmt)}", fmt, content, crc=True).read_bytes()


def mutations(blob: bytes, rng: random.Random, count: int) -> Iterator[bytes]:
    """Truncations, then random byte flips, insertions and deletions concentrated in the first 200 bytes."""
    for cut in range(len(blob)):
        yield blob[:cut]
    for _ in range(count):
        data = bytearray(blob)
        for _ in range(rng.randint(1, 3)):
            pos = min(int(rng.expovariate(1 / 60)), len(data) - 1)
            kind = rng.random()
            if kind < 0.6:
                data[pos] ^= 1 << rng.randrange(8)
            elif kind < 0.8:
                data[pos] = rng.choice(b"{}[]\",:0123456789-e \xff\x00")
            elif kind < 0.9:
                data.insert(pos, rng.randrange(256))
            else:
                del data[pos]
        yield bytes(data)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder in memory when /dev/shm is there (thousands of truncations stay fast), else tmp_path."""
    if not os.access("/dev/shm", os.W_OK):
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        yield Path(folder)


def test_damaged_files_raise_only_mpickpt_errors_naming_the_file(fast_dir: Path, fmt: str) -> None:
    blob = small_file(fast_dir, fmt)
    path = fast_dir / f"damaged{suffix_of(fmt)}"
    rng = random.Random(6)
    outcomes = {"refused": 0, "opened": 0}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    for data in mutations(blob, rng, 3000):
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        try:
            with open_index(path, verify_crc=rng.random() < 0.5) as index:
                for name, entry in index.entries.items():
                    if entry.kind == "tensor" and entry.dtype != "str":
                        index.array(name).tobytes()
            outcomes["opened"] += 1
        except MpickptError as err:
            assert str(path) in str(err), err
            outcomes["refused"] += 1
    os.close(fd)
    assert outcomes["refused"] > 1000


def test_tensor_given_twice_is_refused(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x{suffix_of(fmt)}"
    with pytest.raises(MpickptError, match="'a'") as err, open_writer(path, fmt, sync=False) as writer:
        writer.declare([TensorSpec("a", "Float32", (2,), 8)])
        for _ in range(2):
            writer.write_tensor("a", "Float32", (2,), np.zeros(2, np.float32))
    assert str(path) in str(err.value) and not path.exists()
