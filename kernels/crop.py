"""Zoom-in inpainting: crop a context window around the mask, work on it at the model's size, stitch it back.

LAR-Gen (and most inpainting pipelines) inpaint a small region far better when the model sees the region and some
context around it at its working resolution than when the region is a few latent pixels of a large image. This
module plans the window, extracts and resizes it, and pastes the result back:

* window: the mask's bounding box grown by ``padding`` pixels on every side, one size for the whole batch (ComfyUI
  batches share a size), each sample's window centred on its own mask, then shifted inside the image. A window
  larger than the image hangs over its edges; the overhang is filled by repeating the edge pixels (mask 0 there).
* working size: the long side resized to ``long_side`` (multiples of 8, the latent grid), the window grown to the
  same aspect ratio, so the resize is uniform; ``long_side = 0`` keeps the native resolution (the window is only
  grown to multiples of 8, nothing is resampled).
* stitch: the inpainted crop is resized back to its window and blended in with a weight that is the mask, widened
  and softened by ``feather`` pixels. Only pixels inside the window are written; with an unchanged crop at native
  resolution the image comes back bit for bit (``original + w * (crop - original)``).

Images are ComfyUI IMAGE tensors [B, H, W, C] in 0..1; masks [B, 1, H, W] (see kernels.masks.as_batch), 1 = inpaint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from faithful_inpaint.kernels import masks as mask_ops

LATENT_GRID = 8  # the VAE's downscale factor: working sizes are multiples of it


@dataclass(frozen=True)
class Window:
    """A crop rectangle in the original image's pixels; it may hang over the image's edges."""
    x: int
    y: int
    width: int
    height: int

    def inside(self, image_height: int, image_width: int) -> tuple[slice, slice, slice, slice]:
        """(rows, cols) of the image inside the window, and the same pixels' (rows, cols) in the window."""
        y0, x0 = max(self.y, 0), max(self.x, 0)
        y1, x1 = min(self.y + self.height, image_height), min(self.x + self.width, image_width)
        return (slice(y0, y1), slice(x0, x1), slice(y0 - self.y, y1 - self.y), slice(x0 - self.x, x1 - self.x))


@dataclass(frozen=True)
class CropPlan:
    """What InpaintStitch needs to put crops back: the original size, one window per sample, the working size and
    the original-resolution mask (the blend weight is made from it)."""
    image_size: tuple[int, int]          # (H, W) of the original image
    windows: tuple[Window, ...]          # one per sample of the cropped batch
    working_size: tuple[int, int]        # (h, w) of the crops
    mask: torch.Tensor                   # [B, 1, H, W], 1 = inpainted

    @property
    def batch(self) -> int:
        return len(self.windows)


def mask_box(mask: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), ends exclusive, of the pixels of a [H, W] mask above 0; None when it is empty."""
    rows = torch.nonzero(mask.amax(dim=1) > 0).flatten()
    if rows.numel() == 0:
        return None
    cols = torch.nonzero(mask.amax(dim=0) > 0).flatten()
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _round_to_grid(n: float) -> int:
    return max(LATENT_GRID, int(round(n / LATENT_GRID)) * LATENT_GRID)


def _ceil_to_grid(n: int) -> int:
    return max(LATENT_GRID, -(-n // LATENT_GRID) * LATENT_GRID)


def working_size(window_height: int, window_width: int, long_side: int) -> tuple[int, int]:
    """(h, w) of the crops: the window's aspect with the long side at ``long_side``, both multiples of 8;
    ``long_side = 0``: the window's own size rounded up to multiples of 8."""
    if long_side <= 0:
        return _ceil_to_grid(window_height), _ceil_to_grid(window_width)
    scale = long_side / max(window_height, window_width)
    return _round_to_grid(window_height * scale), _round_to_grid(window_width * scale)


