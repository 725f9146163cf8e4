"""Recording attention maps of chosen UNet layers during model calls, for attention-map losses (RASG, PILOT).

``AttentionRecorder.install(model)`` returns a ModelPatcher clone carrying attn1 / attn2 *replace* patches on the
chosen transformer blocks. Each patch returns exactly what the layer would return without it (the replace another
node installed before for that key, e.g. IPAdapter's, or ComfyUI's own ``optimized_attention``, called the way
CrossAttention.forward calls it), and, while the recorder is enabled, appends the maps of the captured rows to
``recorder.captures``. Maps are computed separately, in float32, from the q and k the layer received (self-attention
maps are N x N per head: 512 MiB per sample for a 64x64 level with 8 heads; choose levels accordingly).

The caller owns the recorder: ``clear()`` it before each step (or each gradient pass), read ``captures`` after the
model call. With ``with_grad=True`` the maps keep their autograd graph (inside a ``gradients.gradient_pass`` a loss
on them back-propagates to x_t); otherwise they are detached. Install it last: IPAdapter_plus adds to an existing
attn2 replace by calling its ``.add()``, which only its own replace objects have.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

from faithful_inpaint.kernels.attention_maps import attention_maps
from faithful_inpaint.kernels.batch import COND, chunks
from faithful_inpaint.patching.blocks import BlockKey, host_attention, previous_replace, transformer_blocks

ATTENTIONS = ("attn1", "attn2")  # self-attention, cross-attention


@dataclass(frozen=True, eq=False)
class CapturedMap:
    attention: str               # "attn1" | "attn2"
    key: BlockKey
    maps: torch.Tensor           # [rows, heads, h*w, Nk], or [rows, h*w, Nk] averaged over heads; float32
    kinds: tuple[int, ...]       # cond_or_uncond kind of each equal chunk of rows (0 = conditional)
    height: int                  # the layer's feature-map size (h*w query rows)
    width: int
    sigma: float


@dataclass(eq=False)
class AttentionRecorder:
    attention: tuple[str, ...] = ("attn2",)
    blocks: Iterable[BlockKey] | None = None     # block keys to capture; or
    downsamples: Iterable[int] | None = None     # UNet levels to capture (latent downsample 1, 2, 4, 8); none: all
    probabilities: bool = True                   # post-softmax; False: pre-softmax logits q k^T / sqrt(d)
    with_grad: bool = False
    cond_only: bool = False                      # only the conditional rows (cond_or_uncond kind 0)
    average_heads: bool = True
    enabled: bool = True                         # False: the patches only pass through (nothing computed)
    captures: list[CapturedMap] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.attention, str):
            self.attention = (self.attention,)
        unknown = set(self.attention) - set(ATTENTIONS)
        if unknown or not self.attention:
            raise ValueError(f"attention must name some of {ATTENTIONS}, got {self.attention!r}")
        if self.blocks is not None and self.downsamples is not None:
            raise ValueError("select layers by blocks or by downsamples, not both")
        self.blocks = None if self.blocks is None else tuple(map(tuple, self.blocks))
        self.downsamples = None if self.downsamples is None else tuple(self.downsamples)

    def clear(self) -> None:
        self.captures.clear()

    def install(self, model):
        """A clone of ``model`` (a ModelPatcher) with the capture patches; the model itself is left unchanged."""
        layers = self._layers(model.get_model_object("diffusion_model"))
        clone = model.clone()
        for attention, key in layers:
            previous = previous_replace(clone, attention, key)
            setter = clone.set_model_attn1_replace if attention == "attn1" else clone.set_model_attn2_replace
            setter(_capturing_replace(self, attention, key, previous), *key)
        return clone

    def _layers(self, unet) -> list[tuple[str, BlockKey]]:
        infos = transformer_blocks(unet)
        if self.blocks is not None:
            wanted = set(self.blocks)
            missing = wanted - {b.key for b in infos}
            if missing:
                raise ValueError(f"no transformer block {sorted(missing)} in this model; it has "
                                 f"{[b.key for b in infos]}")
            infos = [b for b in infos if b.key in wanted]
        elif self.downsamples is not None:
            wanted = set(self.downsamples)
            infos = [b for b in infos if b.downsample in wanted]
            if not infos:
                raise ValueError(f"this model has no transformer block at downsample {sorted(wanted)}")
        return [(a, b.key) for b in infos for a in self.attention
                if a == "attn1" or getattr(b.module, "attn2", None) is not None]

    def _record(self, attention: str, key: BlockKey, q, k, extra_options: dict) -> None:
        parts = chunks(extra_options["cond_or_uncond"], q.shape[0])
        if self.cond_only:
            parts = [(kind, sl) for kind, sl in parts if kind == COND]
            if not parts:
                return
            q = torch.cat([q[sl] for _, sl in parts])
            k = torch.cat([k[sl] for _, sl in parts])
        with torch.set_grad_enabled(self.with_grad and torch.is_grad_enabled()):
            maps = attention_maps(q, k, extra_options["n_heads"], self.probabilities, self.average_heads)
        height, width = extra_options["activations_shape"][-2:]
        self.captures.append(CapturedMap(attention, key, maps if self.with_grad else maps.detach(),
                                         tuple(kind for kind, _ in parts), height, width,
                                         float(extra_options["sigmas"].detach().max())))


def _capturing_replace(recorder: AttentionRecorder, attention: str, key: BlockKey, previous):
    # A closure, not a bound method: ModelPatcher.clone() deep-copies model_options, and functions are shared
    # as they are, so every clone records into the caller's recorder.
    def replace(q, k, v, extra_options):
        if previous is not None:
            out = previous(q, k, v, extra_options)
        else:
            out = host_attention(q, k, v, extra_options)
        if recorder.enabled:
            recorder._record(attention, key, q, k, extra_options)
        return out

    return replace
