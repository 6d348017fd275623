"""`mpickpt inspect`: describe a checkpoint or a strategy file as plain data, and as a table."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from .errors import CheckpointFormatError, MpickptError, StrategyFormatError
from .formats import format_of, open_index
from .strategy import LayoutItem, Strategy, describe_strategy, load_strategy


def describe_file(path: str | os.PathLike[str], *, verify_crc: bool = False) -> dict[str, Any]:
    """Describe a checkpoint (parameters, dtypes, shapes, bytes) or a strategy (per-parameter layout)."""
    path = str(path)
    if path.endswith(".json"):
        return describe_strategy_file(load_strategy(path))
    if _is_hdf5(path):
        return describe_h5(path, verify_crc=verify_crc)
    try:
        return describe_checkpoint(path, verify_crc=verify_crc)
    except CheckpointFormatError as as_checkpoint:
        try:
            return describe_strategy_file(load_strategy(path))
        except StrategyFormatError as as_strategy:
            raise MpickptError(
                f"{path} is neither a checkpoint ({as_checkpoint}) nor a strategy file ({as_strategy})"
            ) from None


def describe_checkpoint(path: str, *, verify_crc: bool = False) -> dict[str, Any]:
    """Name, dtype, shape, bytes and pieces of every parameter of a checkpoint (any format), with totals."""
    fmt = format_of(path)
    with open_index(path, verify_crc=verify_crc, fmt=fmt) as index:
        metadata = dict(index.metadata)
        params = [
            {
                "name": e.name,
                "dtype": e.dtype,
                "shape": list(e.dims),
                "bytes": e.nbytes,
                "pieces": len(e.pieces),
            }
            for e in index.entries.values()
        ]
    return {
        "kind": "checkpoint",
        "format": fmt,
        "metadata": metadata,
        "path": path,
        "file_bytes": os.path.getsize(path),
        "crc_verified": verify_crc,
        "parameters": params,
        "total_parameters": len(params),
        "total_bytes": sum(p["bytes"] for p in params),
    }


def _is_hdf5(path: str) -> bool:
    """Whether ``path`` is named or starts like an HDF5 file."""
    try:
        return format_of(path) == "h5"
    except MpickptError:
        return False


def describe_h5(path: str, *, verify_crc: bool = False) -> dict[str, Any]:
    """Name, MindSpore dtype, shape and bytes of every dataset of an HDF5 file, its attributes, totals."""
    with open_index(path, verify_crc=verify_crc, fmt="h5") as index:
        params = [{"name": e.name, "dtype": e.dtype, "shape": list(e.dims), "bytes": e.nbytes}
                  for e in index.entries.values()]
        attributes = dict(index.metadata)
    return {
        "kind": "hdf5",
        "path": path,
        "file_bytes": os.path.getsize(path),
        "crc_verified": verify_crc,
        "attributes": attributes,
        "parameters": params,
        "total_parameters": len(params),
        "total_bytes": sum(p["bytes"] for p in params),
    }


def describe_strategy_file(strategy: Strategy) -> dict[str, Any]:
    """Per parameter: device matrix, tensor map, optimizer shard, stage, and the slice shape."""
    params = describe_strategy(strategy)
    for row, item in zip(params, strategy.layout_items):
        row["shards_per_dim"] = _shards_per_dim(item)
        row["full_shape"] = list(item.tensor_shape) if item.tensor_shape is not None else None
        row["slice_shape"] = _slice_shape(item)
    return {
        "kind": "strategy",
        "path": strategy.path,
        "current_stage": strategy.current_stage,
        "stage_count": strategy.stage_count,
        "parameters": params,
        "total_parameters": len(params),
    }


def _shards_per_dim(item: LayoutItem) -> list[int]:
    """How many tensor-parallel pieces each dimension is cut into (optimizer sharding not included)."""
    sizes = item.dev_matrix
    return [math.prod(sizes[len(sizes) - 1 - axis] for axis in axes if axis >= 0) for axes in item.dim_axes()]


def _slice_shape(item: LayoutItem) -> list[int] | None:
    """One rank's model-parallel slice, when the file states the full shape (newer JSON files)."""
    if item.tensor_shape is None or len(item.tensor_shape) != len(item.dim_axes()):
        return None
    return [dim // shards for dim, shards in zip(item.tensor_shape, _shards_per_dim(item))]


def format_description(description: dict[str, Any]) -> str:
    """A human-readable table of `describe_file`'s result."""
    if description["kind"] == "checkpoint":
        return _checkpoint_table(description)
    if description["kind"] == "hdf5":
        return _h5_table(description)
    return _strategy_table(description)


def _checkpoint_table(d: dict[str, Any]) -> str:
    rows = [(p["name"], p["dtype"], _shape(p["shape"]), f"{p['bytes']:,}", str(p["pieces"])) for p in d["parameters"]]
    lines = _table(("name", "dtype", "shape", "bytes", "pieces"), rows, right={3, 4})
    lines.append(f"{d['total_parameters']} parameters, {d['total_bytes']:,} bytes of tensors, "
                 f"{d['file_bytes']:,} bytes on disk" + (", CRC verified" if d["crc_verified"] else ""))
    return "\n".join(lines)


def _h5_table(d: dict[str, Any]) -> str:
    rows = [(p["name"], p["dtype"], _shape(p["shape"]), f"{p['bytes']:,}") for p in d["parameters"]]
    lines = _table(("name", "dtype", "shape", "bytes"), rows, right={3})
    lines.append(f"{d['total_parameters']} datasets, {d['total_bytes']:,} bytes of tensors, "
                 f"{d['file_bytes']:,} bytes on disk" + (", CRC verified" if d["crc_verified"] else ""))
    lines.extend(f"attribute {key}: {_clipped(value)}" for key, value in d["attributes"].items())
    return "\n".join(lines)


def _clipped(text: str, limit: int = 200) -> str:
    """One line of at most ``limit`` characters (long JSON attributes are cut: see ``--json``)."""
    text = text.replace("\n", " ")
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _strategy_table(d: dict[str, Any]) -> str:
    rows = [
        (
            p["name"],
            "" if p["stage"] is None else str(p["stage"]),
            _shape(p["dev_matrix"]),
            json.dumps(p["tensor_map"], separators=(",", ":")),
            f"{p['opt_weight_shard_size']}/{p['opt_weight_shard_step']}",
            _shape(p["shards_per_dim"]),
            _shape(p["slice_shape"]) if p["slice_shape"] is not None else "-",
        )
        for p in d["parameters"]
    ]
    header = ("name", "stage", "dev_matrix", "tensor_map", "opt size/step", "shards/dim", "slice")
    lines = _table(header, rows, right=set())
    lines.append(f"{d['total_parameters']} layouts, {d['stage_count']} pipeline stage(s)")
    return "\n".join(lines)


def _shape(values: list[int]) -> str:
    return json.dumps(values, separators=(",", ":"))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), *map(line, rows)]
