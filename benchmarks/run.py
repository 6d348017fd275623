"""Benchmark one case: mpickpt (serial and under mpiexec, synced and not) vs MindSpore's converter vs `cp -r`.

Run by hand, not in CI (MindSpore only in subprocesses):
    python benchmarks/run.py /work/bench-data/llama_2gb --target 4 [--repeat 3] [--procs 2,4] [--mpickpt-only]

Every contender runs `--repeat` times, round-robin, each time from a warm page cache (all source files read
just before) with earlier writes flushed (`sync`) and its output folder removed. Every mpickpt output must be
byte-identical to the first serial run's; MindSpore's outputs must hold the same parameters (names, dtypes,
dims, bytes); the first serial output is also checked against the case generator's own tensors. The tables
are printed and saved to benchmarks/results/<case>_8to<target>.md (`_devshm` added for a case in a tmpfs).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from _measure import ProcStats, busy_cpu_seconds, measure, run_wrapped
from make_case import TARGETS, Contents, ModelShape, all_params, rank_box, scalars

from mpickpt.ckpt import index_checkpoint

BENCH_DIR = Path(__file__).resolve().parent
EXAMPLE = BENCH_DIR.parent / "examples" / "tiny_llama"  # 7 MB: what any run costs whatever its size
MEASURE = BENCH_DIR / "_measure.py"
BIN = Path(sys.executable).parent
MIB = 1 << 20
RSS_SLACK = 150 * MIB

Digests = dict[int, dict[str, tuple[str, tuple[int, ...], str]]]  # rank -> name -> (dtype, dims, sha256)


@dataclass(frozen=True)
class Case:
    """A case folder made by make_case.py and the target chosen for this run."""

    root: Path
    desc: dict
    target: str

    @property
    def name(self) -> str:
        return self.desc["name"]

    @property
    def src_dir(self) -> Path:
        return self.root / self.desc["src_dir"]

    @property
    def src_strategy(self) -> Path:
        return self.root / self.desc["src_strategy"]

    @property
    def dst_strategy(self) -> Path:
        return self.root / self.desc["targets"][self.target]["strategy"]

    @property
    def dst_ranks(self) -> int:
        return self.desc["targets"][self.target]["ranks"]

    @property
    def prefix(self) -> str:
        return self.desc["prefix"]

    def outputs(self, out: Path) -> list[Path]:
        return [out / f"rank_{t}" / f"{self.prefix}{t}.ckpt" for t in range(self.dst_ranks)]


@dataclass
class Run:
    """One timed run of one contender."""

    wall_s: float
    procs: list[ProcStats]
    out_bytes: int
    check: str
    call_s: float | None = None  # MindSpore's time inside transform_checkpoints (no import)
    other_cpu_s: float = 0.0  # CPU the rest of the machine used meanwhile (noise: other jobs)


@dataclass
class Contender:
    """A way of doing the conversion (or the copy floor)."""

    label: str
    group: str  # "mpickpt", "mindspore" or "copy"
    launch: Callable[[Path, Path], tuple[float, list[ProcStats], float | None]]
    processes: int = 1  # mpickpt: the mpiexec process count (1: serial)
    runs: list[Run] = field(default_factory=list)
    failed: str = ""


# ---- launching ----

def mpickpt_cmd(case: Case, out: Path, sync: bool) -> list[str]:
    cmd = [str(BIN / "mpickpt"), "transform", "--src-dir", str(case.src_dir), "--dst-dir", str(out),
           "--src-strategy", str(case.src_strategy), "--dst-strategy", str(case.dst_strategy),
           "--prefix", case.prefix, "--quiet"]
    return cmd if sync else cmd + ["--no-sync"]


def mpickpt_env() -> dict[str, str]:
    """The environment mpickpt runs in: as users have it, so compiled modules are cached (a shell with
    PYTHONDONTWRITEBYTECODE would recompile every module on every run, ~40 ms)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def example_cmd(out: Path) -> list[str]:
    """The shipped 7 MB example, 8 -> 4 ranks: the fixed costs of a run (interpreter, imports, strategies,
    indexing, records, manifest) with next to no bytes."""
    return [str(BIN / "mpickpt"), "transform", "--src-dir", str(EXAMPLE / "src"), "--dst-dir", str(out),
            "--src-strategy", str(EXAMPLE / "src_strategy.ckpt"), "--dst-strategy",
            str(EXAMPLE / "dst_strategy_4.ckpt"), "--quiet", "--no-sync"]


