"""Encode a region prompt with a ComfyUI CLIP and find its token positions ind(tau)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from faithful_inpaint.kernels.tokens import prompt_token_indices, word_token_indices
from faithful_inpaint.patching.errors import NodeInputError

CLIP_END_TOKEN = 49407


@dataclass
class RegionPrompt:
    text: str
    context: torch.Tensor        # [1, L, D], what the cross-attention layers see for this prompt
    token_indices: list[int]     # ind(tau): word tokens + each window's EOT
    words: int                   # 0 for an empty prompt

    @property
    def empty(self) -> bool:
        return self.words == 0


def token_positions(clip, text: str) -> tuple[dict, list[int], list[int]]:
    """Tokenize ``text``: (ComfyUI tokens, ind(tau), the word tokens alone)."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    sub = getattr(clip.tokenizer, f"clip_{key}", None)
    end_token = getattr(sub, "end_token", None) or CLIP_END_TOKEN
    windows = [[tok for tok, *_ in window] for window in tokens[key]]
    return tokens, prompt_token_indices(windows, end_token), word_token_indices(windows, end_token)


def encode(clip, text: str, node: str, expected_dim: int | None = None, input_name: str = "clip") -> RegionPrompt:
    """Tokenize and encode ``text``; check the embedding width against the model's cross-attention."""
    tokens, indices, words = token_positions(clip, text)
    context = clip.encode_from_tokens(tokens)
    if expected_dim is not None and context.shape[-1] != expected_dim:
        raise NodeInputError(node, input_name, f"this CLIP gives {context.shape[-1]}-wide text embeddings but the "
                             f"model's cross-attention expects {expected_dim}: use the CLIP of the same checkpoint.")
    return RegionPrompt(text, context, indices, len(words))
