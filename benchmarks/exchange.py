"""Benchmark sources split over per-process folders (slices sent over MPI) against one shared folder.

Run by hand, not in CI:
    python benchmarks/exchange.py /work/bench-data/llama_8gb --target 4 --procs 2 --repeat 2 \
        [--splits shared,halves,one-holder] [--results DIR]

A split other than `shared` is a folder of symlinks to the case's rank folders (no data copied), made in
<case>-exchange/ next to the case (removed at the end, with the outputs) and read as
`--src-dir <split>/p{process}`, so each process sees only its own folder and the slices it lacks travel over MPI:
- shared: the case's plain source folder, seen by every process (nothing sent);
- halves: contiguous blocks of source ranks, one per process (rank r of M in p<r * N // M>);
- one-holder: every rank in p0, the other processes see none (the most bytes cross).
After one untimed run, each split runs `mpiexec -n N mpickpt transform --no-sync` `--repeat` times,
round-robin, from a warm page cache with earlier writes flushed and the output folder removed; every rank is
wrapped by _measure.py. Every output file must be byte-identical to the shared run's (SHA-256), and the shared
output must hold the case generator's tensors. The report is printed and saved to
<results>/exchange_<case>_8to<target>.md; the exit status is 1 when a run fails or an output differs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from make_case import TARGETS
from run import (BENCH_DIR, MIB, RSS_SLACK, Case, Contender, Run, code_version, compare_digests, content_digests,
                 expected_digests, file_digests, machine, median, median_cpu, median_run, mpickpt_cmd, peak_rss_mib,
                 sources_digest, timed_run, under_mpiexec)

EXCHANGE_BUFFER = 256 * MIB
SPLITS = ("shared", "halves", "one-holder")


@dataclass
class ExchangeRun(Run):
    """A run with the manifest's per-process figures (bytes_read, bytes_sent, bytes_received)."""

    moved: list[dict] = field(default_factory=list)


def holder(split: str, rank: int, ranks: int, procs: int) -> int:
    """The process whose folder holds source `rank` (of `ranks`) in `split`."""
    return rank * procs // ranks if split == "halves" else 0


def make_split(case: Case, split: str, procs: int, base: Path) -> tuple[str, dict[int, list[int]]]:
    """The --src-dir of `split` and the source ranks each process sees; for a split other than `shared`,
    base/<split>/p<process>/rank_<r> symlinks to the case's rank folders are made first."""
    ranks = sorted(int(d.name.removeprefix("rank_")) for d in case.src_dir.glob("rank_*"))
    if split == "shared":
        return str(case.src_dir), {p: ranks for p in range(procs)}
    folder = base / split
    seen: dict[int, list[int]] = {p: [] for p in range(procs)}
    for rank in ranks:
        process = holder(split, rank, len(ranks), procs)
        link = folder / f"p{process}" / f"rank_{rank}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(case.src_dir / f"rank_{rank}", target_is_directory=True)
        seen[process].append(rank)
    return str(folder / "p{process}"), seen


