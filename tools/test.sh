#!/usr/bin/env bash
# Install mpickpt with its test tools into .venv (numpy 2, MPICH from PyPI) and MindSpore into
# .venv-mindspore (numpy < 2: MindSpore 2.10's BFloat16 paths fail with numpy 2; the MindSpore
# comparison tests run it in subprocesses), then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[mpich,test]'
python3 -m venv .venv-mindspore
.venv-mindspore/bin/python -m pip install -q --upgrade pip
.venv-mindspore/bin/python -m pip install -q 'mindspore==2.10.0' 'numpy<2'
. .venv/bin/activate
python -m pytest "$@"
