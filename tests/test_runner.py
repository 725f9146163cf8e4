"""The headless runner: UI-format -> API conversion against the live node definitions, overrides, and real runs
through ComfyUI's validate_prompt + PromptExecutor (small image-only graphs; model workflows are tested elsewhere)."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from faithful_inpaint import devtools
from faithful_inpaint.headless import run
from faithful_inpaint.headless.execute import RunError, RunInterrupted, run_prompt
from faithful_inpaint.headless.overrides import OverrideError, apply_overrides
from faithful_inpaint.headless.ui_to_api import WorkflowError, convert, widget_slots

ROOT = Path(__file__).resolve().parent.parent


def inp(name, typ, link=None, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def out(name, typ, links=()):
    return {"name": name, "type": typ, "links": list(links)}


def node(id, typ, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    d = {"id": id, "type": typ, "pos": [0, 0], "size": [300, 100], "flags": {}, "order": 0, "mode": mode,
         "inputs": list(inputs), "outputs": list(outputs), "properties": {}}
    if widgets is not None:
        d["widgets_values"] = widgets
    if title:
        d["title"] = title
    return d


def txt2img_workflow():
    """A txt2img graph as the UI saves it, with a Reroute, a PrimitiveNode, a Note, a group, a bypassed and a muted
    node, and an unconnected LoadImage whose widgets_values carry the upload button's value."""
    return {
        "last_node_id": 30, "last_link_id": 40,
        "nodes": [
            node(4, "CheckpointLoaderSimple", ["sd15.safetensors"], outputs=[
                out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [3]), out("VAE", "VAE", [8])]),
            node(20, "Reroute", inputs=[inp("", "*", 3)], outputs=[out("", "CLIP", [30, 31])]),
            node(6, "CLIPTextEncode", ["a cat"], [inp("clip", "CLIP", 30)], [out("CONDITIONING", "CONDITIONING", [4])],
                 title="Positive"),
            node(7, "CLIPTextEncode", ["blurry"], [inp("clip", "CLIP", 31)], [out("CONDITIONING", "CONDITIONING", [6])],
                 title="Negative"),
            node(21, "PrimitiveNode", [640, "fixed"], outputs=[
                {"name": "INT", "type": "INT", "links": [40], "widget": {"name": "width"}}]),
            node(5, "EmptyLatentImage", [512, 512, 1], [inp("width", "INT", 40, widget=True)],
                 [out("LATENT", "LATENT", [2])]),
            node(3, "KSampler", [42, "randomize", 20, 8, "euler", "normal", 1],
                 [inp("model", "MODEL", 1), inp("positive", "CONDITIONING", 4), inp("negative", "CONDITIONING", 6),
                  inp("latent_image", "LATENT", 2), inp("seed", "INT", None, widget=True)],
                 [out("LATENT", "LATENT", [7])]),
            node(8, "VAEDecode", None, [inp("samples", "LATENT", 7), inp("vae", "VAE", 8)],
                 [out("IMAGE", "IMAGE", [9, 12])]),
            node(11, "ImageScale", ["nearest-exact", 64, 64, "disabled"], [inp("image", "IMAGE", 9)],
                 [out("IMAGE", "IMAGE", [10])], mode=4),
            node(9, "SaveImage", ["cat"], [inp("images", "IMAGE", 10)]),
            node(12, "SaveImage", ["muted"], [inp("images", "IMAGE", 12)], mode=2),
            node(10, "Note", ["remember to set the prompt"]),
            node(13, "LoadImage", ["example.png", "image"], outputs=[out("IMAGE", "IMAGE"), out("MASK", "MASK")]),
        ],
        "links": [[1, 4, 0, 3, 0, "MODEL"], [3, 4, 1, 20, 0, "CLIP"], [30, 20, 0, 6, 0, "CLIP"],
                  [31, 20, 0, 7, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"], [6, 7, 0, 3, 2, "CONDITIONING"],
                  [40, 21, 0, 5, 0, "INT"], [2, 5, 0, 3, 3, "LATENT"], [7, 3, 0, 8, 0, "LATENT"],
                  [8, 4, 2, 8, 1, "VAE"],
                  [9, 8, 0, 11, 0, "IMAGE"], [10, 11, 0, 9, 0, "IMAGE"], [12, 8, 0, 12, 0, "IMAGE"]],
        "groups": [{"title": "Sampling", "bounding": [0, 0, 500, 500]}],
        "config": {}, "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4,
    }


