"""Fuzz the checkpoint reader: damaged files fail only with ``MpickptError``, at indexing time.

Valid seed files are written by mpickpt itself, decoded into a generic protobuf field tree,
mutated (structurally, then re-encoded with consistent lengths, and byte by byte) and read back.
Every input either indexes, and then every entry reads back through ``array``/``raw``/``read_into``
with its stored bytes, or is refused with an ``MpickptError`` naming the file. Input ``i`` comes
from ``random.Random(SEED + i)`` alone, so a failure reproduces from its number.
"""

from __future__ import annotations

import math
import os
import random
import resource
import signal
import zlib
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import NamedTuple

import numpy as np
import pytest

from mpickpt.ckpt import DTYPES, CheckpointIndex, CheckpointWriter, dtype_itemsize, index_checkpoint, save_checkpoint
from mpickpt.errors import CheckpointFormatError, MpickptError

INPUTS = int(os.environ.get("MPICKPT_FUZZ_INPUTS", "20000"))
SEED = int(os.environ.get("MPICKPT_FUZZ_SEED", "20261201"))
TIME_LIMIT = 600  # seconds for the whole run: only a hang can reach it
RSS_GROWTH_LIMIT = 256 << 20  # bytes

Message = list[tuple[int, "int | bytes | Message"]]
"""A decoded protobuf message: (field number, varint | bytes | sub-message) in wire order."""

SUBMESSAGES: dict[tuple[int, ...], set[int]] = {(): {1}, (1,): {2, 3}, (1, 3): {1}}
"""Length-delimited fields decoded as messages, by path of field numbers from the file's top."""

EXTREMES = [0, 1, 2, 3, 255, 1 << 31, (1 << 32) + 1, 1 << 61, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1]
BAD_DIMS = [
    [0, 1 << 62],
    [1 << 62, 0],
    [0, 1 << 61],
    [0, (1 << 63) - 1, (1 << 63) - 1],
    [(1 << 63) - 1],
    [1 << 63],
    [(1 << 64) - 1],
    [1] * 64,
    [1] * 65,
    [0] * 70,
    [1 << 32, 1 << 32, 0],
    [],
    [0],
    [1],
]
DTYPE_NAMES = [*DTYPES, "MapTensor", "int32", "float32", "", "Float128", "BFloat16\x00", "str " * 3]
BAD_CODE_POINTS = [0x110000, 0xFFFFFFFF, 0x7FFFFFFF, 0xD800, 0x10FFFF, 0]


# -- protobuf wire format, generic ---------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def decode_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return result, pos
        shift += 7


def decode(buf: bytes, path: tuple[int, ...] = ()) -> Message:
    """Decode a valid message; fields named in SUBMESSAGES become nested messages."""
    fields: Message = []
    pos = 0
    while pos < len(buf):
        key, pos = decode_varint(buf, pos)
        number = key >> 3
        if key & 7 == 0:
            value, pos = decode_varint(buf, pos)
            fields.append((number, value))
            continue
        length, pos = decode_varint(buf, pos)
        body = buf[pos : pos + length]
        pos += length
        nested = number in SUBMESSAGES.get(path, set())
        fields.append((number, decode(body, (*path, number)) if nested else body))
    return fields


def encode_with_spans(message: Message) -> tuple[bytes, list[tuple[int, int]]]:
    """The encoded message and the (start, end) of every varint in it (keys, lengths, values)."""
    out = bytearray()
    spans: list[tuple[int, int]] = []
    for number, value in message:
        inner, inner_spans = b"", list[tuple[int, int]]()
        if isinstance(value, int):
            parts = [encode_varint(number << 3), encode_varint(value)]
        else:
            inner, inner_spans = (value, []) if isinstance(value, bytes) else encode_with_spans(value)
            parts = [encode_varint(number << 3 | 2), encode_varint(len(inner))]
        for part in parts:
            spans.append((len(out), len(out) + len(part)))
            out += part
        spans += [(start + len(out), end + len(out)) for start, end in inner_spans]
        out += inner
    return bytes(out), spans


def encode(message: Message) -> bytes:
    """Encode a message (``encode_with_spans`` without the spans, faster)."""
    out = bytearray()
    for number, value in message:
        if isinstance(value, int):
            out += encode_varint(number << 3) + encode_varint(value)
        else:
            body = value if isinstance(value, bytes) else encode(value)
            out += encode_varint(number << 3 | 2) + encode_varint(len(body)) + body
    return bytes(out)


