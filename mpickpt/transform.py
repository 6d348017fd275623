"""A whole conversion job: from options to planned per-target output tasks, and running one task.

`TransformJob.prepare` runs in one process (the API, `plan`, `verify`); under MPI, mpickpt/startup.py
builds the same job from headers every process indexes its share of. A job is plain picklable data; an
`Exchange` attached to it (mpickpt/exchange.py) brings slices of files this process does not see.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import __version__
from .catalog import SourceCatalog, build_catalog, check_copies_agree, copied_through
from .destination import check_destination, check_prefix
from .errors import CheckpointFormatError, MpickptError, PlanError, SourceMissingError
from .execute import SourceFiles, write_target
from .formats import IndexCache, open_index, suffix_of
from .formats.safetensors import clashes_with_metadata
from .inventory import SourceHeaders, read_headers
from .layout import Layouts
from .manifest import SourceStamp, WrittenOutput, checksum_text
from .matrix import transfer_bytes
from .placement import Destinations, has_placeholders
from .plan import Planner, TargetPlan, TensorInfo
from .sources import find_rank_files, stamped_files
from .strategy import (
    PROTOBUF,
    Strategy,
    load_strategy,
    merge_strategy_folder,
    save_strategy,
    strategy_to_bytes,
)

# Parameter-name prefixes MindSpore ignores when deciding on the pipeline subnetwork transform.
_OPTIMIZER_PREFIXES = ("accu_grads", "adam_v", "adam_m")

MERGED_SRC_STRATEGY = "merged_src_strategy.ckpt"
MERGED_DST_STRATEGY = "merged_dst_strategy.ckpt"


@dataclass(frozen=True)
class TransformOptions:
    """What `mpickpt transform` was asked to do."""

    src_dir: str
    dst_dir: str
    prefix: str = "checkpoint_"
    src_strategy: str | None = None
    dst_strategy: str | None = None
    src_strategy_dir: str | None = None  # per-stage pipeline strategy files, merged by rank 0 into dst_dir
    dst_strategy_dir: str | None = None
    output_format: str = "ckpt"  # or "safetensors"
    src_format: str | None = None  # "ckpt" or "safetensors" when rank folders hold both; None: what is there
    verify_crc: bool = False  # check the stored checksum of every source file read
    crc: bool = False  # write the format's checksum into every output (MindSpore's crc_check)
    exchange_buffer: int = 256 << 20  # bytes of source slices a process keeps in flight to others


@dataclass(frozen=True)
class OutputTask:
    """One output file: which target rank, where, what it reads and writes (planned)."""

    target_rank: int
    path: str
    source_ranks: tuple[int, ...]
    source_files: tuple[str, ...]
    read_bytes: int
    write_bytes: int
    job_key: str = ""  # digest of everything but the source files that decides this output's content
    source_stamps: tuple[SourceStamp, ...] = ()  # the source files as indexed (empty: stamp them when read)
    read_from: tuple[tuple[int, int], ...] = ()  # (source rank, bytes read from its file) as planned; () unknown


@dataclass
class TransformJob:
    """A planned conversion; picklable so the coordinator can prepare it and broadcast it."""

    src: Strategy | None
    dst: Strategy | None
    catalog: dict[str, TensorInfo]
    rank_files: dict[int, str]
    tasks: tuple[OutputTask, ...]
    dst_dir: str
    forbidden_dirs: tuple[str, ...]
    src_stage: int | None = None
    holders: dict[str, frozenset[int]] = field(default_factory=dict)  # partly held parameters: who holds them
    output_format: str = "ckpt"
    crc: bool = False
    verify_crc: bool = False
    options: TransformOptions | None = None
    notes: tuple[str, ...] = ()  # for the summary: modes taken, folders ignored
    local_files: dict[int, str] | None = None  # the rank files this process sees (None: all of rank_files)
    remote_headers: dict[int, SourceHeaders] = field(default_factory=dict)  # of rank files it does not see
    exchange: Any = field(default=None, repr=False, compare=False)  # an Exchange when some files are remote
    destinations: Destinations | None = None  # where each process writes (None: dst_dir, for every process)
    _planner: Planner | None = field(default=None, repr=False, compare=False)
    # Plans made while preparing, used once by run_task in the same process (not sent to others).
    _plans: dict[int, TargetPlan] = field(default_factory=dict, repr=False, compare=False)
    _verified: set[str] = field(default_factory=set, repr=False, compare=False)  # sources whose CRC passed here
    # Source indexes this process keeps open across its targets (each file's headers read once per run).
    indexes: IndexCache = field(default_factory=IndexCache, repr=False, compare=False)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_planner"] = None
        state["exchange"] = None
        state["_plans"] = {}
        state["_verified"] = set()
        state["indexes"] = IndexCache()
        return state

    def close(self) -> None:
        """Close the source files this process kept open."""
        self.indexes.close()

    @classmethod
    def prepare(cls, options: TransformOptions, *, write_merged: bool = True, sync: bool = True) -> TransformJob:
        """One process: validate the whole job (paths, both strategies, the headers of every source
        file) and plan every target; merged pipeline strategy folders are kept in dst_dir when write_merged."""
        check_prefix(options.prefix)
        suffix_of(options.output_format)
        src_dir = Path(options.src_dir)
        if not src_dir.exists():
            raise SourceMissingError(f"src_checkpoints_dir {src_dir} does not exist")
        read_dirs = source_dirs(options)
        keep_in = options.dst_dir if write_merged else None
        if keep_in is not None:
            check_destination(options.dst_dir, read_dirs)
        rank_files = find_rank_files(src_dir, options.src_format)
        src, dst = load_strategies(options)
        indexes = IndexCache()
        try:
            headers = read_headers(rank_files, indexes.lease, copied_through(src))
            sources = Sources.check(src, dst, rank_files, headers, options, str(src_dir))
            job = cls.plan(src, dst, sources.rank_files, options.dst_dir, options.prefix, read_dirs,
                           sources.src_stage, catalog=sources.catalog, options=options, notes=sources.notes)
            check_values_kept_as_stored(job._plans.values(), sources.headers)
            if keep_in is not None:
                job.src, job.dst = keep_merged(options, job.src, job.dst, keep_in, sync)
        except BaseException:
            indexes.close()
            raise
        job.indexes = indexes
        return job

    @classmethod
    def plan(
        cls,
        src: Strategy | None,
        dst: Strategy | None,
        rank_files: Mapping[int, str],
        dst_dir: str,
        prefix: str,
        forbidden_dirs: Iterable[str],
        src_stage: int | None = None,
        output_paths: Mapping[int, str] | None = None,
        *,
        catalog: SourceCatalog | None = None,
        options: TransformOptions | None = None,
        notes: tuple[str, ...] = (),
        targets: Iterable[int] | None = None,
        stamps: Mapping[int, tuple[SourceStamp, ...]] | None = None,
    ) -> TransformJob:
        """Plan the targets of a conversion whose source files are known (their headers are read here
        unless a catalog of them is given): every target, or `targets` only."""
        if catalog is None:
            found = read_headers(rank_files, fingerprinted=copied_through(src))
            catalog = build_catalog(src, {r: h.rows for r, h in found.items()}, lambda r: rank_files[r],
                                    src_stage=src_stage)
            check_copies_agree({r: h.fingerprints for r, h in found.items()}, lambda r: rank_files[r])
        output_format = options.output_format if options else "ckpt"
        job = cls(src, dst, catalog.params, dict(rank_files), (), str(dst_dir), tuple(map(str, forbidden_dirs)),
                  src_stage, dict(catalog.holders), output_format, bool(options and options.crc),
                  bool(options and options.verify_crc), options, notes)
        planner = job.planner()
        if src_stage is None:
            job.notes = job.notes + _coverage_notes(planner.src, planner.dst, catalog.params)
        strategies = {"src": strategy_digest(src), "dst": strategy_digest(dst)}
        tasks = []
        if targets is None:
            targets = planner.target_ranks if output_paths is None else sorted(output_paths)
        for target in targets:
            planner.check_cataloged(target)
            plan = job._plans[target] = planner.plan(target)
            missing = [r for r in plan.source_ranks if r not in rank_files]
            if missing:
                raise SourceMissingError(
                    f"the checkpoint files of source ranks {sorted(missing)} are needed for target rank {target} "
                    f"but are missing (looked for rank_<r>/*.ckpt or *.safetensors)"
                )
            if output_paths is not None:
                path = output_paths[target]
            else:
                path = output_path(dst_dir, prefix, target, src_stage, output_format)
            tasks.append(
                OutputTask(
                    target_rank=target,
                    path=os.path.abspath(path),
                    source_ranks=plan.source_ranks,
                    source_files=tuple(f for r in plan.source_ranks for f in stamped_files(rank_files[r])),
                    read_bytes=plan.bytes_read(),
                    write_bytes=plan.bytes_written(),
                    job_key=_job_key(strategies, prefix, output_format, job.crc, src_stage, plan),
                    source_stamps=tuple(s for r in plan.source_ranks for s in stamps[r]) if stamps else (),
                    read_from=tuple((r, n) for (r, _), n in transfer_bytes([plan]).items()),
                )
            )
        job.tasks = tuple(tasks)
        return job

    def planner(self) -> Planner:
        """The planner of this job (built once per process)."""
        if self._planner is None:
            self._planner = Planner(self.src, self.dst, self.catalog, src_stage=self.src_stage, holders=self.holders)
        return self._planner

    def run_task(self, task: OutputTask, *, sync: bool = True,
                 progress: Callable[[int], None] | None = None) -> WrittenOutput | None:
        """Write one output atomically; progress(bytes) is called as bytes are written. Returns the
        output's checksum and parameter count where the writer computed the checksum, else None."""
        plan = self._plans.pop(task.target_rank, None) or self.planner().plan(task.target_rank)
        seen = self.rank_files if self.local_files is None else self.local_files
        paths = {r: seen[r] for r in plan.source_ranks if r in seen}
        file_crcs: list[int] = []
        try:
            if self.verify_crc:
                self._verify_sources(paths.values())
            remote = None
            if len(paths) < len(plan.source_ranks):
                if self.exchange is None:
                    raise SourceMissingError(f"the files of source ranks {sorted(set(plan.source_ranks) - set(paths))}"
                                             f" are not visible to this process")
                remote = self.exchange.remote(plan, paths)
                progress = _serving(self.exchange, progress)
            elif self.exchange is not None:
                progress = _serving(self.exchange, progress)
            with SourceFiles(paths, remote, indexes=self.indexes) as sources:
                write_target(plan, sources, task.path, fmt=self.output_format, crc=self.crc, sync=sync,
                             forbidden_dirs=self.forbidden_dirs, progress=progress, on_file_crc=file_crcs.append,
                             tick=self.exchange.serve if self.exchange is not None else None)
        except MpickptError as error:
            raise type(error)(f"target rank {task.target_rank} ({task.path}): {error}") from error
        return WrittenOutput(checksum_text(file_crcs[0]), len(plan.params)) if file_crcs else None

    def _verify_sources(self, paths: Iterable[str]) -> None:
        """Check the stored checksum of each source file once per process (a warning where it has none)."""
        for path in paths:
            if path not in self._verified:
                with open_index(path, verify_crc=True) as index:
                    if index.crc is None:
                        warnings.warn(f"{path}: no stored checksum to verify", stacklevel=2)
                self._verified.add(path)


