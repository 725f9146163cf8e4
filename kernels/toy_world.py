"""The "shapes world": a generated toy domain in which a tiny diffusion model can really learn to inpaint.

Everything here is plain NumPy / PyTorch (no ComfyUI): the scene generator (dull noisy backgrounds with 1-3
circles, squares and triangles in red, green, blue or yellow, their global and local captions and object masks),
the inpainting cases the evidence harness runs (background dominance: a mask on empty background with a prompt for
an absent object; nearby-object dominance: a mask right next to another object), the scorer, the text encoder's
math, and the exact mapping between images and the model's latent.

Resolution. A scene is a grid of ``size`` x ``size`` cells (default 32); its image is that grid drawn with
``CELL_PIXELS`` (8) pixels per cell (256 x 256 px). The toy VAE maps each 8 x 8 block to one latent cell, exactly
like SD's VAE maps 8 x 8 pixels to a latent cell, so a 256 px image has a 32 x 32 latent and the toy UNet's
attention levels sit at 16 x 16 and 8 x 8: the paper's H/16 and H/32 for a 256 px image, where PAIntA and RASG act.

Latent. A cell's colour x in [0, 1]^3 becomes the model's latent z = M (2x - 1), with M a fixed 4 x 3 matrix with
orthonormal columns, so z -> x is exact (x = (M^T z + 1) / 2). ComfyUI multiplies a VAE latent by the SD1.5
latent scale (0.18215) before the UNet sees it, so the VAE's own latent is z / 0.18215.

A second world (issue 16, for a model trained the way Stable Inpainting was) adds structured backgrounds, random
box and stroke masks, incomplete global captions with background words, prompt-neglect cases and failure kinds;
the first world's scenes, cases and text table are unchanged.

Every random draw comes from ``numpy.random.default_rng(seed)``: the same seed gives the same scene on any machine.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DEFAULT_SIZE = 32            # cells per side: the latent resolution
CELL_PIXELS = 8              # pixels per cell side: the VAE's downscale factor
SD15_LATENT_SCALE = 0.18215  # ComfyUI's SD15 latent format multiplies VAE latents by this

COLOURS = {                  # RGB in [0, 1]
    "red": (0.86, 0.16, 0.14),
    "green": (0.16, 0.70, 0.22),
    "blue": (0.16, 0.30, 0.88),
    "yellow": (0.92, 0.84, 0.14),
}
SHAPES = ("circle", "square", "triangle")
COLOUR_NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], np.float32)

# The 4 x 3 colour-to-latent matrix: the first three columns of a 4 x 4 Hadamard matrix / 2 (orthonormal columns).
LATENT_MIX = np.array([[1, 1, 1], [1, -1, 1], [1, 1, -1], [1, -1, -1]], np.float32) / 2.0


# ----------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass
class ToyObject:
    colour: str
    shape: str
    top: int
    left: int
    size: int                 # side of the bounding square, in cells
    mask: np.ndarray          # bool [size, size] of the whole scene: cells the object covers (coverage > 0.5)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape}"

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(top, left, bottom, right), bottom/right exclusive."""
        return self.top, self.left, self.top + self.size, self.left + self.size


@dataclass
class Scene:
    cells: np.ndarray         # float32 [size, size, 3] in [0, 1]
    objects: list[ToyObject]
    seed: int
    background: str = "plain"  # one of BACKGROUND_KINDS (the word a caption uses for it)

    @property
    def caption(self) -> str:
        """The global caption: every object, in drawing order ("a red circle, a blue square and a green triangle")."""
        return join_captions([o.caption for o in self.objects])

    @property
    def local_captions(self) -> list[str]:
        return [o.caption for o in self.objects]

    def image(self, cell_pixels: int = CELL_PIXELS) -> np.ndarray:
        return render(self.cells, cell_pixels)


def join_captions(parts: list[str]) -> str:
    if not parts:
        return ""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def render(cells: np.ndarray, cell_pixels: int = CELL_PIXELS) -> np.ndarray:
    """Cells [H, W, C] -> image [H * p, W * p, C], each cell a p x p block (what the toy VAE decodes to)."""
    return np.repeat(np.repeat(cells, cell_pixels, axis=0), cell_pixels, axis=1)


