"""MindSpore checkpoint dtype strings and the numpy dtypes that hold their raw bytes.

Content in a `.ckpt` is little-endian C-order data. Two dtypes have no exact numpy twin and are
kept as raw bytes, never converted:

- ``BFloat16``: 2-byte values exposed as ``<u2`` (the bfloat16 bit patterns).
- ``Int4`` (MindSpore's ``qint4x2``): one byte per element, each byte packing two 4-bit values,
  exposed as ``u1``.

``str`` (a string from ``append_dict``) is UTF-32-LE text, 4 bytes per character: one value of
``n`` characters is a single ``<U{n}`` item. :func:`numpy_dtype` gives the unsized ``<U`` (numpy
sizes it from the value, so casting never truncates) and :func:`dtype_itemsize` gives 4.
"""

from __future__ import annotations

import numpy as np

from mpickpt.errors import CheckpointFormatError

_NUMPY_DTYPES: dict[str, np.dtype] = {
    "Bool": np.dtype("?"),
    "Int8": np.dtype("i1"),
    "UInt8": np.dtype("u1"),
    "Int16": np.dtype("<i2"),
    "UInt16": np.dtype("<u2"),
    "Int32": np.dtype("<i4"),
    "UInt32": np.dtype("<u4"),
    "Int64": np.dtype("<i8"),
    "UInt64": np.dtype("<u8"),
    "Float16": np.dtype("<f2"),
    "Float32": np.dtype("<f4"),
    "Float64": np.dtype("<f8"),
    "BFloat16": np.dtype("<u2"),
    "Int4": np.dtype("u1"),
    "str": np.dtype("<U"),
}

DTYPES: tuple[str, ...] = tuple(_NUMPY_DTYPES)
"""Every dtype string MindSpore 2.10 writes into (and loads from) a ``.ckpt`` tensor."""


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype whose items are the stored bytes of one ``dtype`` element (see module doc)."""
    try:
        return _NUMPY_DTYPES[dtype]
    except KeyError:
        raise CheckpointFormatError(f"unknown MindSpore dtype {dtype!r} (known: {', '.join(DTYPES)})") from None


def dtype_itemsize(dtype: str) -> int:
    """Bytes per stored element (per character for ``str``)."""
    return 4 if dtype == "str" else numpy_dtype(dtype).itemsize


MAX_DIMS = 64  # numpy 2's NPY_MAXDIMS: an ndarray has at most 64 dimensions
MAX_NBYTES = (1 << 63) - 1  # numpy's limit on size * itemsize (NPY_MAX_INTP), zero dims left out


def shape_problem(dims: tuple[int, ...], itemsize: int) -> str | None:
    """Why numpy cannot shape an array of ``dims`` (items of ``itemsize`` bytes), or None when it can.

    numpy allows at most ``MAX_DIMS`` dims, and multiplies the non-zero dims and the itemsize, refusing
    a product over ``MAX_NBYTES`` even when another dim is 0 and the array holds nothing.
    """
    if len(dims) > MAX_DIMS:
        return f"{len(dims)} dims, more than numpy's {MAX_DIMS}"
    nbytes = itemsize
    for dim in dims:
        nbytes *= dim or 1
        if nbytes > MAX_NBYTES:
            return f"dims {list(dims)} are too large for numpy"
    return None
