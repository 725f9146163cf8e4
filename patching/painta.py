"""PAIntA installed on a ModelPatcher clone through ComfyUI's public attention hooks.

Per active transformer block (chosen resolution, inside the schedule window, non-empty mask):
  1. an attn1 *replace* computes the ordinary self-attention (or calls the replace another node installed before)
     and keeps q, k, v and that output for step 2;
  2. a ``middle_patch`` (called right after ``x = x + self_attention``) gets h = x + y, computes c_j from the
     block's own cross-attention projections on norm2(h) and the region prompt (conditional rows; the same c is used
     for the unconditional rows), recomputes the masked rows with eq. (5) -- through the earlier replace when there
     is one, so its effect is kept there too -- and adds the difference through the block's to_out. Rows of
     unmasked queries are untouched.
Nothing is kept on the model: the patches live in the clone's model_options and per-call state in this object.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from faithful_inpaint.kernels import masks as mask_ops
from faithful_inpaint.kernels.batch import cond_slice
from faithful_inpaint.kernels.painta import REFERENCE_SMOOTHING_SIGMA, painta_attention, prompt_relevance
from faithful_inpaint.patching.errors import NodeInputError
from faithful_inpaint.patching.blocks import BlockKey, host_attention, key_of, previous_replace, transformer_blocks
from faithful_inpaint.patching.prompt import RegionPrompt
from faithful_inpaint.patching.schedule import ScheduleWindow

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    plain: torch.Tensor
    extra_options: dict
    previous: object = None            # the attn1 replace installed before PAIntA on this block, if any


@dataclass
class PAIntAHooks:
    prompt: RegionPrompt
    mask: torch.Tensor                 # [b, 1, H, W], 1 = regenerate
    downsamples: tuple[int, ...]       # UNet levels to act on (latent downsample factor: 2 = H/16, 4 = H/32)
    window: ScheduleWindow
    smoothing_sigma: float = REFERENCE_SMOOTHING_SIGMA
    node: str = "PAIntAPatch"          # named in errors raised during sampling
    layer_rule: str = "area"           # kernels.masks.at_resolution rule: the mask at each attention resolution
    # Test and debugging hook: replaces the computed c_j ([b, N] -> [b, N]).
    relevance_override: object = None
    _blocks: dict = field(default_factory=dict)
    _pending: dict = field(default_factory=dict)
    _last_relevance: dict = field(default_factory=dict)
    _mask_cache: dict = field(default_factory=dict)

    def install(self, model) -> list[BlockKey]:
        """Register the hooks on ``model`` (a ModelPatcher clone); returns the patched block keys."""
        unet = model.get_model_object("diffusion_model")
        self._blocks = {b.key: b.module for b in transformer_blocks(unet) if b.downsample in self.downsamples}
        for key in self._blocks:
            previous = previous_replace(model, "attn1", key)
            model.set_model_attn1_replace(self._self_attention(key, previous), key[0], key[1], key[2])
        # Closures, not bound methods: ModelPatcher.clone() deep-copies model_options, and a bound method would drag
        # this object (and the UNet blocks it references) into the copy; functions are shared as they are.
        def middle_patch(h, extra_options):
            return self._middle_patch(h, extra_options)

        model.set_model_patch(middle_patch, "middle_patch")
        return list(self._blocks)

    # -- step 1: ordinary self-attention, remembered for the block's middle patch ---------------------------
    def _self_attention(self, key: BlockKey, previous):
        def attn1_replace(q, k, v, extra_options):
            if previous is not None:
                out = previous(q, k, v, extra_options)
            else:
                out = host_attention(q, k, v, extra_options)
            if self.window.contains(extra_options["sigmas"]):
                self._pending[key] = _Pending(q, k, v, out, extra_options, previous)
            return out

        return attn1_replace

    # -- step 2: c_j from the cross-attention projections, eq. (5) on masked rows ---------------------------
    def _middle_patch(self, h, extra_options):
        key = key_of(extra_options) if "block" in extra_options else None
        pending = self._pending.pop(key, None)
        if pending is None:
            return h
        height, width = extra_options["activations_shape"][-2:]
        block = self._blocks[key]
        batch = h.shape[0]
        query_mask = self._query_mask(height, width, batch, extra_options["cond_or_uncond"], h.device)
        if not bool(query_mask.any()):
            return h
        relevance = self._relevance(key, block, h, height, width, extra_options)
        relevance = relevance.repeat(batch // relevance.shape[0], 1)
        heads = extra_options["n_heads"]

        def attention(q, k, v, heads_):   # the masked rows' attention, computed the way step 1 computed `plain`
            if pending.previous is not None:
                return pending.previous(q, k, v, pending.extra_options)
            return host_attention(q, k, v, pending.extra_options)

        new = painta_attention(pending.q, pending.k, pending.v, heads, relevance.to(pending.q.dtype), query_mask,
                               attention=attention, plain=pending.plain)
        return h + (block.attn1.to_out(new) - block.attn1.to_out(pending.plain))

    def _query_mask(self, height, width, batch, cond_or_uncond, device) -> torch.Tensor:
        """[batch, N] binary mask of this layer, the per-sample masks repeated for every cond/uncond chunk."""
        cache_key = (height, width, batch, tuple(cond_or_uncond), device)
        if cache_key not in self._mask_cache:
            per_chunk = batch // len(cond_or_uncond)
            try:
                m = mask_ops.match_batch(mask_ops.at_resolution(self.mask, height, width, rule=self.layer_rule),
                                         per_chunk)
            except ValueError as err:
                raise NodeInputError(self.node, "mask", f"{err} (the latent being sampled has {per_chunk}).")
            self._mask_cache[cache_key] = m.repeat(len(cond_or_uncond), 1).to(device)
        return self._mask_cache[cache_key]

    def _relevance(self, key, block, h, height, width, extra_options) -> torch.Tensor:
        """c for one chunk's samples [b, N], from the conditional rows of this call (or the same step's earlier
        conditional call when cond and uncond run separately)."""
        sigma = float(extra_options["sigmas"].detach().max())
        sl = cond_slice(extra_options["cond_or_uncond"], h.shape[0])
        cached = self._last_relevance.get(key)
        if sl is None and cached is not None and cached[0] == sigma:
            return cached[1]
        if sl is None:  # only unconditional rows and no conditional call yet at this step: use these rows
            sl = slice(0, h.shape[0] // len(extra_options["cond_or_uncond"]))
        rows = h[sl]
        q_c = block.attn2.to_q(block.norm2(rows))
        k_c = block.attn2.to_k(self.prompt.context.to(device=rows.device, dtype=rows.dtype))
        relevance = prompt_relevance(q_c, k_c, block.attn2.heads, self.prompt.token_indices, height, width,
                                     self.smoothing_sigma)
        if self.relevance_override is not None:
            relevance = self.relevance_override(relevance)
        per_chunk = rows.shape[0]
        relevance = mask_ops.match_batch(relevance, per_chunk)
        self._last_relevance[key] = (sigma, relevance)
        return relevance