def serial(cmd_for: Callable[[Path], list[str]],
           env: dict[str, str] | None = None) -> Callable[[Path, Path], tuple[float, list[ProcStats], None]]:
    def launch(out: Path, scratch: Path) -> tuple[float, list[ProcStats], None]:
        wall, stats = run_wrapped(cmd_for(out), str(scratch / "proc.json"), env=env, log=str(scratch / "log.txt"))
        _check_rc([stats], scratch)
        return wall, [stats], None
    return launch


def under_mpiexec(n: int, cmd_for: Callable[[Path], list[str]]) -> Callable[[Path, Path], tuple[float, list[ProcStats], None]]:
    def launch(out: Path, scratch: Path) -> tuple[float, list[ProcStats], None]:
        wrap = [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-I", "-S", str(MEASURE),
                str(scratch / "rank_{rank}.json"), "--"]
        outer = measure(wrap + cmd_for(out), env=mpickpt_env(), log=str(scratch / "log.txt"))
        procs = [ProcStats(**json.loads((scratch / f"rank_{r}.json").read_text()))
                 for r in range(n) if (scratch / f"rank_{r}.json").exists()]
        _check_rc([outer] + procs, scratch)
        return outer.wall_s, procs, None
    return launch


MS_SCRIPT = '''
import json, os, sys, time
mode, src_dir, dst_dir, prefix, src_strategy, dst_strategy, timing = sys.argv[1:8]
import mindspore as ms
start = time.perf_counter()
if mode == "whole":
    ms.transform_checkpoints(src_dir, dst_dir, prefix, src_strategy, dst_strategy)
else:
    rank = int(mode)
    ranks = ms.rank_list_for_transform(rank, src_strategy, dst_strategy)
    files = {r: os.path.join(src_dir, f"rank_{r}", f"{prefix}{r}.ckpt") for r in ranks}
    os.makedirs(os.path.join(dst_dir, f"rank_{rank}"), exist_ok=True)
    save = os.path.join(dst_dir, f"rank_{rank}", f"{prefix}{rank}.ckpt")
    ms.transform_checkpoint_by_rank(rank, files, save, src_strategy, dst_strategy)
with open(timing, "w") as f:
    json.dump({"call_s": time.perf_counter() - start}, f)
'''


def ms_cmd(case: Case, script: Path, mode: str, out: Path, timing: Path) -> list[str]:
    return [sys.executable, str(script), mode, str(case.src_dir), str(out), case.prefix,
            str(case.src_strategy), str(case.dst_strategy), str(timing)]


def ms_whole(case: Case, script: Path) -> Callable[[Path, Path], tuple[float, list[ProcStats], float]]:
    def launch(out: Path, scratch: Path) -> tuple[float, list[ProcStats], float]:
        timing = scratch / "timing.json"
        wall, stats = run_wrapped(ms_cmd(case, script, "whole", out, timing), str(scratch / "proc.json"),
                                  env=_ms_env(), log=str(scratch / "log.txt"))
        _check_rc([stats], scratch)
        return wall, [stats], json.loads(timing.read_text())["call_s"]
    return launch


def ms_by_rank(case: Case, script: Path, at_once: int) -> Callable[[Path, Path], tuple[float, list[ProcStats], None]]:
    """The tutorial's recipe: one transform_checkpoint_by_rank process per target rank, `at_once` at a time."""
    def launch(out: Path, scratch: Path) -> tuple[float, list[ProcStats], None]:
        def one(rank: int) -> ProcStats:
            cmd = ms_cmd(case, script, str(rank), out, scratch / f"timing_{rank}.json")
            return run_wrapped(cmd, str(scratch / f"proc_{rank}.json"), env=_ms_env(),
                               log=str(scratch / f"log_{rank}.txt"))[1]
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=at_once) as pool:
            procs = list(pool.map(one, range(case.dst_ranks)))
        wall = time.perf_counter() - start
        _check_rc(procs, scratch)
        return wall, procs, None
    return launch


def _ms_env() -> dict[str, str]:
    return {**os.environ, "GLOG_v": "3"}


