"""Branch-training throughput (samples/s) and peak memory, through the real training script and core.

    .venv/bin/python -m faithful_inpaint.benchmarks.train_bench [--recipe brushnet] [--steps 12] [--batch-size 4]
    .venv/bin/python -m faithful_inpaint.benchmarks.train_bench --full [--resolution 512] [--mixed-precision bf16]
        [--gradient-checkpointing]                       # SD1.5 size: run on a GPU

Default: the tiny random SD1.5 (ComfyUI's UNet with the unit tests' config, a small VAE, the full-size random CLIP)
at 64x64 px on a synthetic shapes data set. ``--full``: a random-weight SD1.5 of the real size (860 M UNet, BrushNet
branch of the same size) at --resolution. Throughput counts the optimizer steps after the first (warm-up), data
loading, VAE/CLIP encoding, forward and backward included. Memory: CUDA max_memory_allocated on a GPU, else the
peak resident set size of the process above its level before training (polled every 2 ms).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from faithful_inpaint.benchmarks._measure import PeakRSS, device_name
from faithful_inpaint.training import train_branch
from faithful_inpaint.training.make_synthetic_data import write_dataset


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="brushnet")
    ap.add_argument("--full", action="store_true", help="SD1.5 size (needs a GPU to be practical)")
    ap.add_argument("--resolution", type=int, default=None, help="default 64 (tiny) / 512 (full)")
    ap.add_argument("--batch-size", type=int, default=None, help="default 4 (tiny) / 2 (full)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args(argv)
    resolution = a.resolution or (512 if a.full else 64)
    batch = a.batch_size or (2 if a.full else 4)
    base = "random:sd15:full" if a.full else "random:sd15"

    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", count=max(64, 2 * batch * a.steps), size=resolution,
                             per_shard=64)
        times = []
        args = ["--recipe", a.recipe, "--base", base, "--data", str(data), "--output-dir", str(Path(tmp) / "run"),
                "--resolution", str(resolution), "--batch-size", str(batch), "--max-steps", str(a.steps),
                "--num-workers", "2", "--checkpoint-every", "0", "--num-validation", "0", "--lr-warmup-steps", "0",
                "--log-every", str(a.steps), "--mixed-precision", a.mixed_precision, "--export-dtype", "fp16"]
        if a.gradient_checkpointing:
            args.append("--gradient-checkpointing")
        cuda = torch.cuda.is_available()
        with PeakRSS() as rss:
            result = train_branch.main(args, callbacks=(lambda step, losses, modules: times.append(
                (torch.cuda.synchronize() if cuda else None, time.perf_counter())[1]),))
        samples_per_s = (len(times) - 1) * batch / (times[-1] - times[0])
        peak = result.peak_memory_bytes if cuda else rss.used
        print(f"device: {device_name()}")
        print(f"recipe {a.recipe}, {'SD1.5 full size' if a.full else 'tiny SD1.5'}, {resolution}x{resolution} px, "
              f"batch {batch}, {a.steps} steps, mixed precision {a.mixed_precision}, gradient checkpointing "
              f"{'on' if a.gradient_checkpointing else 'off'}")
        print(f"throughput: {samples_per_s:.2f} samples/s ({(times[-1] - times[0]) / (len(times) - 1):.3f} s/step)")
        print(f"peak memory: {peak / 2**20:.0f} MiB ({'CUDA allocated' if cuda else 'RSS above start'})")


if __name__ == "__main__":
    main()