def _serving(exchange: Any, progress: Callable[[int], None] | None) -> Callable[[int], None]:
    """A progress callback that also serves other processes' requests (once per parameter written)."""
    def step(written: int) -> None:
        exchange.serve()
        if progress is not None:
            progress(written)
    return step


def output_path(dst_dir: str, prefix: str, target: int, src_stage: int | None, output_format: str) -> str:
    """Where one target's output goes."""
    suffix = suffix_of(output_format)
    part = f"_part{src_stage}" if src_stage is not None else ""
    return os.path.abspath(os.path.join(dst_dir, f"rank_{target}", f"{prefix}{target}{part}{suffix}"))


def source_dirs(options: TransformOptions) -> list[str]:
    """The folders a job reads (the destination must be outside them)."""
    return [options.src_dir] + [d for d in (options.src_strategy_dir, options.dst_strategy_dir) if d]


def load_strategies(options: TransformOptions) -> tuple[Strategy | None, Strategy | None]:
    """Both strategies, per-stage folders merged in memory."""
    return (_strategy(options.src_strategy, options.src_strategy_dir),
            _strategy(options.dst_strategy, options.dst_strategy_dir))


def keep_merged(options: TransformOptions, src: Strategy | None, dst: Strategy | None, keep_in: str,
                sync: bool = True) -> tuple[Strategy | None, Strategy | None]:
    """Save the strategies merged from per-stage folders in `keep_in` (fsynced if `sync`) and name them by
    those files; called once the job is validated, so a refused job writes nothing."""
    return (_kept(src, options.src_strategy_dir, keep_in, MERGED_SRC_STRATEGY, sync),
            _kept(dst, options.dst_strategy_dir, keep_in, MERGED_DST_STRATEGY, sync))


