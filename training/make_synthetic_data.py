"""A tiny synthetic inpainting data set in the training format (:mod:`training.data`), for tests and first runs.

Each image is a dull, noisy background with 1-3 coloured shapes (circle, square, triangle in red, green, blue,
yellow); one shape is the sample's object: its mask, its local caption ("a red circle") and a global caption
listing every shape ("a red circle and a blue square on a grey background"). Deterministic in ``--seed``.

    python -m faithful_inpaint.training.make_synthetic_data --out data/shapes --count 256 --size 64
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from faithful_inpaint.training.data import ShardWriter

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"grey": (120, 120, 120), "beige": (170, 160, 130), "dark": (60, 60, 70)}


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def make_sample(rng: np.random.Generator, size: int):
    """(image, object mask, local caption, global caption)."""
    bg_name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    bg = np.array(BACKGROUNDS[bg_name], np.float32)
    pixels = bg + rng.normal(0, 8, size=(size, size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    names, object_mask = [], None
    count = int(rng.integers(1, 4))
    target = int(rng.integers(count))
    for i in range(count):
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        side = int(rng.integers(size // 5, size // 2))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, size=2))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        draw_shape(draw, shape, box, COLOURS[colour])
        names.append(f"a {colour} {shape}")
        if i == target:
            mask = Image.new("L", (size, size), 0)
            draw_shape(ImageDraw.Draw(mask), shape, box, 255)
            object_mask, local = mask, f"a {colour} {shape}"
        elif object_mask is not None:       # a later shape drawn over the object hides part of it
            cover = Image.new("L", (size, size), 0)
            draw_shape(ImageDraw.Draw(cover), shape, box, 255)
            object_mask = Image.fromarray(np.where(np.asarray(cover) > 0, 0, np.asarray(object_mask)).astype(np.uint8))
    caption = " and ".join(names) + f" on a {bg_name} background"
    return image, object_mask, local, caption


def write_samples(out: str | Path, samples, per_shard: int) -> Path:
    """Write (image, object mask, local caption, global caption) samples as tar shards (training/data.py)."""
    with ShardWriter(out, per_shard=per_shard) as writer:
        for image, mask, local, caption in samples:
            writer.write(image, caption, mask=mask, local_caption=local)
    return Path(out)


def write_dataset(out: str | Path, count: int, size: int = 64, per_shard: int = 64, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_samples(out, (make_sample(rng, size) for _ in range(count)), per_shard)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the tar shards")
    p.add_argument("--count", type=int, default=256)
    p.add_argument("--size", type=int, default=64, help="image side in pixels")
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_dataset(a.out, a.count, a.size, a.per_shard, a.seed)
    print(f"wrote {a.count} samples to {path}")


if __name__ == "__main__":
    main()
