"""PAIntA: prompt-aware introverted attention (ProFI-Painter, sec. 3.3, eq. 5).

Self-attention from a masked (to-be-generated) query i to a known key j has its pre-softmax score scaled by
c_j in [0, 1], the prompt relevance of pixel j; every other pair is unchanged:

    A~_ij = c_j * A_ij   if M_i = 1 and M_j = 0,   A_ij otherwise                          (eq. 5)

For masked queries, scaling score (i, j) by c_j is the same as scaling key j by c_j, so the layer runs as
ordinary scaled-dot-product attention with scaled keys and never builds the N x N score matrix.

c_j comes from the following cross-attention layer: s_j = sum over the prompt tokens ind(tau) of
softmax(q_c k_c^T / sqrt(d))_jk (averaged over heads, fp32), smoothed on the h x w grid, then
c = clip((s - median(s)) / max(s), 0, 1) per sample (sec. 3.3, as in the reference implementation).

Shapes: q is [B, N, heads * d], k and v [B, N + extra, heads * d] (keys appended by other patches come after the
image's own); masks and c are [B, N] with N = h * w.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from faithful_inpaint.kernels.attention_maps import merge_heads, split_heads

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

# The reference implementation's 3x3 smoothing uses per-axis weights exp(-((d - mean) / (2 * 0.5))^2) = exp(-d^2),
# i.e. a Gaussian of sigma 1/sqrt(2); that is the default here.
REFERENCE_SMOOTHING_SIGMA = 1 / math.sqrt(2)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head scaled-dot-product attention on [B, N, heads * d] tensors."""
    return merge_heads(F.scaled_dot_product_attention(*(split_heads(t, heads) for t in (q, k, v))))


def token_relevance(q_c: torch.Tensor, k_c: torch.Tensor, heads: int, token_indices: Sequence[int]) -> torch.Tensor:
    """s_j: the cross-attention probability mass pixel j gives the prompt tokens, averaged over heads.

    q_c [B, N, heads * d] (queries of the cross-attention layer), k_c [B or 1, L, heads * d] (its keys of the
    prompt). Computed in fp32. Returns [B, N].
    """
    q, k = split_heads(q_c.float(), heads), split_heads(k_c.float(), heads)
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)  # [B, heads, N, L]
    idx = torch.as_tensor(list(token_indices), device=probs.device, dtype=torch.long)
    return probs.index_select(-1, idx).sum(-1).mean(1)


def smooth(s: torch.Tensor, height: int, width: int, sigma: float = REFERENCE_SMOOTHING_SIGMA) -> torch.Tensor:
    """3x3 Gaussian smoothing of [B, h * w] scores on their h x w grid, zero padding (sigma <= 0: unchanged)."""
    if sigma <= 0:
        return s
    x = torch.arange(-1, 2, dtype=torch.float32, device=s.device)
    k1 = torch.exp(-0.5 * (x / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = (k1[:, None] * k1[None, :]).view(1, 1, 3, 3).to(s.dtype)
    return F.conv2d(s.view(-1, 1, height, width), kernel, padding=1).view(s.shape)


def normalise_relevance(s: torch.Tensor) -> torch.Tensor:
    """c = clip((s - median(s)) / max(s), 0, 1) per sample (sec. 3.3)."""
    med = s.median(dim=1, keepdim=True).values
    top = s.max(dim=1, keepdim=True).values.clamp_min(torch.finfo(s.dtype).tiny)
    return ((s - med) / top).clamp(0.0, 1.0)


def prompt_relevance(q_c: torch.Tensor, k_c: torch.Tensor, heads: int, token_indices: Sequence[int],
                     height: int, width: int, sigma: float = REFERENCE_SMOOTHING_SIGMA) -> torch.Tensor:
    """c_j for every pixel of an h x w layer: [B, h * w] in [0, 1]."""
    s = token_relevance(q_c, k_c, heads, token_indices)
    return normalise_relevance(smooth(s, height, width, sigma))


def painta_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, relevance: torch.Tensor,
                     query_mask: torch.Tensor, attention: AttentionFn = sdpa,
                     plain: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention with eq. (5) applied, in O(N) memory.

    relevance: c [B, N]; query_mask: [B, N], 1 for masked (generated) tokens. ``attention`` is the host's attention
    function; ``plain`` is its output on (q, k, v) when already computed. Rows of unmasked queries are returned
    exactly as ``plain``.
    """
    if plain is None:
        plain = attention(q, k, v, heads)
    masked = query_mask.to(torch.bool)
    # Known keys scaled by c_j, masked keys unchanged: q_i . (c_j k_j) = c_j (q_i . k_j) for masked rows i.
    key_scale = torch.where(masked, torch.ones_like(relevance), relevance).to(k.dtype)
    # Keys another patch appended after this image's N pixels (e.g. RefineNet's subject features) are not pixels
    # of the known region: eq. (5) leaves them unscaled.
    key_scale = F.pad(key_scale, (0, k.shape[1] - key_scale.shape[1]), value=1.0)
    introverted = attention(q, k * key_scale[..., None], v, heads)
    return torch.where(masked[..., None], introverted, plain)
