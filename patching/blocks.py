"""The transformer blocks of a ComfyUI UNet, keyed as ComfyUI's attention patches key them, with their resolution.

Key: (block_name, block_id, block_index) with block_name "input" | "middle" | "output", the same triple ComfyUI
uses for attn1/attn2 replace patches. ``downsample`` is how many times smaller than the latent the block's feature
map is (1, 2, 4, 8); the image-space factor is 8 * downsample (H/16 is downsample 2).
"""
from __future__ import annotations

from dataclasses import dataclass

BlockKey = tuple[str, int, int]


@dataclass(frozen=True)
class TransformerBlockInfo:
    key: BlockKey
    downsample: int
    module: object  # comfy.ldm.modules.attention.BasicTransformerBlock


def _transformers(seq):
    from comfy.ldm.modules.attention import SpatialTransformer

    for layer in seq:
        if isinstance(layer, SpatialTransformer):
            yield from enumerate(layer.transformer_blocks)


def transformer_blocks(unet) -> list[TransformerBlockInfo]:
    """Every BasicTransformerBlock of a UNetModel in forward order."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    out, level = [], 0
    for i, seq in enumerate(unet.input_blocks):
        for idx, blk in _transformers(seq):
            out.append(TransformerBlockInfo(("input", i, idx), 2 ** level, blk))
        if any(isinstance(layer, Downsample) for layer in seq):
            level += 1
    for idx, blk in _transformers(unet.middle_block):
        out.append(TransformerBlockInfo(("middle", 0, idx), 2 ** level, blk))
    for i, seq in enumerate(unet.output_blocks):
        for idx, blk in _transformers(seq):
            out.append(TransformerBlockInfo(("output", i, idx), 2 ** level, blk))
        if any(isinstance(layer, Upsample) for layer in seq):
            level -= 1
    return out


def key_of(extra_options: dict) -> BlockKey:
    """The block key of the transformer block an attention patch is running in."""
    block = extra_options["block"]
    return (block[0], block[1], extra_options.get("block_index", 0))
