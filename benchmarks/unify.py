"""Benchmark unify and deploy (unified checkpoints): mpickpt (serial, mpiexec) vs MindSpore vs `cp -r`.

MindSpore's `unified_safetensors` merges; its `load_distributed_checkpoint` deploys.

Run by hand, not in CI (MindSpore only in its own interpreter, $MPICKPT_MINDSPORE_PYTHON):
    python benchmarks/make_case.py --gb 1 --out /work/bench-data/unify_1gb
    python benchmarks/unify.py /work/bench-data/unify_1gb [--repeat 3] [--procs 2] [--no-mindspore]
                               [--parts unify,deploy] [--target 4]

The case's sources are first converted to safetensors (MindSpore's unify reads only those); every contender
then unifies that folder, `--repeat` times round-robin, each from a warm page cache with earlier writes
flushed and its output removed. mpickpt's outputs (mindspore layout, `--no-sync`) must be byte-identical
run to run and across process counts, and hold the same tensors as MindSpore's and as the hf layout's
(200 MB shards, so that two processes share the work: the mindspore layout of 1 GB is one part) and the
HDF5 file's (one file, its parameters dealt to the processes).

Deploy: the unified checkpoint to the case's target strategy (`--target`, safetensors outputs, `--no-sync`),
by `mpickpt transform` from mpickpt's unified folder and from its `.h5` file, by MindSpore's
`load_distributed_checkpoint` (save mode, every rank) from MindSpore's own unified folder, and `cp -r` of
the same output bytes. Those inputs are made once, untimed, in <case>/deploy/, with the distributed
conversion of the original sources (`mpickpt transform`), which every deploy output must equal tensor by
tensor, rank by rank. Prints the tables and the ratios within the run, and saves them to
benchmarks/results/unify_<case>.md.
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
from dataclasses import dataclass
from pathlib import Path

from _measure import ProcStats, busy_cpu_seconds, run_wrapped

from mpickpt.formats import open_index

BENCH_DIR = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
MS_PYTHON = os.environ.get("MPICKPT_MINDSPORE_PYTHON", "/work/ms-np1/bin/python")
MIB = 1 << 20
DEPLOY = "deploy: "
Tensors = dict[str, tuple[str, tuple[int, ...], str]]


@dataclass(frozen=True)
class DeployInputs:
    """What the deploy contenders read (made once, untimed) and what their outputs must equal."""

    unified: Path  # mpickpt unify's folder, MindSpore's layout
    h5: Path  # mpickpt unify --format h5's file
    mindspore: Path | None  # MindSpore unified_safetensors's folder
    direct: Path  # the original sources converted straight to the target strategy
    strategy: Path  # the target strategy


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


def prepare_deploy(case: Path, desc: dict, src: Path, strategy: Path, target: str,
                   mindspore: bool) -> DeployInputs:
    """Make (when missing) the unified inputs of the deploy contenders and the direct conversion in <case>/deploy."""
    root = case / "deploy"
    inputs = DeployInputs(root / "unified", root / "h5" / "model.h5", root / "ms_unified" if mindspore else None,
                          root / f"direct_{target}", case / desc["targets"][target]["strategy"])
    mpickpt = str(BIN / "mpickpt")
    unify = ["unify", "--src-dir", str(src), "--src-strategy", str(strategy), "--no-sync"]
    steps = [(inputs.unified, [mpickpt, *unify, "--dst", str(inputs.unified)]),
             (inputs.h5, [mpickpt, *unify, "--dst", str(inputs.h5), "--format", "h5"]),
             (inputs.direct, [mpickpt, "transform", "--src-dir", str(case / desc["src_dir"]), "--src-strategy",
                              str(strategy), "--dst-strategy", str(inputs.strategy), "--dst-dir", str(inputs.direct),
                              "--output-format", "safetensors", "--no-sync", "--quiet"])]
    if inputs.mindspore:
        script = (f"import mindspore as ms; ms.parallel.unified_safetensors({str(src)!r}, {str(strategy)!r}, "
                  f"{str(inputs.mindspore)!r})")
        steps.append((inputs.mindspore, [MS_PYTHON, "-c", script]))
    for path, cmd in steps:
        if not path.exists():
            subprocess.run(cmd, check=True, env=dict(os.environ, GLOG_v="3"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL if cmd[0] == MS_PYTHON else None)
    return inputs


def deploy_contenders(inputs: DeployInputs, procs: list[int]) -> dict[str, tuple[list[str], Path]]:
    """Deploy name -> (command writing into the folder OUT, folder it reads)."""
    found = {}
    for label, unified, reads in (("", inputs.unified, inputs.unified), (", from h5", inputs.h5, inputs.h5.parent)):
        deploy = ["transform", "--src-dir", str(unified), "--dst-strategy", str(inputs.strategy), "--dst-dir", "OUT",
                  "--output-format", "safetensors", "--no-sync", "--quiet"]
        found[f"{DEPLOY}mpickpt serial --no-sync{label}"] = ([str(BIN / "mpickpt"), *deploy], reads)
        for n in procs:
            found[f"{DEPLOY}mpiexec -n {n} mpickpt --no-sync{label}"] = (
                [str(BIN / "mpiexec"), "-n", str(n), sys.executable, "-I", "-S", str(BENCH_DIR / "_measure.py"),
                 "STATS/rank_{rank}.json", "--", str(BIN / "mpickpt"), *deploy], reads)
    found[f"{DEPLOY}cp -r of the output"] = (["cp", "-r", str(inputs.direct), "OUT"], inputs.direct)
    if inputs.mindspore:
        script = (f"import mindspore as ms; ms.load_distributed_checkpoint(None, predict_strategy="
                  f"{str(inputs.strategy)!r}, format='safetensors', unified_safetensors_dir={str(inputs.mindspore)!r}, "
                  f"dst_safetensors_dir='OUT')")
        found[f"{DEPLOY}MindSpore load_distributed_checkpoint"] = ([MS_PYTHON, "-c", script], inputs.mindspore)
    return found


def run_once(name: str, cmd: list[str], scratch: Path, src: Path) -> tuple[float, int, float, Path]:
    """One timed run after reading `src` once: (wall seconds, peak RSS of the largest process, CPU seconds the
    rest of the machine used meanwhile, output folder)."""
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
    busy = busy_cpu_seconds()
    wall, stats = run_wrapped(cmd, str(scratch / "outer.json"), env=env, log=str(scratch / "log.txt"))
    other = max(0.0, busy_cpu_seconds() - busy - stats.cpu_s)
    if stats.returncode:
        raise RuntimeError(f"{name}: exit status {stats.returncode}; see {scratch / 'log.txt'}")
    ranks = [ProcStats(**json.loads(p.read_text())) for p in stats_dir.glob("rank_*.json")]
    return wall, max([stats.maxrss_bytes] + [r.maxrss_bytes for r in ranks]), other, out


def tensors(path: Path) -> Tensors:
    """name -> (dtype, dims, sha256 of the bytes) over a unified folder or one checkpoint file."""
    with open_index(path) as index:
        return {n: (e.dtype, tuple(e.dims), hashlib.sha256(b"".join(index.raw(n))).hexdigest())
                for n, e in index.entries.items()}


def files(folder: Path) -> dict[str, str]:
    """file name -> sha256, manifest aside."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.name != "manifest.json"}


