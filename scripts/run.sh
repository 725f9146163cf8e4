#!/usr/bin/env bash
# The main job: run a bundled (or any UI-format) workflow headless through ComfyUI's execution engine.
# Sets up the isolated environment first (scripts/setup_env.sh); arguments go to `python -m faithful_inpaint.headless.run`.
# COMFYUI_PATH=/path/to/ComfyUI uses your own ComfyUI (and its models/ folder with --comfyui-base).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_env.sh"
venv=${FAITHFUL_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/python" -m faithful_inpaint.headless.run "$@"
