"""The planner (pure, no I/O): for one target rank, which regions of which source slices make each
of its parameters.

What a target holds follows MindSpore 2.10's converter: the parameters laid out by both strategies
(a missing strategy lays out everything, whole) whose target pipeline stage is the target's;
parameters absent from the source strategy (global_step, learning_rate, ...) copied through whole;
parameters only in the source strategy copied through as the source slice MindSpore takes (that of
local rank `t % source devices per stage`, in the lowest stage holding it).

A parameter several source stages share is read from the lowest of them, as MindSpore does (the
stages' copies need not be byte-identical).

Choosing replicas: every slice a target needs may be held by several source ranks. The choice is
made from the layouts alone (no shapes), so `rank_list_for_transform` is exactly the set of files a
plan reads (when the catalog has every strategy parameter; a target reading no file at all still
opens one for global_step and the like). Where MindSpore can convert at all (per-stage device counts
dividing each other), candidates are limited to MindSpore's own rank list (modelled here: the
replicas aligned with the target on the unused device axes, in every source stage read), so ours
never names a file MindSpore would not; within those, a greedy set cover picks as few files as
possible, ties going to the rank nearest the target's own (`t % devices`), which spreads different
targets over different replicas.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .dtypes import dtype_itemsize
from .errors import MpickptError, PlanError, SourceMissingError
from .layout import Box, Layouts, ParamLayout
from .strategy import Strategy


@dataclass(frozen=True)
class TensorInfo:
    """A source parameter: dtype and full shape (for parameters absent from the source strategy, the
    stored dims), and for those the source stages whose files are known to hold it (None: every stage)."""

    dtype: str
    shape: tuple[int, ...]
    stages: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, object]:
        return {"dtype": self.dtype, "shape": list(self.shape), "stages": None if self.stages is None else
                list(self.stages)}


@dataclass(frozen=True)
class Copy:
    """Copy `src_box` of source rank `src_rank`'s slice into `dst_box` of the target slice."""

    src_rank: int
    src_box: Box  # relative to the source slice as stored
    dst_box: Box  # relative to the target slice

    def to_dict(self) -> dict[str, object]:
        return {"src_rank": self.src_rank, "src_box": self.src_box.to_dict(), "dst_box": self.dst_box.to_dict()}