@dataclass(frozen=True)
class Sources:
    """The source files of a job, checked against the strategies and cataloged."""

    rank_files: dict[int, str]
    headers: dict[int, SourceHeaders]
    src_stage: int | None
    catalog: SourceCatalog
    notes: tuple[str, ...]

    @classmethod
    def check(cls, src: Strategy | None, dst: Strategy | None, rank_files: Mapping[int, str],
              headers: Mapping[int, SourceHeaders], options: TransformOptions, where: str) -> Sources:
        """Validate the headers of every source file (`where` names the folders in errors about missing ranks)."""
        src_stage = _subnetwork_stage(src, dst, headers)
        notes: list[str] = []
        if src_stage is not None:
            notes.append(f"pipeline subnetwork transform: the source strategy is stage {src_stage} only, whose "
                         f"parameters are a strict subset of the target's; outputs are <prefix><rank>_part"
                         f"{src_stage}{suffix_of(options.output_format)}")
        kept = _ranks_of_strategy(src, src_stage, dict(rank_files), where)
        found = {r: headers[r] for r in kept}
        catalog = build_catalog(src, {r: h.rows for r, h in found.items()}, lambda r: kept[r], src_stage=src_stage)
        check_copies_agree({r: h.fingerprints for r, h in found.items()}, lambda r: kept[r])
        _check_output_format(catalog.params, found, options.output_format, options.crc)
        if catalog.holders:
            notes.append(f"redundancy-removed sources: {len(catalog.holders)} parameter(s) are held by only some "
                         f"rank files; each slice is read from a file that holds it")
        return cls(kept, found, src_stage, catalog, tuple(notes))


