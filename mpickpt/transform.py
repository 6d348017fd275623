"""A whole conversion job: from options to planned per-target output tasks, and running one task.

`TransformJob.prepare` runs on the coordinator only (it may write merged strategy files); the job it
returns is plain picklable data that every process can use to run its own tasks.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from .ckpt import index_checkpoint
from .errors import MpickptError, SourceMissingError
from .execute import SourceFiles, write_target
from .layout import Layouts
from .plan import Planner, TargetPlan, TensorInfo, catalog_from_headers, needed_header_ranks
from .destination import refuse_destination_inside
from .sources import find_rank_files
from .strategy import Strategy, load_strategy, merge_strategy_folder, save_strategy

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
    _planner: Planner | None = field(default=None, repr=False, compare=False)
    # Plans made while preparing, used once by run_task in the same process (not sent to others).
    _plans: dict[int, TargetPlan] = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict[str, object]:
        state = dict(self.__dict__)
        state["_planner"] = None
        state["_plans"] = {}
        return state

    @classmethod
    def prepare(cls, options: TransformOptions, *, write_merged: bool = True) -> TransformJob:
        """Coordinator only: validate paths, merge pipeline strategy folders (kept in dst_dir when
        write_merged), index headers, plan tasks."""
        if options.output_format != "ckpt":
            raise MpickptError(
                f"output_format {options.output_format!r} is not supported yet (only 'ckpt'); "
                "safetensors output arrives with the safetensors format"
            )
        src_dir = Path(options.src_dir)
        if not src_dir.is_dir():
            raise SourceMissingError(f"src_checkpoints_dir {src_dir} is not a directory")
        read_dirs = [str(src_dir)] + [d for d in (options.src_strategy_dir, options.dst_strategy_dir) if d]
        keep_in = options.dst_dir if write_merged else None
        if keep_in is not None:
            refuse_destination_inside(options.dst_dir, read_dirs)
        src = _strategy(options.src_strategy, options.src_strategy_dir, keep_in, MERGED_SRC_STRATEGY)
        dst = _strategy(options.dst_strategy, options.dst_strategy_dir, keep_in, MERGED_DST_STRATEGY)
        rank_files = find_rank_files(src_dir)
        src_stage = src.stage if src is not None and _is_stage_subnetwork(src, dst) else None
        return cls.plan(src, dst, rank_files, options.dst_dir, options.prefix, read_dirs, src_stage)

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
    ) -> TransformJob:
        """Plan every target of a conversion whose source files are known."""
        catalog = _catalog(src, rank_files, src_stage)
        job = cls(src, dst, catalog, dict(rank_files), (), str(dst_dir), tuple(map(str, forbidden_dirs)), src_stage)
        planner = job.planner()
        tasks = []
        targets = planner.target_ranks if output_paths is None else sorted(output_paths)
        for target in targets:
            plan = job._plans[target] = planner.plan(target)
            missing = [r for r in plan.source_ranks if r not in rank_files]
            if missing:
                raise SourceMissingError(
                    f"the checkpoint files of source ranks {sorted(missing)} are needed for target rank {target} "
                    f"but are missing (looked for rank_<r>/*.ckpt)"
                )
            if output_paths is not None:
                path = output_paths[target]
            elif src_stage is not None:
                path = os.path.join(dst_dir, f"rank_{target}", f"{prefix}{target}_part{src_stage}.ckpt")
            else:
                path = os.path.join(dst_dir, f"rank_{target}", f"{prefix}{target}.ckpt")
            tasks.append(
                OutputTask(
                    target_rank=target,
                    path=path,
                    source_ranks=plan.source_ranks,
                    source_files=tuple(rank_files[r] for r in plan.source_ranks),
                    read_bytes=plan.bytes_read(),
                    write_bytes=plan.bytes_written(),
                )
            )
        job.tasks = tuple(tasks)
        return job

    def planner(self) -> Planner:
        """The planner of this job (built once per process)."""
        if self._planner is None:
            self._planner = Planner(self.src, self.dst, self.catalog, src_stage=self.src_stage)
        return self._planner

    def run_task(self, task: OutputTask, *, sync: bool = True, progress: Callable[[int], None] | None = None) -> None:
        """Write one output atomically; progress(bytes) is called as bytes are written."""
        plan = self._plans.pop(task.target_rank, None) or self.planner().plan(task.target_rank)
        with SourceFiles({r: self.rank_files[r] for r in plan.source_ranks}) as sources:
            try:
                write_target(
                    plan, sources, task.path, sync=sync, forbidden_dirs=self.forbidden_dirs, progress=progress
                )
            except MpickptError as error:
                raise type(error)(f"target rank {task.target_rank} ({task.path}): {error}") from error


def _strategy(file: str | None, folder: str | None, keep_in: str | None, merged_name: str) -> Strategy | None:
    """Load a strategy file, or merge a folder of per-stage files (kept as a file in `keep_in` if given)."""
    if file and folder:
        raise MpickptError(f"give either a strategy file ({file}) or a strategy folder ({folder}), not both")
    if folder:
        merged = merge_strategy_folder(folder)
        if keep_in is None:
            return merged
        target = Path(keep_in) / merged_name
        target.parent.mkdir(parents=True, exist_ok=True)
        save_strategy(merged, target)
        return replace(merged, path=str(target))
    return load_strategy(file) if file else None


def _is_stage_subnetwork(src: Strategy | None, dst: Strategy | None) -> bool:
    """MindSpore's switch to the pipeline subnetwork transform: neither strategy pipelined and the source
    parameters (ignoring optimizer states) a strict subset of the target's."""
    if src is None or dst is None or src.stage_count > 1 or dst.stage_count > 1:
        return False
    src_keys = {n for n in src.layouts_by_param() if not n.startswith(_OPTIMIZER_PREFIXES)}
    dst_keys = {n for n in dst.layouts_by_param() if not n.startswith(_OPTIMIZER_PREFIXES)}
    return src_keys < dst_keys


def _catalog(src: Strategy | None, rank_files: Mapping[int, str], src_stage: int | None) -> dict[str, TensorInfo]:
    """Full shapes and dtypes of every source parameter, from the headers of a few source files."""
    wanted = needed_header_ranks(src)
    if src_stage is not None and src is not None:
        wanted = [src_stage * Layouts.from_strategy(src).stage_device_num + r for r in wanted]
    if not all(rank in rank_files for rank in wanted):
        wanted = list(rank_files)  # given only some files (transform_checkpoint_by_rank): read all their headers
    headers = {}
    for rank in wanted:
        with index_checkpoint(rank_files[rank]) as index:
            headers[rank] = [(e.name, e.dtype, tuple(e.dims)) for e in index.entries.values()]
    return catalog_from_headers(src, headers, path_of=lambda r: rank_files.get(r, f"rank {r}"))

