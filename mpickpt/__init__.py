"""mpickpt: convert MindSpore distributed checkpoints between sharding strategies, without MindSpore.

`import mpickpt as ms` gives MindSpore's conversion API under the same names. The API is imported on
first use, so `import mpickpt.strategy` and the command line stay light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_API = (
    "ckpt_to_safetensors",
    "load_distributed_checkpoint",
    "load_segmented_checkpoints",
    "merge_pipeline_strategys",
    "rank_list_for_transform",
    "safetensors_to_ckpt",
    "transform_checkpoint_by_rank",
    "transform_checkpoints",
    "unified_safetensors",
)

__all__ = ["MpickptError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(".api", __name__), name)
    if name == "MpickptError":
        return importlib.import_module(".errors", __name__).MpickptError
    raise AttributeError(f"module 'mpickpt' has no attribute {name!r}")
