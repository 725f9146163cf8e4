"""Decoupled image-prompt cross-attention (LAR-Gen sec. 4.2, eq. 5-7; the IP-Adapter mechanism), host-free.

The text cross-attention of a UNet layer is kept as it is; a second attention from the same queries to keys and
values projected from image tokens is added, scaled by beta:

    Z   = Attention(Q, K, V)          K = c_t W_k,      V = c_t W_v         (eq. 5, the text attention)
    Z'  = Attention(Q, K', V')        K' = c_i W'_k,    V' = c_i W'_v       (eq. 6, the image attention)
    Z_out = Z + beta * Z'                                                    (eq. 7)

The image tokens c_i come from a CLIP vision encoder through the adapter's projection. Three projections of the
public IP-Adapter files are supported, told apart by their keys and shapes (never by file name):
  * linear ("ip-adapter_sd15", "ip-adapter_sdxl", "..._vit-h"): the pooled, projected image embedding -> 4 tokens
    (Linear + LayerNorm);
  * plus ("ip-adapter-plus*", "plus-face"): the penultimate hidden states -> 16 tokens through a perceiver
    Resampler (learned queries attending to [image features; queries], feed-forward, 4 layers);
  * full ("ip-adapter-full-face"): the penultimate hidden states, token by token, through an MLP.
W'_k, W'_v of layer n are the file's ``ip_adapter.{2n+1}.to_k_ip.weight`` / ``to_v_ip.weight``, n counting the
cross-attention layers in diffusers' attention-processor order: down blocks, up blocks, mid block.

Tensors: queries/outputs [B, N, inner]; tokens [B, T, context_dim]. A module built from a state dict holds the
file's tensors as they are (``assign``): no copy is made at load.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from faithful_inpaint.kernels.painta import sdpa

LINEAR, PLUS, FULL = "linear", "plus", "full"
# Which CLIP-vision output each projection reads (names of comfy.clip_vision's encode_image output).
FEATURE_OF_VARIANT = {LINEAR: "image_embeds", PLUS: "penultimate_hidden_states", FULL: "penultimate_hidden_states"}
RESAMPLER_HEAD_WIDTH = 64          # every public plus adapter uses 64-wide heads in its Resampler
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class AdapterSpec:
    variant: str                    # LINEAR | PLUS | FULL
    context_dim: int                # width of the image tokens = the UNet's text-context width (768 SD1.x, 2048 SDXL)
    feature_dim: int                # width of the CLIP-vision feature the projection reads
    layer_widths: tuple[int, ...]   # inner width of each cross-attention layer, diffusers' processor order

    @property
    def feature(self) -> str:
        return FEATURE_OF_VARIANT[self.variant]


LAYER_HEADS = ("ip_adapter", "adapter_modules")   # the attention layers' prefix; IP-Adapter's training code names
                                                 # them adapter_modules, and IPAdapter_plus reads both


def split_state_dict(sd: Mapping) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) sub-dicts of an adapter file: the flat safetensors layout (``image_proj.*``,
    ``ip_adapter.*`` or ``adapter_modules.*``) or the nested one of the ``.bin`` files ({"image_proj": {...},
    "ip_adapter" or "adapter_modules": {...}})."""
    if "image_proj" in sd and isinstance(sd["image_proj"], Mapping):
        layers = next((sd[h] for h in LAYER_HEADS if isinstance(sd.get(h), Mapping)), {})
        return dict(sd["image_proj"]), dict(layers)
    proj, layers = {}, {}
    for key, value in sd.items():
        head, _, rest = key.partition(".")
        if head == "image_proj":
            proj[rest] = value
        elif head in LAYER_HEADS:
            if rest in layers:
                raise ValueError(f"layer weight {rest} is there twice (as ip_adapter.{rest} and "
                                 f"adapter_modules.{rest})")
            layers[rest] = value
    return proj, layers


def inspect(sd: Mapping) -> AdapterSpec:
    """The adapter's variant and widths from its keys and shapes (tensors or anything with ``.shape``).

    ValueError, with what was found, for files that are not image-prompt adapters or need other encoders (FaceID).
    """
    proj, layers = split_state_dict(sd)
    if not layers:
        raise ValueError("no 'ip_adapter.*' weights: this is not an IP-Adapter file")
    if any("lora" in k for k in layers) or "perceiver_resampler.proj_in.weight" in proj or (
            "proj.2.weight" in proj and "proj.3.weight" not in proj):
        raise ValueError("this is a FaceID adapter (it needs InsightFace face embeddings), which this node does not "
                         "support; use a plain, plus or full IP-Adapter")
    numbers = sorted(int(k.split(".")[0]) for k in layers if k.endswith(".to_k_ip.weight"))
    if not numbers or numbers != list(range(1, 2 * len(numbers), 2)):
        raise ValueError(f"the ip_adapter layers are not numbered 1, 3, 5, ... (found {numbers[:6]}...)")
    widths = []
    for n in numbers:
        k, v = layers.get(f"{n}.to_k_ip.weight"), layers.get(f"{n}.to_v_ip.weight")
        if v is None or tuple(k.shape) != tuple(v.shape):
            raise ValueError(f"layer {n}: to_k_ip and to_v_ip are missing or differ in shape")
        widths.append(int(k.shape[0]))
    context_dim = int(layers["1.to_k_ip.weight"].shape[1])
    if "latents" in proj:
        variant, feature_dim = PLUS, int(proj["proj_in.weight"].shape[1])
    elif "proj.3.weight" in proj:
        variant, feature_dim = FULL, int(proj["proj.0.weight"].shape[1])
    elif "proj.weight" in proj:
        variant, feature_dim = LINEAR, int(proj["proj.weight"].shape[1])
    else:
        raise ValueError(f"unknown image projection (keys {sorted(proj)[:5]})")
    return AdapterSpec(variant, context_dim, feature_dim, tuple(widths))


