"""Command line: parses flags and calls library functions, nothing more."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .errors import MpickptError

if TYPE_CHECKING:
    from .mpi import Comm
    from .placement import Placement
    from .transform import OutputTask, TransformJob, TransformOptions

# The commands import their modules when they run, so that a Ctrl-C while numpy and the rest load still
# ends in main's handler.

INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C
BROKEN_PIPE = 141  # 128 + SIGPIPE, as shells report a command whose reader went away


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `mpickpt` command; returns the exit status."""
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"mpickpt: warning: {message}\n"
    if "numpy" not in sys.modules:
        # mpickpt does no linear algebra: without this, numpy's import starts an OpenBLAS thread per core
        # (measured 0.06 s of CPU per process on 2 cores, more on bigger nodes). A user's setting wins.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        args = build_parser().parse_args(argv)
        status = int(args.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        gc.freeze()  # the interpreter's last collection at exit would visit every object: ~20 ms for nothing
        return status
    except KeyboardInterrupt:
        print("mpickpt: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader (e.g. `head`) is gone: point stdout at devnull so the flush at exit is quiet too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return BROKEN_PIPE
    except (MpickptError, OSError) as error:
        print(f"mpickpt: error: {error}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand and option."""
    parser = argparse.ArgumentParser(
        prog="mpickpt",
        description="Convert MindSpore distributed checkpoints between sharding strategies.",
    )
    parser.add_argument("--version", action="version", version=f"mpickpt {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    transform = commands.add_parser(
        "transform", help="convert src_dir/rank_x/*.ckpt|*.safetensors (or a unified checkpoint) to "
                          "dst_dir/rank_y/<prefix>y.ckpt|.safetensors (parallel under mpirun)"
    )
    _add_job_flags(transform, need_src=True, need_dst=True)
    transform.add_argument("--no-sync", action="store_true", help="do not fsync outputs (scratch filesystems)")
    transform.add_argument("--overwrite", action="store_true", help="redo outputs that a previous run completed")
    transform.add_argument("--quiet", action="store_true", help="no progress or summary")
    transform.add_argument("--src-format", choices=["ckpt", "safetensors"],
                           help="which source files to read when rank folders hold both formats")
    transform.add_argument("--verify-crc", action="store_true",
                           help="check the stored checksum of every source file read (.ckpt trailer, "
                                "safetensors crc_num); a file without one is named in a warning")
    transform.add_argument("--crc", action="store_true",
                           help="write checksums into the outputs (MindSpore's crc_check format)")
    transform.add_argument("--exchange-buffer", type=int, default=256, metavar="MIB",
                           help="MiB of memory each process may spend sending source slices to processes that "
                                "do not see the files (default 256); --src-dir/--dst-dir may hold {host} and "
                                "{process}")
    transform.set_defaults(run=_run_transform)

    plan = commands.add_parser("plan", help="dry run: what each target rank reads and writes")
    _add_job_flags(plan, need_src=True, need_dst=False)
    plan.add_argument("--target", type=int, action="append", help="only these target ranks (repeatable)")
    plan.add_argument("--copies", action="store_true", help="also list every planned copy")
    plan.add_argument("--json", action="store_true", help="machine-readable output")
    plan.add_argument("--matrix", action="store_true",
                      help="the source-rank x target-rank matrix of bytes read, as a table (ranks grouped "
                           "beyond 64 sources or 16 targets), or with --json its nonzero entries")
    plan.add_argument("--out", metavar="FILE", help="with --matrix: also draw it as a heat map, FILE.svg "
                                                    "(or FILE.png with matplotlib installed)")
    plan.set_defaults(run=_run_plan)

    rank_list = commands.add_parser("rank-list", help="source ranks one target rank needs")
    rank_list.add_argument("rank", type=int, help="the target rank")
    rank_list.add_argument("--src-strategy", help="source strategy file (omit: one unsharded source)")
    rank_list.add_argument("--dst-strategy", help="target strategy file (omit: one full target)")
    rank_list.add_argument("--json", action="store_true", help="print a JSON list")
    rank_list.set_defaults(run=_run_rank_list)

    merge = commands.add_parser("merge-strategies", help="merge per-stage pipeline strategy files into one")
    merge.add_argument("src_strategy_dir", help="folder of the per-stage strategy files (*.ckpt or *.json)")
    merge.add_argument("dst_strategy_file", help="merged strategy file to write (.json: JSON, else protobuf)")
    merge.set_defaults(run=_run_merge)

    inspect = commands.add_parser("inspect", help="describe a checkpoint or strategy file")
    inspect.add_argument("file", help="a checkpoint (.ckpt, .safetensors, .h5) or a strategy file "
                                      "(.ckpt protobuf or .json)")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--verify-crc", action="store_true", help="check a checkpoint's CRC trailer")
    inspect.set_defaults(run=_run_inspect)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint file or rank_*/ folder tree between .ckpt and safetensors "
                        "(files dealt to processes by size under mpirun)",
        description="Convert as MindSpore's ckpt_to_safetensors / safetensors_to_ckpt do: a file, or every "
                    "rank*/ folder of a folder; outputs keep the folder layout under DST.")
    convert.add_argument("src", help="a .ckpt or .safetensors file, or a folder of rank*/ folders")
    convert.add_argument("dst", help="output folder")
    convert.add_argument("--to", required=True, choices=["safetensors", "ckpt"], help="the output format")
    convert.add_argument("--file-name-regex", help="convert only files whose name matches (MindSpore's "
                                                   "file_name_regex)")
    convert.add_argument("--no-sync", action="store_true", help="do not fsync outputs (scratch filesystems)")
    convert.set_defaults(run=_run_convert)

    verify = commands.add_parser(
        "verify", help="prove the outputs of a conversion right (parallel under mpirun)",
        description="With the sources and strategies of the conversion: re-derive every parameter slice of "
                    "every output from the sources and compare. With --dst-dir alone: compare every output "
                    "with its completion record and manifest.json. Exit status: 0 when every output matches, "
                    "1 when one does not, 2 when the check cannot run.")
    _add_job_flags(verify, need_src=False, need_dst=True)
    verify.set_defaults(run=_run_verify)

    unify = commands.add_parser(
        "unify", help="merge a distributed checkpoint into full tensors (MindSpore's unified_safetensors layout "
                      "or Hugging Face shards; output files dealt to processes by size under mpirun)")
    unify.add_argument("--src-dir", required=True, help="folder of rank_<r>/*.ckpt or *.safetensors checkpoints")
    strategy = unify.add_mutually_exclusive_group()
    strategy.add_argument("--src-strategy", help="source strategy file, .ckpt protobuf or .json")
    strategy.add_argument("--src-strategy-dir", help="folder of per-stage source strategy files to merge")
    unify.add_argument("--dst", required=True, help="output folder (with --format h5: the output file, e.g. model.h5)")
    unify.add_argument("--format", default="safetensors", choices=["safetensors", "h5"],
                       help="safetensors files in --layout, or one HDF5 file of every full tensor written by all "
                            "processes at once (default: safetensors)")
    unify.add_argument("--layout", default="mindspore", choices=["mindspore", "hf"],
                       help="mindspore: part<i>.safetensors + hyper_param.safetensors + param_name_map.json, as "
                            "MindSpore's unified_safetensors; hf: model-0000i-of-0000N.safetensors + "
                            "model.safetensors.index.json (default: mindspore)")
    unify.add_argument("--max-shard-size", default="5GB",
                       help="hf layout: largest shard, e.g. 5GB, 500MB (powers of 1000), 2GiB (default: 5GB)")
    unify.add_argument("--params", action="append", default=[], metavar="GLOB",
                       help="keep only parameters matching this fnmatch pattern (repeatable)")
    unify.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                       help="leave out parameters matching this fnmatch pattern (repeatable), e.g. 'adam_*'")
    unify.add_argument("--src-format", choices=["ckpt", "safetensors"],
                       help="which source files to read when rank folders hold both formats")
    unify.add_argument("--no-sync", action="store_true", help="do not fsync outputs (scratch filesystems)")
    unify.set_defaults(run=_run_unify)
    return parser


def _add_job_flags(parser: argparse.ArgumentParser, *, need_src: bool, need_dst: bool) -> None:
    omit = "" if need_src else " (omit: compare the outputs with their completion records and manifest.json only)"
    parser.add_argument("--src-dir", required=need_src,
                        help=f"folder of rank_<r>/*.ckpt or *.safetensors source checkpoints, or a unified checkpoint "
                             f"(MindSpore or Hugging Face folder, .h5 or .safetensors file){omit}")
    parser.add_argument("--dst-dir", required=need_dst, help="output folder")
    parser.add_argument("--prefix", default="checkpoint_", help="output name prefix (default: checkpoint_)")
    parser.add_argument("--src-strategy", help="source strategy file, .ckpt protobuf or .json (omit, with no "
                                               "--src-strategy-dir: one unsharded source)")
    parser.add_argument("--dst-strategy", help="target strategy file, .ckpt protobuf or .json (omit, with no "
                                               "--dst-strategy-dir: one full target)")
    parser.add_argument("--src-strategy-dir", help="folder of per-stage source strategy files to merge")
    parser.add_argument("--dst-strategy-dir", help="folder of per-stage target strategy files to merge")
    parser.add_argument("--output-format", default="ckpt", choices=["ckpt", "safetensors"],
                        help="format of the outputs (default: ckpt)")


def _options(args: argparse.Namespace) -> TransformOptions:
    from .transform import TransformOptions

    return TransformOptions(
        src_dir=args.src_dir,
        dst_dir=args.dst_dir or "",
        prefix=args.prefix,
        src_strategy=args.src_strategy,
        dst_strategy=args.dst_strategy,
        src_strategy_dir=args.src_strategy_dir,
        dst_strategy_dir=args.dst_strategy_dir,
        output_format=args.output_format,
        src_format=getattr(args, "src_format", None),
        verify_crc=getattr(args, "verify_crc", False),
        crc=getattr(args, "crc", False),
        exchange_buffer=getattr(args, "exchange_buffer", 256) << 20,
    )


@contextlib.contextmanager
def _loading() -> Iterator[None]:
    """Import a command's modules with the garbage collector off, then freeze what they made.

    Imports make only objects that live to the end: collecting while numpy and the rest load cost 13% of a
    small transform's CPU (0.30 -> 0.26 s), and later collections need not visit those objects either."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _run_transform(args: argparse.Namespace) -> int:
    with _loading():
        from .driver import run_transform
        from .mpi import world

        comm = world()  # mpi4py's import too
    run_transform(_options(args), comm, sync=not args.no_sync, overwrite=args.overwrite, quiet=args.quiet)
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    with _loading():
        from .convert import earlier_outputs, run_convert
        from .driver import MAX_LISTED
        from .mpi import world

    comm = world()
    pairs = run_convert(args.src, args.dst, args.to, comm, file_name_regex=args.file_name_regex,
                        sync=not args.no_sync)
    if comm.rank == 0:
        left = earlier_outputs(args.src, args.dst, args.to, pairs)
        if left:
            more = f" and {len(left) - MAX_LISTED} more" if len(left) > MAX_LISTED else ""
            print(f"mpickpt: {len(left)} file(s) of the destination are not from this run and were left as they "
                  f"are: {', '.join(map(str, left[:MAX_LISTED]))}{more}", file=sys.stderr)
        print(f"mpickpt: converted {len(pairs)} file(s), {sum(p[2] for p in pairs):,} bytes, to {args.to} "
              f"by {comm.size} process(es)", file=sys.stderr)
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    with _loading():
        from .mpi import world
        from .verify import verify_outputs, verify_records

    comm = world()
    if args.src_dir:
        verdict = verify_outputs(_options(args), comm)
    else:
        given = [flag for flag in ("src_strategy", "dst_strategy", "src_strategy_dir", "dst_strategy_dir")
                 if getattr(args, flag)]
        if given:
            raise MpickptError(f"--{given[0].replace('_', '-')} needs --src-dir (without sources, verify only "
                               "compares the outputs with their completion records and manifest.json)")
        verdict = verify_records(args.dst_dir, comm)
    if comm.rank == 0:
        print("\n".join(verdict.lines()))
    return 0 if verdict.ok else 1


def _run_plan(args: argparse.Namespace) -> int:
    from .mpi import world

    if args.out and not args.matrix:
        raise MpickptError("--out draws the byte matrix: add --matrix")
    if args.matrix and args.copies:
        raise MpickptError("--matrix sums the copies per source and target: drop --copies")
    comm = world()
    job, placement = _plan_job(_options(args), comm)
    targets = sorted(t.target_rank for t in job.tasks)
    outside = [t for t in args.target or () if t not in targets]
    if outside:
        raise MpickptError(f"--target {outside[0]}: the target ranks are {targets[0]}..{targets[-1]}")
    if comm.rank != 0:  # every process took part in gathering the sources; rank 0 reports
        return 0
    tasks = [t for t in job.tasks if not args.target or t.target_rank in args.target]
    if args.matrix:
        _print_matrix(job, tasks, placement, comm.size, args.out, args.json)
        return 0
    if args.json:
        rows = []
        for task in tasks:
            row: dict[str, object] = {
                "target_rank": task.target_rank,
                "output": task.path,
                "source_ranks": list(task.source_ranks),
                "source_files": list(task.source_files),
                "bytes_read": task.read_bytes,
                "bytes_written": task.write_bytes,
            }
            if args.copies:
                row["plan"] = job.planner().plan(task.target_rank).to_dict()
            rows.append(row)
        json.dump({"targets": rows}, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'target':>6}  {'sources':<24} {'read':>12} {'written':>12}  output")
    for task in tasks:
        ranks = ",".join(map(str, task.source_ranks))
        print(f"{task.target_rank:>6}  {ranks:<24} {task.read_bytes:>12,} {task.write_bytes:>12,}  {task.path}")
        if args.copies:
            for param in job.planner().plan(task.target_rank).params:
                print(f"        {param.name} {param.dtype}{list(param.dims)}: "
                      + "; ".join(f"rank {c.src_rank} {c.src_box} -> {c.dst_box}" for c in param.copies))
    total_read = sum(t.read_bytes for t in tasks)
    total_written = sum(t.write_bytes for t in tasks)
    print(f"{len(tasks)} targets, {total_read:,} bytes read, {total_written:,} bytes written")
    return 0


def _plan_job(options: TransformOptions, comm: Comm) -> tuple[TransformJob, Placement]:
    """The planned job and who sees which source file: gathered from every process (as `transform` starts)
    under MPI or with {host}/{process} in --src-dir, else read here from the one folder. Writes nothing."""
    from .placement import Placement, ProcessView, has_placeholders
    from .startup import host_name, survey_job
    from .transform import TransformJob

    if comm.size > 1 or has_placeholders(options.src_dir):
        survey = survey_job(options, comm)
        return survey.job, survey.placement
    job = TransformJob.prepare(options, write_merged=False)
    return job, Placement((ProcessView(0, host_name(), os.path.abspath(options.src_dir), dict(job.rank_files)),))


def _print_matrix(job: TransformJob, tasks: Sequence[OutputTask], placement: Placement, processes: int,
                  out: str | None, as_json: bool) -> None:
    """Print the byte matrix of `tasks`, as a table or its nonzero entries in JSON (and draw it into `out`),
    each cell marked by whether its bytes cross processes or hosts when `processes` run the job."""
    from .driver import deal_job
    from .matrix import (
        crossing_totals,
        format_grid,
        make_grid,
        route_transfers,
        transfer_bytes,
        write_image,
    )

    every = transfer_bytes(job.planner().plan(t.target_rank) for t in job.tasks)  # routes depend on every target
    shares = [[t.target_rank for t in share] for share in deal_job(job, processes)]
    routes = route_transfers(every, shares, placement.seen_by, [v.host for v in placement.views])
    chosen = {t.target_rank for t in tasks}
    transfers = {key: size for key, size in every.items() if key[1] in chosen}
    grid = make_grid(transfers, sorted(job.rank_files), sorted(chosen), routes=routes)
    if as_json:
        entries = [{"source_rank": s, "target_rank": t, "bytes": size, "reader_process": routes[s, t].reader,
                    "writer_process": routes[s, t].writer, "crosses": routes[s, t].crosses}
                   for (s, t), size in transfers.items()]
        json.dump({"matrix": entries, "bytes_by_crossing": crossing_totals(transfers, routes)}, sys.stdout,
                  indent=1)
        print()
    else:
        print(format_grid(grid))
    if out:
        write_image(grid, out, f"bytes read: {len(job.rank_files)} source rank(s) -> {len(tasks)} target rank(s)")
        print(f"mpickpt: wrote {out}", file=sys.stderr)


def _run_rank_list(args: argparse.Namespace) -> int:
    from .api import rank_list_for_transform

    ranks = rank_list_for_transform(args.rank, args.src_strategy, args.dst_strategy)
    print(json.dumps(ranks) if args.json else " ".join(map(str, ranks)))
    return 0


def _run_merge(args: argparse.Namespace) -> int:
    from .api import merge_pipeline_strategys
    from .strategy import load_strategy

    merge_pipeline_strategys(args.src_strategy_dir, args.dst_strategy_file)
    merged = load_strategy(args.dst_strategy_file)
    print(f"mpickpt: wrote {args.dst_strategy_file}: {merged.stage_count} pipeline stage(s), "
          f"{len(merged.layouts_by_param())} parameters ({len(merged.layout_items)} layouts)")
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from .inspect import describe_file, format_description

    if not os.path.exists(args.file):
        raise MpickptError(f"{args.file} does not exist")
    description = describe_file(args.file, verify_crc=args.verify_crc)
    if args.json:
        json.dump(description, sys.stdout, indent=1)
        print()
    else:
        print(format_description(description))
    return 0


def _run_unify(args: argparse.Namespace) -> int:
    with _loading():
        from .mpi import world
        from .unify import UnifyOptions, parse_size, run_unify

    options = UnifyOptions(src_dir=args.src_dir, dst=args.dst, src_strategy=args.src_strategy,
                           src_strategy_dir=args.src_strategy_dir, layout=args.layout,
                           max_shard_size=parse_size(args.max_shard_size), params=tuple(args.params),
                           exclude=tuple(args.exclude), src_format=args.src_format, fmt=args.format)
    comm = world()
    summary = run_unify(options, comm, sync=not args.no_sync)
    if comm.rank == 0:
        print(summary.line(), file=sys.stderr)
    return 0
