"""On-disk training data: sharded tar files, read by random access, with an exactly resumable sampler.

Format (webdataset-compatible; plain ``tarfile``, no extra dependency). A data set is a folder of shards
``*.tar``; every sample is a group of members sharing a key (the name up to its first dot)::

    000123.image.png     the image (RGB; .jpg/.jpeg/.webp also read)
    000123.mask.png      optional: the object mask, 8-bit grey, white (>127) = the object the local caption describes
    000123.local.txt     optional: the local caption, what the object mask shows ("a red ceramic vase")
    000123.global.txt    the global caption, the whole image ("a living room with a red vase on a table")

Shards are written with :class:`ShardWriter` (any size; 1,000-10,000 samples a shard is a good range). A sample
without a mask is trained with random masks only. The reader indexes each shard once (member offsets, cached in
``<shard>.index.json`` beside it when the folder is writable) and reads members by seeking, so any number of
shards works with map-style access, any number of data-loader workers and ranks.

Which mask a sample gets (per sample, drawn from an RNG seeded by (seed, epoch, index), see
:class:`MaskPolicy`): with probability ``object_prob`` (when an object mask exists) a user-like mask of the object
(PainterNet: box / scribble / segmentation, :mod:`training.masks`) with the LOCAL caption; otherwise a random brush
mask with the GLOBAL caption (MTADiffusion: "random masks use whole-image captions while object masks use detailed
descriptions"); random masks are inverted with probability ``invert_prob`` (BrushNet's training script: 0.5); every
mask is eroded or dilated with probability ``morph_prob`` (BrushNet: 0.3); the caption is dropped (empty) with
probability ``caption_dropout`` so the branch also learns the unconditional case classifier-free guidance uses.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from faithful_inpaint.training import masks as M

IMAGE_EXTENSIONS = ("image.png", "image.jpg", "image.jpeg", "image.webp")
KEY = "__key__"            # in an index entry: the sample's key (its members' names up to the first dot)
INDEX_VERSION = 2


class ShardError(ValueError):
    """A shard that cannot be read, or a member of it that cannot be decoded; the message names the shard file and,
    where there is one, the member."""


class ShardWriter:
    """Writes samples into ``<folder>/<prefix>-000000.tar``, ``-000001.tar`` ... of at most ``per_shard`` samples."""

    def __init__(self, folder: str | os.PathLike, per_shard: int = 1000, prefix: str = "shard"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.per_shard, self.prefix = per_shard, prefix
        self.count, self._tar = 0, None

    def write(self, image: Image.Image, global_caption: str, mask: Image.Image | None = None,
              local_caption: str | None = None, key: str | None = None) -> None:
        if self.count % self.per_shard == 0:
            self.close()
            path = self.folder / f"{self.prefix}-{self.count // self.per_shard:06d}.tar"
            self._tar = tarfile.open(path, "w")
        key = key or f"{self.count:09d}"
        self.add_image(f"{key}.image.png", image.convert("RGB"))
        if mask is not None:
            self.add_image(f"{key}.mask.png", mask.convert("L"))
        if local_caption is not None:
            self._add(f"{key}.local.txt", local_caption.encode())
        self._add(f"{key}.global.txt", global_caption.encode())
        self.count += 1

    def add_image(self, name: str, image: Image.Image) -> None:
        """One more member of the current sample: ``image`` as PNG under ``name`` (``<key>.<suffix>.png``)."""
        self._add(name, _png(image))

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def index_shard(path: Path) -> list[dict[str, list[int]]]:
    """[{member suffix: [offset, size], KEY: key}] per sample key, in the shard's order; cached beside the shard.
    A file that is not a tar archive, or is cut short, raises :class:`ShardError` naming it (and the member)."""
    stat = path.stat()
    cache = path.with_name(path.name + ".index.json")
    if cache.is_file():
        try:
            data = json.loads(cache.read_text())
        except ValueError:
            data = {}
        if (data.get("size"), data.get("mtime"), data.get("version")) == (stat.st_size, stat.st_mtime_ns,
                                                                          INDEX_VERSION):
            return data["samples"]
    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > stat.st_size:
                    raise ShardError(f"{path}: member {member.name} is cut short ({member.size} bytes announced, "
                                     f"{max(0, stat.st_size - member.offset_data)} present): a truncated shard")
                base = member.name.rsplit("/", 1)[-1]
                key, _, suffix = base.partition(".")
                samples.setdefault(key, {KEY: key})[suffix.lower()] = [member.offset_data, member.size]
    except (tarfile.TarError, EOFError) as err:
        raise ShardError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from None
    result = list(samples.values())
    try:
        tmp = cache.with_name(cache.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"size": stat.st_size, "mtime": stat.st_mtime_ns, "version": INDEX_VERSION,
                                   "samples": result}))
        os.replace(tmp, cache)
    except OSError:
        pass                                     # read-only data folder: index again next time
    return result


@dataclass
class MaskPolicy:
    object_prob: float = 0.5
    invert_prob: float = 0.5
    morph_prob: float = 0.3
    caption_dropout: float = 0.1
    object_kinds: tuple[str, ...] = M.OBJECT_MASK_KINDS


class ShardDataset(torch.utils.data.Dataset):
    """Map-style dataset over tar shards. ``dataset[epoch * len(dataset) + i]`` is sample i as seen in ``epoch``:
    the epoch only seeds the random choices (crop, mask, caption dropout), so an item is a pure function of its
    index and a resumed run reproduces it exactly.

    An item: ``image`` float [3, R, R] in [0, 1], ``mask`` float [1, R, R] (1 = regenerate), ``caption`` (str, the
    caption that goes with the mask), ``global_caption`` (the whole image's), ``object`` (bool: an object mask with
    its local caption was used). Caption dropout empties both.
    """

    def __init__(self, folder: str | os.PathLike, resolution: int, policy: MaskPolicy | None = None, seed: int = 0):
        self.folder = Path(folder)
        self.shards = sorted(self.folder.glob("*.tar"))
        if not self.shards:
            raise FileNotFoundError(f"no *.tar shards in {self.folder}")
        self.entries: list[tuple[int, dict]] = []
        for s, shard in enumerate(self.shards):
            for members in index_shard(shard):
                if not any(ext in members for ext in IMAGE_EXTENSIONS) or "global.txt" not in members:
                    raise ShardError(f"{shard}: sample {members[KEY]} lacks an image or a global caption "
                                     f"({sorted(m for m in members if m != KEY)})")
                self.entries.append((s, members))
        self.resolution = resolution
        self.policy = policy or MaskPolicy()
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: int, members: dict, suffix: str) -> bytes:
        """The bytes of member ``<key>.<suffix>`` (the whole member, or :class:`ShardError`)."""
        offset, size = members[suffix]
        with open(self.shards[shard], "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{self.shards[shard]}: member {members[KEY]}.{suffix} is cut short (the shard changed "
                             "or was truncated after it was indexed)")
        return data

    def _image(self, shard: int, members: dict, suffix: str, mode: str) -> Image.Image:
        """Member ``<key>.<suffix>`` decoded completely as a PIL image in ``mode``."""
        try:
            with Image.open(io.BytesIO(self._read(shard, members, suffix))) as im:
                return im.convert(mode)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            if isinstance(err, ShardError):
                raise
            raise ShardError(f"{self.shards[shard]}: member {members[KEY]}.{suffix} is not a readable image "
                             f"({type(err).__name__}: {err})") from None

    def _text(self, shard: int, members: dict, suffix: str) -> str:
        try:
            return self._read(shard, members, suffix).decode().strip()
        except UnicodeDecodeError as err:
            raise ShardError(f"{self.shards[shard]}: member {members[KEY]}.{suffix} is not UTF-8 text "
                             f"({err})") from None

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), len(self.entries))
        rng = np.random.default_rng([self.seed, epoch, index])
        shard, members = self.entries[index]
        ext = next(e for e in IMAGE_EXTENSIONS if e in members)
        image = self._image(shard, members, ext, "RGB")
        obj = self._image(shard, members, "mask.png", "L") if "mask.png" in members else None
        global_caption = self._text(shard, members, "global.txt")
        local_caption = self._text(shard, members, "local.txt") if "local.txt" in members else global_caption

        image, obj = _resize_crop(image, obj, self.resolution, rng)
        p = self.policy
        use_object = obj is not None and obj.any() and rng.uniform() < p.object_prob
        if use_object:
            mask = M.object_mask(obj, rng, p.object_kinds)
            caption = local_caption
        else:
            mask = M.random_brush_mask(self.resolution, self.resolution, rng)
            if rng.uniform() < p.invert_prob:
                mask = 1.0 - mask
            caption = global_caption
        mask = M.augment(mask, rng, p.morph_prob)
        if rng.uniform() < p.caption_dropout:
            caption = global_caption = ""
        return {"image": torch.from_numpy(image).permute(2, 0, 1).contiguous(),
                "mask": torch.from_numpy((mask > 0.5).astype(np.float32))[None],
                "caption": caption, "global_caption": global_caption, "object": bool(use_object)}


def _resize_crop(image: Image.Image, obj: Image.Image | None, size: int, rng: np.random.Generator):
    """Shorter side to ``size`` (bicubic; the mask nearest), then a random ``size`` x ``size`` crop."""
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    x0, y0 = int(rng.integers(0, nw - size + 1)), int(rng.integers(0, nh - size + 1))
    box = (x0, y0, x0 + size, y0 + size)
    arr = np.asarray(image.crop(box), dtype=np.float32) / 255.0
    if obj is None:
        return arr, None
    m = np.asarray(obj.resize((nw, nh), Image.NEAREST).crop(box), dtype=np.float32) / 255.0
    return arr, (m > 0.5).astype(np.float32)


class ResumableSampler(torch.utils.data.Sampler):
    """Each rank's share of a seeded per-epoch permutation, as ``epoch * N + index`` keys for :class:`ShardDataset`.

    The permutation of epoch e is torch.randperm(N) seeded with (seed + e); it is padded by wrapping so every
    rank gets the same number of samples (DistributedSampler's rule) and rank r takes positions r, r + W, ...
    ``start`` (samples already consumed by this rank in ``epoch``) makes a resumed run continue exactly where the
    checkpoint was taken, without reading the skipped samples.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.per_rank = -(-size // world_size)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.per_rank - self.start

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        total = self.per_rank * self.world_size
        order = (order * (-(-total // self.size)))[:total]
        mine = order[self.rank::self.world_size]
        for index in mine[self.start:]:
            yield self.epoch * self.size + index


def collate(items: list[dict]) -> dict:
    return {"image": torch.stack([it["image"] for it in items]),
            "mask": torch.stack([it["mask"] for it in items]),
            "caption": [it["caption"] for it in items],
            "global_caption": [it["global_caption"] for it in items],
            "object": torch.tensor([it["object"] for it in items])}
