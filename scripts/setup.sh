#!/usr/bin/env bash
# Creates .venv if needed and installs ddkit with its dependencies.
# torch is installed first as the CPU build 2.13.0 when no torch is present (any other resolution would pull a
# multi-GB CUDA build); pyproject.toml itself only asks for torch>=2.2.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -c "import ddkit, torch" 
