"""Per-case results on disk: one record per (run key, case), written atomically, so a killed run resumes where it
stopped and trusts nothing half-written.

Layout: ``OUT/cases/<variant>-<key>/<case>.json`` with the output beside it (``<case>.png`` for images,
``<case>.npy`` for arrays). The key is a hash of everything that decides the output (workflow, settings, seed
rule); the record JSON is written last, by rename, and is what marks a case as done.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import numpy as np


def run_key(settings: dict) -> str:
    """12 hex digits of the SHA-256 of ``settings`` as canonical JSON."""
    text = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", str(text)).strip("-") or "x"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, flush to disk, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def encode_png(image: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


class RunStore:
    """The records of one variant under one key."""

    def __init__(self, out: str | Path, variant: str, key: str):
        self.folder = Path(out) / "cases" / f"{slug(variant)}-{key}"
        self.key = key

    def record_path(self, case_id: str) -> Path:
        return self.folder / f"{slug(case_id)}.json"

    def load(self, case_id: str) -> dict | None:
        """The case's record, or None when it is missing, unreadable or of another key (then it is redone)."""
        path = self.record_path(case_id)
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if record.get("key") != self.key or record.get("case") != case_id:
            return None
        if any(not (self.folder / name).is_file() for name in record.get("files", {}).values()):
            return None
        return record

    def save(self, record: dict, image: np.ndarray | None = None, array: np.ndarray | None = None) -> dict:
        """Output files first, the record last; returns the record as written (files it already lists are kept)."""
        record = dict(record, key=self.key, files=dict(record.get("files") or {}))
        base = slug(record["case"])
        if image is not None:
            atomic_write(self.folder / f"{base}.png", encode_png(image))
            record["files"]["image"] = f"{base}.png"
        if array is not None:
            atomic_write(self.folder / f"{base}.npy", encode_npy(array))
            record["files"]["array"] = f"{base}.npy"
        atomic_write(self.record_path(record["case"]), json.dumps(record, indent=1).encode())
        return record

    def output_image(self, record: dict) -> np.ndarray | None:
        from PIL import Image

        name = record.get("files", {}).get("image")
        if name is None:
            return None
        with Image.open(self.folder / name) as im:
            return np.asarray(im.convert("RGB"), np.float32) / 255.0

    def output_array(self, record: dict) -> np.ndarray | None:
        name = record.get("files", {}).get("array")
        return None if name is None else np.load(self.folder / name, allow_pickle=False)
