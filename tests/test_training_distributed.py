"""A real 2-process data-parallel run on the CPU: ``accelerate launch --num_processes 2`` (gloo), as users launch
training on several GPUs. Each rank trains on its own share of the data with its own noise; DDP averages the
gradients, so both ranks must end with the very same weights. PainterNet's branch is the one with most parts (layer
and attention control points, ATAL): DDP runs without find_unused_parameters, so every one of them must be used."""
import os

import torch

from faithful_inpaint.training.make_synthetic_data import write_dataset
from training_drivers import run_two_processes


def test_two_process_run_ends_with_identical_weights(tmp_path):
    data = write_dataset(tmp_path / "data", count=8, size=32, per_shard=4, seed=0)
    out = tmp_path / "run"
    out.mkdir()
    args = ["--base", "random:sd15", "--data", str(data), "--output-dir", str(out), "--resolution", "32",
            "--batch-size", "2", "--num-workers", "0", "--lr", "1e-3", "--lr-warmup-steps", "0", "--object-prob", "1",
            "--caption-dropout", "0", "--max-steps", "3", "--checkpoint-every", "0", "--num-validation", "0",
            "--log-every", "1", "--recipe", "painternet"]
    r0, r1 = run_two_processes("train_branch", 3, out, args,
                               {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # trained (the zero-initialised layer and attention control points moved) and saved once, by the main process
    for prefix in ("branch.brushnet_", "branch.attention_control_points."):
        assert any(k.startswith(prefix) and r0[k].abs().sum() > 0 for k in r0), prefix
    assert (out / "painternet-branch.safetensors").is_file()
    assert "samples_per_s" in (out / "log.jsonl").read_text().splitlines()[-1]