def copy_floor(case: Case, sync: bool) -> Callable[[Path, Path], tuple[float, list[ProcStats], None]]:
    script = 'cp -r "$0" "$1" && sync' if sync else 'cp -r "$0" "$1"'
    return serial(lambda out: ["sh", "-c", script, str(case.src_dir), str(out)])


def copy_floor_halves(case: Case) -> Callable[[Path, Path], tuple[float, list[ProcStats], None]]:
    """`cp -r` of the rank folders as two copies at once, each of about half the bytes: what two processes
    copying the same bytes gain on this machine (the copy floor for `mpiexec -n 2`)."""
    halves: list[list[str]] = [[], []]
    sizes = [0, 0]
    for folder in sorted(case.src_dir.iterdir(), key=lambda f: -_folder_bytes(f)):
        lighter = sizes.index(min(sizes))
        halves[lighter].append(str(folder))
        sizes[lighter] += _folder_bytes(folder)
    script = ('out="$0"; mkdir -p "$out" && (cp -r ' + " ".join(f'"{f}"' for f in halves[0]) + ' "$out"/ & cp -r '
              + " ".join(f'"{f}"' for f in halves[1]) + ' "$out"/ & wait)')
    return serial(lambda out: ["sh", "-c", script, str(out)])


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_rc(procs: list[ProcStats], scratch: Path) -> None:
    if any(p.returncode != 0 for p in procs):
        logs = "".join(f.read_text(errors="replace")[-1500:] for f in sorted(scratch.glob("log*.txt")))
        raise RuntimeError(f"exit status {[p.returncode for p in procs]}\n{logs}")


# ---- cache, checks ----