def _strategy(file: str | None, folder: str | None) -> Strategy | None:
    """Load a strategy file, or merge a folder of per-stage files."""
    if file and folder:
        raise MpickptError(f"give either a strategy file ({file}) or a strategy folder ({folder}), not both")
    for path in (file, folder):
        if path and has_placeholders(path) and not os.path.exists(path):
            raise MpickptError(f"{path}: placeholders ({{host}}, {{process}}) are expanded in the source and "
                               f"destination folders only; strategies are read by process 0: give a path it sees")
    if folder:
        return replace(merge_strategy_folder(folder), path=folder)  # errors name the folder until it is kept
    return load_strategy(file) if file else None


def _kept(strategy: Strategy | None, folder: str | None, keep_in: str, merged_name: str,
          sync: bool) -> Strategy | None:
    """A strategy merged from a folder, saved in `keep_in` as `merged_name`."""
    if strategy is None or not folder:
        return strategy
    target = Path(keep_in) / merged_name
    save_strategy(strategy, target, sync=sync)
    return replace(strategy, path=str(target))


def strategy_digest(strategy: Strategy | None) -> str:
    """A content hash of a strategy (its protobuf form), "none" for a missing one."""
    if strategy is None:
        return "none"
    return hashlib.sha256(strategy_to_bytes(strategy, PROTOBUF)).hexdigest()