def test_txt2img_conversion_matches_the_ui():
    assert convert(txt2img_workflow()) == {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"},
              "_meta": {"title": "CheckpointLoaderSimple"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]},
              "_meta": {"title": "Positive"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]},
              "_meta": {"title": "Negative"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 640, "height": 512, "batch_size": 1},
              "_meta": {"title": "EmptyLatentImage"}},
        "3": {"class_type": "KSampler", "inputs": {
            "seed": 42, "steps": 20, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1,
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]},
            "_meta": {"title": "KSampler"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
              "_meta": {"title": "VAEDecode"}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "cat", "images": ["8", 0]},
              "_meta": {"title": "SaveImage"}},
        "13": {"class_type": "LoadImage", "inputs": {"image": "example.png"}, "_meta": {"title": "LoadImage"}},
    }


@pytest.mark.parametrize("typ, values, expected", [
    ("KSamplerAdvanced", ["enable", 5, "fixed", 20, 7.5, "euler", "karras", 0, 10000, "disable"],
     {"add_noise": "enable", "noise_seed": 5, "steps": 20, "cfg": 7.5, "sampler_name": "euler", "scheduler": "karras",
      "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}),
    ("RandomNoise", [7, "increment"], {"noise_seed": 7}),
    ("LoadImageMask", ["m.png", "red", "image"], {"image": "m.png", "channel": "red"}),
    ("LoadImageMask", ["m.png", "red"], {"image": "m.png", "channel": "red"}),  # written without UI-only values
    ("SaveImage", None, {"filename_prefix": "ComfyUI"}),  # saved without widgets_values: the defaults
    ("KSampler", {"seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0},
     {"seed": 1, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}),
])
def test_widget_values_follow_the_frontend_layout(typ, values, expected):
    assert convert({"nodes": [node(1, typ, values)], "links": []})["1"]["inputs"] == expected


def test_control_widget_rules_follow_the_frontend():
    class Spec:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"control_after_generate": False}),
                                 "value": ("INT", {"control_after_generate": True}),
                                 "choice": (["a", "b"], {"control_after_generate": True}),
                                 "text": ("STRING", {"forceInput": True})},
                    "optional": {"noise_seed": ("INT", {})}}
    assert widget_slots("X", Spec) == [("seed", True), ("value", True), ("control_after_generate", False),
                                       ("choice", True), ("control_after_generate", False),
                                       ("control_filter_list", False), ("noise_seed", True),
                                       ("control_after_generate", False)]


