"""Every bundled workflow, end to end through ComfyUI's execution engine with random full-size checkpoints."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faithful_inpaint.headless import run

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / "example_workflows").glob("*.json"))


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


def test_workflow_files_are_what_build_writes(tmp_path):
    """example_workflows/*.json are exactly what example_workflows/build.py writes (layout, notes, models included)."""
    import importlib
    import sys

    sys.path.insert(0, str(WORKFLOWS[0].parent))
    try:
        build = importlib.import_module("build")
        build.build_all(tmp_path)
    finally:
        sys.path.remove(str(WORKFLOWS[0].parent))
    written = sorted(tmp_path.glob("*.json"))
    assert [p.name for p in written] == [p.name for p in WORKFLOWS]
    for new, shipped in zip(written, WORKFLOWS):
        assert new.read_text() == shipped.read_text(), f"{shipped.name}: run python example_workflows/build.py"


def test_example_inputs_reach_the_input_folder_without_overwriting(tmp_path):
    """The pack's load copied example_inputs/ to input/faithful-inpaint/; a user's own file there is kept; every image
    a workflow names is one of them."""
    import folder_paths

    from faithful_inpaint.nodes.example_inputs import SOURCE, SUBFOLDER, install_example_inputs

    shipped = sorted(p.name for p in SOURCE.iterdir() if p.suffix in (".jpg", ".png"))
    target = Path(folder_paths.get_input_directory()) / SUBFOLDER
    assert sorted(p.name for p in target.iterdir()) == shipped
    (target / shipped[0]).write_bytes(b"the user's own file")
    (target / shipped[1]).unlink()
    assert install_example_inputs() == [target / shipped[1]]
    assert (target / shipped[0]).read_bytes() == b"the user's own file"
    (target / shipped[0]).write_bytes((SOURCE / shipped[0]).read_bytes())
    named = {n["widgets_values"][0] for p in WORKFLOWS for n in json.loads(p.read_text())["nodes"]
             if n["type"] in ("LoadImage", "LoadImageMask")}
    assert named == {f"{SUBFOLDER}/{name}" for name in shipped}
    for name in shipped:
        assert (SOURCE / name).stat().st_size < 200_000


def test_bundled_workflows_convert_without_notes_and_groups():
    """The runner's UI-to-API conversion drops the note and ignores groups; every other node is in the prompt."""
    from faithful_inpaint.devtools import host
    from faithful_inpaint.headless import ui_to_api

    node_classes = host.load_pack_nodes()
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        prompt = ui_to_api.convert(wf, node_classes)
        kept = {str(n["id"]) for n in wf["nodes"] if n["type"] != "MarkdownNote" and n.get("mode", 0) == 0}
        assert set(prompt) == kept and wf["groups"], path.name
