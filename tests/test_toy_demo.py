"""The main command's default: the toy-world demo (example_workflows/toy_world_demo.json) on the model files in toy/.

The files are the pack's own (trained by training/toy_world.py and shipped in toy/); these tests use exactly those
files, through ToyWorldLoader and through the runner's real execution-engine path."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from faithful_inpaint.headless import run
from faithful_inpaint.kernels import toy_world as tw

# file -> (UNet input channels, the command module its metadata records: the first world's files were trained before
# the pack was imported by its own name)
TOY_FILES = {"toy_world_inpaint.safetensors": (9, "training.toy_world"), "toy_world.safetensors": (4, "training.toy_world"),
             "toy_world_sd_inpaint.safetensors": (9, "faithful_inpaint.training.toy_world"),
             "toy_world_sd.safetensors": (4, "faithful_inpaint.training.toy_world")}
GAP = 8                                                                         # ImageStitch spacing in the demo


def pixels(image: np.ndarray) -> np.ndarray:
    """A [0, 1] image as SaveImage writes it (clip, scale by 255, truncate to uint8)."""
    return np.clip(255.0 * image, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", TOY_FILES)
def test_shipped_toy_files_load_through_the_loader(name):
    import comfy.sd
    from faithful_inpaint.nodes.toy_world import PACK_TOY_DIR, ToyWorldLoader

    assert (PACK_TOY_DIR / name).is_file(), f"{PACK_TOY_DIR / name} is missing: the pack ships it (see toy/README.md)"
    with torch.inference_mode():
        model, clip, vae = ToyWorldLoader.execute(name).result
    channels, module = TOY_FILES[name]
    assert model.model.diffusion_model.input_blocks[0][0].in_channels == channels
    assert isinstance(clip, comfy.sd.CLIP) and isinstance(vae, comfy.sd.VAE)
    meta = json.loads(safe_open(str(PACK_TOY_DIR / name), "pt").metadata()[tw.META_KEY])
    assert meta["training"]["command"].startswith(f"python -m {module} ") and meta["training"]["seed"] == 0
    if "_sd" in name:
        assert meta["training"]["recipe"] == "sd-inpaint" and "--recipe sd-inpaint" in meta["training"]["command"]


def demo_scene() -> tuple[int, str, str]:
    """(seed, kind, world) of the demo's ToyWorldScene node, as the bundled workflow sets them."""
    workflow = json.loads(run.TOY_DEMO.read_text())
    seed, _, kind, world = next(n for n in workflow["nodes"] if n["type"] == "ToyWorldScene")["widgets_values"]
    return seed, kind, world


def test_demo_shows_painta_painting_what_the_model_without_it_neglects(tmp_path):
    """The main command's demo, through the runner: on the prompt-neglect model the same latent and noise give, without
    PAIntA, a hole with no trace of the prompted colour and, with PAIntA, the prompted colour as the hole's dominant
    blob (docs/toy-world.md: how often that happens over 400 cases)."""
    seed, kind, world = demo_scene()
    assert world == "neglect"
    assert run.main([str(run.TOY_DEMO), "--out", str(tmp_path)]) == 0
    case = tw.CASE_MAKERS[world](seed, kind)
    scene, hole = pixels(case.scene.image()), case.mask_image() > 0.5
    (result,) = tmp_path.glob("toy_world_demo-*-Result-with-PAIntA-00.png")
    out = np.asarray(Image.open(result).convert("RGB"))
    assert out.shape == scene.shape
    assert np.array_equal(out[~hole], scene[~hole])                              # pasted into the scene exactly
    (strip,) = tmp_path.glob("toy_world_demo-*-Without-and-with-PAIntA-00.png")
    panels = np.asarray(Image.open(strip).convert("RGB"))
    size = scene.shape[1]
    assert panels.shape == (scene.shape[0], 4 * size + 3 * GAP, 3)                 # scene | mask | without | with
    scene_panel, without, with_painta = (panels[:, i * (size + GAP):i * (size + GAP) + size] for i in (0, 2, 3))
    assert np.array_equal(scene_panel, scene) and np.array_equal(with_painta, out)
    assert np.array_equal(without[~hole], scene[~hole])
    plain = tw.score_case(tw.to_cells(without / 255.0), case)
    painted = tw.score_case(tw.to_cells(out / 255.0), case)
    assert not plain["present"], (case.prompt, plain)                              # the model neglects the prompt
    assert painted["present"] and painted["dominant"], (case.prompt, painted)      # PAIntA paints it


def test_without_a_workflow_the_runner_picks_the_toy_demo_or_profi_painter_with_a_checkpoint():
    assert run.parse_args([]).workflow is None
    assert run.default_workflow(None) == run.TOY_DEMO and run.TOY_DEMO.name == "toy_world_demo.json"
    assert run.default_workflow(["my-inpainting.safetensors"]) == run.CKPT_DEFAULT
    assert run.CKPT_DEFAULT.name == "profi_painter.json"
    assert run.TOY_DEMO.is_file() and run.CKPT_DEFAULT.is_file()


def test_ckpt_without_a_workflow_runs_profi_painter(tmp_path, capsys):
    # A name ComfyUI does not list fails validation, before anything loads: enough to see which workflow ran.
    assert run.main(["--ckpt", "no-such-checkpoint.safetensors", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "Running " in out and "profi_painter.json" in out
    assert "no-such-checkpoint.safetensors" in err


def test_missing_toy_files_end_in_one_error_line_with_the_training_command(monkeypatch, capsys, caplog):
    import folder_paths
    from faithful_inpaint.nodes.toy_world import FOLDER

    real = folder_paths.get_full_path
    monkeypatch.setattr(folder_paths, "get_full_path",
                        lambda folder, name: None if folder == FOLDER else real(folder, name))
    assert run.main([]) == 1
    out, err = capsys.readouterr()
    assert "toy_world_demo.json" in out.splitlines()[0]
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert "ToyWorldLoader" in line and "python -m faithful_inpaint.training.toy_world --variant inpaint" in line
    assert "Traceback" not in err + caplog.text
