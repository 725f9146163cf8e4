"""ToyWorldLoader, ToyWorldClipVisionLoader and ToyWorldScene: the shapes-world demo model, its image encoder and
its scenes, for ordinary ComfyUI graphs.

ToyWorldLoader reads a toy checkpoint (written by ``python -m faithful_inpaint.training.toy_world``) and returns what
Load Checkpoint returns, so the standard nodes work with it (CLIPTextEncode, VAEEncode, VAEDecode, SetLatentNoiseMask,
InpaintModelConditioning, KSampler ...); what the three parts are: patching/toy_world.py.

ToyWorldClipVisionLoader gives the CLIP_VISION the toy image-prompt adapter and RefineNet were trained with
(ComfyUI's CLIP vision transformer at toy size, fixed random weights). ToyWorldScene gives an inpainting case: the
scene, its mask, the prompt, the scene's caption and the prompted object alone on white (an image prompt).

Files are looked up in the pack's ``toy/`` folder and in ``ComfyUI/models/toy_world/``; what a file holds is read
from its metadata, so each loader lists only its own kind.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from comfy_api.latest import io

from faithful_inpaint.kernels import toy_world as tw
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice
from faithful_inpaint.patching.toy_world import load_clip_vision, load_toy_world

FOLDER = "toy_world"
PACK_TOY_DIR = Path(__file__).resolve().parent.parent / "toy"
DEFAULT_FILES = ("toy_world.safetensors", "toy_world_inpaint.safetensors", "toy_world_sd.safetensors",
                 "toy_world_sd_inpaint.safetensors")
CLIP_VISION_FILE = "toy_clip_vision.safetensors"
TRAIN_HINT = ("train it with `python -m faithful_inpaint.training.toy_world --variant {variant}{recipe} --output-dir "
              "runs/{stem}` and copy runs/{stem}/{stem}.safetensors into the pack's toy/ folder (see the README, toy "
              "world section)")


def _register_folder() -> None:
    import folder_paths

    folder_paths.add_model_folder_path(FOLDER, str(PACK_TOY_DIR))
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))


_register_folder()


def file_names(kind: str, defaults: tuple[str, ...]) -> list[str]:
    """The toy folders' files of ``kind``, plus ``defaults`` (listed even when missing: loading one then says how
    to make it)."""
    import folder_paths

    found = [f for f in folder_paths.get_filename_list(FOLDER)
             if f.endswith(".safetensors") and tw.file_kind(folder_paths.get_full_path(FOLDER, f)) == kind]
    return sorted(set(found) | set(defaults))


# ----------------------------------------------------------------------------------------------------------------
# Nodes


def toy_file_path(node: str, input_name: str, name: str, how_to_make: str) -> str:
    """The full path of the toy file ``name``, or a clear error naming the node, the input and how to make it."""
    import folder_paths

    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise NodeInputError(node, input_name, f"{name} was not found in {PACK_TOY_DIR} or models/{FOLDER}/; "
                                               f"{how_to_make}.")
    return path


class ToyWorldLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ToyWorldLoader",
            display_name="Toy world loader (shapes demo model)",
            category="inpaint/faithful/toy world",
            description="Loads the small shapes-world model the pack ships (or one you trained with "
                        "training/toy_world.py): 256 px scenes of red/green/blue/yellow circles, squares and "
                        "triangles. Outputs work with the standard nodes, like Load Checkpoint's.",
            inputs=[
                io.Combo.Input("checkpoint", options=file_names("checkpoint", DEFAULT_FILES),
                               default=DEFAULT_FILES[0],
                               tooltip="toy_world: 4-channel model (inpaint with SetLatentNoiseMask); "
                                       "toy_world_inpaint: 9-channel inpainting model "
                                       "(InpaintModelConditioning). From the pack's toy/ folder or "
                                       "models/toy_world/."),
            ],
            outputs=[io.Model.Output(), io.Clip.Output(), io.Vae.Output()],
        )

    @classmethod
    def execute(cls, checkpoint: str) -> io.NodeOutput:
        stem = Path(checkpoint).stem
        hint = TRAIN_HINT.format(variant="inpaint" if stem.endswith("_inpaint") else "plain", stem=stem,
                                 recipe=" --recipe sd-inpaint" if stem.startswith("toy_world_sd") else "")
        path = toy_file_path("ToyWorldLoader", "checkpoint", checkpoint, hint)
        try:
            model, clip, vae, _ = load_toy_world(path)
        except (ValueError, KeyError) as err:
            raise NodeInputError("ToyWorldLoader", "checkpoint", f"cannot load {path}: {err}") from err
        return io.NodeOutput(model, clip, vae)


class ToyWorldClipVisionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ToyWorldClipVisionLoader",
            display_name="Toy world CLIP vision loader",
            category="inpaint/faithful/toy world",
            description="Loads the toy world's small CLIP vision encoder (fixed random weights), which the toy "
                        "image-prompt adapter and RefineNet were trained with. Use it where a graph for a real "
                        "model has Load CLIP Vision.",
            inputs=[io.Combo.Input("clip_vision", options=file_names("clip_vision", (CLIP_VISION_FILE,)),
                                   default=CLIP_VISION_FILE,
                                   tooltip="From the pack's toy/ folder or models/toy_world/.")],
            outputs=[io.ClipVision.Output()],
        )

    @classmethod
    def execute(cls, clip_vision: str) -> io.NodeOutput:
        path = toy_file_path("ToyWorldClipVisionLoader", "clip_vision", clip_vision, "write it with `python -m "
                             f"faithful_inpaint.training.toy_world --make-clip-vision toy/{CLIP_VISION_FILE}`")
        try:
            return io.NodeOutput(load_clip_vision(path))
        except (ValueError, KeyError) as err:
            raise NodeInputError("ToyWorldClipVisionLoader", "clip_vision", f"cannot load {path}: {err}") from err


class ToyWorldScene(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ToyWorldScene",
            display_name="Toy world scene (inpainting case)",
            category="inpaint/faithful/toy world",
            description="A generated shapes-world scene with an inpainting mask and prompt. background: the mask "
                        "lies on empty background; nearby: the mask touches another object, and the prompt asks "
                        "for a different colour and shape.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Combo.Input("kind", options=list(tw.CASE_KINDS), default=tw.CASE_KINDS[0]),
                io.Combo.Input("world", options=list(tw.CASE_MAKERS), default="objects", optional=True,
                               tooltip="objects: the first world's cases (plain backgrounds, the toy_world*.safetensors "
                                       "models); neglect: the prompt-neglect world's (striped, checked and gradient "
                                       "backgrounds, a prompt for an object absent from the scene, nearby masks "
                                       "covering part of the neighbour; the toy_world_sd*.safetensors models)."),
            ],
            outputs=[io.Image.Output(display_name="image"), io.Mask.Output(display_name="mask"),
                     io.String.Output(display_name="prompt"), io.String.Output(display_name="caption"),
                     io.Image.Output(display_name="subject",
                                     tooltip="The prompted object alone on white: an image prompt for the hole.")],
        )

    @classmethod
    def execute(cls, seed: int, kind: str, world: str = "objects") -> io.NodeOutput:
        check_choice("ToyWorldScene", "kind", kind, tw.CASE_KINDS)
        check_choice("ToyWorldScene", "world", world, tw.CASE_MAKERS)
        case = tw.CASE_MAKERS[world](seed, kind)
        image = torch.from_numpy(np.ascontiguousarray(case.scene.image()))[None]
        mask = torch.from_numpy(case.mask_image())[None]
        subject = torch.from_numpy(case.subject())[None]
        return io.NodeOutput(image, mask, case.prompt, case.scene.caption, subject)


NODES = [ToyWorldLoader, ToyWorldClipVisionLoader, ToyWorldScene]
