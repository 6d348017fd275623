"""MindSpore ``.ckpt`` files: a header-only indexer with zero-copy views, and a streaming writer.

See :mod:`mpickpt.ckpt_reader`, :mod:`mpickpt.ckpt_writer` and :mod:`mpickpt.dtypes`.
"""

from __future__ import annotations

from mpickpt.ckpt_reader import (
    CRC_TRAILER_SIZE,
    MAPTENSOR_DTYPE,
    CheckpointIndex,
    TensorEntry,
    index_checkpoint,
)
from mpickpt.atomic import tmp_path_for
from mpickpt.ckpt_writer import PIECE_SIZE, CheckpointWriter, save_checkpoint
from mpickpt.dtypes import DTYPES, dtype_itemsize, numpy_dtype

__all__ = [
    "CRC_TRAILER_SIZE",
    "DTYPES",
    "MAPTENSOR_DTYPE",
    "PIECE_SIZE",
    "CheckpointIndex",
    "CheckpointWriter",
    "TensorEntry",
    "dtype_itemsize",
    "index_checkpoint",
    "numpy_dtype",
    "save_checkpoint",
    "tmp_path_for",
]
