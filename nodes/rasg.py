"""RASG (ProFI-Painter): a MODEL patch that records the attention RASG needs, and the RASG SAMPLER."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy_api.latest import io

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.patching import family, rasg
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice, check_mask
from faithful_inpaint.patching.prompt import token_positions

log = logging.getLogger(__name__)

GUIDANCE_ID = rasg.GUIDANCE_NODE
LEVELS = {"1/32 (paper)": (4,), "1/16": (2,), "1/16 + 1/32": (2, 4)}
SIGMA_RULES = {"paper (eq. 11)": "paper", "reference code": "reference"}
LAYER_MASKS = mask_ops.LAYER_MASK_CHOICES


class RASGGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=GUIDANCE_ID,
            display_name="RASG guidance (prepare model)",
            category="inpaint/faithful/ProFI-Painter",
            description="Prepares a copy of the model for the RASG sampler: gradients through the UNet and a recorder "
                        "of the prompt's cross-attention at one resolution. Use with the RASG sampler.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint; finds the prompt's word tokens."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt whose attention RASG pulls into the mask (usually the positive "
                                        "prompt of the masked region)."),
                io.Combo.Input("attention_resolution", options=list(LEVELS), default="1/32 (paper)",
                               tooltip="Which cross-attention maps the objective averages."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Region to inpaint (1 = regenerate). Without it RASG reads the latent's noise "
                                      "mask (InpaintModelConditioning / SetLatentNoiseMask)."),
                io.Combo.Input("layer_mask", options=list(LAYER_MASKS), default="area >= 0.5", optional=True,
                               tooltip="How the mask becomes the target at the attention resolution: a token is "
                                       "masked when at least half its area is (area >= 0.5), or the HD-Painter "
                                       "diffusers port's bicubic resize > 0.5 (weighs the block's centre)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, clip, prompt, attention_resolution, mask=None, layer_mask="area >= 0.5") -> io.NodeOutput:
        check_choice(GUIDANCE_ID, "attention_resolution", attention_resolution, LEVELS)
        check_choice(GUIDANCE_ID, "layer_mask", layer_mask, LAYER_MASKS)
        family.detect(model, GUIDANCE_ID)
        _, indices, words = token_positions(clip, prompt)
        if not words:
            log.warning("[Faithful Inpaint] %s: the prompt is empty; RASG will pull only the end-of-text token's "
                        "attention into the mask.", GUIDANCE_ID)
        m = None
        if mask is not None:
            m = check_mask(GUIDANCE_ID, "mask", mask)
            if not bool((m > 0.5).any()):
                raise NodeInputError(GUIDANCE_ID, "mask", "the mask is empty: there is no region to guide into.")
        try:
            patched = rasg.install(model, indices, LEVELS[attention_resolution], m, LAYER_MASKS[layer_mask])
        except ValueError as err:  # no attention layer at that level in this model
            raise NodeInputError(GUIDANCE_ID, "attention_resolution", str(err)) from err
        return io.NodeOutput(patched)


class RASGSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=rasg.SAMPLER_NODE,
            display_name="RASG sampler",
            category="inpaint/faithful/ProFI-Painter",
            description="DDIM whose noise term is the standardised gradient of an attention-segmentation objective "
                        "(ProFI-Painter eq. 8). For SamplerCustom / SamplerCustomAdvanced; the model must come "
                        "through RASGGuidance. eta 0 is plain deterministic DDIM.",
            inputs=[
                io.Float.Input("eta", default=0.15, min=0.0, max=1.0, step=0.01,
                               tooltip="Strength of the guidance term (paper: 0.15; the diffusers port's default "
                                       "0.01; with the reference-code sigma rule any eta is about 1e-3 as strong)."),
                io.Combo.Input("sigma_rule", options=list(SIGMA_RULES), default="paper (eq. 11)",
                               tooltip="sigma_t as the paper's eq. 11, or as the official code computes it "
                                       "(per-step alphas: about 1e-3 x eta, a much weaker push)."),
                io.Float.Input("guide_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First step (as a fraction of the steps) that uses the gradient."),
                io.Float.Input("guide_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Steps from here on draw plain noise: fewer guided steps, less time."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, eta, sigma_rule, guide_start, guide_end) -> io.NodeOutput:
        check_choice(rasg.SAMPLER_NODE, "sigma_rule", sigma_rule, SIGMA_RULES)
        if guide_start > guide_end:
            raise NodeInputError(rasg.SAMPLER_NODE, "guide_end", "must not be smaller than guide_start.")
        sampler = comfy.samplers.KSAMPLER(rasg.sample_rasg, extra_options={
            "eta": eta, "sigma_rule": SIGMA_RULES[sigma_rule], "guide_start": guide_start, "guide_end": guide_end})
        return io.NodeOutput(sampler)


NODES = [RASGGuidance, RASGSampler]
