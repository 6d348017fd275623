"""Unified (full-tensor) checkpoints as one source: a MindSpore ``unified_safetensors`` folder
(``part<i>.safetensors`` + ``param_name_map.json`` + ``hyper_param.safetensors``) or a Hugging Face
sharded folder (``model.safetensors.index.json`` + shards).

:class:`UnifiedIndex` merges the shards' entries into one :class:`~mpickpt.formats.SourceIndex`; each
entry's byte runs lie in the shard holding it, whose descriptor :meth:`UnifiedIndex.fd_of` gives. The
index is checked against the shards before anything is read: a missing shard, a tensor in two shards,
a shard lacking a tensor the index names and a shard holding one it does not name are typed errors, and so
are shards the index leaves out (a safetensors file of the folder it does not name, a missing number of a
``-<i>-of-<n>`` series), an empty index and two index files that disagree.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np

from .errors import CheckpointFormatError, MpickptError, SourceMissingError
from .formats.base import SourceIndex, TensorEntry
from .layout import Box, Layouts
from .plan import Copy, ParamPlan, Planner, TargetPlan, TensorInfo
from .strategy import Strategy, load_strategy

__all__ = [
    "HF_INDEX",
    "HYPER_PARAM",
    "MS_INDEX",
    "UnifiedIndex",
    "deploy_plans",
    "is_unified_folder",
    "load_distributed_checkpoint",
    "open_unified",
    "shard_map",
]

MS_INDEX = "param_name_map.json"
HF_INDEX = "model.safetensors.index.json"
HYPER_PARAM = "hyper_param.safetensors"


def is_unified_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether a folder holds a unified checkpoint (an index file of either layout)."""
    return any(Path(folder, name).is_file() for name in (MS_INDEX, HF_INDEX))


def shard_map(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, str]]:
    """The index file of a unified folder and its weight map (parameter -> shard file name). A folder with
    both index files is refused unless their weight maps agree (MindSpore reads one, Hugging Face the other)."""
    found = {path: _weight_map(path) for path in (Path(folder, name) for name in (HF_INDEX, MS_INDEX))
             if path.is_file()}
    if not found:
        raise SourceMissingError(f"{folder}: no {HF_INDEX} or {MS_INDEX}: not a unified checkpoint folder")
    (path, weight_map), *others = found.items()
    for other, other_map in others:
        if other_map != weight_map:
            raise CheckpointFormatError(f"{folder}: holds both {HF_INDEX} and {MS_INDEX}, and they list different "
                                        f"shards (MindSpore reads {MS_INDEX}, Hugging Face {HF_INDEX}): remove "
                                        f"the one not of this checkpoint")
    return path, weight_map


def _weight_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointFormatError(f"{path}: cannot read the index: {err}") from err
    weight_map = data.get("weight_map", data) if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(f"{path}: the index has no weight_map of parameter -> file name")
    for name, shard in weight_map.items():
        if os.path.basename(shard) != shard or not shard:
            raise CheckpointFormatError(f"{path}: parameter {name!r} names shard {shard!r}, not a file of the folder")
    return weight_map