def rank_tensors(folder: Path) -> dict[int, Tensors]:
    """rank -> tensors of the one safetensors file in each rank_<r> folder of a deploy output."""
    found = {}
    for sub in folder.glob("rank_*"):
        [path] = sub.glob("*.safetensors")
        found[int(sub.name.removeprefix("rank_"))] = tensors(path)
    return found


def check(name: str, out: Path, seen: dict, direct: dict[int, Tensors]) -> None:
    """Raise unless a run's output is what it must be; `seen` keeps the first unify output and its tensors."""
    if name.startswith(DEPLOY):
        if "cp -r" not in name and rank_tensors(out) != direct:
            raise RuntimeError(f"{name}: tensors differ from the distributed conversion of the sources")
    elif name.startswith(("mpickpt", "mpiexec")) and ("hf" in name or "h5" in name):
        if tensors(out / "model.h5" if "h5" in name else out) != seen["reference"]:
            raise RuntimeError(f"{name}: tensors differ from the mindspore layout's")
    elif name.startswith(("mpickpt", "mpiexec")):
        got = files(out)
        seen.setdefault("first", got)
        if got != seen["first"]:
            raise RuntimeError(f"{name}: outputs differ from the first mpickpt run")
        if "reference" not in seen:
            seen["reference"] = tensors(out)
    elif name.startswith("MindSpore") and tensors(out) != seen["reference"]:
        raise RuntimeError("MindSpore's unified tensors differ from mpickpt's")


def table(names: list[str], times: dict[str, list[float]], rss: dict[str, int], other: dict[str, float],
          base: str) -> list[str]:
    """Markdown rows: median and range of the seconds, median ratio to `base`, peak RSS of the largest process,
    most CPU seconds the rest of the machine used during one run."""
    lines = [f"| contender | seconds | min-max | / {base.removeprefix(DEPLOY)} | peak RSS (largest process) | "
             + "other CPU s |", "|---|---|---|---|---|---|"]
    for name in names:
        median = statistics.median(times[name])
        lines.append(f"| {name} | {median:.2f} | {min(times[name]):.2f}-{max(times[name]):.2f} | "
                     f"{median / statistics.median(times[base]):.2f} | {rss[name] / MIB:.0f} MiB | "
                     f"{other[name]:.2f} |")
    return lines


