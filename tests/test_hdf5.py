"""HDF5 files of full tensors: structure as other HDF5 tools see it, names, many writers at once, foreign
files, damaged files (the shared behaviour of every format is in test_format_conformance.py)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

h5py = pytest.importorskip("h5py")

from test_format_conformance import sample, tensors

from mpickpt.errors import CheckpointFormatError, DestinationError, MpickptError
from mpickpt.formats import TensorSpec, format_of, open_index, open_writer
from mpickpt.formats.hdf5 import H5Entry, H5Layout, H5Writer, Part, escape_name, index_h5, open_regions, unescape_name
from mpickpt.inspect import describe_file, format_description

TEXTS = {"note": ("héllo ✓ 𝄞", (0,)), "plain": ("hi", ()), "empty.note": ("", (0,))}
NAMES = ("a/b", "100%", "50%/x%2F", ".", "..", "%25", "ü.weight", "nul\0byte", "x" * 300)


def content(seed: int = 0) -> dict[str, tuple[str, np.ndarray]]:
    """Every numeric dtype in several shapes (0-d, empty) and tricky names."""
    rng = np.random.default_rng(seed)
    found = tensors(seed)
    found.update({name: ("Float32", sample("Float32", (2, i), rng)) for i, name in enumerate(NAMES)})
    return found


def str_specs() -> list[TensorSpec]:
    return [TensorSpec(name, "str", dims, 4 * len(text)) for name, (text, dims) in TEXTS.items()]


def all_specs(data: dict[str, tuple[str, np.ndarray]]) -> list[TensorSpec]:
    return [TensorSpec(n, d, a.shape, a.nbytes) for n, (d, a) in data.items()] + str_specs()


def write_strings(writer) -> None:
    for name, (text, dims) in TEXTS.items():
        writer.write_tensor(name, "str", dims, text.encode("utf-32-le"))


def write_h5(path: Path, data: dict[str, tuple[str, np.ndarray]], **kw) -> Path:
    with H5Writer(path, sync=False, **kw) as writer:
        writer.declare(all_specs(data))
        for name, (dtype, arr) in data.items():
            writer.write_tensor(name, dtype, arr.shape, arr if arr.size else b"")
        write_strings(writer)
    return path


def check_index(path: Path, data: dict[str, tuple[str, np.ndarray]], verify_crc: bool = False) -> None:
    with index_h5(path, verify_crc=verify_crc) as index:
        assert list(index.entries) == [*data, *TEXTS]  # declared order
        for name, (dtype, arr) in data.items():
            entry = index.entry(name)
            assert (entry.dtype, entry.dims, entry.nbytes) == (dtype, arr.shape, arr.nbytes)
            assert index.array(name).tobytes() == arr.tobytes()
            if arr.nbytes:
                assert len(entry.pieces) == 1 and entry.pieces[0][0] % 64 == 0
        for name, (text, dims) in TEXTS.items():
            entry = index.entry(name)
            assert (entry.dtype, entry.dims, entry.nbytes, entry.pieces) == ("str", dims, 4 * len(text), ())
            assert str(index.array(name)) == text
            assert b"".join(index.raw(name)) == text.encode("utf-32-le")


def test_round_trip_of_every_dtype_str_and_name(tmp_path: Path) -> None:
    data = content()
    path = write_h5(tmp_path / "m.h5", data, crc=True)
    check_index(path, data, verify_crc=True)
    assert (path.stat().st_mode & 0o777) == 0o400 and os.listdir(tmp_path) == ["m.h5"]


def test_h5py_reads_every_dataset_with_its_attributes(tmp_path: Path) -> None:
    data = content()
    layouts = json.dumps({"w": {"dev_matrix": [2, 4], "tensor_map": [1, -1]}})
    path = write_h5(tmp_path / "m.h5", data, attrs={"source_layouts": layouts},
                    dataset_attrs={"a/b": {"note": "slash"}})
    with h5py.File(path, "r") as f:
        assert f.attrs["mpickpt_version"] and json.loads(f.attrs["source_layouts"]) == json.loads(layouts)
        assert f["a%2Fb"].attrs["note"] == b"slash"
        for name, (dtype, arr) in data.items():
            ds = f[escape_name(name)]
            assert ds.attrs["mindspore_dtype"] == dtype.encode()
            assert ds.id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS and ds.compression is None
            got = ds[()]
            if dtype == "BFloat16":
                assert got.dtype == np.uint16
            elif dtype == "Int4":
                assert got.dtype == np.int8
            assert np.asarray(got).tobytes() == arr.tobytes() and got.shape == arr.shape
        for name, (text, dims) in TEXTS.items():
            ds = f[name]
            assert ds.shape == () and ds.asstr()[()] == text and tuple(ds.attrs["mindspore_dims"]) == dims


def test_bfloat16_values_through_h5py(tmp_path: Path) -> None:
    values = np.array([1.5, -2.0, 3.25], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    path = write_h5(tmp_path / "b.h5", {"w": ("BFloat16", bits)})
    with h5py.File(path, "r") as f:
        stored = f["w"][()]
    assert ((stored.astype(np.uint32) << 16).view(np.float32) == values).all()


def test_h5dump_lists_the_datasets(tmp_path: Path) -> None:
    if shutil.which("h5dump") is None:
        pytest.skip("h5dump (Debian hdf5-tools) is not installed")
    path = write_h5(tmp_path / "m.h5", content(), attrs={"source_layouts": "{}"})
    out = subprocess.run(["h5dump", "-H", str(path)], capture_output=True, text=True, check=True).stdout
    for link in ("a%2Fb", "100%25", "%2E", "bfloat16.4", "note"):
        assert f'DATASET "{link}"' in out
    assert 'ATTRIBUTE "source_layouts"' in out and 'ATTRIBUTE "mindspore_dtype"' in out


def test_names_escape_reversibly() -> None:
    for name in NAMES:
        link = escape_name(name)
        assert "/" not in link and "\0" not in link and link not in ("", ".")
        assert unescape_name(link) == name


def test_suffix_and_signature_select_the_format(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "no_suffix", {"w": ("Float32", np.ones(2, np.float32))})
    assert format_of(path) == "h5" and format_of(tmp_path / "x.h5") == "h5"
    with open_index(path) as index:
        assert index.array("w").tolist() == [1.0, 1.0]


# -- many processes -------------------------------------------------------------------------------


def _write_some(path: str, layout: H5Layout, names: list[str], seed: int, ready, queue) -> None:
    """One process's share: wait for the other, write its tensors (by copy and by buffer), return its Part."""
    data = content(seed)
    writer = open_regions(path, layout, crc=True, sync=False)
    ready.wait()
    src = Path(path).with_name(f"src.{os.getpid()}")
    for i, name in enumerate(names):
        dtype, arr = data[name]
        if i % 2 and arr.nbytes:
            src.write_bytes(b"pad" + arr.tobytes())
            fd = os.open(src, os.O_RDONLY)
            writer.copy_tensor_from(name, dtype, arr.shape, fd, 3, arr.nbytes)
            os.close(fd)
        else:
            writer.write_tensor(name, dtype, arr.shape, arr.tobytes())
    queue.put(writer.close())


