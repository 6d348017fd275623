"""An independent model of FORMATS.md "Layout rules" (no mpickpt layout code): which box of the full
tensor a rank holds. Layout tests compare mpickpt with it; written cases cut their expected files with it."""

from __future__ import annotations

import math

from mpickpt.strategy import LayoutItem, Strategy

BoxBounds = tuple[tuple[int, ...], tuple[int, ...]]


def reference_box(layout: LayoutItem, shape: tuple[int, ...], rank: int) -> BoxBounds:
    """The box a stage-local rank holds: coordinates = row-major digits of the rank in the device matrix,
    axis i = entry len-1-i; a dimension split over several axes has the first listed outermost; the
    optimizer shard cuts dimension 0 into n pieces by the rank's position among its replicas."""
    dev = layout.dev_matrix
    digits, rest = [], rank
    for size in reversed(dev):
        digits.append(rest % size)  # digits[i] = coordinate on axis i
        rest //= size
    maps = layout.tensor_map
    dim_axes = [() if a == -1 else (a,) for a in maps[0]] if len(maps) == 1 else \
        [tuple(a for a in m if a != -1) for m in maps]
    start, stop = [], []
    for length, axes in zip(shape, dim_axes):
        pieces, index = 1, 0
        for axis in axes:
            pieces *= dev[len(dev) - 1 - axis]
            index = index * dev[len(dev) - 1 - axis] + digits[axis]
        start.append(index * (length // pieces))
        stop.append((index + 1) * (length // pieces))
    if layout.opt_weight_shard_size and layout.opt_weight_shard_step:
        used = {a for axes in dim_axes for a in axes}
        unused = [a for a in reversed(range(len(dev))) if a not in used and dev[len(dev) - 1 - a] > 1]
        replicas, position = 1, 0
        for axis in unused:  # outermost first
            replicas *= dev[len(dev) - 1 - axis]
            position = position * dev[len(dev) - 1 - axis] + digits[axis]
        count = replicas if layout.opt_weight_shard_size == -1 else layout.opt_weight_shard_size
        piece = (stop[0] - start[0]) // count
        start[0] += (position % count) * piece
        stop[0] = start[0] + piece
    return tuple(start), tuple(stop)


def reference_slice(strategy: Strategy | None, name: str, shape: tuple[int, ...], rank: int) -> BoxBounds | None:
    """The reference box of ``name`` on a (global) rank; the full tensor where no strategy names it."""
    entries = None if strategy is None else strategy.layouts_by_param().get(name)
    if not entries:
        return (0,) * len(shape), shape
    per_stage = math.prod(entries[0][1].dev_matrix)
    stage_layouts = {stage or 0: layout for stage, layout in entries}
    layout = stage_layouts.get(rank // per_stage)
    return None if layout is None else reference_box(layout, shape, rank % per_stage)