def _job_key(strategies: Mapping[str, str], prefix: str, output_format: str, crc: bool, src_stage: int | None,
             plan: TargetPlan) -> str:
    """Digest of everything but the source files that decides one output's content."""
    content = {"version": __version__, "strategies": dict(strategies), "prefix": prefix, "format": output_format,
               "crc": crc, "src_stage": src_stage, "target": plan.target_rank,
               "params": [[p.name, p.dtype, list(p.dims)] for p in plan.params]}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def _ranks_of_strategy(src: Strategy | None, src_stage: int | None, rank_files: dict[int, str],
                       src_dir: str) -> dict[int, str]:
    """The rank files the source strategy covers (those of `src_stage` only in the pipeline subnetwork
    transform). Missing ranks are an error; so are extra rank folders, since a strategy for fewer devices
    than the checkpoint has would otherwise convert part of the data without a word."""
    if src is None:
        if len(rank_files) > 1:
            raise MpickptError(f"{src_dir} holds {len(rank_files)} rank folders but no source strategy was given: "
                               f"a source strategy file (--src-strategy) or folder (--src-strategy-dir) is needed "
                               f"to know how they split the parameters")
        if 0 not in rank_files:
            raise SourceMissingError(f"{src_dir}: without a source strategy the source is rank_0, which is missing "
                                     f"(found rank_{next(iter(rank_files))})")
        return rank_files
    per_stage = Layouts.from_strategy(src).stage_device_num
    first = 0 if src_stage is None else src_stage * per_stage
    wanted = range(first, first + Layouts.from_strategy(src).device_count)
    missing = [r for r in wanted if r not in rank_files]
    if missing:
        raise SourceMissingError(f"{src_dir}: the source strategy ({src.path}) covers ranks {wanted.start}.."
                                 f"{wanted.stop - 1}, but the checkpoint files of ranks {missing} are missing "
                                 f"(looked for rank_<r>/*.ckpt or *.safetensors)")
    extra = sorted(r for r in rank_files if r not in wanted)
    if extra and src_stage is None:
        raise PlanError(f"{src_dir} has rank folders {extra} beyond the {len(wanted)} ranks of the source strategy "
                        f"({src.path}): is it the strategy of this checkpoint? Move those folders away to convert "
                        f"ranks {wanted.start}..{wanted.stop - 1} only")
    return {r: f for r, f in rank_files.items() if r in wanted}


def _coverage_notes(src: Layouts, dst: Layouts, params: Mapping[str, TensorInfo]) -> tuple[str, ...]:
    """Notes on parameters (optimizer states aside) one strategy has and the other lacks, which nothing here can
    tell right from wrong, so they are said, not refused (MindSpore is silent): those the target lays out that
    no source holds, which the outputs lack (right for a target network's new parameters, e.g. LoRA adapters;
    wrong when a pipeline stage's strategy file and rank folders are missing), and those the source strategy
    slices that the target lacks, of which each output gets one rank's stored slice, as MindSpore's rule says
    (right for a target network that drops them; wrong when a stage's file is missing from the target's folder)."""
    if src.unsharded or dst.unsharded:
        return ()
    notes = []
    lacking = [n for n in dst.names if not src.holds(n) and n not in params and not n.startswith(_OPTIMIZER_PREFIXES)]
    if lacking:
        hint = (f"; if the source's pipeline stages {list(range(src.stage_count))} are not all of them, a stage's "
                f"strategy file and rank folders are missing" if src.stage_count > 1 else "")
        notes.append(f"the target strategy lays out {len(lacking)} parameter(s) that no source holds, e.g. "
                     f"{lacking[:3]}: the outputs lack them (a target network's new parameters, e.g. LoRA adapters, "
                     f"are initialised by the network){hint}")
    sliced = [n for n in src.names if not dst.holds(n) and not n.startswith(_OPTIMIZER_PREFIXES)
              and math.prod(src.layout(n, src.stages_of(n)[0]).pieces) > 1]
    if sliced:
        notes.append(f"{len(sliced)} parameter(s) the source strategy slices are not in the target strategy, e.g. "
                     f"{sliced[:3]}: each output holds one source rank's stored slice of them, as MindSpore's "
                     f"converter writes, not the full tensor (if the target should lay them out, is a pipeline "
                     f"stage's strategy file missing?)")
    return tuple(notes)


