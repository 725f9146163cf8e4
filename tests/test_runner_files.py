"""The runner leaves the user's ComfyUI folders alone, refuses broken input images and never exits 0 when ComfyUI
drops an output (issue 18 items 2-4)."""
import json
from pathlib import Path

import pytest
from PIL import Image

from faithful_inpaint.headless import run
from faithful_inpaint.headless.execute import RunError, run_prompt
from test_runner import image_workflow, node, write_workflow


def user_folders():
    """Every file and folder under ComfyUI's input, output, temp and models folders, and the model search paths."""
    import folder_paths

    roots = [folder_paths.get_input_directory(), folder_paths.get_output_directory(),
             folder_paths.get_temp_directory(), folder_paths.models_dir]
    files = {str(p) for root in roots for p in Path(root).rglob("*")}
    return roots, files, {k: list(v[0]) for k, v in folder_paths.folder_names_and_paths.items()}


def test_a_run_writes_nothing_into_the_users_comfyui_folders(tmp_path, monkeypatch, capsys):
    import folder_paths

    user_ckpt = Path(folder_paths.get_folder_paths("checkpoints")[0]) / "mine.safetensors"
    user_ckpt.parent.mkdir(parents=True, exist_ok=True)
    user_ckpt.write_bytes(b"the user's own file of that name")
    mine = tmp_path / "elsewhere" / "mine.safetensors"
    mine.parent.mkdir()
    mine.write_bytes(b"the file given with --ckpt")
    img, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (40, 24), (0, 255, 0)).save(img)
    run.make_test_mask((40, 24)).save(mask)
    before = user_folders()

    seen = {}
    real_run_prompt = run.run_prompt

    def spy(prompt, workflow=None, on_message=None):
        seen["ckpt"] = Path(folder_paths.get_full_path("checkpoints", prompt["9"]["inputs"]["ckpt_name"])).resolve()
        seen["image"] = Path(folder_paths.get_annotated_filepath(prompt["1"]["inputs"]["image"])).read_bytes()
        seen["temp"] = folder_paths.get_temp_directory()
        return real_run_prompt(prompt, workflow, on_message)

    monkeypatch.setattr(run, "run_prompt", spy)
    wf = image_workflow()
    wf["nodes"].append(node(9, "CheckpointLoaderSimple", ["none.safetensors"]))   # declared target, not executed
    code = run.main([write_workflow(tmp_path, wf), "--out", str(tmp_path / "out"), "--image", str(img),
                     "--mask", str(mask), "--ckpt", str(mine)])
    assert code == 0, capsys.readouterr()
    assert seen["ckpt"] == mine.resolve()          # the given file wins over the user's namesake
    assert seen["image"] == img.read_bytes()
    assert not Path(seen["temp"]).exists()                         # the run's folder is gone
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["wf-5-Result-00.png", "wf-8-PreviewImage-00.png"]
    assert user_folders() == before                                 # no file, link or search path left behind
    assert user_ckpt.read_bytes() == b"the user's own file of that name"


@pytest.mark.parametrize("damage", ["truncated", "not an image", "empty"])
def test_a_broken_input_image_is_refused_naming_the_path(tmp_path, capsys, damage):
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 60).convert("RGB").save(good)
    bad = tmp_path / "bad.png"
    data = good.read_bytes()
    bad.write_bytes({"truncated": data[: len(data) // 2], "not an image": b"GIF89a" + bytes(100),
                     "empty": b""}[damage])
    before = user_folders()
    code = run.main([write_workflow(tmp_path, image_workflow()), "--out", str(tmp_path / "out"),
                     "--image", str(bad), "--mask", str(good)])
    err = capsys.readouterr().err
    assert code == 1 and f"--image {bad}: not a complete image file" in err, err
    assert not (tmp_path / "out").exists() and user_folders() == before


def cycle_prompt():
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ok"}},
            "3": {"class_type": "ImageBlend", "inputs": {"image1": ["1", 0], "image2": ["4", 0],
                                                         "blend_factor": 0.5, "blend_mode": "normal"}},
            "4": {"class_type": "ImageInvert", "inputs": {"image": ["3", 0]}},
            "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}, "_meta": {"title": "Looped"}}}


def test_an_output_comfyui_drops_for_a_cycle_fails_the_run_naming_it(tmp_path, capsys):
    with pytest.raises(RunError, match=r'output node 5 \(PreviewImage "Looped"\): its inputs form a cycle through '
                                       r"nodes 4, 3"):
        run_prompt(cycle_prompt())
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps(cycle_prompt()))
    code = run.main([str(path), "--out", str(tmp_path / "out")])
    assert code == 1 and "cycle" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
