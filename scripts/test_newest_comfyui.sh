#!/usr/bin/env bash
# Run the whole suite against the second tested host, upstream ComfyUI v0.12.1, in an environment of its own.
# CI does not run this: v0.12.1 is not installable from the package registry. It needs either a ComfyUI checkout or
# a git directory whose history holds upstream's commit "ComfyUI v0.12.1" (any public repository that merges
# upstream ComfyUI, e.g. github.com/hiddenswitch/pip-and-uv-installable-ComfyUI; a bare clone or mirror will do).
#
#   COMFYUI_PATH=~/ComfyUI bash scripts/test_newest_comfyui.sh [pytest args]       # an existing checkout
#   COMFYUI_GIT_DIR=/path/to/repo.git bash scripts/test_newest_comfyui.sh [...]    # extract v0.12.1 from history
#
#   COMFYUI_COMMIT   the commit to extract (default: upstream's "ComfyUI v0.12.1")
#   COMFYUI_DEST     where to extract it (default: <repo>/.comfyui-newest)
#   FAITHFUL_VENV    the environment (default: <repo>/.venv-newest): the pinned torch and test requirements of
#                    requirements/, then the host's own pins where they differ from the pinned host's (its web
#                    frontend, workflow templates and embedded docs: the browser test drives that frontend) and the
#                    packages it needs beyond them (comfy-kitchen, comfy-aimdo)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FAITHFUL_VENV:-$root/.venv-newest}
py=${PYTHON:-python3}

if [ -z "${COMFYUI_PATH:-}" ]; then
  git_dir=${COMFYUI_GIT_DIR:?set COMFYUI_PATH to a ComfyUI checkout or COMFYUI_GIT_DIR to a git directory with upstream ComfyUI history}
  commit=${COMFYUI_COMMIT:-3be017516643d9a8d8ed85904512ed4b240ef8c6}
  dest=${COMFYUI_DEST:-$root/.comfyui-newest}
  if [ ! -f "$dest/.extracted-$commit" ]; then
    echo "test_newest_comfyui: extracting $(git --git-dir="$git_dir" log -1 --format='%h %s' "$commit") into $dest" >&2
    rm -rf "$dest" && mkdir -p "$dest"
    # Blob by blob: public copies lack a few large blobs (a tokenizer that SD models do not use); they are skipped.
    git --git-dir="$git_dir" ls-tree -r "$commit" | while read -r mode type sha path; do
      [ "$type" = blob ] || continue
      mkdir -p "$dest/$(dirname "$path")"
      if git --git-dir="$git_dir" cat-file blob "$sha" > "$dest/$path" 2>/dev/null; then
        if [ "$mode" = 100755 ]; then chmod +x "$dest/$path"; fi
      else
        rm -f "$dest/$path"; echo "test_newest_comfyui: blob absent, skipped: $path" >&2
      fi
    done
    touch "$dest/.extracted-$commit"
  fi
  export COMFYUI_PATH=$dest
fi
[ -f "$COMFYUI_PATH/comfy/model_patcher.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH is not a ComfyUI checkout" >&2; exit 1; }

# The host's own requirements that the suite needs beyond (or instead of) the pinned set: its web frontend, workflow
# templates and embedded docs, pinned to exact versions that change with each release (requirements/host.txt pins
# the pinned host's: 0.12.1 pins frontend 1.37.11 and templates 0.8.31, where 0.3.75 pins 1.32.9 and 0.7.25; the
# browser test checks the UI is the host's own), and comfy-kitchen / comfy-aimdo (new since 0.4). torchaudio is not
# needed.
mapfile -t host_reqs < <(grep -E '^(comfyui-frontend-package|comfyui-workflow-templates|comfyui-embedded-docs|comfy-kitchen|comfy-aimdo)\b' \
                         "$COMFYUI_PATH/requirements.txt" | tr -d '\r' || true)
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$venv/bin/python" -c 'import comfy_kitchen, comfy_aimdo' 2>/dev/null; then
  echo "test_newest_comfyui: building $venv" >&2
  [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
  "${pip[@]}" -r "$root/requirements/torch.txt"
fi
# Every run, not only when building: an environment built earlier (or for another host) may lack a test pin added
# since (open_clip for the HPS metric) or hold another frontend. pip leaves satisfied pins alone.
"${pip[@]}" -r "$root/requirements/test.txt" -c "$root/requirements/torch.txt"
[ ${#host_reqs[@]} -eq 0 ] || "${pip[@]}" "${host_reqs[@]}" -c "$root/requirements/torch.txt"

cd "$root"
echo "test_newest_comfyui: ComfyUI $(cd "$COMFYUI_PATH" && "$venv/bin/python" -c 'import comfyui_version; print(comfyui_version.__version__)' 2>/dev/null || echo '(version unknown)') at $COMFYUI_PATH" >&2
exec "$venv/bin/python" -m pytest tests "$@"
