"""PainterNet's Attention Control Points (ACP) added to a ComfyUI UNet's attention outputs.

``patching.brush_branch.inject_residuals`` (the one injection path of sampling and training) calls
:func:`with_attention_control` for every BranchOutput: when it carries ACP features (``extras["acp"]``, a
:class:`kernels.painternet.AttentionControl`), they are added to the output of the chosen attention of the matching
transformer blocks, after its output projection:

    attn2_output_patch(n, extra_options):  n + s * Z_l(A_l^branch)   for the block l = (block, id, block_index)

(``attn1_output_patch`` when the branch's ACP read self-attention). Blocks without an ACP feature are left as they
are. Like the residual patches, the ACP patch rides on the per-call copy of transformer_options, so nothing is left on
the clone's model_options or on the model, and it runs after any attention replace another node installed (e.g.
IPAdapter's attn2 replaces): the ACP adds to whatever that attention produced.
"""
from __future__ import annotations

from typing import Optional

import torch

from faithful_inpaint.kernels.brush_branch import BranchOutput
from faithful_inpaint.kernels.painternet import AttentionControl
from faithful_inpaint.patching.blocks import key_of, transformer_blocks


def with_attention_control(output: BranchOutput, strength: float, transformer_options: dict) -> dict:
    """``transformer_options`` (unchanged when ``output`` has no ACP) or a copy whose attention output patch adds the
    ACP features x ``strength``."""
    control: Optional[AttentionControl] = output.extras.get("acp")
    if control is None or not control.features or strength == 0:
        return transformer_options
    features = control.features

    def acp_patch(n, extra_options):
        if "block" not in extra_options:
            return n
        feature = features.get(key_of(extra_options))
        if feature is None:
            return n
        return n + (feature * strength).to(device=n.device, dtype=n.dtype)

    options = dict(transformer_options)
    patches = {k: list(v) for k, v in transformer_options.get("patches", {}).items()}
    patches.setdefault(f"{control.attention}_output_patch", []).append(acp_patch)
    options["patches"] = patches
    return options


def check_acp_blocks(unet, acp_keys) -> list:
    """The ACP block keys this UNet lacks (a branch made for another architecture): [] when every one exists."""
    present = {b.key for b in transformer_blocks(unet)}
    return [k for k in acp_keys if tuple(k) not in present]


def pad_context(context: torch.Tensor, tokens: int) -> torch.Tensor:
    """[1, T, C] repeated along T to ``tokens`` (a multiple of T): attention over repeated keys is unchanged, which
    is how ComfyUI batches prompts of different lengths."""
    return context if context.shape[1] == tokens else context.repeat(1, tokens // context.shape[1], 1)
