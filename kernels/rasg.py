"""RASG: reweighting attention score guidance (ProFI-Painter, sec. 3.4, eqs. 8-11).

The DDIM family (eq. 3) allows any noise term sigma_t * eps_t with eps_t ~ N(0, 1). RASG puts the gradient of the
attention-segmentation objective there, divided by its standard deviation so it looks like a N(0, 1) draw:

    x_{t-1} = sqrt(a_{t-1}) x0_hat + sqrt(1 - a_{t-1} - sigma_t^2) eps_hat + sigma_t * g / std(g)       (eq. 8)
    sigma_t = eta * sqrt((1 - a_{t-1}) / (1 - a_t)) * sqrt(1 - a_t / a_{t-1})                           (eq. 11)

In ComfyUI's sigma space (x = x_ddim / sqrt(a), s = sqrt((1 - a) / a)) eq. 8 divided by sqrt(a_{t-1}) is
x_prev = x0_hat + s_down * eps_hat + s_up * z, with (s_down, s_up) exactly k-diffusion's ancestral split of
(s, s_next) for that eta; :func:`ddim_split` computes it.

Objective (eq. 10, sign as in the reference code): the cross-attention logits of the H/32 layers, averaged over
layers and heads, give one map per prompt token k in ind(tau); the loss is
    L = sum_k mean_pixels BCEWithLogits(A_k - 1, M)
and z = -grad L / std(grad L): x_t moves so the prompt's attention concentrates inside the mask. (The paper writes
S as a log-likelihood and says "minimise"; the reference implementation's direction is the one that works.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def ddim_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of the DDIM step s -> s_next in sigma space for eq. (11)'s sigma_t.

    sigma_up = sigma_t / sqrt(a_{t-1}) = eta * s_next * sqrt(s^2 - s_next^2) / s; sigma_down = sqrt(s_next^2 - up^2).
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * sigma_next * math.sqrt(max(sigma ** 2 - sigma_next ** 2, 0.0)) / sigma)
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def reference_split(sigma_next: float, step_alpha: float, step_alpha_prev: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with the official code's sigma_t, which uses per-step alphas (1 - beta) where eq. (11)
    has cumulative ones: sigma_t = eta * sqrt((1 - r_prev) / (1 - r_t) * (1 - r_t / r_prev)), r_t = a_t / a_{t-1}.

    In practice eta * sigma_t is about 1e-3, so the guidance barely moves x; offered to reproduce the reference.
    ``step_alpha`` is r at the current timestep, ``step_alpha_prev`` at the next (smaller) one.
    """
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_t = eta * math.sqrt(max((1 - step_alpha_prev) / (1 - step_alpha) * (1 - step_alpha / step_alpha_prev), 0.0))
    a_prev = 1.0 / (1.0 + sigma_next ** 2)
    up = min(sigma_next, sigma_t / math.sqrt(a_prev))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def segmentation_loss(maps: torch.Tensor, mask: torch.Tensor, token_indices) -> torch.Tensor:
    """Eq. (10) as a loss to minimise, per sample: sum over ind(tau) of mean-over-pixels BCE(sigmoid(A_k - 1), M).

    maps: [B, N, L] cross-attention logits averaged over the chosen layers and heads; mask: [B, N] binary
    (1 = region to inpaint). Returns [B].
    """
    idx = torch.as_tensor(list(token_indices), device=maps.device, dtype=torch.long)
    logits = maps.index_select(-1, idx).float() - 1.0                      # [B, N, K]
    target = mask.float()[..., None].expand_as(logits)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1).sum(-1)


def standardised(grad: torch.Tensor, region: torch.Tensor | None = None) -> torch.Tensor:
    """g / std(g) per sample, the std taken over ``region`` (the mean is kept: it carries the direction, sec. 3.4
    and appendix C.3).

    ``region``: [B or 1, 1, H, W], nonzero where the gradient lives (a latent noise mask: outside it ComfyUI
    replaces x_t by the re-noised known image before every model call, so the gradient there is 0 and the noise
    term there is discarded); None: the whole latent, as eq. (8). Taking the std over the whole latent when the
    gradient lives in a fraction f of it would give the noise inside std 1 / sqrt(f), not 1.
    """
    if region is None:
        flat = grad.flatten(1)
        std = flat.std(dim=1)
    else:
        inside = (region > 0).to(grad.dtype).expand_as(grad).flatten(1)
        flat = grad.flatten(1)
        count = inside.sum(1)
        mean = (flat * inside).sum(1) / count.clamp_min(1.0)
        var = (((flat - mean[:, None]) * inside) ** 2).sum(1) / (count - 1.0).clamp_min(1.0)
        std = var.sqrt()
    std = std.clamp_min(torch.finfo(flat.dtype).tiny)
    return grad / std.view(-1, *([1] * (grad.dim() - 1)))


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, sigma_down: float, sigma_up: float,
              z: torch.Tensor | None) -> torch.Tensor:
    """x_prev = x0 + sigma_down * eps + sigma_up * z (eq. 8 in sigma space)."""
    out = x0 + sigma_down * eps
    if sigma_up > 0 and z is not None:
        out = out + sigma_up * z
    return out