def test_two_processes_write_disjoint_datasets_at_once(tmp_path: Path) -> None:
    data = content(7)
    path = tmp_path / "u.h5"
    leader = H5Writer(path, crc=True, sync=False)
    layout = leader.layout(all_specs(data))
    names = list(data)
    ctx = multiprocessing.get_context("fork")
    ready, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_write_some, args=(str(path), layout, names[i::2], 7, ready, queue))
             for i in range(2)]
    for proc in procs:
        proc.start()
    parts = [queue.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    for src in tmp_path.glob("src.*"):
        src.unlink()
    write_strings(leader)
    assert not path.exists() and layout.tmp.exists()  # nothing under the final name before finish
    leader.finish(parts)
    check_index(path, data, verify_crc=True)
    serial = write_h5(tmp_path / "s.h5", data, crc=True)
    with index_h5(path) as a, index_h5(serial) as b:
        assert a.crc == b.crc is not None


def test_finish_refuses_missing_and_twice_written_tensors(tmp_path: Path) -> None:
    specs = [TensorSpec("a", "Float32", (2,), 8), TensorSpec("b", "Int8", (1,), 1)]
    for parts, message in (([], "'b' was not written"), ([Part(("a", "b"))], "'a' written twice")):
        path = tmp_path / "x.h5"
        writer = H5Writer(path, sync=False)
        writer.layout(specs)
        writer.write_tensor("a", "Float32", (2,), np.zeros(2, np.float32))
        with pytest.raises(CheckpointFormatError, match=message):
            writer.finish(parts)
        assert list(tmp_path.iterdir()) == []


def test_crc_needs_every_part_to_carry_one(tmp_path: Path) -> None:
    writer = H5Writer(tmp_path / "x.h5", crc=True, sync=False)
    layout = writer.layout([TensorSpec("a", "Float32", (2,), 8)])
    other = open_regions(tmp_path / "x.h5", layout, sync=False)
    other.write_tensor("a", "Float32", (2,), np.ones(2, np.float32))
    with pytest.raises(CheckpointFormatError, match="'a' was written without a CRC"):
        writer.finish([other.close()])


def test_mpio_driver_writes_the_same_content(tmp_path: Path) -> None:
    if not h5py.get_config().mpi:
        pytest.skip("h5py is built without MPI (the PyPI wheel): no mpio driver; the region scheme is used")
    from mpi4py import MPI

    data = tensors(3)
    path = tmp_path / "m.h5"
    writer = H5Writer(path, sync=False)
    layout = writer.layout(all_specs(data))
    with h5py.File(layout.tmp, "r+", driver="mpio", comm=MPI.COMM_WORLD) as f:
        for name, (_, arr) in data.items():
            dataset = f[escape_name(name)]
            if arr.size:
                with dataset.collective:
                    dataset[...] = arr.view(dataset.dtype)
    write_strings(writer)
    writer.commit()
    check_index(path, data)


# -- writer refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("spec", "message"), [
    (TensorSpec("m", "MapTensor", (), 8, "maptensor"), "'m' is a maptensor"),
    (TensorSpec("d", "Float32", (1,) * 33, 4), "'d'.*at most 32 dims"),
    (TensorSpec("q", "Float128", (1,), 16), "unknown dtype"),
    (TensorSpec("", "Float32", (1,), 4), "without a name"),
    (TensorSpec("s", "Float32", (3,), 8), "'s'"),
])
def test_layout_refuses_what_hdf5_cannot_hold(tmp_path: Path, spec: TensorSpec, message: str) -> None:
    with pytest.raises(CheckpointFormatError, match=message), H5Writer(tmp_path / "x.h5", sync=False) as writer:
        writer.declare([spec])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("text", "message"), [("a\0b", "NUL"), ("\ud800", "UTF-8")])
