"""Toy-world training shards in the training format (:mod:`training.data`), for a branch trained beside the toy model.

Each sample is a scene of :mod:`kernels.toy_world` (a dull, noisy background with 1-3 red / green / blue / yellow
circles, squares or triangles) drawn at the toy model's resolution, 32 x 32 cells of 8 x 8 px = 256 px, with one of
its objects as the sample's object: its mask (the cells it covers), its local caption ("a red circle") and the
scene's global caption ("a red circle, a blue square and a green triangle"), the captions the toy model was trained
on. Objects never overlap, so the object mask is the whole object. Deterministic in ``--seed``.

    python -m faithful_inpaint.training.make_toy_data --out data/toy_shapes --count 4096 --seed 0
    python -m faithful_inpaint.training.make_toy_data --out data/toy_quads --count 4096 --seed 0 --subjects

``--subjects`` writes LAR-Gen's quadruples (training/lar_gen.py's format) instead: each sample also holds its
object cut out onto white (kernels/toy_world.cut_out), the image prompt of the subject-driven inpainting it trains.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from faithful_inpaint.kernels import toy_world as tw
from faithful_inpaint.training.make_synthetic_data import write_samples


def to_pil(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def make_sample(rng: np.random.Generator, subject: bool = False):
    """(image, object mask, local caption, global caption) of one scene drawn from ``rng``; with ``subject`` also
    the object cut out onto white (after the mask)."""
    scene = tw.make_scene(int(rng.integers(2**31)))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    image, mask = to_pil(scene.image()), to_pil(tw.render(obj.mask.astype(np.float32)))
    if subject:
        return image, mask, to_pil(tw.render(tw.cut_out(scene.cells, obj))), obj.caption, scene.caption
    return image, mask, obj.caption, scene.caption


def write_dataset(out: str | Path, count: int, per_shard: int = 1000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    return write_samples(out, (make_sample(rng) for _ in range(count)), per_shard)


def write_quadruples(out: str | Path, count: int, per_shard: int = 1000, seed: int = 0) -> Path:
    from faithful_inpaint.training import lar_gen

    rng = np.random.default_rng(seed)
    return lar_gen.write_quadruple_samples(out, (make_sample(rng, subject=True) for _ in range(count)), per_shard)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the tar shards")
    p.add_argument("--count", type=int, default=4096)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", action="store_true", help="LAR-Gen quadruples: add each object cut out onto white")
    a = p.parse_args(argv)
    path = (write_quadruples if a.subjects else write_dataset)(a.out, a.count, a.per_shard, a.seed)
    print(f"wrote {a.count} toy-world {'quadruples' if a.subjects else 'samples'} (256 px) to {path}")


if __name__ == "__main__":
    main()
