"""Run MindSpore snippets in a subprocess of MindSpore's own environment (never in the pytest process).

MindSpore and mpickpt both register ``checkpoint.proto`` in protobuf's default descriptor pool, and
MindSpore 2.10 needs numpy < 2 (its BFloat16 paths fail with numpy 2) while mpickpt is tested with
numpy 2, so MindSpore lives in its own virtual environment: ``.venv-mindspore`` next to ``.venv``
(``tools/test.sh`` makes both), or the interpreter named by ``MPICKPT_MINDSPORE_PYTHON``. Usage::

    @requires_mindspore
    @pytest.mark.mindspore
    def test_x(tmp_path):
        out = run_mindspore("import mindspore as ms; print(ms.__version__)", tmp_path)
"""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MINDSPORE_PYTHON = Path(os.environ.get("MPICKPT_MINDSPORE_PYTHON", REPO / ".venv-mindspore" / "bin" / "python"))
FIND_SPEC = "import importlib.util, sys; sys.exit(importlib.util.find_spec('mindspore') is None)"


@functools.cache
def mindspore_missing() -> str | None:
    """Why MindSpore cannot run here, or None when its interpreter exists and finds the package."""
    if not MINDSPORE_PYTHON.is_file():
        return f"no MindSpore interpreter at {MINDSPORE_PYTHON} (bash tools/test.sh makes .venv-mindspore)"
    found = subprocess.run([str(MINDSPORE_PYTHON), "-c", FIND_SPEC], capture_output=True, timeout=60, check=False)
    return None if found.returncode == 0 else f"{MINDSPORE_PYTHON} cannot import mindspore"


HAVE_MINDSPORE = mindspore_missing() is None
requires_mindspore = pytest.mark.skipif(not HAVE_MINDSPORE, reason=mindspore_missing() or "")


def run_mindspore(script: str, cwd: Path, args: Sequence[str] = (), timeout: float = 900) -> str:
    """Run ``script`` with MindSpore's interpreter in ``cwd``; return its stdout, fail the test on error."""
    if not HAVE_MINDSPORE:
        pytest.skip(mindspore_missing() or "")
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(GLOG_v="3", PYTHONPATH=str(REPO))  # MindSpore logs errors only; this checkout's mpickpt
    proc = subprocess.run(
        [str(MINDSPORE_PYTHON), "-c", script, *args],
        cwd=Path(cwd).resolve(),
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
