"""Run MindSpore snippets in a subprocess (never import mindspore in the pytest process).

MindSpore and mpickpt both register ``checkpoint.proto`` in protobuf's default descriptor pool,
so MindSpore only ever runs in a child interpreter. Usage::

    @requires_mindspore
    @pytest.mark.mindspore
    def test_x(tmp_path):
        out = run_mindspore("import mindspore as ms; print(ms.__version__)", tmp_path)
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

HAVE_MINDSPORE = importlib.util.find_spec("mindspore") is not None
requires_mindspore = pytest.mark.skipif(not HAVE_MINDSPORE, reason="mindspore is not installed")

_MINDSPORE_DIR = (
    Path(importlib.util.find_spec("mindspore").origin).parent.resolve() if HAVE_MINDSPORE else None  # type: ignore[union-attr]
)


def run_mindspore(script: str, cwd: Path, args: Sequence[str] = (), timeout: float = 900) -> str:
    """Run ``script`` with this interpreter in ``cwd``; return its stdout, fail the test on error."""
    cwd = Path(cwd).resolve()
    if _MINDSPORE_DIR is not None and cwd.is_relative_to(_MINDSPORE_DIR):
        raise ValueError(f"{cwd} is inside the mindspore package; its numpy subpackage would shadow numpy")
    env = dict(os.environ, GLOG_v="3")  # MindSpore logs errors only
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"MindSpore subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}",
            pytrace=False,
        )
    return proc.stdout
