"""Inpainting masks: layout, polarity, per-resolution binary masks, dilation and blur.

Convention: ComfyUI's MASK, 1 = regenerate (the unknown region). Formats that use 1 = keep (BrushNet's mask
channel, PILOT) convert with :func:`invert`. Masks travel as float tensors shaped [B, 1, H, W] inside the pack.
"""
from __future__ import annotations

import math

import kornia
import torch
import torch.nn.functional as F


def as_batch(mask: torch.Tensor) -> torch.Tensor:
    """[H, W], [B, H, W] or [B, 1, H, W] -> float [B, 1, H, W]."""
    if mask.dim() == 2:
        mask = mask[None, None]
    elif mask.dim() == 3:
        mask = mask[:, None]
    elif mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"a mask must be [H, W], [B, H, W] or [B, 1, H, W]; got shape {tuple(mask.shape)}")
    return mask.float()


def invert(mask: torch.Tensor) -> torch.Tensor:
    """Switch polarity between 1 = regenerate (ComfyUI) and 1 = keep (BrushNet, PILOT)."""
    return 1.0 - mask


def match_batch(mask: torch.Tensor, batch: int) -> torch.Tensor:
    """Broadcast a [b, ...] mask to ``batch`` samples: b == 1 is expanded, b dividing ``batch`` is tiled."""
    b = mask.shape[0]
    if b == batch:
        return mask
    if b == 1 or batch % b == 0:
        return mask.repeat(batch // b, *([1] * (mask.dim() - 1)))
    raise ValueError(f"the mask batch ({b}) does not match the image batch ({batch}); give 1 mask or {batch}")


def resize(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a [B, 1, H, W] mask to (height, width): area averaging when shrinking, bilinear when growing."""
    if tuple(mask.shape[-2:]) == (height, width):
        return mask
    shrinking = height <= mask.shape[-2] and width <= mask.shape[-1]
    if shrinking:
        return F.interpolate(mask, size=(height, width), mode="area")
    return F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)


def binary(mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """1 where the (possibly soft, possibly resized) mask reaches ``threshold``."""
    return (mask >= threshold).to(mask.dtype)


def level_size(height: int, width: int, downsample: int) -> tuple[int, int]:
    """Spatial size of a UNet level that is ``downsample`` (a power of 2) times smaller than the latent.

    Each stride-2 convolution (padding 1) gives ceil(n / 2), so odd sizes round up at every level.
    """
    for _ in range(int(round(math.log2(downsample)))):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


LAYER_MASK_RULES = ("area", "bicubic")
# The nodes' layer_mask choices (RASGGuidance, PAIntAPatch): label -> rule.
LAYER_MASK_CHOICES = {"area >= 0.5": "area", "bicubic > 0.5 (diffusers port)": "bicubic"}


def at_resolution(mask: torch.Tensor, height: int, width: int, threshold: float = 0.5,
                  rule: str = "area") -> torch.Tensor:
    """The binary [B, height * width] mask of the query/key tokens of an attention layer of that size.

    rule "area": a token is masked when at least ``threshold`` of its area is (area average, >= threshold): it
    depends only on how much of the token's block the mask covers. rule "bicubic": the HD-Painter diffusers port's
    rule, a bicubic resize (align_corners False, no antialiasing) thresholded at > ``threshold``; shrinking by 2 or
    4 it weighs the block's centre pixels most and, at 1/2, reads one pixel beyond the block on each side.
    """
    if rule not in LAYER_MASK_RULES:
        raise ValueError(f"unknown layer-mask rule {rule!r}; expected one of {LAYER_MASK_RULES}")
    m = as_batch(mask)
    if rule == "area":
        return binary(resize(m, height, width), threshold).flatten(1)
    if tuple(m.shape[-2:]) != (height, width):
        m = F.interpolate(m, size=(height, width), mode="bicubic", align_corners=False)
    return (m > threshold).to(m.dtype).flatten(1)


def per_resolution(mask: torch.Tensor, latent_hw: tuple[int, int], downsamples=(1, 2, 4, 8),
                   threshold: float = 0.5) -> dict[int, torch.Tensor]:
    """{downsample: binary [B, 1, h, w] mask} for every attention resolution of a latent of size ``latent_hw``."""
    out = {}
    for d in downsamples:
        h, w = level_size(*latent_hw, d)
        out[d] = binary(resize(as_batch(mask), h, w), threshold)
    return out


def dilate(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Grow the 1-region by ``pixels`` in every direction (square structuring element).

    This is grey dilation with a flat square, the same values as ``kornia.morphology.dilation`` with
    ``torch.ones(2p+1, 2p+1)`` (tests check it). PyTorch's max pooling computes it directly; kornia before 0.9 does
    it by unfolding (2p+1)^2 copies of the mask, 1521 of a full-size mask for the x4 upscaler's 39 px square.
    """
    if pixels <= 0:
        return mask
    m = as_batch(mask)
    return F.max_pool2d(m, kernel_size=2 * pixels + 1, stride=1, padding=pixels)


def blur(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur with edge-replicating padding (a feathered mask edge); sigma in pixels, kernel radius
    max(1, ceil(3 sigma))."""
    if sigma <= 0:
        return mask
    m = as_batch(mask)
    size = 2 * max(1, int(math.ceil(3 * sigma))) + 1
    return kornia.filters.gaussian_blur2d(m, (size, size), (float(sigma), float(sigma)), border_type="replicate")
