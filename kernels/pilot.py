"""PILOT: coherent inpainting by latent optimisation (Pan et al.), the losses and schedules, host-free.

Every formula below follows the official implementation (github.com/Lingzhi-Pan/PILOT, pipeline/pipeline_pilot.py
and models/attn_processor.py; the paper text we have lost its equations), as summarised in docs/pilot.md; the line
each one comes from is quoted as "[notes: ...]", and where the pack departs on purpose the docstring says so.
tests/test_pilot_reference.py recomputes them from their stated definitions on a tiny model.

Mask convention inside this module: ``fg`` is ComfyUI's MASK (1 = regenerate, the foreground), and the kept
background is ``1 - fg`` (PILOT's own masks use 1 = keep: convert with ``kernels.masks.invert``).
Timesteps ``t`` are the discrete DDPM timesteps 0..999 of the current step.
"""
from __future__ import annotations

from typing import Sequence

import torch

REFERENCE_BG_PIXELS = 1499.0     # [notes: "lambda_t = coef (150) x (background latent pixel count / 1499)"]
SCHED_FLOOR_T = 300              # [notes: "sched linear: 0.1 for t < 300, rising to 1 at t = 999"]
SCHED_FLOOR = 0.1
SCHED_TOP_T = 999
LR_GROWTH = 1.002                # [notes: "lr_t = lr x 1.002^(1000 - t)"]
INSIDE_MAP_RULES = ("reference", "area")


def to_unit(v: torch.Tensor) -> torch.Tensor:
    """v -> (v + 1) / 2, the map the reference code applies to both latents before the background loss."""
    return (v + 1.0) * 0.5