def to_cells(image: np.ndarray, cell_pixels: int = CELL_PIXELS) -> np.ndarray:
    """Image [H, W, C] -> cells [H / p, W / p, C], the mean of each p x p block (what the toy VAE encodes)."""
    h, w = image.shape[0] // cell_pixels, image.shape[1] // cell_pixels
    blocks = image[:h * cell_pixels, :w * cell_pixels].reshape(h, cell_pixels, w, cell_pixels, -1)
    return blocks.mean(axis=(1, 3)).astype(np.float32)


def shape_coverage(shape: str, height: int, width: int, supersample: int = 4) -> np.ndarray:
    """Fraction of each cell of a height x width box covered by the shape inscribed in it (upright triangle)."""
    s = supersample
    ys = (np.arange(height * s) + 0.5) / (height * s)      # 0..1 across the box
    xs = (np.arange(width * s) + 0.5) / (width * s)
    y, x = np.meshgrid(ys, xs, indexing="ij")
    if shape == "square":
        inside = np.ones_like(y, bool)
    elif shape == "circle":
        inside = (y - 0.5) ** 2 + (x - 0.5) ** 2 <= 0.25
    elif shape == "triangle":
        inside = np.abs(x - 0.5) <= y / 2                   # apex at the top centre, base along the bottom
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(height, s, width, s).mean(axis=(1, 3))


def _object_size_range(size: int) -> tuple[int, int]:
    return max(3, round(0.28 * size)), max(4, round(0.44 * size))


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dull background: a greyish tint, a gentle linear gradient and per-cell noise."""
    base = rng.uniform(0.35, 0.6) + rng.uniform(-0.06, 0.06, size=3)
    direction = rng.normal(size=2)
    direction /= np.linalg.norm(direction) + 1e-8
    ramp = np.linspace(-0.5, 0.5, size)
    gradient = (direction[0] * ramp[:, None] + direction[1] * ramp[None, :]) * rng.uniform(0.0, 0.12)
    cells = base[None, None, :] + gradient[..., None] + rng.normal(0.0, 0.035, size=(size, size, 3))
    return np.clip(cells, 0.0, 1.0).astype(np.float32)


# Background kinds of the second world (the words its captions use for them). "plain" is the dull background above;
# the others are two dull tones in a pattern with a random period (in cells) and orientation, so that filling a
# hole means copying structure from distant known cells. Tints stay far below the scorer's MIN_SATURATION.
BACKGROUND_KINDS = ("plain", "striped", "checked", "gradient")
STRUCTURED_BACKGROUNDS = BACKGROUND_KINDS[1:]
PERIOD_RANGE = (6.0, 16.0)   # cells per period: 3-8 cells per stripe, 1.5-4 tokens at 16 x 16


def structured_background(rng: np.random.Generator, size: int, kind: str) -> np.ndarray:
    """A background of ``kind`` (BACKGROUND_KINDS): stripes, a checker board or a periodic (triangle-wave) gradient
    between a dark and a light dull tone, at a random period and angle, with per-cell noise; "plain" is
    :func:`background`."""
    if kind == "plain":
        return background(rng, size)
    if kind not in STRUCTURED_BACKGROUNDS:
        raise ValueError(f"unknown background {kind!r}; expected one of {BACKGROUND_KINDS}")
    level, contrast = rng.uniform(0.3, 0.65), rng.uniform(0.15, 0.3)
    tint = rng.uniform(-0.04, 0.04, size=3)
    dark, light = level - contrast / 2 + tint, level + contrast / 2 + tint
    angle, period = rng.uniform(0.0, np.pi), rng.uniform(*PERIOD_RANGE)
    phase = rng.uniform(0.0, 1.0, size=2)
    y, x = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
    u = (x * np.cos(angle) + y * np.sin(angle)) / period + phase[0]      # periods along the pattern's axis
    v = (-x * np.sin(angle) + y * np.cos(angle)) / period + phase[1]
    if kind == "striped":
        t = np.floor(2 * u) % 2
    elif kind == "checked":
        t = (np.floor(2 * u) + np.floor(2 * v)) % 2
    else:                                                                 # gradient: a triangle wave along u
        t = np.abs(2 * (u % 1.0) - 1)
    cells = dark + t[..., None] * (light - dark) + rng.normal(0.0, 0.03, size=(size, size, 3))
    return np.clip(cells, 0.0, 1.0).astype(np.float32)


def _boxes_clear(box, others, gap: int) -> bool:
    t, l, b, r = box
    return all(b + gap <= t2 or b2 + gap <= t or r + gap <= l2 or r2 + gap <= l for t2, l2, b2, r2 in others)


def draw_object(cells: np.ndarray, rng: np.random.Generator, colour: str, shape: str, top: int, left: int,
                side: int) -> ToyObject:
    """Draw a shape into ``cells`` in place (palette colour with a little jitter and noise); return the object."""
    cover = shape_coverage(shape, side, side)
    tint = np.clip(np.array(COLOURS[colour]) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    tint = tint + rng.normal(0.0, 0.02, size=(side, side, 3))
    region = cells[top:top + side, left:left + side]
    region[:] = np.clip(region * (1 - cover[..., None]) + tint * cover[..., None], 0, 1)
    mask = np.zeros(cells.shape[:2], bool)
    mask[top:top + side, left:left + side] = cover > 0.5
    return ToyObject(colour, shape, top, left, side, mask)


def make_scene(seed: int, size: int = DEFAULT_SIZE, n_objects: int | None = None,
               backgrounds: tuple[str, ...] | None = None) -> Scene:
    """A random scene; ``n_objects`` 1-3 (random when None). Objects do not touch (2 cells apart at least).
    ``backgrounds``: None, the first world's dull background (the draws of every earlier scene, unchanged); or
    kinds from BACKGROUND_KINDS, one drawn uniformly per scene (:func:`structured_background`)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4)) if n_objects is None else n_objects
    kind = "plain" if backgrounds is None else backgrounds[int(rng.integers(len(backgrounds)))]
    cells = background(rng, size) if backgrounds is None else structured_background(rng, size, kind)
    lo, hi = _object_size_range(size)
    boxes, objects = [], []
    for _ in range(n):
        colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        for _attempt in range(50):
            side = int(rng.integers(lo, hi + 1))
            top, left = (int(v) for v in rng.integers(1, size - side, size=2))
            box = (top, left, top + side, left + side)
            if _boxes_clear(box, boxes, gap=2):
                boxes.append(box)
                objects.append(draw_object(cells, rng, colour, shape, top, left, side))
                break
    return Scene(cells, objects, seed, kind)