def test_str_values_hdf5_cannot_hold_are_refused(tmp_path: Path, text: str, message: str) -> None:
    data = text.encode("utf-32-le", "surrogatepass")
    with pytest.raises(CheckpointFormatError, match=f"'s'.*{message}"), \
            open_writer(tmp_path / "x.h5", "h5", sync=False) as writer:
        writer.declare([TensorSpec("s", "str", (0,), len(data))])
        writer.write_tensor("s", "str", (0,), data)


def test_maptensor_and_reserved_attributes_are_refused(tmp_path: Path) -> None:
    writer = H5Writer(tmp_path / "x.h5", sync=False, attrs={"mpickpt_version": "9"})
    with pytest.raises(CheckpointFormatError, match="'mpickpt_version' is reserved"):
        writer.declare([])
    writer.abort()
    writer = H5Writer(tmp_path / "x.h5", sync=False)
    writer.declare([TensorSpec("a", "Float32", (1,), 4)])
    with pytest.raises(CheckpointFormatError, match="'m' is a MapTensor"):
        writer.write_maptensor("m", [b"x"])
    writer.abort()
    with pytest.raises(CheckpointFormatError, match="undeclared parameter 'zz'"):
        H5Writer(tmp_path / "y.h5", dataset_attrs={"zz": {}}).declare([])
    assert not any(tmp_path.glob("*.h5"))


def test_layout_after_abort_creates_nothing(tmp_path: Path) -> None:
    writer = H5Writer(tmp_path / "x.h5", sync=False)
    writer.abort()
    with pytest.raises(DestinationError):
        writer.declare([TensorSpec("a", "Float32", (1,), 4)])
    assert list(tmp_path.iterdir()) == []


# -- files of other tools -------------------------------------------------------------------------