# -- seeds --------------------------------------------------------------------------------------


Param = tuple[str, str, tuple[int, ...], bytes]


def _params(rng: random.Random) -> list[Param]:
    """One small tensor of every dtype, a str value, a 0-d scalar and an empty tensor."""
    params: list[Param] = []
    for dtype in DTYPES:
        if dtype == "str":
            params.append(("note", "str", (0,), "héllo ✓ 𝄞".encode("utf-32-le")))
        else:
            params.append((f"p_{dtype}", dtype, (2, 3), rng.randbytes(6 * dtype_itemsize(dtype))))
    params.append(("scalar", "Float32", (), np.float32(0.5).tobytes()))
    params.append(("empty", "Int8", (0, 3), b""))
    return params


def _map_payload(rows: int, width: int) -> bytes:
    """A serialized MapTensorProto: int32 keys, float32 values, int32 status."""
    tensors = [("int32", [rows], rows * 4), ("float32", [rows, width], rows * width * 4), ("int32", [rows], rows * 4)]
    message: Message = []
    for dtype, dims, size in tensors:
        fields: Message = [(1, d) for d in dims]
        fields += [(2, dtype.encode()), (3, bytes(i % 251 for i in range(size)))]
        message.append((1, fields))
    return encode(message)


def write_seeds(folder: Path) -> list[bytes]:
    """Valid checkpoints: every dtype with a CRC trailer, the same split into small pieces, a MapTensor."""
    rng = random.Random(SEED)
    params = _params(rng)
    save_checkpoint(folder / "all.ckpt", params, crc=True, sync=False)
    save_checkpoint(folder / "split.ckpt", params, piece_size=6, sync=False)
    with CheckpointWriter(folder / "map.ckpt", sync=False) as writer:
        writer.write_tensor("w", "Float16", (2,), b"\0\x3c\0\x3c")
        writer.write_maptensor("m", [_map_payload(2, 3), _map_payload(1, 3)])
        writer.write_tensor("step", "Int64", (), (7).to_bytes(8, "little"))
    return [(folder / name).read_bytes() for name in ("all.ckpt", "split.ckpt", "map.ckpt")]


class Seed(NamedTuple):
    """A valid checkpoint without its CRC trailer, decoded, with its varints located."""

    body: bytes
    crc: bool
    entries: Message
    varints: list[tuple[int, int]]


def load_seeds(folder: Path) -> list[Seed]:
    """Write the seeds into ``folder`` and decode them."""
    seeds = []
    for data in write_seeds(folder):
        crc = data[-17:-10] == b"crc_num"
        body = data[:-17] if crc else data
        entries = decode(body)
        encoded, varints = encode_with_spans(entries)
        assert encoded == body, "the generic decoder must re-encode a seed byte for byte"
        seeds.append(Seed(body, crc, entries, varints))
    return seeds


# -- structural mutations (lengths stay consistent) ---------------------------------------------


def _tensors(entries: Message) -> list[Message]:
    """Every TensorProto in the file, MapTensor members included."""
    found: list[Message] = []
    for _, value in entries:
        for number, body in value if isinstance(value, list) else []:
            if number == 2 and isinstance(body, list):
                found.append(body)
            elif number == 3 and isinstance(body, list):
                found += [t for _, t in body if isinstance(t, list)]
    return found


def _set_dims(rng: random.Random, tensor: Message) -> None:
    """Dims from the extremes, often with the content resized to match them."""
    dims = rng.choice(BAD_DIMS) if rng.random() < 0.7 else [rng.choice(EXTREMES) for _ in range(rng.randint(0, 4))]
    rest = [field for field in tensor if field[0] != 1]
    dtype = next((v for n, v in rest if n == 2 and isinstance(v, bytes)), b"").decode("utf-8", "replace")
    itemsize = dtype_itemsize(dtype) if dtype in DTYPES else 4
    if rng.random() < 0.6 and math.prod(dims) * itemsize <= 4096:
        rest = [field for field in rest if field[0] != 3] + [(3, rng.randbytes(math.prod(dims) * itemsize))]
    if rng.random() < 0.3:  # packed encoding
        tensor[:] = [(1, b"".join(encode_varint(d) for d in dims)), *rest]
    else:
        tensor[:] = [(1, d) for d in dims] + rest