def _subnetwork_stage(src: Strategy | None, dst: Strategy | None,
                      headers: Mapping[int, SourceHeaders]) -> int | None:
    """The source stage when MindSpore would take the pipeline subnetwork transform: neither strategy
    pipelined and the source parameters (ignoring optimizer states) a strict subset of the target's.
    Taken only when the source files agree: a file holding a target-strategy parameter that the source
    strategy lacks means the source strategy is incomplete, which is an error."""
    if src is None or dst is None or src.stage_count > 1 or dst.stage_count > 1:
        return None
    src_names = set(src.layouts_by_param())
    dst_names = set(dst.layouts_by_param())
    src_keys = {n for n in src_names if not n.startswith(_OPTIMIZER_PREFIXES)}
    dst_keys = {n for n in dst_names if not n.startswith(_OPTIMIZER_PREFIXES)}
    if not src_keys < dst_keys:
        return None
    per_stage = Layouts.from_strategy(src).stage_device_num
    for rank, found in sorted(headers.items()):
        if rank // per_stage != src.stage:
            continue  # files of other pipeline stages are not read
        stray = [name for name, _, _ in found.rows if name in dst_names and name not in src_names]
        if stray:
            raise PlanError(f"{found.path}: parameter {stray[0]!r} is in the target strategy and in this "
                            f"source file but not in the source strategy ({src.path}): the source strategy is "
                            f"incomplete (a per-stage strategy file of a pipeline run? give the folder of all "
                            f"stages with --src-strategy-dir)")
    return src.stage


def check_values_kept_as_stored(plans: Iterable[TargetPlan], headers: Mapping[int, SourceHeaders]) -> None:
    """A value kept as some rank stored it (a unified folder's hyper_param.safetensors: maybe a slice) may be
    copied whole, but a target strategy must not lay it out (that would slice a slice)."""
    for plan in plans:
        for param in plan.params:
            for copy in param.copies:
                found = headers[copy.src_rank]
                if param.name not in found.as_stored:
                    continue
                stored = next(dims for name, _, dims in found.rows if name == param.name)
                if len(param.copies) > 1 or tuple(param.dims) != stored:
                    raise CheckpointFormatError(
                        f"{found.path}: parameter {param.name!r} is in hyper_param.safetensors, which holds rank "
                        f"0's stored value (maybe a slice), so the target strategy cannot lay it out; "
                        f"load_distributed_checkpoint copies it whole")


def _check_output_format(params: Mapping[str, TensorInfo], headers: Mapping[int, SourceHeaders],
                         output_format: str, crc: bool) -> None:
    """Values the output format cannot hold are an error naming them, before anything is written: MapTensors
    outside ``.ckpt``, ``str`` values in safetensors (an HDF5 file holds them), names its metadata takes."""
    if output_format == "ckpt":
        return
    for rank, found in headers.items():
        for name, kind in found.kinds.items():
            if kind != "tensor" or (output_format == "safetensors" and params[name].dtype == "str"):
                raise MpickptError(f"{found.path}: parameter {name!r} is a {params[name].dtype} value, which "
                                   f"{output_format} cannot hold; convert to ckpt, or leave it out of the source")
            if output_format == "safetensors" and clashes_with_metadata(name, params[name].dtype, crc=crc):
                raise MpickptError(f"{found.path}: parameter {name!r} is named like a safetensors metadata key, "
                                   f"which MindSpore would read as its dtype; convert to ckpt, or rename it")