def foreign_file(path: Path) -> dict[str, np.ndarray]:
    """Chunked, compressed, big-endian, compact, attribute-less and nested datasets, written by h5py."""
    rng = np.random.default_rng(9)
    expected = {
        "gz": rng.standard_normal((40, 30)).astype(np.float32),
        "be": np.arange(12, dtype=">i4").reshape(3, 4),
        "plain": np.arange(5, dtype=np.float64),
        "deep/er/w": np.arange(6, dtype=np.uint16).reshape(2, 3),
        "flags": np.array([True, False, True]),
        "compact": np.arange(4, dtype=np.int16),
    }
    with h5py.File(path, "w") as f:
        f.create_dataset("gz", data=expected["gz"], chunks=(8, 7), compression="gzip", shuffle=True)
        f.create_dataset("be", data=expected["be"])
        f.create_dataset("plain", data=expected["plain"])
        f.create_dataset("deep/er/w", data=expected["deep/er/w"], chunks=True)
        f.create_dataset("flags", data=expected["flags"])
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_layout(h5py.h5d.COMPACT)
        f.create_dataset("compact", data=expected["compact"], dcpl=dcpl)
        f.attrs["origin"] = np.array([1, 2])
    return expected


def test_foreign_datasets_are_decoded_by_h5py(tmp_path: Path) -> None:
    expected = foreign_file(tmp_path / "f.h5")
    with index_h5(tmp_path / "f.h5") as index:
        assert index.metadata == {"origin": "[1, 2]"} and set(index.entries) == set(expected)
        for name, arr in expected.items():
            entry = index.entry(name)
            want = arr.astype(arr.dtype.newbyteorder("<"))
            assert entry.dims == arr.shape and entry.nbytes == arr.nbytes
            assert isinstance(entry, H5Entry) == (name not in ("plain", "flags"))
            assert index.array(name).tobytes() == want.tobytes() == b"".join(index.raw(name))
            out = bytearray(min(7, arr.nbytes - 1))
            index.read_into(name, 1, memoryview(out))
            assert bytes(out) == want.tobytes()[1 : 1 + len(out)]
            index.release(name)
        assert index.entry("be").dtype == "Int32" and index.entry("flags").dtype == "Bool"


def test_foreign_file_through_the_tensor_writer(tmp_path: Path) -> None:
    """What the executor does with a whole source tensor: copy its runs, or its raw() views."""
    expected = foreign_file(tmp_path / "f.h5")
    with index_h5(tmp_path / "f.h5") as index, open_writer(tmp_path / "o.h5", "h5", sync=False) as out:
        out.declare([TensorSpec(e.name, e.dtype, e.dims, e.nbytes) for e in index.entries.values()])
        for e in index.entries.values():
            if len(e.pieces) == 1:
                out.copy_tensor_from(e.name, e.dtype, e.dims, index.fileno(), *e.pieces[0])
            else:
                out.write_tensor_chunks(e.name, e.dtype, e.dims, e.nbytes, index.raw(e.name))
    with index_h5(tmp_path / "o.h5") as index:
        for name, arr in expected.items():
            assert index.array(name).tobytes() == arr.astype(arr.dtype.newbyteorder("<")).tobytes()


# -- damaged files --------------------------------------------------------------------------------


def patched(path: Path, edit) -> Path:
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_bytes(b"PK\x03\x04 not hdf5"), "not an HDF5 file"),
    (lambda p: p.write_bytes(b""), "not an HDF5 file"),
    (lambda p: p.write_bytes(write_h5(p.with_name("ok.h5"), content()).read_bytes()[:3000]),
     "not a readable HDF5"),
    (lambda p: patched(write_h5(p, content()), lambda f: f["int8.3"].attrs.__setitem__("mindspore_dtype", "Float128")),
     "dataset 'int8.3'.*unknown mindspore_dtype 'Float128'"),
    (lambda p: patched(write_h5(p, content()), lambda f: f["int8.3"].attrs.__setitem__("mindspore_dtype", "Float32")),
     "dataset 'int8.3'.*does not match"),
    (lambda p: patched(write_h5(p, content()), lambda f: f.create_dataset("c", shape=(2, 2), dtype="c8")),
     "dataset 'c'.*no MindSpore dtype"),
    # datasets never (fully) written: h5py would read their fill values
    (lambda p: patched(write_h5(p, content()), lambda f: f.create_dataset("late", shape=(4, 4), dtype="f4")),
     "dataset 'late'.*holds no data"),
    (lambda p: patched(write_h5(p, content()), lambda f: f.create_dataset("seven", shape=(3,), dtype="i4",
                                                                          fillvalue=7)),
     "dataset 'seven'.*holds no data"),
    (lambda p: patched(write_h5(p, content()), lambda f: f.create_dataset("part", shape=(8, 4), dtype="f4",
                                                                          chunks=(2, 4)).__setitem__(0, 1)),
     "dataset 'part'.*only 1 of its 4 chunks were written"),
    (lambda p: patched(write_h5(p, content()), lambda f: h5py.h5d.create(
        f.id, b"w\xff", h5py.h5t.py_create(np.dtype("f4")), h5py.h5s.create_simple((2,)))),
     "link name b'w\\\\xff' in group '' is not UTF-8"),
    (lambda p: patched(write_h5(p, content()), lambda f: f.__setitem__("link", h5py.SoftLink("/a%2Fb"))),
     "'link' is a SoftLink"),
    (lambda p: patched(write_h5(p, content()), lambda f: f.__setitem__("dup%2Fx", f["a%2Fb"])
                       or f.create_group("dup").__setitem__("x", f["a%2Fb"])),
     "dataset 'dup/x'.*appears twice"),
])
def test_damaged_files_are_refused_naming_file_and_dataset(tmp_path: Path, make, message: str) -> None:
    path = tmp_path / "bad.h5"
    make(path)
    with pytest.raises(CheckpointFormatError, match=message) as err:
        index_h5(path)
    assert str(path) in str(err.value)


