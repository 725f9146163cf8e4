"""ComfyUI adapters: one module per mechanism, all registered through one V3 extension."""
from comfy_api.latest import ComfyExtension

from .painta import PAIntAPatch
from .pilot import PILOTGuidance, PILOTSampler
from .rasg import RASGGuidance, RASGSampler
from .upscale import InpaintConditionalUpscale


class FaithfulInpaintExtension(ComfyExtension):
    async def get_node_list(self):
        return [PAIntAPatch, RASGGuidance, RASGSampler, InpaintConditionalUpscale, PILOTGuidance, PILOTSampler]