def test_bypass_picks_the_input_of_the_wanted_type():
    # ImageCompositeMasked bypassed: its IMAGE output continues from input 0 (destination), not from source.
    wf = {"nodes": [
        node(1, "EmptyImage", [8, 8, 1, 0], outputs=[out("IMAGE", "IMAGE", [1])]),
        node(2, "EmptyImage", [8, 8, 1, 255], outputs=[out("IMAGE", "IMAGE", [2])]),
        node(3, "ImageCompositeMasked", [0, 0, False], [inp("destination", "IMAGE", 1), inp("source", "IMAGE", 2)],
             [out("IMAGE", "IMAGE", [3])], mode=4),
        node(4, "ImageInvert", None, [inp("image", "IMAGE", 3)], [out("IMAGE", "IMAGE", [5])], mode=4),
        node(5, "PreviewImage", None, [inp("images", "IMAGE", 5)])],
        "links": [[1, 1, 0, 3, 0, "IMAGE"], [2, 2, 0, 3, 1, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                  [5, 4, 0, 5, 0, "IMAGE"]]}
    prompt = convert(wf)
    assert prompt["5"]["inputs"] == {"images": ["1", 0]}       # through two bypassed nodes
    assert set(prompt) == {"1", "2", "5"}


def test_errors_name_the_node():
    with pytest.raises(WorkflowError, match=r'node 7 \(NoSuchNode "My node"\).*not installed'):
        convert({"nodes": [node(7, "NoSuchNode", [], title="My node")], "links": []})
    with pytest.raises(WorkflowError, match=r"node 3 \(KSampler\): 5 widget values.*7 widgets \(seed, "
                                            r"control_after_generate, steps"):
        convert({"nodes": [node(3, "KSampler", [1, "fixed", 20, 8, "euler"])], "links": []})
    with pytest.raises(WorkflowError, match=r"node 9 \(SaveImage\): an input uses link 99"):
        convert({"nodes": [node(9, "SaveImage", ["x"], [inp("images", "IMAGE", 99)])], "links": []})
    muted = txt2img_workflow()
    next(n for n in muted["nodes"] if n["id"] == 8)["mode"] = 2
    with pytest.raises(WorkflowError, match=r"node 9 \(SaveImage\): required input 'images' comes from node 8 "
                                            r"\(VAEDecode\), which is muted"):
        convert(muted)
    dead_end = {"nodes": [node(7, "SolidMask", [1.0, 8, 8], outputs=[out("MASK", "MASK", [6])], mode=4),
                          node(6, "SaveImage", ["x"], [inp("images", "IMAGE", 6)])],
                "links": [[6, 7, 0, 6, 0, "IMAGE"]]}
    with pytest.raises(WorkflowError, match=r"node 6 \(SaveImage\): required input 'images' is linked through a "
                                            r"bypassed node"):
        convert(dead_end)


def test_overrides_follow_the_declared_targets():
    wf = txt2img_workflow()
    wf["extra"]["faithful_inpaint"] = {"overrides": {"prompt": [[6, "text"]], "seed": [[3, "seed"]],
                                                     "ckpt": [[4, "ckpt_name"]], "bad": [[11, "width"]]}}
    prompt = convert(wf)
    apply_overrides(prompt, wf, {"prompt": ["a dog"], "seed": [7], "ckpt": ["other.safetensors"]})
    assert (prompt["6"]["inputs"]["text"], prompt["3"]["inputs"]["seed"]) == ("a dog", 7)
    assert prompt["4"]["inputs"]["ckpt_name"] == "other.safetensors"
    with pytest.raises(OverrideError, match="--negative was given, but the workflow declares no 'negative' target"):
        apply_overrides(prompt, wf, {"negative": ["x"]})
    with pytest.raises(OverrideError, match="target node 11 is not in the prompt"):
        apply_overrides(prompt, wf, {"bad": [1]})


# ---------------------------------------------------------------------------------------------------------------
# Real runs through validate_prompt + PromptExecutor
# ---------------------------------------------------------------------------------------------------------------

def image_workflow(extra=None):
    """LoadImage -> (Reroute) -> ImageScale -> SaveImage, a bypassed ImageInvert, a PreviewImage of the mask."""
    return {
        "nodes": [
            node(1, "LoadImage", ["placeholder.png", "image"], outputs=[
                out("IMAGE", "IMAGE", [1]), out("MASK", "MASK", [5])], title="Input"),
            node(2, "Reroute", inputs=[inp("", "*", 1)], outputs=[out("", "IMAGE", [2])]),
            node(3, "ImageInvert", None, [inp("image", "IMAGE", 2)], [out("IMAGE", "IMAGE", [3])], mode=4),
            node(4, "ImageScale", ["bilinear", 40, 24, "disabled"], [inp("image", "IMAGE", 3)],
                 [out("IMAGE", "IMAGE", [4])]),
            node(5, "SaveImage", ["headless"], [inp("images", "IMAGE", 4)], title="Result"),
            node(6, "LoadImageMask", ["placeholder.png", "red", "image"], outputs=[out("MASK", "MASK", [6])]),
            node(7, "MaskToImage", None, [inp("mask", "MASK", 6)], [out("IMAGE", "IMAGE", [7])]),
            node(8, "PreviewImage", None, [inp("images", "IMAGE", 7)]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 2, 0, 3, 0, "IMAGE"], [3, 3, 0, 4, 0, "IMAGE"],
                  [4, 4, 0, 5, 0, "IMAGE"], [6, 6, 0, 7, 0, "MASK"], [7, 7, 0, 8, 0, "IMAGE"]],
        "extra": {"faithful_inpaint": {"overrides": {"image": [[1, "image"]], "mask": [[6, "image"]],
                                                     "ckpt": [[9, "ckpt_name"]]}, **(extra or {})}},
    }


def write_workflow(tmp_path, wf, name="wf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(wf))
    return str(path)


def test_cli_runs_the_workflow_and_writes_pngs(tmp_path, capsys):
    img = tmp_path / "photo.png"
    Image.new("RGB", (80, 48), (255, 0, 0)).save(img)
    mask = tmp_path / "mask.png"
    run.make_test_mask((80, 48)).save(mask)
    code = run.main([write_workflow(tmp_path, image_workflow()), "--out", str(tmp_path / "out"),
                     "--image", str(img), "--mask", str(mask)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result, preview = tmp_path / "out" / "wf-5-Result-00.png", tmp_path / "out" / "wf-8-PreviewImage-00.png"
    assert f"wrote {result}" in printed and "node 4 (ImageScale) ..." in printed
    with Image.open(result) as im:
        assert im.size == (40, 24)
        assert im.getpixel((5, 5)) == (255, 0, 0)  # ImageInvert was bypassed
        assert "workflow" in im.info and json.loads(im.info["prompt"])["1"]["inputs"]["image"].startswith("photo-")
    with Image.open(preview) as im:
        assert im.convert("L").getpixel((40, 24)) == 255 and im.convert("L").getpixel((2, 2)) == 0


def test_smoke_mode_generates_models_inputs_and_says_noise(tmp_path, capsys, monkeypatch):
    calls = []

    def ensure_smoke_models(models_dir, kinds):
        calls.append(list(kinds))
        (Path(models_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
        (Path(models_dir) / "checkpoints" / "fake-random.safetensors").write_bytes(b"")
        return {k: "fake-random.safetensors" for k in kinds}

    fake = types.SimpleNamespace(KINDS=("sd15_inpaint",), ensure_smoke_models=ensure_smoke_models,
                                 folder_for=lambda kind: "checkpoints", default_models_dir=lambda: tmp_path / "models")
    monkeypatch.setitem(sys.modules, "faithful_inpaint.devtools.smoke_checkpoints", fake)
    monkeypatch.setattr(devtools, "smoke_checkpoints", fake, raising=False)
    wf = image_workflow({"smoke": {"ckpt": "sd15_inpaint", "image_size": [64, 48]}})
    wf["nodes"].append(node(9, "CheckpointLoaderSimple", ["none.safetensors"]))  # declared target, not executed
    code = run.main([write_workflow(tmp_path, wf), "--out", str(tmp_path / "out"), "--smoke"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert calls == [["sd15_inpaint"]] and printed.count("output images are NOISE") == 2
    with Image.open(tmp_path / "out" / "wf-5-Result-00.png") as im:
        assert json.loads(im.info["prompt"])["9"]["inputs"]["ckpt_name"] == "fake-random.safetensors"
    with Image.open(tmp_path / "out" / "wf-8-PreviewImage-00.png") as im:  # the centred rectangle mask
        gray = im.convert("L")
        assert im.size == (64, 48) and gray.getpixel((32, 24)) == 255 and gray.getpixel((3, 3)) == 0


def test_errors_reported_by_comfyui_name_the_node(tmp_path, capsys):
    code = run.main([write_workflow(tmp_path, image_workflow()), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 1 and ('node 1 (LoadImage "Input"): Custom validation failed for node: image - Invalid image file: '
                          "placeholder.png") in err
    code = run.main([write_workflow(tmp_path, image_workflow()), "--seed", "3"])
    assert code == 1 and "--seed was given, but the workflow declares no 'seed' target" in capsys.readouterr().err


def test_execution_error_and_interrupt(monkeypatch):
    import comfy.model_management
    import nodes

    class Boom:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"image": ("IMAGE",)}}
        RETURN_TYPES, FUNCTION, CATEGORY = ("IMAGE",), "go", "test"

        def go(self, image):
            raise ValueError("boom")

    class Stop(Boom):
        def go(self, image):
            comfy.model_management.interrupt_current_processing(True)
            return (image,)

    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestBoom", Boom)
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "TestStop", Stop)
    for typ, error, message in (("TestBoom", RunError, r'failed at node 2 \(TestBoom "Kaboom"\): ValueError: boom'),
                                ("TestStop", RunInterrupted, r"Interrupted at node 3 \(PreviewImage\)")):
        prompt = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                  "2": {"class_type": typ, "inputs": {"image": ["1", 0]}, "_meta": {"title": "Kaboom"}},
                  "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}
        with pytest.raises(error, match=message):
            run_prompt(prompt)


def test_cli_subprocess_exit_code(tmp_path):
    wf = {"nodes": [node(1, "EmptyImage", [16, 8, 2, 0], outputs=[out("IMAGE", "IMAGE", [1])]),
                    node(2, "SaveImage", ["s"], [inp("images", "IMAGE", 1)])],
          "links": [[1, 1, 0, 2, 0, "IMAGE"]]}
    cmd = [sys.executable, "-m", "faithful_inpaint.headless.run", write_workflow(tmp_path, wf, "empty.json"), "--out",
           str(tmp_path / "out"), "--comfyui-base", str(tmp_path / "base")]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == ["empty-2-SaveImage-00.png", "empty-2-SaveImage-01.png"]
    wf["nodes"][1]["widgets_values"] = []
    done = subprocess.run(cmd[:3] + [write_workflow(tmp_path, wf, "bad.json")] + cmd[4:], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "node 2 (SaveImage): 0 widget values" in done.stderr


def test_branch_option_points_the_bundled_branch_workflows_at_a_users_file(tmp_path, monkeypatch):
    """--branch FILE: the file is linked into the run's own models/inpaint folder and its name replaces the branch
    loader's file in the bundled brushnet / painternet / mtadiffusion workflows (the prompt is captured, not run)."""
    import folder_paths

    prompts, found = [], []

    def capture(prompt, workflow=None, on_message=None):
        prompts.append(prompt)
        found.append(Path(folder_paths.get_full_path("inpaint", "my_branch.safetensors")).resolve())
        return types.SimpleNamespace(image_files=lambda: [])

    monkeypatch.setattr(run, "run_prompt", capture)
    user = tmp_path / "my_branch.safetensors"
    user.write_bytes(b"a trained branch")
    for name in ("brushnet", "painternet", "mtadiffusion"):
        code = run.main([str(ROOT / "example_workflows" / f"{name}.json"), "--branch", str(user),
                         "--out", str(tmp_path)])
        assert code == 0, name
        loaders = [n["inputs"] for n in prompts[-1].values() if n["class_type"] == "BrushBranchLoader"]
        assert [i["branch_name"] for i in loaders] == ["my_branch.safetensors"], name
    assert found == [user.resolve()] * 3
    assert folder_paths.get_full_path("inpaint", "my_branch.safetensors") is None   # registered for the run only