def test_dataset_past_the_end_of_the_file(tmp_path: Path) -> None:
    """An old-format file (superblock v0, no checksums) whose end-of-file address was cut with its data."""
    path = tmp_path / "cut.h5"
    with h5py.File(path, "w", libver="earliest") as f:
        f.create_dataset("small", data=np.arange(4, dtype=np.int32))
        f.create_dataset("big", data=np.arange(4096, dtype=np.float64))
        offset = f["big"].id.get_offset()
    blob = bytearray(path.read_bytes()[: offset + 100])
    assert blob[:8] == b"\x89HDF\r\n\x1a\n" and blob[8] == 0  # superblock version 0
    blob[40:48] = len(blob).to_bytes(8, "little")  # its end-of-file address
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointFormatError, match=r"dataset 'big'.*(runs past the end|invalid dataset size)"):
        index_h5(path)


def test_fuzzed_files_raise_only_mpickpt_errors_and_print_nothing(tmp_path: Path, capfd) -> None:
    path = tmp_path / "f.h5"
    data = {name: content(2)[name] for name in ("float32.4", "bfloat16.3", "int4.5", "a/b")}
    blob = write_h5(path, data, crc=True).read_bytes()
    path.chmod(0o600)
    rng = random.Random(11)
    refused = 0
    cases = [blob[:cut] for cut in range(0, len(blob), 7)]
    for _ in range(1500):
        damaged = bytearray(blob)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        cases.append(bytes(damaged))
    for case in cases:
        path.write_bytes(case)
        try:
            with index_h5(path, verify_crc=rng.random() < 0.5) as index:
                for name in index.entries:
                    index.array(name).tobytes()
        except MpickptError as err:
            assert str(path) in str(err)
            refused += 1
    assert refused > len(cases) // 3
    assert capfd.readouterr().err == ""


def test_crc_detects_a_changed_str_value(tmp_path: Path) -> None:
    path = write_h5(tmp_path / "c.h5", {"w": ("Int8", np.arange(3, dtype=np.int8))}, crc=True)
    path.chmod(0o600)
    patched(path, lambda f: f["note"].__setitem__((), "changed"))
    with pytest.raises(CheckpointFormatError, match="CRC check failed"):
        index_h5(path, verify_crc=True)
    with index_h5(path) as index:
        assert index.crc is not None and str(index.array("note")) == "changed"


# -- inspect --------------------------------------------------------------------------------------


def test_inspect_lists_datasets_and_attributes(tmp_path: Path) -> None:
    data = {"w": ("BFloat16", np.zeros((2, 3), np.uint16))}
    path = write_h5(tmp_path / "m.h5", data, attrs={"source_layouts": json.dumps({"w": [1] * 100})})
    description = describe_file(path)
    assert description["kind"] == "hdf5"
    assert description["parameters"][0] == {"name": "w", "dtype": "BFloat16", "shape": [2, 3], "bytes": 12}
    assert set(description["attributes"]) == {"mpickpt_version", "source_layouts"}
    table = format_description(description)
    assert table.splitlines()[1].split() == ["w", "BFloat16", "[2,3]", "12"]
    assert "attribute source_layouts: {" in table and "characters)" in table and "4 datasets" in table
