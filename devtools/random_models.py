"""Real ComfyUI UNet architectures with random weights, built in-process.

Used by the tests, the benchmarks and the smoke-checkpoint generator. Models are built the way ComfyUI's executor
builds them: under ``torch.inference_mode()``, so their weights are inference tensors exactly like weights a
loader node produces (a gradient pass that works here works for users too).

``family`` is one of ``sd15``, ``sd2`` (v-prediction, fp32 attention), ``sdxl``; ``size`` is ``tiny`` (unit tests:
a few M parameters, same block layout) or ``full`` (the real shapes).
"""
from __future__ import annotations

import copy

import torch

# Full-size UNet configs as ComfyUI's model detection produces them (comfy/model_detection.py).
UNET_CONFIGS = {
    "sd15": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sd2": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 1024,
        "num_head_channels": 64, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
    "sdxl": {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64,
        "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    },
}

# SD's AutoencoderKL (SD1.x, SD2.x and SDXL share the layout; ComfyUI reads their files with this shape).
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}

# Tiny variants keep each family's block layout (which levels have attention, linear vs conv projections,
# head layout, context width) and shrink channels, depth and levels.
_TINY = {
    "sd15": {"model_channels": 32, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 1, 1],
             "transformer_depth": [1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1],
             "transformer_depth_middle": 1, "num_heads": 4},
    # SD2 and SDXL fix the head width at 64 (ComfyUI's unet_extra_config), so their tiny widths start at 64.
    "sd2": {"model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 1, 1],
            "transformer_depth": [1, 1, 1], "transformer_depth_output": [1, 1, 1, 1, 1, 1],
            "transformer_depth_middle": 1},
    "sdxl": {"model_channels": 64, "channel_mult": [1, 2, 2], "num_res_blocks": [1, 1, 1],
             "transformer_depth": [0, 1, 2], "transformer_depth_output": [0, 0, 1, 1, 2, 2],
             "transformer_depth_middle": 1},
}

FAMILIES = tuple(UNET_CONFIGS)


def unet_config(family: str, size: str = "tiny", inpaint: bool = False) -> dict:
    if family not in UNET_CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    cfg = copy.deepcopy(UNET_CONFIGS[family])
    if size == "tiny":
        cfg.update(copy.deepcopy(_TINY[family]))
    elif size != "full":
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    if inpaint:
        cfg["in_channels"] = 9
    return cfg


def model_config(family: str, size: str = "tiny", inpaint: bool = False):
    """The ComfyUI ``supported_models`` config object for a family (SD15, SD20, SDXL)."""
    import comfy.supported_models as sm

    cls = {"sd15": sm.SD15, "sd2": sm.SD20, "sdxl": sm.SDXL}[family]
    return cls(unet_config(family, size, inpaint))


def build_model(family: str = "sd15", size: str = "tiny", inpaint: bool = False, seed: int = 0):
    """A ComfyUI ``ModelPatcher`` around a random-weight UNet, built under inference mode like a loader node.

    SD2 4-channel models are built as v-prediction (the 768-v models; SD2 inpainting models are epsilon).
    """
    import comfy.model_base
    import comfy.model_management
    import comfy.model_patcher

    config = model_config(family, size, inpaint)
    offload = comfy.model_management.unet_offload_device()
    with torch.inference_mode():
        if family == "sd2" and not inpaint:
            model = comfy.model_base.BaseModel(config, model_type=comfy.model_base.ModelType.V_PREDICTION)
        else:
            model = config.get_model({})
        if inpaint:
            model.set_inpaint()
        randomise(model, seed)
        model.to(offload)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=offload)


def randomise(model, seed: int) -> None:
    """Give every parameter small random values (ComfyUI's ops skip initialisation, leaving them empty)."""
    gen = torch.Generator().manual_seed(seed)
    # Normalisation gains near 1, found by module type: many of ComfyUI's GroupNorms have no "norm" in their name
    # (in_layers.0, out_layers.0, out.0), and gains near 0 would make the output almost independent of the input.
    norm_gains = {f"{module_name}.weight" for module_name, module in model.named_modules()
                  if isinstance(module, (torch.nn.GroupNorm, torch.nn.LayerNorm))}
    for name, p in model.named_parameters():
        if p.numel() == 0:
            continue
        fan_in = p[0].numel() if p.dim() > 1 else 1
        if name.endswith("bias") or p.dim() == 1:
            val = torch.randn(p.shape, generator=gen) * 0.02
            if name in norm_gains or ("norm" in name and name.endswith("weight")):
                val = val + 1.0
        else:
            val = torch.randn(p.shape, generator=gen) / max(fan_in, 1) ** 0.5
        p.copy_(val.to(p.dtype))


def build_clip(family: str = "sd15", seed: int = 0):
    """A ComfyUI ``CLIP`` (real tokenizer, real text-encoder architecture, random weights) for ``family``."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip
    from comfy.text_encoders import sd2_clip

    classes = {"sd15": (comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer),
               "sd2": (sd2_clip.SD2ClipModel, sd2_clip.SD2Tokenizer),
               "sdxl": (comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer)}[family]

    class Target:
        clip, tokenizer = classes
        params = {}

    with torch.inference_mode():
        clip = comfy.sd.CLIP(Target)
        randomise(clip.cond_stage_model, seed)
    return clip


def build_flux_model(seed: int = 0):
    """A tiny Flux (a DiT, not a UNet): for testing that the pack refuses models it cannot patch."""
    import dataclasses

    import comfy.ldm.flux.model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm

    cfg = {"image_model": "flux", "guidance_embed": False, "in_channels": 16, "out_channels": 16, "vec_in_dim": 32,
           "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2, "depth": 1,
           "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2, "qkv_bias": True}
    # ComfyUI 0.4.0 added a required field (which text-id axes carry positions; none for Flux.1, as its
    # model detection sets); older hosts reject the unknown key, so it is set only where FluxParams has it.
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        cfg["txt_ids_dims"] = []
    with torch.inference_mode():
        model = sm.Flux(cfg).get_model({})
        randomise(model, seed)
    device = comfy.model_management.get_torch_device()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def build_vae(size: str = "tiny", seed: int = 0):
    """A ComfyUI VAE with SD's AutoencoderKL layout (8x downscale, 4 latent channels) and random weights:
    ``full`` has SD's real widths (benchmarks), ``tiny`` 32 base channels and one resnet per level (tests)."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    ddconfig = dict(SD_VAE_DDCONFIG)
    if size == "tiny":
        ddconfig.update(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1)
    config = {"params": {"ddconfig": ddconfig, "embed_dim": 4}}
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict().items():
        if k.endswith("weight") and v.dim() > 1:
            sd[k] = torch.randn(v.shape, generator=gen) / max(v[0].numel(), 1) ** 0.5
        elif "norm" in k and k.endswith("weight"):
            sd[k] = torch.ones(v.shape)
        else:
            sd[k] = torch.zeros(v.shape)
    return comfy.sd.VAE(sd=sd, config=config)