def _set_field(rng: random.Random, tensor: Message, number: int, value: int | bytes | Message) -> None:
    """Replace the first field ``number`` of a message, or insert it at a random place."""
    for i, (n, _) in enumerate(tensor):
        if n == number:
            tensor[i] = (number, value)
            return
    tensor.insert(rng.randint(0, len(tensor)), (number, value))


def _content(tensor: Message) -> bytes:
    """The first content field of a TensorProto."""
    return next((v for n, v in tensor if n == 3 and isinstance(v, bytes)), b"")


def _mutate_tensor(rng: random.Random, tensor: Message) -> None:
    choice = rng.randrange(7)
    if choice == 0:
        _set_dims(rng, tensor)
    elif choice == 1:
        dtype = rng.choice(DTYPE_NAMES)
        _set_field(rng, tensor, 2, dtype.encode() if rng.random() < 0.9 else b"\xff\xfeInt8")
    elif choice == 2:
        content = _content(tensor)
        cut = rng.randint(0, len(content))
        _set_field(rng, tensor, 3, content[:cut] if rng.random() < 0.5 else content + rng.randbytes(rng.randint(1, 9)))
    elif choice == 3:  # a str value with a code point numpy may refuse
        codes = [rng.choice(BAD_CODE_POINTS) for _ in range(rng.randint(1, 3))]
        _set_field(rng, tensor, 3, b"".join(c.to_bytes(4, "little") for c in codes))
        if rng.random() < 0.7:
            _set_field(rng, tensor, 2, b"str")
    elif choice == 4 and tensor:
        del tensor[rng.randrange(len(tensor))]
    elif choice == 5 and tensor:
        tensor.insert(rng.randint(0, len(tensor)), rng.choice(tensor))
    else:
        tensor.insert(rng.randint(0, len(tensor)), (rng.randint(1, 20), rng.choice([0, 1 << 40, b"", b"\x08\x01"])))


def _mutate_entries(rng: random.Random, entries: Message) -> None:
    """One structural change to the list of ``Checkpoint.value`` entries."""
    choice = rng.randrange(6)
    if choice < 3 and _tensors(entries):
        _mutate_tensor(rng, rng.choice(_tensors(entries)))
        return
    if not entries:
        return
    i = rng.randrange(len(entries))
    value = entries[i][1]
    if choice == 3:  # duplicate: a consecutive piece or a scattered repeat
        where = i + 1 if rng.random() < 0.5 else rng.randint(0, len(entries))
        entries.insert(where, (1, _copy(value)))
    elif choice == 4 and isinstance(value, list):  # rename, drop or repeat a Value field
        other = rng.choice(entries)[1]
        tag = next((v for n, v in other if n == 1), b"") if isinstance(other, list) else b""
        action = rng.randrange(3)
        if action == 0:
            _set_field(rng, value, 1, rng.choice([tag, b"", b"\xc3\x28", b"x" * 300]))
        elif action == 1 and value:
            del value[rng.randrange(len(value))]
        elif value:
            value.insert(rng.randint(0, len(value)), rng.choice(value))
    elif choice == 5:
        j = rng.randrange(len(entries))
        entries[i], entries[j] = entries[j], entries[i]


def _copy(value: int | bytes | Message) -> int | bytes | Message:
    """A deep copy of a decoded field value."""
    return [(n, _copy(v)) for n, v in value] if isinstance(value, list) else value


# -- byte mutations -----------------------------------------------------------------------------


def _mutate_bytes(rng: random.Random, data: bytearray, varints: list[tuple[int, int]]) -> None:
    """One byte-level change; ``varints`` are where the header varints were before any change."""
    choice = rng.randrange(6)
    if not data:
        data += rng.randbytes(rng.randint(1, 8))
    elif choice == 0:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif choice == 1:
        at = rng.randrange(len(data))
        data[at] ^= 1 << rng.randrange(8)
    elif choice == 2:
        del data[rng.randint(0, len(data) - 1) :]
    elif choice == 3:
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 16))
    elif choice == 4:
        at = rng.randrange(len(data))
        del data[at : at + rng.randint(1, 16)]
    elif varints:
        start, end = rng.choice(varints)
        data[start:end] = encode_varint(rng.choice(EXTREMES))


