"""Strategy files (protobuf or JSON) as frozen dataclasses; MindSpore's pipeline merge.

Follows MindSpore 2.10 (`mindspore/parallel/_parallel_serialization.py`): a file whose name ends in
".json" is JSON, any other is a protobuf `ParallelStrategyMap`. A layout name containing "-" is
"<stage>-<param>" (how a merged pipeline strategy names them); a name without "-" has no stage.

JSON form (as MindSpore writes it, plus two lossless extensions so every protobuf file round-trips):
`{"current_stage": n, "parallel_strategy_item": {node: {"stage": s, "parallel_strategy": [[..], ..]}},
"parallel_layout_item": {param: {"dev_matrix": [..], "tensor_map": [..], "field": f,
"opt_weight_shard_step": s, "opt_weight_shard_size": z, ...}}}`. A repeated-message field
(`tensor_map`, `param_split_shape`, `indices_offset`) is a flat list when it holds one message, a
list of lists when it holds several (a nested Layout-API tensor map), and absent when it holds none.
Keys MindSpore's converter does not read may be absent: "current_stage" (0) and "parallel_strategy" ([]).
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from google.protobuf.message import DecodeError

from ._proto import node_strategy_pb2 as _pb
from .errors import DestinationError, SourceMissingError, StrategyFormatError

PROTOBUF = "protobuf"
JSON = "json"

_U32 = (0, 2**32 - 1)
_I32 = (-(2**31), 2**31 - 1)
_I64 = (-(2**63), 2**63 - 1)
_REPEATED_MESSAGES = ("tensor_map", "param_split_shape", "indices_offset")
_SCALARS = ("field", "opt_weight_shard_step", "opt_weight_shard_size")


@dataclass(frozen=True)
class LayoutItem:
    """One `parallel_layout_item`: how one parameter is sliced over the devices of one stage."""

    name: str  # as stored; in a merged pipeline strategy "<stage>-<param>"
    dev_matrix: tuple[int, ...]
    # TensorMap messages as stored: one message = plain map (one entry per tensor dim);
    # several messages = nested (Layout API), one message per tensor dim listing its axes.
    tensor_map: tuple[tuple[int, ...], ...]
    param_split_shape: tuple[tuple[int, ...], ...] = ()
    indices_offset: tuple[tuple[int, ...], ...] = ()
    field: int = 0
    opt_weight_shard_step: int = 0
    opt_weight_shard_size: int = 0
    # JSON-only extras written by newer MindSpore (None when absent)
    tensor_shape: tuple[int, ...] | None = None
    tensor_type: str | None = None

    @property
    def device_count(self) -> int:
        """Devices of one pipeline stage: the product of the device matrix."""
        return math.prod(self.dev_matrix)

    def dim_axes(self) -> tuple[tuple[int, ...], ...]:
        """Per tensor dimension, the device axes (numbered from the right) splitting it, outermost first.

        `()` marks an unsplit dimension. As in MindSpore, a nested map skips empty TensorMap messages
        and ignores -1 entries inside a dimension's axis list.
        """
        if len(self.tensor_map) == 1:
            return tuple(() if axis == -1 else (axis,) for axis in self.tensor_map[0])
        return tuple(tuple(axis for axis in axes if axis != -1) for axes in self.tensor_map if axes)


@dataclass(frozen=True)
class StrategyItem:
    """One `parallel_strategy_item`: an operator's input strategies and its pipeline stage."""

    node_name: str
    stage: int
    parallel_strategy: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Strategy:
    """A whole strategy file."""

    current_stage: int
    strategy_items: tuple[StrategyItem, ...] = ()
    layout_items: tuple[LayoutItem, ...] = ()
    path: str = field(default="", compare=False)

    @property
    def stage(self) -> int:
        """Pipeline stage of an unmerged per-stage file: that of its first `parallel_strategy_item`."""
        if not self.strategy_items:
            raise StrategyFormatError(f"{_where(self)}: no parallel_strategy_item, so its pipeline stage is unknown")
        return self.strategy_items[0].stage

    def layouts_by_param(self) -> dict[str, list[tuple[int | None, LayoutItem]]]:
        """Parameter name (stage prefix removed) -> [(stage, layout)], once per stage, in file order.

        A name repeated within one stage keeps its last layout, as MindSpore's dict does.
        """
        result: dict[str, list[tuple[int | None, LayoutItem]]] = {}
        for layout in self.layout_items:
            stage, name = _split_stage_prefix(layout.name, _where(self))
            entries = result.setdefault(name, [])
            same_stage = [i for i, (s, _) in enumerate(entries) if s == stage]
            if same_stage:
                entries[same_stage[0]] = (stage, layout)
            else:
                entries.append((stage, layout))
        return result

    @property
    def stage_count(self) -> int:
        """Number of pipeline stages with layouts (unprefixed names count as stage 0); they must be 0..n-1."""
        stages = {stage or 0 for entries in self.layouts_by_param().values() for stage, _ in entries}
        if stages != set(range(len(stages))):
            raise StrategyFormatError(
                f"{_where(self)}: layouts of pipeline stages {sorted(stages)} do not cover every stage "
                f"0..{len(stages) - 1}; merge the strategy files of all stages"
            )
        return len(stages)

    @property
    def is_pipelined(self) -> bool:
        """True for a merged pipeline strategy holding more than one stage."""
        return self.stage_count > 1

    @property
    def stage_device_count(self) -> int:
        """Devices per pipeline stage, as MindSpore takes it: from the first parameter's (lowest-stage) layout."""
        by_param = self.layouts_by_param()
        if not by_param:
            raise StrategyFormatError(f"{_where(self)}: no parallel_layout_item, so the device count is unknown")
        name, entries = next(iter(by_param.items()))
        _, layout = min(entries, key=lambda entry: entry[0] or 0)
        if not layout.dev_matrix:
            raise StrategyFormatError(
                f"{_where(self)}: parameter {name!r} has an empty dev_matrix (pipeline parallelism only), "
                "so the devices per stage are unknown"
            )
        return layout.device_count


