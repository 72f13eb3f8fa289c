#!/usr/bin/env bash
# The tests: set up, then run the whole suite (digits data, tiny tensors, small models; a few minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest tests "$@"
