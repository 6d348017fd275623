"""Unify a distributed checkpoint into full tensors: MindSpore's ``unified_safetensors`` layout
(``part<i>.safetensors``, ``hyper_param.safetensors``, ``param_name_map.json``) or Hugging Face's sharded
layout (``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``).

Planning (:func:`plan_unify`, coordinator only) takes the one-full-target plan of a transform with no
target strategy and splits its parameters into output files; every output file is then written by one
process (:func:`run_unify` deals them by size), reading only the source byte runs of its parameters.
Under MPI every process first confirms it sees the source files and the destination folder rank 0
planned with (:func:`plan_shared`): node-local copies under one path are refused before any output.

What MindSpore 2.10's ``unified_safetensors`` does, and so this (layout ``mindspore``):

- The parts hold the parameters of the source strategy present in the files, except ``accu_grads*``
  and those ``choice_func`` answers False for; they are split into ``ceil(total bytes / 3 GiB)`` parts
  (at most one per parameter), largest first (ties in a safetensors file's data order, as MindSpore meets
  them) onto the part with the fewest bytes.
- ``hyper_param.safetensors``: every parameter of rank 0's file that is in no part, as rank 0 stores
  it (global_step, but also rank 0's slice of ``accu_grads*`` and of parameters ``choice_func``
  dropped), written only when there is one.
- ``param_name_map.json``: ``{"metadata": {"total_size": <full bytes of the parts>}, "weight_map":
  {name: "part<i>.safetensors"}}``; a name ``choice_func`` answers a string for is saved under it.
- ``split_dst_file=(i, n)``: the i-th of n contiguous shares of the parts; share 1 also writes
  ``hyper_param.safetensors`` and ``param_name_map.json`` (listing every part).
- Part metadata: ``{"format": "ms"}`` with the sources' ``remove_redundancy`` as ``"False"``.
  Deliberate difference: MindSpore also copies the sources' ``crc_num`` (a checksum of another file)
  into every part; this does not. A whole run first removes the manifest, the index and the unified files an
  earlier run left in ``dst_dir`` that it will not rewrite, and writes the index last; ``mpickpt unify``
  (:func:`run_unify`) also locks ``dst_dir`` for the run, as ``transform`` does.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from .atomic import write_bytes_atomic
from .collective import broadcast_prepared, deal_by_size, fail
from .destination import DestinationLock, check_destination, lock_for_run, refuse_destination_inside
from .errors import DestinationError, MpickptError, PlanError
from .execute import SourceFiles, write_plan
from .formats import TensorSpec, open_index
from .formats.safetensors import clashes_with_metadata
from .layout import Box, Layouts
from .manifest import remove_manifest, write_manifest
from .mpi import Comm
from .plan import Copy, ParamPlan, TargetPlan
from .shared_folders import SharedCheck, confirm_shared, leave_check
from .transform import TransformJob, TransformOptions
from .unified import HF_INDEX, HYPER_PARAM, MS_INDEX

__all__ = ["LAYOUTS", "OutputFile", "UnifyOptions", "UnifyPlan", "UnifySummary", "parse_size", "plan_shared",
           "plan_unify", "run_unify", "unified_safetensors"]

LAYOUTS = ("mindspore", "hf")
PART_BYTES = 3 << 30  # MindSpore: one part per started 3 GiB of full tensors
DEFAULT_SHARD_SIZE = "5GB"
_SKIPPED_PREFIX = "accu_grads"  # MindSpore keeps these out of the parts
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", re.IGNORECASE)

ChoiceFunc = Callable[[str], "bool | str"]


def parse_size(text: str | int) -> int:
    """Bytes of a size as Hugging Face reads it: ``5GB`` = 5 * 10**9, ``2MB``, ``500MB``; ``MiB``/``GiB``
    are powers of 1024; a bare number is bytes."""
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(text)
        if not match or match.group(2).upper() not in _UNITS:
            raise MpickptError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB, 2MiB or 1048576")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value < 1:
        raise MpickptError(f"--max-shard-size {text!r}: the size must be at least one byte")
    return value


@dataclass(frozen=True)
class UnifyOptions:
    """What `mpickpt unify` was asked to do."""

    src_dir: str
    dst: str
    src_strategy: str | None = None
    src_strategy_dir: str | None = None
    layout: str = "mindspore"  # or "hf"
    max_shard_size: int = 5 * 10**9  # hf layout
    params: tuple[str, ...] = ()  # fnmatch patterns of the parameters to keep (empty: all)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of the parameters to leave out
    src_format: str | None = None
    split_dst_file: tuple[int, ...] = ()  # mindspore layout: (i, n) writes the i-th of n shares of the parts
    fmt: str = "safetensors"  # or "h5": `dst` is one HDF5 file of every full tensor (layout ignored)


@dataclass(frozen=True)
class OutputFile:
    """One output file: the source parameters it holds, their bytes, its safetensors metadata."""

    path: str
    names: tuple[str, ...]
    nbytes: int
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "ms"})


@dataclass
class UnifyPlan:
    """A planned unify; picklable, so the coordinator prepares it and broadcasts it."""

    job: TransformJob
    dst: str
    files: tuple[OutputFile, ...]
    stored: dict[str, ParamPlan]  # parameters written as rank 0 stores them (hyper_param.safetensors)
    renames: dict[str, str]  # source name -> output name (choice_func)
    index_path: str | None
    index: dict[str, Any] | None
    index_indent: int
    left_out: tuple[str, ...]
    _full: dict[str, ParamPlan] = field(default_factory=dict, repr=False, compare=False)  # planned once per process

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_full": {}}

    def target_plan(self, file: OutputFile) -> TargetPlan:
        """The plan of one output file: its parameters, whole."""
        if not self._full:
            self._full = {p.name: p for p in self.job.planner().plan(0).params}
        params = tuple(self.stored.get(name) or self._full[name] for name in file.names)
        ranks = sorted({c.src_rank for p in params for c in p.copies}, reverse=True)
        return TargetPlan(0, params, tuple(ranks))


@dataclass(frozen=True)
class UnifySummary:
    """What a run did, the same on every process."""

    files: int
    params: int
    bytes_written: int
    processes: int
    seconds: float
    left_out: tuple[str, ...]
    manifest: str | None

    def line(self) -> str:
        left = ""
        if self.left_out:
            shown = ", ".join(self.left_out[:8]) + (f" (+{len(self.left_out) - 8} more)" if len(self.left_out) > 8
                                                    else "")
            left = f"; left out {len(self.left_out)}: {shown}"
        where = f"; manifest {self.manifest}" if self.manifest else ""
        return (f"mpickpt: unified {self.params} parameters into {self.files} file(s), {self.bytes_written:,} bytes, "
                f"by {self.processes} process(es) in {self.seconds:.2f} s{left}{where}")


# -- planning -----------------------------------------------------------------------------------


def plan_unify(options: UnifyOptions, choice_func: ChoiceFunc | None = None) -> UnifyPlan:
    """Coordinator only: check sources and strategy, plan the full tensors, split them into output files."""
    if options.layout not in LAYOUTS:
        raise MpickptError(f"unknown layout {options.layout!r} (known: {', '.join(LAYOUTS)})")
    if options.fmt not in ("safetensors", "h5"):
        raise MpickptError(f"unknown unify format {options.fmt!r} (known: safetensors, h5)")
    read_dirs = [d for d in (options.src_dir, options.src_strategy_dir) if d]
    if options.fmt == "h5":
        if os.path.isdir(options.dst):
            raise DestinationError(f"{options.dst}: the HDF5 output is a file, and this is a folder")
        refuse_destination_inside(options.dst, read_dirs)
    else:
        check_destination(options.dst, read_dirs)
    job = TransformJob.prepare(TransformOptions(
        src_dir=options.src_dir, dst_dir=options.dst, src_strategy=options.src_strategy,
        src_strategy_dir=options.src_strategy_dir, output_format=options.fmt, src_format=options.src_format),
        write_merged=False)
    job.forbidden_dirs = tuple(os.path.abspath(d) for d in read_dirs)
    full = job.planner().plan(0).params
    chosen = _selection(options)
    if options.fmt == "h5":
        return _plan_h5(options, job, [p for p in full if chosen(p.name)],
                        tuple(p.name for p in full if not chosen(p.name)))
    if options.layout == "hf":
        return _plan_hf(options, job, [p for p in full if chosen(p.name)],
                        tuple(p.name for p in full if not chosen(p.name)))
    if job.src is None:
        raise MpickptError("the mindspore layout needs the source strategy (--src-strategy or --src-strategy-dir)")
    plan = _plan_mindspore(options, job, full, chosen, choice_func)
    _check_names(plan, {p.name: p.dtype for p in full})
    return plan


def _check_names(plan: UnifyPlan, dtypes: Mapping[str, str]) -> None:
    """A part's tensor named (or renamed by ``choice_func``) like one of its metadata keys, or two tensors
    stored under one name, are an error before anything is written (the writer would refuse the first only
    once earlier parts were done; the index would silently keep one of the second)."""
    stored_as: dict[str, str] = {}
    for file in plan.files:
        for name in file.names:
            written = plan.renames.get(name, name)
            if clashes_with_metadata(written, dtypes.get(name, ""), file.metadata):
                raise MpickptError(f"{file.path}: parameter {name!r} would be stored as {written!r}, a safetensors "
                                   f"metadata key of this file, which MindSpore would read as its dtype; rename it")
            if stored_as.setdefault(written, name) != name:
                raise MpickptError(f"{file.path}: parameters {stored_as[written]!r} and {name!r} would both be "
                                   f"stored as {written!r} (choice_func's new names must be unique)")


def _selection(options: UnifyOptions) -> Callable[[str], bool]:
    def chosen(name: str) -> bool:
        kept = not options.params or any(fnmatch.fnmatchcase(name, p) for p in options.params)
        return kept and not any(fnmatch.fnmatchcase(name, p) for p in options.exclude)
    return chosen


def _plan_hf(options: UnifyOptions, job: TransformJob, params: Sequence[ParamPlan],
             left_out: tuple[str, ...]) -> UnifyPlan:
    """Shards filled in order up to the limit; a tensor over the limit gets a shard of its own."""
    if not params:
        raise PlanError(f"{options.src_dir}: no parameter left to unify")
    shards: list[list[ParamPlan]] = []
    size = 0
    for param in params:
        if not shards or (shards[-1] and size + param.nbytes > options.max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(param)
        size += param.nbytes
    count = len(shards)
    names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    files = tuple(OutputFile(os.path.join(options.dst, name), tuple(p.name for p in shard),
                             sum(p.nbytes for p in shard)) for name, shard in zip(names, shards))
    weight_map = {p.name: name for name, shard in zip(names, shards) for p in shard}
    index = {"metadata": {"total_size": sum(p.nbytes for p in params)},
             "weight_map": dict(sorted(weight_map.items()))}
    return UnifyPlan(job, options.dst, files, {}, {}, os.path.join(options.dst, HF_INDEX), index, 2, left_out)


def _plan_h5(options: UnifyOptions, job: TransformJob, params: Sequence[ParamPlan],
             left_out: tuple[str, ...]) -> UnifyPlan:
    """One file of every selected full tensor (its parameters are dealt to processes, not the file)."""
    if not params:
        raise PlanError(f"{options.src_dir}: no parameter left to unify")
    file = OutputFile(os.path.abspath(options.dst), tuple(p.name for p in params), sum(p.nbytes for p in params))
    return UnifyPlan(job, os.path.dirname(file.path), (file,), {}, {}, None, None, 0, left_out)


def _plan_mindspore(options: UnifyOptions, job: TransformJob, full: Sequence[ParamPlan],
                    chosen: Callable[[str], bool], choice_func: ChoiceFunc | None) -> UnifyPlan:
    layouts = Layouts.from_strategy(job.src)
    renames: dict[str, str] = {}
    sizes: dict[str, int] = {}
    for param in sorted(full, key=_safetensors_order):
        if not param.in_strategy or not layouts.holds(param.name) or param.name.startswith(_SKIPPED_PREFIX):
            continue
        answer = _choice(choice_func, param.name)
        if answer is False or not chosen(param.name):
            continue
        if isinstance(answer, str):
            renames[param.name] = answer
        sizes[param.name] = param.nbytes
    if not sizes:
        raise PlanError(f"{options.src_dir}: no parameter of the source strategy "
                        f"({options.src_strategy or options.src_strategy_dir}) left to unify")
    parts = max(1, min(math.ceil(sum(sizes.values()) / PART_BYTES), len(sizes)))  # empty tensors alone: one part
    groups = _split_by_size(sizes, parts)
    first, stop = _share(options.split_dst_file, len(groups))
    metadata = _part_metadata(job)
    files = [OutputFile(os.path.join(options.dst, f"part{i}.safetensors"), tuple(groups[i]),
                        sum(sizes[n] for n in groups[i]), metadata) for i in range(first, stop)]
    stored = _rank0_rest(job, set(sizes), chosen) if first == 0 else {}
    if stored:
        files.append(OutputFile(os.path.join(options.dst, HYPER_PARAM), tuple(stored),
                                sum(p.nbytes for p in stored.values())))
    weight_map = {renames.get(n, n): f"part{i}.safetensors" for i, group in enumerate(groups) for n in group}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    left_out = tuple(p.name for p in full if not chosen(p.name))
    return UnifyPlan(job, options.dst, tuple(files), stored, renames,
                     os.path.join(options.dst, MS_INDEX) if first == 0 else None, index, 4, left_out)


def _safetensors_order(param: ParamPlan) -> tuple[int, str]:
    """The order MindSpore meets parameters in (a safetensors file's data order: widest dtype first, then
    name), which breaks ties between equal sizes when splitting into parts."""
    from .formats.safetensors import (  # the official package's layout
        _LAYOUT_RANK,
        _TO_SAFETENSORS,
    )

    return _LAYOUT_RANK.get(_TO_SAFETENSORS.get(param.dtype, ""), len(_LAYOUT_RANK)), param.name


def _choice(choice_func: ChoiceFunc | None, name: str) -> bool | str:
    if choice_func is None:
        return True
    answer = choice_func(name)
    if not isinstance(answer, (bool, str)):
        raise MpickptError(f"For 'unified_safetensors', the return value type of the function 'choice_func' must "
                           f"be bool or str, but got {type(answer)} for parameter {name!r}")
    return answer


def _split_by_size(sizes: Mapping[str, int], count: int) -> list[list[str]]:
    """MindSpore's split: largest first (ties in order), each onto the group with the fewest bytes."""
    groups: list[list[str]] = [[] for _ in range(count)]
    totals = [0] * count
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        lightest = totals.index(min(totals))
        groups[lightest].append(name)
        totals[lightest] += size
    return groups


