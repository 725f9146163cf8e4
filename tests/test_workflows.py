"""Every bundled workflow, end to end through ComfyUI's execution engine with random full-size checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faithful_inpaint.headless import run

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "workflows").glob("*.json"))


def scene(tmp_path, size=256):
    rgb = np.zeros((size, size, 3), np.uint8)
    rgb[..., 0] = np.linspace(0, 255, size, dtype=np.uint8)[None, :]
    rgb[..., 2] = 90
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4:size // 2, size // 4:3 * size // 4] = 255
    Image.fromarray(rgb).save(tmp_path / "scene.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return rgb, mask > 0


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.stem)
def test_bundled_workflow_runs_and_keeps_the_known_region(workflow, tmp_path):
    declared = json.loads(workflow.read_text())["extra"]["faithful_inpaint"]["overrides"]
    rgb, mask = scene(tmp_path)
    args = [str(workflow), "--smoke", "--out", str(tmp_path / "out"), "--steps", "1", "--seed", "3"]
    if "image" in declared:
        args += ["--image", str(tmp_path / "scene.png"), "--mask", str(tmp_path / "mask.png")]
    assert run.main(args) == 0
    results = sorted((tmp_path / "out").glob("*Result*.png"))
    assert results, list((tmp_path / "out").iterdir())
    out = np.asarray(Image.open(results[0]).convert("RGB"))
    assert out.shape == rgb.shape
    if "image" not in declared:  # the toy-world demo makes its own scene: tests/test_toy_demo.py checks its pixels
        return
    # Outside the mask grown by the workflow's 1 px dilation (plus a pixel of margin) the original is kept exactly;
    # with the x4 super-resolution, outside its Poisson-blend region (48 px dilation kernel: 24 px each way).
    from scipy.ndimage import binary_dilation

    types = {n["type"] for n in json.loads(workflow.read_text())["nodes"]}
    margin = 26 if "InpaintConditionalUpscale" in types else 2
    keep = ~binary_dilation(mask, structure=np.ones((3, 3), bool), iterations=margin)
    assert np.array_equal(out[keep], rgb[keep])
    assert not np.array_equal(out[mask], rgb[mask])