def warm(files: list[Path]) -> None:
    """Read every source file once so each contender starts from the same warm page cache."""
    buf = bytearray(16 * MIB)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def file_digests(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        with open(path, "rb") as f:
            out.append(hashlib.file_digest(f, "sha256").hexdigest())
    return out


def content_digests(case: Case, out: Path) -> Digests:
    """Per rank, per parameter: dtype, dims and a digest of the tensor bytes (file order ignored)."""
    result: Digests = {}
    for rank, path in enumerate(case.outputs(out)):
        with index_checkpoint(path) as index:
            result[rank] = {name: (e.dtype, tuple(e.dims), _sha(index.array(name)))
                            for name, e in index.entries.items()}
    return result


def expected_digests(case: Case) -> Digests:
    """What each target rank must hold, regenerated from the case's seed and the target layout."""
    topo, _ = TARGETS[case.target]
    model = ModelShape(**case.desc["model"])
    contents = Contents(case.desc["seed"])
    result: Digests = {t: {} for t in range(case.dst_ranks)}
    for p in all_params(model, 1):
        full = contents.full(p)
        for t in range(case.dst_ranks):
            piece = np.ascontiguousarray(full[rank_box(p, topo, t)])
            result[t][p.name] = (p.dtype, piece.shape, _sha(piece))
    for t in range(case.dst_ranks):
        for name, dtype, dims, data in scalars():
            result[t][name] = (dtype, dims, _sha(data))
    return result


def _sha(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def compare_digests(got: Digests, want: Digests) -> str:
    """'' when equal, else the first few differences."""
    diffs = []
    for rank in sorted(want):
        g, w = got.get(rank, {}), want[rank]
        diffs += [f"rank {rank}: missing {n}" for n in sorted(set(w) - set(g))]
        diffs += [f"rank {rank}: extra {n}" for n in sorted(set(g) - set(w))]
        diffs += [f"rank {rank}: {n}: {g[n][:2]} vs {w[n][:2]}{' (bytes differ)' if g[n][:2] == w[n][:2] else ''}"
                  for n in sorted(set(g) & set(w)) if g[n] != w[n]]
    return "; ".join(diffs[:5]) + (f" ... ({len(diffs)} differences)" if len(diffs) > 5 else "")


class Checker:
    """Holds the reference (first serial mpickpt output) and checks every later output against it."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.files: list[str] | None = None
        self.contents: Digests | None = None
        self.notes: list[str] = []

    def check(self, group: str, out: Path) -> str:
        if group in ("copy", "fixed"):
            return "n/a"
        if group == "mpickpt":
            files = file_digests(self.case.outputs(out))
            if self.files is None:
                self._set_reference(out, files)
                return "reference"
            return "= serial (bytes)" if files == self.files else "DIFFERS from serial"
        if self.contents is None:
            return "no reference"
        diff = compare_digests(content_digests(self.case, out), self.contents)
        if diff:
            self.notes.append(f"MindSpore vs mpickpt: {diff}")
        return "= mpickpt (content)" if not diff else "DIFFERS from mpickpt"

    def _set_reference(self, out: Path, files: list[str]) -> None:
        self.files = files
        self.contents = content_digests(self.case, out)
        diff = compare_digests(self.contents, expected_digests(self.case))
        self.notes.append(f"serial mpickpt output vs generator tensors: {'equal' if not diff else diff}")


# ---- the benchmark ----

def _mpickpt_for(case: Case, sync: bool) -> Callable[[Path], list[str]]:
    return lambda out: mpickpt_cmd(case, out, sync)


def contenders(case: Case, procs: list[int], mindspore: bool, copy: bool, script: Path) -> list[Contender]:
    cs = []
    for n in sorted({1, *procs}):
        for sync in (True, False):
            label = ("mpickpt serial" if n == 1 else f"mpickpt mpiexec -n {n}") + ("" if sync else " --no-sync")
            cmd_for = _mpickpt_for(case, sync)
            cs.append(Contender(label, "mpickpt", serial(cmd_for, mpickpt_env()) if n == 1
                                else under_mpiexec(n, cmd_for), n))
    cs.append(Contender(FIXED, "fixed", serial(example_cmd, mpickpt_env())))
    if mindspore:
        cs += [Contender("MindSpore transform_checkpoints", "mindspore", ms_whole(case, script)),
               Contender("MindSpore by_rank, one at a time", "mindspore", ms_by_rank(case, script, 1)),
               Contender("MindSpore by_rank, two at a time", "mindspore", ms_by_rank(case, script, 2))]
    if copy:
        cs += [Contender("cp -r", "copy", copy_floor(case, False)),
               Contender(HALVES, "copy", copy_floor_halves(case)),
               Contender("cp -r + sync", "copy", copy_floor(case, True))]
    return cs


def timed_run(c: Contender, rep: int, work: Path,
              sources: list[Path]) -> tuple[float, list[ProcStats], float | None, float] | None:
    """One run of one contender into `work/out`: its folders emptied, earlier writes flushed, the sources
    read once; (wall, process costs, MindSpore's in-call time, CPU the rest of the machine used), or None
    with the contender marked failed."""
    out, scratch = work / "out", work / "scratch"
    for d in (out, scratch):
        shutil.rmtree(d, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.sync()
    warm(sources)
    busy = busy_cpu_seconds()
    try:
        wall, procs, call_s = c.launch(out, scratch)
    except RuntimeError as error:
        c.failed = str(error)
        print(f"[{rep}] {c.label}: FAILED {error}", flush=True)
        return None
    return wall, procs, call_s, max(0.0, busy_cpu_seconds() - busy - sum(p.cpu_s for p in procs))


def bench(case: Case, cs: list[Contender], repeat: int, work: Path, checker: Checker) -> None:
    sources = sorted(case.src_dir.glob("rank_*/*.ckpt"))
    out = work / "out"
    for rep in range(repeat):
        for c in cs:
            if c.failed or (done := timed_run(c, rep, work, sources)) is None:
                continue
            wall, procs, call_s, other = done
            out_bytes = sum(p.stat().st_size for p in out.rglob("*.ckpt"))
            check = checker.check(c.group, out)
            c.runs.append(Run(wall, procs, out_bytes, check, call_s, other))
            rss = max(p.maxrss_bytes for p in procs) / MIB
            print(f"[{rep}] {c.label}: {wall:.2f} s, peak RSS {rss:.0f} MiB, other CPU {other:.2f} s, {check}",
                  flush=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    os.sync()


def median(c: Contender) -> float:
    return statistics.median(r.wall_s for r in c.runs)


def median_cpu(c: Contender) -> float:
    """Median over runs of the user + system CPU time of all the contender's processes."""
    return statistics.median(sum(p.cpu_s for p in r.procs) for r in c.runs)


def median_run(c: Contender) -> Run:
    """The run whose wall time is nearest the median (its byte counts stand for the contender)."""
    return min(c.runs, key=lambda r: abs(r.wall_s - median(c)))


def peak_rss_mib(c: Contender) -> list[float]:
    """Per process position (rank), its largest peak RSS over the runs, in MiB."""
    return [max(r.procs[i].maxrss_bytes for r in c.runs if i < len(r.procs)) / MIB
            for i in range(max(len(r.procs) for r in c.runs))]


def planned_read_bytes(case: Case) -> int:
    cmd = [str(BIN / "mpickpt"), "plan", "--src-dir", str(case.src_dir), "--src-strategy", str(case.src_strategy),
           "--dst-strategy", str(case.dst_strategy), "--json"]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)["targets"]
    return sum(r["bytes_read"] for r in rows)


def contender_table(cs: list[Contender], planned_read: int) -> list[str]:
    lines = [("| contender | median s | min-max s | CPU s (user+sys) | GB/s written | rchar GB | wchar GB "
              "| write_bytes GB | peak RSS per process (MiB) | other CPU s | output check |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        if not c.runs:
            lines.append(f"| {c.label} | failed | | | | | | | | | {c.failed.splitlines()[0] if c.failed else ''} |")
            continue
        walls = [r.wall_s for r in c.runs]
        mid, peaks = median_run(c), peak_rss_mib(c)
        read = sum(p.rchar for p in mid.procs) / 1e9
        read_s = f"{read:.2f}" + (f" (planned {planned_read / 1e9:.2f})" if c.group == "mpickpt" else "")
        calls = [r.call_s for r in c.runs if r.call_s is not None]
        call = f" (in call {statistics.median(calls):.2f})" if calls else ""
        checks = sorted({r.check for r in c.runs})
        lines.append(
            f"| {c.label} | {median(c):.2f}{call} | {min(walls):.2f}-{max(walls):.2f} | {median_cpu(c):.2f} | "
            f"{mid.out_bytes / 1e9 / median(c):.2f} | {read_s} | {sum(p.wchar for p in mid.procs) / 1e9:.2f} | "
            f"{sum(p.write_bytes for p in mid.procs) / 1e9:.2f} | {', '.join(f'{x:.0f}' for x in peaks)} | "
            f"{max(r.other_cpu_s for r in c.runs):.2f} | {', '.join(checks)} |")
    return lines


def ratio_table(cs: list[Contender], case: Case) -> list[str]:
    by = {c.label: c for c in cs if c.runs}

    def med(label: str) -> float | None:
        return median(by[label]) if label in by else None

    lines = ["| ratio | value | target | met |", "|---|---|---|---|"]

    def row(name: str, num: float | None, den: float | None, target: str = "",
            ok: Callable[[float], bool] | None = None) -> None:
        if num is None or den is None:
            return
        value = num / den
        met = "" if ok is None else "yes" if ok(value) else "NO"
        lines.append(f"| {name} | {value:.2f} | {target} | {met} |")

    nosync, synced = med("mpickpt serial --no-sync"), med("mpickpt serial")
    ms = by.get("MindSpore transform_checkpoints")
    if ms:
        row("MindSpore transform_checkpoints / mpickpt serial --no-sync (process wall)", median(ms), nosync,
            ">= 15", lambda v: v >= 15)
        calls = [r.call_s for r in ms.runs if r.call_s is not None]
        row("same, MindSpore timed inside the call (import excluded)",
            statistics.median(calls) if calls else None, nosync, ">= 15", lambda v: v >= 15)
    for label in ("MindSpore by_rank, one at a time", "MindSpore by_rank, two at a time"):
        row(f"{label} / mpickpt serial --no-sync", med(label), nosync)
    row("mpickpt serial --no-sync / cp -r (wall)", nosync, med("cp -r"), "<= 1.5", lambda v: v <= 1.5)
    if "mpickpt serial --no-sync" in by and "cp -r" in by:
        cpu, floor = median_cpu(by["mpickpt serial --no-sync"]), median_cpu(by["cp -r"])
        row("mpickpt serial --no-sync / cp -r (CPU, user + sys)", cpu, floor, "<= 1.3", lambda v: v <= 1.3)
        if FIXED in by:
            fixed = median_cpu(by[FIXED])
            row(f"same, less the fixed CPU of a run ({fixed:.2f} s: 7 MB example)", cpu - fixed, floor)
    row("mpickpt serial (synced) / cp -r + sync", synced, med("cp -r + sync"), "<= 1.5", lambda v: v <= 1.5)
    for label in by:
        if label.startswith("mpickpt mpiexec"):
            base = nosync if label.endswith("--no-sync") else synced
            if label == "mpickpt mpiexec -n 2 --no-sync":
                need = 1.5 if in_memory(case) else 1.3
                row(f"serial / {label.removeprefix('mpickpt ')} (speed-up)", base, med(label), f">= {need}",
                    lambda v: v >= need)
            else:
                row(f"serial / {label.removeprefix('mpickpt ')} (speed-up)", base, med(label))
    row(f"cp -r / {HALVES} (speed-up of the copy floor with two copies at once)", med("cp -r"), med(HALVES))
    mp_rss = [p.maxrss_bytes for c in cs if c.group == "mpickpt" for r in c.runs for p in r.procs]
    if mp_rss:
        bound = case.desc["targets"][case.target]["largest_slice_bytes"] + RSS_SLACK
        peak = max(mp_rss)
        lines.append(f"| peak RSS of any mpickpt process / (largest target slice + 150 MiB) | "
                     f"{peak / MIB:.0f} / {bound / MIB:.0f} MiB | <= 1 | {'yes' if peak <= bound else 'NO'} |")
    return lines


def in_memory(case: Case) -> bool:
    """Whether the case lives in a tmpfs (then the copy is bound by memory, not by a disk)."""
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        mount, fstype = line.split()[1], line.split()[2]
        if str(case.root).startswith(mount.rstrip("/") + "/") and len(mount) > len(best):
            best, kind = mount, fstype
    return kind == "tmpfs"


SYNCED, NO_SYNC = "mpickpt (synced)", "mpickpt --no-sync"
FIXED = "mpickpt serial --no-sync, 7 MB example (fixed costs)"
HALVES = "cp -r, two halves at once"
REFERENCE_COLOURS = {"mindspore": "tab:red", "copy": "tab:green"}


def plot_scaling(cs: list[Contender], path: Path, title: str) -> bool:
    """Draw mpickpt's median wall time against its process count, MindSpore and the copy floors as reference
    lines, and its speed-up over serial beside the ideal, into `path`; False, with a note, without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed (pip install '.[bench]'), so {path.name} was not drawn")
        return False
    matplotlib.use("Agg")
    from matplotlib import pyplot
    from matplotlib.ticker import FormatStrFormatter

    series: dict[str, dict[int, float]] = {SYNCED: {}, NO_SYNC: {}}
    for c in cs:
        if c.runs and c.group == "mpickpt":
            series[NO_SYNC if c.label.endswith("--no-sync") else SYNCED][c.processes] = median(c)
    references = [c for c in cs if c.runs and c.group in REFERENCE_COLOURS]
    figure, (wall, speed) = pyplot.subplots(1, 2, figsize=(11, 4.5))
    styles = ["--", ":", "-."]
    for name, points in series.items():
        if not points:
            continue
        counts = sorted(points)
        line, = wall.plot(counts, [points[n] for n in counts], marker="o", label=name)
        if 1 in points:
            speed.plot(counts, [points[1] / points[n] for n in counts], marker="o", label=name, color=line.get_color())
    for i, c in enumerate(references):
        wall.axhline(median(c), color=REFERENCE_COLOURS[c.group], linestyle=styles[i % len(styles)], label=c.label)
    counts = sorted({n for points in series.values() for n in points})
    speed.plot(counts, counts, color="grey", linewidth=1, label="ideal (n processes, n times faster)")
    walls = [t for points in series.values() for t in points.values()] + [median(c) for c in references]
    if walls and max(walls) > 10 * min(walls):
        wall.set_yscale("log")
        wall.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        wall.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
    speed.set_ylim(bottom=0)
    for axes, label in ((wall, "median wall time (s)"), (speed, "speed-up over serial")):
        axes.set_xlabel("processes (mpiexec -n)")
        axes.set_ylabel(label)
        axes.set_xticks(counts)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return True


def sources_digest() -> str:
    """A digest of the mpickpt sources as they are now (uncommitted edits count)."""
    digest = hashlib.sha256()
    for path in sorted((BENCH_DIR.parent / "mpickpt").rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_version(digest: str) -> str:
    head = subprocess.run(["git", "-C", str(BENCH_DIR.parent), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    return f"commit {head}, sources {digest}"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def report(case: Case, cs: list[Contender], checker: Checker, repeat: int, planned_read: int, version: str) -> str:
    d = case.desc
    tgt = d["targets"][case.target]
    head = [
        f"# {case.name}: {d['src_ranks']} -> {case.dst_ranks} ranks"
        + (" (sources and outputs in /dev/shm)" if in_memory(case) else ""),
        "",
        (f"- case: {d['src_bytes'] / 1e9:.2f} GB source in {d['src_ranks']} ranks "
         f"({'2 pipeline stages x tp2 x dp2' if d['pipeline'] else 'tp2 x dp4'}, optimizer parallel), "
         f"{d['params']} parameters, model {d['model']}"),
        f"- target: {tgt['topology']}, largest target slice {tgt['largest_slice_bytes'] / MIB:.1f} MiB",
        f"- machine: {machine()}",
        f"- mpickpt: {version}",
        (f"- {datetime.date.today()}, median of {repeat} runs each, round-robin, warm page cache, "
         "earlier writes flushed before each run; peak RSS = ru_maxrss (includes touched mapped pages); "
         "other CPU s = most CPU time the rest of the machine (kernel writeback, launchers, other jobs) used "
         "during one run"),
        "",
    ]
    notes = ["", "Checks:"] + [f"- {n}" for n in checker.notes]
    notes += [f"- {c.label} failed: {c.failed.splitlines()[0]}" for c in cs if c.failed]
    return "\n".join(head + contender_table(cs, planned_read) + [""] + ratio_table(cs, case) + notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path, help="case folder made by make_case.py")
    ap.add_argument("--target", default="4", choices=sorted(TARGETS, key=int), help="target rank count")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--procs", default="2,4", help="mpiexec process counts, comma-separated ('' for none)")
    ap.add_argument("--mpickpt-only", action="store_true", help="skip MindSpore and the copy floors")
    ap.add_argument("--no-mindspore", action="store_true")
    ap.add_argument("--work", type=Path, help="scratch folder for outputs (default: next to the case)")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args(argv)

    root = args.case.resolve()
    case = Case(root, json.loads((root / "case.json").read_text()), args.target)
    work = (args.work or root.parent / f"{root.name}-runs").resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # MindSpore subprocesses must not start inside the mindspore package
    script = work / "ms_convert.py"
    script.write_text(MS_SCRIPT)
    probe = "import importlib.util as u; raise SystemExit(u.find_spec('mindspore') is None)"
    has_ms = subprocess.run([sys.executable, "-c", probe], check=False).returncode == 0
    use_ms = has_ms and not (args.mpickpt_only or args.no_mindspore) and case.desc["targets"][args.target]["mindspore"]
    procs = [int(n) for n in args.procs.split(",") if n]
    cs = contenders(case, procs, use_ms, not args.mpickpt_only, script)
    checker = Checker(case)
    digest = sources_digest()
    # One untimed run into the output folder: caches compiled modules, and the first timed run no longer
    # pays for fresh tmpfs pages (it took twice as long as later ones there).
    subprocess.run(mpickpt_cmd(case, work / "out", False), env=mpickpt_env(), check=True)
    shutil.rmtree(work / "out")
    bench(case, cs, args.repeat, work, checker)
    if sources_digest() != digest:
        checker.notes.append(f"mpickpt sources CHANGED during the run (started at sources {digest}): rerun")
    text = report(case, cs, checker, args.repeat, planned_read_bytes(case), code_version(digest))
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"{case.name}_8to{args.target}" + ("_devshm" if in_memory(case) else "")
    if plot_scaling(cs, args.results / f"{stem}.png", f"{case.name}: {case.desc['src_ranks']} -> {case.dst_ranks} "
                    f"ranks, median of {args.repeat}"):
        text += f"\n![wall time and speed-up against process count]({stem}.png)\n"
    print(text)
    (args.results / f"{stem}.md").write_text(text)
    return 1 if any(c.failed for c in cs) or any("DIFFER" in r.check for c in cs for r in c.runs) else 0


if __name__ == "__main__":
    sys.exit(main())