def _share(split_dst_file: Sequence[int], parts: int) -> tuple[int, int]:
    """The parts [first, stop) of share i of n (MindSpore: contiguous, the first `parts % n` one longer)."""
    if not split_dst_file:
        return 0, parts
    if len(split_dst_file) != 2 or not all(isinstance(v, int) for v in split_dst_file) \
            or not 1 <= split_dst_file[0] <= split_dst_file[1]:
        raise MpickptError(f"split_dst_file must be (i, n) with 1 <= i <= n, got {tuple(split_dst_file)!r}")
    current, total = split_dst_file
    base, extra = divmod(parts, total)
    first = base * (current - 1) + min(current - 1, extra)
    return first, first + base + (1 if current <= extra else 0)


def _part_metadata(job: TransformJob) -> dict[str, str]:
    """``{"format": "ms"}`` plus ``"remove_redundancy": "False"`` when a source file says either value."""
    metadata = {"format": "ms"}
    for path in job.rank_files.values():
        with open_index(path) as index:
            if "remove_redundancy" in index.metadata:
                metadata["remove_redundancy"] = "False"
    return metadata


def _rank0_rest(job: TransformJob, in_parts: set[str], chosen: Callable[[str], bool]) -> dict[str, ParamPlan]:
    """Every parameter of rank 0's file in no part, as stored there (MindSpore's hyper_param.safetensors)."""
    if 0 not in job.rank_files:
        return {}
    with open_index(job.rank_files[0]) as index:
        entries = list(index.entries.values())
    rest = {}
    for entry in entries:
        if entry.name not in in_parts and chosen(entry.name):
            whole = Box.full(entry.dims)
            rest[entry.name] = ParamPlan(entry.name, entry.dtype, tuple(entry.dims), (Copy(0, whole, whole),), False)
    return rest


