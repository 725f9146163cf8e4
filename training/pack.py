"""The pack's own modules, imported as the package ``faithful_inpaint`` (the name the tests and ComfyUI share).

``patching/`` uses package-relative imports, so the training scripts reach it through the package: when ComfyUI
or the test suite has already loaded the pack, its modules are reused (same objects); otherwise the repository
root is registered as ``faithful_inpaint`` (its ``__init__`` imports nothing from ComfyUI).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

PACKAGE = "faithful_inpaint"
ROOT = Path(__file__).resolve().parent.parent


def module(name: str):
    """``module("patching.brush_branch")`` -> faithful_inpaint.patching.brush_branch."""
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PACKAGE}.{name}")
