"""LAR-Gen's decoupled image-prompt attention (IP-Adapter files): a loader for ``models/ipadapter`` and an apply node."""
from __future__ import annotations

import os

import folder_paths
from comfy_api.latest import io

from faithful_inpaint.kernels.image_prompt import ImagePromptAdapter
from faithful_inpaint.patching import image_prompt as ip
from faithful_inpaint.patching import prompt
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice, check_image, check_mask
from faithful_inpaint.patching.model_files import model_file_path, read_model_file, register_model_folder
from faithful_inpaint.patching.schedule import ScheduleWindow

CATEGORY = "inpaint/faithful/LAR-Gen"
FOLDER = "ipadapter"
LOADER_NODE = "ImagePromptAdapterLoader"
APPLY_NODE = "ImagePromptApply"
Adapter = io.Custom("IMAGE_PROMPT_ADAPTER")

# ComfyUI has no "ipadapter" folder of its own; IPAdapter_plus registers models/ipadapter the same way.
register_model_folder(FOLDER)


def load_adapter(path: str, node: str = LOADER_NODE, input_name: str = "adapter_name") -> ImagePromptAdapter:
    """An adapter file (public IP-Adapter layout, .safetensors or .bin) as a module; variant, family and layer
    widths are read from its keys and shapes."""
    sd, _ = read_model_file(path, node, input_name)
    try:
        return ImagePromptAdapter.from_state_dict(sd)
    except (ValueError, KeyError) as err:
        raise NodeInputError(node, input_name, f"{os.path.basename(path)}: {err}") from err


class ImagePromptAdapterLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=LOADER_NODE,
            display_name="Load image-prompt adapter (IP-Adapter)",
            category=CATEGORY,
            description="Loads an IP-Adapter file from models/ipadapter (linear, plus or full; SD1.5 or SDXL, told "
                        "apart by the weights, not the file name).",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list(FOLDER),
                                   tooltip="A file in models/ipadapter, e.g. ip-adapter_sd15.safetensors.")],
            outputs=[Adapter.Output(display_name="adapter")],
        )

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        return io.NodeOutput(load_adapter(model_file_path(FOLDER, adapter_name, LOADER_NODE, "adapter_name")))


class ImagePromptApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=APPLY_NODE,
            display_name="Apply image prompt (decoupled attention)",
            category=CATEGORY,
            description="Adds a subject image to the prompt: every cross-attention layer gets Z + beta x Z_image, "
                        "Z_image attending to the image's tokens (LAR-Gen eq. 5-7, IP-Adapter). Patches a copy of "
                        "the model; chains any cross-attention patch already on it (IPAdapter_plus included).",
            inputs=[
                io.Model.Input("model"),
                Adapter.Input("adapter"),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the adapter was trained with "
                                    "(ViT-H-14 for SD1.5 and the *_vit-h SDXL files, ViT-bigG-14 for SDXL)."),
                io.Image.Input("image", tooltip="The subject image (several: their tokens form one prompt). It is "
                               "resized and centre-cropped to the encoder's square input."),
                io.Float.Input("beta", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="Strength of the image prompt (eq. 7). 0 = the text-only model. LAR-Gen: 1 "
                                       "in training stage 1, 0.3 with RefineNet; IP-Adapter: 1, ~0.5 with text."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active part of the schedule (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active part of the schedule (1 = last step)."),
                io.Combo.Input("mode", options=list(ip.MODES), default=ip.BOTH,
                               tooltip="text + image; image only (the prompt of the conditional half is replaced "
                                       "by the empty prompt: connect clip); text only (the image is replaced by "
                                       "the null image, as when training drops it)."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Where the image prompt acts (1 = fully); resized to every layer."),
                io.Clip.Input("clip", optional=True, tooltip="The checkpoint's CLIP; only for mode 'image only'."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, adapter, clip_vision, image, beta, start_percent, end_percent, mode, attn_mask=None,
                clip=None) -> io.NodeOutput:
        check_choice(APPLY_NODE, "mode", mode, ip.MODES)
        if not isinstance(adapter, ImagePromptAdapter):
            raise NodeInputError(APPLY_NODE, "adapter", "connect the output of 'Load image-prompt adapter' "
                                 f"({LOADER_NODE}).")
        if start_percent >= end_percent:
            raise NodeInputError(APPLY_NODE, "end_percent",
                                 f"must be larger than start_percent ({start_percent} >= {end_percent}).")
        check_image(APPLY_NODE, "image", image)
        attn_mask = None if attn_mask is None else check_mask(APPLY_NODE, "attn_mask", attn_mask)
        spec = adapter.spec
        ip.check_clip_vision(spec, clip_vision, APPLY_NODE)
        layers = ip.check_model(spec, model, APPLY_NODE)
        null_text = None
        if mode == ip.IMAGE_ONLY:
            if clip is None:
                raise NodeInputError(APPLY_NODE, "clip", "mode 'image only' replaces the prompt of the conditional "
                                     "half by the empty prompt, encoded with the checkpoint's CLIP: connect it.")
            null_text = prompt.encode(clip, "", APPLY_NODE, expected_dim=spec.context_dim).context
        tokens, null_tokens = ip.encode_image_tokens(adapter, clip_vision, image)
        hooks = ip.ImagePromptHooks.from_adapter(
            adapter, layers, tokens, null_tokens, beta=float(beta),
            window=ScheduleWindow.from_percent(model, start_percent, end_percent), mode=mode,
            mask=attn_mask, null_text=null_text, node=APPLY_NODE)
        return io.NodeOutput(hooks.install(model))


NODES = [ImagePromptAdapterLoader, ImagePromptApply]