def cut_out(cells: np.ndarray, obj: ToyObject) -> np.ndarray:
    """The object alone: its bounding square's cells [side, side, 3], every cell it does not cover white (the
    subject image of an image prompt, as LAR-Gen's training data cuts subjects out of their scenes)."""
    t, l, b, r = obj.box
    return np.where(obj.mask[t:b, l:r, None], cells[t:b, l:r], 1.0).astype(np.float32)


def subject_image(colour: str, shape: str, seed: int, size: int = DEFAULT_SIZE, fill: float = 0.9) -> np.ndarray:
    """An image prompt [size * CELL_PIXELS, same, 3] in [0, 1]: a fresh object of that colour and shape (drawn as
    scenes draw objects, with its own jitter from ``seed``) cut out, centred on white, ``fill`` of the side wide."""
    rng = np.random.default_rng(seed)
    side = _object_size_range(size)[1]
    cells = np.ones((side, side, 3), np.float32)
    obj = draw_object(cells, rng, colour, shape, 0, 0, side)
    pixels = render(cut_out(cells, obj), int(fill * size * CELL_PIXELS) // side)
    out = np.ones((size * CELL_PIXELS, size * CELL_PIXELS, 3), np.float32)
    top = (out.shape[0] - pixels.shape[0]) // 2
    out[top:top + pixels.shape[0], top:top + pixels.shape[1]] = pixels
    return out


# ----------------------------------------------------------------------------------------------------------------
# The second world's training draws: masks and captions the way Stable Inpainting was trained (random masks that
# ignore objects, the image's global caption, incomplete), which is what leaves real inpainting models neglecting the
# prompt (ProFI-Painter, sec. 3). The first world's trainer masks whole objects with local captions instead.

MASK_KINDS = ("box", "stroke", "full")
MASK_SHARES = (0.45, 0.45, 0.10)     # box, brush stroke, whole image (SD-inpainting also masks everything sometimes)
NAME_PROB = 0.6                      # each object is named in the caption with this probability ...
BACKGROUND_WORD_PROB = 0.4           # ... and the background kind with this one ("on a striped background")


def random_mask(rng: np.random.Generator, size: int = DEFAULT_SIZE) -> tuple[np.ndarray, str]:
    """(bool [size, size] mask, kind): a random box (sides 1/8 to 3/4 of the image, anywhere), one to three brush
    strokes (OpenCV polylines of 2-5 random-walk vertices, 2-6 cells thick), or the whole image, with MASK_SHARES.
    Nothing here looks at the objects: a mask covers part of an object as often as chance makes it."""
    import cv2

    kind = MASK_KINDS[int(rng.choice(len(MASK_KINDS), p=MASK_SHARES))]
    mask = np.zeros((size, size), np.uint8)
    if kind == "box":
        h, w = (int(v) for v in rng.integers(max(1, size // 8), size * 3 // 4 + 1, size=2))
        top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
        mask[top:top + h, left:left + w] = 1
    elif kind == "stroke":
        for _ in range(int(rng.integers(1, 4))):
            points = [rng.uniform(0, size, size=2)]
            for _ in range(int(rng.integers(1, 5))):
                angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(size / 8, size / 2)
                points.append(np.clip(points[-1] + length * np.array([np.cos(angle), np.sin(angle)]), 0, size - 1))
            thickness = int(rng.integers(2, 7))
            cv2.polylines(mask, [np.round(np.array(points)).astype(np.int32)], False, 1, thickness)
    else:
        mask[:] = 1
    return mask.astype(bool), kind


def incomplete_caption(rng: np.random.Generator, scene: Scene, name_prob: float = NAME_PROB,
                       background_prob: float = BACKGROUND_WORD_PROB) -> str:
    """A global caption that may leave things out: each object named with ``name_prob`` (drawing order), the
    background kind with ``background_prob`` ("a red circle on a striped background", "a checked background", or
    "" when nothing is named). A named object may be anywhere, inside a mask or not."""
    named = [o.caption for o in scene.objects if rng.uniform() < name_prob]
    where = f"a {scene.background} background" if rng.uniform() < background_prob else ""
    if not named:
        return where
    return join_captions(named) + (f" on {where}" if where else "")


# ----------------------------------------------------------------------------------------------------------------
# Inpainting cases


CASE_KINDS = ("background", "nearby")


@dataclass
class InpaintCase:
    scene: Scene              # the original scene (the mask region holds background only)
    mask: np.ndarray          # bool [size, size], True = inpaint
    prompt: str               # "a <colour> <shape>"
    colour: str
    shape: str
    kind: str                 # "background" (empty region) or "nearby" (mask next to another object)
    seed: int
    neighbour: ToyObject | None = None

    def mask_image(self, cell_pixels: int = CELL_PIXELS) -> np.ndarray:
        return render(self.mask.astype(np.float32), cell_pixels)

    def subject(self) -> np.ndarray:
        """The case's image prompt: the prompted object alone on white (:func:`subject_image`)."""
        return subject_image(self.colour, self.shape, self.seed, self.scene.cells.shape[0])


def make_case(seed: int, kind: str, size: int = DEFAULT_SIZE) -> InpaintCase:
    """An inpainting case. ``background``: the mask lies on empty background (no object within 2 cells) and the
    prompt asks for an object; ``nearby``: the mask lies 1-2 cells from an object and the prompt asks for an object
    of another colour and another shape, so extending the neighbour into the hole is a visible failure."""
    if kind not in CASE_KINDS:
        raise ValueError(f"unknown case kind {kind!r}; expected one of {CASE_KINDS}")
    rng = np.random.default_rng([seed, CASE_KINDS.index(kind)])
    lo, hi = _object_size_range(size)
    for attempt in range(200):
        scene = make_scene(int(rng.integers(2**31)), size, n_objects=int(rng.integers(1, 3)))
        side = int(rng.integers(hi, hi + 3))            # room for the largest object plus a margin
        occupied = [o.box for o in scene.objects]
        if kind == "background":
            top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            neighbour = None
            if not _boxes_clear((top, left, top + side, left + side), occupied, gap=2):
                continue
            colour = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
            shape = SHAPES[rng.integers(len(SHAPES))]
        else:
            neighbour = scene.objects[int(rng.integers(len(scene.objects)))]
            t, l, b, r = neighbour.box
            side_of = int(rng.integers(4))              # 0 left, 1 right, 2 above, 3 below the neighbour
            offset = int(rng.integers(-(side // 3), side // 3 + 1))
            if side_of in (0, 1):
                top = t + (neighbour.size - side) // 2 + offset
                left = l - 1 - side if side_of == 0 else r + 1
            else:
                left = l + (neighbour.size - side) // 2 + offset
                top = t - 1 - side if side_of == 2 else b + 1
            if top < 0 or left < 0 or top + side > size or left + side > size:
                continue
            others = [o.box for o in scene.objects if o is not neighbour]
            if not _boxes_clear((top, left, top + side, left + side), others, gap=2):
                continue
            colour = [c for c in COLOUR_NAMES if c != neighbour.colour][rng.integers(len(COLOUR_NAMES) - 1)]
            shape = [s for s in SHAPES if s != neighbour.shape][rng.integers(len(SHAPES) - 1)]
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = True
        if any((o.mask & mask).any() for o in scene.objects):
            continue
        if neighbour is not None and not (dilate(mask, 2) & neighbour.mask).any():
            continue                                    # the box is close, the shape itself must be too
        return InpaintCase(scene, mask, f"a {colour} {shape}", colour, shape, kind, seed, neighbour)
    raise RuntimeError(f"no {kind} case found for seed {seed} at size {size}")


def make_cases(n: int, seed: int = 0, size: int = DEFAULT_SIZE) -> list[InpaintCase]:
    """``n`` cases, alternating background and nearby-object dominance, with seeds seed, seed + 1, ..."""
    return [make_case(seed + i, CASE_KINDS[i % 2], size) for i in range(n)]


def make_neglect_case(seed: int, kind: str, size: int = DEFAULT_SIZE) -> InpaintCase:
    """A case of the second world (prompt neglect): a scene on a structured background (STRUCTURED_BACKGROUNDS) and a
    prompt for an object absent from the scene (no object of that colour and shape in it). ``background``: the
    mask lies on the textured background, 2 cells from any object (failure: the texture fills the hole);
    ``nearby``: the mask covers 1-3 cells of a neighbour's box (part of the neighbour is masked, as the training
    masks often do) and the prompt differs from it in colour and shape (failure: the neighbour continues into the
    hole)."""
    if kind not in CASE_KINDS:
        raise ValueError(f"unknown case kind {kind!r}; expected one of {CASE_KINDS}")
    rng = np.random.default_rng([seed, CASE_KINDS.index(kind), 2])
    hi = _object_size_range(size)[1]
    for _attempt in range(400):
        scene = make_scene(int(rng.integers(2**31)), size, n_objects=int(rng.integers(1, 3)),
                           backgrounds=STRUCTURED_BACKGROUNDS)
        side = int(rng.integers(hi, hi + 3))
        neighbour = None
        if kind == "background":
            top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            if not _boxes_clear((top, left, top + side, left + side), [o.box for o in scene.objects], gap=2):
                continue
        else:
            neighbour = scene.objects[int(rng.integers(len(scene.objects)))]
            t, l, b, r = neighbour.box
            side_of, overlap = int(rng.integers(4)), int(rng.integers(1, 4))
            offset = int(rng.integers(-(side // 3), side // 3 + 1))
            if side_of in (0, 1):
                top = t + (neighbour.size - side) // 2 + offset
                left = l - side + overlap if side_of == 0 else r - overlap
            else:
                left = l + (neighbour.size - side) // 2 + offset
                top = t - side + overlap if side_of == 2 else b - overlap
            if top < 0 or left < 0 or top + side > size or left + side > size:
                continue
            if not _boxes_clear((top, left, top + side, left + side),
                                [o.box for o in scene.objects if o is not neighbour], gap=2):
                continue
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = True
        if neighbour is not None and not (mask & neighbour.mask).any():
            continue                                      # the box overlaps, the shape itself must be masked too
        taken = {(o.colour, o.shape) for o in scene.objects}
        choices = [(c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in taken
                   and (neighbour is None or (c != neighbour.colour and s != neighbour.shape))]
        colour, shape = choices[int(rng.integers(len(choices)))]
        return InpaintCase(scene, mask, f"a {colour} {shape}", colour, shape, kind, seed, neighbour)
    raise RuntimeError(f"no {kind} neglect case found for seed {seed} at size {size}")


def make_neglect_cases(n: int, seed: int = 0, size: int = DEFAULT_SIZE) -> list[InpaintCase]:
    """``n`` second-world cases (:func:`make_neglect_case`), alternating background and nearby, seeds seed, ..."""
    return [make_neglect_case(seed + i, CASE_KINDS[i % 2], size) for i in range(n)]


WORLDS = {"objects": make_cases, "neglect": make_neglect_cases}   # the evaluation cases of each world, by name
CASE_MAKERS = {"objects": make_case, "neglect": make_neglect_case}  # one case of each world: (seed, kind) -> case


# ----------------------------------------------------------------------------------------------------------------
# Scorer: objects are connected blobs of the prompted colour, not pixel counts


COLOUR_DISTANCE = 0.3     # a cell is "red" when it lies within this RGB distance of the palette's red ...
MIN_SATURATION = 0.35     # ... and is saturated (max - min channel), which the dull backgrounds never are
MIN_BLOB_CELLS = 12       # the smallest object (9 x 9 cells) covers ~60 cells; noise never forms blobs this big


def colour_labels(cells: np.ndarray) -> np.ndarray:
    """int [H, W]: the palette index of each cell's colour, -1 for cells of no palette colour."""
    dist = np.linalg.norm(cells[..., None, :] - PALETTE[None, None], axis=-1)
    nearest = dist.argmin(-1)
    saturated = cells.max(-1) - cells.min(-1) >= MIN_SATURATION
    return np.where(saturated & (dist.min(-1) <= COLOUR_DISTANCE), nearest, -1)


def connected_components(binary: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a bool [H, W] array, largest first, each as a bool mask."""
    h, w = binary.shape
    seen = np.zeros_like(binary, bool)
    comps = []
    for y0, x0 in zip(*np.nonzero(binary)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(binary, bool)
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp[y, x] = True
            for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= yy < h and 0 <= xx < w and binary[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        comps.append(comp)
    comps.sort(key=lambda c: -int(c.sum()))
    return comps


def classify_shape(blob: np.ndarray) -> str:
    """The shape whose template, drawn in the blob's bounding box, overlaps the blob best (intersection / union)."""
    ys, xs = np.nonzero(blob)
    t, b, l, r = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    crop = blob[t:b, l:r]
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        template = shape_coverage(shape, b - t, r - l) > 0.5
        iou = (template & crop).sum() / max((template | crop).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return best


def score_region(cells: np.ndarray, region: np.ndarray, colour: str, shape: str | None = None) -> dict:
    """Prompt adherence inside ``region`` (bool [H, W]).

    present: a connected blob of ``colour`` with at least MIN_BLOB_CELLS cells lies in the region;
    dominant: present, and ``colour`` covers more of the region than any other palette colour;
    shape_ok: present, and the largest such blob is classified as ``shape``.
    """
    labels = colour_labels(cells)
    index = COLOUR_NAMES.index(colour)
    blobs = connected_components((labels == index) & region)
    blob = blobs[0] if blobs and blobs[0].sum() >= MIN_BLOB_CELLS else None
    counts = [int(((labels == i) & region).sum()) for i in range(len(COLOUR_NAMES))]
    present = blob is not None
    detected = classify_shape(blob) if present else None
    out = {"present": present,
           "dominant": present and counts[index] == max(counts) and counts.count(counts[index]) == 1,
           "blob_cells": int(blob.sum()) if present else 0,
           "shape": detected}
    if shape is not None:
        out["shape_ok"] = present and detected == shape
    return out


def dilate(mask: np.ndarray, cells: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(cells):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def preservation(result: np.ndarray, original: np.ndarray, mask: np.ndarray, margin: int = 1) -> dict:
    """How well the known region is kept: mean absolute RGB error and the fraction of cells changed by more than
    0.1 (in [0, 1] units) outside the mask grown by ``margin`` cells."""
    keep = ~dilate(mask, margin)
    err = np.abs(result - original).max(-1)[keep]
    return {"mae": float(np.abs(result - original)[keep].mean()), "changed": float((err > 0.1).mean())}


def score_case(result_cells: np.ndarray, case: InpaintCase) -> dict:
    """Adherence in the mask and preservation outside it, for one inpainting result (cells, not pixels)."""
    out = score_region(result_cells, case.mask, case.colour, case.shape)
    out.update(preservation(result_cells, case.scene.cells, case.mask))
    return out


FAILURE_KINDS = ("background", "neighbour", "other")


def failure_kind(result_cells: np.ndarray, case: InpaintCase, score: dict | None = None) -> str | None:
    """Why a result misses the prompted object (None when it is present; ``score`` = score_case's, if at hand):

    * "neighbour" (nearby-object dominance): the neighbour's colour covers more of the hole than any other palette
      colour, and a blob of it connected to the neighbour's known part reaches at least MIN_BLOB_CELLS hole cells
      beyond the neighbour's own masked cells (the neighbour grew into the hole; merely restoring it does not count);
    * "background" (background dominance): no palette colour forms a blob of MIN_BLOB_CELLS cells in the hole
      outside the neighbour's own masked cells (the background texture fills it);
    * "other": anything else (another object, the wrong colour).
    """
    score = score_region(result_cells, case.mask, case.colour) if score is None else score
    if score["present"]:
        return None
    labels = colour_labels(result_cells)
    hole = case.mask
    own = case.neighbour.mask & hole if case.neighbour is not None else np.zeros_like(hole)
    if case.neighbour is not None:
        index = COLOUR_NAMES.index(case.neighbour.colour)
        counts = [int(((labels == i) & hole).sum()) for i in range(len(COLOUR_NAMES))]
        known_part = case.neighbour.mask & ~hole
        for blob in connected_components(labels == index):
            if (blob & known_part).any() and (blob & hole & ~own).sum() >= MIN_BLOB_CELLS and \
                    counts[index] == max(counts):
                return "neighbour"
    blobs = [b for i in range(len(COLOUR_NAMES)) for b in connected_components((labels == i) & hole & ~own)[:1]]
    if all(b.sum() < MIN_BLOB_CELLS for b in blobs):
        return "background"
    return "other"


def count_failures(kinds) -> dict:
    """{failure kind: count} over failure_kind's answers (None, a success, is not counted), every kind listed."""
    kinds = list(kinds)
    return {k: sum(1 for x in kinds if x == k) for k in FAILURE_KINDS}


# ----------------------------------------------------------------------------------------------------------------
# Latent mapping (what the toy VAE computes) and the diffusion schedule


def cells_to_latent(cells: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] colours in [0, 1] -> [B, 4, H, W] model latent M (2x - 1) (already multiplied by 0.18215)."""
    mix = torch.as_tensor(LATENT_MIX, dtype=cells.dtype, device=cells.device)
    return torch.einsum("oc,bchw->bohw", mix, cells * 2 - 1)


def latent_to_cells(latent: torch.Tensor) -> torch.Tensor:
    """[B, 4, H, W] model latent -> [B, 3, H, W] colours, clamped to [0, 1]; exact inverse of cells_to_latent."""
    mix = torch.as_tensor(LATENT_MIX, dtype=latent.dtype, device=latent.device)
    return ((torch.einsum("oc,bohw->bchw", mix, latent) + 1) / 2).clamp(0, 1)


def sd_alphas_cumprod(steps: int = 1000) -> torch.Tensor:
    """SD's "scaled linear" beta schedule (0.00085 -> 0.012), the one ComfyUI's SD1.5 model sampling uses."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


# ----------------------------------------------------------------------------------------------------------------
# Text: the world's words under ComfyUI's SD1 (CLIP-L) tokenizer, and the small text encoder behind it


# The toy checkpoint file (training/toy_world.py writes it, patching/toy_world.py reads it): UNet and text-encoder
# weights under these prefixes, configs and the training command as JSON in this safetensors metadata key.
UNET_PREFIX, TEXT_PREFIX, META_KEY = "model.diffusion_model.", "text_encoder.", "faithful_inpaint.toy_world"


def file_kind(path) -> str | None:
    """What a toy-world file holds, from its ``META_KEY`` metadata ("kind"; checkpoints have none): "checkpoint",
    "clip_vision", or None for any other file (no toy metadata, not a safetensors file, unreadable)."""
    import json

    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = (f.metadata() or {}).get(META_KEY)
    except Exception:                        # unreadable or not a safetensors file: not a toy file
        return None
    return None if meta is None else json.loads(meta).get("kind", "checkpoint")

START_TOKEN, END_TOKEN = 49406, 49407   # CLIP's start/end ids; SD1's tokenizer pads with the end id
MAX_TOKENS = 77
# The CLIP BPE id of every word a caption can contain (tests check these against ComfyUI's SD1 tokenizer).
WORD_TOKENS = {"a": 320, "an": 550, "and": 537, ",": 267, "red": 736, "green": 1901, "blue": 1746,
               "yellow": 4481, "circle": 7117, "square": 3999, "triangle": 14615}
# The second world's background words ("... on a striped background"), each one CLIP token.
BACKGROUND_WORD_TOKENS = {"on": 525, "background": 5994, "plain": 10709, "striped": 22192, "checked": 10387,
                          "gradient": 36885}
VOCABULARY = (START_TOKEN, END_TOKEN) + tuple(WORD_TOKENS.values())  # table row i <-> CLIP id; last row: unknown
# A text encoder's table by name (its config's "vocabulary"). The extended one appends rows after the first world's,
# so an encoder built with the default has exactly the shipped files' table (background words are "unknown" there).
VOCABULARIES = {"shapes": VOCABULARY, "shapes+backgrounds": VOCABULARY + tuple(BACKGROUND_WORD_TOKENS.values())}
_ALL_WORDS = {**WORD_TOKENS, **BACKGROUND_WORD_TOKENS}


def tokenize(caption: str) -> list[int]:
    """The 77 CLIP ids ComfyUI's SD1 tokenizer gives a caption of the world's words (start, words, end, padding)."""
    ids = [START_TOKEN]
    for word in caption.replace(",", " , ").split():
        if word not in _ALL_WORDS:
            raise ValueError(f"{word!r} is not a word of the shapes world")
        ids.append(_ALL_WORDS[word])
    ids.append(END_TOKEN)
    return ids + [END_TOKEN] * (MAX_TOKENS - len(ids))


class ToyTextEncoder(nn.Module):
    """A small CLIP-like text encoder: a learned table over the world's vocabulary (any other token shares one
    "unknown" row), learned positions, a few causal pre-norm transformer layers, and a projection to the UNet's
    768-wide cross-attention. Output: per-token states [B, 77, 768] and the pooled state at the first end token."""

    def __init__(self, width: int = 64, layers: int = 2, heads: int = 4, context_dim: int = 768,
                 vocabulary: str = "shapes", dtype=None, device=None):
        super().__init__()
        kw = {"dtype": dtype, "device": device}
        self.config = {"width": width, "layers": layers, "heads": heads, "context_dim": context_dim}
        if vocabulary != "shapes":
            self.config["vocabulary"] = vocabulary
        table = VOCABULARIES[vocabulary]
        self.token_embedding = nn.Embedding(len(table) + 1, width, **kw)
        self.position_embedding = nn.Parameter(torch.zeros(MAX_TOKENS, width, **kw))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True, **kw) for _ in range(layers))
        self.final_norm = nn.LayerNorm(width, **kw)
        self.projection = nn.Linear(width, context_dim, **kw)
        self.register_buffer("vocabulary", torch.tensor(table), persistent=False)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """CLIP ids -> rows of the table (the last row for any id outside the world's vocabulary)."""
        match = ids[..., None] == self.vocabulary.to(ids.device)
        return torch.where(match.any(-1), match.float().argmax(-1), torch.full_like(ids, len(self.vocabulary)))

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = ids.shape[1]
        h = self.token_embedding(self.rows(ids)) + self.position_embedding[:n]
        causal = torch.triu(torch.full((n, n), float("-inf"), device=ids.device, dtype=h.dtype), 1)
        for layer in self.layers:
            h = layer(h, src_mask=causal)
        h = self.projection(self.final_norm(h))
        first_end = (ids == END_TOKEN).float().argmax(-1)
        return h, h[torch.arange(ids.shape[0], device=ids.device), first_end]

