"""The copy-and-checksum path every `.ckpt` output takes, and the cache of open source indexes."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import pytest

from mpickpt.ckpt import save_checkpoint
from mpickpt.errors import CheckpointFormatError
from mpickpt.formats import IndexCache
from mpickpt.formats.offsets import CACHE_CHUNK, COPY_CHUNK, copy_with_crc


@pytest.mark.parametrize("offset,count", [(0, 0), (0, 1), (5, CACHE_CHUNK + 3), (4095, COPY_CHUNK + CACHE_CHUNK + 17),
                                          (COPY_CHUNK - 1, 2 * COPY_CHUNK + 1)])
def test_copy_with_crc_appends_the_range_and_returns_its_crc(tmp_path: Path, offset: int, count: int) -> None:
    data = os.urandom(3 * COPY_CHUNK)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    try:
        os.write(dst, b"head")
        crc = copy_with_crc(src, offset, dst, count, zlib.crc32(b"head"))
    finally:
        os.close(src)
        os.close(dst)
    expected = b"head" + data[offset:offset + count]
    assert (tmp_path / "dst").read_bytes() == expected
    assert crc == zlib.crc32(expected)


def test_copy_with_crc_refuses_a_range_past_the_end(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x" * 1000)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(ValueError, match="ends before"):
            copy_with_crc(src, 900, dst, 200, 0)
    finally:
        os.close(src)
        os.close(dst)


def _files(tmp_path: Path, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = tmp_path / f"f{i}.ckpt"
        save_checkpoint(path, [(f"p{i}", "Int32", [2], bytes(8))])
        paths.append(str(path))
    return paths


def test_index_cache_reads_each_file_once_and_keeps_leased_indexes_open(tmp_path: Path) -> None:
    paths = _files(tmp_path, 4)
    cache = IndexCache(limit=2)
    with cache.lease(paths[0]) as first:
        for path in paths[1:]:
            with cache.lease(path):
                pass
        assert first.entry("p0").dims == (2,)  # still open: on lease while three others came and went
    with cache.lease(paths[3]) as again, cache.lease(paths[3]) as same:
        assert again is same
    with cache.lease(paths[1]) as reopened:
        assert reopened.entry("p1").nbytes == 8  # evicted (limit 2), opened again
    cache.close()
    with cache.lease(paths[0]) as fresh:
        assert fresh is not first
    cache.close()


def test_index_cache_closes_what_it_evicts(tmp_path: Path) -> None:
    paths = _files(tmp_path, 3)
    cache = IndexCache(limit=1)
    with cache.lease(paths[0]) as first:
        fd = first.fileno()
    with cache.lease(paths[1]):
        pass
    with pytest.raises(OSError):
        os.fstat(fd)  # the first index was closed once a second one exceeded the limit
    cache.close()


def test_index_cache_refuses_a_file_changed_since_it_was_expected_or_first_indexed(tmp_path: Path) -> None:
    """The reference is the first of: the size and time expected (a start-up stat), the first indexing."""
    early, late = _files(tmp_path, 2)
    cache = IndexCache()
    info = os.stat(early)
    cache.expect(early, info.st_size, info.st_mtime_ns)  # as start-up saw it
    os.utime(early, ns=(5, 5))  # rewritten before this process indexed it
    with cache.lease(early), cache.lease(late):
        cache.check_unchanged(late)  # unchanged since first indexed
        with pytest.raises(CheckpointFormatError, match=rf"{early}: the file changed while this run read it "
                           rf"\(size {info.st_size} -> {info.st_size} bytes, modification time moved by -\d+\.\d{{3}} s\)"):
            cache.check_unchanged(early, late)
    cache.close()


def test_copy_with_crc_ticks_after_every_window(tmp_path: Path) -> None:
    """An MPI process serves its peers from tick() while it copies a long parameter."""
    data = os.urandom(2 * COPY_CHUNK + 5)
    (tmp_path / "src").write_bytes(data)
    ticks = []
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT)
    try:
        copy_with_crc(src, 0, dst, len(data), 0, tick=lambda: ticks.append(os.lseek(dst, 0, os.SEEK_CUR)))
    finally:
        os.close(src)
        os.close(dst)
    assert ticks == [COPY_CHUNK, 2 * COPY_CHUNK, len(data)]
