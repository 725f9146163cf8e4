"""Interval statistics for paired comparisons: Wilson intervals of rates, normal intervals of (paired) means."""
from __future__ import annotations

import math

import numpy as np


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (centre - half, centre + half)


def mean_interval(values, z: float = 1.96) -> tuple[float, float, float]:
    """(mean, low, high): normal 95% interval of the mean (for paired differences and continuous metrics).
    Non-finite values (an infinite PSNR of an unchanged image) are left out; with fewer than two finite values
    the interval is NaN, not a fake zero-width one."""
    x = np.asarray(values, float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return (math.nan, math.nan, math.nan)
    half = z * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else math.nan
    return (float(x.mean()), float(x.mean() - half), float(x.mean() + half))


def rate(flags) -> tuple[float, float, float]:
    """(rate, low, high) of booleans with the Wilson interval."""
    flags = [bool(f) for f in flags]
    n = len(flags)
    k = sum(flags)
    return (k / n if n else math.nan, *wilson(k, n))


def paired_difference(values, baseline) -> tuple[float, float, float]:
    """Mean per-case difference ``values - baseline`` (same cases, same order) with its 95% interval; a pair with
    a non-finite member is left out."""
    if len(values) != len(baseline):
        raise ValueError(f"paired comparison of {len(values)} against {len(baseline)} cases")
    return mean_interval([float(a) - float(b) for a, b in zip(values, baseline)
                          if math.isfinite(float(a)) and math.isfinite(float(b))])
