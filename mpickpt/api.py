"""MindSpore's checkpoint-transformation API, same names and arguments: `import mpickpt as ms` ports a script."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .convert import ckpt_to_safetensors, safetensors_to_ckpt
from .dtypes import numpy_dtype
from .errors import SourceMissingError
from .formats import open_index
from .plan import rank_list_for_transform as _rank_list
from .strategy import load_strategy
from .strategy import merge_pipeline_strategys as _merge_pipeline_strategys
from .transform import OutputTask, TransformJob, TransformOptions
from .unified import load_distributed_checkpoint
from .unify import unified_safetensors

OUTPUT_FORMATS = ("ckpt", "safetensors")  # what MindSpore's transform_checkpoints writes

__all__ = [
    "ckpt_to_safetensors",
    "load_distributed_checkpoint",
    "load_segmented_checkpoints",
    "merge_pipeline_strategys",
    "rank_list_for_transform",
    "safetensors_to_ckpt",
    "transform_checkpoint_by_rank",
    "transform_checkpoints",
    "unified_safetensors",
]


def transform_checkpoints(
    src_checkpoints_dir: str,
    dst_checkpoints_dir: str,
    ckpt_prefix: str,
    src_strategy_file: str | None = None,
    dst_strategy_file: str | None = None,
    process_num: int = 1,
    output_format: str = "ckpt",
) -> None:
    """Convert every rank of `src_checkpoints_dir/rank_x/*.ckpt` into `dst_checkpoints_dir/rank_y/<prefix>y.ckpt`.

    >>> transform_checkpoints("src_checkpoints", "dst_checkpoints", "checkpoint_",
    ...                       "src_strategy.ckpt", "dst_strategy.ckpt")  # doctest: +SKIP
    """
    if not isinstance(ckpt_prefix, str):
        raise TypeError("ckpt_prefix should be a str")
    if not isinstance(process_num, int) or process_num < 1:
        raise ValueError(f"process_num should be a positive int, got {process_num!r}")
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be 'safetensors' or 'ckpt', got {output_format!r}")
    options = TransformOptions(
        src_dir=str(src_checkpoints_dir),
        dst_dir=str(dst_checkpoints_dir),
        prefix=ckpt_prefix,
        src_strategy=_path_or_none(src_strategy_file),
        dst_strategy=_path_or_none(dst_strategy_file),
        output_format=output_format,
    )
    job = TransformJob.prepare(options)
    try:
        _check_prefix_as_mindspore(job, ckpt_prefix)
        if process_num == 1 or len(job.tasks) == 1:
            for task in job.tasks:
                job.run_task(task)
            return
        with ProcessPoolExecutor(max_workers=min(process_num, len(job.tasks))) as pool:
            for future in [pool.submit(_run_task, job, task) for task in job.tasks]:
                future.result()
    finally:
        job.close()


def _check_prefix_as_mindspore(job: TransformJob, prefix: str) -> None:
    """Refuse the prefixes MindSpore refuses when it converts `.ckpt` sources (all stages at once): blank
    ones and those holding '~' (its path-safety check; '/' and '..' are refused for every source)."""
    ckpt_sources = all(path.endswith(".ckpt") for path in job.rank_files.values())
    if ckpt_sources and job.src_stage is None and (not prefix.strip() or "~" in prefix):
        raise ValueError(f"ckpt_prefix {prefix!r} is not safe (blank or holding '~'): MindSpore refuses it for "
                         ".ckpt sources")


def _run_task(job: TransformJob, task: OutputTask) -> None:
    job.run_task(task)


def rank_list_for_transform(
    rank_id: int, src_strategy_file: str | None = None, dst_strategy_file: str | None = None
) -> list[int]:
    """The source ranks whose checkpoints target rank `rank_id` needs (descending, like MindSpore)."""
    if not isinstance(rank_id, int):
        raise TypeError("rank_id should be an int")
    if src_strategy_file is None:
        return [0]
    src = load_strategy(src_strategy_file)
    dst = load_strategy(dst_strategy_file) if dst_strategy_file is not None else None
    return _rank_list(rank_id, src, dst)


def transform_checkpoint_by_rank(
    rank_id: int,
    checkpoint_files_map: Mapping[int, str],
    save_checkpoint_file_name: str,
    src_strategy_file: str | None = None,
    dst_strategy_file: str | None = None,
) -> None:
    """Convert one target rank from the given source files (rank -> path) into `save_checkpoint_file_name`."""
    if not isinstance(checkpoint_files_map, Mapping):
        raise TypeError("checkpoint_files_map should be a dict")
    if not isinstance(rank_id, int):
        raise TypeError("rank_id should be an int")
    if not isinstance(save_checkpoint_file_name, (str, os.PathLike)):
        raise TypeError("save_checkpoint_file_name should be a str")
    if not str(save_checkpoint_file_name).endswith(".ckpt"):
        raise ValueError(f"save_checkpoint_file_name {save_checkpoint_file_name} should end with .ckpt")
    for rank, path in checkpoint_files_map.items():
        if not os.path.isfile(path):
            raise SourceMissingError(f"checkpoint file {path} of source rank {rank} does not exist")
    src = load_strategy(src_strategy_file) if src_strategy_file is not None else None
    dst = load_strategy(dst_strategy_file) if dst_strategy_file is not None else None
    read_dirs = {os.path.dirname(os.path.abspath(p)) for p in checkpoint_files_map.values()}
    out = str(save_checkpoint_file_name)
    job = TransformJob.plan(
        src,
        dst,
        {int(r): str(p) for r, p in checkpoint_files_map.items()},
        dst_dir=os.path.dirname(os.path.abspath(out)),
        prefix="",
        forbidden_dirs=sorted(read_dirs),
        output_paths={rank_id: out},
    )
    try:
        job.run_task(job.tasks[0])
    finally:
        job.close()


def merge_pipeline_strategys(src_strategy_dirs: str, dst_strategy_file: str) -> None:
    """Merge the per-stage strategy files of a pipeline-parallel run into one file."""
    _merge_pipeline_strategys(src_strategy_dirs, dst_strategy_file)


def load_segmented_checkpoints(ckpt_file_dir: str) -> dict[str, np.ndarray | str]:
    """Load the checkpoint files of a folder and merge them: parameter name -> numpy array (a copy).

    The files read are those MindSpore reads, its `*.ckpt` (hidden files, which its glob skips, are
    not read); a folder without any reads its `*.safetensors` instead (MindSpore would return nothing).
    Files are read in name order; a parameter stored in several files (global_step in every pipeline
    part) takes the value of the last one, as MindSpore's dict update does. A `str` value (append_dict)
    comes back as a `str`, as in MindSpore; BFloat16 tensors as their raw 2-byte values (see
    `mpickpt.ckpt.numpy_dtype`).
    """
    folder = Path(ckpt_file_dir)
    if not folder.is_dir():
        raise SourceMissingError(f"checkpoint folder {ckpt_file_dir} is not a directory")
    files = _segment_files(folder, ".ckpt") or _segment_files(folder, ".safetensors")
    if not files:
        raise SourceMissingError(f"checkpoint folder {ckpt_file_dir} holds no .ckpt or .safetensors file")
    merged: dict[str, np.ndarray | str] = {}
    for path in files:
        with open_index(path) as index:
            for name, entry in index.entries.items():
                value = index.array(name)
                merged[name] = str(value) if entry.dtype == "str" else np.array(
                    value, dtype=numpy_dtype(entry.dtype), copy=True)
    return merged


def _segment_files(folder: Path, suffix: str) -> list[Path]:
    """The files of `folder` named `*<suffix>` that MindSpore's glob lists (not hidden), by name."""
    return sorted(p for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith(".") and p.is_file())


def _path_or_none(path: str | os.PathLike[str] | None) -> str | None:
    return None if path is None else str(path)
