"""Training masks: object-derived masks (PainterNet's user-like boxes and scribbles), random brush masks, augmentation.

All masks are float32 numpy arrays [H, W] with 1 = regenerate (ComfyUI's convention). Every function draws from the
``numpy.random.Generator`` it is given, so a sample's mask is a pure function of (seed, epoch, sample index) and a
resumed run sees the very same masks.

PainterNet (arXiv 2412.01223) replaces segmentation-exact training masks by masks shaped like the ones users draw:
a box around the object, or a scribble over it. Its exact generation parameters are not given in the summary this
pack works from, so the ones below are choices, each a keyword argument:
- box: the object's bounding box grown by a random 0-15 % margin per side;
- scribble: 2-4 thick strokes through random points of the object, their width 15-35 % of the object's shorter
  side, united with the object dilated by a few pixels so the object is always covered (users paint over it);
- segmentation: the object mask itself, dilated by 0-3 % of the image side (BrushNet's segmentation masks).
Random (object-free) masks follow BrushNet/LaMa-style free-form brushes plus random rectangles.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

OBJECT_MASK_KINDS = ("segmentation", "box", "scribble")


def bounding_box(obj: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1), exclusive ends, of the 1-region; None when it is empty."""
    ys, xs = np.nonzero(obj > 0.5)
    if ys.size == 0:
        return None
    return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1


def box_mask(obj: np.ndarray, rng: np.random.Generator, max_margin: float = 0.15) -> np.ndarray:
    """The object's bounding box, each side pushed out by a random share (0..max_margin) of the box size."""
    h, w = obj.shape
    box = bounding_box(obj)
    out = np.zeros((h, w), np.float32)
    if box is None:
        return out
    y0, x0, y1, x1 = box
    bh, bw = y1 - y0, x1 - x0
    m = rng.uniform(0, max_margin, size=4)
    y0 = max(0, int(round(y0 - m[0] * bh)))
    x0 = max(0, int(round(x0 - m[1] * bw)))
    y1 = min(h, int(round(y1 + m[2] * bh)))
    x1 = min(w, int(round(x1 + m[3] * bw)))
    out[y0:y1, x0:x1] = 1
    return out


def scribble_mask(obj: np.ndarray, rng: np.random.Generator, strokes: tuple[int, int] = (2, 4),
                  width: tuple[float, float] = (0.15, 0.35), cover_dilation: float = 0.03) -> np.ndarray:
    """A user's scribble over the object: thick strokes through random object points, plus the object itself."""
    h, w = obj.shape
    box = bounding_box(obj)
    out = np.zeros((h, w), np.uint8)
    if box is None:
        return out.astype(np.float32)
    ys, xs = np.nonzero(obj > 0.5)
    short = min(box[2] - box[0], box[3] - box[1])
    for _ in range(int(rng.integers(strokes[0], strokes[1] + 1))):
        n = int(rng.integers(2, 6))
        pick = rng.integers(0, ys.size, size=n)
        pts = np.stack([xs[pick], ys[pick]], axis=1).astype(np.int32)
        thickness = max(1, int(round(short * rng.uniform(*width))))
        cv2.polylines(out, [pts.reshape(-1, 1, 2)], isClosed=False, color=1, thickness=thickness)
    cover = dilate((obj > 0.5).astype(np.float32), max(1, int(round(cover_dilation * max(h, w)))))
    return np.maximum(out.astype(np.float32), cover)


def segmentation_mask(obj: np.ndarray, rng: np.random.Generator, max_dilation: float = 0.03) -> np.ndarray:
    h, w = obj.shape
    return dilate((obj > 0.5).astype(np.float32), int(rng.integers(0, int(max_dilation * max(h, w)) + 1)))


def object_mask(obj: np.ndarray, rng: np.random.Generator, kinds=OBJECT_MASK_KINDS) -> np.ndarray:
    """One user-like mask of the object, its kind drawn uniformly from ``kinds``."""
    kind = kinds[int(rng.integers(0, len(kinds)))]
    if kind == "box":
        return box_mask(obj, rng)
    if kind == "scribble":
        return scribble_mask(obj, rng)
    if kind == "segmentation":
        return segmentation_mask(obj, rng)
    raise ValueError(f"unknown object mask kind {kind!r}; expected one of {OBJECT_MASK_KINDS}")


def random_brush_mask(height: int, width: int, rng: np.random.Generator, max_strokes: int = 5,
                      max_vertices: int = 8, width_range: tuple[float, float] = (0.04, 0.15),
                      rectangles: int = 2, max_coverage: float = 0.6) -> np.ndarray:
    """Free-form brush strokes (random walks with random width) and a few random rectangles."""
    out = np.zeros((height, width), np.uint8)
    side = max(height, width)
    for _ in range(int(rng.integers(1, max_strokes + 1))):
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        thickness = max(1, int(round(side * rng.uniform(*width_range))))
        pts = [(int(x), int(y))]
        for _ in range(int(rng.integers(1, max_vertices + 1))):
            angle = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.05, 0.3) * side
            x = float(np.clip(x + length * math.cos(angle), 0, width - 1))
            y = float(np.clip(y + length * math.sin(angle), 0, height - 1))
            pts.append((int(x), int(y)))
        cv2.polylines(out, [np.array(pts, np.int32).reshape(-1, 1, 2)], isClosed=False, color=1,
                      thickness=thickness)
    for _ in range(int(rng.integers(0, rectangles + 1))):
        rh, rw = int(rng.uniform(0.1, 0.4) * height), int(rng.uniform(0.1, 0.4) * width)
        y0, x0 = int(rng.integers(0, max(1, height - rh))), int(rng.integers(0, max(1, width - rw)))
        out[y0:y0 + rh, x0:x0 + rw] = 1
    mask = out.astype(np.float32)
    if mask.mean() > max_coverage:          # keep some context: erode an over-full mask back
        mask = erode(mask, max(1, int(0.05 * side)))
    return mask


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.float32), kernel)


def erode(mask: np.ndarray, pixels: int) -> np.ndarray:
    if pixels <= 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.erode(mask.astype(np.float32), kernel)


def augment(mask: np.ndarray, rng: np.random.Generator, morph_prob: float = 0.3,
            max_morph: float = 0.03) -> np.ndarray:
    """BrushNet's mask augmentation: with probability ``morph_prob`` erode or dilate (50/50) by up to
    ``max_morph`` of the image side. An erosion that would empty the mask is skipped."""
    if rng.uniform() >= morph_prob:
        return mask
    pixels = int(rng.integers(1, max(2, int(max_morph * max(mask.shape)) + 1)))
    if rng.uniform() < 0.5:
        return dilate(mask, pixels)
    eroded = erode(mask, pixels)
    return eroded if eroded.any() else mask
