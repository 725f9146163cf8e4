"""Copy the pack's example inputs (example_inputs/) into ComfyUI's input folder, under a subfolder of the pack's own.

The bundled workflows name them as ``faithful-inpaint/<file>``. A file already there is left as it is (the user may
have replaced it); a read-only input folder only costs a warning.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import folder_paths

SOURCE = Path(__file__).resolve().parent.parent / "example_inputs"
SUBFOLDER = "faithful-inpaint"
SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def install_example_inputs() -> list[Path]:
    """Copy missing example images to ``<input>/faithful-inpaint/``; returns the files written."""
    target = Path(folder_paths.get_input_directory()) / SUBFOLDER
    written = []
    try:
        for src in sorted(SOURCE.iterdir()):
            dst = target / src.name
            if src.suffix.lower() not in SUFFIXES or dst.exists():
                continue
            target.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            written.append(dst)
    except OSError as e:
        logging.warning("faithful-inpaint: could not copy the example inputs to %s (%s); the bundled workflows "
                        "will ask for their images", target, e)
    return written
