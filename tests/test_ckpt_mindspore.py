"""Compatibility with MindSpore's own save_checkpoint / load_checkpoint (MindSpore runs in a subprocess)."""

from __future__ import annotations

import filecmp
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
from mindspore_helpers import requires_mindspore, run_mindspore

from mpickpt.ckpt import PIECE_SIZE, CheckpointWriter, index_checkpoint, save_checkpoint
from mpickpt.errors import CheckpointFormatError

pytestmark = [requires_mindspore, pytest.mark.mindspore]

_LOAD_SCRIPT = """
import json, sys
import mindspore as ms
out = {}
for name, value in ms.load_checkpoint(sys.argv[1]).items():
    if isinstance(value, str):
        out[name] = {"text": value}
    else:
        out[name] = {"dtype": str(value.dtype), "dims": list(value.shape), "hex": bytes(value.get_bytes()).hex()}
json.dump(out, open("loaded.json", "w"))
"""

_SAVE_SCRIPT = """
import json
import numpy as np
import mindspore as ms
from mindspore import Tensor

rng = np.random.default_rng(7)
numeric = {"Bool": np.bool_, "Int8": np.int8, "UInt8": np.uint8, "Int16": np.int16, "UInt16": np.uint16,
           "Int32": np.int32, "UInt32": np.uint32, "Int64": np.int64, "UInt64": np.uint64,
           "Float16": np.float16, "Float32": np.float32, "Float64": np.float64}
tensors = {f"p_{name}": Tensor(rng.integers(0, 100, size=(3, 4)).astype(kind)) for name, kind in numeric.items()}
tensors["p_BFloat16"] = Tensor(rng.standard_normal((2, 5)).astype(np.float32)).astype(ms.bfloat16)
tensors["p_Int4"] = Tensor(rng.integers(-8, 8, size=(4, 2)).astype(np.int8), dtype=ms.qint4x2)
tensors["scalar"] = Tensor(np.float32(0.5))
params = [{"name": name, "data": t} for name, t in tensors.items()]
append = {"epoch_num": 7, "note": "h\\u00e9llo w\\u00f6rld \\u20ac"}
ms.save_checkpoint(params, "ms.ckpt", append_dict=append)
ms.save_checkpoint(params, "ms_crc.ckpt", append_dict=append, crc_check=True)
ms.save_checkpoint(params, "ms_enc.ckpt", enc_key=b"0123456789abcdef")
loaded = ms.load_checkpoint("ms.ckpt")
meta = [{"name": n, "dtype": str(loaded[n].dtype), "dims": list(loaded[n].shape),
         "hex": bytes(loaded[n].get_bytes()).hex()} for n in [*tensors, "epoch_num"]]
meta.append({"name": "note", "text": loaded["note"]})
json.dump(meta, open("saved.json", "w"))
"""


def _load_with_mindspore(path: Path) -> dict[str, dict]:
    run_mindspore(_LOAD_SCRIPT, path.parent, args=[path.name])
    return json.loads((path.parent / "loaded.json").read_text())


