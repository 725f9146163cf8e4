"""MTADiffusion's brush branch (Huang et al., CVPR 2025, arXiv 2506.23482): BrushNet with multi-resolution
self-attention blocks and an extra edge-prediction output channel.

Architecture. BrushNet's branch (:class:`kernels.brush_branch.BrushBranch`: 9-channel conv_in, a resnet copy of the
UNet's encoder/decoder, zero-initialised 1x1 convolutions on every down / mid / up output added to the UNet's hidden
states) in which every resnet is followed by a self-attention block ("the brush branch uses multi-resolution
self-attention blocks (instead of BrushNet's residual blocks)" so it sees the whole image's style). The paper gives
no further layout; the choices here:

* one self-attention block after every resnet of every level (the highest resolution included: that is what
  "multi-resolution" asks for) and in the middle block (resnet, attention, resnet);
* a block is the UNet's spatial transformer without cross-attention: GroupNorm, proj_in, [LayerNorm, self-attention,
  LayerNorm, GEGLU feed-forward] with residuals, proj_out, residual (diffusers' names: ``norm1``, ``attn1``,
  ``norm3``, ``ff``). The branch reads no text; its context argument is accepted and ignored;
* heads as the UNet's (``BranchConfig.heads_for``); where the UNet has an attention layer at the same place, a new
  branch starts from its self-attention weights (``new_branch``), elsewhere from PyTorch's default initialisation.

Edge prediction. "The output dimension of the last layer in the brush branch's attention block is expanded from
(b, c, h, w) to (b, c + 1, h, w)": the last attention block of the up path (full latent resolution) has a proj_out
with c + 1 outputs; the first c continue through the branch, the extra one is the edge map
``extras["edge"]`` [B, 1, h, w] at latent resolution (the structure loss compares it with the Sobel edges of the
image downsampled to that size, :func:`kernels.branch_losses.sobel_edges`). It is not injected into the UNet.

File format (docs/brush-branches.md): metadata ``faithful_inpaint.kind = "mtadiffusion"``, ``faithful_inpaint.config``
= the :class:`kernels.brush_branch.BranchConfig` JSON (attention-free BrushNet fields: the kind fixes the attention
layout above, so a BrushBranchApply that reads the config as a BrushNet config gets the right residual counts);
tensors as BrushNet's plus ``{down,up}_blocks.N.attentions.M.*`` and ``mid_block.attentions.0.*``. No ComfyUI here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from faithful_inpaint.kernels.brush_branch import (Attention, BranchConfig, BranchOutput, BrushBranch, FeedForward,
                                                  Transformer2D)

KIND = "mtadiffusion"
EDGE_CHANNELS = 1


class SelfAttentionBlock(nn.Module):
    """A transformer block without cross-attention (diffusers' BasicTransformerBlock with no cross_attention_dim)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        return x + self.ff(self.norm3(x))


class SelfAttention2D(Transformer2D):
    """Spatial self-attention over a [B, C, h, w] map: the spatial transformer (norm, proj_in, block, proj_out,
    residual) with one :class:`SelfAttentionBlock`; the context is ignored.

    ``side_channels`` > 0 widens proj_out; the extra channels leave through :attr:`side_output` (set by each
    forward, read and cleared by the branch) and the block returns the usual C channels.
    """

    def __init__(self, ch: int, heads: int, head_dim: int, linear: bool, groups: int = 32, side_channels: int = 0):
        super().__init__(ch, None, 0, heads, head_dim, linear, groups, out_channels=ch + side_channels)
        self.transformer_blocks.append(SelfAttentionBlock(heads * head_dim, heads, head_dim))
        self.side_channels = side_channels
        self.side_output: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self.attend(x, context)
        c = x.shape[1]
        if self.side_channels:
            y, self.side_output = y[:, :c], y[:, c:]
        return x + y


class MTADiffusionBranch(BrushBranch):
    """BrushNet's branch with a self-attention block after every resnet and an edge channel on the last one."""

    def __init__(self, config: BranchConfig):
        if config.cross_attention:
            raise ValueError("the MTADiffusion branch has self-attention only: give it an attention-free "
                             "(BrushNet) config")
        super().__init__(config)
        mc = config.model_channels
        levels = len(config.channel_mult)

        def blocks(ch: int, n: int, side_last: int = 0) -> nn.ModuleList:
            heads, head_dim = config.heads_for(ch)
            return nn.ModuleList([SelfAttention2D(ch, heads, head_dim, config.use_linear_in_transformer,
                                                  config.norm_groups, side_last if i == n - 1 else 0)
                                  for i in range(n)])

        for lvl, level in enumerate(self.down_blocks):
            level.attentions = blocks(mc * config.channel_mult[lvl], len(level.resnets))
        self.mid_block.attentions = blocks(mc * config.channel_mult[-1], 1)
        for i, level in enumerate(self.up_blocks):
            lvl = levels - 1 - i
            last = i == len(self.up_blocks) - 1
            level.attentions = blocks(mc * config.channel_mult[lvl], len(level.resnets),
                                      EDGE_CHANNELS if last else 0)

    @property
    def edge_block(self) -> SelfAttention2D:
        return self.up_blocks[-1].attentions[-1]

    @classmethod
    def from_unet(cls, unet_state_dict: dict, config: BranchConfig) -> "MTADiffusionBranch":
        """BrushBranch.from_unet (every weight whose name and shape the UNet shares), plus the widened proj_out of
        the edge block: its first C outputs from the UNet's layer at that place when it has one."""
        branch = super().from_unet(unet_state_dict, config)
        last = len(branch.up_blocks) - 1
        prefix = f"up_blocks.{last}.attentions.{len(branch.up_blocks[last].resnets) - 1}.proj_out."
        with torch.no_grad():
            for name, own in branch.edge_block.proj_out.named_parameters():
                src = unet_state_dict.get(prefix + name)
                if src is not None and (src.shape[0] + EDGE_CHANNELS, *src.shape[1:]) == tuple(own.shape):
                    own[:src.shape[0]].copy_(src.to(own.dtype))
        return branch

    def forward(self, noisy_latent: torch.Tensor, masked_image_latent: torch.Tensor, keep_mask: torch.Tensor,
                timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> BranchOutput:
        block = self.edge_block
        block.side_output = None
        try:
            out = super().forward(noisy_latent, masked_image_latent, keep_mask, timesteps, None, y)
            out.extras["edge"] = block.side_output
        finally:
            block.side_output = None
        return out


def config_for(unet_config: dict) -> BranchConfig:
    """The MTADiffusion branch of a base UNet (ComfyUI's unet_config): BrushNet's layout (attention fixed by kind)."""
    return BranchConfig.from_unet_config(unet_config)


def new_branch(unet_state_dict: dict, unet_config: dict) -> MTADiffusionBranch:
    """A new MTADiffusion branch for a base UNet (ComfyUI unet_config, diffusers-named weights), as training starts."""
    return MTADiffusionBranch.from_unet(unet_state_dict, config_for(unet_config))


def branch_from_config(config_json: str) -> MTADiffusionBranch:
    """The (untrained) branch a file's ``faithful_inpaint.config`` describes; the loader fills in the weights."""
    return MTADiffusionBranch(BranchConfig.from_json(config_json))
