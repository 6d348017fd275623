"""Benchmark: index a 4 GiB checkpoint and read one 64 MiB parameter; report peak RSS and index time.

Makes the checkpoint in --dir (refusing when free space is under twice its size), evicts it from
the page cache, then in a child process run under ``/usr/bin/time -v`` (else measured with
``resource.getrusage``) indexes it and checksums every byte of one parameter through the
zero-copy view. The target is a peak RSS of at most the parameter plus 150 MiB. The data is
deleted afterwards.

    python benchmarks/read_one_param.py --dir /tmp/bench
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from mpickpt.ckpt import CheckpointWriter

MIB = 1 << 20
TARGET = "target.weight"
OVERHEAD_MIB = 150

_CHILD = """
import json, sys, time, zlib
from mpickpt.ckpt import index_checkpoint
result = {}
if sys.argv[1] != "--baseline":
    started = time.perf_counter()
    with index_checkpoint(sys.argv[1]) as index:
        indexed = time.perf_counter()
        view = index.array(sys.argv[2])
        crc = zlib.crc32(view)
        result = {"index_s": indexed - started, "read_s": time.perf_counter() - indexed, "crc": crc,
                  "entries": len(index.entries)}
        del view
print(json.dumps(result))
"""

def build(path: Path, total_bytes: int, param_bytes: int, small_count: int) -> tuple[int, int]:
    """Write the checkpoint: 16 MiB weights, ``small_count`` 1 KiB biases, one target; return (entries, crc)."""
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, 16 * MIB, dtype=np.uint8).tobytes()
    target = rng.integers(0, 256, param_bytes, dtype=np.uint8).tobytes()
    bias = rng.integers(0, 256, 1024, dtype=np.uint8).tobytes()
    weights = max(1, -(-(total_bytes - param_bytes - small_count * len(bias)) // len(block)))
    biases_per_weight = -(-small_count // weights)
    entries = biases = 0
    with CheckpointWriter(path, sync=False) as writer:
        for i in range(weights):
            if i == weights // 2:
                writer.write_tensor(TARGET, "Float32", (param_bytes // 4 // 1024, 1024), target)
                entries += 1
            writer.write_tensor(f"layer{i}.weight", "Float32", (2048, 2048), block)
            entries += 1
            for j in range(min(biases_per_weight, small_count - biases)):
                writer.write_tensor(f"layer{i}.bias{j}", "Float16", (512,), bias)
                biases += 1
                entries += 1
    return entries, zlib.crc32(target)


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache so the child reads cold."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_child(args: list[str]) -> tuple[dict, int, str]:
    """Run the child; return (its JSON result, peak RSS in KiB, how RSS was measured)."""
    command = [sys.executable, "-c", _CHILD, *args]
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if time_bin:
        proc = subprocess.run([time_bin, "-v", *command], capture_output=True, text=True, check=True)
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))  # type: ignore[union-attr]
        return json.loads(proc.stdout), rss, "/usr/bin/time -v"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(command, capture_output=True, text=True, check=True)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rss <= before:
        raise RuntimeError("getrusage cannot isolate this child's peak RSS; install GNU time")
    return json.loads(proc.stdout), rss, "getrusage(RUSAGE_CHILDREN)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", required=True, type=Path, help="folder for the temporary checkpoint")
    parser.add_argument("--total-gib", type=float, default=4.0)
    parser.add_argument("--param-mib", type=int, default=64)
    parser.add_argument("--small-params", type=int, default=2000, help="number of 1 KiB parameters")
    args = parser.parse_args(argv)

    total = int(args.total_gib * 1024 * MIB)
    args.dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.dir).free
    if free < 2 * total:
        print(f"refusing: {args.dir} has {free / MIB:.0f} MiB free, needs {2 * total / MIB:.0f} MiB", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="read_one_param_", dir=args.dir))
    try:
        path = work / "big.ckpt"
        started = time.perf_counter()
        entries, crc = build(path, total, args.param_mib * MIB, args.small_params)
        build_s = time.perf_counter() - started
        evict(path)
        _, baseline_rss, _ = run_child(["--baseline"])
        result, rss, how = run_child([str(path), TARGET])
        warm, _, _ = run_child([str(path), TARGET])
        if result["crc"] != crc or result["entries"] != entries:
            print("error: the child read different bytes or entries than were written", file=sys.stderr)
            return 1
        budget = args.param_mib + OVERHEAD_MIB
        print(f"checkpoint: {path.stat().st_size / MIB:.0f} MiB, {entries} parameters (written in {build_s:.1f} s)")
        print(f"index time: {result['index_s'] * 1000:.1f} ms cold cache, {warm['index_s'] * 1000:.1f} ms warm")
        print(f"read + checksum of {args.param_mib} MiB parameter: {result['read_s'] * 1000:.1f} ms")
        print(f"peak RSS: {rss / 1024:.1f} MiB (interpreter + imports alone: {baseline_rss / 1024:.1f} MiB), "
              f"measured by {how}")
        print(f"target: <= {budget} MiB ({args.param_mib} MiB + {OVERHEAD_MIB} MiB): "
              f"{'PASS' if rss / 1024 <= budget else 'FAIL'}")
        return 0 if rss / 1024 <= budget else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
