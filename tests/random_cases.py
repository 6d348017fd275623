"""Random conversion cases that MindSpore can also convert: strategies, full tensors, source files."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layout_reference import reference_slice
from mpickpt.ckpt import save_checkpoint
from mpickpt.layout import Layouts
from mpickpt.strategy import LayoutItem, Strategy, StrategyItem, save_strategy

DTYPES = {"Float32": np.float32, "Float16": np.float16, "BFloat16": np.uint16, "Int32": np.int32}
EXTRAS = [  # parameters outside the strategy, the same on every rank
    ("global_step", "Int32", (1,), np.array([7], dtype=np.int32)),
    ("learning_rate", "Float32", (), np.array(0.01, dtype=np.float32)),
]
DEVICE_PAIRS = [(8, 4), (4, 8), (8, 2), (2, 8), (4, 4), (8, 8), (1, 4), (4, 1), (2, 2), (8, 1)]


@dataclass(frozen=True)
class RandomCase:
    """Strategies and full tensors of one random case."""

    src: Strategy
    dst: Strategy
    tensors: dict[str, tuple[str, np.ndarray]]  # name -> (dtype, full tensor)


def _factor(count: int, rng: np.random.Generator) -> tuple[int, ...]:
    """A random device matrix whose product is count."""
    axes = []
    while count > 1:
        f = int(rng.choice([d for d in range(2, count + 1) if count % d == 0]))
        axes.append(f)
        count //= f
    if not axes or rng.random() < 0.3:
        axes.insert(int(rng.integers(0, len(axes) + 1)), 1)
    return tuple(axes)


def _layout(
    name: str, ndim: int, devices: int, rng: np.random.Generator, allow_opt: bool, descending: bool
) -> LayoutItem:
    dev = _factor(devices, rng)
    axes = list(range(len(dev)))
    rng.shuffle(axes)
    tensor_map = []
    for _ in range(ndim):
        tensor_map.append(axes.pop() if axes and rng.random() < 0.6 else -1)
    if descending:
        # Split axes in descending order along the tensor dims, as MindSpore's compiler writes them.
        # MindSpore's converter mis-slices optimizer-sharded layouts with other orders (see FORMATS notes).
        order = iter(sorted((a for a in tensor_map if a >= 0), reverse=True))
        tensor_map = [next(order) if a >= 0 else -1 for a in tensor_map]
    used = {a for a in tensor_map if a >= 0}
    unused = [a for a in range(len(dev)) if a not in used and dev[len(dev) - 1 - a] > 1]
    size = step = 0
    if allow_opt and unused and rng.random() < 0.5:
        replicas = math.prod(dev[len(dev) - 1 - a] for a in unused)
        size = int(rng.choice([-1] + [d for d in range(2, replicas + 1) if replicas % d == 0]))
        innermost = min(unused)
        step = math.prod(dev[len(dev) - innermost:]) if innermost else 1
    return LayoutItem(
        name=name, dev_matrix=dev, tensor_map=(tuple(tensor_map),),
        param_split_shape=((),), indices_offset=((),),  # MindSpore reads element 0 of both
        opt_weight_shard_step=step, opt_weight_shard_size=size,
    )


def _strategy(items: list[LayoutItem]) -> Strategy:
    return Strategy(
        current_stage=0,
        strategy_items=(StrategyItem("Default/network-MatMul-op0", 0, ((1, 1),)),),
        layout_items=tuple(items),
    )


def make_case(
    seed: int, params: int = 4, devices: tuple[int, int] | None = None, any_axis_order: bool = False
) -> RandomCase:
    """A random case; by default one MindSpore's converter handles: device counts that divide each other
    and split axes in descending order."""
    rng = np.random.default_rng(seed)
    src_devices, dst_devices = devices or DEVICE_PAIRS[int(rng.integers(len(DEVICE_PAIRS)))]
    unit = math.lcm(16, src_devices, dst_devices)
    src_items, dst_items, tensors = [], [], {}
    for i in range(params):
        name = f"layer{i}.weight"
        ndim = int(rng.integers(1, 4))
        src_items.append(_layout(name, ndim, src_devices, rng, allow_opt=True, descending=not any_axis_order))
        dst_items.append(_layout(name, ndim, dst_devices, rng, allow_opt=True, descending=not any_axis_order))
        shape = tuple(int(rng.integers(1, 3)) * unit for _ in range(ndim))
        dtype = str(rng.choice(list(DTYPES)))
        data = rng.integers(-1000, 1000, size=shape).astype(DTYPES[dtype])
        if dtype == "BFloat16":  # finite bfloat16 bit patterns (MindSpore round-trips through float32)
            data = (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        tensors[name] = (dtype, data)
    return RandomCase(_strategy(src_items), _strategy(dst_items), tensors)


def write_case(case: RandomCase, root: Path) -> None:
    """Strategy files and one checkpoint per source rank (global_step and learning_rate too)."""
    root.mkdir(parents=True, exist_ok=True)
    save_strategy(case.src, root / "src_strategy.ckpt")
    save_strategy(case.dst, root / "dst_strategy.ckpt")
    layouts = Layouts.from_strategy(case.src)
    for rank in range(layouts.device_count):
        tensors = []
        for name, (dtype, full) in case.tensors.items():
            box = layouts.slice_box(name, full.shape, rank)
            piece = np.ascontiguousarray(full[tuple(slice(a, b) for a, b in zip(box.start, box.stop))])
            tensors.append((name, dtype, piece.shape, piece))
        tensors += EXTRAS
        path = root / "src" / f"rank_{rank}" / f"checkpoint_{rank}.ckpt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, tensors)


def target_slices(case: RandomCase) -> list[dict[str, np.ndarray]]:
    """Ground truth: the full tensors split by the target layout, per target rank, as the independent
    layout model (``tests/layout_reference.py``) cuts them."""
    result = []
    for rank in range(math.prod(case.dst.layout_items[0].dev_matrix)):
        slices = {}
        for name, (_, full) in case.tensors.items():
            bounds = reference_slice(case.dst, name, full.shape, rank)
            assert bounds is not None  # one pipeline stage: every rank holds every parameter
            slices[name] = full[tuple(slice(a, b) for a, b in zip(*bounds))]
        result.append(slices)
    return result