def background_loss(z_img: torch.Tensor, x0_hat: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """L_bg per sample, [B]: sum over kept latent pixels (and channels) of (u(z_img) - u(x0_hat))^2, u = to_unit.

    [notes: "Background loss: sum over kept pixels of (z_img' - x0_hat')^2 where both latents are first mapped by
    v -> (v + 1) / 2, i.e. 1/4 of the plain squared error (latent space; x0_hat = one-step reconstruction from the
    conditional eps, no CFG)"]. Paper eq. (9)-(10). ``fg``: [B or 1, 1, H, W] (soft values weight the pixel by its
    kept fraction 1 - fg; the sampler binarises the mask first unless asked not to).
    """
    keep = 1.0 - fg.to(x0_hat.dtype)
    diff = to_unit(z_img.to(x0_hat.dtype)) - to_unit(x0_hat)
    return (diff ** 2 * keep).flatten(1).sum(1)


def binarised(fg: torch.Tensor) -> torch.Tensor:
    """The reference's binary mask: a pixel is kept when its keep value 1 - fg is at least 0.5, i.e. fg > 0.5 is
    regenerated. [notes: "Its mask convention is inverted (1 = keep)"; the code thresholds the keep mask at 0.5]"""
    return (fg > 0.5).to(fg.dtype)


def token_mass(probs: torch.Tensor, word_indices: Sequence[int]) -> torch.Tensor:
    """Attention mass of the word tokens per query pixel: probs [B, (heads,) N, L] -> [B, N] (heads averaged)."""
    idx = torch.as_tensor(list(word_indices), device=probs.device, dtype=torch.long)
    mass = probs.index_select(-1, idx).sum(-1)
    return mass.mean(1) if mass.dim() == 3 else mass


def centralisation_loss(probs: torch.Tensor, fg: torch.Tensor, word_indices: Sequence[int]) -> torch.Tensor:
    """L_s of one cross-attention layer per sample, [B]: R - I.

    [notes: "Semantic centralisation loss per cross-attention layer: R - I, R = mean attention mass of word tokens
    over background pixels, I = same over foreground pixels (post-softmax, SOT/EOT/padding excluded)"].
    Paper eqs. (12)-(14) (R^l, I^l and L_s; their symbols are lost in our copy of the text). probs: post-softmax
    [B, (heads,) N, L], read BEFORE semantic boundary control (eq. 16), as the reference code reads them: after
    it, R would be 0 by construction (patching/pilot.py explains the choice); fg: [B, N] binary foreground of
    the layer's query pixels (PILOT passes :func:`inside_map`, the map boundary control also uses);
    word_indices: the prompt's word-token columns only. The "attention mass" of a pixel is the sum of its
    probabilities over the word tokens (averaged over heads); R and I average it over the pixels of each region.
    [notes: "A layer whose inside map is empty or full adds 0 to the semantic loss (still divided by 11)"]: a sample
    whose ``fg`` has no foreground or no background pixel at this layer gets 0.
    """
    mass = token_mass(probs.float(), word_indices)
    fg = fg.to(mass)
    bg = 1.0 - fg
    n_fg, n_bg = fg.sum(1), bg.sum(1)
    r = (mass * bg).sum(1) / n_bg.clamp_min(1.0)
    i = (mass * fg).sum(1) / n_fg.clamp_min(1.0)
    both = (n_fg > 0) & (n_bg > 0)
    return torch.where(both, r - i, torch.zeros_like(r))


def mean_centralisation_loss(layers: Sequence[tuple[torch.Tensor, torch.Tensor]],
                             word_indices: Sequence[int]) -> torch.Tensor:
    """L_s averaged over the chosen layers: [(probs, fg)] -> [B].

    [notes: "Averaged over the 11 cross-attention layers at 32x32, 16x16 and 8x8 (64x64 excluded)"].
    """
    if not layers:
        raise ValueError("no cross-attention layer to average")
    return torch.stack([centralisation_loss(p, m, word_indices) for p, m in layers]).mean(0)


def schedule(t: float) -> float:
    """sched(t): 0.1 for t < 300, then linear up to 1 at t = 999. [notes: "sched linear: 0.1 for t < 300, rising
    to 1 at t = 999"]"""
    if t < SCHED_FLOOR_T:
        return SCHED_FLOOR
    frac = min((t - SCHED_FLOOR_T) / (SCHED_TOP_T - SCHED_FLOOR_T), 1.0)
    return SCHED_FLOOR + (1.0 - SCHED_FLOOR) * frac


def lambda_t(t: float, fg: torch.Tensor, coef: float = 150.0) -> torch.Tensor:
    """lambda_t per sample, [B] = coef * (background latent pixel count / 1499) * sched(t).

    [notes: "Total: L = L_bg + lambda_t L_s, lambda_t = coef (150) x (background latent pixel count / 1499) x
    sched(t)"]. ``fg``: [B, 1, H, W] at latent resolution; the count is the sum of 1 - fg (soft pixels count by
    their kept fraction).
    """
    bg_pixels = (1.0 - fg.float()).flatten(1).sum(1)
    return coef * (bg_pixels / REFERENCE_BG_PIXELS) * schedule(t)


def learning_rate(t: float, lr: float) -> float:
    """lr_t = lr * 1.002^(1000 - t). [notes: "lr_t = lr x 1.002^(1000 - t), lr 0.025 (text)"]"""
    return lr * LR_GROWTH ** (1000.0 - t)


def step_learning_rate(t: float, lr: float, lr_warmup: float, first: bool) -> float:
    """The learning rate of the optimisation at timestep t: exactly ``lr_warmup`` at the sampler's first step,
    :func:`learning_rate` after it. [notes: "first timestep exactly lr_warmup (no 1.002 growth on it)"]"""
    return float(lr_warmup) if first else learning_rate(t, lr)


def total_loss(l_bg: torch.Tensor, l_s: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """L = L_bg + lambda_t * L_s per sample. [notes: "Total: L = L_bg + lambda_t L_s"]"""
    return l_bg + lam.to(l_bg) * l_s


def momentum_step(z: torch.Tensor, grad: torch.Tensor, velocity: torch.Tensor | None, lr: float,
                  momentum: float = 0.7) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD-with-momentum step (PyTorch's form: v = mu v + g; z = z - lr v); returns (z, v).

    [notes: "Optimiser: SGD with momentum 0.7 on z_t, v reset every timestep"]: pass ``velocity=None`` at the
    first inner step of each timestep.
    """
    velocity = grad if velocity is None else momentum * velocity + grad
    return z - lr * velocity, velocity


def blend(z: torch.Tensor, z_img: torch.Tensor, fg: torch.Tensor, sigma: float, noise: torch.Tensor) -> torch.Tensor:
    """Blend stage in ComfyUI's sigma space: z * (1 - M_bg) + q_sample(z_img, t) * M_bg, M_bg = 1 - fg.

    [notes: "after that the blend stage: before each UNet call z <- z * (1 - M_bg) + q_sample(z_img, t) * M_bg"].
    In sigma space (x = x_ddpm / sqrt(abar)) q_sample(z_img, t) = z_img + sigma_t * noise.
    """
    keep = 1.0 - fg.to(z.dtype)
    return z * (1.0 - keep) + (z_img.to(z.dtype) + sigma * noise) * keep


def inside_map(fg: torch.Tensor, height: int, width: int, rule: str = "reference",
               tolerance: float = 1e-4) -> torch.Tensor:
    """The inside (foreground) map of an attention layer: [B, height * width], 1 where the layer pixel is inside.

    ``fg``: [B, 1, H, W] latent-resolution mask (1 = regenerate). One map serves the semantic loss (eqs. 12-13) and
    boundary control (eq. 16), as in the reference code.
    - "reference": [notes: "the binary latent mask resized bilinearly to the layer's size, values below 1 set to
      0"] (bilinear, align_corners False, no antialiasing: at 1/2 a layer pixel averages its 2 x 2 latent block,
      at 1/4 and 1/8 only the block's centre 2 x 2 pixels are sampled). ``tolerance`` absorbs float rounding of
      weights that sum to 1 (sizes that are not a power-of-2 fraction of the latent).
    - "area": the layer pixel's whole block is foreground (area average = 1): a token is confined to layer pixels
      that lie entirely inside the mask, wherever the mask edge falls in a block (the pack's earlier rule).
    The two agree for masks aligned to the layer's blocks.
    """
    import torch.nn.functional as F

    if rule not in INSIDE_MAP_RULES:
        raise ValueError(f"unknown inside-map rule {rule!r}; expected one of {INSIDE_MAP_RULES}")
    m = fg.float()
    if tuple(m.shape[-2:]) != (height, width):
        m = (F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False) if rule == "reference"
             else F.adaptive_avg_pool2d(m, (height, width)))
    return (m >= 1.0 - tolerance).to(fg.dtype if fg.is_floating_point() else torch.float32).flatten(1)


def control_map(fg: torch.Tensor, height: int, width: int, rule: str = "reference") -> torch.Tensor:
    """The map boundary control multiplies the token columns by: :func:`inside_map`, except that a sample with
    nothing to inpaint is left uncontrolled (all 1), as the reference code passes no attention mask then."""
    inside = inside_map(fg, height, width, rule)
    nothing = ~(fg.flatten(1) > 0).any(1)
    return torch.where(nothing[:, None], torch.ones_like(inside), inside)


def boundary_control(probs: torch.Tensor, full_fg: torch.Tensor, sot_columns: Sequence[int] = (0,)) -> torch.Tensor:
    """Semantic boundary control on post-softmax cross-attention probabilities, not renormalised.

    [notes: "Semantic boundary control: post-softmax cross-attention probabilities multiplied by a mask: SOT column
    kept everywhere, token columns kept only where the latent pixel is fully foreground; no renormalisation"].
    probs: [B, N, L] or [B, heads, N, L]; full_fg: [B, N] (1 = the query pixel is fully foreground);
    sot_columns: the SOT position of each 77-token window. Every other column is a "token column".
    """
    b, n, length = probs.shape[0], probs.shape[-2], probs.shape[-1]
    keep = full_fg.to(probs.dtype).reshape(b, n, 1).expand(b, n, length).clone()
    cols = [c for c in sot_columns if 0 <= c < length]
    if cols:
        keep[..., cols] = 1.0
    if probs.dim() == 4:
        keep = keep[:, None]
    return probs * keep
