"""Layout geometry (pure, no I/O): which hyper-box of a full tensor each rank holds.

Rules (FORMATS.md "Layout rules"): a rank's coordinates are its row-major digits in the device
matrix, axis `i` being entry `len - 1 - i`; a tensor dimension split over axes `(a, b, ...)` is cut
into `size(a) * size(b) * ...` equal chunks, the first axis outermost. With optimizer sharding a
rank's model-parallel slice is further cut along dimension 0 into `n` pieces, the rank holding piece
`pos % n`, where `pos` numbers the rank among its replicas (ranks differing only on unused axes of
size > 1, outermost axis first). In a merged pipeline strategy rank `r` is in stage
`r // stage_device_num` and uses that stage's layouts.

Everything is index arithmetic on chunk numbers, so the overlap pattern of two layouts does not
depend on the tensor's size; shapes only turn chunk numbers into coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from .errors import LayoutError, StrategyFormatError
from .strategy import LayoutItem, Strategy


@dataclass(frozen=True)
class Box:
    """A half-open hyper-box `[start, stop)` in full-tensor coordinates (or relative to a slice)."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    @classmethod
    def full(cls, shape: Sequence[int]) -> Box:
        """The box of a whole tensor of this shape."""
        return cls((0,) * len(shape), tuple(shape))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def intersect(self, other: Box) -> Box | None:
        """The common part of two boxes, or None when they share no element."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        stop = tuple(min(a, b) for a, b in zip(self.stop, other.stop))
        if any(a >= b for a, b in zip(start, stop)):
            return None
        return Box(start, stop)

    def relative_to(self, outer: Box) -> Box:
        """This box in the coordinates of `outer` (which must contain it)."""
        return Box(
            tuple(a - o for a, o in zip(self.start, outer.start)),
            tuple(b - o for b, o in zip(self.stop, outer.start)),
        )

    def __str__(self) -> str:
        return "[" + ", ".join(f"{a}:{b}" for a, b in zip(self.start, self.stop)) + "]"

    def to_dict(self) -> dict[str, list[int]]:
        return {"start": list(self.start), "stop": list(self.stop)}


def _ravel(digits: Sequence[int], sizes: Sequence[int]) -> int:
    """Row-major index of `digits` in a grid of `sizes` (first digit outermost)."""
    index = 0
    for digit, size in zip(digits, sizes):
        index = index * size + digit
    return index


@dataclass(frozen=True)
class ParamLayout:
    """One parameter's layout in one pipeline stage, resolved; ranks here are local to the stage."""

    dev_matrix: tuple[int, ...]
    dim_axes: tuple[tuple[int, ...], ...]  # per tensor dimension, the device axes splitting it, outermost first
    opt_size: int = 0  # opt_weight_shard_size as stored (-1 = all replicas)
    opt_step: int = 0
    split_shape: tuple[int, ...] = ()  # param_split_shape (must describe an even split)

    @classmethod
    def from_item(cls, item: LayoutItem, name: str = "") -> ParamLayout:
        """Resolve one strategy layout item; LayoutError if the layout is impossible whatever the shape."""
        split = tuple(d for message in item.param_split_shape for d in message)
        layout = cls(tuple(item.dev_matrix), item.dim_axes(), item.opt_weight_shard_size,
                     item.opt_weight_shard_step, split)
        layout._validate(name or item.name)
        return layout

    @classmethod
    def unsharded(cls, ndim: int) -> ParamLayout:
        """A whole tensor on one device."""
        return cls((1,), ((),) * ndim)

    def describe(self) -> str:
        text = f"dev_matrix={list(self.dev_matrix)}, tensor_map={[list(a) for a in self.dim_axes]}"
        if self.opt_size and self.opt_step:
            text += f", opt_weight_shard_size={self.opt_size}, opt_weight_shard_step={self.opt_step}"
        if self.split_shape:
            text += f", param_split_shape={list(self.split_shape)}"
        return text

    # --- derived geometry -----------------------------------------------------------------------

    @property
    def ndim(self) -> int:
        return len(self.dim_axes)

    @property
    def device_num(self) -> int:
        return math.prod(self.dev_matrix)

    def axis_size(self, axis: int) -> int:
        return self.dev_matrix[len(self.dev_matrix) - 1 - axis]

    @cached_property
    def replica_axes(self) -> tuple[int, ...]:
        """Axes of size > 1 that split no dimension, outermost first."""
        used = {a for axes in self.dim_axes for a in axes}
        return tuple(a for a in reversed(range(len(self.dev_matrix))) if a not in used and self.axis_size(a) > 1)

    @cached_property
    def replica_count(self) -> int:
        return math.prod(self.axis_size(a) for a in self.replica_axes)

    @cached_property
    def opt_pieces(self) -> int:
        """Number of optimizer-sharding pieces of dimension 0 (1 without optimizer sharding)."""
        return self._opt_count if self.opt_size and self.opt_step else 1

    @cached_property
    def _opt_count(self) -> int:
        """The pieces `opt_weight_shard_size` asks for, whatever the step (0 without optimizer sharding)."""
        return self.replica_count if self.opt_size == -1 else self.opt_size

    def _group_step(self) -> int | None:
        """The rank distance MindSpore stores as `opt_weight_shard_step` when every optimizer group lies along
        the innermost replica axis (that axis's stride); None when groups span several axes."""
        innermost = self.replica_axes[-1]
        if self.axis_size(innermost) % self.opt_pieces:
            return None
        return math.prod(self.dev_matrix[len(self.dev_matrix) - innermost:])

    @cached_property
    def model_shards(self) -> tuple[int, ...]:
        """Per dimension, the number of model-parallel chunks."""
        return tuple(math.prod(self.axis_size(a) for a in axes) for axes in self.dim_axes)

    @cached_property
    def pieces(self) -> tuple[int, ...]:
        """Per dimension, the number of equal pieces a rank's slice is one of (optimizer pieces on dim 0)."""
        shards = list(self.model_shards)
        if shards:
            shards[0] *= self.opt_pieces
        return tuple(shards)

    @property
    def copies(self) -> int:
        """How many ranks hold each distinct slice."""
        return self.replica_count // self.opt_pieces

    def coordinate(self, rank: int, axis: int) -> int:
        stride = math.prod(self.dev_matrix[len(self.dev_matrix) - axis:])
        return (rank // stride) % self.axis_size(axis)

    def chunk(self, rank: int) -> tuple[int, ...]:
        """Per dimension, the index of the piece a (stage-local) rank holds."""
        index = [
            _ravel([self.coordinate(rank, a) for a in axes], [self.axis_size(a) for a in axes])
            for axes in self.dim_axes
        ]
        if index and self.opt_pieces > 1:
            index[0] = index[0] * self.opt_pieces + self.replica_position(rank) % self.opt_pieces
        return tuple(index)

    def replica_position(self, rank: int) -> int:
        """`pos`: the rank's number among its replicas (row-major over the replica axes)."""
        axes = self.replica_axes
        return _ravel([self.coordinate(rank, a) for a in axes], [self.axis_size(a) for a in axes])

    def copy_index(self, rank: int) -> int:
        """Which of the `copies` identical holders of its slice this rank is."""
        return self.replica_position(rank) // self.opt_pieces

    def box_id(self, chunk: Sequence[int]) -> int:
        """Flat number of a slice (row-major over `pieces`)."""
        return _ravel(chunk, self.pieces)

    @cached_property
    def rank_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """For every local rank: (box id of its slice, its copy index), vectorised."""
        ranks = np.arange(self.device_num, dtype=np.int64)
        box = np.zeros_like(ranks)
        for d, axes in enumerate(self.dim_axes):
            chunk = np.zeros_like(ranks)
            for a in axes:
                chunk = chunk * self.axis_size(a) + self._coordinates(ranks, a)
            if d == 0 and self.opt_pieces > 1:
                chunk = chunk * self.opt_pieces + self._positions(ranks) % self.opt_pieces
            box = box * self.pieces[d] + chunk
        return box, self._positions(ranks) // self.opt_pieces

    def _coordinates(self, ranks: np.ndarray, axis: int) -> np.ndarray:
        stride = math.prod(self.dev_matrix[len(self.dev_matrix) - axis:])
        return (ranks // stride) % self.axis_size(axis)

    def _positions(self, ranks: np.ndarray) -> np.ndarray:
        pos = np.zeros_like(ranks)
        for a in self.replica_axes:
            pos = pos * self.axis_size(a) + self._coordinates(ranks, a)
        return pos

    # --- shapes ---------------------------------------------------------------------------------

    def check(self, name: str, shape: Sequence[int]) -> None:
        """LayoutError unless this layout splits a tensor of `shape` evenly."""
        if len(shape) != self.ndim:
            raise self.error(name, shape, f"the tensor map has {self.ndim} dimensions, the tensor {len(shape)}")
        for d, (length, count) in enumerate(zip(shape, self.pieces)):
            if length % count:
                what = f"{count} shard(s)"
                if d == 0 and self.opt_pieces > 1:
                    what = f"{self.model_shards[0]} shard(s) x {self.opt_pieces} optimizer pieces"
                raise self.error(name, shape, f"dimension {d} ({length}) does not divide into {what}")
        if self.split_shape and (len(self.split_shape) != self.model_shards[0] or sum(self.split_shape) != shape[0]):
            raise self.error(name, shape, f"param_split_shape {list(self.split_shape)} is not an even split "
                                          f"of dimension 0 into {self.model_shards[0]} shards")

    def box(self, shape: Sequence[int], rank: int) -> Box:
        """The box of the full tensor a (stage-local) rank holds; `shape` must have passed `check`."""
        chunk = self.chunk(rank)
        step = [length // count for length, count in zip(shape, self.pieces)]
        return Box(tuple(i * s for i, s in zip(chunk, step)), tuple((i + 1) * s for i, s in zip(chunk, step)))

    def full_shape(self, name: str, slice_dims: Sequence[int]) -> tuple[int, ...]:
        """The full tensor shape from the dims one rank stores."""
        if len(slice_dims) != self.ndim:
            raise self.error(name, slice_dims, f"a stored slice has {len(slice_dims)} dimensions, "
                                               f"the tensor map {self.ndim}", what="slice dims")
        return tuple(d * count for d, count in zip(slice_dims, self.pieces))

    def error(self, name: str, shape: Sequence[int], problem: str, what: str = "shape") -> LayoutError:
        return LayoutError(f"parameter {name!r}: {problem} (layout {self.describe()}, {what} {list(shape)})")

    def _validate(self, name: str) -> None:
        def fail(problem: str) -> LayoutError:
            return LayoutError(f"parameter {name!r}: {problem} (layout {self.describe()})")

        if not self.dev_matrix or any(d < 1 for d in self.dev_matrix):
            raise fail("the device matrix must be non-empty with positive entries")
        used = [a for axes in self.dim_axes for a in axes]
        if any(not 0 <= a < len(self.dev_matrix) for a in used):
            raise fail(f"the tensor map names a device axis outside 0..{len(self.dev_matrix) - 1}")
        if len(set(used)) != len(used):
            raise fail("the tensor map uses one device axis for several dimensions")
        if self.opt_size and not self.opt_step and self._opt_count > 1:
            raise fail(f"opt_weight_shard_size {self.opt_size} with opt_weight_shard_step 0: MindSpore writes both "
                       "or neither, so whether the stored slices are optimizer pieces is unknown")
        if self.opt_size and self.opt_step:
            self._validate_optimizer_shard(fail)
        if self.split_shape and len(set(self.split_shape)) > 1:
            raise fail(f"param_split_shape {list(self.split_shape)} is an uneven split, which is not supported")

    def _validate_optimizer_shard(self, fail: Callable[[str], LayoutError]) -> None:
        if self.opt_size < -1:
            raise fail("opt_weight_shard_size must be -1 or positive")
        if self.replica_count % self.opt_pieces:
            raise fail(f"opt_weight_shard_size {self.opt_size} does not divide the replica count "
                       f"{self.replica_count}")
        if self.opt_pieces > 1 and not self.dim_axes:
            raise fail("optimizer sharding of a 0-d tensor")
        step = self._group_step() if self.opt_pieces > 1 else None
        if step is not None and self.opt_step != step:
            raise fail(f"opt_weight_shard_step {self.opt_step} is not {step}, the rank distance between the "
                       f"consecutive replicas that share out one copy: the optimizer groups are not those the "
                       f"layout implies")


class Layouts:
    """One strategy (or None: one unsharded device) resolved to per-parameter, per-stage layouts."""

    def __init__(
        self,
        params: Mapping[str, Mapping[int, ParamLayout]],
        stage_device_num: int,
        stages: tuple[int, ...],
        path: str = "",
    ) -> None:
        self._params = {name: dict(by_stage) for name, by_stage in params.items()}
        self.stage_device_num = stage_device_num
        self.stages = stages
        self.stage_count = max(stages) + 1
        self.device_count = self.stage_count * stage_device_num
        self.path = path

    @classmethod
    def from_strategy(cls, strategy: Strategy | None, stage: int | None = None) -> Layouts:
        """Resolve a strategy. `stage` marks an unmerged per-stage file whose ranks are
        `stage * devices + local` (the pipeline subnetwork transform)."""
        if strategy is None:
            return cls({}, 1, (0,))
        where = strategy.path or "strategy"
        by_param = strategy.layouts_by_param()
        if not by_param:
            raise StrategyFormatError(f"{where}: the strategy holds no parameter layouts")
        params: dict[str, dict[int, ParamLayout]] = {}
        device_num = 0
        for name, entries in by_param.items():
            for item_stage, item in entries:
                if stage is not None and item_stage is not None:
                    raise StrategyFormatError(
                        f"{where}: parameter {item.name!r} is a merged pipeline name, but the strategy was "
                        f"given as the unmerged file of stage {stage}")
                try:
                    layout = ParamLayout.from_item(item, name)
                except LayoutError as error:
                    raise LayoutError(f"{where}: {error}") from None
                device_num = device_num or layout.device_num
                if layout.device_num != device_num:
                    raise LayoutError(
                        f"{where}: parameter {name!r}: dev_matrix {list(layout.dev_matrix)} covers "
                        f"{layout.device_num} devices, other parameters {device_num} (devices per stage must agree)")
                params.setdefault(name, {})[stage if stage is not None else item_stage or 0] = layout
        stages = tuple(sorted({s for by_stage in params.values() for s in by_stage}))
        if stage is None and stages != tuple(range(len(stages))):
            raise StrategyFormatError(f"{where}: layouts of pipeline stages {list(stages)} do not cover every "
                                      f"stage 0..{max(stages)}; merge the strategy files of all stages")
        return cls(params, device_num, stages, where)

    @property
    def unsharded(self) -> bool:
        """True for a missing strategy: one device holding every whole tensor."""
        return not self._params

    @property
    def names(self) -> tuple[str, ...]:
        """Parameters with a layout (stage prefixes removed), in strategy order."""
        return tuple(self._params)

    def holds(self, param: str) -> bool:
        """Whether the strategy lays out `param` (a missing strategy holds everything, whole)."""
        return self.unsharded or param in self._params

    def stages_of(self, param: str) -> tuple[int, ...]:
        """The pipeline stages whose ranks hold `param`, ascending."""
        if self.unsharded:
            return self.stages
        return tuple(sorted(self._by_stage(param)))

    def layout(self, param: str, stage: int, ndim: int = 0) -> ParamLayout:
        """The layout of `param` in `stage` (a missing strategy: unsharded with `ndim` dimensions)."""
        if self.unsharded:
            return ParamLayout.unsharded(ndim)
        by_stage = self._by_stage(param)
        if stage not in by_stage:
            raise LayoutError(f"{self.path}: parameter {param!r} has no layout in pipeline stage {stage}")
        return by_stage[stage]

    def stage_of(self, rank: int) -> int:
        """The pipeline stage of a rank (LayoutError outside 0..device_count-1)."""
        if not 0 <= rank < self.device_count:
            raise LayoutError(f"{self.path or 'strategy None'}: rank {rank} is outside 0..{self.device_count - 1}")
        return rank // self.stage_device_num

    def slice_box(self, param: str, full_shape: Sequence[int], rank: int) -> Box | None:
        """The box of `param` that `rank` holds, or None if that rank's stage does not hold it."""
        stage = self.stage_of(rank)
        if self.unsharded:
            return Box.full(full_shape)
        by_stage = self._by_stage(param)
        if stage not in by_stage:
            return None
        layout = by_stage[stage]
        self.check(param, layout, full_shape)
        return layout.box(full_shape, rank % self.stage_device_num)

    def full_shape(self, param: str, slice_dims: Sequence[int], rank: int | None = None) -> tuple[int, ...]:
        """The full shape of `param` from the dims one rank stores (default: a rank of its lowest stage)."""
        if self.unsharded:
            return tuple(slice_dims)
        by_stage = self._by_stage(param)
        stage = min(by_stage) if rank is None else self.stage_of(rank)
        if stage not in by_stage:
            raise LayoutError(f"{self.path}: parameter {param!r} is not in pipeline stage {stage} (rank {rank})")
        try:
            return by_stage[stage].full_shape(param, slice_dims)
        except LayoutError as error:
            raise LayoutError(f"{self.path}: {error}") from None

    def check(self, param: str, layout: ParamLayout, shape: Sequence[int]) -> None:
        """LayoutError (naming this strategy) unless `layout` splits `shape` evenly."""
        try:
            layout.check(param, shape)
        except LayoutError as error:
            raise LayoutError(f"{self.path}: {error}" if self.path else str(error)) from None

    def _by_stage(self, param: str) -> dict[int, ParamLayout]:
        try:
            return self._params[param]
        except KeyError:
            raise LayoutError(f"{self.path}: parameter {param!r} is not in the strategy") from None
