"""A branch file written by the training script for a full-size SD1.5 (random-weight smoke checkpoint) runs through
ComfyUI's execution engine: Load Checkpoint -> BrushBranchLoader -> BrushBranchApply -> KSampler -> SaveImage.

The script runs with ``--max-steps 0`` (build the branch from the checkpoint's UNet, export), because a training
step of a full-size branch on the suite's CPU costs minutes and ~12 GB; trained files are covered on the tiny
model in test_training.py. An untrained branch's zero-convs add nothing, so strength 1 and strength 0 must give
the same image through the whole engine."""
import shutil

import numpy as np
from PIL import Image

from faithful_inpaint.devtools import smoke_checkpoints as sc
from faithful_inpaint.headless.execute import run_prompt
from faithful_inpaint.training import train_branch
from faithful_inpaint.training.make_synthetic_data import write_dataset


def test_script_export_runs_through_the_execution_engine(tmp_path):
    models = sc.default_models_dir()
    ckpt = sc.ensure_smoke_models(models, ["sd15"])["sd15"]
    sc.register_model_folders(models, ["sd15"])
    data = write_dataset(tmp_path / "data", count=2, size=64, per_shard=2)
    result = train_branch.main(["--base", str(models / "checkpoints" / ckpt), "--data", str(data),
                                "--output-dir", str(tmp_path / "run"), "--resolution", "64", "--max-steps", "0",
                                "--num-workers", "0", "--num-validation", "0", "--export-dtype", "fp16"])
    inpaint = tmp_path / "inpaint"
    inpaint.mkdir()
    shutil.copy(result.export, inpaint / "trained-branch.safetensors")
    import folder_paths

    folder_paths.add_model_folder_path("inpaint", str(inpaint))

    def prompt(strength):
        return {
            "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
            "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red vase"}},
            "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
            "4": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                         "color": 0x4080C0}},
            "5": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}},
            "6": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 24, "height": 24}},
            "7": {"class_type": "MaskComposite", "inputs": {"destination": ["5", 0], "source": ["6", 0], "x": 20,
                                                            "y": 20, "operation": "add"}},
            "8": {"class_type": "BrushBranchLoader", "inputs": {"branch_name": "trained-branch.safetensors"}},
            "9": {"class_type": "BrushBranchApply", "inputs": {
                "model": ["1", 0], "branch": ["8", 0], "vae": ["1", 2], "image": ["4", 0], "mask": ["7", 0],
                "positive": ["2", 0], "negative": ["3", 0], "strength": strength, "start": 0.0, "end": 1.0}},
            "10": {"class_type": "KSampler", "inputs": {
                "model": ["9", 0], "positive": ["9", 1], "negative": ["9", 2], "latent_image": ["9", 3],
                "seed": 5, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
            "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
            "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": f"branch{strength}"}},
        }

    images = []
    for strength in (1.0, 0.0):
        (_, _, path), = run_prompt(prompt(strength)).image_files()
        images.append(np.asarray(Image.open(path)))
    assert images[0].shape == (64, 64, 3)
    assert np.array_equal(images[0], images[1])
