#!/usr/bin/env bash
# Run the fedllm parameter server under gunicorn. Accepts every option of server_http.py,
# including --workers (default: $WEB_CONCURRENCY, else 2), --threads, --host, --port,
# --certfile/--keyfile for TLS. Uses the project's .venv when there is one.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
[ -x "$here/.venv/bin/python" ] && python="$here/.venv/bin/python"
case "${1:-}" in
  add-client|add-admin|add-viewer|revoke) exec "$python" "$here/server_http.py" "$@" ;;
esac
exec "$python" "$here/server_http.py" --use_gunicorn "$@"