def test_mindspore_loads_what_we_write(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    bf16 = (rng.standard_normal(6).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    params = [
        ("p_bool", "Bool", (2, 3), rng.integers(0, 2, 6).astype(np.bool_).tobytes()),
        ("p_int8", "Int8", (5,), rng.integers(-128, 128, 5).astype(np.int8).tobytes()),
        ("p_uint16", "UInt16", (2, 2), rng.integers(0, 65535, 4).astype(np.uint16).tobytes()),
        ("p_uint64", "UInt64", (3,), rng.integers(0, 1 << 62, 3).astype(np.uint64).tobytes()),
        ("p_float16", "Float16", (2, 3), rng.standard_normal(6).astype(np.float16).tobytes()),
        ("p_float32", "Float32", (3, 2), rng.standard_normal(6).astype(np.float32).tobytes()),
        ("p_float64", "Float64", (1, 2, 3), rng.standard_normal(6).tobytes()),
        ("p_bfloat16", "BFloat16", (2, 3), bf16.tobytes()),
        ("p_int4", "Int4", (2, 2), bytes([0x12, 0x34, 0xF0, 0x0F])),
        ("scalar", "Float32", (), np.float32(0.25).tobytes()),
        ("empty", "Float32", (0, 3), b""),
        ("note", "str", (0,), "naïve €".encode("utf-32-le")),
    ]
    path = tmp_path / "ours.ckpt"
    save_checkpoint(path, params)
    loaded = _load_with_mindspore(path)
    assert list(loaded) == [p[0] for p in params]
    for name, dtype, dims, content in params:
        if dtype == "str":
            assert loaded[name] == {"text": "naïve €"}
        else:
            assert loaded[name] == {"dtype": dtype, "dims": list(dims), "hex": content.hex()}, name


def test_we_read_what_mindspore_writes_byte_for_byte(tmp_path: Path) -> None:
    run_mindspore(_SAVE_SCRIPT, tmp_path)
    saved = json.loads((tmp_path / "saved.json").read_text())
    with index_checkpoint(tmp_path / "ms.ckpt") as index:
        assert list(index.entries) == [p["name"] for p in saved]
        for param in saved:
            entry = index.entries[param["name"]]
            if "text" in param:
                assert entry.dtype == "str" and str(index.array(entry.name)) == param["text"]
            else:
                assert (entry.dtype, list(entry.dims)) == (param["dtype"], param["dims"])
                assert index.array(entry.name).tobytes().hex() == param["hex"]
        tensors = [(e.name, e.dtype, e.dims, b"".join(index.raw(e.name))) for e in index.entries.values()]
    for crc, name in [(False, "ms.ckpt"), (True, "ms_crc.ckpt")]:
        ours = tmp_path / f"ours_{name}"
        save_checkpoint(ours, tensors, crc=crc)
        assert ours.read_bytes() == (tmp_path / name).read_bytes(), name
    data = (tmp_path / "ms_crc.ckpt").read_bytes()
    with index_checkpoint(tmp_path / "ms_crc.ckpt", verify_crc=True) as index:
        assert index.crc == zlib.crc32(data[:-17]) == int.from_bytes(data[-10:], "big")
    with pytest.raises(CheckpointFormatError, match=r"encrypted \(AES-GCM\)"):
        index_checkpoint(tmp_path / "ms_enc.ckpt")


_BIG_SAVE_SCRIPT = """
import zlib
import numpy as np
import mindspore as ms
from mindspore import Tensor
n = {nbytes}
big = np.tile(np.arange(251, dtype=np.uint8), n // 251 + 1)[:n]
params = [{{"name": "big", "data": Tensor(big)}}, {{"name": "tail", "data": Tensor(np.arange(4, dtype=np.float16))}}]
ms.save_checkpoint(params, "ms_big.ckpt")
print(zlib.crc32(big))
"""

_BIG_LOAD_SCRIPT = """
import zlib
import mindspore as ms
d = ms.load_checkpoint("ours_big.ckpt")
print(zlib.crc32(d["big"].get_bytes()), tuple(d["big"].shape), str(d["big"].dtype), d["tail"].asnumpy().tolist())
"""


def _pattern_chunks(nbytes: int) -> list[memoryview]:
    """The bytes 0..250 repeated, as chunks of one reused ~16 MiB block (phase kept across chunks)."""
    block = memoryview(np.tile(np.arange(251, dtype=np.uint8), 66_847).tobytes())
    return [block[: min(len(block), nbytes - start)] for start in range(0, nbytes, len(block))]


def test_tensor_over_512_mib_both_directions(tmp_path: Path) -> None:
    nbytes = 600 << 20
    theirs, ours = tmp_path / "ms_big.ckpt", tmp_path / "ours_big.ckpt"
    tail = np.arange(4, dtype=np.float16).tobytes()
    try:
        expected_crc = int(run_mindspore(_BIG_SAVE_SCRIPT.format(nbytes=nbytes), tmp_path).split()[-1])
        with index_checkpoint(theirs) as index:
            entry = index.entries["big"]
            assert [n for _, n in entry.pieces] == [PIECE_SIZE, nbytes - PIECE_SIZE]
            assert entry.dims == (nbytes,) and entry.dtype == "UInt8"
            crc = 0
            for piece in index.raw("big"):
                crc = zlib.crc32(piece, crc)
            assert crc == expected_crc
            assert index.array("tail").tobytes() == tail
            del piece
        with CheckpointWriter(ours) as writer:
            writer.write_tensor_chunks("big", "UInt8", (nbytes,), nbytes, _pattern_chunks(nbytes))
            writer.write_tensor("tail", "Float16", (4,), tail)
        assert filecmp.cmp(theirs, ours, shallow=False)
        theirs.unlink()
        loaded = run_mindspore(_BIG_LOAD_SCRIPT, tmp_path).strip().splitlines()[-1]
        assert loaded == f"{expected_crc} ({nbytes},) UInt8 [0.0, 1.0, 2.0, 3.0]"
    finally:
        theirs.unlink(missing_ok=True)
        ours.unlink(missing_ok=True)
