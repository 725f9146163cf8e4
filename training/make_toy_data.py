"""Toy-world training shards in the training format (:mod:`training.data`), for a branch trained beside the toy model.

Each sample is a scene of :mod:`kernels.toy_world` (a dull, noisy background with 1-3 red / green / blue / yellow
circles, squares or triangles) drawn at the toy model's resolution, 32 x 32 cells of 8 x 8 px = 256 px, with one of
its objects as the sample's object: its mask (the cells it covers), its local caption ("a red circle") and the
scene's global caption ("a red circle, a blue square and a green triangle"), the captions the toy model was trained
on. Objects never overlap, so the object mask is the whole object. Deterministic in ``--seed``.

    python -m training.make_toy_data --out data/toy_shapes --count 4096 --seed 0
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from . import pack
from .make_synthetic_data import write_samples


def make_sample(rng: np.random.Generator):
    """(image, object mask, local caption, global caption) of one scene drawn from ``rng``."""
    tw = pack.module("kernels.toy_world")
    scene = tw.make_scene(int(rng.integers(2**31)))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    image = Image.fromarray((scene.image() * 255).round().astype(np.uint8))
    mask = Image.fromarray((tw.render(obj.mask.astype(np.float32)) * 255).astype(np.uint8))
    return image, mask, obj.caption, scene.caption


def write_dataset(out: str | Path, count: int, per_shard: int = 1000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_samples(out, (make_sample(rng) for _ in range(count)), per_shard)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the tar shards")
    p.add_argument("--count", type=int, default=4096)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    path = write_dataset(a.out, a.count, a.per_shard, a.seed)
    print(f"wrote {a.count} toy-world samples (256 px) to {path}")


if __name__ == "__main__":
    main()
