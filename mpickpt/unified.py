"""Unified (full-tensor) checkpoints as one source: a MindSpore ``unified_safetensors`` folder
(``part<i>.safetensors`` + ``param_name_map.json`` + ``hyper_param.safetensors``) or a Hugging Face
sharded folder (``model.safetensors.index.json`` + shards).

:class:`UnifiedIndex` merges the shards' entries into one :class:`~mpickpt.formats.SourceIndex`; each
entry's byte runs lie in the shard holding it, whose descriptor :meth:`UnifiedIndex.fd_of` gives. The
index is checked against the shards before anything is read: a missing shard, a tensor in two shards,
a shard lacking a tensor the index names and a shard holding one it does not name are typed errors.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import numpy as np

from .errors import CheckpointFormatError, SourceMissingError
from .formats.base import SourceIndex, TensorEntry

__all__ = ["HF_INDEX", "MS_INDEX", "HYPER_PARAM", "UnifiedIndex", "is_unified_folder", "open_unified",
           "shard_map"]

MS_INDEX = "param_name_map.json"
HF_INDEX = "model.safetensors.index.json"
HYPER_PARAM = "hyper_param.safetensors"


def is_unified_folder(folder: str | os.PathLike[str]) -> bool:
    """Whether a folder holds a unified checkpoint (an index file of either layout)."""
    return any(Path(folder, name).is_file() for name in (MS_INDEX, HF_INDEX))


def shard_map(folder: str | os.PathLike[str]) -> tuple[Path, dict[str, str]]:
    """The index file of a unified folder and its weight map (parameter -> shard file name)."""
    for name in (HF_INDEX, MS_INDEX):
        path = Path(folder, name)
        if path.is_file():
            return path, _weight_map(path)
    raise SourceMissingError(f"{folder}: no {HF_INDEX} or {MS_INDEX}: not a unified checkpoint folder")


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
        self._owner = owner
        self._stack = stack

    def __enter__(self) -> UnifiedIndex:
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
    with ExitStack() as stack:
        shards = {file: stack.enter_context(open_index(root / file, verify_crc=verify_crc))
                  for file in files + extra}
        owner = _owners(index_path, weight_map, shards, set(extra))
        return UnifiedIndex(root, shards, owner, stack.pop_all())
    raise AssertionError("unreachable")  # pragma: no cover


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
