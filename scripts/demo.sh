#!/usr/bin/env bash
# Set up .venv and run the demo: a real federation (gunicorn server + 3 client processes) on 127.0.0.1.
# Extra arguments go to `python -m fedllm.demo` (e.g. --num_rounds 5, --model_name_or_path, --dataset_name).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
exec .venv/bin/python -m fedllm.demo "$@"
