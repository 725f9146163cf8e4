"""Faithful Inpaint: ComfyUI nodes that make diffusion inpainting follow the prompt, the subject and the mask.

ComfyUI imports this file when the repository sits in ``custom_nodes/``. The node modules (which import ComfyUI)
are loaded only when ComfyUI asks for them, so ``kernels/`` stays importable without ComfyUI.
"""


async def comfy_entrypoint():
    from .nodes import FaithfulInpaintExtension

    return FaithfulInpaintExtension()
