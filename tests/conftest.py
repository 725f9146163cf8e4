"""Every test runs against a real ComfyUI: the pinned host or the checkout named by COMFYUI_PATH.

The host is started once per session with its own base directory, and the pack is loaded as a custom node the way
ComfyUI's start-up loads it, then made importable as ``faithful_inpaint``.
"""
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from headless import host  # noqa: E402

host.start(base_directory=tempfile.mkdtemp(prefix="faithful-inpaint-tests-"))
host.load_pack_nodes()
