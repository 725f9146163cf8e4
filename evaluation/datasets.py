"""Dataset readers: each yields :class:`Case` objects (id, image, mask, prompt, optional subject, class name,
reference) in a fixed order, which fixes each case's seed (``base seed + index``) and every shard's share.

Formats (docs/evaluation.md has examples):

* ``folder:DIR`` / ``jsonl:FILE`` -- the user's own benchmark: ``DIR/cases.jsonl`` (or FILE), one JSON object a line
  with ``id``, ``image``, ``mask`` (paths relative to the file; mask white = inpaint), ``prompt`` and optionally
  ``subject``, ``class_name``, ``reference``, ``seed``.
* ``coco:ANNOTATIONS.json[,IMAGES_DIR]`` -- MSCOCO val2017 instances with ProFI-Painter's protocol (section 4.2):
  a random sample of (image, instance) pairs, the mask the convex hull of the instance's segmentation, the prompt
  its category name; class names: the annotation file's categories.
* ``brushbench:MAPPING.json[,BASE_DIR]`` -- BrushBench / EditBench mapping files as BrushNet's evaluation reads
  them: ``{key: {"image": path, "inpainting_mask": RLE, "caption": text}}`` on 512 x 512 images, the RLE a flat
  list of 1-based (start, length) pairs over row-major pixels.
* ``quadruples:DIR`` -- LAR-Gen-style quadruples: one folder per case with ``image.png``, ``mask.png``,
  ``subject.png`` and ``prompt.txt``.
* ``toy[:N[,SEED]]`` -- the toy world's paired cases (kernels.toy_world.make_cases), scored with its blob scorer.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np


class DatasetError(ValueError):
    """A dataset or one of its cases cannot be read; the message names the case and the file."""


@dataclass
class Case:
    id: str
    prompt: str
    index: int                                   # position in the dataset (seed = base seed + index by default)
    load_image: Callable[[], np.ndarray]         # -> float32 [H, W, 3] in [0, 1]
    load_mask: Callable[[], np.ndarray]          # -> bool [H, W], True = inpaint
    load_subject: Callable[[], np.ndarray] | None = None
    load_reference: Callable[[], np.ndarray] | None = None
    class_name: str | None = None
    seed: int | None = None                      # the dataset's own seed for the case, if it fixes one
    meta: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, mask), checked: readable, same size, mask not empty."""
        image, mask = self.load_image(), self.load_mask()
        if image.shape[:2] != mask.shape:
            raise DatasetError(f"case {self.id}: image is {image.shape[1]}x{image.shape[0]} but mask is "
                               f"{mask.shape[1]}x{mask.shape[0]} ({self.meta.get('image')}, {self.meta.get('mask')})")
        if not mask.any():
            raise DatasetError(f"case {self.id}: the mask is empty ({self.meta.get('mask')})")
        return image, mask


@dataclass
class Dataset:
    name: str
    cases: list[Case]
    class_names: list[str] | None = None        # for CLIP accuracy
    kind: str = "images"                         # "images", or "toy" (cases carry a toy_world.InpaintCase)


def read_rgb(path: Path, case_id: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetError(f"case {case_id}: file not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"case {case_id}: cannot read image {path}: {error}") from None


def read_mask(path: Path, case_id: str) -> np.ndarray:
    """White (> 127 in grey) = inpaint."""
    return read_rgb(path, case_id).mean(-1) > 0.5


def _file_case(index, case_id, root: Path, entry: dict, where: str) -> Case:
    for key in ("image", "mask"):
        if not entry.get(key):
            raise DatasetError(f"case {case_id} ({where}): no '{key}' given")
    image, mask = root / entry["image"], root / entry["mask"]
    for key, path in (("image", image), ("mask", mask)):
        if not path.is_file():
            raise DatasetError(f"case {case_id}: {key} file not found: {path}")
    subject = root / entry["subject"] if entry.get("subject") else None
    reference = root / entry["reference"] if entry.get("reference") else None
    return Case(str(case_id), str(entry.get("prompt", "")), index,
                lambda: read_rgb(image, case_id), lambda: read_mask(mask, case_id),
                (lambda: read_rgb(subject, case_id)) if subject else None,
                (lambda: read_rgb(reference, case_id)) if reference else None,
                entry.get("class_name"), entry.get("seed"), {"image": str(image), "mask": str(mask)})


def read_jsonl(path: str | Path) -> Dataset:
    path = Path(path)
    if path.is_dir():
        path = path / "cases.jsonl"
    if not path.is_file():
        raise DatasetError(f"dataset file not found: {path}")
    cases, seen = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}, line {n}: not JSON ({error})") from None
        case_id = str(entry.get("id", n))
        if case_id in seen:
            raise DatasetError(f"{path}, line {n}: case id {case_id} appears twice")
        seen.add(case_id)
        cases.append(_file_case(len(cases), case_id, path.parent, entry, f"{path}, line {n}"))
    names = sorted({c.class_name for c in cases if c.class_name}) or None
    return Dataset(f"jsonl:{path}", cases, names)


def read_quadruples(root: str | Path) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"quadruple folder not found: {root}")
    cases = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        prompt_file = folder / "prompt.txt"
        prompt = prompt_file.read_text(encoding="utf-8").strip() if prompt_file.is_file() else ""
        entry = {"image": "image.png", "mask": "mask.png", "subject": "subject.png", "prompt": prompt}
        if not (folder / "subject.png").is_file():
            raise DatasetError(f"case {folder.name}: subject file not found: {folder / 'subject.png'}")
        cases.append(_file_case(len(cases), folder.name, folder, entry, str(folder)))
    return Dataset(f"quadruples:{root}", cases)


