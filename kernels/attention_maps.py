"""Attention maps from projected queries and keys, as the attention-map losses of RASG and PILOT read them.

q: [b, Nq, heads * d], k: [b, Nk, heads * d] (what a ComfyUI attention replace receives). Maps are computed in
float32 whatever the input dtype: they feed losses and gradients, and the layer itself is not changed by them.
"""
from __future__ import annotations

import torch
from einops import rearrange


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[b, N, heads * d] -> [b, heads, N, d]."""
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """[b, heads, N, d] -> [b, N, heads * d]."""
    return rearrange(t, "b h n d -> b n (h d)")


def attention_logits(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-softmax scores q k^T / sqrt(d): [b, heads, Nq, Nk], float32."""
    qh, kh = split_heads(q.float(), heads), split_heads(k.float(), heads)
    return (qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5


def attention_maps(q: torch.Tensor, k: torch.Tensor, heads: int, probabilities: bool = True,
                   average_heads: bool = False) -> torch.Tensor:
    """Logits or softmax probabilities over the keys, [b, heads, Nq, Nk] or [b, Nq, Nk] averaged over heads."""
    maps = attention_logits(q, k, heads)
    if probabilities:
        maps = maps.softmax(dim=-1)
    return maps.mean(dim=1) if average_heads else maps
