"""Checks of node inputs that ComfyUI does not make, each failing with a :class:`NodeInputError` that names the node
and the input: V3 combo values (the pinned ComfyUI passes a saved workflow's stale or edited value through), IMAGE
layout and size, finite pixels, MASK layout."""
from __future__ import annotations

from typing import Iterable

import torch

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.patching.errors import NodeInputError


def check_choice(node: str, input_name: str, value, options: Iterable):
    """``value`` must be one of a combo input's ``options``; returns it."""
    options = list(options)
    if value not in options:
        raise NodeInputError(node, input_name, f"{value!r} is not one of its choices {options}.")
    return value


def check_image(node: str, input_name: str, image, min_side: int = 1) -> torch.Tensor:
    """An IMAGE [B, H, W, 3 or 4] with at least one image, sides of at least ``min_side`` px and finite pixels."""
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] not in (3, 4):
        shape = list(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeInputError(node, input_name, f"expected an IMAGE [B, H, W, 3] (RGB), got {shape}.")
    b, h, w, _ = image.shape
    if b == 0 or h < min_side or w < min_side:
        raise NodeInputError(node, input_name, f"the image is {w} x {h} px (batch {b}); it must have at least one "
                             f"image of at least {min_side} x {min_side} px.")
    if not bool(torch.isfinite(image).all()):
        raise NodeInputError(node, input_name, "the image has NaN or infinite pixels (a failed decode or upstream "
                             "node?); they would turn the whole result into NaN.")
    return image


def check_mask(node: str, input_name: str, mask) -> torch.Tensor:
    """A MASK ([H, W], [B, H, W] or [B, 1, H, W]) with finite values, as float [B, 1, H, W]."""
    if not isinstance(mask, torch.Tensor):
        raise NodeInputError(node, input_name, f"expected a MASK tensor, got {type(mask).__name__}.")
    try:
        m = mask_ops.as_batch(mask)
    except ValueError as err:
        raise NodeInputError(node, input_name, f"{err} (an IMAGE connected where a MASK belongs? convert it with "
                             "ImageToMask).") from None
    if m.shape[0] == 0 or m.shape[-1] == 0 or m.shape[-2] == 0:
        raise NodeInputError(node, input_name, f"the mask is empty-sized ({list(mask.shape)}).")
    if not bool(torch.isfinite(m).all()):
        raise NodeInputError(node, input_name, "the mask has NaN or infinite values.")
    return m
