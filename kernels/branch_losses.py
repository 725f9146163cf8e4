"""Training losses of the inpainting branches: noise MSE, PainterNet's ATAL, MTADiffusion's edge and style losses.

Host-agnostic PyTorch (no ComfyUI). Conventions: latents [B, 4, h, w]; images [B, 3, H, W] in [0, 1]; masks
[B, 1, H, W] with 1 = regenerate (ComfyUI's convention, :mod:`kernels.masks`); ``alphas_cumprod`` is the DDPM
schedule's cumulative product abar_t, indexed by integer timesteps.

PainterNet (arXiv 2412.01223): L = L_diffusion + beta * L_ATAL.
MTADiffusion (arXiv 2506.23482): L = gamma * L_noise + delta * L_style + eta * L_structure with
gamma = 1, delta = 100, eta = 0.1 (sec. "Loss & Training"), see :data:`MTA_WEIGHTS`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import kornia
import torch
import torch.nn as nn
import torch.nn.functional as F

from faithful_inpaint.kernels.masks import at_resolution

MTA_WEIGHTS = {"noise": 1.0, "style": 100.0, "edge": 0.1}


# --------------------------------------------------------------------------------------------------------------
# Diffusion helpers


def _abar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return alphas_cumprod.to(like.device, torch.float32)[timesteps.long()].view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (DDPM eq. 4)."""
    a = _abar(alphas_cumprod, timesteps, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def eps_and_x0(model_output: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction: str = "eps") -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_hat, x0_hat) from a UNet output; ``prediction`` is ``eps`` or ``v`` (v = sqrt(a) eps - sqrt(1-a) x0)."""
    a = _abar(alphas_cumprod, timesteps, x_t)
    out, x = model_output.float(), x_t.float()
    if prediction == "eps":
        eps = out
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif prediction == "v":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
        eps = (1 - a).sqrt() * x + a.sqrt() * out
    else:
        raise ValueError(f"prediction must be 'eps' or 'v', not {prediction!r}")
    return eps, x0


def training_target(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    alphas_cumprod: torch.Tensor, prediction: str = "eps") -> torch.Tensor:
    """What the UNet is trained to output: the noise (eps models) or v (v-prediction models)."""
    if prediction == "eps":
        return noise
    a = _abar(alphas_cumprod, timesteps, x0)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(noise.dtype)


def noise_mse(model_output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain diffusion loss: mean squared error between the UNet output and its target, in float32."""
    return F.mse_loss(model_output.float(), target.float())


# --------------------------------------------------------------------------------------------------------------
# PainterNet: Actual-Token Attention Loss (ATAL)


def atal_loss(attention: Sequence[torch.Tensor], mask: torch.Tensor, actual_tokens: torch.Tensor,
              mode: str = "outside_mass") -> torch.Tensor:
    """ATAL: each actual prompt token's cross-attention should fall inside the mask.

    ``attention``: cross-attention probabilities of the branch's layers, each [B, heads, N, T] or [B, N, T]
    (softmax over the T text tokens, N = h * w square or not: the layer's (h, w) is recovered from the mask's
    aspect ratio). ``mask``: [B, 1, H, W], 1 = regenerate, the local prompt's region. ``actual_tokens``: bool
    [B, T], True at the prompt's word tokens: no SOT, no EOT, no padding (:func:`kernels.tokens.word_token_indices`).

    PainterNet decomposes the cross-attention per actual token and asks each token's map to concentrate on the
    masked region. The paper's summary gives no closed form here, so the form is a choice:

      ``outside_mass`` (default): for token k with map A_k over the N pixels,
          l_k = 1 - sum_{i in M} A_k(i) / sum_i A_k(i)          (the share of the token's attention outside M)
      ``mse``: l_k = mean_i (A_k(i) / max_i A_k(i) - M_i)^2    (the normalised map regressed onto the mask)

    l_k is averaged over the sample's actual tokens, then over samples that have both a non-empty mask and at
    least one actual token (others contribute nothing: an empty prompt has no token to steer), then over layers.
    Heads are averaged before the map is read. The mask is binarised at each layer's resolution (area
    resize, threshold 0.5, :func:`kernels.masks.at_resolution`).
    """
    if mode not in ("outside_mass", "mse"):
        raise ValueError(f"ATAL mode must be 'outside_mass' or 'mse', not {mode!r}")
    tokens = actual_tokens.bool()
    losses = []
    for probs in attention:
        if probs.dim() == 4:
            probs = probs.float().mean(dim=1)
        probs = probs.float()                                     # [B, N, T]
        b, n, t = probs.shape
        h, w = _grid(n, mask.shape[-2], mask.shape[-1])
        m = at_resolution(mask.to(probs.device), h, w)             # [B, N]
        tok = tokens[:, :t].to(probs.device)
        if mode == "outside_mass":
            inside = torch.einsum("bnt,bn->bt", probs, m)
            total = probs.sum(dim=1).clamp_min(1e-12)
            per_token = 1 - inside / total                        # [B, T]
        else:
            peak = probs.amax(dim=1, keepdim=True).clamp_min(1e-12)
            per_token = ((probs / peak - m[:, :, None]) ** 2).mean(dim=1)
        valid = (m.sum(dim=1) > 0) & tok.any(dim=1)
        if not valid.any():
            continue
        per_sample = (per_token * tok).sum(dim=1) / tok.sum(dim=1).clamp_min(1)
        losses.append(per_sample[valid].mean())
    if not losses:
        return mask.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()


