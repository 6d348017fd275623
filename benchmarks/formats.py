"""Benchmark the storage formats on a case made by make_case.py: `.ckpt` -> safetensors and back against
`cp -r` of the same bytes and against MindSpore's `ckpt_to_safetensors`, and a transform writing
safetensors against the same transform writing `.ckpt`. Contenders alternate round by round (warm page
cache, `--no-sync`); the report gives medians, CPU time, peak RSS and the ratios within this one run, and
checks every output (the round trip and both transforms hold the same tensors as the sources).

    python benchmarks/formats.py /work/bench-data/llama_2gb --target 4 --repeat 3 [--no-mindspore]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from _measure import ProcStats, run_wrapped

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mpickpt.formats import open_index  # noqa: E402

MINDSPORE_PYTHON = Path(os.environ.get("MPICKPT_MINDSPORE_PYTHON", REPO / ".venv-mindspore" / "bin" / "python"))
MS_CONVERT = "import sys, mindspore as ms; ms.ckpt_to_safetensors(sys.argv[1], sys.argv[2])"


def mpickpt(*args: str) -> list[str]:
    return [sys.executable, "-m", "mpickpt", *args]


def contenders(case: Path, work: Path, target: int, mindspore: bool) -> dict[str, Callable[[Path], list[str]]]:
    """Label -> command writing into the given output folder."""
    src = case / "src"
    strategies = ["--src-strategy", str(case / "src_strategy.ckpt"),
                  "--dst-strategy", str(case / f"dst_strategy_{target}.ckpt")]
    found = {
        "cp -r (ckpt sources)": lambda out: ["cp", "-r", str(src), str(out)],
        "mpickpt convert -> safetensors": lambda out: mpickpt("convert", str(src), str(out), "--to", "safetensors",
                                                              "--no-sync"),
        "cp -r (safetensors)": lambda out: ["cp", "-r", str(work / "st_ref"), str(out)],
        "mpickpt convert safetensors -> ckpt": lambda out: mpickpt("convert", str(work / "st_ref"), str(out), "--to",
                                                                   "ckpt", "--no-sync"),
        "mpickpt transform -> ckpt": lambda out: mpickpt("transform", "--src-dir", str(src), "--dst-dir", str(out),
                                                         *strategies, "--no-sync", "--quiet"),
        "mpickpt transform -> safetensors": lambda out: mpickpt("transform", "--src-dir", str(src), "--dst-dir",
                                                                str(out), *strategies, "--output-format",
                                                                "safetensors", "--no-sync", "--quiet"),
    }
    if mindspore and MINDSPORE_PYTHON.exists():
        found["MindSpore ckpt_to_safetensors"] = lambda out: [str(MINDSPORE_PYTHON), "-c", MS_CONVERT, str(src),
                                                              str(out)]
    return found


def tensors(folder: Path) -> dict[str, dict[str, str]]:
    """rank folder -> parameter -> digest of dtype, dims and bytes (any format)."""
    import hashlib

    out: dict[str, dict[str, str]] = {}
    for path in sorted(folder.glob("rank_*/*")):
        if path.suffix not in (".ckpt", ".safetensors"):
            continue
        with open_index(path) as index:
            out[path.parent.name] = {
                n: hashlib.sha256(f"{e.dtype}{list(e.dims)}".encode() + b"".join(bytes(v) for v in index.raw(n)))
                .hexdigest() for n, e in index.entries.items()}
            for n in index.entries:
                index.release(n)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("case", type=Path, help="a folder made by benchmarks/make_case.py")
    parser.add_argument("--target", type=int, default=4, help="target rank count of the transforms")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: CASE/../formats-work)")
    parser.add_argument("--no-mindspore", action="store_true", help="leave MindSpore out")
    args = parser.parse_args()
    work = args.work or args.case.parent / "formats-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    run_wrapped(mpickpt("convert", str(args.case / "src"), str(work / "st_ref"), "--to", "safetensors", "--no-sync"),
                str(work / "ref.json"))
    cs = contenders(args.case, work, args.target, not args.no_mindspore)
    results: dict[str, list[tuple[float, ProcStats]]] = {label: [] for label in cs}
    checks: dict[str, str] = {}
    source = tensors(args.case / "src")
    for _ in range(args.repeat):
        for label, command in cs.items():
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            wall, stats = run_wrapped(command(out), str(work / "stats.json"))
            if stats.returncode != 0:
                raise SystemExit(f"{label} failed (exit {stats.returncode})")
            results[label].append((wall, stats))
            if label not in checks and "transform" not in label and "cp -r" not in label:
                checks[label] = "same tensors as the sources" if tensors(out) == source else "DIFFERENT TENSORS"
            elif label.startswith("mpickpt transform"):
                checks[label] = json.dumps(tensors(out), sort_keys=True)
    shutil.rmtree(work / "out", ignore_errors=True)
    same = checks["mpickpt transform -> ckpt"] == checks["mpickpt transform -> safetensors"]
    print(report(results, args, same, {k: v for k, v in checks.items() if "transform" not in k}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[str, list[tuple[float, ProcStats]]], args: argparse.Namespace, same: bool,
           checks: dict[str, str]) -> str:
    size = sum(p.stat().st_size for p in (args.case / "src").rglob("*.ckpt"))

    def med(label: str) -> float:
        return statistics.median(w for w, _ in results[label])

    lines = [f"# Formats on {args.case.name} ({size / 1e9:.2f} GB of .ckpt sources), median of {args.repeat}, "
             "warm cache, --no-sync", "", "| contender | wall s | CPU s | peak RSS MiB |", "|---|---|---|---|"]
    for label, runs in results.items():
        cpu = statistics.median(s.cpu_s for _, s in runs)
        rss = max(s.maxrss_bytes for _, s in runs) / 2**20
        lines.append(f"| {label} | {med(label):.2f} | {cpu:.2f} | {rss:.0f} |")
    lines += ["", "| ratio | value |", "|---|---|",
              f"| convert -> safetensors / cp -r of the ckpt bytes | {med('mpickpt convert -> safetensors') / med('cp -r (ckpt sources)'):.2f} |",
              f"| convert safetensors -> ckpt / cp -r of the safetensors bytes | {med('mpickpt convert safetensors -> ckpt') / med('cp -r (safetensors)'):.2f} |",
              f"| transform -> safetensors / transform -> ckpt | {med('mpickpt transform -> safetensors') / med('mpickpt transform -> ckpt'):.2f} |"]
    if "MindSpore ckpt_to_safetensors" in results:
        lines.append(f"| MindSpore ckpt_to_safetensors / mpickpt convert | "
                     f"{med('MindSpore ckpt_to_safetensors') / med('mpickpt convert -> safetensors'):.1f}x |")
    lines += ["", "Checks: " + "; ".join(f"{k}: {v}" for k, v in checks.items())
              + f"; transform -> safetensors holds the same tensors as -> ckpt: {same}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
