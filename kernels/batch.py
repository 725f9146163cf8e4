"""Which part of a batched model call is conditional and which unconditional.

ComfyUI stacks the conditionings of one model call along the batch: ``cond_or_uncond`` lists their kinds in order
(0 = positive/conditional, 1 = negative/unconditional), each a chunk of equal size. The order is never assumed:
cond and uncond may come together in either order, or in separate calls.
"""
from __future__ import annotations

COND, UNCOND = 0, 1


def chunks(cond_or_uncond: list[int], batch: int) -> list[tuple[int, slice]]:
    """[(kind, slice of the batch)] for a call of ``batch`` rows."""
    n = len(cond_or_uncond)
    if n == 0 or batch % n:
        raise ValueError(f"a batch of {batch} cannot hold {n} equal conditioning chunks")
    size = batch // n
    return [(kind, slice(i * size, (i + 1) * size)) for i, kind in enumerate(cond_or_uncond)]


def cond_slice(cond_or_uncond: list[int], batch: int) -> slice | None:
    """The first conditional chunk, or None when the call holds only unconditional rows."""
    for kind, sl in chunks(cond_or_uncond, batch):
        if kind == COND:
            return sl
    return None
