#!/usr/bin/env bash
# Set up .venv and run the whole test suite (CI runs exactly this). Extra arguments go to pytest,
# e.g. `scripts/test.sh -m "not integration"` or `scripts/test.sh tests/test_wire.py`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
