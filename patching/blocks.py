"""The transformer blocks of a ComfyUI UNet, keyed as ComfyUI's attention patches key them, with their resolution,
and what an attention replace on them chains: the replace installed before it, or ComfyUI's own attention.

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


def previous_replace(model, attention: str, key: BlockKey):
    """The ``attention`` ("attn1" | "attn2") replace a ModelPatcher already has on block ``key``, or None. ComfyUI
    looks a replace up by (block, id, index) first, then by (block, id): a new replace chains what it would call."""
    replaces = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get(attention, {})
    return replaces.get(key, replaces.get(key[:2]))


def host_attention(q, k, v, extra_options):
    """ComfyUI's selected attention function, exactly as CrossAttention.forward calls it."""
    from comfy.ldm.modules import attention

    return attention.optimized_attention(q, k, v, extra_options["n_heads"],
                                         attn_precision=extra_options.get("attn_precision"),
                                         transformer_options=extra_options)
