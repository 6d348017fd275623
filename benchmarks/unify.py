"""Benchmark unify: mpickpt (serial and under mpiexec) vs MindSpore's `unified_safetensors` vs `cp -r`.

Run by hand, not in CI (MindSpore only in its own interpreter, $MPICKPT_MINDSPORE_PYTHON):
    python benchmarks/make_case.py --gb 1 --out /work/bench-data/llama_1gb
    python benchmarks/unify.py /work/bench-data/llama_1gb [--repeat 3] [--procs 2] [--no-mindspore]

The case's sources are first converted to safetensors (MindSpore's unify reads only those); every contender
then unifies that folder, `--repeat` times round-robin, each from a warm page cache with earlier writes
flushed and its output removed. mpickpt's outputs (mindspore layout, `--no-sync`) must be byte-identical
run to run and across process counts, and hold the same tensors as MindSpore's and as the hf layout's
(200 MB shards, so that two processes share the work: the mindspore layout of 1 GB is one part) and the
HDF5 file's (one file, its parameters dealt to the processes). Prints a table and saves it
to benchmarks/results/unify_<case>.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _measure import ProcStats, run_wrapped

from mpickpt.formats import open_index

BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MS_PYTHON = os.environ.get("MPICKPT_MINDSPORE_PYTHON", "/work/ms-np1/bin/python")
MIB = 1 << 20


def warm(folder: Path) -> None:
    """Read every file of a folder once (same warm page cache for every contender)."""
    buf = bytearray(16 * MIB)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while f.readinto(buf):
                    pass


def contenders(src: Path, strategy: Path, procs: list[int], mindspore: bool) -> dict[str, list[str]]:
    """Name -> command writing into the folder OUT (replaced per run)."""
    unify = ["unify", "--src-dir", str(src), "--src-strategy", str(strategy), "--dst", "OUT", "--no-sync"]
    found = {"mpickpt serial --no-sync": [str(BIN / "mpickpt"), *unify]}
    for n in procs:
        found[f"mpiexec -n {n} mpickpt --no-sync"] = [str(BIN / "mpiexec"), "-n", str(n),
                                                      sys.executable, "-I", "-S", str(BENCH_DIR / "_measure.py"),
                                                      "STATS/rank_{rank}.json", "--", str(BIN / "mpickpt"), *unify]
    hf = [*unify, "--layout", "hf", "--max-shard-size", "200MB"]
    found["mpickpt serial --no-sync, hf 200MB shards"] = [str(BIN / "mpickpt"), *hf]
    for n in procs:
        found[f"mpiexec -n {n} mpickpt --no-sync, hf 200MB shards"] = [
            str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-I", "-S", str(BENCH_DIR / "_measure.py"),
            "STATS/rank_{rank}.json", "--", str(BIN / "mpickpt"), *hf]
    h5 = [a if a != "OUT" else "OUT/model.h5" for a in unify] + ["--format", "h5"]
    found["mpickpt serial --no-sync, h5"] = [str(BIN / "mpickpt"), *h5]
    for n in procs:
        found[f"mpiexec -n {n} mpickpt --no-sync, h5"] = [
            str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-I", "-S", str(BENCH_DIR / "_measure.py"),
            "STATS/rank_{rank}.json", "--", str(BIN / "mpickpt"), *h5]
    found["cp -r"] = ["cp", "-r", str(src), "OUT"]
    if mindspore:
        script = (f"import mindspore as ms; ms.parallel.unified_safetensors({str(src)!r}, {str(strategy)!r}, "
                  f"'OUT')")
        found["MindSpore unified_safetensors"] = [MS_PYTHON, "-c", script]
    return found


def run_once(name: str, cmd: list[str], scratch: Path, src: Path) -> tuple[float, int, Path]:
    """One timed run: (wall seconds, peak RSS of the largest process, output folder)."""
    out = scratch / name.replace(" ", "_").replace("/", "_")
    stats_dir = scratch / "stats"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(stats_dir, ignore_errors=True)
    stats_dir.mkdir()
    subprocess.run(["sync"], check=True)
    warm(src)
    cmd = [str(out) if a == "OUT" else str(out / "model.h5") if a == "OUT/model.h5" else
           a.replace("STATS", str(stats_dir)).replace("'OUT'", repr(str(out))) for a in cmd]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_"))}
    env["GLOG_v"] = "3"
    wall, stats = run_wrapped(cmd, str(scratch / "outer.json"), env=env, log=str(scratch / "log.txt"))
    if stats.returncode:
        raise RuntimeError(f"{name}: exit status {stats.returncode}; see {scratch / 'log.txt'}")
    ranks = [ProcStats(**json.loads(p.read_text())) for p in stats_dir.glob("rank_*.json")]
    return wall, max([stats.maxrss_bytes] + [r.maxrss_bytes for r in ranks]), out


def tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """name -> (dtype, dims, sha256 of the bytes) over a unified folder."""
    with open_index(folder) as index:
        return {n: (e.dtype, tuple(e.dims), hashlib.sha256(b"".join(index.raw(n))).hexdigest())
                for n, e in index.entries.items()}


def files(folder: Path) -> dict[str, str]:
    """file name -> sha256, manifest aside."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "manifest.json"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path, help="a case folder made by benchmarks/make_case.py")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--procs", default="2", help="comma-separated process counts for mpiexec runs")
    ap.add_argument("--no-mindspore", action="store_true")
    args = ap.parse_args(argv)
    desc = json.loads((args.case / "case.json").read_text())
    strategy = args.case / desc["src_strategy"]
    src = args.case / "st"
    if not src.exists():
        subprocess.run([str(BIN / "mpickpt"), "convert", str(args.case / desc["src_dir"]), str(src), "--to",
                        "safetensors", "--no-sync"], check=True)
    source_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    runs = contenders(src, strategy, [int(n) for n in args.procs.split(",") if n], not args.no_mindspore)
    times: dict[str, list[float]] = {name: [] for name in runs}
    rss: dict[str, int] = dict.fromkeys(runs, 0)
    first: dict[str, str] | None = None
    reference: dict[str, tuple[str, tuple[int, ...], str]] = {}
    with tempfile.TemporaryDirectory(dir=args.case, prefix="unify-bench-") as tmp:
        scratch = Path(tmp)
        for _ in range(args.repeat):
            for name, cmd in runs.items():
                wall, peak, out = run_once(name, cmd, scratch, src)
                times[name].append(wall)
                rss[name] = max(rss[name], peak)
                if name.startswith(("mpickpt", "mpiexec")) and ("hf" in name or "h5" in name):
                    if tensors(out / "model.h5" if "h5" in name else out) != reference:
                        raise RuntimeError(f"{name}: tensors differ from the mindspore layout's")
                elif name.startswith(("mpickpt", "mpiexec")):
                    got = files(out)
                    first = first or got
                    if got != first:
                        raise RuntimeError(f"{name}: outputs differ from the first mpickpt run")
                    reference = reference or tensors(out)
                elif name.startswith("MindSpore") and tensors(out) != reference:
                    raise RuntimeError("MindSpore's unified tensors differ from mpickpt's")
                shutil.rmtree(out)
    serial = statistics.median(times["mpickpt serial --no-sync"])
    lines = [f"# unify {desc['name']}: {source_bytes / 1e9:.2f} GB of safetensors sources, {desc['src_ranks']} ranks",
             "", f"median of {args.repeat}, warm page cache; outputs checked (see benchmarks/unify.py)", "",
             "| contender | seconds | / mpickpt serial | peak RSS (largest process) |", "|---|---|---|---|"]
    for name in runs:
        median = statistics.median(times[name])
        lines.append(f"| {name} | {median:.2f} | {median / serial:.2f} | {rss[name] / MIB:.0f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    (BENCH_DIR / "results" / f"unify_{desc['name']}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
