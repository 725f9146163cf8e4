"""LAR-Gen's RefineNet: a loader for ``models/refinenet`` and an apply node (MODEL -> MODEL)."""
from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import io

from faithful_inpaint.kernels import refinenet as rn
from faithful_inpaint.patching import family
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice, check_image
from faithful_inpaint.patching.model_files import model_file_path, read_model_file, register_model_folder
from faithful_inpaint.patching.refinenet import RefineNet, RefineNetHooks, decoder_layers
from faithful_inpaint.patching.schedule import ScheduleWindow

log = logging.getLogger(__name__)

CATEGORY = "inpaint/faithful/LAR-Gen"
FOLDER = "refinenet"
LOADER_NODE = "RefineNetLoader"
APPLY_NODE = "RefineNetApply"
RefineNetType = io.Custom("FAITHFUL_REFINENET")
# Toggle name -> latent downsample factor of the decoder level (image side / 8 / factor), as PAIntAPatch names them.
LEVELS = {"at_h8": 1, "at_h16": 2, "at_h32": 4, "at_h64": 8}
UNCOND_NONE, UNCOND_SUBJECT = "no subject (null image prompt)", "subject too"

# ComfyUI has no folder for RefineNet files: models/refinenet, registered the way other packs add theirs.
register_model_folder(FOLDER)


def load_refinenet(path: str, node: str = LOADER_NODE, input_name: str = "refinenet_name") -> RefineNet:
    name = os.path.basename(path)
    tensors, metadata = read_model_file(path, node, input_name)
    try:
        config, encoder, unet = rn.split_file(tensors, metadata)
    except (ValueError, KeyError) as err:
        raise NodeInputError(node, input_name, f"{name}: {err}") from err
    return RefineNet.from_parts(config, encoder, unet, name)


class RefineNetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=LOADER_NODE,
            display_name="Load RefineNet (LAR-Gen)",
            category=CATEGORY,
            description="Loads a RefineNet file from models/refinenet (exported by the LAR-Gen stage-2 training "
                        "recipe): its detail encoder and the cross-attention weights of the RefineNet UNet; the "
                        "rest of the RefineNet UNet is copied from the model it is applied to.",
            inputs=[io.Combo.Input("refinenet_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A .safetensors file in models/refinenet.")],
            outputs=[RefineNetType.Output(display_name="refinenet")],
        )

    @classmethod
    def execute(cls, refinenet_name) -> io.NodeOutput:
        path = model_file_path(FOLDER, refinenet_name, LOADER_NODE, "refinenet_name")
        return io.NodeOutput(load_refinenet(path))


class RefineNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=APPLY_NODE,
            display_name="Apply RefineNet (subject detail)",
            category=CATEGORY,
            description="LAR-Gen's RefineNet: at every step an auxiliary UNet denoises the subject image at the same "
                        "noise level, and the main UNet's decoder self-attention also attends to its features "
                        "(eq. 9-10), carrying the subject's fine detail into the inpainted region. Patches a copy "
                        "of the model; use with Apply image prompt (LAR-Gen recommends beta 0.3 with RefineNet).",
            inputs=[
                io.Model.Input("model", tooltip="The (inpainting) model the RefineNet was trained with."),
                RefineNetType.Input("refinenet"),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the RefineNet was trained with "
                                                           "(ViT-H-14 for the default config)."),
                io.Vae.Input("vae", tooltip="The checkpoint's VAE: encodes the subject image."),
                io.Image.Input("subject", tooltip="The subject image (one, or one per image of the batch). Best at "
                                                  "the size of the latent being sampled; it is resized otherwise."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="1 = the paper's concatenation; 0 = off (plain self-attention); between: the "
                                       "appended features move from the layer's own towards the subject's."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active part of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active part of the schedule (1 = last step)."),
                io.Combo.Input("uncond", options=[UNCOND_NONE, UNCOND_SUBJECT], default=UNCOND_NONE,
                               tooltip="What the unconditional (negative) half sees: no subject, as classifier-free "
                                       "guidance with a null image prompt (eq. 12), or the subject too (weaker)."),
                io.Boolean.Input("at_h8", default=True, tooltip="Decoder self-attention at 1/8 of the image size."),
                io.Boolean.Input("at_h16", default=True, tooltip="Decoder layers at 1/16 of the image size."),
                io.Boolean.Input("at_h32", default=True, tooltip="Decoder layers at 1/32 of the image size."),
                io.Boolean.Input("at_h64", default=True, tooltip="Decoder layers at 1/64 of the image size (SD1.5 "
                                                                 "has none)."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, refinenet, clip_vision, vae, subject, strength, start_percent, end_percent, uncond,
                at_h8, at_h16, at_h32, at_h64) -> io.NodeOutput:
        check_choice(APPLY_NODE, "uncond", uncond, (UNCOND_NONE, UNCOND_SUBJECT))
        if not isinstance(refinenet, RefineNet):
            raise NodeInputError(APPLY_NODE, "refinenet", f"connect the output of 'Load RefineNet' ({LOADER_NODE}).")
        if start_percent >= end_percent:
            raise NodeInputError(APPLY_NODE, "end_percent",
                                 f"must be larger than start_percent ({start_percent} >= {end_percent}).")
        fam = family.detect(model, APPLY_NODE)
        if fam.context_dim != refinenet.config.context_dim:
            raise NodeInputError(APPLY_NODE, "refinenet", f"{refinenet.name} makes {refinenet.config.context_dim}-wide "
                                 f"detail tokens but {fam.name} models use {fam.context_dim}-wide ones: it was "
                                 "trained for another model family.")
        toggles = {"at_h8": at_h8, "at_h16": at_h16, "at_h32": at_h32, "at_h64": at_h64}
        layers = decoder_layers(model.get_model_object("diffusion_model"),
                                tuple(d for name, d in LEVELS.items() if toggles[name]))
        if strength == 0 or not layers:
            why = "strength is 0" if strength == 0 else "no decoder self-attention at the chosen resolutions"
            log.warning("[Faithful Inpaint] %s: %s; the model is returned unchanged.", APPLY_NODE, why)
            return io.NodeOutput(model)
        check_image(APPLY_NODE, "subject", subject, min_side=8)
        tokens = refinenet.detail_tokens(clip_vision, subject[..., :3], APPLY_NODE)
        latent = vae.encode(subject[..., :3])
        patched = model.clone()
        hooks = RefineNetHooks(
            auxiliary=refinenet.auxiliary_for(model, APPLY_NODE), detail_tokens=tokens,
            subject_latent=latent.float().to(torch.device("cpu")), layers=frozenset(layers), strength=float(strength),
            uncond_sees_subject=uncond == UNCOND_SUBJECT,
            window=ScheduleWindow.from_percent(patched, start_percent, end_percent),
            inpaint_input=refinenet.config.inpaint_input, node=APPLY_NODE)
        hooks.install(patched)
        return io.NodeOutput(patched)


NODES = [RefineNetLoader, RefineNetApply]
