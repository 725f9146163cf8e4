"""``import faithful_inpaint`` from the repository root (``python -m faithful_inpaint.headless.run``, pytest) when
the pack is neither pip-installed nor loaded by ComfyUI: this file puts the package whose folder is the repository
root (its ``__init__.py``) in its own place in ``sys.modules``. See the package docstring in ``__init__.py``."""
import importlib.util
import sys
from pathlib import Path

if __name__ == "faithful_inpaint":
    _root = Path(__file__).resolve().parent
    _spec = importlib.util.spec_from_file_location(__name__, _root / "__init__.py",
                                                   submodule_search_locations=[str(_root)])
    _package = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _package
    _spec.loader.exec_module(_package)
    # The root's folders (kernels, nodes, training, ...) are the package's subpackages, never top-level modules: left
    # on sys.path, other libraries find them under those bare names (transformers imports any top-level ``kernels``
    # it can find; ComfyUI has a ``nodes`` of its own). The package is registered now, so the root leaves sys.path.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _root]
