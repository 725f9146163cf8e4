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

``--world neglect`` draws the scenes of the prompt-neglect world instead, the world ``toy_world_sd*.safetensors``
were trained on: every background kind (kernels/toy_world.BACKGROUND_KINDS) and, as the global caption, the
world's incomplete one (kernels/toy_world.incomplete_caption), for a branch or adapter trained beside those files.

    python -m faithful_inpaint.training.make_toy_data --out data/toy_sd_shapes --count 12800 --seed 0 --world neglect
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


WORLDS = ("objects", "neglect")


def make_sample(rng: np.random.Generator, subject: bool = False, world: str = "objects"):
    """(image, object mask, local caption, global caption) of one scene drawn from ``rng``; with ``subject`` also
    the object cut out onto white (after the mask). ``world`` "neglect": structured backgrounds and the incomplete
    global caption of the prompt-neglect world."""
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; expected one of {WORLDS}")
    seed = int(rng.integers(2**31))
    if world == "neglect":
        scene = tw.make_scene(seed, backgrounds=tw.BACKGROUND_KINDS)
        caption = tw.incomplete_caption(rng, scene)
    else:
        scene = tw.make_scene(seed)
        caption = scene.caption
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    image, mask = to_pil(scene.image()), to_pil(tw.render(obj.mask.astype(np.float32)))
    if subject:
        return image, mask, to_pil(tw.render(tw.cut_out(scene.cells, obj))), obj.caption, caption
    return image, mask, obj.caption, caption


def write_dataset(out: str | Path, count: int, per_shard: int = 1000, seed: int = 0, world: str = "objects") -> Path:
    rng = np.random.default_rng(seed)
    return write_samples(out, (make_sample(rng, world=world) for _ in range(count)), per_shard)


def write_quadruples(out: str | Path, count: int, per_shard: int = 1000, seed: int = 0,
                     world: str = "objects") -> Path:
    from faithful_inpaint.training import lar_gen

    rng = np.random.default_rng(seed)
    samples = (make_sample(rng, subject=True, world=world) for _ in range(count))
    return lar_gen.write_quadruple_samples(out, samples, per_shard)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for the tar shards")
    p.add_argument("--count", type=int, default=4096)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subjects", action="store_true", help="LAR-Gen quadruples: add each object cut out onto white")
    p.add_argument("--world", default="objects", choices=WORLDS,
                   help="objects: the first world's scenes; neglect: the prompt-neglect world's (structured "
                        "backgrounds, incomplete global captions)")
    a = p.parse_args(argv)
    path = (write_quadruples if a.subjects else write_dataset)(a.out, a.count, a.per_shard, a.seed, a.world)
    print(f"wrote {a.count} {a.world}-world {'quadruples' if a.subjects else 'samples'} (256 px) to {path}")


if __name__ == "__main__":
    main()