# -- writing ------------------------------------------------------------------------------------

_OURS = re.compile(r"model-\d+-of-\d+\.safetensors|part\d+\.safetensors|"
                   + "|".join(re.escape(n) for n in (HYPER_PARAM, MS_INDEX, HF_INDEX)))


def clear_outputs(plan: UnifyPlan) -> None:
    """Before a whole run (not a split_dst_file share: the others write there too) writes: remove the earlier
    run's manifest.json (written again once this run is complete), the index files and the unified files of an
    earlier run that this run will not rewrite, so the folder never mixes two runs."""
    folder = Path(plan.dst)
    if not folder.is_dir():
        return
    remove_manifest(plan.dst)
    keep = {os.path.basename(f.path) for f in plan.files}
    for path in folder.iterdir():
        if _OURS.fullmatch(path.name) and path.name not in keep and path.is_file():
            path.unlink()



class Adapted:
    """A writer seen through a renaming of its tensors (choice_func's new names); with ``declared``, one
    whose tensors were declared elsewhere (an HDF5 region writer), so ``declare`` does nothing."""

    def __init__(self, writer: Any, renames: Mapping[str, str], *, declared: bool = False) -> None:
        self._writer = writer
        self._renames = renames
        self._declared = declared

    def _new(self, name: str) -> str:
        return self._renames.get(name, name)

    def declare(self, tensors: Sequence[TensorSpec]) -> None:
        if not self._declared:
            self._writer.declare([TensorSpec(self._new(t.name), t.dtype, t.dims, t.nbytes, t.kind)
                                  for t in tensors])

    def write_tensor(self, name: str, *args: Any) -> None:
        self._writer.write_tensor(self._new(name), *args)

    def write_tensor_chunks(self, name: str, *args: Any) -> None:
        self._writer.write_tensor_chunks(self._new(name), *args)

    def copy_tensor_from(self, name: str, *args: Any) -> None:
        self._writer.copy_tensor_from(self._new(name), *args)

    def copy_tensor_segments(self, name: str, *args: Any) -> None:
        self._writer.copy_tensor_segments(self._new(name), *args)

    def write_maptensor(self, name: str, *args: Any) -> None:
        self._writer.write_maptensor(self._new(name), *args)