def split_stage_prefix(name: str) -> tuple[int | None, str]:
    """`"1-layer.w"` -> `(1, "layer.w")`; `"layer.w"` -> `(None, "layer.w")` (MindSpore's convention)."""
    return _split_stage_prefix(name, "strategy")


def load_strategy(path: str | os.PathLike[str]) -> Strategy:
    """Read a strategy file: JSON when the name ends in ".json", else protobuf."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except FileNotFoundError as exc:
        raise SourceMissingError(f"{path}: strategy file not found") from exc
    except OSError as exc:
        raise StrategyFormatError(f"{path}: cannot read the strategy file: {exc}") from exc
    return parse_strategy_bytes(data, path)


def parse_strategy_bytes(data: bytes, path_for_messages: str) -> Strategy:
    """Parse the content of a strategy file; the name picks the format and appears in error messages."""
    path = path_for_messages
    if not data:
        raise StrategyFormatError(f"{path}: the strategy file is empty")
    strategy = _from_json(data, path) if path.endswith(".json") else _from_protobuf(data, path)
    _check_strategy(strategy, path)
    return strategy


def strategy_to_bytes(strategy: Strategy, fmt: str) -> bytes:
    """Serialize as "protobuf" (byte-identical to MindSpore's for the same content) or "json".

    Protobuf has no place for `tensor_shape`/`tensor_type`; JSON cannot hold two items of one name.
    """
    _check_strategy(strategy, _where(strategy))
    if fmt == PROTOBUF:
        return _to_protobuf(strategy)
    if fmt == JSON:
        return _to_json(strategy)
    raise StrategyFormatError(f"{_where(strategy)}: unknown strategy format {fmt!r} (use {PROTOBUF!r} or {JSON!r})")


def save_strategy(strategy: Strategy, path: str | os.PathLike[str], *, sync: bool = True) -> None:
    """Write a strategy file (JSON when the name ends in ".json", else protobuf) atomically."""
    from .atomic import write_bytes_atomic

    path = os.fspath(path)
    data = strategy_to_bytes(strategy, JSON if path.endswith(".json") else PROTOBUF)
    write_bytes_atomic(path, data, sync=sync)


def merge_strategies(strategies: Sequence[Strategy]) -> Strategy:
    """Merge per-stage strategies with MindSpore's rules, ordered by stage (pure).

    Each input's stage is that of its first strategy item; the first input of each stage is kept and
    later ones of the same stage are skipped; layout names become "<stage>-<name>"; current_stage = 1.
    """
    by_stage: dict[int, Strategy] = {}
    for strategy in strategies:
        if not strategy.strategy_items or not strategy.layout_items:
            raise StrategyFormatError(
                f"{_where(strategy)}: cannot merge a strategy without parallel_strategy_item or parallel_layout_item"
            )
        _check_same_layouts(by_stage.setdefault(strategy.stage, strategy), strategy)
    kept = [(stage, by_stage[stage]) for stage in sorted(by_stage)]
    return Strategy(
        current_stage=1,
        strategy_items=tuple(item for _, strategy in kept for item in strategy.strategy_items),
        layout_items=tuple(
            replace(layout, name=f"{stage}-{layout.name}")
            for stage, strategy in kept
            for layout in strategy.layout_items
        ),
    )


def _check_same_layouts(kept: Strategy, other: Strategy) -> None:
    """Two files of one pipeline stage must lay out the same parameters alike: MindSpore keeps whichever its
    folder listing gives first, so files that differ (a stale file of another run) make the merge arbitrary."""
    mine, theirs = ({layout.name: layout for layout in s.layout_items} for s in (kept, other))
    for name in [*mine, *(n for n in theirs if n not in mine)]:
        if mine.get(name) != theirs.get(name):
            raise StrategyFormatError(
                f"{_where(kept)} and {_where(other)} are strategy files of pipeline stage {kept.stage} but lay out "
                f"parameter {name!r} differently: {_describe_layout(mine.get(name))} in {_where(kept)}, "
                f"{_describe_layout(theirs.get(name))} in {_where(other)}: are they from one run? Keep the "
                f"strategy files of the run that saved the checkpoint only")


def _describe_layout(layout: LayoutItem | None) -> str:
    if layout is None:
        return "none"
    parts = [f"dev_matrix={list(layout.dev_matrix)}", f"tensor_map={[list(m) for m in layout.tensor_map]}"]
    parts += [f"{key}={[list(m) for m in getattr(layout, key)]}" for key in _REPEATED_MESSAGES[1:]
              if any(getattr(layout, key))]
    parts += [f"{key}={getattr(layout, key)}" for key in (*_SCALARS, "tensor_shape", "tensor_type")
              if getattr(layout, key)]
    return ", ".join(parts)


def merge_strategy_folder(
    src_strategy_dirs: str | os.PathLike[str], exclude: str | os.PathLike[str] | None = None
) -> Strategy:
    """Read a folder of per-stage strategy files (all `*.ckpt` or all `*.json`) and merge them.

    Unlike MindSpore the result does not depend on the order in which the file system lists the
    folder (stages ascending; within a stage the lowest-numbered file wins); byte-identical files are
    read once; `exclude` (a previous merge output inside the folder) is not taken as a source.
    """
    folder = os.fspath(src_strategy_dirs)
    if not os.path.isdir(folder):
        raise SourceMissingError(f"{folder}: src_strategy_dirs is not a directory")
    skip = os.fspath(exclude) if exclude is not None else ""
    protobuf_files = _listed(folder, "*.ckpt", skip)
    json_files = _listed(folder, "*.json", skip)
    if protobuf_files and json_files:
        raise StrategyFormatError(f"{folder}: strategy files must be all '.ckpt' or all '.json', not both")
    files = protobuf_files or json_files
    if not files:
        raise SourceMissingError(f"{folder}: no strategy files (*.ckpt or *.json)")
    seen: set[bytes] = set()
    strategies = []
    for path in files:
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as exc:
            raise StrategyFormatError(f"{path}: cannot read the strategy file: {exc}") from exc
        if data not in seen:
            seen.add(data)
            strategies.append(parse_strategy_bytes(data, path))
    return merge_strategies(strategies)


def merge_pipeline_strategys(
    src_strategy_dirs: str | os.PathLike[str], dst_strategy_file: str | os.PathLike[str]
) -> None:
    """Merge the per-stage strategy files of a folder into one file (MindSpore's name, arguments and
    rules; see `merge_strategy_folder` for where the result is more reproducible). The output format
    follows `dst_strategy_file`'s extension."""
    dst = os.fspath(dst_strategy_file)
    merged = merge_strategy_folder(src_strategy_dirs, exclude=dst)
    parent = os.path.dirname(os.path.abspath(dst))
    try:
        os.makedirs(parent, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise DestinationError(f"{dst}: cannot create its folder: {exc}") from exc
    save_strategy(merged, dst)


def describe_strategy(strategy: Strategy) -> list[dict[str, Any]]:
    """Per layout item, in file order: name (stage prefix removed), stage, dev_matrix, tensor_map, optimizer shard."""
    rows = []
    for layout in strategy.layout_items:
        stage, name = _split_stage_prefix(layout.name, _where(strategy))
        rows.append(
            {
                "name": name,
                "stage": stage,
                "dev_matrix": list(layout.dev_matrix),
                "tensor_map": _messages_to_json(layout.tensor_map),
                "opt_weight_shard_size": layout.opt_weight_shard_size,
                "opt_weight_shard_step": layout.opt_weight_shard_step,
            }
        )
    return rows


# --- naming -------------------------------------------------------------------------------------


def _where(strategy: Strategy) -> str:
    return strategy.path or "strategy"


def _split_stage_prefix(name: str, where: str) -> tuple[int | None, str]:
    if "-" not in name:
        return None, name
    head, _, rest = name.partition("-")
    if not (head.isascii() and head.isdigit()) or "-" in rest:
        raise StrategyFormatError(
            f"{where}: parameter {name!r}: a name containing '-' must be '<stage>-<name>' with one '-' "
            "(MindSpore's pipeline naming)"
        )
    return int(head), rest


def _listed(folder: str, pattern: str, exclude: str) -> list[str]:
    """Files of `folder` matching `pattern`, in natural name order (rank 2 before rank 10)."""
    excluded = os.path.realpath(exclude)
    paths = [
        p
        for p in glob.glob(os.path.join(glob.escape(folder), pattern))
        if os.path.isfile(p) and os.path.realpath(p) != excluded
    ]
    return sorted(paths, key=_natural_key)


def _natural_key(path: str) -> list[int | str]:
    """"src_strategy_10.ckpt" -> ["src_strategy_", 10, ".ckpt"]: digit runs (odd positions) compare as numbers."""
    return [int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", os.path.basename(path)))]


# --- validation ---------------------------------------------------------------------------------


def _check_strategy(strategy: Strategy, path: str) -> None:
    """Raise StrategyFormatError unless every value fits its protobuf type and every layout is well formed."""
    _check_int(strategy.current_stage, f"{path}: current_stage", _U32)
    for item in strategy.strategy_items:
        where = f"{path}: node {item.node_name!r}"
        _check_int(item.stage, f"{where}: stage", _U32)
        for dims in item.parallel_strategy:
            for value in dims:
                _check_int(value, f"{where}: parallel_strategy", _U32)
    for layout in strategy.layout_items:
        _check_layout(layout, f"{path}: parameter {layout.name!r}")


def _check_layout(layout: LayoutItem, where: str) -> None:
    for value in layout.dev_matrix:
        _check_int(value, f"{where}: dev_matrix", _U32)
    for key, bounds in zip(_REPEATED_MESSAGES, (_I32, _I64, _I64)):
        for message in getattr(layout, key):
            for value in message:
                _check_int(value, f"{where}: {key}", bounds)
    for key in _SCALARS:
        _check_int(getattr(layout, key), f"{where}: {key}", _I32)
    for value in layout.tensor_shape or ():
        _check_int(value, f"{where}: tensor_shape", _I64)
    if layout.tensor_type is not None and not isinstance(layout.tensor_type, str):
        raise StrategyFormatError(f"{where}: tensor_type: expected a string, got {layout.tensor_type!r:.80}")
    if not layout.tensor_map:
        raise StrategyFormatError(f"{where}: no tensor_map")
    if 0 in layout.dev_matrix:
        raise StrategyFormatError(f"{where}: dev_matrix {list(layout.dev_matrix)} has a zero entry")
    axes = len(layout.dev_matrix)
    for message in layout.tensor_map:
        for axis in message:
            if not -1 <= axis < axes:
                raise StrategyFormatError(
                    f"{where}: tensor_map names device axis {axis}, but dev_matrix {list(layout.dev_matrix)} "
                    f"has axes 0..{axes - 1} (or -1 for none)"
                )


def _check_int(value: Any, where: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StrategyFormatError(f"{where}: expected an integer, got {value!r:.80}")
    low, high = bounds
    if not low <= value <= high:
        raise StrategyFormatError(f"{where}: {value} is outside [{low}, {high}]")
    return value


# --- protobuf -----------------------------------------------------------------------------------


def _from_protobuf(data: bytes, path: str) -> Strategy:
    message = _pb.ParallelStrategyMap()  # type: ignore[attr-defined]  # generated at import time
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise StrategyFormatError(f"{path}: not a protobuf strategy file (ParallelStrategyMap): {exc}") from exc
    missing = message.FindInitializationErrors()
    if missing:
        raise StrategyFormatError(f"{path}: {_describe_missing(message, missing[0])}")
    return Strategy(
        current_stage=message.current_stage,
        strategy_items=tuple(
            StrategyItem(
                node_name=item.node_name,
                stage=item.parallel_strategys.stage,
                parallel_strategy=tuple(tuple(s.dim) for s in item.parallel_strategys.parallel_strategy),
            )
            for item in message.parallel_strategy_item
        ),
        layout_items=tuple(_layout_from_message(item, path) for item in message.parallel_layout_item),
        path=path,
    )


def _describe_missing(message: Any, missing: str) -> str:
    """Name the item (parameter or node) whose required field `missing` (e.g. "parallel_layout_item[3].x") lacks."""
    found = re.fullmatch(r"(parallel_layout_item|parallel_strategy_item)\[(\d+)\]\.(.+)", missing)
    if found is None:
        return f"missing required field {missing}"
    kind, index, rest = found.group(1), int(found.group(2)), found.group(3)
    if kind == "parallel_layout_item":
        return f"parameter {message.parallel_layout_item[index].param_name!r}: missing required field {rest}"
    return f"node {message.parallel_strategy_item[index].node_name!r}: missing required field {rest}"


def _layout_from_message(item: Any, path: str) -> LayoutItem:
    layouts = item.parallel_layouts
    if len(layouts.dev_matrix) != 1:
        raise StrategyFormatError(
            f"{path}: parameter {item.param_name!r}: expected one dev_matrix, found {len(layouts.dev_matrix)}"
        )
    return LayoutItem(
        name=item.param_name,
        dev_matrix=tuple(layouts.dev_matrix[0].dim),
        tensor_map=tuple(tuple(m.dim) for m in layouts.tensor_map),
        param_split_shape=tuple(tuple(m.dim) for m in layouts.param_split_shape),
        indices_offset=tuple(tuple(m.dim) for m in layouts.indices_offset),
        field=layouts.field,
        opt_weight_shard_step=layouts.opt_weight_shard_step,
        opt_weight_shard_size=layouts.opt_weight_shard_size,
    )


def _to_protobuf(strategy: Strategy) -> bytes:
    message = _pb.ParallelStrategyMap(current_stage=strategy.current_stage)  # type: ignore[attr-defined]
    for item in strategy.strategy_items:
        entry = message.parallel_strategy_item.add(node_name=item.node_name)
        entry.parallel_strategys.stage = item.stage
        for dims in item.parallel_strategy:
            entry.parallel_strategys.parallel_strategy.add(dim=dims)
    for layout in strategy.layout_items:
        layouts = message.parallel_layout_item.add(param_name=layout.name).parallel_layouts
        layouts.dev_matrix.add(dim=layout.dev_matrix)
        for key in _REPEATED_MESSAGES:
            for dims in getattr(layout, key):
                getattr(layouts, key).add(dim=dims)
        for key in _SCALARS:
            setattr(layouts, key, getattr(layout, key))
    return message.SerializeToString()


# --- JSON ---------------------------------------------------------------------------------------


def _from_json(data: bytes, path: str) -> Strategy:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StrategyFormatError(f"{path}: not a JSON strategy file: {exc}") from exc
    if not isinstance(document, dict):
        raise StrategyFormatError(f"{path}: expected a JSON object, got {type(document).__name__}")
    return Strategy(
        current_stage=_check_int(document.get("current_stage", 0), f"{path}: current_stage", _U32),
        strategy_items=tuple(
            _strategy_item_from_json(node, entry, f"{path}: node {node!r}")
            for node, entry in _json_object(document, "parallel_strategy_item", path).items()
        ),
        layout_items=tuple(
            _layout_from_json(name, entry, f"{path}: parameter {name!r}")
            for name, entry in _json_object(document, "parallel_layout_item", path).items()
        ),
        path=path,
    )


def _json_object(document: dict[str, Any], key: str, path: str) -> dict[str, Any]:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise StrategyFormatError(f"{path}: {key}: expected an object, got {value!r:.80}")
    return value


def _required(entry: Any, key: str, where: str) -> Any:
    if not isinstance(entry, dict):
        raise StrategyFormatError(f"{where}: expected an object, got {entry!r:.80}")
    if key not in entry:
        raise StrategyFormatError(f"{where}: missing key {key!r}")
    return entry[key]


def _strategy_item_from_json(node: str, entry: Any, where: str) -> StrategyItem:
    stage = _required(entry, "stage", where)
    dims = entry.get("parallel_strategy", [])
    if not isinstance(dims, list):
        raise StrategyFormatError(f"{where}: parallel_strategy: expected a list of lists, got {dims!r:.80}")
    return StrategyItem(
        node_name=node,
        stage=_check_int(stage, f"{where}: stage", _U32),
        parallel_strategy=tuple(_json_ints(d, f"{where}: parallel_strategy") for d in dims),
    )


def _layout_from_json(name: str, entry: Any, where: str) -> LayoutItem:
    required = {key: _required(entry, key, where) for key in ("dev_matrix", "tensor_map", *_SCALARS)}
    optional = {key: entry[key] for key in ("param_split_shape", "indices_offset") if key in entry}
    tensor_shape, tensor_type = entry.get("tensor_shape"), entry.get("tensor_type")
    if tensor_type is not None and not isinstance(tensor_type, str):
        raise StrategyFormatError(f"{where}: tensor_type: expected a string, got {tensor_type!r:.80}")
    return LayoutItem(
        name=name,
        dev_matrix=_json_ints(required["dev_matrix"], f"{where}: dev_matrix"),
        tensor_map=_json_messages(required["tensor_map"], f"{where}: tensor_map"),
        param_split_shape=_json_messages(optional.get("param_split_shape"), f"{where}: param_split_shape"),
        indices_offset=_json_messages(optional.get("indices_offset"), f"{where}: indices_offset"),
        field=_check_int(required["field"], f"{where}: field", _I32),
        opt_weight_shard_step=_check_int(required["opt_weight_shard_step"], f"{where}: opt_weight_shard_step", _I32),
        opt_weight_shard_size=_check_int(required["opt_weight_shard_size"], f"{where}: opt_weight_shard_size", _I32),
        tensor_shape=None if tensor_shape is None else _json_ints(tensor_shape, f"{where}: tensor_shape"),
        tensor_type=tensor_type,
    )


def _json_ints(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise StrategyFormatError(f"{where}: expected a list of integers, got {value!r:.80}")
    return tuple(_check_int(v, where, _I64) for v in value)


def _json_messages(value: Any, where: str) -> tuple[tuple[int, ...], ...]:
    """None (key absent) -> no message; a flat list -> one; a list holding lists -> one per entry (`i` = `[i]`)."""
    if value is None:
        return ()
    if isinstance(value, list) and any(isinstance(v, list) for v in value):
        return tuple(_json_ints(v if isinstance(v, list) else [v], where) for v in value)
    return (_json_ints(value, where),)


def _messages_to_json(messages: tuple[tuple[int, ...], ...]) -> list[int] | list[list[int]]:
    return list(messages[0]) if len(messages) == 1 else [list(m) for m in messages]


def _to_json(strategy: Strategy) -> bytes:
    where = _where(strategy)
    for kind, names in (
        ("node", [item.node_name for item in strategy.strategy_items]),
        ("parameter", [layout.name for layout in strategy.layout_items]),
    ):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise StrategyFormatError(f"{where}: JSON cannot hold {kind} {duplicates[0]!r} twice; save as protobuf")
    document = {
        "current_stage": strategy.current_stage,
        "parallel_strategy_item": {
            item.node_name: {"stage": item.stage, "parallel_strategy": [list(d) for d in item.parallel_strategy]}
            for item in strategy.strategy_items
        },
        "parallel_layout_item": {layout.name: _layout_to_json(layout) for layout in strategy.layout_items},
    }
    return _json_text(document).encode("utf-8")


def _json_text(document: dict[str, Any]) -> str:
    """JSON with one line per strategy item and per layout item (diffable, yet compact)."""
    parts = []
    for key, value in document.items():
        if isinstance(value, dict) and value:
            rows = ",\n".join(f"    {json.dumps(name)}: {json.dumps(entry)}" for name, entry in value.items())
            parts.append(f"  {json.dumps(key)}: {{\n{rows}\n  }}")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _layout_to_json(layout: LayoutItem) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "dev_matrix": list(layout.dev_matrix),
        "tensor_map": _messages_to_json(layout.tensor_map),
    }
    if layout.tensor_shape is not None:
        entry["tensor_shape"] = list(layout.tensor_shape)
    if layout.tensor_type is not None:
        entry["tensor_type"] = layout.tensor_type
    entry.update({key: getattr(layout, key) for key in _SCALARS})
    for key in ("param_split_shape", "indices_offset"):
        if getattr(layout, key):
            entry[key] = _messages_to_json(getattr(layout, key))
    return entry
