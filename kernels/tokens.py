"""Prompt token selection ind(tau): the prompt's word tokens plus EOT, without SOT and padding.

ProFI-Painter (sec. 3.3) and the methods built on cross-attention maps read the attention of these positions only.
Prompts longer than one 77-token window are encoded as several windows side by side, each with its own SOT and
EOT; positions are counted over the concatenation, as the cross-attention sees them.
"""
from __future__ import annotations

from typing import Sequence


def prompt_token_indices(windows: Sequence[Sequence[object]], end_token: int) -> list[int]:
    """Indices of word tokens and each window's first EOT.

    ``windows`` holds the token ids of each window (position 0 is SOT). Padding is whatever follows the first EOT:
    more EOTs for CLIP-L (SD1.x, SDXL's first encoder), id 0 for OpenCLIP (SD2.x, SDXL's second encoder). A non-int
    token (a textual-inversion embedding vector) counts as a word.
    """
    indices = []
    offset = 0
    for window in windows:
        for pos in range(1, len(window)):
            token = window[pos]
            indices.append(offset + pos)
            if isinstance(token, int) and token == end_token:
                break
        offset += len(window)
    return indices


def word_token_indices(windows: Sequence[Sequence[object]], end_token: int) -> list[int]:
    """The word tokens alone: ind(tau) without the EOTs (what PILOT's semantic loss reads)."""
    flat = [token for window in windows for token in window]
    return [i for i in prompt_token_indices(windows, end_token)
            if not (isinstance(flat[i], int) and flat[i] == end_token)]


def word_count(windows: Sequence[Sequence[object]], end_token: int) -> int:
    """Number of word tokens (EOTs excluded): 0 for an empty prompt."""
    return len(word_token_indices(windows, end_token))
