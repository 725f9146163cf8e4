"""ProFI-Painter appendix E: the math of inpainting-specialised conditional super-resolution (no ComfyUI import).

* :func:`blend_x0` - eq. (16): x0 <- m * x0 + (1 - m) * z_HR, after every denoising step.
* :func:`ddim_step` - DDIM with eta 0 in sigma space, the reference's form: the next latent is built from the
  BLENDED x0 and the model's OWN noise estimate (eps from the un-blended x0), as the official code does.
* :func:`x0_blend_mask` - the latent-size blend mask m: binary HR mask, dilated (reference: 19 iterations of a
  3x3 dilation = a 39x39 square), resized to latent size, Gaussian blur with kernel size k (reference: 19,
  torchvision's sigma rule), values in [0, 1].
* :func:`pad_to_multiple` / :func:`ddim_timesteps` - reflect padding to the size the model needs; the reference's
  timesteps 999, 999 - dt, ...
* :func:`poisson_blend` - OpenCV ``seamlessClone`` (NORMAL_CLONE) of the generated image into the original with the
  reference's padding and dilation, returning the blend region; :func:`composite_exact` pastes only that region so
  every pixel outside it is bit-identical to the original.

Conventions: images are float [B, H, W, C] in [0, 1] (ComfyUI IMAGE) unless stated; masks [B, 1, H, W], 1 = inpaint.
"""
from __future__ import annotations

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from faithful_inpaint.kernels import masks as mask_ops

# Reference defaults (HD-Painter's super-resolution script).
REFERENCE_MASK_DILATION = 19      # iterations of a 3x3 dilation at HR, i.e. a square of radius 19 px
REFERENCE_MASK_BLUR = 19          # Gaussian kernel size at latent size
REFERENCE_POISSON_DILATION = 48   # side of the square dilation kernel before seamlessClone
REFERENCE_POISSON_PADDING = 32    # reflect padding around the images before seamlessClone
NOISE_LEVEL_MAX = 350             # the x4 upscaler's noise-augmentation range (SD_4XUpscale_Conditioning)


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------