def _grid(n: int, height: int, width: int) -> tuple[int, int]:
    """(h, w) of a layer with n tokens for an input of aspect ratio height:width (UNet levels halve with ceil)."""
    h, w = height, width
    while h * w > n:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != n:
        raise ValueError(f"an attention layer with {n} queries does not match a {height}x{width} mask's levels")
    return h, w


# --------------------------------------------------------------------------------------------------------------
# MTADiffusion: edge (structure) loss on Sobel targets


def sobel_edges(images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Edge-map target: Sobel gradient magnitude of the luminance, in [0, 1], then area-downsampled to ``size``.

    MTADiffusion: "ground truth edge maps are obtained by downsampling after extracting with the Sobel operator".
    Open details chosen here: luminance (Rec. 601 weights) of the [0, 1] image, replicate padding, magnitude
    sqrt(gx^2 + gy^2) divided by its largest possible value 4 * sqrt(2) (so a target lies in [0, 1]), area
    averaging down to the latent size.
    """
    gray = (images.float() * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    # kornia's Sobel pads by replication; unnormalised 3x3 kernels and no epsilon inside the root, so a flat
    # region is exactly 0.
    edges = kornia.filters.sobel(gray, normalized=False, eps=0.0) / (4 * 2 ** 0.5)
    if size is not None and tuple(edges.shape[-2:]) != tuple(size):
        edges = F.interpolate(edges, size=size, mode="area")
    return edges


def edge_loss(predicted: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """L_structure = 1/B sum_i ||s_pred^i - s~^i||_F^2 (MTADiffusion's structural loss).

    ``reduction='sum'`` is the paper's form (squared Frobenius norm per sample, averaged over the batch), which
    grows with the latent size; ``'mean'`` divides it by the number of pixels (resolution-independent).
    """
    diff = (predicted.float() - target.float()).pow(2).flatten(1).sum(dim=1)
    if reduction == "mean":
        diff = diff / predicted[0].numel()
    elif reduction != "sum":
        raise ValueError(f"reduction must be 'sum' or 'mean', not {reduction!r}")
    return diff.mean()


# --------------------------------------------------------------------------------------------------------------
# MTADiffusion: VGG Gram-matrix style loss in latent space


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """G = F F^T / (C H W) for features [B, C, H, W] -> [B, C, C] (Gatys et al.'s normalisation)."""
    b, c, h, w = features.shape
    f = features.float().reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def style_loss(features: Sequence[torch.Tensor], target_features: Sequence[torch.Tensor]) -> torch.Tensor:
    """L_style = 1/(B N) sum_i ||G(alpha_i) - G(beta_i)||_F^2 over the N feature layers and the B samples."""
    if len(features) != len(target_features) or not features:
        raise ValueError("style_loss needs the same non-zero number of feature maps on both sides")
    total = 0.0
    for a, b in zip(features, target_features):
        total = total + (gram_matrix(a) - gram_matrix(b)).pow(2).flatten(1).sum(dim=1).mean()
    return total / len(features)


def previous_latents(model_output: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, prediction: str = "eps"):
    """The two latents MTADiffusion's style loss compares: (X_{t-1}, X~_{t-1}).

    X_{t-1} is "derived from the UNet-predicted noise through a denoising function": here the deterministic DDIM
    step sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1}) eps_hat. X~_{t-1} is "derived from the ground truth through
    a noise addition function": q(x_{t-1} | x_0) with the SAME noise that made x_t (a choice: it makes the two
    differ only through the prediction error, not through an independent noise draw). abar_{-1} = 1 (t = 0 gives
    x0_hat and x0).
    """
    eps_hat, x0_hat = eps_and_x0(model_output, x_t, timesteps, alphas_cumprod, prediction)
    padded = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod])    # padded[t] = abar_{t-1}
    a_prev = _abar(padded, timesteps, x_t)
    predicted = a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat
    target = a_prev.sqrt() * x0.float() + (1 - a_prev).sqrt() * noise.float()
    return predicted, target


# torchvision VGG `features` indices of the ReLU outputs the style loss reads by default.
VGG_STYLE_LAYERS = {
    "vgg16": (3, 8, 15, 22),        # relu1_2, relu2_2, relu3_3, relu4_3 (Johnson et al.'s style layers)
    "vgg19": (1, 6, 11, 20, 29),    # relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 (Gatys et al.'s style layers)
}


@dataclass
class VGGConfig:
    arch: str = "vgg16"
    in_channels: int = 4
    layers: tuple[int, ...] | None = None      # None: VGG_STYLE_LAYERS[arch]


class LatentVGG(nn.Module):
    """A torchvision VGG feature stack that reads 4-channel latents (MTADiffusion's "VGG latent space style
    extractor"; the paper changes VGG's input from 3 to 4 channels and trains it with lr 1e-7).

    Weights: :meth:`load_torchvision` takes a torchvision VGG state dict (``torchvision.models.vgg16(weights=
    VGG16_Weights.IMAGENET1K_V1).state_dict()`` saved with ``torch.save``, or the ``vgg16-397923af.pth`` file
    torchvision downloads). The first convolution's 3-channel kernel becomes 4 channels by averaging over RGB and
    repeating with a 3/4 factor (a choice: the response to a constant input keeps its scale). Without a file the
    weights are torchvision's random initialisation (tests). Latents are fed as they are (no ImageNet
    normalisation): the SD latent is already roughly zero-mean and unit-variance after its scale factor.
    """

    def __init__(self, config: VGGConfig | None = None):
        super().__init__()
        from torchvision.models import vgg

        self.config = config or VGGConfig()
        if self.config.arch not in VGG_STYLE_LAYERS:
            raise ValueError(f"VGG arch must be one of {sorted(VGG_STYLE_LAYERS)}, not {self.config.arch!r}")
        self.layers = tuple(self.config.layers or VGG_STYLE_LAYERS[self.config.arch])
        # torchvision's own layer lists ("D" = vgg16, "E" = vgg19): the classifier is never built.
        layout = vgg.cfgs[{"vgg16": "D", "vgg19": "E"}[self.config.arch]]
        features = list(vgg.make_layers(layout).children())[: max(self.layers) + 1]
        first = features[0]
        features[0] = nn.Conv2d(self.config.in_channels, first.out_channels, 3, padding=1)
        for i, module in enumerate(features):
            if isinstance(module, nn.ReLU):
                features[i] = nn.ReLU(inplace=False)
        self.features = nn.Sequential(*features)

    def load_torchvision(self, path: str) -> None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        own = {}
        for key, value in state.items():
            if not key.startswith("features."):
                continue
            index = int(key.split(".")[1])
            if index >= len(self.features):
                continue
            if index == 0 and key.endswith("weight") and value.shape[1] != self.config.in_channels:
                value = value.mean(dim=1, keepdim=True).repeat(1, self.config.in_channels, 1, 1)
                value = value * (3 / self.config.in_channels)
            own[key[len("features."):]] = value
        missing, _ = self.features.load_state_dict(own, strict=False)
        if missing:
            raise ValueError(f"{path} is not a torchvision {self.config.arch} state dict (missing {missing[:3]}...)")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pools = sum(isinstance(m, nn.MaxPool2d) for m in self.features)
        if min(x.shape[-2:]) < 2 ** pools:
            raise ValueError(f"the style VGG's layers {self.layers} need latents of at least {2 ** pools}x{2 ** pools}"
                             f" (got {tuple(x.shape[-2:])}): train at a higher resolution or read earlier layers")
        out = []
        for i, module in enumerate(self.features):
            x = module(x)
            if i in self.layers:
                out.append(x)
        return out


def latent_style_loss(vgg: LatentVGG, predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MTADiffusion's style loss on latents: Gram matrices of VGG features of X_{t-1} vs X~_{t-1}."""
    return style_loss(vgg(predicted), vgg(target))
