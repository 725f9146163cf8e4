"""The toy world's loaders: the shapes-world model (MODEL, CLIP, VAE) and its CLIP vision from the pack's toy files.

The model is ComfyUI's SD1.5 model class (``supported_models.SD15``) at toy size, 4 or 9 input channels; the CLIP is
ComfyUI's SD1 CLIP wrapper with its SD1 (CLIP-L) tokenizer and the checkpoint's small text encoder
(kernels/toy_world.ToyTextEncoder) in place of CLIP-L's transformer; the VAE is a weight file in ComfyUI's TAESD
format whose weights are set by hand so that it computes the exact pixel <-> latent mapping of the toy world:
encoding averages each 8 x 8 pixel block and mixes its colour into 4 channels (kernels/toy_world.cells_to_latent,
divided by SD1.5's latent scale), decoding inverts the mix and repeats each latent cell as an 8 x 8 block. Nothing is
trained; any ComfyUI loads it as a TAESD. The toy CLIP vision is ComfyUI's CLIP vision transformer at toy size with
fixed random weights. Used by nodes/toy_world.py and the training scripts.
"""
from __future__ import annotations

import json

import comfy.sd1_clip
import torch

from faithful_inpaint.kernels import toy_world as tw
from faithful_inpaint.patching.image_prompt import clip_vision_from_config
from faithful_inpaint.patching.model_files import read_model_file




def load_unet(sd: dict, config: dict):
    """A ModelPatcher around ComfyUI's SD1.5 model class built with the toy config and the checkpoint's weights."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    model_config = comfy.supported_models.SD15(config)
    model_config.unet_config.update({"num_heads": config["num_heads"], "num_head_channels": -1})
    load_device = mm.get_torch_device()
    params = sum(v.numel() for v in sd.values())
    dtype = mm.unet_dtype(model_params=params, supported_dtypes=model_config.supported_inference_dtypes)
    model_config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device,
                                                                 model_config.supported_inference_dtypes))
    model = model_config.get_model({})          # 9 input channels -> ComfyUI makes it an inpainting model
    missing, unexpected = model.diffusion_model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"the UNet weights do not match the toy config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.to(mm.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=mm.unet_offload_device())


class ToyClipL(torch.nn.Module, comfy.sd1_clip.ClipTokenWeightEncoder):
    """Stands in for CLIP-L inside ComfyUI's SD1ClipModel: the same token ids in, [B, 77, 768] states out."""

    special_tokens = {"start": tw.START_TOKEN, "end": tw.END_TOKEN, "pad": tw.END_TOKEN}

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__()
        # Tiny: always fp32 (ComfyUI would pick fp16 for text encoders, even on a CPU).
        self.encoder = tw.ToyTextEncoder(**model_options["toy_text_config"], device=device)

    def set_clip_options(self, options):
        pass                                # no layer choice: the encoder has one output

    def reset_clip_options(self):
        pass

    def encode(self, tokens):
        # Textual-inversion embeddings arrive as tensors among the ids: they are unknown words here (id -1).
        ids = torch.tensor([[t if isinstance(t, int) else -1 for t in row] for row in tokens],
                           device=self.encoder.position_embedding.device)
        states, pooled = self.encoder(ids)
        return states.float(), pooled.float()

    def load_sd(self, sd):
        return self.encoder.load_state_dict(sd, strict=True)


def load_clip(sd: dict, config: dict):
    """ComfyUI's CLIP object: SD1 tokenizer, SD1ClipModel wrapper, the toy text encoder inside."""
    import comfy.sd
    import comfy.supported_models_base

    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, parameters=sum(v.numel() for v in sd.values()),
                         model_options={"clip_l_class": ToyClipL, "toy_text_config": config})
    clip.load_sd(sd)
    return clip


# The TAESD layout ComfyUI detects from "taesd_decoder.1.weight" (comfy/taesd/taesd.py): convolutions with 64
# channels, residual blocks relu(convs(x) + x), stride-2 convolutions down, nearest upsampling x2 up, a soft clamp
# tanh(x / 3) * 3 at the decoder's input. With every block's convolutions at zero and all activations >= 0 the
# blocks are identities, a stride-2 convolution can average 2 x 2 pixels, and a tiny latent scale keeps the clamp
# linear to float precision: the network computes the toy mapping exactly.
VAE_SCALE = 1e-3