def make_input(seeds: list[Seed], number: int) -> tuple[bytes, bool]:
    """Input ``number`` (bytes, whether to verify the CRC): seeded by the number alone.

    Mostly one structural change (lengths stay consistent, so the reader's checks past the wire
    format are reached), sometimes several, sometimes followed by byte changes; else byte changes only.
    """
    rng = random.Random(SEED + number)
    seed = rng.choice(seeds)
    body, crc, varints = seed.body, seed.crc, seed.varints
    structural = rng.random() < 0.6
    if structural:
        entries = _copy(seed.entries)
        assert isinstance(entries, list)
        for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 3)):
            _mutate_entries(rng, entries)
        crc = crc or rng.random() < 0.2
        body, varints = encode_with_spans(entries) if rng.random() < 0.15 else (encode(entries), [])
    data = bytearray(body + (b"crc_num" + zlib.crc32(body).to_bytes(10, "big") if crc else b""))
    if not structural or varints:
        for _ in range(rng.randint(1, 3)):
            _mutate_bytes(rng, data, varints)
    return bytes(data), rng.random() < 0.3


# -- the checks ---------------------------------------------------------------------------------


def read_everything(index: CheckpointIndex) -> None:
    """Read every entry of an index every way; each must hold exactly its stored bytes, within the file."""
    with index:
        for name, entry in index.entries.items():
            stored = b"".join(bytes(piece) for piece in index.raw(name))
            assert len(stored) == entry.nbytes <= index.size
            if entry.kind == "maptensor":
                with pytest.raises(CheckpointFormatError, match="MapTensor"):
                    index.array(name)
                continue
            array = index.array(name)
            assert array.tobytes() == stored
            assert array.shape == (() if entry.dtype == "str" else entry.dims)
            if entry.dtype == "str":
                array.item()  # the Python str: numpy refuses code points past U+10FFFF here
            copy = bytearray(entry.nbytes)
            index.read_into(name, 0, memoryview(copy))
            assert bytes(copy) == stored
            index.release(name)


class _Hang(BaseException):
    """The fuzz run outlived TIME_LIMIT (a BaseException: the per-input catch-all lets it through)."""


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    raise _Hang(f"fuzz run exceeded {TIME_LIMIT} s")


def outcome(seeds: list[Seed], path: Path, number: int) -> str:
    """'indexed', or the class of the MpickptError indexing input ``number`` raised; anything else propagates."""
    data, verify_crc = make_input(seeds, number)
    path.write_bytes(data)
    try:
        index = index_checkpoint(path, verify_crc=verify_crc)
    except MpickptError as err:
        assert str(path) in str(err), f"the message does not name the file: {err}"
        return type(err).__name__
    read_everything(index)  # once indexed, nothing may fail
    return "indexed"


def run_all(seeds: list[Seed], path: Path) -> tuple[Counter[str], list[str]]:
    """Outcome counts of every input, and a line per input that raised anything else."""
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(TIME_LIMIT)
    try:
        for number in range(INPUTS):
            try:
                outcomes[outcome(seeds, path, number)] += 1
            except Exception as err:  # noqa: BLE001 - any other error is what this test looks for
                failures.append(f"input {number}: {type(err).__name__}: {err}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return outcomes, failures


def test_seeds_read_back(tmp_path: Path) -> None:
    """Every seed, as written, indexes and reads back (and re-encodes byte for byte: load_seeds)."""
    for name, seed in zip(("all.ckpt", "split.ckpt", "map.ckpt"), load_seeds(tmp_path), strict=True):
        read_everything(index_checkpoint(tmp_path / name, verify_crc=True))
        assert seed.crc == (name == "all.ckpt")


def test_fuzzed_inputs_fail_only_with_mpickpt_errors(tmp_path: Path) -> None:
    seeds = load_seeds(tmp_path)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
    outcomes, failures = run_all(seeds, tmp_path / "fuzz.ckpt")
    rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10) - rss_before
    print(f"\nfuzz: {INPUTS} inputs, outcomes {dict(outcomes)}, max RSS growth {rss_growth >> 20} MiB")
    assert not failures, f"{len(failures)} inputs failed, e.g.:\n" + "\n".join(failures[:10])
    assert outcomes["indexed"] > INPUTS // 20 and outcomes["CheckpointFormatError"] > INPUTS // 4
    assert rss_growth < RSS_GROWTH_LIMIT