def write_file(plan: UnifyPlan, file: OutputFile, *, sync: bool = True) -> tuple[int, int]:
    """Write one output file atomically; returns (bytes read, bytes written)."""
    from .formats.safetensors import SafetensorsWriter

    target = plan.target_plan(file)
    paths = {r: plan.job.rank_files[r] for r in target.source_ranks}
    with SourceFiles(paths) as sources, SafetensorsWriter(file.path, sync=sync, metadata=file.metadata,
                                                          forbidden_dirs=plan.job.forbidden_dirs) as writer:
        renames = {n: plan.renames[n] for n in file.names if n in plan.renames}
        written = write_plan(target, sources, Adapted(writer, renames) if renames else writer)  # type: ignore[arg-type]
    return target.bytes_read(), written


def run_unify(options: UnifyOptions, comm: Comm, *, sync: bool = True, choice_func: ChoiceFunc | None = None,
              manifest: bool = True) -> UnifySummary:
    """Called on every process: rank 0 plans (`plan_shared`), the output files are dealt by size, each process
    writes its share; rank 0 then writes the index (and manifest.json) and every process returns the summary."""
    if options.fmt == "h5":
        from .unify_h5 import run_unify_h5

        return run_unify_h5(options, comm, sync=sync, manifest=manifest)
    started = time.monotonic()
    plan = plan_shared(options, comm, choice_func)
    lock: DestinationLock | None = None

    def claim() -> None:
        nonlocal lock
        lock = claim_destination(plan, whole=not options.split_dst_file)

    broadcast_prepared(claim, comm)  # rank 0, before any process writes
    summary = None
    try:
        report = _write_share(plan, deal_by_size(plan.files, lambda f: f.nbytes, comm.size)[comm.rank],
                              comm.rank, sync)
        comm.send(report, 0)
        if comm.rank == 0:
            summary = _finish(plan, collect(comm), started, sync, manifest)
    except BaseException as exc:
        fail(comm, exc, f"process {comm.rank}")
    finally:
        if lock is not None:
            lock.release()
    comm.flush()
    return cast(UnifySummary, comm.bcast(summary, root=0))  # rank 0 always has one here


