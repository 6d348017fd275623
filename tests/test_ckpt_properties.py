"""Property tests: random parameter sets round-trip; damaged files fail only with CheckpointFormatError."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ckpt_reader import pb_entry

from mpickpt.ckpt import DTYPES, CheckpointWriter, dtype_itemsize, index_checkpoint
from mpickpt.errors import CheckpointFormatError

Param = tuple[str, str, tuple[int, ...], bytes]


@st.composite
def parameters(draw: st.DrawFn) -> list[Param]:
    names = draw(st.lists(st.text(min_size=1, max_size=20).filter(_utf8), min_size=0, max_size=6, unique=True))
    params = []
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        if dtype == "str":
            text = draw(st.text(max_size=12).filter(_utf8))
            params.append((name, dtype, (0,), text.encode("utf-32-le")))
            continue
        dims = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
        size = math.prod(dims) * dtype_itemsize(dtype)
        params.append((name, dtype, dims, draw(st.binary(min_size=size, max_size=size))))
    return params


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pieces(content: bytes, piece_size: int) -> list[bytes]:
    return [content[i : i + piece_size] for i in range(0, len(content), piece_size)] or [b""]


def _write(path: Path, params: list[Param], piece_size: int, crc: bool) -> None:
    with CheckpointWriter(path, piece_size=piece_size, crc=crc, sync=False) as writer:
        for name, dtype, dims, content in params:
            writer.write_tensor(name, dtype, dims, content)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=parameters(), piece_size=st.integers(1, 64), crc=st.booleans())
def test_random_parameters_round_trip(params: list[Param], piece_size: int, crc: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "p.ckpt"
        _write(path, params, piece_size, crc)
        expected = b"".join(pb_entry(n, t, d, p) for n, t, d, c in params for p in _pieces(c, piece_size))
        data = path.read_bytes()
        assert data[: len(expected)] == expected and len(data) == len(expected) + 17 * crc
        with index_checkpoint(path, verify_crc=True) as index:
            assert [(e.name, e.dtype, e.dims) for e in index.entries.values()] == [p[:3] for p in params]
            for name, dtype, dims, content in params:
                array = index.array(name)
                assert array.tobytes() == content
                if dtype == "str":
                    assert str(array) == content.decode("utf-32-le")
                else:
                    assert array.shape == dims
                assert all(length <= piece_size for _, length in index.entries[name].pieces)


def _valid_file(path: Path) -> bytes:
    params: list[Param] = [
        ("w", "Float32", (2, 3), np.arange(6, dtype=np.float32).tobytes()),
        ("s", "str", (0,), "hi".encode("utf-32-le")),
        ("b", "BFloat16", (), b"\x80\x3f"),
        ("e", "Int8", (0,), b""),
    ]
    _write(path, params, piece_size=10, crc=True)
    return path.read_bytes()


def _index_all(path: Path, verify_crc: bool) -> None:
    with index_checkpoint(path, verify_crc=verify_crc) as index:
        for name in index.entries:
            index.array(name)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_damaged_files_raise_only_format_errors(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "v.ckpt"
        blob = bytearray(_valid_file(path))
        if data.draw(st.booleans(), label="truncate"):
            blob = blob[: data.draw(st.integers(0, len(blob) - 1), label="length")]
        for _ in range(data.draw(st.integers(1, 3), label="flips")):
            if blob:
                at = data.draw(st.integers(0, len(blob) - 1), label="at")
                blob[at] = data.draw(st.integers(0, 255), label="byte")
        damaged = Path(tmp) / "d.ckpt"
        damaged.write_bytes(bytes(blob))
        try:
            _index_all(damaged, data.draw(st.booleans(), label="verify_crc"))
        except CheckpointFormatError as err:
            assert str(damaged) in str(err)
