"""PILOT (coherent inpainting by latent optimisation): a MODEL patch and the PILOT SAMPLER for SamplerCustom."""
from __future__ import annotations

import logging

import comfy.samplers
from comfy_api.latest import io

from faithful_inpaint.patching import family, pilot
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice
from faithful_inpaint.patching.prompt import token_positions

log = logging.getLogger(__name__)

CATEGORY = "inpaint/faithful/PILOT"
# "reference": the official text configuration (100 DDIM steps, optimise every 10 steps, 10 inner steps).
# "fast": optimise every 20 steps with 5 inner steps: a quarter of the backward passes of the reference schedule
# at the same step count (our choice; the reference's 200-step config uses 20 / 20).
PRESETS = {"reference": None, "fast": {"every": 20, "inner_steps": 5}}
# How each attention layer's inside map is made from the latent mask (kernels/pilot.py inside_map; README).
INSIDE_MAPS = {"reference (bilinear, = 1)": "reference", "area (block fully inside)": "area"}
MASK_MODES = {"binary (reference)": "binary", "soft": "soft"}


class PILOTGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=pilot.GUIDANCE_NODE,
            display_name="PILOT guidance (prepare model)",
            category=CATEGORY,
            description="Prepares a copy of a plain (4-channel) model for the PILOT sampler: gradients through the "
                        "UNet, a recorder of the prompt's cross-attention below the highest resolution, and "
                        "optionally semantic boundary control. Use with the PILOT sampler in SamplerCustom.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The CLIP of the checkpoint; finds the prompt's word tokens."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="The prompt of the masked region (usually the positive prompt); its word "
                                        "tokens' attention is pulled into the mask."),
                io.Boolean.Input("semantic_boundary_control", default=True,
                                 tooltip="Zero the word tokens' attention outside the fully masked latent pixels "
                                         "(every layer, both CFG halves, while the PILOT sampler runs). On in the "
                                         "reference code and in the paper's full method; the loss reads the "
                                         "attention before it."),
                io.Combo.Input("inside_map", options=list(INSIDE_MAPS), default="reference (bilinear, = 1)",
                               tooltip="Which pixels of each attention layer count as inside the mask (the semantic "
                                       "loss's foreground and boundary control's map). reference: the mask resized "
                                       "bilinearly to the layer, inside where it equals 1 (at 1/4 and 1/8 the "
                                       "block's centre decides), as the official code; area: the whole block is "
                                       "masked. They differ only for masks not aligned to the layer's blocks."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, clip, prompt, semantic_boundary_control,
                inside_map="reference (bilinear, = 1)") -> io.NodeOutput:
        check_choice(pilot.GUIDANCE_NODE, "inside_map", inside_map, INSIDE_MAPS)
        family.detect(model, pilot.GUIDANCE_NODE)
        _, _, indices = token_positions(clip, prompt)
        if not indices:
            log.warning("[Faithful Inpaint] %s: the prompt has no word token; PILOT will optimise the background "
                        "loss only.", pilot.GUIDANCE_NODE)
        try:
            patched = pilot.install(model, indices, semantic_boundary_control, INSIDE_MAPS[inside_map])
        except ValueError as err:
            raise NodeInputError(pilot.GUIDANCE_NODE, "model", str(err)) from err
        return io.NodeOutput(patched)


class PILOTSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=pilot.SAMPLER_NODE,
            display_name="PILOT sampler",
            category=CATEGORY,
            description="DDIM (eta 0) with PILOT's latent optimisation (background + semantic-centralisation loss, "
                        "SGD with momentum on x_t) and, after the coherence stage, background blending. For "
                        "SamplerCustom with a masked latent (VAEEncode + SetLatentNoiseMask); the model must come "
                        "through PILOT guidance. Reference: 100 steps, ddim_uniform.",
            inputs=[
                io.Combo.Input("preset", options=list(PRESETS), default="reference",
                               tooltip="reference: the values below; fast: optimise every 20 steps with 5 inner "
                                       "steps (overrides optimise_every and inner_steps)."),
                io.Int.Input("optimise_every", default=10, min=1, max=1000,
                             tooltip="Optimise x_t every k sampling steps (reference 10)."),
                io.Int.Input("inner_steps", default=10, min=0, max=100,
                             tooltip="Gradient steps per optimisation (reference 10); each is a forward and backward "
                                     "pass of the UNet on the conditional half."),
                io.Float.Input("lr", default=0.025, min=0.0, max=1.0, step=0.001,
                               tooltip="Learning rate (reference: 0.025 text, 0.03 with ControlNet / IP-Adapter); "
                                       "scaled by 1.002^(1000 - t) after the first step."),
                io.Float.Input("lr_warmup", default=0.007, min=0.0, max=1.0, step=0.001,
                               tooltip="Learning rate of the first sampling step, used as is (reference: 0.007 "
                                       "text and IP-Adapter, 0.01 ControlNet)."),
                io.Float.Input("coef", default=150.0, min=0.0, max=10000.0, step=1.0,
                               tooltip="Weight of the semantic-centralisation loss (reference 150)."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Coherence scale: optimise while t >= 1000 (1 - gamma), then blend the known "
                                       "image in (reference: 1 text, 0.8 ControlNet / IP-Adapter; 0: blend only)."),
                io.Float.Input("momentum", default=0.7, min=0.0, max=0.99, step=0.01,
                               tooltip="SGD momentum (reference 0.7); the velocity is reset every timestep."),
                io.Combo.Input("mask", options=list(MASK_MODES), default="binary (reference)",
                               tooltip="binary: the latent noise mask thresholded at 0.5, as the reference code "
                                       "(its masks are binary); soft: ComfyUI's resized mask as it is, so a "
                                       "feathered edge weights the background loss and the blend."),
            ],
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, preset, optimise_every, inner_steps, lr, lr_warmup, coef, gamma, momentum=0.7,
                mask="binary (reference)") -> io.NodeOutput:
        check_choice(pilot.SAMPLER_NODE, "preset", preset, PRESETS)
        check_choice(pilot.SAMPLER_NODE, "mask", mask, MASK_MODES)
        options = {"every": optimise_every, "inner_steps": inner_steps, "lr": lr, "lr_warmup": lr_warmup,
                   "coef": coef, "gamma": gamma, "momentum": momentum, "mask": MASK_MODES[mask]}
        options.update(PRESETS[preset] or {})
        return io.NodeOutput(comfy.samplers.KSAMPLER(pilot.sample_pilot, extra_options=options))


NODES = [PILOTGuidance, PILOTSampler]
