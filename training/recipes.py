"""Branch recipes: which branch architecture is trained with which weighted losses.

Adding a recipe is one entry in :data:`RECIPES`; an architecture is a branch family's record
(kernels/branch_families.py), from which :data:`BRANCHES` is derived; adding a loss is one entry in
:data:`LOSS_TERMS`. Every loss term reads a :class:`LossContext` (one training step's tensors) and may ask for
extra trainable modules (the style loss's VGG) with their own learning rate.

| recipe        | branch     | losses (weights)                          | learning rates                    |
|---------------|------------|-------------------------------------------|-----------------------------------|
| brushnet      | brushnet   | noise 1                                   | 1e-5 (BrushNet: 5e-6..1e-5)       |
| powerpaint    | powerpaint | noise 1                                   | 1e-5                              |
| painternet    | painternet | noise 1, atal 0.1                         | 1e-5                              |
| mtadiffusion  | mtadiffusion | noise 1, style 100, edge 0.1 (paper)    | 1e-5 branch, 1e-7 VGG (paper)     |
| painternet-mta| painternet | noise 1, atal 0.1, style 100              | 1e-5, VGG 1e-7                    |
| brushnet-style| brushnet   | noise 1, style 100                        | 1e-5, VGG 1e-7                    |
| powerpaint-atal| powerpaint| noise 1, atal 0.1                         | 1e-5                              |

The ATAL weight (PainterNet's beta) is not given in the summary this pack works from; 0.1 is a choice (ATAL lies in
[0, 1]; the noise MSE of a trained model is ~0.1), configurable with ``--loss atal=<w>``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from faithful_inpaint.kernels.attention_maps import attention_maps
from faithful_inpaint.kernels import branch_losses as L
from faithful_inpaint.kernels import branch_families


@dataclass
class LossContext:
    """One training step: what every loss term may read."""
    base: object                          # training.base.FrozenBase
    images: torch.Tensor                  # [B, 3, H, W] in [0, 1]
    mask: torch.Tensor                    # [B, 1, H, W], 1 = regenerate
    latents: torch.Tensor                 # x0 [B, 4, h, w]
    noise: torch.Tensor
    timesteps: torch.Tensor               # [B] ints
    noisy: torch.Tensor                   # x_t
    model_output: torch.Tensor            # UNet output (eps or v) with the branch injected
    target: torch.Tensor                  # what the output should be
    branch_output: object                 # kernels.brush_branch.BranchOutput
    actual_tokens: torch.Tensor           # bool [B, T]
    cross_attention: list = field(default_factory=list)   # branch cross-attention probabilities (ATAL)
    options: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Loss terms


@dataclass(frozen=True)
class LossTerm:
    compute: Callable[[LossContext, nn.ModuleDict], torch.Tensor]
    modules: dict = field(default_factory=dict)        # name -> factory(options) -> nn.Module (trainable)
    module_lr: dict = field(default_factory=dict)      # name -> default learning rate of that module
    needs_attention: bool = False                      # record the branch's cross-attention probabilities


def _noise(ctx: LossContext, modules) -> torch.Tensor:
    return L.noise_mse(ctx.model_output, ctx.target)


def _atal(ctx: LossContext, modules) -> torch.Tensor:
    attention = ctx.branch_output.extras.get("cross_attention") or ctx.cross_attention
    if not attention:
        raise ValueError("the ATAL loss needs a branch with cross-attention (powerpaint, painternet); this branch "
                         "has none")
    return L.atal_loss(attention, ctx.mask, ctx.actual_tokens, ctx.options.get("atal_mode", "outside_mass"))


def _edge(ctx: LossContext, modules) -> torch.Tensor:
    predicted = ctx.branch_output.extras.get("edge")
    if predicted is None:
        raise ValueError("the edge loss needs a branch with an edge output (extras['edge']: mtadiffusion)")
    target = L.sobel_edges(ctx.images, tuple(predicted.shape[-2:])).to(predicted.device)
    return L.edge_loss(predicted, target, ctx.options.get("edge_reduction", "sum"))


def _style(ctx: LossContext, modules) -> torch.Tensor:
    predicted, target = L.previous_latents(ctx.model_output, ctx.noisy, ctx.latents, ctx.noise, ctx.timesteps,
                                           ctx.base.alphas_cumprod, ctx.base.prediction)
    return L.latent_style_loss(modules["style_vgg"], predicted, target)


def _style_vgg(options: dict) -> nn.Module:
    vgg = L.LatentVGG(L.VGGConfig(arch=options.get("vgg_arch", "vgg16")))
    if options.get("vgg_weights"):
        vgg.load_torchvision(options["vgg_weights"])
    return vgg


LOSS_TERMS: dict[str, LossTerm] = {
    "noise": LossTerm(_noise),
    "atal": LossTerm(_atal, needs_attention=True),
    "edge": LossTerm(_edge),
    "style": LossTerm(_style, modules={"style_vgg": _style_vgg}, module_lr={"style_vgg": 1e-7}),
}


# ---------------------------------------------------------------------------------------------------------------
# Branch architectures


@dataclass(frozen=True)
class BranchKind:
    """How a branch family trains. ``build(base, options)`` makes a new branch initialised for training (the
    exported file's kind is its key in BRANCHES); every family reaches the UNet through the sampling nodes' own
    injection (``FrozenBase.unet_forward``); ``unet_prompt`` is the caption the frozen UNet reads: "mask" (the
    caption that goes with the mask, as the branch) or "global" (PainterNet: the branch reads the local prompt, the
    UNet the whole-image prompt, as BrushBranchApply wires them)."""
    build: Callable
    unet_prompt: str = "mask"


def _branch_kind(family: branch_families.BranchFamily) -> BranchKind:
    def build(base, options):
        return family.new_branch(base.unet_state_dict_diffusers(), base.unet_config)
    return BranchKind(build, unet_prompt="global" if family.local_prompt else "mask")


# One entry per family record (kernels/branch_families.py).
BRANCHES: dict[str, BranchKind] = {f.kind: _branch_kind(f) for f in branch_families.FAMILIES}


# ---------------------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Recipe:
    branch: str                             # a family's kind (kernels/branch_families.py)
    losses: dict                            # term -> weight
    learning_rate: float = 1e-5
    description: str = ""

    def __post_init__(self):
        if self.branch not in branch_families.BY_KIND:
            raise ValueError(f"unknown branch {self.branch!r}; known: {sorted(branch_families.BY_KIND)}")
        unknown = set(self.losses) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; known: {sorted(LOSS_TERMS)}")


RECIPES: dict[str, Recipe] = {
    "brushnet": Recipe("brushnet", {"noise": 1.0}, description="BrushNet: noise MSE"),
    "powerpaint": Recipe("powerpaint", {"noise": 1.0}, description="BrushNet with cross-attention (PowerPaint v2)"),
    "painternet": Recipe("painternet", {"noise": 1.0, "atal": 0.1}, description="PainterNet: diffusion + ATAL"),
    "mtadiffusion": Recipe("mtadiffusion", {"noise": 1.0, "style": 100.0, "edge": 0.1},
                           description="MTADiffusion: noise + VGG Gram style + Sobel edge (paper weights)"),
    "painternet-mta": Recipe("painternet", {"noise": 1.0, "atal": 0.1, "style": 100.0},
                             description="PainterNet branch, ATAL and MTADiffusion's style loss"),
    "brushnet-style": Recipe("brushnet", {"noise": 1.0, "style": 100.0},
                             description="BrushNet with MTADiffusion's style loss"),
    "powerpaint-atal": Recipe("powerpaint", {"noise": 1.0, "atal": 0.1},
                              description="cross-attention BrushNet with PainterNet's ATAL"),
}


# ---------------------------------------------------------------------------------------------------------------
# Cross-attention capture for ATAL


@contextlib.contextmanager
def record_cross_attention(branch: nn.Module, into: list):
    """While the block runs, note the inputs of every ``attn2`` of ``branch``; on leaving, append to ``into`` their
    softmax cross-attention probabilities [B, heads, N, T] (call order), recomputed from the layer's own to_q /
    to_k (the layer itself keeps its fused attention), so they carry gradients to the branch. Computing them after
    the forward, not in the hook, keeps gradient-checkpointed blocks recomputable (the hook is gone by then)."""
    seen, handles = [], []

    def hook(module, args, kwargs, output):
        context = args[1] if len(args) > 1 else kwargs.get("context")
        if context is not None:
            seen.append((module, args[0], context))

    for name, module in branch.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_q"):
            handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        yield into
    finally:
        for h in handles:
            h.remove()
    into.extend(attention_maps(m.to_q(x), m.to_k(c), m.heads) for m, x, c in seen)


def parse_losses(text: Optional[str], defaults: dict) -> dict:
    """``"noise=1,atal=0.05"`` -> {"noise": 1.0, "atal": 0.05} (replaces the recipe's set when given)."""
    if not text:
        return dict(defaults)
    out = {}
    for part in text.split(","):
        name, _, weight = part.partition("=")
        name = name.strip()
        if name not in LOSS_TERMS:
            raise ValueError(f"unknown loss {name!r}; known: {sorted(LOSS_TERMS)}")
        out[name] = float(weight) if weight else 1.0
    return out
