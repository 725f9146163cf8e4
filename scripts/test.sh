#!/usr/bin/env bash
# The test command: set up the isolated environment (scripts/setup_env.sh) and run the whole suite against a real
# ComfyUI. Extra arguments go to pytest. COMFYUI_PATH=/path/to/ComfyUI tests against your own checkout instead.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
venv=${FAITHFUL_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m pytest tests "$@"
