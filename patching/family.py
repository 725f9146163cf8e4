"""Which model family a MODEL is, with a clear error for families the pack's mechanisms do not support.

The mechanisms work on ComfyUI's UNetModel with cross-attention (SD1.x, SD2.x, SDXL and their inpainting,
LoRA-merged or fine-tuned variants). DiT/MMDiT models (Flux, SD3, ...) and video UNets are refused.
"""
from __future__ import annotations

from dataclasses import dataclass

from faithful_inpaint.patching.errors import NodeInputError

FAMILY_BY_CONTEXT_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}


@dataclass(frozen=True)
class ModelFamily:
    name: str            # "SD1.x", "SD2.x", "SDXL"
    context_dim: int     # width of the text embeddings the cross-attention expects
    in_channels: int     # 4 for text-to-image models, 9 for inpainting models
    v_prediction: bool

    @property
    def inpainting(self) -> bool:
        return self.in_channels == 9


def detect(model, node: str, input_name: str = "model") -> ModelFamily:
    """The family of a ModelPatcher's model; NodeInputError for anything the pack cannot patch."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.model_base import ModelType

    base = model.model
    config_name = type(getattr(base, "model_config", None)).__name__
    unet = getattr(base, "diffusion_model", None)
    if not isinstance(unet, UNetModel):
        raise NodeInputError(node, input_name, f"{config_name} models are not supported (this is not a Stable "
                             "Diffusion UNet); use an SD1.x, SD2.x or SDXL model, or their inpainting versions.")
    context_dim = base.model_config.unet_config.get("context_dim")
    uc = base.model_config.unet_config
    if uc.get("use_temporal_attention") or uc.get("use_temporal_resblock"):
        raise NodeInputError(node, input_name, f"video UNets ({config_name}) are not supported.")
    if context_dim not in FAMILY_BY_CONTEXT_WIDTH:
        raise NodeInputError(node, input_name, f"{config_name} (text width {context_dim}) is not supported; "
                             "use an SD1.x, SD2.x or SDXL model.")
    return ModelFamily(
        name=FAMILY_BY_CONTEXT_WIDTH[context_dim],
        context_dim=context_dim,
        in_channels=int(uc.get("in_channels", 4)),
        v_prediction=base.model_type == ModelType.V_PREDICTION,
    )