def transform_cmd(case: Case, src_dir: str, out: Path) -> list[str]:
    cmd = mpickpt_cmd(case, out, sync=False) + ["--exchange-buffer", str(EXCHANGE_BUFFER // MIB)]
    cmd[cmd.index("--src-dir") + 1] = src_dir
    return cmd


def bench(case: Case, cs: list[Contender], repeat: int, work: Path, notes: list[str]) -> None:
    """Run every split `repeat` times, round-robin; the first (shared) run's files are the reference."""
    sources = sorted(case.src_dir.glob("rank_*/*.ckpt"))
    out = work / "out"
    reference: list[str] | None = None
    for rep in range(repeat):
        for c in cs:
            if c.failed or (done := timed_run(c, rep, work, sources)) is None:
                continue
            wall, procs, _, other = done
            digests = file_digests(case.outputs(out))
            if reference is None:
                reference, check = digests, "reference"
                diff = compare_digests(content_digests(case, out), expected_digests(case))
                notes.append(f"{c.label} output vs the generator's tensors: {diff or 'equal'}")
            else:
                check = "= shared (bytes)" if digests == reference else "DIFFERS from shared"
            moved = sorted(json.loads((out / "manifest.json").read_text())["processes"], key=lambda p: p["process"])
            out_bytes = sum(p.stat().st_size for p in case.outputs(out))
            c.runs.append(ExchangeRun(wall, procs, out_bytes, check, None, other, moved))
            print(f"[{rep}] {c.label}: {wall:.2f} s, peak RSS {max(p.maxrss_bytes for p in procs) / MIB:.0f} MiB, "
                  f"sent {sum(m['bytes_sent'] for m in moved) / 1e6:.1f} MB, other CPU {other:.2f} s, {check}",
                  flush=True)


def _ranks(seen: list[int]) -> str:
    if not seen:
        return "none"
    return f"{seen[0]}-{seen[-1]}" if seen == list(range(seen[0], seen[-1] + 1)) else ",".join(map(str, seen))


def _per_process(run: ExchangeRun, key: str) -> str:
    return ", ".join(f"{m[key] / 1e6:.1f}" for m in run.moved)


def tables(cs: list[Contender], seen: dict[str, dict[int, list[int]]], bound: int) -> list[str]:
    lines = ["| split | source ranks per process | median s | min-max s | CPU s (user+sys) | peak RSS per process "
             "(MiB) | MB sent per process | MB received per process | MB read per process | other CPU s | outputs |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cs:
        where = "all (shared)" if c.label == "shared" else "; ".join(_ranks(r) for r in seen[c.label].values())
        if not c.runs:
            reason = c.failed.splitlines()[0] if c.failed else ""
            lines.append(f"| {c.label} | {where} | failed | | | | | | | | {reason} |")
            continue
        walls = [r.wall_s for r in c.runs]
        mid, peaks = median_run(c), peak_rss_mib(c)
        lines.append(
            f"| {c.label} | {where} | {median(c):.2f} | {min(walls):.2f}-{max(walls):.2f} | {median_cpu(c):.2f} | "
            f"{', '.join(f'{x:.0f}' for x in peaks)} | {_per_process(mid, 'bytes_sent')} | "
            f"{_per_process(mid, 'bytes_received')} | {_per_process(mid, 'bytes_read')} | "
            f"{max(r.other_cpu_s for r in c.runs):.2f} | {', '.join(sorted({r.check for r in c.runs}))} |")
    lines += ["", "| split | peak RSS of any process (MiB) | bound: largest target slice + exchange buffer + 150 MiB "
              "(MiB) | met |", "|---|---|---|---|"]
    for c in cs:
        if c.runs:
            peak = max(p.maxrss_bytes for r in c.runs for p in r.procs)
            lines.append(f"| {c.label} | {peak / MIB:.0f} | {bound / MIB:.0f} | {'yes' if peak <= bound else 'NO'} |")
    return lines


def report(case: Case, procs: int, repeat: int, cs: list[Contender], seen: dict[str, dict[int, list[int]]],
           notes: list[str], version: str) -> str:
    d, tgt = case.desc, case.desc["targets"][case.target]
    bound = tgt["largest_slice_bytes"] + EXCHANGE_BUFFER + RSS_SLACK
    head = [
        f"# Sources over MPI: {case.name} ({d['src_ranks']} -> {case.dst_ranks} ranks), mpiexec -n {procs}",
        "",
        f"- case: {d['src_bytes'] / 1e9:.2f} GB source in {d['src_ranks']} ranks, {d['params']} parameters, "
        f"model {d['model']}",
        f"- target: {tgt['topology']}, largest target slice {tgt['largest_slice_bytes'] / MIB:.1f} MiB; "
        f"--exchange-buffer {EXCHANGE_BUFFER // MIB}",
        f"- machine: {machine()}",
        f"- mpickpt: {version}",
        f"- {datetime.date.today()}, median of {repeat} runs each, round-robin, warm page cache, `--no-sync`, "
        "earlier writes flushed before each run; split folders are symlinks read as `--src-dir .../p{process}`; "
        "peak RSS = ru_maxrss (includes touched mapped pages); MB sent/received/read per process from the "
        "run's manifest.json (the run nearest the median); other CPU s = most CPU time the rest of the machine "
        "used during one run",
        "",
    ]
    tail = ["", "Checks:"] + [f"- {n}" for n in notes] + [f"- {c.label} failed: {c.failed.splitlines()[0]}"
                                                           for c in cs if c.failed]
    return "\n".join(head + tables(cs, seen, bound) + tail) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", type=Path, help="case folder made by make_case.py")
    ap.add_argument("--target", default="4", choices=sorted(TARGETS, key=int), help="target rank count")
    ap.add_argument("--procs", type=int, default=2, help="mpiexec process count")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--splits", default=",".join(SPLITS),
                    help=f"comma-separated, of {', '.join(SPLITS)} (shared always runs: it is the reference)")
    ap.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    args = ap.parse_args(argv)
    asked = [s for s in args.splits.split(",") if s]
    if unknown := set(asked) - set(SPLITS):
        ap.error(f"unknown split(s) {', '.join(sorted(unknown))}; choose from {', '.join(SPLITS)}")

    root = args.case.resolve()
    case = Case(root, json.loads((root / "case.json").read_text()), args.target)
    work = root.parent / f"{root.name}-exchange"
    shutil.rmtree(work, ignore_errors=True)
    cs, seen = [], {}
    for split in ["shared"] + [s for s in SPLITS if s in asked and s != "shared"]:
        src_dir, seen[split] = make_split(case, split, args.procs, work / "splits")
        launch = under_mpiexec(args.procs, lambda out, src=src_dir: transform_cmd(case, src, out))
        cs.append(Contender(split, "mpickpt", launch, args.procs))
    notes: list[str] = []
    digest = sources_digest()
    try:
        (work / "scratch").mkdir(parents=True)
        cs[0].launch(work / "out", work / "scratch")  # untimed: caches compiled modules, starts MPI once
        bench(case, cs, args.repeat, work, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()
    if sources_digest() != digest:
        notes.append(f"mpickpt sources CHANGED during the run (started at sources {digest}): rerun")
    text = report(case, args.procs, args.repeat, cs, seen, notes, code_version(digest))
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"exchange_{case.name}_8to{args.target}.md").write_text(text)
    bad = any(c.failed or not c.runs for c in cs) or any("DIFFERS" in r.check for c in cs for r in c.runs)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
