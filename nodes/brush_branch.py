"""BrushBranchLoader + BrushBranchApply: BrushNet / PowerPaint v2 branches and the pack's own (PainterNet,
MTADiffusion, trained with training/) on SD1.5 / SDXL. Every family is applied by the one BrushBranchApply; a
PainterNet branch reads the optional local prompt."""
from __future__ import annotations

import logging
import math

import torch
from comfy_api.latest import io

from faithful_inpaint.kernels.batch import COND, UNCOND
from faithful_inpaint.kernels.brush_branch import keep_mask_at, masked_image
from faithful_inpaint.patching import family
from faithful_inpaint.patching.brush_branch import (LOADER_NODE, BranchConditioning, BrushBranchHooks, LoadedBranch,
                                                    encode_task_prompt, load_branch, plan_for)
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice, check_image, check_mask
from faithful_inpaint.patching.model_files import file_names, model_file_path, register_model_folder
from faithful_inpaint.patching.painternet import check_acp_blocks, pad_context
from faithful_inpaint.patching.schedule import ScheduleWindow

log = logging.getLogger(__name__)

APPLY_NODE = "BrushBranchApply"
FOLDER = "inpaint"
FOLDERS = (FOLDER, "brushnet")    # models/inpaint first, then models/brushnet
NONE = "none"

# ComfyUI has no "inpaint" folder of its own; ComfyUI-BrushNet users keep their branch files in models/inpaint, some
# in models/brushnet: both are listed.
for _folder in FOLDERS:
    register_model_folder(_folder, extra_extensions={".bin"})

Branch = io.Custom("BRUSH_BRANCH")

# PowerPaint's task prompts (branch prompt A / B, positive and negative), as its v2 pipeline builds them; the
# branch embedding is A * fitting + B * (1 - fitting).
POWERPAINT_TASKS = {
    "text guided": (("P_obj", "P_obj"), ("P_obj", "P_obj")),
    "shape guided": (("P_shape", "P_ctxt"), ("P_shape", "P_ctxt")),
    "object removal": (("P_ctxt", "P_ctxt"), ("P_obj", "P_obj")),
    "context aware": (("P_ctxt", "P_ctxt"), ("", "")),
    "image outpainting": (("P_ctxt", "P_ctxt"), ("P_obj", "P_obj")),
}


# --------------------------------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------------------------------

class BrushBranchLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = file_names(FOLDERS)
        return io.Schema(
            node_id=LOADER_NODE,
            display_name="Load Brush Branch (BrushNet / PowerPaint)",
            category="inpaint/faithful/BrushNet",
            description="Loads an inpainting branch from models/inpaint or models/brushnet: public BrushNet "
                        "SD1.5/SDXL and PowerPaint v2 files (recognised by their structure) or a branch trained with "
                        "this pack.",
            inputs=[
                io.Combo.Input("branch_name", options=files,
                               tooltip="The branch file (BrushNet: diffusion_pytorch_model.safetensors)."),
                io.Combo.Input("powerpaint_text_encoder", options=[NONE] + files, default=NONE, optional=True,
                               tooltip="PowerPaint only: its text encoder (PowerPaint_Brushnet/pytorch_model.bin), "
                                       "which holds the task prompts."),
            ],
            outputs=[Branch.Output(display_name="branch")],
        )

    @classmethod
    def execute(cls, branch_name, powerpaint_text_encoder=NONE) -> io.NodeOutput:
        te = None   # both names are checked before anything loads (a stale name used to be ignored silently)
        if powerpaint_text_encoder and powerpaint_text_encoder != NONE:
            te = model_file_path(FOLDERS, powerpaint_text_encoder, LOADER_NODE, "powerpaint_text_encoder")
        path = model_file_path(FOLDERS, branch_name, LOADER_NODE, "branch_name")
        loaded = load_branch(path, te)
        log.info("[Faithful Inpaint] %s: %s is %s", LOADER_NODE, branch_name, loaded.kind.label)
        return io.NodeOutput(loaded)


_FAMILY = {"sd15": "SD1.x", "sdxl": "SDXL"}


class BrushBranchApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=APPLY_NODE,
            display_name="Apply Brush Branch (BrushNet / PowerPaint / PainterNet / MTADiffusion)",
            category="inpaint/faithful/BrushNet",
            description="Runs the branch beside the model on the masked image and adds its features to the model "
                        "(BrushNet; PainterNet also through attention control points). Works with ordinary and "
                        "inpainting SD1.5/SDXL checkpoints; patches a copy.",
            inputs=[
                io.Model.Input("model"),
                Branch.Input("branch"),
                io.Vae.Input("vae"),
                io.Image.Input("image"),
                io.Mask.Input("mask", tooltip="1 = region to inpaint."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative", tooltip="Read by the model and, for PainterNet, by the branch on "
                                                          "the unconditional pass."),
                io.Conditioning.Input("local_prompt", optional=True,
                                      tooltip="PainterNet only: what should appear in the mask (CLIPTextEncode with "
                                              "the same checkpoint's CLIP), read by the branch while the model "
                                              "keeps the positive (global) prompt. Default: the positive prompt."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplies every branch residual (BrushNet's conditioning scale) and "
                                       "PainterNet's attention control points."),
                io.Float.Input("start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active part of the schedule (fraction; 0 = first step)."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active part of the schedule (fraction; 1 = last step)."),
                io.Combo.Input("powerpaint_task", options=list(POWERPAINT_TASKS), default="text guided",
                               optional=True, tooltip="PowerPaint only: the task prompt given to the branch."),
                io.Float.Input("powerpaint_fitting", default=1.0, min=0.3, max=1.0, step=0.01, optional=True,
                               tooltip="PowerPaint only, shape guided: how closely the object fits the mask."),
            ],
            outputs=[
                io.Model.Output(),
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
                io.Latent.Output(display_name="latent",
                                 tooltip="The image encoded (sample it with denoise 1 for BrushNet's setting)."),
            ],
        )

    @classmethod
    def execute(cls, model, branch, vae, image, mask, positive, negative, strength, start, end,
                powerpaint_task="text guided", powerpaint_fitting=1.0, local_prompt=None) -> io.NodeOutput:
        from nodes import InpaintModelConditioning

        check_choice(APPLY_NODE, "powerpaint_task", powerpaint_task, POWERPAINT_TASKS)
        check_image(APPLY_NODE, "image", image, min_side=8)
        check_mask(APPLY_NODE, "mask", mask)
        fam = family.detect(model, APPLY_NODE)
        want = _FAMILY.get(branch.kind.family)
        if fam.name != want:
            raise NodeInputError(APPLY_NODE, "branch", f"{branch.name} is {branch.kind.label}, made for {want} "
                                 f"models, but the model is {fam.name}; use a branch for {fam.name}.")
        _check_fit(branch, model.get_model_object("diffusion_model"))
        if start >= end:
            raise NodeInputError(APPLY_NODE, "end", f"must be larger than start ({start} >= {end}).")
        n_img, n_mask = image.shape[0], mask.reshape(-1, *mask.shape[-2:]).shape[0]
        if n_img != n_mask and 1 not in (n_img, n_mask):
            raise NodeInputError(APPLY_NODE, "mask", f"{n_mask} masks for {n_img} images: give one mask or one per "
                                 "image.")
        record = branch.kind.branch_family
        if local_prompt and not record.local_prompt:
            raise NodeInputError(APPLY_NODE, "local_prompt", f"only a PainterNet branch reads a local prompt; "
                                 f"{branch.name} is {branch.kind.label}: disconnect local_prompt.")

        pixels, m = _crop8(image, mask)
        latent_format = model.get_model_object("latent_format")
        masked = latent_format.process_in(vae.encode(masked_image(pixels, m)[..., :3]))
        keep = keep_mask_at(m, masked.shape[-2], masked.shape[-1])
        context = None
        if record.task_prompt:
            context = _powerpaint_context(branch, powerpaint_task, powerpaint_fitting)
        elif local_prompt:
            context = _local_context(local_prompt, negative, fam.context_dim)

        patched = model.clone()
        hooks = BrushBranchHooks(branch.patcher, BranchConditioning(masked, keep, context), strength,
                                 ScheduleWindow.from_percent(patched, start, end), node=APPLY_NODE)
        hooks.install(patched)

        # Inpainting (9-channel) models also need their usual concat conditioning; InpaintModelConditioning builds it
        # and the encoded image the sampler starts from. Ordinary models keep their conditioning as it is.
        if fam.inpainting:
            positive, negative, latent = InpaintModelConditioning().encode(positive, negative, image, vae, mask,
                                                                           noise_mask=False)
        else:
            latent = {"samples": vae.encode(pixels[..., :3])}
        return io.NodeOutput(patched, positive, negative, latent)


def _check_fit(branch: LoadedBranch, unet) -> None:
    """The branch's residuals (and PainterNet's attention control points) must have a place in this UNet."""
    config = branch.patcher.model.config
    plan = plan_for(unet)
    down, _, up = config.residual_channels()
    missing = check_acp_blocks(unet, config.acp_keys()) if branch.kind.branch_family.attention_control else []
    if (len(down), len(up)) != (plan.n_down, plan.n_up) or missing:
        raise NodeInputError(APPLY_NODE, "branch", f"{branch.name} does not fit this UNet ({len(down)}/{len(up)} "
                             f"down/up outputs for {plan.n_down}/{plan.n_up}"
                             + (f"; attention blocks it lacks: {missing}" if missing else "") + ").")


def _local_context(local_prompt, negative, context_dim: int) -> dict:
    """PainterNet's branch text: the local prompt on conditional rows, the negative on unconditional ones, padded
    to a common length."""
    local, neg = local_prompt[0][0], negative[0][0]
    if local.shape[-1] != context_dim:
        raise NodeInputError(APPLY_NODE, "local_prompt", f"is {local.shape[-1]} wide, the model's text is "
                             f"{context_dim}: encode it with the CLIP of the same checkpoint.")
    tokens = math.lcm(local.shape[1], neg.shape[1])
    return {COND: pad_context(local, tokens), UNCOND: pad_context(neg, tokens)}


def _crop8(image: torch.Tensor, mask: torch.Tensor):
    """Image and mask (resized to the image) cropped to multiples of 8 like ComfyUI's inpaint conditioning."""
    m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    m = torch.nn.functional.interpolate(m, size=image.shape[1:3], mode="bilinear")[:, 0]
    h, w = (image.shape[1] // 8) * 8, (image.shape[2] // 8) * 8
    oy, ox = (image.shape[1] % 8) // 2, (image.shape[2] % 8) // 2
    return image[:, oy:oy + h, ox:ox + w], m[:, oy:oy + h, ox:ox + w]


def _powerpaint_context(branch: LoadedBranch, task: str, fitting: float) -> dict:
    (pos_a, pos_b), (neg_a, neg_b) = POWERPAINT_TASKS[task]

    def mix(a, b):
        ea = encode_task_prompt(branch.task_encoder, branch.task_vectors, a)
        eb = encode_task_prompt(branch.task_encoder, branch.task_vectors, b)
        return ea * fitting + eb * (1.0 - fitting)

    return {COND: mix(pos_a, pos_b), UNCOND: mix(neg_a, neg_b)}


NODES = [BrushBranchLoader, BrushBranchApply]