def _place(start: int, size: int, padded: int, extent: int) -> int:
    """First pixel of a window of ``size`` centred on a padded box [start, start + padded), inside [0, extent)."""
    pos = start - (size - padded) // 2
    if size >= extent:
        return -((size - extent) // 2)  # larger than the image: centred, hanging over both edges
    return min(max(pos, 0), extent - size)


def plan(mask: torch.Tensor, padding: int, long_side: int) -> CropPlan:
    """Windows and working size for a [B, 1, H, W] mask. ValueError when every mask of the batch is empty.

    A sample whose own mask is empty gets the window of the union of the batch's masks.
    """
    m = mask_ops.as_batch(mask)
    batch, _, height, width = m.shape
    boxes = [mask_box(m[i, 0]) for i in range(batch)]
    union = mask_box(m[:, 0].amax(dim=0))
    if union is None:
        raise ValueError("the mask is empty: nothing to crop around")
    boxes = [b if b is not None else union for b in boxes]
    padded = [(y1 - y0 + 2 * padding, x1 - x0 + 2 * padding) for y0, y1, x0, x1 in boxes]
    win_h, win_w = max(p[0] for p in padded), max(p[1] for p in padded)
    work_h, work_w = working_size(win_h, win_w, long_side)
    if long_side <= 0:
        win_h, win_w = work_h, work_w
    elif win_w * work_h < work_w * win_h:  # grow the short dimension to the working aspect ratio
        win_w = max(win_w, int(round(win_h * work_w / work_h)))
    else:
        win_h = max(win_h, int(round(win_w * work_h / work_w)))
    windows = tuple(
        Window(x=_place(x0 - padding, win_w, pw, width), y=_place(y0 - padding, win_h, ph, height),
               width=win_w, height=win_h)
        for (y0, _, x0, _), (ph, pw) in zip(boxes, padded))
    return CropPlan(image_size=(height, width), windows=windows, working_size=(work_h, work_w), mask=m)


def _extract(x: torch.Tensor, window: Window, fill: str) -> torch.Tensor:
    """The window of a [1, C, H, W] tensor; the part over the edges is ``fill``: "edge" (repeat) or "zero"."""
    height, width = x.shape[-2:]
    rows, cols, _, _ = window.inside(height, width)
    inner = x[..., rows, cols]
    pads = (cols.start - window.x, window.x + window.width - cols.stop,
            rows.start - window.y, window.y + window.height - rows.stop)
    if not any(pads):
        return inner
    if fill == "edge":
        return F.pad(inner, pads, mode="replicate")
    return F.pad(inner, pads)


def resize_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bicubic (antialiased when shrinking) resize of a [N, C, H, W] image in 0..1; unchanged at the same size."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def _broadcast(n: int, batch: int, what: str) -> None:
    if n != batch and n != 1 and batch % n:
        raise ValueError(f"the {what} batch ({n}) does not match the batch ({batch}); give 1 or {batch}")


def crop(image: torch.Tensor, cplan: CropPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """(crops [B, h, w, C], their masks [B, h, w]) of a [b, H, W, C] image (b = 1 or divides B) under a plan."""
    if tuple(image.shape[1:3]) != cplan.image_size:
        raise ValueError(f"the image is {image.shape[2]}x{image.shape[1]} px but the mask is "
                         f"{cplan.image_size[1]}x{cplan.image_size[0]} px; they must have the same size")
    _broadcast(image.shape[0], cplan.batch, "image")
    work_h, work_w = cplan.working_size
    pixels = image.movedim(-1, 1)
    crops, masks = [], []
    for i, window in enumerate(cplan.windows):
        crops.append(resize_image(_extract(pixels[i % pixels.shape[0]][None], window, "edge"), work_h, work_w))
        masks.append(mask_ops.resize(_extract(cplan.mask[i % cplan.mask.shape[0]][None], window, "zero"),
                                     work_h, work_w))
    return torch.cat(crops).movedim(1, -1).contiguous(), torch.cat(masks)[:, 0].clamp(0, 1).contiguous()


def blend_weight(mask: torch.Tensor, feather: int) -> torch.Tensor:
    """Blend weight of a [N, 1, h, w] mask: 1 on the mask, falling smoothly to 0 about ``feather`` pixels outside it
    (the mask grown by feather / 2, then a Gaussian blur of sigma feather / 4). ``feather = 0``: the mask itself."""
    if feather <= 0:
        return mask
    widened = mask_ops.blur(mask_ops.dilate(mask, feather // 2), feather / 4)
    return torch.maximum(mask, widened).clamp(0, 1)


def stitch(original: torch.Tensor, inpainted: torch.Tensor, cplan: CropPlan, feather: int) -> torch.Tensor:
    """Paste inpainted crops [n, h', w', C] (any size: each is resized to its window) into the original
    [b, H, W, C]. Output batch: the largest of b, n and the plan's batch (the others are 1 or divide it).
    Pixels outside a sample's window are the original's, bit for bit."""
    if tuple(original.shape[1:3]) != cplan.image_size:
        raise ValueError(f"the original image is {original.shape[2]}x{original.shape[1]} px but the crop was made "
                         f"from a {cplan.image_size[1]}x{cplan.image_size[0]} px image")
    if original.shape[-1] != inpainted.shape[-1]:
        raise ValueError(f"the inpainted image has {inpainted.shape[-1]} channels, the original {original.shape[-1]}")
    batch = max(original.shape[0], inpainted.shape[0], cplan.batch)
    for n, what in ((original.shape[0], "original image"), (inpainted.shape[0], "inpainted image"),
                    (cplan.batch, "crop")):
        _broadcast(n, batch, what)
    height, width = cplan.image_size
    out = original.repeat(batch // original.shape[0], 1, 1, 1) if original.shape[0] != batch else original.clone()
    patches = inpainted.movedim(-1, 1)
    for i in range(batch):
        window = cplan.windows[i % cplan.batch]
        rows, cols, w_rows, w_cols = window.inside(height, width)
        patch = resize_image(patches[i % patches.shape[0]][None], window.height, window.width)
        mask = _extract(cplan.mask[i % cplan.mask.shape[0]][None], window, "zero")
        weight = blend_weight(mask, feather)[0, 0, w_rows, w_cols, None]
        before = out[i, rows, cols]
        after = patch[0].movedim(0, -1)[w_rows, w_cols].to(before.dtype)
        out[i, rows, cols] = before + weight.to(before.dtype) * (after - before)
    return out
