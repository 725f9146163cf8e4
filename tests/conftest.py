"""Every test runs against a real ComfyUI: the pinned host or the checkout named by COMFYUI_PATH.

The pack is imported as ``faithful_inpaint`` from the repository root (faithful_inpaint.py there), the host is
started once per session with its own base directory, and the pack is loaded as a custom node the way ComfyUI's
start-up loads it (its ``__init__`` makes ComfyUI's name for it the same package).
"""
import atexit
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from faithful_inpaint.devtools import host  # noqa: E402

_base_directory = tempfile.mkdtemp(prefix="faithful-inpaint-tests-")
atexit.register(shutil.rmtree, _base_directory, ignore_errors=True)  # the host's input/output/user folders go with the run
host.start(base_directory=_base_directory)
host.load_pack_nodes()


import gc  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _pack_root_off_sys_path():
    """pytest sets up the repository root as a package (it has an ``__init__.py``) and puts the root back on sys.path;
    the pack's folders must not be importable under bare names (faithful_inpaint.py says why)."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]


@pytest.fixture(autouse=True, scope="module")
def _release_models_after_each_module():
    """Full-size models loaded by a module's tests are let go before the next module (the suite runs in 24 GB)."""
    yield
    import comfy.model_management

    comfy.model_management.unload_all_models()
    gc.collect()
    comfy.model_management.soft_empty_cache()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): runs compared
    bit for bit use the same kernels, and tiny models on a shared 2-core machine run faster without thread
    contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
