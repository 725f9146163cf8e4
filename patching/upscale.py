"""ProFI-Painter's inpainting-specialised conditional super-resolution (appendix E), as InpaintConditionalUpscale
(nodes/upscale.py) runs it; callable without the node (tests, scripts): ``conditional_upscale``.

The Stable Diffusion x4 upscaler is conditioned on the low-resolution inpainted result (ComfyUI's own mechanism, as
SD_4XUpscale_Conditioning sets it: ``concat_image`` + ``noise_augmentation``) and sampled with DDIM (eta 0). After
every step the predicted x0 is blended with the x4-VAE encoding of the original high-resolution image outside the
(dilated, blurred) mask (eq. 16), through a post-CFG hook on a clone of the model. The decoded result is Poisson-
blended into the original; pixels outside the blend region are the original's, bit for bit.

Memory (estimated from the architecture; not measured on a GPU). For a 2048 x 2048 output the latent is
512 x 512 x 4:
  * UNet (473 M parameters, ~0.95 GB in fp16). Activations at 512 x 512 latent, cond + uncond batched: the
    256-channel full-resolution feature maps are 256 MiB each (fp16), the stored skips ~1.3 GiB, the 512-channel
    concatenations of the output blocks 512 MiB each; self-attention exists only at the 64 x 64 level (4096 tokens)
    and cross-attention has 77 keys, so no attention matrix is large. Peak activations ~3-4 GiB; ComfyUI itself
    reserves ~10 GiB for this shape (model_base.memory_required, fp16) and runs cond and uncond one after the
    other when less is free.
  * x4 VAE (55 M parameters). Untiled at 2048 px the decoder holds 2048 x 2048 x 256-channel maps (2 GiB each in
    bf16, 4 GiB in fp32) and its mid-block attention has 262 144 tokens: ~8-16 GiB plus the attention workspace,
    which is why ``vae_tiling`` = auto tiles above 1024 x 1024 px. Tiled (512 px tiles): well under 2 GiB.
  Total with tiling: ~6 GB at 2048 px (fits a 24 GB GPU with room; ComfyUI's estimate ~12 GB). CPU memory for the
  Poisson blend: a few 2048 x 2048 x 3 uint8 / float images (< 0.5 GB).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels import sr_blend
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.inputs import check_choice, check_image, check_mask

log = logging.getLogger(__name__)

NODE_ID = "InpaintConditionalUpscale"
VAE_TILING = ("auto", "always", "never")
AUTO_TILE_PIXELS = 1024 * 1024  # "auto" tiles the VAE when the padded image has more pixels than this
TILE_OVERLAP = 64               # pixels


@dataclass
class UpscaleResult:
    image: torch.Tensor            # [B, H, W, 3]
    preview: torch.Tensor          # [B, H, W, 3]
    generated: Optional[torch.Tensor] = None   # decoded sample before the Poisson blend, [B, H, W, 3]
    region: Optional[torch.Tensor] = None      # Poisson blend region, bool [B, H, W]


@dataclass
class X0BlendHook:
    """Post-CFG hook: x0 <- m * x0 + (1 - m) * z_HR (eq. 16), in the model's latent space.

    Keeps the un-blended prediction of the current step in ``raw`` so the DDIM sampler can take the model's own
    eps from it. ``on_step(info)`` (optional) sees every blend: {"sigma", "raw", "blended", "z_hr", "m"}.
    """
    z_hr: torch.Tensor
    m: torch.Tensor
    on_step: Optional[Callable[[dict], None]] = None
    raw: Optional[torch.Tensor] = field(default=None, repr=False)
    _cache: dict = field(default_factory=dict, repr=False)

    def _on(self, like: torch.Tensor):
        key = (like.device, like.dtype)
        if key not in self._cache:
            self._cache = {key: (self.z_hr.to(device=like.device, dtype=like.dtype),
                                 self.m.to(device=like.device, dtype=like.dtype))}
        return self._cache[key]

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        z, m = self._on(denoised)
        blended = sr_blend.blend_x0(denoised, z, m)
        self.raw = denoised
        if self.on_step is not None:
            self.on_step({"sigma": args.get("sigma"), "raw": denoised, "blended": blended, "z_hr": z, "m": m})
        return blended


def ddim_x0_blend_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, hook=None):
    """KSAMPLER function: DDIM, eta 0, the reference's update z_{t-1} = sqrt(abar') x0_blend + sqrt(1-abar') eps.

    ``model`` returns the blended x0 (the hook on the model clone ran after CFG); eps comes from the un-blended x0
    the hook kept. Interrupts are honoured every step.
    """
    import comfy.model_management
    from tqdm.auto import trange

    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        comfy.model_management.throw_exception_if_processing_interrupted()
        if hook is not None:
            hook.raw = None
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        raw = hook.raw if hook is not None and hook.raw is not None else denoised
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = sr_blend.ddim_step(x, raw, denoised, sigmas[i], sigmas[i + 1])
    if hook is not None:
        hook.raw = None
    return x


def check_model(model):
    import comfy.model_base

    inner = getattr(model, "model", None)
    if not isinstance(inner, comfy.model_base.SD_X4Upscaler):
        what = type(inner).__name__ if inner is not None else type(model).__name__
        fmt = type(getattr(inner, "latent_format", None)).__name__ if inner is not None else "?"
        raise NodeInputError(NODE_ID, "model",
                             f"this is a {what} model (latent format {fmt}), not the Stable Diffusion x4 upscaler; "
                             f"load the x4 upscaler checkpoint (x4-upscaler-ema) with Load Checkpoint and connect "
                             f"its MODEL and VAE.")


def check_vae(vae):
    ratio = getattr(vae, "downscale_ratio", None)
    channels = getattr(vae, "latent_channels", None)
    if ratio != 4 or channels != 4:
        raise NodeInputError(NODE_ID, "vae",
                             f"this VAE compresses by {ratio} into {channels} channels; the x4 upscaler needs its "
                             f"own 4x VAE with 4 latent channels (the VAE output of the x4 upscaler checkpoint).")


def _unet_levels(model) -> int:
    cfg = getattr(getattr(model.model, "model_config", None), "unet_config", {}) or {}
    return len(cfg.get("channel_mult", (1, 2, 2, 4)))


def _batches(image, mask, low_res):
    b_img, b_mask, b_lr = image.shape[0], mask.shape[0], low_res.shape[0]
    batch = max(b_img, b_mask, b_lr)
    for name, b in (("image", b_img), ("mask", b_mask), ("low_res", b_lr)):
        if b not in (1, batch):
            raise NodeInputError(NODE_ID, name,
                                 f"batch of {b} does not match the batch of {batch} of the other inputs "
                                 f"(image {b_img}, mask {b_mask}, low_res {b_lr}); give 1 or {batch}.")
    return batch


def _expand(t: torch.Tensor, batch: int) -> torch.Tensor:
    return t if t.shape[0] == batch else t.expand(batch, *t.shape[1:]).contiguous()


def _check_image(name: str, x) -> torch.Tensor:
    return check_image(NODE_ID, name, x)[..., :3].float()


def _use_tiles(vae_tiling: str, height: int, width: int) -> bool:
    check_choice(NODE_ID, "vae_tiling", vae_tiling, VAE_TILING)
    return vae_tiling == "always" or (vae_tiling == "auto" and height * width > AUTO_TILE_PIXELS)


def _overlap(tile_size: int) -> int:
    """Tile overlap in pixels: 64, or a quarter of small tiles (ComfyUI's tilers need tile / 2 > overlap)."""
    return min(TILE_OVERLAP, tile_size // 4)


def _encode(vae, pixels_bhwc, tiled, tile_size):
    if tiled:
        return vae.encode_tiled(pixels_bhwc, tile_x=tile_size, tile_y=tile_size, overlap=_overlap(tile_size))
    return vae.encode(pixels_bhwc)


def _decode(vae, latent, tiled, tile_size):
    if tiled:  # decode_tiled takes latent units (ComfyUI's VAEDecodeTiled divides by the compression the same way)
        c = 4
        return vae.decode_tiled(latent, tile_x=tile_size // c, tile_y=tile_size // c, overlap=_overlap(tile_size) // c)
    return vae.decode(latent)


def _with_concat(conditioning, concat_image, noise_augmentation):
    out = []
    for emb, extra in conditioning:
        extra = extra.copy()
        extra["concat_image"] = concat_image
        extra["noise_augmentation"] = noise_augmentation
        out.append([emb, extra])
    return out


def conditional_upscale(model, vae, positive, negative, image, mask, low_res, *, seed=0, steps=20, cfg=7.5,
                        noise_level=20, mask_dilation=sr_blend.REFERENCE_MASK_DILATION,
                        mask_blur=sr_blend.REFERENCE_MASK_BLUR, poisson_dilation=sr_blend.REFERENCE_POISSON_DILATION,
                        poisson_padding=sr_blend.REFERENCE_POISSON_PADDING, vae_tiling="auto", tile_size=512,
                        on_step: Optional[Callable[[dict], None]] = None) -> UpscaleResult:
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import comfy.utils
    import latent_preview

    check_model(model)
    check_vae(vae)
    image = _check_image("image", image)
    low_res = _check_image("low_res", low_res)
    m = check_mask(NODE_ID, "mask", mask)
    if not (0 <= noise_level <= sr_blend.NOISE_LEVEL_MAX):
        raise NodeInputError(NODE_ID, "noise_level", f"must be in [0, {sr_blend.NOISE_LEVEL_MAX}], not {noise_level}.")
    if steps < 1:
        raise NodeInputError(NODE_ID, "steps", f"must be at least 1, not {steps}.")

    batch = _batches(image, m, low_res)
    _, height, width, _ = image.shape
    if tuple(m.shape[-2:]) != (height, width):
        log.info("[Faithful Inpaint] %s: resizing the mask %s to the image size %s.", NODE_ID,
                 tuple(m.shape[-2:]), (height, width))
        m = mask_ops.resize(m, height, width)
    m = mask_ops.binary(m)
    image, m, low_res = _expand(image, batch), _expand(m, batch), _expand(low_res, batch)

    if not bool(m.any()):
        log.warning("[Faithful Inpaint] %s: the mask is empty (nothing was inpainted); the original image is "
                    "returned unchanged.", NODE_ID)
        return UpscaleResult(image=image.clone(), preview=torch.zeros_like(image),
                             region=torch.zeros(batch, height, width, dtype=torch.bool))
    if height < 8 or width < 8:
        raise NodeInputError(NODE_ID, "image", f"{width} x {height} px is too small for the x4 upscaler.")

    # Sizes: the HR image is reflect-padded (bottom/right) to what the VAE and the UNet need, the low-res to 1/4.
    factor = 4
    multiple = sr_blend.required_multiple(factor, _unet_levels(model))
    hp, wp = sr_blend.padded_size(height, width, multiple)
    lh, lw = hp // factor, wp // factor
    lr_h, lr_w = max(1, round(height / factor)), max(1, round(width / factor))
    if tuple(low_res.shape[1:3]) != (lr_h, lr_w):
        log.info("[Faithful Inpaint] %s: resizing low_res %s to a quarter of the image size %s.", NODE_ID,
                 tuple(low_res.shape[1:3]), (lr_h, lr_w))
    lr = sr_blend.resize_image(low_res.movedim(-1, 1), min(lr_h, lh), min(lr_w, lw))
    lr = sr_blend.pad_bottom_right(lr, lh, lw)                        # [B, 3, lh, lw] in [0, 1]
    hr = sr_blend.pad_bottom_right(image.movedim(-1, 1), hp, wp)      # [B, 3, hp, wp]
    m_pad = sr_blend.pad_bottom_right(m, hp, wp)

    tiled = _use_tiles(vae_tiling, hp, wp)
    comfy.model_management.throw_exception_if_processing_interrupted()
    z_raw = _encode(vae, hr.movedim(1, -1), tiled, tile_size)
    z_hr = model.model.process_latent_in(z_raw.float())               # x4 latent space: * 0.08333
    if tuple(z_hr.shape[-2:]) != (lh, lw):
        raise NodeInputError(NODE_ID, "vae", f"the VAE encoded {hp} x {wp} px to {tuple(z_hr.shape[-2:])}, expected "
                                             f"{(lh, lw)}; use the x4 upscaler checkpoint's VAE.")
    blend_m = sr_blend.x0_blend_mask(m_pad, (lh, lw), dilation=mask_dilation, blur_kernel=mask_blur)

    # Conditioning: exactly what SD_4XUpscale_Conditioning would attach (image in [-1, 1] at latent size).
    concat = lr * 2.0 - 1.0
    noise_aug = float(noise_level) / sr_blend.NOISE_LEVEL_MAX
    pos = _with_concat(positive, concat, noise_aug)
    neg = _with_concat(negative, concat, noise_aug)

    hook = X0BlendHook(z_hr=z_hr, m=blend_m, on_step=on_step)
    patched = model.clone()
    patched.set_model_sampler_post_cfg_function(hook)
    ms = patched.get_model_object("model_sampling")
    ts = sr_blend.ddim_timesteps(int(steps), len(ms.sigmas))
    sigmas = torch.cat([ms.sigmas[ts].float().cpu(), torch.zeros(1)])

    latent = torch.zeros(batch, 4, lh, lw)
    noise = comfy.sample.prepare_noise(latent, seed)
    sampler = comfy.samplers.KSAMPLER(ddim_x0_blend_sampler, extra_options={"hook": hook})
    callback = latent_preview.prepare_callback(patched, len(ts))
    samples = comfy.sample.sample_custom(patched, noise, cfg, sampler, sigmas, pos, neg, latent,
                                         callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED,
                                         seed=seed)
    comfy.model_management.throw_exception_if_processing_interrupted()
    decoded = _decode(vae, samples, tiled, tile_size)[:, :height, :width, :3].float().clamp(0, 1).cpu()

    out = torch.empty_like(image)
    regions = torch.zeros(batch, height, width, dtype=torch.bool)
    m_np = m[:, 0].cpu().numpy()
    for b in range(batch):
        comfy.model_management.throw_exception_if_processing_interrupted()
        blended, region = sr_blend.poisson_blend(sr_blend.to_uint8(image[b]), sr_blend.to_uint8(decoded[b]),
                                                 m_np[b], padding=poisson_padding, dilation=poisson_dilation)
        region_t = torch.from_numpy(region)
        out[b] = sr_blend.composite_exact(image[b], torch.from_numpy(blended).float() / 255.0, region_t)
        regions[b] = region_t

    blend_hr = torch.nn.functional.interpolate(blend_m, size=(hp, wp), mode="bilinear",
                                               align_corners=False)[:, 0, :height, :width].cpu()
    preview = torch.stack([m[:, 0].cpu(), blend_hr.clamp(0, 1), regions.float()], dim=-1)
    return UpscaleResult(image=out, preview=preview, generated=decoded, region=regions)

