"""Faithful Inpaint: ComfyUI nodes that make diffusion inpainting follow the prompt, the subject and the mask.

Every module of the pack imports the others by the package's own name, ``faithful_inpaint`` (docs/layout.md). That
name resolves in each way the pack is run:

* ComfyUI imports this file from ``custom_nodes/<any folder name>/`` under a name made from the folder's path; the
  lines below make ``faithful_inpaint`` that same module (or, when ``faithful_inpaint`` was imported first, make
  ComfyUI's name point at it), so each file is one module object;
* from the repository root (``python -m faithful_inpaint.<module>``, pytest), ``faithful_inpaint.py`` next to this
  file loads this folder as the package;
* ``pip install`` maps this folder to the package ``faithful_inpaint`` (pyproject.toml).

The node modules (which import ComfyUI) are loaded only when ComfyUI asks for them, so ``kernels/`` stays importable
without ComfyUI.
"""
import sys

if __name__ != "faithful_inpaint":
    sys.modules[__name__] = sys.modules.setdefault("faithful_inpaint", sys.modules[__name__])


async def comfy_entrypoint():
    from faithful_inpaint.nodes import FaithfulInpaintExtension

    return FaithfulInpaintExtension()
