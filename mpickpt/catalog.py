"""What the sources of a conversion hold, from the headers of every source file (pure, no I/O).

The parameter set of a job never comes from one file: every rank's headers are read, each stored slice
is checked against the slice its source strategy implies, and for every parameter the ranks whose files
hold it are recorded, so redundancy-removed checkpoints (each rank saving only its share of the
replicated parameters) plan from what each file actually holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import LayoutError, PlanError, SourceDisagreementError
from .layout import Layouts
from .plan import TensorInfo
from .strategy import Strategy

Header = tuple[str, str, tuple[int, ...]]  # (name, MindSpore dtype, stored dims)


@dataclass(frozen=True)
class Fingerprint:
    """One file's copy of a value copied through whole: a CRC-32 of its bytes (`sampled`: of its first and
    last bytes only), and a small tensor's elements as text (None for others)."""

    crc: int
    sampled: bool = False
    shown: str | None = None

    def describe(self) -> str:
        if self.shown is not None:
            return self.shown
        return f"bytes of CRC-32 {self.crc:08x}{' (its first and last 32 KiB)' if self.sampled else ''}"


@dataclass(frozen=True)
class SourceCatalog:
    """Every source parameter (full shape, or stored dims outside the strategy), in MindSpore's order
    (first seen over the ranks in descending order), and, for parameters that not every rank able to
    hold them holds, the ranks whose files do."""

    params: dict[str, TensorInfo]
    holders: dict[str, frozenset[int]]


def build_catalog(src: Strategy | None, headers: Mapping[int, Sequence[Header]],
                  path_of: Callable[[int], str] | None = None, *, src_stage: int | None = None) -> SourceCatalog:
    """Check the stored headers of source ranks against the source strategy and catalog them.

    `headers` has one entry per source file (global rank numbers; with `src_stage`, the unmerged
    strategy of that pipeline stage applies to its ranks `stage * devices + local`). Raises LayoutError
    naming the file when a stored slice does not have the shape the strategy implies, PlanError when
    files disagree on a dtype or a parameter is stored in the wrong stage or by no file at all.
    """
    layouts = Layouts.from_strategy(src, stage=src_stage)
    where = path_of or (lambda r: f"source rank {r}")
    dtypes: dict[str, tuple[str, int]] = {}  # name -> (dtype, first rank seen)
    implied: dict[str, dict[tuple[int, ...], list[int]]] = {}  # strategy param -> full shape -> ranks
    stored: dict[str, tuple[int, ...]] = {}  # parameters outside the strategy: stored dims
    held: dict[str, set[int]] = {}
    order: dict[str, None] = {}
    for rank in sorted(headers, reverse=True):
        stage = _stage(layouts, rank, where)
        for name, dtype, dims in headers[rank]:
            order.setdefault(name, None)
            held.setdefault(name, set()).add(rank)
            _same_dtype(dtypes, name, dtype, rank, where)
            if layouts.unsharded or not layouts.holds(name):
                _same_dims(stored, name, tuple(dims), rank, where, held)
            else:
                implied.setdefault(name, {}).setdefault(_full_shape(layouts, name, tuple(dims), stage, rank, where),
                                                        []).append(rank)
    shapes = {name: _agreed_shape(layouts, name, by_shape, where) for name, by_shape in implied.items()}
    _check_every_strategy_param_stored(layouts, headers, held)
    params, holders = {}, {}
    for name in order:
        in_strategy = name in shapes
        shape = shapes[name] if in_strategy else stored[name]
        stages = None
        if not in_strategy and layouts.stage_count > 1:
            stages = tuple(sorted({_stage(layouts, r, where) for r in held[name]}))
        params[name] = TensorInfo(dtypes[name][0], shape, stages)
        could = _could_hold(layouts, name, headers, in_strategy)
        if held[name] != could:
            holders[name] = frozenset(held[name])
            if in_strategy:
                _check_every_slice_held(layouts, name, held[name], where)
    return SourceCatalog(params, holders)


def copied_through(src: Strategy | None) -> Callable[[str], bool]:
    """Which stored values a conversion copies through whole from one rank's file (those the source strategy
    does not lay out), so every rank file must hold them alike; none without a strategy (one source file)."""
    if src is None:
        return lambda name: False
    laid_out = frozenset(src.layouts_by_param())
    return lambda name: name not in laid_out


def check_copies_agree(fingerprints: Mapping[int, Mapping[str, Fingerprint]],
                       path_of: Callable[[int], str] | None = None) -> None:
    """Raise SourceDisagreementError naming both files when two rank files hold different copies of a value
    copied through whole (rank files of different saves, or a strategy lacking a sharded parameter): which
    rank's copy each target gets would be arbitrary."""
    where = path_of or (lambda r: f"source rank {r}")
    first: dict[str, tuple[Fingerprint, int]] = {}
    for rank in sorted(fingerprints):
        for name, print_ in fingerprints[rank].items():
            known, known_rank = first.setdefault(name, (print_, rank))
            if known.crc != print_.crc:
                raise SourceDisagreementError(
                    f"parameter {name!r} is outside the source strategy, so every rank file should hold the same "
                    f"value, but {where(rank)} holds {print_.describe()}, {where(known_rank)} holds "
                    f"{known.describe()}: are all rank files from one save, and is the source strategy this "
                    f"checkpoint's? (a parameter sharded over ranks must be in it)")


