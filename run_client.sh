#!/usr/bin/env bash
# Run a fedllm client. Accepts every option of client_http.py. Uses the project's .venv when there is one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
[ -x "$here/.venv/bin/python" ] && python="$here/.venv/bin/python"
exec "$python" "$here/client_http.py" "$@"
