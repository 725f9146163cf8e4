"""Small pictures for people: IMAGE tensors ([B, H, W, 3], 0..1, ComfyUI's layout) of masks and maps."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from faithful_inpaint.kernels import masks as mask_ops


PREVIEW_MAX_SIDE = 1024   # longest side of one tile: an 8192 px mask gives a 1024 px preview row, not gigabytes


def mask_levels_preview(mask: torch.Tensor, downsamples, separator: int = 2,
                        max_side: int = PREVIEW_MAX_SIDE, rule: str = "area") -> torch.Tensor:
    """The first mask of a batch at each attention level, nearest-upscaled to the mask's size (at most ``max_side``
    px on its longest side, aspect kept) and laid side by side.

    ``mask`` is [B, 1, H, W] at image resolution; level d has the size of a latent (H/8) shrunk d times.
    White = regenerated tokens (``rule``: :func:`kernels.masks.at_resolution`'s). With no level, the mask itself.
    """
    m = mask_ops.as_batch(mask)[:1]
    height, width = m.shape[-2:]
    scale = min(1.0, max_side / max(height, width))
    th, tw = max(1, round(height * scale)), max(1, round(width * scale))
    tiles = []
    for d in downsamples or ():
        h, w = mask_ops.level_size(max(1, height // 8), max(1, width // 8), d)
        level = mask_ops.at_resolution(m, h, w, rule=rule).view(1, 1, h, w)
        tiles.append(F.interpolate(level, size=(th, tw), mode="nearest"))
    if not tiles:
        tiles = [mask_ops.resize(m, th, tw)]
    gap = torch.full((1, 1, th, separator), 0.5)
    row = [tiles[0]]
    for t in tiles[1:]:
        row += [gap, t]
    return torch.cat(row, dim=-1)[0, 0, :, :, None].expand(-1, -1, 3)[None].contiguous()