def blend_x0(x0: torch.Tensor, z_hr: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eq. (16): keep the prediction where m = 1, the encoded original where m = 0 (exactly, not approximately)."""
    m = m.to(device=x0.device, dtype=x0.dtype)
    z = z_hr.to(device=x0.device, dtype=x0.dtype)
    if z.shape[0] != x0.shape[0]:
        z = _repeat_to(z, x0.shape[0])
    if m.shape[0] != x0.shape[0]:
        m = _repeat_to(m, x0.shape[0])
    # torch.where keeps z bit-exact where m == 0 (m * x0 + (1 - m) * z could differ in the last ulp).
    mixed = m * x0 + (1 - m) * z
    mixed = torch.where(m <= 0, z, mixed)
    return torch.where(m >= 1, x0, mixed)


def _repeat_to(t: torch.Tensor, batch: int) -> torch.Tensor:
    if batch % t.shape[0]:
        raise ValueError(f"cannot broadcast a batch of {t.shape[0]} to {batch}")
    return t.repeat(batch // t.shape[0], *([1] * (t.dim() - 1)))


def ddim_step(x: torch.Tensor, x0_raw: torch.Tensor, x0_used: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """One DDIM step (eta 0) in ComfyUI's sigma space (x = x_t / sqrt(abar_t), sigma^2 = (1 - abar) / abar).

    eps is the model's noise estimate, derived from the UN-blended prediction ``x0_raw``; the step moves to
    ``x0_used + sigma_next * eps``, which is the reference's z_{t-1} = sqrt(abar') x0_blend + sqrt(1 - abar') eps.
    At sigma_next = 0 the result is ``x0_used`` itself.
    """
    sigma = float(sigma)
    sigma_next = float(sigma_next)
    if sigma_next == 0.0:
        return x0_used.clone()
    eps = (x - x0_raw) / sigma
    return x0_used + sigma_next * eps


def ddim_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The reference's timesteps: 999, 999 - dt, ..., with dt = num_train // steps (20 steps: 999, 949, ..., 49)."""
    if steps < 1:
        raise ValueError("steps must be at least 1")
    steps = min(steps, num_train_timesteps)
    dt = num_train_timesteps // steps
    return [num_train_timesteps - 1 - k * dt for k in range(steps)]


# ---------------------------------------------------------------------------------------------------------------
# Masks and padding
# ---------------------------------------------------------------------------------------------------------------

def torchvision_sigma(kernel_size: int) -> float:
    """The sigma torchvision's gaussian_blur derives from a kernel size (the reference passes only the size)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur_k(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur of [B, C, H, W] with an odd ``kernel_size`` (an even one grows by 1), torchvision's sigma rule
    and reflect padding (torchvision's gaussian_blur semantics); an axis no longer than k // 2 pads by replication,
    where reflection is undefined. The support is finite: a value stays exactly 0 farther than k // 2 from any
    non-zero."""
    if kernel_size <= 1:
        return x
    if kernel_size % 2 == 0:
        kernel_size += 1
    r = kernel_size // 2
    k = kornia.filters.get_gaussian_kernel1d(kernel_size, torchvision_sigma(kernel_size), device=x.device,
                                              dtype=x.dtype)                      # [1, k]
    mode_h = "reflect" if x.shape[-1] > r else "replicate"
    mode_v = "reflect" if x.shape[-2] > r else "replicate"
    y = kornia.filters.filter2d(x, k[:, None, :], border_type=mode_h)              # along W
    return kornia.filters.filter2d(y, k[:, :, None], border_type=mode_v)           # along H


def x0_blend_mask(mask_hr: torch.Tensor, latent_hw: tuple[int, int], dilation: int = REFERENCE_MASK_DILATION,
                  blur_kernel: int = REFERENCE_MASK_BLUR) -> torch.Tensor:
    """m for eq. (16) from a [B, 1, H, W] HR mask (1 = inpaint): binarise, dilate by ``dilation`` px, resize to
    ``latent_hw`` (area), blur with kernel size ``blur_kernel`` (latent px), clamp to [0, 1]."""
    m = mask_ops.binary(mask_ops.as_batch(mask_hr))
    m = mask_ops.dilate(m, int(dilation))
    m = mask_ops.resize(m, *latent_hw)
    m = gaussian_blur_k(m, int(blur_kernel))
    m = m.clamp(0.0, 1.0)
    # Float noise of the convolutions must not leak z_HR-free values into the known region: snap tiny values.
    return torch.where(m < 1e-6, torch.zeros_like(m), m)


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_bottom_right(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pad [B, C, H, W] at the bottom/right to (height, width): reflect where possible, replicate otherwise."""
    ph, pw = height - x.shape[-2], width - x.shape[-1]
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad {tuple(x.shape[-2:])} to the smaller ({height}, {width})")
    if ph == 0 and pw == 0:
        return x
    if ph < x.shape[-2] and pw < x.shape[-1]:
        return F.pad(x, (0, pw, 0, ph), mode="reflect")
    return F.pad(x, (0, pw, 0, ph), mode="replicate")


def resize_image(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize [B, C, H, W] (antialiased bicubic, clamped to the input range)."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    y = F.interpolate(x.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(float(x.min()), float(x.max())).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------------
# Poisson blending
# ---------------------------------------------------------------------------------------------------------------

def to_uint8(image_hwc: torch.Tensor | np.ndarray) -> np.ndarray:
    """A float [H, W, 3] image in [0, 1] -> uint8 numpy (round to nearest)."""
    if isinstance(image_hwc, torch.Tensor):
        image_hwc = image_hwc.detach().float().cpu().numpy()
    return np.clip(np.rint(np.asarray(image_hwc, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("Poisson blending needs OpenCV: pip install opencv-python-headless (in ComfyUI's "
                          "Python environment)") from e
    return cv2


def poisson_region(mask: np.ndarray, dilation: int = REFERENCE_POISSON_DILATION) -> np.ndarray:
    """The blend region (bool [H, W]): the binary mask dilated with a ``dilation`` x ``dilation`` square kernel
    (OpenCV's anchor: for an even side it grows side // 2 px up/left and side // 2 - 1 px down/right)."""
    cv2 = _cv2()

    m = (np.asarray(mask) > 0.5).astype(np.uint8)
    if dilation > 1:
        m = cv2.dilate(m, np.ones((int(dilation), int(dilation)), np.uint8), iterations=1)
    return m.astype(bool)


def poisson_blend(original: np.ndarray, generated: np.ndarray, mask: np.ndarray,
                  padding: int = REFERENCE_POISSON_PADDING, dilation: int = REFERENCE_POISSON_DILATION
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Poisson-blend ``generated`` into ``original`` (uint8 [H, W, 3]) over ``mask`` (1 = inpaint).

    The reference's recipe: both images reflect-padded by ``padding`` px, the padded original's border strip taken
    from the padded generated image, the mask dilated by a ``dilation`` square kernel, cv2.seamlessClone with
    NORMAL_CLONE centred on the dilated mask's bounding box, padding cropped off.

    Returns (blended uint8 [H, W, 3], region bool [H, W]). Inside ``region`` the result is OpenCV's; outside it
    is ``original`` byte for byte. An empty mask returns a copy of ``original`` and an empty region.
    Note: OpenCV overwrites the mask array it is given; the region is computed before the call.
    """
    cv2 = _cv2()

    original = np.ascontiguousarray(original, dtype=np.uint8)
    generated = np.ascontiguousarray(generated, dtype=np.uint8)
    if original.shape != generated.shape or original.ndim != 3 or original.shape[2] != 3:
        raise ValueError(f"original {original.shape} and generated {generated.shape} must both be [H, W, 3]")
    h, w = original.shape[:2]
    if np.asarray(mask).shape != (h, w):
        raise ValueError(f"the mask {np.asarray(mask).shape} must be [H, W] = {(h, w)}")
    p = max(int(padding), 1)  # OpenCV ignores the outermost pixel row/column of the mask: keep at least 1 px
    cfg = ((p, p), (p, p), (0, 0))
    fake_p = np.pad(generated, cfg, mode="reflect" if p < min(h, w) else "symmetric")
    orig_p = np.pad(original, cfg, mode="reflect" if p < min(h, w) else "symmetric")
    orig_p[:p], orig_p[-p:] = fake_p[:p], fake_p[-p:]
    orig_p[:, :p], orig_p[:, -p:] = fake_p[:, :p], fake_p[:, -p:]
    mask_p = np.pad((np.asarray(mask) > 0.5).astype(np.uint8), cfg[:2], mode="constant")
    region_p = poisson_region(mask_p, dilation)
    # OpenCV zeroes the mask's outer 1-px frame before taking its bounding box; do the same so the centre we pass
    # and the box it uses agree (otherwise the pasted patch shifts).
    region_p[0, :] = region_p[-1, :] = False
    region_p[:, 0] = region_p[:, -1] = False
    region = region_p[p:-p, p:-p]
    if not region.any():
        return original.copy(), region
    dmask = region_p.astype(np.uint8) * 255
    x, y, rw, rh = cv2.boundingRect(dmask)
    center = (x + rw // 2, y + rh // 2)
    cloned = cv2.seamlessClone(fake_p, orig_p, dmask, center, cv2.NORMAL_CLONE)[p:-p, p:-p]
    out = original.copy()
    out[region] = cloned[region]
    return out, region


def composite_exact(original: torch.Tensor, blended: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """original [H, W, C] float where ``region`` (bool [H, W]) is False, ``blended`` where True: pixels outside the
    region are the original tensor's values bit for bit (no uint8 round trip)."""
    region = region.to(device=original.device, dtype=torch.bool)[..., None]
    return torch.where(region, blended.to(original), original)


def required_multiple(vae_downscale: int, unet_levels: int) -> int:
    """Pixels must be a multiple of the VAE factor times 2^(number of UNet downsamplings)."""
    return int(vae_downscale) * int(2 ** max(unet_levels - 1, 0))