@dataclass(frozen=True)
class ParamPlan:
    """One parameter of one target: its dims as written and the copies covering them exactly once.

    `in_strategy` False: the one copy names a source whose stored value is copied through whole."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    copies: tuple[Copy, ...]
    in_strategy: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * _itemsize(self.dtype)

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims), "in_strategy": self.in_strategy,
                "copies": [c.to_dict() for c in self.copies]}


@dataclass(frozen=True)
class TargetPlan:
    """Everything one target rank writes, and the source ranks it reads (descending, as MindSpore lists)."""

    target_rank: int
    params: tuple[ParamPlan, ...]
    source_ranks: tuple[int, ...]

    def bytes_read(self) -> int:
        """Tensor bytes copied out of source files."""
        return sum(
            sum(c.src_box.size for c in p.copies) * _itemsize(p.dtype) if p.in_strategy else p.nbytes
            for p in self.params
        )

    def bytes_written(self) -> int:
        """Tensor bytes of the output file."""
        return sum(p.nbytes for p in self.params)

    def to_dict(self) -> dict[str, object]:
        return {"target_rank": self.target_rank, "source_ranks": list(self.source_ranks),
                "bytes_read": self.bytes_read(), "bytes_written": self.bytes_written(),
                "params": [p.to_dict() for p in self.params]}


def _itemsize(dtype: str) -> int:
    try:
        return dtype_itemsize(dtype)
    except MpickptError:  # MapTensor and other opaque values: size not known from dims
        return 0


# --- choosing source replicas (layouts only) ------------------------------------------------------


@dataclass(frozen=True)
class _Pair:
    """How one parameter moves to targets of one stage: its source layout and the source stage read
    (the lowest holding it, as MindSpore: stages sharing a parameter need not hold equal bytes), and
    its target layout."""

    src: ParamLayout
    src_stage: int
    dst: ParamLayout


class _Holders:
    """Which stage-local ranks hold each slice of one source layout (built once, O(devices))."""

    def __init__(self, layout: ParamLayout) -> None:
        box, copy = layout.rank_tables
        self.order = np.argsort(box, kind="stable")
        slices = math.prod(layout.pieces)
        self.starts = np.searchsorted(box[self.order], np.arange(slices + 1))
        self.copies = layout.copies
        self.aligned = np.empty(slices * layout.copies, dtype=np.int64)
        self.aligned[box * layout.copies + copy] = np.arange(layout.device_num)

    def of(self, box_id: int) -> np.ndarray:
        return self.order[self.starts[box_id]:self.starts[box_id + 1]]


# One slice to read: a layout pair, a source piece, and the ranks whose files hold the parameter (None: all).
_Element = tuple[_Pair, tuple[int, ...], frozenset[int] | None]


@dataclass(frozen=True)
class _Choice:
    """The layout-only decisions for one target rank."""

    local_rank: int  # the target's rank in its stage
    source_local: int  # MindSpore's stage-local source rank for copied-through values: local_rank % source devices
    pairs: Mapping[str, _Pair]
    ranges: Mapping[_Pair, tuple[tuple[int, int], ...]]  # per dim: inclusive range of source piece numbers
    assignment: Mapping[_Element, int]  # (pair, source piece, holders) -> source rank
    through: Mapping[str, int]  # source-only parameters -> source rank of the slice copied through
    mindspore_stages: tuple[int, ...]  # source stages MindSpore reads for this target
    ranks: frozenset[int]


class _Chooser:
    """Chooses source replicas for target ranks; caches per-layout tables across targets."""

    def __init__(self, src: Layouts, dst: Layouts, holders: Mapping[str, frozenset[int]] | None = None) -> None:
        self.src, self.dst = src, dst
        self.holders = dict(holders or {})  # parameters whose files only some ranks have: those ranks
        big, small = sorted((src.stage_device_num, dst.stage_device_num), reverse=True)
        self.mindspore_can_convert = not src.unsharded and big % small == 0
        self._holders: dict[ParamLayout, _Holders] = {}
        self._stage_cache: dict[int, tuple[dict[str, _Pair], tuple[str, ...], tuple[int, ...]]] = {}

    def choose(self, target: int) -> _Choice:
        if not 0 <= target < self.dst.device_count:
            raise PlanError(f"target rank {target} is outside 0..{self.dst.device_count - 1}")
        stage = self.dst.stage_of(target)
        local = target % self.dst.stage_device_num
        source_local = local % self.src.stage_device_num
        # MindSpore's rank_list_for_transform takes the global target rank when target stages have one device
        preferred = (target if self.dst.stage_device_num == 1 else local) % self.src.stage_device_num
        pairs, only_src, ms_stages = self._for_stage(stage)
        ranges = {pair: self._ranges(pair, local) for pair in dict.fromkeys(pairs.values())}
        elements: dict[_Element, np.ndarray] = {}
        allowed = self._mindspore_ranks(ranges, preferred, ms_stages) if self.mindspore_can_convert else None
        for name, pair in pairs.items():
            held = self.holders.get(name)
            for piece in itertools.product(*(range(lo, hi + 1) for lo, hi in ranges[pair])):
                if (pair, piece, held) in elements:
                    continue
                holders = self._global_holders(pair, pair.src.box_id(piece))
                if held is not None:
                    holders = self._held(name, holders, held)
                if allowed is not None and allowed[holders].any():
                    holders = holders[allowed[holders]]
                elements[(pair, piece, held)] = holders
        assignment = dict(zip(elements, _cover(list(elements.values()), self._preference(preferred))))
        ranks = set(assignment.values())
        through = {name: self._through_rank(name, source_local, ranks) for name in only_src}
        return _Choice(local, source_local, pairs, ranges, assignment, through, ms_stages,
                       frozenset(ranks | set(through.values())))

    def _for_stage(self, stage: int) -> tuple[dict[str, _Pair], tuple[str, ...], tuple[int, ...]]:
        """For targets of one stage: laid-out parameters, source-only parameters, and the source
        stages MindSpore reads (those of every source parameter not dropped for this stage)."""
        if stage not in self._stage_cache:
            src, dst = self.src, self.dst
            if dst.unsharded:
                names = list(src.names)
            else:
                names = [n for n in dst.names if stage in dst.stages_of(n) and src.holds(n)]
            pairs = {name: self._pair(name, stage) for name in names}
            only_src = tuple(n for n in src.names if not dst.unsharded and not dst.holds(n))
            kept = [n for n in src.names if dst.unsharded or not dst.holds(n) or stage in dst.stages_of(n)]
            ms_stages = tuple(sorted({s for n in kept for s in src.stages_of(n)})) or src.stages
            self._stage_cache[stage] = (pairs, only_src, ms_stages)
        return self._stage_cache[stage]

    def _pair(self, name: str, stage: int) -> _Pair:
        src, dst = self.src, self.dst
        if src.unsharded:
            dst_layout = dst.layout(name, stage)
            return _Pair(ParamLayout.unsharded(dst_layout.ndim), 0, dst_layout)
        src_stage = src.stages_of(name)[0]
        src_layout = src.layout(name, src_stage)
        dst_layout = dst.layout(name, stage, src_layout.ndim)
        if dst_layout.ndim != src_layout.ndim:
            raise PlanError(
                f"parameter {name!r}: the source layout ({src.path}: {src_layout.describe()}) has "
                f"{src_layout.ndim} dimensions, the target layout ({dst.path}: {dst_layout.describe()}) "
                f"{dst_layout.ndim}")
        return _Pair(src_layout, src_stage, dst_layout)

    @staticmethod
    def _ranges(pair: _Pair, local: int) -> tuple[tuple[int, int], ...]:
        """Per dimension, the source pieces overlapping the target's piece (shape-independent)."""
        result = []
        for j, p, q in zip(pair.dst.chunk(local), pair.dst.pieces, pair.src.pieces):
            result.append(((j * q) // p, ((j + 1) * q - 1) // p))
        return tuple(result)

    def _table(self, layout: ParamLayout) -> _Holders:
        if layout not in self._holders:
            self._holders[layout] = _Holders(layout)
        return self._holders[layout]

    def _global_holders(self, pair: _Pair, box_id: int) -> np.ndarray:
        return self._table(pair.src).of(box_id) + pair.src_stage * self.src.stage_device_num

    @staticmethod
    def _held(name: str, holders: np.ndarray, held: frozenset[int]) -> np.ndarray:
        """The replicas of one slice whose files hold `name` (PlanError when none does)."""
        kept = holders[np.isin(holders, np.fromiter(held, dtype=np.int64, count=len(held)))]
        if not len(kept):
            raise PlanError(f"parameter {name!r}: no source file holds the slice of source ranks "
                            f"{sorted(int(r) for r in holders)}")
        return kept

    def _mindspore_ranks(self, ranges: Mapping[_Pair, tuple[tuple[int, int], ...]], preferred: int,
                         stages: Sequence[int]) -> np.ndarray:
        """Mask of the source ranks MindSpore lists for this target: per parameter, the holders of each
        needed slice aligned with rank `preferred` on the unused axes, shifted into every read stage."""
        local: set[int] = set()
        for pair, dims in ranges.items():
            table = self._table(pair.src)
            copy = pair.src.copy_index(preferred)
            for piece in itertools.product(*(range(lo, hi + 1) for lo, hi in dims)):
                local.add(int(table.aligned[pair.src.box_id(piece) * table.copies + copy]))
        mask = np.zeros(self.src.device_count, dtype=bool)
        per_stage = self.src.stage_device_num
        for s in stages:
            mask[[s * per_stage + r for r in local]] = True
        return mask

    def _preference(self, preferred: int) -> np.ndarray:
        """Rank order for ties: nearest stage-local rank at or after `preferred` first, lower stage first."""
        ranks = np.arange(self.src.device_count)
        per_stage = self.src.stage_device_num
        return ((ranks % per_stage - preferred) % per_stage) * self.src.stage_count + ranks // per_stage

    def _through_rank(self, name: str, source_local: int, reading: set[int]) -> int:
        """Source rank of a source-only parameter: MindSpore's (local rank `source_local` in the lowest
        stage holding it) or a replica of that slice in that stage among files read anyway."""
        stage = self.src.stages_of(name)[0]
        layout = self.src.layout(name, stage)
        per_stage = self.src.stage_device_num
        mindspore = stage * per_stage + source_local
        local = self._table(layout).of(layout.box_id(layout.chunk(source_local)))
        replicas = [int(stage * per_stage + r) for r in local]
        held = self.holders.get(name)
        if held is not None:
            replicas = [int(r) for r in self._held(name, np.array(replicas), held)]
            if mindspore not in replicas:
                mindspore = replicas[0]
        read = [r for r in replicas if r in reading]
        return mindspore if mindspore in reading or not read else min(read)


def _cover(candidates: list[np.ndarray], preference: np.ndarray) -> list[int]:
    """For each element (its candidate ranks), the rank to take it from: few distinct ranks overall
    (greedy set cover, singletons first), ties to the lowest `preference`."""
    chosen = np.zeros(len(preference), dtype=bool)
    if not candidates:
        return []
    for c in candidates:
        if len(c) == 1:
            chosen[c[0]] = True
    flat = np.concatenate(candidates)
    owner = np.repeat(np.arange(len(candidates)), [len(c) for c in candidates])
    alive = np.ones(len(candidates), dtype=bool)
    alive[owner[chosen[flat]]] = False
    weight = len(preference)
    while alive.any():
        live = alive[owner]
        counts = np.bincount(flat[live], minlength=weight)
        best = int(np.argmax(counts * weight - preference))
        chosen[best] = True
        alive[owner[live & (flat == best)]] = False
    return [int(c[chosen[c]][np.argmin(preference[c[chosen[c]]])]) for c in candidates]


# --- plans ------------------------------------------------------------------------------------------


class Planner:
    """Plans target ranks of one conversion. `src_stage` set: the pipeline subnetwork transform (the
    source strategy is the unmerged file of that stage, whose ranks are `stage * devices + local`)."""

    def __init__(self, src: Strategy | None, dst: Strategy | None, catalog: Mapping[str, TensorInfo], *,
                 src_stage: int | None = None, holders: Mapping[str, frozenset[int]] | None = None) -> None:
        self.src = Layouts.from_strategy(src, stage=src_stage)
        self.dst = Layouts.from_strategy(dst)
        self.catalog = dict(catalog)
        self.holders = dict(holders or {})
        self.target_ranks = range(self.dst.device_count)
        self._chooser = _Chooser(self.src, self.dst, self.holders)

    def rank_list(self, target_rank: int) -> list[int]:
        """The source ranks `plan(target_rank)` reads, descending."""
        return list(self.plan(target_rank).source_ranks)

    def plan(self, target_rank: int) -> TargetPlan:
        """Every parameter of one target rank, in catalog order."""
        choice = self._chooser.choose(target_rank)
        both_missing = self.src.unsharded and self.dst.unsharded
        params: list[ParamPlan] = []
        pending: list[tuple[str, TensorInfo]] = []
        shared: dict[tuple[_Pair, tuple[int, ...], frozenset[int] | None],
                     tuple[tuple[int, ...], tuple[Copy, ...]]] = {}
        for name, info in self.catalog.items():
            pair = choice.pairs.get(name)
            if both_missing:
                whole = Box.full(info.shape)
                params.append(ParamPlan(name, info.dtype, info.shape, (Copy(0, whole, whole),), True))
            elif pair is not None:
                params.append(self._laid_out(name, info, pair, choice, shared))
            elif name in choice.through:
                params.append(self._through(name, info, choice.through[name]))
            elif not self._dropped(name, target_rank):
                pending.append((name, info))
        reading = {c.src_rank for p in params for c in p.copies}
        extras = {name: self._absent_source(name, info, choice, reading) for name, info in pending}
        for name, info in pending:
            self._check_kept_whole(name, info, target_rank)
            whole = Box.full(info.shape)
            params.append(ParamPlan(name, info.dtype, info.shape, (Copy(extras[name], whole, whole),), False))
        order = {name: i for i, name in enumerate(self.catalog)}
        params.sort(key=lambda p: order[p.name])
        ranks = sorted({c.src_rank for p in params for c in p.copies}, reverse=True)
        return TargetPlan(target_rank, tuple(params), tuple(ranks))

    def check_cataloged(self, target_rank: int) -> None:
        """SourceMissingError when the target needs a source strategy parameter that the catalog lacks (source
        files of other pipeline stages only): its output would lack it."""
        if self.src.unsharded:
            return
        stage = self.dst.stage_of(target_rank)
        needed = self.src.names if self.dst.unsharded else \
            [n for n in self.dst.names if stage in self.dst.stages_of(n) and self.src.holds(n)]
        absent = [n for n in needed if n not in self.catalog]
        if absent:
            per_stage = self.src.stage_device_num
            src_stage = self.src.stages_of(absent[0])[0]
            raise SourceMissingError(
                f"parameter {absent[0]!r}, which target rank {target_rank} needs, is in no source file given "
                f"(source pipeline stage {src_stage}: ranks {src_stage * per_stage}..{(src_stage + 1) * per_stage - 1}"
                f" hold it)" + (f"; so are {absent[1:4]}" if len(absent) > 1 else ""))

    def _laid_out(self, name: str, info: TensorInfo, pair: _Pair, choice: _Choice,
                  cache: dict[tuple[_Pair, tuple[int, ...], frozenset[int] | None],
                              tuple[tuple[int, ...], tuple[Copy, ...]]]) -> ParamPlan:
        """A parameter in both strategies; parameters with the same layouts, shape and holders share one result."""
        held = self.holders.get(name)
        key = (pair, info.shape, held)
        if key not in cache:
            self.dst.check(name, pair.dst, info.shape)  # first: an unsharded source's layout is made from it
            self.src.check(name, pair.src, info.shape)
            cache[key] = self._copies(pair, info.shape, held, choice)
        dims, copies = cache[key]
        return ParamPlan(name, info.dtype, dims, copies, True)

    @staticmethod
    def _copies(pair: _Pair, shape: tuple[int, ...], held: frozenset[int] | None,
                choice: _Choice) -> tuple[tuple[int, ...], tuple[Copy, ...]]:
        """Target slice dims and the copies filling it: per dimension, each overlapping source piece's
        (offset in the source piece, offset in the target piece, length); then their products."""
        target = pair.dst.box(shape, choice.local_rank)
        per_dim = []
        for (lo, hi), length, pieces, t0, t1 in zip(choice.ranges[pair], shape, pair.src.pieces,
                                                      target.start, target.stop):
            step = length // pieces
            per_dim.append([(i, max(i * step, t0) - i * step, max(i * step, t0) - t0,
                             min((i + 1) * step, t1) - max(i * step, t0)) for i in range(lo, hi + 1)])
        copies = []
        for parts in itertools.product(*per_dim):
            piece = tuple(p[0] for p in parts)
            src = tuple(p[1] for p in parts)
            dst = tuple(p[2] for p in parts)
            size = tuple(p[3] for p in parts)
            copies.append(Copy(choice.assignment[(pair, piece, held)],
                               Box(src, tuple(a + n for a, n in zip(src, size))),
                               Box(dst, tuple(a + n for a, n in zip(dst, size)))))
        return target.shape, tuple(copies)

    def _through(self, name: str, info: TensorInfo, rank: int) -> ParamPlan:
        """A parameter only the source strategy has: that rank's stored slice, whole."""
        per_stage = self.src.stage_device_num
        layout = self.src.layout(name, rank // per_stage)
        self.src.check(name, layout, info.shape)
        dims = layout.box(info.shape, rank % per_stage).shape
        whole = Box.full(dims)
        return ParamPlan(name, info.dtype, dims, (Copy(rank, whole, whole),), False)

    def _dropped(self, name: str, target_rank: int) -> bool:
        """Laid out by both strategies but not in the target's pipeline stage."""
        return (not self.dst.unsharded and self.dst.holds(name) and self.src.holds(name)
                and self.dst.stage_of(target_rank) not in self.dst.stages_of(name))

    def _check_kept_whole(self, name: str, info: TensorInfo, target_rank: int) -> None:
        """A value absent from the source strategy is copied whole (as MindSpore copies it): PlanError when the
        target strategy gives this target a slice of it instead, which the whole value would contradict."""
        if self.dst.unsharded or not self.dst.holds(name):
            return
        stage = self.dst.stage_of(target_rank)
        if stage not in self.dst.stages_of(name):
            return
        layout = self.dst.layout(name, stage)
        self.dst.check(name, layout, info.shape)
        wanted = layout.box(info.shape, target_rank % self.dst.stage_device_num).shape
        if wanted != tuple(info.shape):
            raise PlanError(
                f"parameter {name!r} is not in the source strategy ({self.src.path}), so its stored value "
                f"{list(info.shape)} is copied whole, but the target strategy ({self.dst.path}) gives target rank "
                f"{target_rank} a slice of {list(wanted)} of it ({layout.describe()}): give the source strategy "
                f"that lays it out, or a target strategy keeping it whole (MindSpore writes it whole, which the "
                f"target network cannot load)")

    def _absent_source(self, name: str, info: TensorInfo, choice: _Choice, reading: set[int]) -> int:
        """Source rank for a parameter absent from the source strategy: MindSpore's choice if read anyway,
        else a file read anyway (same local rank first), else MindSpore's choice."""
        per_stage = self.src.stage_device_num
        stages = [s for s in self.src.stages if info.stages is None or s in info.stages]
        if not stages:
            raise PlanError(f"parameter {name!r}: the catalog puts it in source stage(s) {list(info.stages or ())}, "
                            f"which the source strategy does not have")
        ms_stages = [s for s in choice.mindspore_stages if s in stages] or stages
        mindspore = ms_stages[0] * per_stage + choice.source_local
        held = self.holders.get(name)

        def holds(rank: int) -> bool:
            return held is None or rank in held

        candidates = [r for r in reading if r // per_stage in stages and holds(r)]
        if holds(mindspore) and (mindspore in reading or not candidates):
            return mindspore
        if candidates:
            return min(candidates, key=lambda r: (r % per_stage != choice.source_local, r))
        return min(held or (), key=lambda r: (r // per_stage not in ms_stages, r % per_stage != choice.source_local, r))


def rank_list_for_transform(rank_id: int, src: Strategy | None, dst: Strategy | None) -> list[int]:
    """The source ranks whose files target `rank_id` needs, descending, from the layouts alone.
    Never more than MindSpore lists where MindSpore can convert; `[0]` without a source strategy."""
    if src is None:
        return [0]
    choice = _Chooser(Layouts.from_strategy(src), Layouts.from_strategy(dst)).choose(rank_id)
    return sorted(choice.ranks, reverse=True)
