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