def ratios(times: dict[str, list[float]], procs: list[int]) -> list[str]:
    """Markdown rows of median-time ratios within the run (those whose contenders ran)."""
    pairs = [("MindSpore unified_safetensors", "mpickpt serial --no-sync"),
             ("mpickpt serial --no-sync", "cp -r")]
    pairs += [(f"mpiexec -n {n} mpickpt --no-sync{kind}", f"mpickpt serial --no-sync{kind}")
              for kind in ("", ", hf 200MB shards", ", h5") for n in procs]
    for label in ("", ", from h5"):
        pairs += [(f"{DEPLOY}MindSpore load_distributed_checkpoint", f"{DEPLOY}mpickpt serial --no-sync{label}"),
                  (f"{DEPLOY}mpickpt serial --no-sync{label}", f"{DEPLOY}cp -r of the output")]
        pairs += [(f"{DEPLOY}mpiexec -n {n} mpickpt --no-sync{label}", f"{DEPLOY}mpickpt serial --no-sync{label}")
                  for n in procs]
    lines = ["| ratio of median times | value |", "|---|---|"]
    for num, den in pairs:
        if num in times and den in times:
            value = statistics.median(times[num]) / statistics.median(times[den])
            lines.append(f"| {num} / {den.removeprefix(DEPLOY)} | {value:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path, help="a case folder made by benchmarks/make_case.py")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--procs", default="2", help="comma-separated process counts for mpiexec runs")
    ap.add_argument("--no-mindspore", action="store_true")
    ap.add_argument("--parts", default="unify,deploy", help="comma-separated: unify, deploy")
    ap.add_argument("--target", default="4", help="the case's target strategy to deploy to (dst_strategy_<n>)")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))
    desc = json.loads((args.case / "case.json").read_text())
    strategy = args.case / desc["src_strategy"]
    src = args.case / "st"
    if not src.exists():
        subprocess.run([str(BIN / "mpickpt"), "convert", str(args.case / desc["src_dir"]), str(src), "--to",
                        "safetensors", "--no-sync"], check=True)
    source_bytes = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    procs = [int(n) for n in args.procs.split(",") if n]
    runs: dict[str, tuple[list[str], Path]] = {}
    if "unify" in parts:
        runs |= {name: (cmd, src) for name, cmd in contenders(src, strategy, procs, not args.no_mindspore).items()}
    direct: dict[int, Tensors] = {}
    if "deploy" in parts:
        inputs = prepare_deploy(args.case, desc, src, strategy, args.target, not args.no_mindspore)
        direct = rank_tensors(inputs.direct)
        runs |= deploy_contenders(inputs, procs)
    times: dict[str, list[float]] = {name: [] for name in runs}
    rss: dict[str, int] = dict.fromkeys(runs, 0)
    other: dict[str, float] = dict.fromkeys(runs, 0.0)
    seen: dict = {}
    with tempfile.TemporaryDirectory(dir=args.case, prefix="unify-bench-") as tmp:
        scratch = Path(tmp)
        for _ in range(args.repeat):
            for name, (cmd, reads) in runs.items():
                wall, peak, busy, out = run_once(name, cmd, scratch, reads)
                times[name].append(wall)
                rss[name] = max(rss[name], peak)
                other[name] = max(other[name], busy)
                check(name, out, seen, direct)
                shutil.rmtree(out)
    how = (f"median of {args.repeat}, round-robin, warm page cache; outputs checked (see benchmarks/unify.py); "
           "other CPU s = most CPU time the rest of the machine (writeback, other jobs) used during one run")
    lines = [f"# unify {desc['name']}: {source_bytes / 1e9:.2f} GB of safetensors sources, {desc['src_ranks']} ranks",
             "", how]
    unify_names = [n for n in runs if not n.startswith(DEPLOY)]
    if unify_names:
        lines += ["", *table(unify_names, times, rss, other, "mpickpt serial --no-sync")]
    deploy_names = [n for n in runs if n.startswith(DEPLOY)]
    if deploy_names:
        target = desc["targets"][args.target]
        caption = (f"Deploy to {target['ranks']} ranks ({target['strategy']}), safetensors outputs; every output "
                   "equal, rank by rank, to the distributed conversion of the sources")
        lines += ["", caption, "",
                  *table(deploy_names, times, rss, other, f"{DEPLOY}mpickpt serial --no-sync")]
    lines += ["", *ratios(times, procs)]
    text = "\n".join(lines) + "\n"
    print(text)
    (BENCH_DIR / "results").mkdir(exist_ok=True)
    (BENCH_DIR / "results" / f"unify_{desc['name']}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