# ----------------------------------------------------------------------------------------------------- COCO

COCO_SAMPLES = 10_000     # ProFI-Painter: "a random sample of 10000 (image, mask, prompt) triplets"


def convex_hull_mask(segmentation: list, height: int, width: int) -> np.ndarray:
    """The convex hull of all polygon points of a COCO instance, filled (ProFI-Painter: convex hulls of the
    object segmentation masks, so the shape does not tell the model what to paint)."""
    import cv2

    points = np.concatenate([np.asarray(poly, np.float32).reshape(-1, 2) for poly in segmentation])
    hull = cv2.convexHull(np.round(points).astype(np.int32))
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [hull.reshape(-1, 2)], 1)
    return mask.astype(bool)


def read_coco(annotations: str | Path, images: str | Path | None = None, samples: int = COCO_SAMPLES,
              sample_seed: int = 0) -> Dataset:
    """ProFI-Painter's protocol on MSCOCO val2017 instances: ``samples`` (image, instance) pairs drawn uniformly
    without replacement (``random.Random(sample_seed)``) from the non-crowd polygon instances; prompt = the
    instance's category name. The paper states no seed and no further filtering; crowd (RLE) annotations are left
    out because they are regions of many objects, not one instance."""
    annotations = Path(annotations)
    images = Path(images) if images else annotations.parent.parent / "val2017"
    try:
        data = json.loads(annotations.read_text(encoding="utf-8"))
        info = {im["id"]: im for im in data["images"]}
        names = {c["id"]: c["name"] for c in data["categories"]}
        pool = [a for a in data["annotations"] if not a.get("iscrowd") and isinstance(a.get("segmentation"), list)
                and a["segmentation"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise DatasetError(f"{annotations}: not a COCO instances file ({type(error).__name__}: {error})") from None
    pool.sort(key=lambda a: a["id"])
    chosen = random.Random(sample_seed).sample(pool, min(samples, len(pool)))
    cases = []
    for ann in chosen:
        im = info.get(ann["image_id"])
        if im is None:
            raise DatasetError(f"{annotations}: annotation {ann['id']} names image {ann['image_id']}, not listed")
        case_id = f"{im['id']:012d}-{ann['id']}"
        path = images / im["file_name"]
        seg, h, w = ann["segmentation"], im["height"], im["width"]
        cases.append(Case(case_id, names[ann["category_id"]], len(cases),
                          lambda p=path, c=case_id: read_rgb(p, c),
                          lambda s=seg, h=h, w=w: convex_hull_mask(s, h, w),
                          class_name=names[ann["category_id"]], meta={"image": str(path), "mask": "convex hull"}))
    return Dataset(f"coco:{annotations}", cases, sorted(set(names.values()), key=list(names.values()).index))


# ----------------------------------------------------------------------------------------------- BrushBench

BRUSHBENCH_SIZE = (512, 512)


def rle_decode(counts, height: int, width: int) -> np.ndarray:
    """BrushBench's run-length masks: flat (start, length) pairs, starts 1-based, row-major."""
    runs = np.asarray(counts, np.int64)
    if runs.ndim != 1 or len(runs) % 2:
        raise ValueError("an RLE is a flat list of (start, length) pairs")
    flat = np.zeros(height * width, bool)
    for start, length in zip(runs[0::2] - 1, runs[1::2]):
        if start < 0 or length < 0 or start + length > flat.size:
            raise ValueError(f"run ({start + 1}, {length}) outside a {width}x{height} mask")
        flat[start:start + length] = True
    return flat.reshape(height, width)


def read_brushbench(mapping: str | Path, base: str | Path | None = None, mask_key: str = "inpainting_mask") -> Dataset:
    """A BrushBench / EditBench mapping file (images resized to 512 x 512 as BrushNet's evaluation does)."""
    mapping = Path(mapping)
    base = Path(base) if base else mapping.parent
    try:
        entries = json.loads(mapping.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise DatasetError(f"{mapping}: cannot read the mapping file ({error})") from None
    cases = []
    for key, item in entries.items():
        if not isinstance(item, dict) or "image" not in item or mask_key not in item:
            raise DatasetError(f"case {key} ({mapping}): needs 'image' and '{mask_key}'")
        path = base / item["image"]
        rle = item[mask_key]

        def load_image(p=path, c=str(key)):
            from PIL import Image

            img = read_rgb(p, c)
            if img.shape[:2] != BRUSHBENCH_SIZE[::-1]:
                img = np.asarray(Image.fromarray((img * 255).round().astype(np.uint8)).resize(BRUSHBENCH_SIZE),
                                 np.float32) / 255.0
            return img

        def load_mask(r=rle, c=str(key)):
            try:
                return rle_decode(r, *BRUSHBENCH_SIZE[::-1])
            except ValueError as error:
                raise DatasetError(f"case {c} ({mapping}): bad '{mask_key}' RLE: {error}") from None

        cases.append(Case(str(key), str(item.get("caption", "")), len(cases), load_image, load_mask,
                          meta={"image": str(path), "mask": f"{mapping}:{key}.{mask_key}"}))
    return Dataset(f"brushbench:{mapping}", cases)


# ----------------------------------------------------------------------------------------------- toy world

TOY_SEED = 10_000        # the first toy case's seed (benchmarks/toy_evidence.py's default)


def read_toy(n: int, seed: int = TOY_SEED, world: str = "objects") -> Dataset:
    """The toy world's paired cases; ``meta['toy']`` is the kernels.toy_world.InpaintCase (its seed is the case's).
    ``world``: "objects" (make_cases) or "neglect" (make_neglect_cases: the prompted object absent from the scene).
    Case i does not depend on ``n``, so a longer run reuses a shorter one's results."""
    from faithful_inpaint.kernels import toy_world as tw

    if world not in tw.WORLDS:
        raise ValueError(f"unknown toy world {world!r}; expected one of {sorted(tw.WORLDS)}")
    cases = []
    for i, tc in enumerate(tw.WORLDS[world](n, seed)):
        cases.append(Case(f"toy-{tc.seed}", tc.prompt, i,
                          lambda tc=tc: np.ascontiguousarray(tc.scene.image()),
                          lambda tc=tc: tc.mask_image() > 0.5,
                          lambda tc=tc: tc.subject(), class_name=f"{tc.colour} {tc.shape}", seed=tc.seed,
                          meta={"toy": tc, "kind": tc.kind}))
    return Dataset(f"toy:{seed}" if world == "objects" else f"toy-{world}:{seed}", cases, kind="toy")


def open_dataset(spec: str, *, samples: int | None = None, seed: int = 0) -> Dataset:
    """``KIND:ARG[,ARG2]`` (module docstring)."""
    kind, _, arg = spec.partition(":")
    parts = [a for a in arg.split(",") if a] if arg else []
    if kind in ("folder", "jsonl") and parts:
        return read_jsonl(parts[0])
    if kind == "coco" and parts:
        return read_coco(parts[0], parts[1] if len(parts) > 1 else None, samples or COCO_SAMPLES, seed)
    if kind in ("brushbench", "editbench") and parts:
        return read_brushbench(parts[0], parts[1] if len(parts) > 1 else None)
    if kind == "quadruples" and parts:
        return read_quadruples(parts[0])
    if kind == "toy":
        return read_toy(int(parts[0]) if parts else (samples or 200), int(parts[1]) if len(parts) > 1 else TOY_SEED)
    raise DatasetError(f"unknown dataset {spec!r}: use folder:DIR, jsonl:FILE, coco:ANNOTATIONS[,IMAGES], "
                       "brushbench:MAPPING[,BASE], editbench:MAPPING[,BASE], quadruples:DIR or toy[:N]")
