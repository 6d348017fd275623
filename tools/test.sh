#!/usr/bin/env bash
# Install mpickpt with its test tools into .venv (MPICH from PyPI, MindSpore for the compatibility
# tests) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e '.[mpich,test,compat]'
python -m pytest "$@"