class UnifiedIndex:
    """The shards of a unified folder as one source index (a context manager)."""

    def __init__(self, path: Path, shards: dict[str, SourceIndex], owner: dict[str, str], stack: ExitStack) -> None:
        self.path = path
        self.shards = shards
        self.entries: dict[str, TensorEntry] = {name: shards[file].entries[name] for name, file in owner.items()}
        self.metadata: dict[str, str] = {}
        self.crc: int | None = None
        # MindSpore's hyper_param.safetensors keeps rank 0's stored value (a slice of accu_grads*, say):
        # such a parameter can be copied whole, never laid out by a target strategy.
        self.as_stored = frozenset(n for n, file in owner.items() if file == HYPER_PARAM)
        self._owner = owner
        self._stack = stack

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close every shard."""
        self._stack.close()

    def shard_of(self, name: str) -> SourceIndex:
        """The index of the shard holding `name`."""
        try:
            return self.shards[self._owner[name]]
        except KeyError:
            raise CheckpointFormatError(f"{self.path}: no parameter {name!r} in this checkpoint") from None

    def fileno(self) -> int:
        """Refused: a unified checkpoint is several files (use :meth:`fd_of`)."""
        raise CheckpointFormatError(f"{self.path}: a unified checkpoint has one descriptor per shard; use fd_of")

    def fd_of(self, name: str) -> int:
        """Read-only descriptor of the shard holding `name` (its entry's pieces are offsets there)."""
        return self.shard_of(name).fileno()

    def entry(self, name: str) -> TensorEntry:
        return self.shard_of(name).entry(name)

    def array(self, name: str) -> np.ndarray:
        return self.shard_of(name).array(name)

    def raw(self, name: str) -> list[memoryview]:
        return self.shard_of(name).raw(name)

    def read_into(self, name: str, byte_offset: int, out: memoryview) -> None:
        self.shard_of(name).read_into(name, byte_offset, out)

    def release(self, name: str) -> None:
        self.shard_of(name).release(name)


def open_unified(folder: str | os.PathLike[str], *, verify_crc: bool = False) -> UnifiedIndex:
    """Index every shard of a unified folder and check them against its index file. A MindSpore
    folder's ``hyper_param.safetensors`` (parameters outside the strategy) is a shard the index omits."""
    from .formats import open_index

    root = Path(folder)
    index_path, weight_map = shard_map(root)
    files = list(dict.fromkeys(weight_map.values()))
    extra = [HYPER_PARAM] if index_path.name == MS_INDEX and (root / HYPER_PARAM).is_file() else []
    for name, shard in weight_map.items():
        if not (root / shard).is_file():
            raise SourceMissingError(f"{index_path}: parameter {name!r} is in shard {shard}, which is missing "
                                     f"from {root}")
    if not files + extra:
        raise CheckpointFormatError(f"{index_path}: names no parameter (an empty weight_map): nothing to convert")
    _check_shard_files(root, index_path, files + extra)
    with ExitStack() as stack:
        shards = {file: stack.enter_context(open_index(root / file, verify_crc=verify_crc))
                  for file in files + extra}
        owner = _owners(index_path, weight_map, shards, set(extra))
        return UnifiedIndex(root, shards, owner, stack.pop_all())
    raise AssertionError("unreachable")  # pragma: no cover


_NUMBERED = re.compile(r"(.+)-(\d+)-of-(\d+)\.safetensors")


def _check_shard_files(root: Path, index_path: Path, listed: list[str]) -> None:
    """Refuse shards the index leaves out, whose tensors would silently be missing from every output: a
    safetensors file of the folder it names no parameter in, or a number of a ``<stem>-<i>-of-<n>`` series."""
    unlisted = sorted(p.name for p in root.glob("*.safetensors") if p.is_file() and p.name not in listed)
    if unlisted:
        raise CheckpointFormatError(f"{root / unlisted[0]}: a safetensors file in which {index_path.name} names no "
                                    f"parameter, so its tensors would be left out: fix the index or move the file "
                                    f"away ({len(unlisted)} such file{'s' if len(unlisted) > 1 else ''})")
    for shard in listed:
        match = _NUMBERED.fullmatch(shard)
        if match is None:
            continue
        stem, number, count = match.groups()
        for i in range(1, int(count) + 1):
            expected = f"{stem}-{i:0{len(number)}d}-of-{count}.safetensors"
            if expected not in listed:
                raise CheckpointFormatError(f"{index_path}: its shard names count {int(count)} shards, but it names "
                                            f"no parameter in {expected}: the index is incomplete")


def _owners(index_path: Path, weight_map: dict[str, str], shards: dict[str, SourceIndex],
            unlisted: set[str]) -> dict[str, str]:
    """Parameter -> shard file, in index order then the unlisted shards' order, checked both ways."""
    owner: dict[str, str] = {}
    for file, shard in shards.items():
        for name in shard.entries:
            if name in owner:
                raise CheckpointFormatError(f"{index_path.parent}: parameter {name!r} is in two shards, "
                                            f"{owner[name]} and {file}")
            if file not in unlisted and weight_map.get(name) != file:
                raise CheckpointFormatError(f"{shard.path}: holds parameter {name!r}, which {index_path.name} "
                                            + (f"puts in {weight_map[name]}" if name in weight_map else
                                               "does not name"))
            owner[name] = file
    for name, file in weight_map.items():
        if owner.get(name) != file:
            raise CheckpointFormatError(f"{index_path.parent / file}: parameter {name!r} is missing (the index "
                                        f"{index_path.name} puts it there)")
    order = list(weight_map) + [n for n in owner if n not in weight_map]
    return {name: owner[name] for name in order}


# -- MindSpore's load_distributed_checkpoint without a network ---------------------------------------


def deploy_plans(index: SourceIndex, dst: Strategy | None, ranks: list[int]) -> dict[int, TargetPlan]:
    """The file of each target rank as MindSpore's ``load_distributed_checkpoint`` saves it: the parameters
    of the target strategy in the rank's stage, sliced (all of them whole without a strategy), plus every
    parameter of ``hyper_param.safetensors`` whole, as stored. Other parameters are left out."""
    shards = getattr(index, "shards", {})
    hyper = list(shards[HYPER_PARAM].entries) if HYPER_PARAM in shards else []
    layouts = Layouts.from_strategy(dst)
    catalog = {name: TensorInfo(e.dtype, tuple(e.dims)) for name, e in index.entries.items()
               if name not in hyper and layouts.holds(name)}
    planner = Planner(None, dst, catalog)
    plans = {}
    for rank in ranks:
        params = list(planner.plan(rank).params)
        for name in hyper:
            entry = index.entries[name]
            whole = Box.full(entry.dims)
            params.append(ParamPlan(name, entry.dtype, tuple(entry.dims), (Copy(0, whole, whole),), False))
        plans[rank] = TargetPlan(rank, tuple(params), (0,))
    return plans


LOAD_FORMATS = ("ckpt", "safetensors")  # what MindSpore's load_distributed_checkpoint reads and writes


def load_distributed_checkpoint(network: Any = None, checkpoint_filenames: Any = None, predict_strategy: Any = None,
                                train_strategy_filename: Any = None, strict_load: bool = False,
                                dec_key: Any = None, dec_mode: str = "AES-GCM", format: str = "ckpt",
                                unified_safetensors_dir: str | None = None, dst_safetensors_dir: str | None = None,
                                rank_id: int | None = None, output_format: str = "safetensors",
                                name_map: Any = None, max_process_num: int = 64,
                                return_param_dict: bool = False) -> bool:
    """MindSpore's ``load_distributed_checkpoint`` in its save mode (``network=None``, ``format=
    "safetensors"``): writes ``dst_safetensors_dir/rank_r/net.<output_format>`` for rank ``rank_id``, or for
    every rank of ``predict_strategy`` when it is None, from a unified folder (MindSpore's or Hugging Face's)."""
    from .execute import SourceFiles, write_target
    from .formats import suffix_of

    del max_process_num, return_param_dict
    if format not in LOAD_FORMATS or output_format not in LOAD_FORMATS:
        raise MpickptError(f"For 'load_distributed_checkpoint', 'format' and 'output_format' must be 'ckpt' or "
                           f"'safetensors', got {format!r} and {output_format!r}")
    if network is not None:
        raise MpickptError("For 'load_distributed_checkpoint', mpickpt has no networks: pass network=None and "
                           "dst_safetensors_dir to save each rank's file, then load that with MindSpore")
    if format != "safetensors":
        raise MpickptError("For 'load_distributed_checkpoint', mpickpt supports format='safetensors' (with "
                           "unified_safetensors_dir) only: the 'ckpt' form loads into a network")
    given = {"checkpoint_filenames": checkpoint_filenames, "train_strategy_filename": train_strategy_filename,
             "dec_key": dec_key}
    for key, value in given.items():
        if value is not None:
            raise MpickptError(f"For 'load_distributed_checkpoint', {key} must be None when format is 'safetensors'")
    if name_map is not None:
        raise NotImplementedError("For 'load_distributed_checkpoint', name_map (which MindSpore honours) is "
                                  "not supported by mpickpt")
    if strict_load or dec_mode != "AES-GCM":
        raise MpickptError("For 'load_distributed_checkpoint', strict_load and dec_mode must be default when "
                           "format is 'safetensors'.")
    if unified_safetensors_dir is None or dst_safetensors_dir is None:
        raise MpickptError("For 'load_distributed_checkpoint', 'unified_safetensors_dir' and "
                           "'dst_safetensors_dir' can not be None when network is None.")
    from .destination import check_destination
    from .sources import find_rank_files

    check_destination(dst_safetensors_dir, [unified_safetensors_dir])
    root = Path(unified_safetensors_dir).absolute()
    source = find_rank_files(root)
    if len(source) != 1 or root not in (Path(source[0]), Path(source[0]).parent):  # not rank_0/'s file either
        raise MpickptError(f"For 'load_distributed_checkpoint', {unified_safetensors_dir} is not a unified "
                           f"checkpoint (it holds rank folders)")
    dst = load_strategy(predict_strategy) if predict_strategy is not None else None
    ranks = [rank_id] if rank_id is not None else list(range(Layouts.from_strategy(dst).device_count))
    with SourceFiles(source) as sources:
        plans = deploy_plans(sources.index(0), dst, ranks)
        for rank, plan in plans.items():
            path = os.path.join(dst_safetensors_dir, f"rank_{rank}", f"net{suffix_of(output_format)}")
            write_target(plan, sources, path, fmt=output_format, forbidden_dirs=[unified_safetensors_dir])
    return True