def claim_destination(plan: UnifyPlan, *, whole: bool) -> DestinationLock:
    """Lock the destination folder for the run, as `transform` does (a second run into it, of either command,
    fails naming this one), then, for a whole run, clear what an earlier run left (clear_outputs)."""
    lock = lock_for_run(plan.dst, sys.stderr)
    try:
        if whole:
            clear_outputs(plan)
    except BaseException:
        lock.release()
        raise
    return lock


def plan_shared(options: UnifyOptions, comm: Comm, choice_func: ChoiceFunc | None = None) -> UnifyPlan:
    """Called on all ranks: rank 0's plan, once every process has confirmed it sees the source files rank 0
    planned with and the destination folder (mpickpt.shared_folders)."""

    def prepare() -> tuple[UnifyPlan, SharedCheck | None]:
        plan = plan_unify(options, choice_func)
        return plan, leave_check("unify", plan.job.rank_files.values(), plan.dst, comm.size)

    plan, check = broadcast_prepared(prepare, comm)
    confirm_shared(check, comm)
    return plan


def _write_share(plan: UnifyPlan, files: Sequence[OutputFile], process: int, sync: bool) -> dict[str, Any]:
    began = time.monotonic()
    read = written = 0
    for file in files:
        got = write_file(plan, file, sync=sync)
        read += got[0]
        written += got[1]
    return {"process": process, "files": [os.path.basename(f.path) for f in files], "bytes_read": read,
            "bytes_written": written, "seconds": round(time.monotonic() - began, 6)}