def pixel_vae_state_dict() -> dict:
    import comfy.taesd.taesd

    net = comfy.taesd.taesd.TAESD(latent_channels=4)
    mix = torch.from_numpy(tw.LATENT_MIX)                     # [4, 3]
    to_vae = 1.0 / tw.SD15_LATENT_SCALE                       # model latent -> VAE latent
    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        convs = lambda seq: [m for m in seq if isinstance(m, torch.nn.Conv2d)]  # noqa: E731 (top level only)
        enc, dec = convs(net.taesd_encoder), convs(net.taesd_decoder)
        rgb = range(3)
        for c in rgb:
            enc[0].weight[c, c, 1, 1] = 1.0                   # input in [0, 1] -> channels 0-2
            dec[-1].weight[c, c, 1, 1] = 1.0                  # channels 0-2 -> output in [0, 1]
            for down in enc[1:-1]:
                down.weight[c, c, 1:, 1:] = 0.25              # 2 x 2 average (stride 2, padding 1)
            for up in dec[1:-1]:
                up.weight[c, c, 1, 1] = 1.0                   # identity after each nearest upsampling
        # encoder output e = scale * M (2x - 1) / 0.18215; TAESD.encode divides by vae_scale
        enc[-1].weight[:, :3, 1, 1] = VAE_SCALE * to_vae * 2 * mix
        enc[-1].bias[:] = -VAE_SCALE * to_vae * mix.sum(1)
        # decoder input is (latent * vae_scale); x = (M^T (0.18215 * latent) + 1) / 2
        dec[0].weight[:3, :, 1, 1] = mix.T / (2 * VAE_SCALE * to_vae)
        dec[0].bias[:3] = 0.5
        net.vae_scale.fill_(VAE_SCALE)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def load_vae():
    import comfy.sd

    return comfy.sd.VAE(sd=pixel_vae_state_dict())


# The toy CLIP vision: ComfyUI's CLIP vision transformer (comfy.clip_model.CLIPVisionModelProjection) at toy size,
# with fixed random weights (training/toy_world.py --make-clip-vision). A subject is resized to 64 px and cut into
# 8 x 8 patches of 8 px; the random features of a ViT this small still tell the 12 colour-shape subjects apart
# (tests/test_toy_lar_gen.py), and the adapter trained on top of them learns what they mean.
CLIP_VISION_CONFIG = {"model_type": "clip_vision_model", "image_size": 64, "patch_size": 8, "num_channels": 3,
                      "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3,
                      "projection_dim": 32, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
                      "dropout": 0.0}


def load_clip_vision(path: str, node: str = "ToyWorldClipVisionLoader", input_name: str = "clip_vision"):
    """The toy CLIP_VISION from a file written by ``training/toy_world.py --make-clip-vision``."""
    sd, metadata = read_model_file(path, node, input_name)
    meta = json.loads(metadata.get(tw.META_KEY, "{}"))
    if meta.get("kind") != "clip_vision":
        raise ValueError(f"{path} is not a toy-world CLIP vision file (its {tw.META_KEY} metadata has no "
                         "kind 'clip_vision')")
    model = clip_vision_from_config(meta["clip_vision_config"])
    missing, unexpected = model.load_sd(sd)
    if missing or unexpected:
        raise ValueError(f"the weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def read_checkpoint(path: str, node: str = "ToyWorldLoader", input_name: str = "checkpoint") -> tuple[dict, dict]:
    """(tensors, the toy metadata) of a toy checkpoint file."""
    sd, metadata = read_model_file(path, node, input_name)
    if tw.META_KEY not in metadata:
        raise ValueError(f"{path} is not a toy-world checkpoint (no {tw.META_KEY} metadata)")
    meta = json.loads(metadata[tw.META_KEY])
    if meta.get("kind", "checkpoint") != "checkpoint":
        raise ValueError(f"{path} is a toy-world {meta['kind']} file, not a checkpoint")
    return sd, meta


def load_toy_world(path: str):
    """(MODEL, CLIP, VAE, metadata) from a toy checkpoint file."""
    sd, meta = read_checkpoint(path)
    unet_sd = {k[len(tw.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(tw.UNET_PREFIX)}
    text_sd = {k[len(tw.TEXT_PREFIX):]: v.float() for k, v in sd.items() if k.startswith(tw.TEXT_PREFIX)}
    return load_unet(unet_sd, meta["unet_config"]), load_clip(text_sd, meta["text_config"]), load_vae(), meta
