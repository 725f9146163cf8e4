"""PainterNet's branch (Zhang et al., arXiv 2412.01223): a dual-branch plugin with layer control points and
Attention Control Points (ACP), conditioned on a LOCAL prompt.

The branch is a trainable copy of the UNet's encoder/decoder that keeps its transformer blocks (self-attention,
cross-attention, feed-forward), with BrushNet's 9-channel input (noisy latent 4 + masked-image latent 4 + keep mask
1). Two kinds of control points connect it to the frozen UNet:

* Layer control points: a zero-initialised 1x1 convolution on every down / mid / up output, added to the UNet's
  hidden states at the same place (BrushNet's layout, :class:`kernels.brush_branch.BrushBranch`; injected by
  ``patching.brush_branch.inject_residuals``).
* Attention Control Points (ACP). The paper feeds the branch's attention features into the main UNet's attention
  without giving a closed form; the form chosen here (``acp_attention = "attn2"``, the default) is, for every
  chosen transformer block l (same place, resolution and width in both networks)::

      A_l^main' = A_l^main + s * Z_l(A_l^branch)                                                  (ACP)

  A_l = the output of block l's cross-attention after its output projection ([B, N, C], what the attention adds
  to the hidden states), A_l^branch reads the LOCAL prompt, Z_l a zero-initialised Linear(C, C), s the strength.
  The main UNet's own cross-attention keeps reading the global prompt; the ACP bring the local prompt's attention
  result into the masked region of the main UNet at every chosen layer. ``acp_attention = "attn1"`` feeds the
  branch's self-attention output into the UNet's self-attention output instead; ``acp_blocks`` limits the ACP to
  some transformer blocks (default: every one). With Z_l = 0 an untrained branch leaves the UNet unchanged.

Local prompt: the branch's cross-attention reads the context it is given (the node passes the local prompt for the
conditional rows and the negative prompt for the unconditional ones); the UNet keeps its own (global) prompt.

Outputs (contract of :class:`kernels.brush_branch.BranchOutput`): down / mid / up residuals, and
``extras["acp"]``, an :class:`AttentionControl`: which attention of the UNet receives the features and
``features = {block_key: [B, N, C]}`` keyed by the main UNet transformer block that receives them, in ComfyUI's
attention-patch key form (block_name, block_id, block_index), e.g. ("input", 1, 0). ATAL reads the branch's
cross-attention probabilities; ``training.recipes.record_cross_attention`` captures them from every ``attn2`` of
this module (the same :class:`kernels.brush_branch.Attention` layers as PowerPaint's).

File format (docs/brush-branches.md): metadata ``faithful_inpaint.kind = "painternet"``, ``faithful_inpaint.config`` =
:meth:`PainterNetConfig.to_json`; tensors as BrushNet/PowerPaint (``conv_in``, ``down_blocks.*`` with
``attentions``, ``brushnet_*_blocks``) plus ``attention_control_points.<n>.{weight,bias}`` (n in the order of
:func:`transformer_block_keys` restricted to the chosen blocks). No ComfyUI import here.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from faithful_inpaint.kernels.brush_branch import BranchConfig, BranchOutput, BrushBranch

KIND = "painternet"
ACP_ATTENTIONS = ("attn2", "attn1")     # cross-attention (default) or self-attention outputs

BlockKey = tuple[str, int, int]


@dataclass(frozen=True)
class PainterNetConfig(BranchConfig):
    """A cross-attention branch config plus where its Attention Control Points go."""
    acp_attention: str = "attn2"
    acp_blocks: Optional[tuple[BlockKey, ...]] = None      # None: every transformer block of the UNet

    def __post_init__(self):
        if self.acp_attention not in ACP_ATTENTIONS:
            raise ValueError(f"acp_attention must be one of {ACP_ATTENTIONS}, not {self.acp_attention!r}")
        if not self.cross_attention:
            raise ValueError("a PainterNet branch keeps the UNet's transformer blocks: its transformer_depth "
                             "cannot be all zero")
        if self.acp_blocks is not None:
            known = set(transformer_block_keys(self))
            unknown = [k for k in self.acp_blocks if tuple(k) not in known]
            if unknown:
                raise ValueError(f"no transformer block {unknown} in this architecture; it has {sorted(known)}")

    @classmethod
    def of(cls, base: BranchConfig, **acp) -> "PainterNetConfig":
        """A PainterNet config from a BrushBranch config (its transformer layout must keep the UNet's)."""
        return cls(**{**asdict(base), **acp})

    @classmethod
    def from_json(cls, text: str) -> "PainterNetConfig":
        data = json.loads(text)
        attention = data.pop("acp_attention", "attn2")
        blocks = data.pop("acp_blocks", None)
        return cls.of(BranchConfig.from_json(json.dumps(data)), acp_attention=attention,
                      acp_blocks=None if blocks is None else tuple(tuple(k) for k in blocks))

    def acp_keys(self) -> list[BlockKey]:
        """The transformer blocks that carry an ACP, in the branch's forward order."""
        keys = transformer_block_keys(self)
        if self.acp_blocks is None:
            return keys
        chosen = {tuple(k) for k in self.acp_blocks}
        return [k for k in keys if k in chosen]


@dataclass
class AttentionControl:
    """The ACP part of a PainterNet BranchOutput (``extras["acp"]``): unscaled Z_l(A_l^branch) per UNet block."""
    attention: str                                  # "attn2" | "attn1": the UNet attention output they are added to
    features: dict                                  # block key -> [B, N, C]


def transformer_block_keys(config: BranchConfig) -> list[BlockKey]:
    """Every transformer block of the branch as the key of the main UNet block at the same place, forward order.

    ComfyUI numbers input blocks conv_in = 0, then per level its resnet(+attention) blocks and its downsampler; the
    middle block is ("middle", 0); output blocks count num_res_blocks + 1 per level from the deepest. The third
    element is the transformer's index inside its SpatialTransformer (``block_index``).
    """
    keys = []
    block = 1
    for level, n in enumerate(config.num_res_blocks):
        for i in range(n):
            keys += [("input", block + i, d) for d in range(config.transformer_depth[level])]
        block += n + 1
    keys += [("middle", 0, d) for d in range(config.transformer_depth_middle)]
    block = 0
    for level in reversed(range(len(config.num_res_blocks))):
        n = config.num_res_blocks[level] + 1
        for i in range(n):
            keys += [("output", block + i, d) for d in range(config.transformer_depth[level])]
        block += n
    return keys


def _branch_transformer_blocks(branch: BrushBranch) -> list:
    """The branch's BasicTransformerBlocks in forward order (down, mid, up), matching transformer_block_keys."""
    out = []
    for level in list(branch.down_blocks) + [branch.mid_block] + list(branch.up_blocks):
        for transformer in level.attentions or ():
            out.extend(transformer.transformer_blocks)
    return out


def zero_linear(dim: int) -> nn.Linear:
    """Linear layer initialised to zero: the ACP of a new branch adds nothing."""
    layer = nn.Linear(dim, dim)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class PainterNetBranch(BrushBranch):
    """The PainterNet branch: BrushBranch with transformers kept, plus one zero Linear per Attention Control Point."""

    def __init__(self, config: PainterNetConfig):
        super().__init__(config)
        self.acp_keys = config.acp_keys()
        blocks = self._blocks_by_key()
        self.attention_control_points = nn.ModuleList(
            [zero_linear(blocks[k].norm1.normalized_shape[0]) for k in self.acp_keys])

    def _blocks_by_key(self) -> dict:
        return dict(zip(transformer_block_keys(self.config), _branch_transformer_blocks(self)))

    def forward(self, noisy_latent: torch.Tensor, masked_image_latent: torch.Tensor, keep_mask: torch.Tensor,
                timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None) -> BranchOutput:
        if context is None:
            raise ValueError("the PainterNet branch reads a (local) prompt: context is required")
        # The chosen attention layers' outputs are read with forward hooks that exist only during this call.
        blocks = self._blocks_by_key()
        features: dict = {}
        handles = []
        try:
            for key in self.acp_keys:
                attention = getattr(blocks[key], self.config.acp_attention)
                handles.append(attention.register_forward_hook(
                    lambda module, args, output, key=key: features.__setitem__(key, output)))
            out = super().forward(noisy_latent, masked_image_latent, keep_mask, timesteps, context, y)
        finally:
            for handle in handles:
                handle.remove()
        out.extras["acp"] = AttentionControl(self.config.acp_attention, {
            key: acp(features[key]) for key, acp in zip(self.acp_keys, self.attention_control_points)})
        return out


def config_for(unet_config: dict, **acp) -> PainterNetConfig:
    """The PainterNet branch of a base UNet (ComfyUI's unet_config): its transformer layout, ACP as given."""
    return PainterNetConfig.of(BranchConfig.from_unet_config(unet_config, cross_attention=True), **acp)


def new_branch(unet_state_dict: dict, unet_config: dict, **acp) -> PainterNetBranch:
    """A new PainterNet branch for a base UNet (ComfyUI unet_config, diffusers-named weights), as training starts:
    every shared weight copied from the UNet (BrushBranch.from_unet), every control point zero."""
    return PainterNetBranch.from_unet(unet_state_dict, config_for(unet_config, **acp))


def branch_from_config(config_json: str) -> PainterNetBranch:
    """The (untrained) branch a file's ``faithful_inpaint.config`` describes; the loader fills in the weights."""
    return PainterNetBranch(PainterNetConfig.from_json(config_json))
