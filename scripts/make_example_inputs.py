"""Write example_inputs/ from scikit-image's bundled sample photographs (both CC0; see example_inputs/README.md).

    pip download --no-deps scikit-image -d /tmp/skimage && unzip -q /tmp/skimage/*.whl 'skimage/data/*' -d /tmp/skimage
    python scripts/make_example_inputs.py /tmp/skimage/skimage/data

The photographs are downscaled (SD1.5 works in multiples of 8 px) and saved as JPEG; the mask is drawn here: an
ellipse on the empty table right of the cup (white = inpaint), where the workflows' prompts put a new object.
"""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "example_inputs"
SIZE = (576, 384)                     # coffee.png is 600 x 400; 576 x 384 keeps its 3:2 and is a multiple of 8
MASK_BOX = (424, 56, 568, 328)        # the ellipse's bounding box in the 576 x 384 image
SUBJECT_BOX, SUBJECT_SIZE = (70, 0, 370, 300), 256   # chelsea.png is 451 x 300: the cat's face, square


def main(data_dir: str) -> None:
    data = Path(data_dir)
    OUT.mkdir(exist_ok=True)
    scene = Image.open(data / "coffee.png").convert("RGB").resize(SIZE, Image.LANCZOS)
    scene.save(OUT / "coffee.jpg", quality=90)
    mask = Image.new("L", SIZE, 0)
    ImageDraw.Draw(mask).ellipse(MASK_BOX, fill=255)
    mask.save(OUT / "coffee_mask.png", optimize=True)
    subject = Image.open(data / "chelsea.png").convert("RGB").crop(SUBJECT_BOX)
    subject.resize((SUBJECT_SIZE, SUBJECT_SIZE), Image.LANCZOS).save(OUT / "chelsea_subject.jpg", quality=90)


if __name__ == "__main__":
    main(sys.argv[1])
