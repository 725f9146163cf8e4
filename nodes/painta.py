"""PAIntAPatch: ProFI-Painter's prompt-aware introverted attention as a MODEL patch."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels.painta import REFERENCE_SMOOTHING_SIGMA
from faithful_inpaint.patching import family, prompt
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice, check_mask
from faithful_inpaint.patching.painta import PAIntAHooks
from faithful_inpaint.patching.schedule import ScheduleWindow
from faithful_inpaint.kernels.previews import mask_levels_preview

log = logging.getLogger(__name__)

NODE_ID = "PAIntAPatch"
# Toggle name -> latent downsample factor of the UNet level (image side / 8 / factor).
LEVELS = {"at_h8": 1, "at_h16": 2, "at_h32": 4, "at_h64": 8}


class PAIntAPatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE_ID,
            display_name="PAIntA (prompt-aware attention)",
            category="inpaint/faithful/ProFI-Painter",
            description="Damps how much the region being inpainted copies known pixels that do not match its prompt "
                        "(ProFI-Painter's PAIntA). Patches a copy of the model; use with an inpainting model.",
            inputs=[
                io.Model.Input("model"),
                io.Clip.Input("clip", tooltip="The CLIP of the same checkpoint; encodes the region prompt."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="What should appear in the masked region (usually the positive prompt)."),
                io.Mask.Input("mask", tooltip="1 = region to inpaint; resized to each attention resolution."),
                io.Boolean.Input("at_h8", default=False, tooltip="Act on self-attention at 1/8 of the image size."),
                io.Boolean.Input("at_h16", default=True, tooltip="Act at 1/16 of the image size (paper: on)."),
                io.Boolean.Input("at_h32", default=True, tooltip="Act at 1/32 of the image size (paper: on)."),
                io.Boolean.Input("at_h64", default=False, tooltip="Act at 1/64 of the image size."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active part of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active part (paper: 0.5, the steps with t > 500)."),
                io.Float.Input("smoothing", default=round(REFERENCE_SMOOTHING_SIGMA, 4), min=0.0, max=3.0,
                               step=0.01, tooltip="Sigma of the 3x3 Gaussian smoothing of the relevance map c "
                                                  "(0 = off; default as the reference implementation)."),
                io.Combo.Input("layer_mask", options=list(mask_ops.LAYER_MASK_CHOICES), default="area >= 0.5",
                               optional=True,
                               tooltip="How the mask becomes each attention resolution's token mask: masked when "
                                       "at least half the token's area is (area >= 0.5), or the HD-Painter "
                                       "diffusers port's bicubic resize > 0.5 (weighs the block's centre). PAIntA "
                                       "is sensitive to single tokens; see mask_levels."),
            ],
            outputs=[
                io.Model.Output(),
                io.Image.Output(display_name="mask_levels",
                                tooltip="The mask at each active attention resolution, as PAIntA sees it."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, prompt: str, mask, at_h8, at_h16, at_h32, at_h64, start_percent, end_percent,
                smoothing, layer_mask="area >= 0.5") -> io.NodeOutput:
        check_choice(NODE_ID, "layer_mask", layer_mask, mask_ops.LAYER_MASK_CHOICES)
        fam = family.detect(model, NODE_ID)
        rule = mask_ops.LAYER_MASK_CHOICES[layer_mask]
        toggles = {"at_h8": at_h8, "at_h16": at_h16, "at_h32": at_h32, "at_h64": at_h64}
        downsamples = tuple(d for name, d in LEVELS.items() if toggles[name])
        if start_percent >= end_percent:
            raise NodeInputError(NODE_ID, "end_percent",
                                 f"must be larger than start_percent ({start_percent} >= {end_percent}).")
        m = check_mask(NODE_ID, "mask", mask)
        preview = mask_levels_preview(m, downsamples, rule=rule)
        if not downsamples:
            log.warning("[Faithful Inpaint] %s: no resolution is switched on; the model is returned unchanged.",
                        NODE_ID)
            return io.NodeOutput(model, preview)
        if not bool((m > 0.5).any()):
            log.warning("[Faithful Inpaint] %s: the mask is empty (nothing to inpaint); the model is returned "
                        "unchanged.", NODE_ID)
            return io.NodeOutput(model, preview)
        region = prompt_encode(clip, prompt, fam)
        if region.empty:
            log.warning("[Faithful Inpaint] %s: the prompt is empty, so no pixel is prompt-relevant; the model is "
                        "returned unchanged.", NODE_ID)
            return io.NodeOutput(model, preview)

        patched = model.clone()
        hooks = PAIntAHooks(prompt=region, mask=m, downsamples=downsamples,
                            window=ScheduleWindow.from_percent(patched, start_percent, end_percent),
                            smoothing_sigma=smoothing, node=NODE_ID, layer_rule=rule)
        if not hooks.install(patched):
            log.warning("[Faithful Inpaint] %s: %s has no self-attention at the chosen resolutions; the model is "
                        "returned unchanged.", NODE_ID, fam.name)
            return io.NodeOutput(model, preview)
        return io.NodeOutput(patched, preview)


def prompt_encode(clip, text: str, fam: family.ModelFamily):
    if clip is None:
        raise NodeInputError(NODE_ID, "clip", "no CLIP given; connect the CLIP output of your checkpoint loader.")
    return prompt.encode(clip, text, NODE_ID, expected_dim=fam.context_dim)


NODES = [PAIntAPatch]