def _stage(layouts: Layouts, rank: int, where: Callable[[int], str]) -> int:
    if layouts.unsharded:
        return 0
    try:
        return layouts.stage_of(rank)
    except LayoutError:
        raise PlanError(f"{where(rank)}: source rank {rank} is outside the source strategy "
                        f"({layouts.device_count} devices)") from None


def _same_dtype(dtypes: dict[str, tuple[str, int]], name: str, dtype: str, rank: int,
                where: Callable[[int], str]) -> None:
    known = dtypes.setdefault(name, (dtype, rank))
    if known[0] != dtype:
        raise PlanError(f"parameter {name!r}: {where(rank)} holds it as {dtype}, but {where(known[1])} as {known[0]}")


def _same_dims(stored: dict[str, tuple[int, ...]], name: str, dims: tuple[int, ...], rank: int,
               where: Callable[[int], str], held: Mapping[str, set[int]]) -> None:
    known = stored.setdefault(name, dims)
    if known != dims:
        other = max(r for r in held[name] if r != rank)
        raise PlanError(f"parameter {name!r}: {where(rank)} holds {list(dims)}, but {where(other)} holds "
                        f"{list(known)}")


def _full_shape(layouts: Layouts, name: str, dims: tuple[int, ...], stage: int, rank: int,
                where: Callable[[int], str]) -> tuple[int, ...]:
    if stage not in layouts.stages_of(name):
        raise PlanError(f"{where(rank)}: parameter {name!r} is stored here (pipeline stage {stage}), but the source "
                        f"strategy puts it in stage(s) {list(layouts.stages_of(name))} only")
    try:
        return layouts.layout(name, stage).full_shape(name, dims)
    except LayoutError as error:
        raise LayoutError(f"{where(rank)}: {error}") from None


def _agreed_shape(layouts: Layouts, name: str, by_shape: Mapping[tuple[int, ...], list[int]],
                  where: Callable[[int], str]) -> tuple[int, ...]:
    """The full shape most files imply; a file whose slice disagrees is an error naming it and both shapes."""
    counts = Counter({shape: len(ranks) for shape, ranks in by_shape.items()})
    (shape, votes), *rest = counts.most_common()
    if rest and rest[0][1] == votes:
        listed = "; ".join(f"{where(max(by_shape[s]))} implies full shape {list(s)}" for s in by_shape)
        raise LayoutError(f"parameter {name!r}: source files disagree on its shape: {listed}")
    for stage in layouts.stages_of(name):
        layouts.check(name, layouts.layout(name, stage), shape)
    for other, ranks in by_shape.items():
        if other != shape:
            rank = max(ranks)
            layout = layouts.layout(name, layouts.stage_of(rank))
            stored = tuple(d // p for d, p in zip(other, layout.pieces))
            expected = layout.box(shape, rank % layouts.stage_device_num).shape
            raise LayoutError(f"{where(rank)}: parameter {name!r} is stored as {list(stored)}, but the source "
                              f"strategy gives source rank {rank} a slice of {list(expected)} (full shape "
                              f"{list(shape)}, as {votes} other file(s) imply)")
    return shape


def _could_hold(layouts: Layouts, name: str, headers: Mapping[int, Sequence[Header]],
                in_strategy: bool) -> set[int]:
    """The given ranks whose strategy places `name` on them (every given rank for other parameters)."""
    if not in_strategy or layouts.unsharded:
        return set(headers)
    stages = set(layouts.stages_of(name))
    return {r for r in headers if layouts.stage_of(r) in stages}


def _check_every_strategy_param_stored(layouts: Layouts, headers: Mapping[int, Sequence[Header]],
                                       held: Mapping[str, set[int]]) -> None:
    """PlanError naming a strategy parameter that no file holds of the given ranks whose stage should hold it
    (files of some stages only, as `transform_checkpoint_by_rank` gets for a pipelined target, need not hold
    the other stages' parameters: the planner refuses a target needing them)."""
    missing = [n for n in layouts.names if n not in held and _could_hold(layouts, n, headers, True)]
    if missing:
        name = missing[0]
        ranks = sorted(_could_hold(layouts, name, headers, True))
        more = f" (and {len(missing) - 1} more: {', '.join(map(repr, missing[1:4]))})" if len(missing) > 1 else ""
        raise PlanError(f"parameter {name!r} is in the source strategy but in no source file; source ranks "
                        f"{_ranks(ranks)} should hold it{more}")


def _check_every_slice_held(layouts: Layouts, name: str, held: set[int], where: Callable[[int], str]) -> None:
    """Each distinct slice of a partly held parameter must be in at least one file of the stage it is read
    from (the lowest stage holding it, as MindSpore reads parameters several stages share)."""
    per_stage = layouts.stage_device_num
    for stage in layouts.stages_of(name)[:1]:
        layout = layouts.layout(name, stage)
        box_of = layout.rank_tables[0]
        owners: dict[int, list[int]] = {}
        for local, box_id in enumerate(box_of):
            owners.setdefault(int(box_id), []).append(stage * per_stage + local)
        for ranks in owners.values():
            if not held.intersection(ranks):
                files = ", ".join(where(r) for r in ranks[:2]) + (", ..." if len(ranks) > 2 else "")
                raise PlanError(f"parameter {name!r}: no source file holds the slice of source ranks "
                                f"{_ranks(ranks)}: {files} lack{'s' if len(ranks) == 1 else ''} it (each rank's "
                                f"file must hold its slices, or one replica's file must)")


def _ranks(ranks: Sequence[int]) -> str:
    shown = ", ".join(map(str, ranks[:16]))
    return f"[{shown}{', ...' if len(ranks) > 16 else ''}]"
