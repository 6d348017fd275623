"""Strategy files (protobuf or JSON) as frozen dataclasses; MindSpore's pipeline merge.

TYPES ARE THE CONTRACT between modules; the helper owning this file fills in the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