def collect(comm: Comm) -> list[dict[str, Any]]:
    """Rank 0: every process's report, in process order."""
    reports: dict[int, dict[str, Any]] = {}
    while len(reports) < comm.size:
        for _, report in comm.poll():
            reports[report["process"]] = report
        if len(reports) < comm.size:
            time.sleep(0.02)
    return [reports[p] for p in range(comm.size)]


def write_index(plan: UnifyPlan, *, sync: bool = True) -> None:
    """The index file (param_name_map.json or model.safetensors.index.json), when this run writes one."""
    if plan.index_path is not None and plan.index is not None:
        data = json.dumps(plan.index, indent=plan.index_indent).encode()
        write_bytes_atomic(plan.index_path, data, sync=sync)


def _finish(plan: UnifyPlan, reports: list[dict[str, Any]], started: float, sync: bool,
            manifest: bool) -> UnifySummary:
    """Rank 0, after every file is written: the index file, manifest.json, the summary."""
    write_index(plan, sync=sync)
    wall = time.monotonic() - started
    path = None
    if manifest:
        from . import __version__

        content = {"version": 1, "tool": f"mpickpt {__version__}", "command": "unify", "world_size": len(reports),
                   "wall_seconds": round(wall, 6), "index": plan.index_path and os.path.basename(plan.index_path),
                   "left_out": list(plan.left_out), "processes": reports}
        path = str(write_manifest(plan.dst, content, sync=sync))
    params = sum(len(f.names) for f in plan.files)
    return UnifySummary(len(plan.files), params, sum(r["bytes_written"] for r in reports), len(reports), wall,
                        plan.left_out, path)


# -- MindSpore's API ------------------------------------------------------------------------------


def unified_safetensors(src_dir: str, src_strategy_file: str | None, dst_dir: str, merge_with_redundancy: bool = True,
                        file_suffix: str | None = None, max_process_num: int = 64,
                        choice_func: ChoiceFunc | None = None, split_dst_file: tuple[int, ...] = ()) -> None:
    """MindSpore's ``unified_safetensors``: full tensors of a distributed checkpoint into ``dst_dir``, the
    output files written by up to ``max_process_num`` processes.

    ``merge_with_redundancy`` is not needed (which files hold which slices is read from the files
    themselves); ``src_strategy_file`` may also be a folder of per-stage pipeline strategy files.
    """
    del merge_with_redundancy
    if isinstance(max_process_num, bool) or not isinstance(max_process_num, int) or max_process_num < 1:
        raise MpickptError(f"For 'unified_safetensors', max_process_num must be a positive integer, "
                           f"got {max_process_num!r}")
    if file_suffix is not None:
        raise MpickptError("For 'unified_safetensors', file_suffix is not supported by mpickpt: keep one "
                           "checkpoint per rank folder")
    if src_strategy_file is None:
        raise MpickptError("For 'unified_safetensors', src_strategy_file is required")
    if os.path.isfile(src_dir):
        raise MpickptError("For 'unified_safetensors', the 'src_dir' can not be a file.")
    folder = os.path.isdir(src_strategy_file)
    options = UnifyOptions(src_dir=str(src_dir), dst=str(dst_dir),
                           src_strategy=None if folder else str(src_strategy_file),
                           src_strategy_dir=str(src_strategy_file) if folder else None,
                           split_dst_file=tuple(split_dst_file))
    plan = plan_unify(options, choice_func)
    if not split_dst_file:
        clear_outputs(plan)
    Path(dst_dir).mkdir(parents=True, exist_ok=True)
    processes = min(max_process_num, len(plan.files))
    if processes > 1:
        with ProcessPoolExecutor(max_workers=processes) as pool:
            for future in [pool.submit(write_file, plan, file) for file in plan.files]:
                future.result()
    else:
        for file in plan.files:
            write_file(plan, file)
    write_index(plan)
