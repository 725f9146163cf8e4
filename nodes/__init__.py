"""ComfyUI adapters: one module per mechanism, all registered through one V3 extension.

Each module lists its nodes in ``NODES``; adding a module here is the one step that registers it.
"""
from comfy_api.latest import ComfyExtension

from faithful_inpaint.nodes import brush_branch, crop, image_prompt, painta, pilot, rasg, refinenet, toy_world, upscale
from faithful_inpaint.nodes.example_inputs import install_example_inputs

MODULES = (painta, rasg, upscale, pilot, crop, image_prompt, brush_branch, refinenet, toy_world)


class FaithfulInpaintExtension(ComfyExtension):
    async def get_node_list(self):
        # ComfyUI 0.3.75 calls get_node_list (not on_load) when it loads the pack: the bundled workflows' images
        install_example_inputs()
        return [node for module in MODULES for node in module.NODES]