# ------------------------------------------------------------------------------------------------ projections

class LinearProjection(nn.Module):
    """Image embedding [B, D] -> tokens [B, T, C]: one Linear to T * C, then LayerNorm per token."""

    def __init__(self, feature_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Linear(feature_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(-1, self.tokens, self.context_dim))


class MLPProjection(nn.Module):
    """Hidden states [B, L, D] -> tokens [B, L, C]: Linear, GELU, Linear, LayerNorm (the "full" adapters)."""

    def __init__(self, feature_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.GELU(), nn.Linear(feature_dim, context_dim),
                                  nn.LayerNorm(context_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden)


class _PerceiverAttention(nn.Module):
    """Queries (latents) attend to [features; latents]; key names as in the public files."""

    def __init__(self, dim: int, heads: int, head_width: int):
        super().__init__()
        inner = heads * head_width
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        k, v = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        return self.to_out(sdpa(self.to_q(latents), k, v, self.heads))


def _feed_forward(dim: int, mult: int) -> nn.Sequential:
    # indices 0 (LayerNorm), 1 and 3 (Linear) are the public key names; 2 is the activation
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Resampler(nn.Module):
    """Hidden states [B, L, D] -> a fixed number of tokens [B, Q, C] (the "plus" adapters' perceiver)."""

    def __init__(self, dim: int, depth: int, heads: int, queries: int, feature_dim: int, context_dim: int,
                 ff_mult: int = 4, head_width: int = RESAMPLER_HEAD_WIDTH):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(feature_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(nn.ModuleList([_PerceiverAttention(dim, heads, head_width),
                                                   _feed_forward(dim, ff_mult)]) for _ in range(depth))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(hidden)
        latents = self.latents.expand(hidden.shape[0], -1, -1)
        for attention, feed_forward in self.layers:
            latents = latents + attention(features, latents)
            latents = latents + feed_forward(latents)
        return self.norm_out(self.proj_out(latents))


def _resampler_config(proj: Mapping) -> dict:
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    dim = int(proj["latents"].shape[-1])
    return {"dim": dim, "depth": depth, "queries": int(proj["latents"].shape[1]),
            "heads": int(proj["layers.0.0.to_q.weight"].shape[0]) // RESAMPLER_HEAD_WIDTH,
            "feature_dim": int(proj["proj_in.weight"].shape[1]), "context_dim": int(proj["proj_out.weight"].shape[0]),
            "ff_mult": int(proj["layers.0.1.1.weight"].shape[0]) // dim}


class ImagePromptAdapter(nn.Module):
    """An IP-Adapter file as a module: ``project`` (CLIP features -> image tokens) and the per-layer W'_k, W'_v."""

    def __init__(self, spec: AdapterSpec, projection: nn.Module):
        super().__init__()
        self.spec = spec
        self.projection = projection
        self.to_k_ip = nn.ModuleList(nn.Linear(spec.context_dim, w, bias=False) for w in spec.layer_widths)
        self.to_v_ip = nn.ModuleList(nn.Linear(spec.context_dim, w, bias=False) for w in spec.layer_widths)

    @classmethod
    def from_state_dict(cls, sd: Mapping) -> "ImagePromptAdapter":
        """Build from a file's state dict (either layout); the module holds the given tensors (meta tensors give a
        weightless module whose spec can still be checked)."""
        spec = inspect(sd)
        proj, layers = split_state_dict(sd)
        with torch.device("meta"):
            if spec.variant == PLUS:
                projection = Resampler(**_resampler_config(proj))
            elif spec.variant == FULL:
                projection = MLPProjection(spec.feature_dim, spec.context_dim)
            else:
                tokens = int(proj["proj.weight"].shape[0]) // spec.context_dim
                projection = LinearProjection(spec.feature_dim, spec.context_dim, tokens)
            adapter = cls(spec, projection)
        per_layer = {}
        for n in range(len(spec.layer_widths)):
            per_layer[f"to_k_ip.{n}.weight"] = layers[f"{2 * n + 1}.to_k_ip.weight"]
            per_layer[f"to_v_ip.{n}.weight"] = layers[f"{2 * n + 1}.to_v_ip.weight"]
        adapter.load_state_dict({**per_layer, **{f"projection.{k}": v for k, v in proj.items()}}, assign=True)
        return adapter

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """CLIP-vision features (image_embeds [B, D] or hidden states [B, L, D]) -> image tokens [B, T, C], fp32."""
        params = {k: v.float() for k, v in self.projection.named_parameters()}
        device = next(iter(params.values())).device
        return torch.func.functional_call(self.projection, params, (features.to(device, torch.float32),))

    def layer_keys_values(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K' = c_i W'_k and V' = c_i W'_v of every layer (eq. 6), in fp32: [(k, v)] each [B, T, width]."""
        tokens = tokens.float()
        return [(F.linear(tokens, k.weight.float()), F.linear(tokens, v.weight.float()))
                for k, v in zip(self.to_k_ip, self.to_v_ip)]


def decoupled_attention(text_out: torch.Tensor, q: torch.Tensor, k_image: torch.Tensor, v_image: torch.Tensor,
                        heads: int, beta: float | torch.Tensor, attention: AttentionFn = sdpa) -> torch.Tensor:
    """Z_out = Z + beta * Attention(Q, K', V') (eq. 7), ``text_out`` being Z (eq. 5).

    ``beta`` is a number or a tensor broadcastable to [B, N, 1] (a spatial attention mask times the strength).
    """
    return text_out + beta * attention(q, k_image, v_image, heads)
