"""Hypothesis strategies: random device matrices, layouts (plain and nested tensor maps, optimizer
sharding), pipelined strategies and whole conversions with full shapes every layout splits evenly.

    from hypothesis import given
    from mpickpt.testing.strategies import conversions

    @given(conversions())
    def test_something(case): ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hypothesis import strategies as st

from mpickpt.layout import ParamLayout
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem

DEVICE_COUNTS = (1, 2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class Conversion:
    """Source and target strategies (None = unsharded) and the full shape of every parameter."""

    src: Strategy | None
    dst: Strategy | None
    shapes: dict[str, tuple[int, ...]]


@st.composite
def device_matrices(draw: st.DrawFn, devices: int) -> tuple[int, ...]:
    """A device matrix whose product is `devices`, sometimes with size-1 axes."""
    axes: list[int] = []
    rest = devices
    while rest > 1:
        factor = draw(st.sampled_from([d for d in range(2, rest + 1) if rest % d == 0]))
        axes.append(factor)
        rest //= factor
    for _ in range(draw(st.integers(0 if axes else 1, 1))):
        axes.insert(draw(st.integers(0, len(axes))), 1)
    return tuple(axes)


@st.composite
def layout_items(draw: st.DrawFn, name: str, ndim: int, devices: int, *, nested: bool = True,
                 opt: bool = True, single_replica_opt: bool = True) -> LayoutItem:
    """A valid layout of an `ndim`-dimensional parameter over `devices` devices. `single_replica_opt`
    allows optimizer sharding without replicas (one piece; MindSpore's converter refuses it)."""
    dev = draw(device_matrices(devices))
    free = list(draw(st.permutations(range(len(dev)))))
    dims: list[tuple[int, ...]] = []
    for _ in range(ndim):
        most = 2 if nested and ndim > 1 else 1
        count = draw(st.integers(0, min(most, len(free))))
        dims.append(tuple(free.pop() for _ in range(count)))
    if any(len(axes) > 1 for axes in dims):
        tensor_map = tuple(axes or (-1,) for axes in dims)
    else:
        tensor_map = (tuple(axes[0] if axes else -1 for axes in dims),)
    size = step = 0
    probe = ParamLayout(dev, tuple(dims))
    if opt and ndim and (single_replica_opt or probe.replica_count > 1) and draw(st.booleans()):
        replicas = probe.replica_count
        size = draw(st.sampled_from([-1] + [d for d in range(1, replicas + 1) if replicas % d == 0]))
        innermost = min(probe.replica_axes, default=0)
        step = math.prod(dev[len(dev) - innermost:]) if innermost else 1
    # MindSpore writes one empty param_split_shape and indices_offset message (and needs the former)
    return LayoutItem(name=name, dev_matrix=dev, tensor_map=tensor_map, param_split_shape=((),),
                      indices_offset=((),), opt_weight_shard_step=step, opt_weight_shard_size=size)


def _strategy(items: Sequence[LayoutItem], stages: int) -> Strategy:
    nodes = tuple(StrategyItem(f"Default/network/stage{s}/MatMul-op{s}", s, ((1, 1),)) for s in range(stages))
    return Strategy(current_stage=1 if stages > 1 else 0, strategy_items=nodes, layout_items=tuple(items))


@st.composite
def _side(draw: st.DrawFn, names: Sequence[str], ndims: Sequence[int], devices: int, stages: int,
          nested: bool, opt: bool, mindspore: bool) -> list[LayoutItem]:
    """Layout items of one strategy: every parameter in one or more stages (merged names if pipelined)."""
    items = []
    for name, ndim in zip(names, ndims):
        held = draw(st.sets(st.integers(0, stages - 1), min_size=1)) if stages > 1 else {0}
        for s in sorted(held):
            item = draw(layout_items(name, ndim, devices, nested=nested, opt=opt, single_replica_opt=not mindspore))
            items.append(item if stages == 1 else replace(item, name=f"{s}-{name}"))
    if stages > 1:  # every stage must hold something
        for s in range(stages):
            if not any(i.name.startswith(f"{s}-") for i in items):
                items.append(draw(layout_items(f"{s}-stage{s}.extra", 1, devices, nested=nested, opt=opt,
                                               single_replica_opt=not mindspore)))
    return items


@st.composite
def conversions(draw: st.DrawFn, *, max_params: int = 3, dividing_only: bool = False, pipeline: bool = True,
                missing: bool = True, nested: bool = True, opt: bool = True, mindspore: bool = False,
                device_counts: Sequence[int] = DEVICE_COUNTS) -> Conversion:
    """A random conversion. `dividing_only` keeps per-stage device counts that divide each other;
    `missing` sometimes makes a strategy None; `mindspore` keeps to what MindSpore's converter accepts
    (dividing counts, no 0-d parameters in strategies, optimizer sharding only over replicas)."""
    dividing_only = dividing_only or mindspore
    count = draw(st.integers(1, max_params))
    names = [f"p{i}.weight" for i in range(count)]
    ndims = [draw(st.integers(1 if mindspore else 0, 3)) for _ in names]
    src_devices = draw(st.sampled_from(device_counts))
    dst_choices = [d for d in device_counts if not dividing_only or max(d, src_devices) % min(d, src_devices) == 0]
    dst_devices = draw(st.sampled_from(dst_choices))
    sides: list[Strategy | None] = []
    for devices in (src_devices, dst_devices):
        if missing and draw(st.integers(0, 5)) == 5:
            sides.append(None)
            continue
        stages = draw(st.integers(1, 2)) if pipeline else 1
        sides.append(_strategy(draw(_side(names, ndims, devices, stages, nested, opt, mindspore)), stages))
    src, dst = sides
    return Conversion(src, dst, _shapes(draw, [s for s in sides if s is not None], dict(zip(names, ndims))))


def _shapes(draw: st.DrawFn, strategies: Sequence[Strategy], ndims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Full shapes every layout of each parameter splits evenly (a small multiple of the pieces' lcm)."""
    pieces: dict[str, list[tuple[int, ...]]] = {}
    for strategy in strategies:
        for name, entries in strategy.layouts_by_param().items():
            for _, item in entries:
                pieces.setdefault(name, []).append(ParamLayout.from_item(item).pieces)
                ndims.setdefault(name, len(item.dim_axes()))
    shapes = {}
    for name, ndim in ndims.items():
        units = [math.lcm(*(p[d] for p in pieces.get(name, [])), 1) for d in range(ndim)]
        shapes[name] = tuple(u * draw(st.integers(1, 2)) for u in units)
    return shapes
